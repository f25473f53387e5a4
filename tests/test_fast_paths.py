"""Every speedup equals the plain path it replaces, in fp32 on tiny random models.

shared-prefix pair forward = duplicated forward (values and LoRA gradients); chunked answer-only LM head = full
logits; per-image features = per-pair features; shared-prefix + compacting generation = plain batched generation
= uncached per-sample greedy; activation checkpointing = plain backward.
"""

import os

import pytest
import torch

from sena import tiny
from sena.batch import (
    answer_logps,
    block_mask,
    pair_batch,
    pair_features,
    pair_logps,
    plain_pair_batch,
    plain_pair_logps,
    tokenize_pair,
)
from sena.checkpoint import load_pretrained
from sena.generation import generate
from sena.lora import apply_lora, lora_parameters
from sena.model import KVCache
from tests.test_generation import IMG, N_IMG, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    base = tiny.model_dir(root / "base")
    imgs = tiny.images(root / "images", 3)
    rows = tiny.pairs(root / "r", imgs, 3)
    rows[1]["chosen"] = ""  # a one-token answer (just EOS): the first answer token is the only one
    rows[4]["rejected"] = "a small red star at the top left . a large blue circle ."  # rejected longer than chosen
    return base, imgs, rows


def lora_model(base, seed=0):
    model, tok, image_cfg = load_pretrained(base)
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 would give A no gradient; random B makes both factors' gradients testable
        for p in lora_parameters(model):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model, tok, image_cfg


def test_shared_prefix_pair_logps_equal_duplicated_forward_values_and_grads(setup):
    base, imgs, rows = setup
    model, tok, image_cfg = lora_model(base)
    tk = [tokenize_pair(tok, model.config, p) for p in rows]
    feats = pair_features(model, rows, imgs, image_cfg).detach()
    weights = torch.linspace(-1, 1, 4 * len(rows)).view(4, -1)  # a loss touching all four outputs
    results = []
    for fn, batch in ((pair_logps, pair_batch(tk, tok.pad_token_id)), (plain_pair_logps,
                                                                       plain_pair_batch(tk, tok.pad_token_id))):
        model.zero_grad()
        out = fn(model, batch, feats)
        sum((w * o).sum() for w, o in zip(weights, out)).backward()
        results.append(([o.detach() for o in out], [p.grad.clone() for p in lora_parameters(model)]))
    (packed, g_packed), (plain, g_plain) = results
    assert plain[0].abs().min() > 5 and plain[0].shape == (len(rows),)  # summed log-probs of O(10): meaningful
    for a, b in zip(packed, plain):
        assert (a - b).abs().max() <= 2e-5 * b.abs().max(), (a, b)
    for a, b in zip(g_packed, g_plain):
        assert b.abs().max() > 1e-3 and (a - b).abs().max() <= 1e-4 * b.abs().max()
    # The packed row holds 1 prompt where the plain batch holds 2: ~half the tokens.
    assert pair_batch(tk, 0)["attention_mask"].sum() < 0.6 * plain_pair_batch(tk, 0)["attention_mask"].sum()


def test_block_mask_matters(setup):
    """The test above can fail: letting rejected tokens see the chosen ones changes their log-probs."""
    base, imgs, rows = setup
    model, tok, image_cfg = lora_model(base)
    batch = pair_batch([tokenize_pair(tok, model.config, p) for p in rows[:2]], tok.pad_token_id)
    feats = pair_features(model, rows[:2], imgs, image_cfg)
    m = block_mask(batch["segment"])
    assert not m[0, batch["segment"][0] == 2][:, batch["segment"][0] == 1].any()  # rejected never sees chosen
    leaky = dict(batch, segment=batch["segment"].clamp(max=1))  # rejected marked as chosen: the cross block opens
    with torch.no_grad():
        assert (pair_logps(model, leaky, feats)[1] - pair_logps(model, batch, feats)[1]).abs().max() > 1e-3


def test_chunked_answer_logps_equal_one_chunk_values_and_grads(setup):
    base, _, _ = setup
    model, _, _ = load_pretrained(base)
    V = model.lm_head.weight.shape[0]
    h = torch.randn(37, model.config.text.hidden_size, requires_grad=True)
    tgt = torch.randint(0, V, (37,))
    ref = torch.log_softmax(model.lm_head(h).double(), -1).gather(-1, tgt[:, None])[:, 0]  # fp64 full logits
    (g_ref,) = torch.autograd.grad(ref.sum(), h)
    for per_chunk in (10**9, 5 * V):  # one chunk; 8 chunks of 5 rows, checkpointed
        out = answer_logps(model.lm_head, h, tgt, logits_per_chunk=per_chunk)
        (g,) = torch.autograd.grad(out.sum(), h)
        assert out.dtype == torch.float32 and (out.double() - ref).abs().max() < 1e-5
        assert (g.double() - g_ref).abs().max() < 1e-5


def test_pair_features_encode_each_image_once_and_cache(setup):
    base, imgs, rows = setup
    model, _, image_cfg = load_pretrained(base)
    calls = []
    encode = model.encode_images
    model.encode_images = lambda px: calls.append(px.shape[0]) or encode(px)
    cache = {}
    with torch.no_grad():
        feats = pair_features(model, rows, imgs, image_cfg, cache)  # 6 pairs of 3 images
        assert calls == [3] and sorted(cache) == ["img_0.png", "img_1.png", "img_2.png"]
        assert torch.equal(pair_features(model, rows[::-1], imgs, image_cfg, cache), feats.flip(0))
        assert calls == [3]  # all from the cache
        from sena.batch import load_pixels

        one = encode(load_pixels(rows[3:4], imgs, image_cfg))
    assert torch.allclose(feats[3:4], one, atol=1e-6, rtol=0)


def uncached_greedy(model, prompt, feats, n, eos):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            tok = int(model(torch.tensor([ids]), image_features=feats)[0, -1].argmax())
        if tok == eos:
            break
        ids.append(tok)
    return ids[len(prompt):]


def test_generation_shared_prefix_and_compaction_equal_plain():
    model = tiny_model(seed=4)  # tests/test_generation.py's: unit-gain weights, 16 image tokens
    g = torch.Generator().manual_seed(4)

    def words(n):
        return torch.randint(3, IMG, (n,), generator=g).tolist()

    system = [1] + words(6)  # the text every prompt starts with
    ids = [system + [IMG] * N_IMG + words(n) for n in (3, 7, 1, 4, 4, 9)]
    feats = model.encode_images(torch.randn(3, 3, 32, 32, generator=g)).detach()[[0, 0, 1, 2, 2, 2]]
    plain = generate(model, ids, image_features=feats, max_new_tokens=12, eos_token_id=-1, share_prefix=False,
                     compact=False)
    assert len({tuple(p) for p in plain}) == 6  # rows that share an image still answer differently
    eos = plain[2][1]  # an EOS that stops some rows early, so compaction runs
    ref = [uncached_greedy(model, p, f[None], 12, eos) for p, f in zip(ids, feats)]
    assert min(map(len, ref)) < 4 and max(map(len, ref)) == 12
    for kw in (dict(), dict(compact=False), dict(share_prefix=False, compact=False)):
        assert generate(model, ids, image_features=feats, max_new_tokens=12, eos_token_id=eos, **kw) == ref
    # A prefix cache kept across calls (a round's stages): a second stage of other prompts on the same images reuses
    # the system text and every image's keys and values, and still answers as the plain path does.
    cache = {}
    stage2 = [system + [IMG] * N_IMG + words(n) for n in (5, 2, 6, 3, 8, 1)]
    for prompts_ in (ids, stage2):
        plain_ = generate(model, prompts_, image_features=feats, max_new_tokens=8, eos_token_id=-1, share_prefix=False)
        assert generate(model, prompts_, image_features=feats, max_new_tokens=8, eos_token_id=-1,
                        prefix_cache=cache) == plain_
    assert len(cache) == 1 + 3  # the system text + 3 distinct images, computed once for both stages
    # Text-only prompts (self-check without the image) share the system text only.
    text = [system + words(n) for n in (2, 5)]
    assert generate(model, text, max_new_tokens=6, eos_token_id=-1) == [uncached_greedy(model, p, None, 6, -1)
                                                                          for p in text]


def test_activation_checkpointing_equal_plain_backward(setup):
    base, imgs, rows = setup
    model, tok, image_cfg = lora_model(base, seed=1)
    batch = pair_batch([tokenize_pair(tok, model.config, p) for p in rows], tok.pad_token_id)
    feats = pair_features(model, rows, imgs, image_cfg).detach()
    grads = []
    for flag in (False, True):
        model.model.language_model.gradient_checkpointing = flag
        model.zero_grad()
        out = pair_logps(model, batch, feats)
        (out[0] - out[1]).sum().backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
    for a, b in zip(*grads):
        assert b.abs().max() > 0 and torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_gpu_readiness_tiny_runs(capsys):
    from benchmarks import gpu_readiness

    res = gpu_readiness.main(["--tiny", "--steps", "1", "--no-json", "--peak-tflops", "1"])
    for key in ("train_pairs_per_s", "train_tokens_per_s", "ref_pairs_per_s", "train_mfu", "peak_memory_mb"):
        assert res[key] is not None and res[key] > 0, key
    assert "pairs/s" in capsys.readouterr().out


def test_keep_from_equals_the_tail_of_the_full_pass():
    model = tiny_model(seed=5)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, IMG, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    for m in (None, mask):
        full = model.hidden_states(ids, m)
        for c in (1, 7, 11):
            assert torch.allclose(model.hidden_states(ids, m, keep_from=c), full[:, c:], atol=1e-5, rtol=0)
    # Through a cache: the kept tail is the same and the cache holds every position's keys (next step agrees).
    cache_a, cache_b = KVCache.new(model, 2, 13), KVCache.new(model, 2, 13)
    last = model.hidden_states(ids, mask, cache=cache_a, keep_from=11)
    assert torch.allclose(last, model.hidden_states(ids, mask, cache=cache_b)[:, 11:], atol=1e-5, rtol=0)
    nxt, m13 = ids[:, :1], torch.cat([mask, mask[:, :1]], 1)
    assert torch.allclose(model.hidden_states(nxt, m13, cache=cache_a), model.hidden_states(nxt, m13, cache=cache_b),
                          atol=1e-5, rtol=0)
