"""sena.generation: batched = per-sample, cached = uncached, EOS / stop strings / sampling behave as documented.

(Equality with transformers' greedy generate is in test_model.py.)
"""

import torch

from sena.generation import generate, sample_next
from sena.model import Llava, ModelConfig, TextConfig, VisionConfig

IMG, N_IMG = 99, 16


def tiny_model(seed=0):
    config = ModelConfig(VisionConfig(32, 64, 2, 4, image_size=32, patch_size=8),
                         TextConfig(100, 64, 128, 2, 4, 2, rope_theta=500.0), image_token_index=IMG,
                         pad_token_id=0, eos_token_id=2)
    torch.manual_seed(seed)
    model = Llava(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so greedy paths are varied rather than constant
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
    return model


def prompts(seed=0):
    """Three prompts of lengths 22, 27 and 6; the first two have an image, the last is text-only."""
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return torch.randint(3, IMG, (n,), generator=g).tolist()

    return [[1] + [IMG] * N_IMG + words(5), [1] + words(3) + [IMG] * N_IMG + words(7), [1] + words(5)]


def uncached_greedy(model, prompt, feats, n, eos):
    """The reference: recompute the full forward over prompt + generated tokens at every step, no cache."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), image_features=feats)
        tok = int(logits[0, -1].argmax())
        if tok == eos:
            break
        ids.append(tok)
    return ids[len(prompt):]


def test_batched_equals_per_sample_equals_uncached():
    model = tiny_model()
    ps = prompts()
    feats = model.encode_images(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).detach()
    single = [generate(model, [p], image_features=f, max_new_tokens=10, eos_token_id=-1)[0]
              for p, f in zip(ps, [feats[:1], feats[1:], None])]
    assert all(len(s) == 10 for s in single) and len(set(single[0])) > 2
    assert generate(model, ps, image_features=feats, max_new_tokens=10, eos_token_id=-1) == single
    ref = [uncached_greedy(model, p, f, 10, -1) for p, f in zip(ps, [feats[:1], feats[1:], None])]
    assert ref == single
    # EOS per row: make row 0 stop at its 4th token; the other rows must be unaffected up to their own EOS.
    eos = single[0][3]
    cut = [s[:s.index(eos)] if eos in s else s for s in single]
    assert len(cut[0]) <= 3
    assert generate(model, ps, image_features=feats, max_new_tokens=10, eos_token_id=eos, pad_token_id=0) == cut
    assert generate(model, ps, image_features=feats, max_new_tokens=10, eos_token_id=[-1, eos]) == cut


def test_pixel_values_path_and_max_new_tokens():
    model = tiny_model(seed=1)
    ps = prompts(seed=1)[:2]
    pixels = torch.randn(2, 3, 32, 32)
    a = generate(model, ps, pixel_values=pixels, max_new_tokens=5, eos_token_id=-1)
    b = generate(model, ps, image_features=model.encode_images(pixels), max_new_tokens=5, eos_token_id=-1)
    assert a == b and [len(x) for x in a] == [5, 5]
    assert generate(model, ps, pixel_values=pixels, max_new_tokens=0) == [[], []]
    model.config.pad_token_id = None  # padding falls back to an embeddable id even when eos is a sentinel
    assert generate(model, ps, pixel_values=pixels, max_new_tokens=5, eos_token_id=-1) == a


class CharTokenizer:
    """decode(ids) = one letter per id; enough to test stop strings."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_keep_the_completing_tokens():
    model, tok = tiny_model(seed=2), CharTokenizer()
    ps = prompts(seed=2)[2:]
    free = generate(model, ps, max_new_tokens=10, eos_token_id=-1)[0]
    stop = tok.decode(free[3:5])  # two letters; the row must stop where they first appear
    first = next(n for n in range(1, 11) if stop in tok.decode(free[:n]))
    got = generate(model, ps, max_new_tokens=10, eos_token_id=-1, stop_strings=[stop], tokenizer=tok)[0]
    assert got == free[:first] and first <= 5


def test_sample_next_nucleus_and_temperature():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    # top_p 0.7: the nucleus is {0, 1} (0.5 < 0.7 <= 0.8); renormalized P(0) = 0.5 / 0.8 = 0.625.
    draws = sample_next(logits, do_sample=True, top_p=0.7, generator=g)
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.625) < 0.03  # 4000 draws: sd 0.0077
    # temperature 0.5 squares the odds: P ∝ p^2 -> P(0) = 0.25 / (0.25 + 0.09 + 0.0225 + 0.0025) = 0.6849
    draws = sample_next(logits, do_sample=True, temperature=0.5, generator=g)
    assert abs((draws == 0).float().mean().item() - 0.6849) < 0.03
    assert sample_next(logits[:1], do_sample=True, top_p=1e-6, generator=g).item() == 0  # tiny nucleus = greedy
    assert sample_next(logits[:2]).tolist() == [0, 0]


def test_sampled_generation_is_reproducible_and_varies():
    model = tiny_model(seed=3)
    ps = prompts(seed=3)[2:] * 4

    def run(seed):
        return generate(model, ps, max_new_tokens=6, eos_token_id=-1, do_sample=True, temperature=1.5,
                        generator=torch.Generator().manual_seed(seed))

    a = run(0)
    assert a == run(0) and len({tuple(x) for x in a}) > 1  # same seed same text; rows differ from each other
