"""Parity of sena.model.Llava with transformers' LlavaForConditionalGeneration on tiny random models (fp32).

Weights are redrawn at a larger scale than HF's init (std 0.02 would make every logit ~0 and hide bugs), and each
test checks that the logits are O(1) before comparing them at 1e-4.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from sena.checkpoint import load_pretrained, save_pretrained
from sena.model import KVCache, Llava, ModelConfig

IMG = 99  # image token id; n_image_tokens = (32 / 8)^2 = 16
TOL = 1e-4


def hf_config(n_kv=2, tie=False, layers=2, feature_layer=-2):
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=32, patch_size=8)
    text = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=n_kv, rope_theta=500.0, rms_norm_eps=1e-5,
                tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMG, tie_word_embeddings=tie,
                       vision_feature_layer=feature_layer)


def randomize(model, seed=0):
    """Redraw every parameter: weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * z)
            elif p.dim() == 1:
                p.copy_(0.1 * z if "class_embedding" not in name else z)
            else:
                p.copy_(z / p[0].numel() ** 0.5)
    return model


def hf_model(tmp_path=None, seed=0, **kw):
    torch.manual_seed(seed)
    hf = randomize(LlavaForConditionalGeneration(hf_config(**kw)).eval(), seed)
    if tmp_path is not None:
        hf.save_pretrained(tmp_path)
    return hf


def batch(seed=0):
    """Two image prompts, the second left-padded by 3: [pad*, bos, 16 image tokens, text]."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMG, (2, 9), generator=g)
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, 16), IMG), text], dim=1)  # (2, 26)
    ids[1, :3] = 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, 3] = 1
    ids[1, 4:20] = IMG  # row 1: pad pad pad bos img*16 text*6
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    return ids, mask, pixels


def assert_logits_match(hf, ours):
    ids, mask, pixels = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(ids, attention_mask=mask, pixel_values=pixels)
    assert ref.abs().max() > 1.0  # the comparison means something
    keep = mask.bool()  # padded positions are undefined in both models
    diff = (ref[keep] - got[keep]).abs().max().item()
    assert diff <= TOL, diff
    return diff


def test_their_save_our_load_gqa(tmp_path):
    hf = hf_model(tmp_path, n_kv=2)
    ours, tok, image_cfg = load_pretrained(tmp_path)
    assert tok is None and image_cfg["crop_size"]["height"] == 32 and ours.config.text.num_key_value_heads == 2
    assert set(ours.state_dict()) == set(hf.state_dict())  # in-memory names match 1:1 (PEFT keys)
    assert_logits_match(hf, ours)


def test_our_save_their_load_tied(tmp_path):
    ref = hf_model(tmp_path / "ref", n_kv=4, tie=True)
    ours, _, _ = load_pretrained(tmp_path / "ref")
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight
    save_pretrained(ours, tmp_path / "ours")
    # We write exactly the key layout transformers 5.x writes.
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(load_file(tmp_path / "ref" /
                                                                                     "model.safetensors"))
    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.tie_word_embeddings and hf.config.text_config.rope_parameters["rope_theta"] == 500.0
    assert_logits_match(hf.eval(), ours)
    assert_logits_match(ref, ours)


def test_our_save_their_load_untied_from_scratch(tmp_path):
    """A model built by us (not converted from HF) round-trips through transformers; vision_feature_layer=-1."""
    config = ModelConfig.from_hf_dict(hf_config(n_kv=1, feature_layer=-1).to_dict())
    ours = randomize(Llava(config), seed=3)
    save_pretrained(ours, tmp_path)
    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert_logits_match(hf.eval(), ours)
    back, _, _ = load_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))
    assert ModelConfig.from_hf_dict(json.loads((tmp_path / "config.json").read_text())) == config


def test_full_feature_strategy_keeps_cls_like_transformers(tmp_path):
    """vision_feature_select_strategy="full": CLS is an image token too (17 per image here), in both models."""
    cfg = hf_config()
    cfg.vision_feature_select_strategy = "full"
    torch.manual_seed(0)
    hf = randomize(LlavaForConditionalGeneration(cfg).eval(), seed=4)
    hf.save_pretrained(tmp_path)
    ours, _, _ = load_pretrained(tmp_path)
    assert ours.config.n_image_tokens == 17 and ours.config.to_hf_dict()["image_seq_length"] == 17
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, 17), IMG),
                     torch.randint(3, IMG, (2, 6), generator=g)], dim=1)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels)
        default = ours.encode_images(pixels)  # the CLS row is the first one
        ours.config.vision_feature_select_strategy = "default"
        assert torch.equal(ours.encode_images(pixels), default[:, 1:])
    assert ref.abs().max() > 1.0 and (ref - got).abs().max().item() <= TOL
    save_pretrained(ours, tmp_path / "ours")  # (the config now says "default": written as such)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vision_feature_select_strategy"] == "default"


def test_sharded_both_directions(tmp_path):
    hf = hf_model(seed=1)
    hf.save_pretrained(tmp_path / "ref", max_shard_size="100KB")
    assert (tmp_path / "ref" / "model.safetensors.index.json").exists()
    ours, _, _ = load_pretrained(tmp_path / "ref")
    assert_logits_match(hf, ours)
    save_pretrained(ours, tmp_path / "ours", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "ours" / "model.safetensors").exists()
    back, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()), info
    assert_logits_match(back.eval(), ours)


def test_legacy_and_in_memory_key_layouts(tmp_path):
    hf = hf_model(tmp_path, seed=2)
    state = load_file(tmp_path / "model.safetensors")
    assert "language_model.lm_head.weight" in state and "vision_tower.embeddings.class_embedding" in state
    # llava-hf's original layout: the CLIP tower still nested under vision_model.
    legacy = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in state.items()}
    legacy["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # old buffer, ignored
    save_file(legacy, tmp_path / "model.safetensors")
    assert_logits_match(hf, load_pretrained(tmp_path)[0])
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    assert_logits_match(hf, load_pretrained(tmp_path)[0])


def test_greedy_equals_transformers_generate(tmp_path):
    from sena.generation import generate

    hf = hf_model(tmp_path, seed=4)
    ours, _, _ = load_pretrained(tmp_path)
    ids, mask, pixels = batch(seed=4)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    def theirs(eos):
        hf.generation_config.update(do_sample=False, eos_token_id=eos, pad_token_id=0, max_new_tokens=8,
                                    min_new_tokens=0)
        out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels)[:, ids.shape[1]:].tolist()
        return [row[:row.index(eos)] if eos in row else row for row in out]

    free = theirs(eos=IMG + 1000)  # an id that never occurs: 8 tokens per row
    assert len(set(free[0])) > 2  # not a degenerate repeat
    eos = free[0][3]  # make row 0 stop early, at step 3 (or earlier if that token came before)
    ref = theirs(eos)
    assert len(ref[0]) < 8
    assert generate(ours, prompts, pixel_values=pixels, max_new_tokens=8, eos_token_id=eos, pad_token_id=0) == ref
    assert generate(ours, prompts, pixel_values=pixels, max_new_tokens=8, eos_token_id=IMG + 1000) == free


def test_hidden_states_logits_slice_and_cache():
    ours = randomize(Llava(ModelConfig.from_hf_dict(hf_config().to_dict())), seed=5)
    ids, mask, pixels = batch(seed=5)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask, pixel_values=pixels)
        feats = ours.encode_images(pixels)
        assert feats.shape == (2, 16, 64)
        h = ours.hidden_states(ids, attention_mask=mask, image_features=feats)
        assert torch.allclose(ours.lm_head(h), full, atol=1e-6, rtol=0)
        assert torch.equal(ours(ids, mask, image_features=feats, logits_slice=-1), ours.lm_head(h[:, -1:]))
        sel = mask.bool()
        assert torch.equal(ours(ids, mask, image_features=feats, logits_slice=sel), ours.lm_head(h[sel]))
        # Prefill 20 tokens into a cache, then 6 single-token steps: same logits as one full pass.
        cache = KVCache.new(ours, 2, 30)
        parts = [ours(ids[:, :20], mask[:, :20], image_features=feats, cache=cache)]
        for t in range(20, 26):
            parts.append(ours(ids[:, t:t + 1], mask[:, :t + 1], cache=cache))
        assert cache.length == 26
    diff = (torch.cat(parts, 1) - full)[mask.bool()].abs().max().item()
    assert diff <= 1e-5, diff
    with pytest.raises(ValueError, match="image tokens"):
        ours(ids, mask, image_features=feats[:1])


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(tmp_path)
    hf_model(tmp_path, seed=6)
    state = load_file(tmp_path / "model.safetensors")
    os.rename(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_pretrained(tmp_path)
    bad = dict(state)
    del bad["language_model.model.norm.weight"]
    bad["language_model.model.extra.weight"] = torch.zeros(3)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing keys \['model\.language_model\.norm\.weight'\]"
                                         r".*unexpected keys \['model\.safetensors:language_model\.model\.extra"):
        load_pretrained(tmp_path)
    bad = dict(state)
    bad["multi_modal_projector.linear_1.bias"] = torch.zeros(7)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="linear_1.bias has shape"):
        load_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "patch_only"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        load_pretrained(tmp_path)


def test_config_reads_sparse_llava_hf_json():
    """llava-hf/llava-1.5-7b-hf's config.json omits defaults; they must come out as LLaVA-1.5-7B's sizes."""
    d = {"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
         "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
         "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                         "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                         "torch_dtype": "float16", "vocab_size": 32064},
         "tie_word_embeddings": False, "torch_dtype": "float16", "vision_config": {
             "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
             "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
             "vocab_size": 32000}, "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
    c = ModelConfig.from_hf_dict(d)
    assert (c.text.hidden_size, c.text.num_hidden_layers, c.text.num_key_value_heads, c.text.vocab_size) == (
        4096, 32, 32, 32064)
    assert (c.n_image_tokens, c.pad_token_id, c.eos_token_id, c.text.rope_theta) == (576, 32001, 2, 10000.0)
    hf = LlavaConfig(**c.to_hf_dict())  # and what we write is a valid LlavaConfig with the same numbers
    assert hf.text_config.intermediate_size == 11008 and hf.vision_config.patch_size == 14
