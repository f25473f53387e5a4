"""sena/lora.py: B = 0 is the base, disabled is the base, merged equals unmerged, only LoRA trains, PEFT format."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from sena.lora import (
    LLAMA_TARGETS,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_disabled,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]


class _Block(nn.Module):
    def __init__(self, d, attn_names, mlp_names):
        super().__init__()
        self.self_attn = nn.Module()
        for n in attn_names:
            setattr(self.self_attn, n, nn.Linear(d, d))
        self.mlp = nn.Module()
        for n in mlp_names:
            setattr(self.mlp, n, nn.Linear(d, d, bias=False))

    def forward(self, x):
        for m in list(self.self_attn.children()) + list(self.mlp.children()):
            x = x + torch.tanh(m(x))
        return x


class ToyLlava(nn.Module):
    """Linear layers at the same paths as sena.model.Llava / transformers' LlavaForConditionalGeneration."""

    def __init__(self, d=8, vocab=11):
        super().__init__()
        self.model = nn.Module()
        self.model.vision_tower = nn.Module()
        self.model.vision_tower.encoder = nn.Module()
        self.model.vision_tower.encoder.layers = nn.ModuleList([_Block(d, ["q_proj", "v_proj"], ["fc1"])])
        self.model.multi_modal_projector = nn.Module()
        self.model.multi_modal_projector.linear_1 = nn.Linear(d, d)
        self.model.language_model = nn.Module()
        self.model.language_model.layers = nn.ModuleList(
            [_Block(d, ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "down_proj"]) for _ in range(2)]
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        x = self.model.multi_modal_projector.linear_1(self.model.vision_tower.encoder.layers[0](x))
        for layer in self.model.language_model.layers:
            x = layer(x)
        return self.lm_head(x)


def _toy(dtype=torch.float64):
    torch.manual_seed(0)
    return ToyLlava().to(dtype)


def _randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_apply_lora_targets_language_model_only():
    model = _toy()
    names = apply_lora(model, TARGETS, r=2, alpha=4)
    expected = [
        f"model.language_model.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.q_proj", "self_attn.v_proj")
    ]
    expected += [f"model.language_model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert sorted(names) == sorted(expected)
    assert type(model.model.vision_tower.encoder.layers[0].self_attn.q_proj) is nn.Linear
    lora = model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(lora, LoRALinear) and lora.scaling == 2.0
    assert lora.lora_A.weight.shape == (2, 8) and lora.lora_B.weight.shape == (8, 2)
    # PEFT-like parameter paths
    keys = set(dict(model.named_parameters()))
    assert "model.language_model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    # include=None reaches the vision tower too; exclude drops paths
    assert len(apply_lora(_toy(), TARGETS, r=2, alpha=4, include=None)) == 8
    assert len(apply_lora(_toy(), TARGETS, r=2, alpha=4, exclude=["layers.1."])) == 3
    with pytest.raises(ValueError):
        apply_lora(_toy(), ["nope_proj"], r=2, alpha=4)


def test_zero_B_equals_base_and_disabled_equals_base():
    model = _toy()
    base = copy.deepcopy(model)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    apply_lora(model, TARGETS, r=2, alpha=4)
    assert all(torch.count_nonzero(m.lora_A.weight) > 0 for m in model.modules() if isinstance(m, LoRALinear))
    assert torch.equal(model(x), base(x))  # B = 0: exactly the base
    _randomize_B(model)
    assert (model(x) - base(x)).abs().max() > 1e-2  # the adapter now changes the output
    with lora_disabled(model):
        assert torch.equal(model(x), base(x))
    assert (model(x) - base(x)).abs().max() > 1e-2  # flags restored on exit


def test_lora_forward_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    m = LoRALinear(base, r=3, alpha=6)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    x = torch.randn(5, 6, dtype=torch.float64)
    W, b, A, B = base.weight, base.bias, m.lora_A.weight, m.lora_B.weight
    torch.testing.assert_close(m(x), x @ W.T + b + 2.0 * (x @ A.T @ B.T), rtol=0, atol=1e-12)


def test_only_lora_params_get_grads_and_base_is_bit_identical_after_adamw():
    model = _toy(torch.float32)
    apply_lora(model, TARGETS, r=2, alpha=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if ".lora_A." in n or ".lora_B." in n} and len(trainable) == 12
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randn(4, 8)
    model(x).pow(2).mean().backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None
        else:
            assert p.grad is None, n
    opt.step()
    for n, p in model.named_parameters():
        if n in trainable and ".lora_B." in n:
            assert not torch.equal(p, before[n]), n  # B moved away from 0
        elif n not in trainable:
            assert torch.equal(p, before[n]), n  # bit-identical base


def test_merge_after_real_step_equals_unmerged_and_formula():
    model = _toy(torch.float32)
    apply_lora(model, TARGETS, r=2, alpha=4)
    opt = torch.optim.AdamW(lora_parameters(model), lr=5e-2)
    x = torch.randn(4, 8)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    q = model.model.language_model.layers[1].self_attn.q_proj
    expected_w = q.base_layer.weight + 2.0 * q.lora_B.weight @ q.lora_A.weight
    assert torch.count_nonzero(q.lora_B.weight) > 0
    unmerged = model(x)
    merged_names = merge_lora(model)
    assert len(merged_names) == 6 and not any(isinstance(m, LoRALinear) for m in model.modules())
    merged_q = model.model.language_model.layers[1].self_attn.q_proj
    assert type(merged_q) is nn.Linear
    torch.testing.assert_close(merged_q.weight, expected_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    # the merged model's keys are the plain ones again
    assert "model.language_model.layers.1.self_attn.q_proj.weight" in dict(model.named_parameters())


def test_save_load_round_trip(tmp_path):
    model = _toy()
    apply_lora(model, TARGETS, r=2, alpha=4)
    _randomize_B(model)
    save_adapter(model, tmp_path, base_model_path="/some/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False and config["modules_to_save"] is None
    assert config["base_model_name_or_path"] == "/some/base"
    # a regex that picks the language model's layers only (the vision tower also has q_proj / v_proj)
    assert config["target_modules"] == r".*language_model.*\.(down_proj|q_proj|v_proj)"
    sd = lora_state_dict(model)
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert len(sd) == 12

    fresh = _toy()  # same base weights (same seed), no adapters
    loaded = load_adapter(fresh, tmp_path)
    assert len(loaded) == 6
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_bf16_base_keeps_fp32_lora():
    model = _toy(torch.bfloat16)
    apply_lora(model, TARGETS, r=2, alpha=4)
    q = model.model.language_model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A.weight.dtype == torch.float32
    out = model(torch.randn(2, 8).bfloat16())
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------- sena.model.Llava and PEFT parity


@pytest.fixture(scope="module")
def tiny_hf_llava(tmp_path_factory):
    """A tiny transformers LlavaForConditionalGeneration saved to disk: (hf_model, path)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        image_token_index=63,
        vision_feature_layer=-2,
    )
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llava")
    hf.save_pretrained(path)
    return hf, path


def _llava_inputs():
    g = torch.Generator().manual_seed(3)
    text = torch.randint(3, 60, (2, 6), generator=g)
    input_ids = torch.cat([text[:, :2], torch.full((2, 4), 63), text[:, 2:]], 1)  # 4 image tokens per image
    pixel_values = torch.randn(2, 3, 16, 16, generator=g)
    return input_ids, pixel_values


def _sena_llava(path):
    from sena.checkpoint import load_pretrained

    model, _, _ = load_pretrained(path)
    return model.eval()


def test_llava_lora_invariants(tiny_hf_llava, tmp_path):
    _, path = tiny_hf_llava
    model = _sena_llava(path)
    input_ids, pixel_values = _llava_inputs()
    with torch.no_grad():
        base = model(input_ids, pixel_values=pixel_values)
        names = apply_lora(model, list(LLAMA_TARGETS), r=4, alpha=8)
        assert len(names) == 2 * 7 and all(n.startswith("model.language_model.layers.") for n in names)
        assert torch.equal(model(input_ids, pixel_values=pixel_values), base)  # B = 0
        _randomize_B(model)
        adapted = model(input_ids, pixel_values=pixel_values)
        assert (adapted - base).abs().max() > 1e-3
        with lora_disabled(model):
            assert torch.equal(model(input_ids, pixel_values=pixel_values), base)
    save_adapter(model, tmp_path, base_model_path=str(path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == (
        r".*language_model.*\.(down_proj|gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)"
    )
    reloaded = _sena_llava(path)
    load_adapter(reloaded, tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids, pixel_values=pixel_values), adapted)
        merge_lora(model)
        torch.testing.assert_close(model(input_ids, pixel_values=pixel_values), adapted, rtol=0, atol=1e-5)


def test_our_adapter_loads_in_peft_with_equal_logits(tiny_hf_llava, tmp_path):
    peft = pytest.importorskip("peft")
    hf, path = tiny_hf_llava
    model = _sena_llava(path)
    apply_lora(model, list(LLAMA_TARGETS), r=4, alpha=8)
    _randomize_B(model)
    save_adapter(model, tmp_path / "ours", base_model_path=str(path))
    input_ids, pixel_values = _llava_inputs()
    with torch.no_grad():
        ours = model(input_ids, pixel_values=pixel_values)
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
        # PEFT wrapped exactly our layers: the regex kept the CLIP tower's q_proj / v_proj out.
        peft_wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
        assert len(peft_wrapped) == 14 and all(".language_model." in n for n in peft_wrapped)
        theirs = peft_model(input_ids=input_ids, pixel_values=pixel_values).logits
        plain = hf(input_ids=input_ids, pixel_values=pixel_values).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter matters, so equality below means something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_peft_adapter_loads_in_ours_with_equal_logits(tiny_hf_llava, tmp_path):
    peft = pytest.importorskip("peft")
    hf, path = tiny_hf_llava
    torch.manual_seed(5)
    # init_lora_weights=False: PEFT draws B at random too, so the adapter is not the identity.
    lc = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(hf), lc).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    model = _sena_llava(path)
    loaded = load_adapter(model, tmp_path / "theirs")
    assert len(loaded) == 8  # this adapter also targets the CLIP tower's q_proj / v_proj (2 + 2 layers × 2)
    input_ids, pixel_values = _llava_inputs()
    with torch.no_grad():
        theirs = peft_model(input_ids=input_ids, pixel_values=pixel_values).logits
        ours = model(input_ids, pixel_values=pixel_values)
        plain = hf(input_ids=input_ids, pixel_values=pixel_values).logits
    assert (theirs - plain).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_dropout_acts_in_training_only():
    """y = W₀x + (α/r)·B·A·dropout(x), by hand in float64: W₀ = I, A = [1 1], B = [1 2]ᵀ, α/r = 2/1, x = (1, 3):
    A x = 4, so y = (1, 3) + 2·4·(1, 2) = (9, 19) in eval mode, whatever the dropout. In training, dropout 0.5 zeroes
    or doubles each input: A·dropout(x) is one of 0, 2, 6, 8, never 4, so y always differs."""
    base = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        base.weight.copy_(torch.eye(2, dtype=torch.float64))
    layer = LoRALinear(base, r=1, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 1.0]], dtype=torch.float64))
        layer.lora_B.weight.copy_(torch.tensor([[1.0], [2.0]], dtype=torch.float64))
    x = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    layer.eval()
    for _ in range(3):
        assert layer(x).tolist() == [[9.0, 19.0]]
    layer.train()
    torch.manual_seed(0)
    assert all(layer(x).tolist() != [[9.0, 19.0]] for _ in range(8))


def test_lora_targets_flag_names_the_language_models_linears(tmp_path):
    """--lora-targets is checked at parse time against flags.LORA_TARGETS: they must be the Linear layers of the
    language model (and the Llama names LoRA is applied to by default)."""
    from sena import flags, tiny
    from sena.checkpoint import load_pretrained

    model, _, _ = load_pretrained(tiny.model_dir(tmp_path / "m"))
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear and "language_model" in n}
    assert set(flags.LORA_TARGETS) == names and flags.LORA_TARGETS == LLAMA_TARGETS
