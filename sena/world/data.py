"""θ0's stage-2 data: fresh instruction-mix draws over pre-rendered scenes, packed per image behind one prefix.

Every batch is a pure function of (seed, step): the window of steps it belongs to has its own stream, which
draws the images, their examples (sena.world.tasks.sample_examples) and which images are seen noised. So the
batches, and the θ0 they train, do not depend on how many DataLoader workers made them.
"""

import math
import multiprocessing
import types

import numpy as np
import torch

from sena import seeds
from sena.batch import block_mask, pack
from sena.chat import build_example
from sena.world.render import render
from sena.world.tasks import sample_examples

def phases(tr) -> list[tuple[str, int]]:
    """Stage 2's phases in order, (name, steps): "mix", the instruction mix under warmup and cosine decay;
    "exist", existence questions only, at the constant tr["exist_lr"]; "settle", the mix again at the constant
    tr["settle_lr"] (sena/world/stage2.py, stage2_lr). Why the existence phase: docs/world.md."""
    return [(name, n) for name, n in (("mix", tr["steps"]), ("exist", tr["exist_steps"]),
                                      ("settle", tr["settle_steps"])) if n > 0]


def total_steps(tr) -> int:
    return sum(n for _, n in phases(tr))


def windows(tr) -> list[tuple[str, int]]:
    """(phase, steps) of each window of at most WINDOW steps; a window never spans two phases."""
    return [(name, min(WINDOW, n - i)) for name, n in phases(tr) for i in range(0, n, WINDOW)]


WINDOW = 16  # steps whose rows are drawn together and sorted by length, so a batch holds rows of similar length


def render_all(scenes, workers=0) -> torch.Tensor:
    """(N, 3, S, S) uint8: every scene rendered (render is deterministic, so any worker count gives equal bytes)."""
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            arrays = pool.map(_render_array, scenes, chunksize=256)
    else:
        arrays = [_render_array(sc) for sc in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _render_array(scene):
    return np.asarray(render(scene))


class MemoTokenizer:
    """tok's encoding with a cache, for build_example: the mix tokenizes a few thousand distinct strings (the system
    line, templated prompts, short answers) hundreds of thousands of times; the ids are the tokenizer's own."""

    def __init__(self, tok):
        self.tok, self.cache = tok, {}
        self.bos_token_id, self.eos_token_id = tok.bos_token_id, tok.eos_token_id

    def __call__(self, text, add_special_tokens=False):
        key = (text, add_special_tokens)
        if key not in self.cache:
            self.cache[key] = tuple(self.tok(text, add_special_tokens=add_special_tokens).input_ids)
        return types.SimpleNamespace(input_ids=list(self.cache[key]))  # a fresh list: callers may extend it


def pack_rows(examples, prefix_len, pad_token_id):
    """Several examples of one image in one row, the prefix (BOS, system line, image) once (sena.batch.pack).

    examples: list of rows, each a list of (input_ids, labels) that share their first prefix_len tokens. Every
    example token has exactly the keys and positions of its own unpacked sequence, so the loss equals that of the
    unpacked batch (up to float summation order) at a fraction of the compute. The first token of each suffix is a
    prompt token (label IGNORE_INDEX), so no example is ever asked to predict the next example.
    Returns input_ids, labels, position_ids, example (B, T; 0 = prefix or padding, j = the row's j-th example) and
    attention_mask, a (B, T, T) bool block mask.
    """
    rows = []
    for exs in examples:
        prefix = exs[0][0][:prefix_len]
        assert all(ids[:prefix_len] == prefix for ids, _ in exs), "examples of one row must share the prefix"
        rows.append((prefix, [(ids[prefix_len:], labels[prefix_len:]) for ids, labels in exs]))
    packed = pack(rows, pad_token_id)
    segment = packed.pop("segment")
    return packed | {"attention_mask": block_mask(segment), "example": segment.clamp(min=0)}


class MixWindows(torch.utils.data.Dataset):
    """Item w: the packed batches of steps w·WINDOW .. (w+1)·WINDOW − 1, a list of dicts (pack_rows' keys plus
    "image" (B,) scene indices and "t" (B,) diffusion steps, 0 for a clean image).

    A row is one image with tr["per_image"] examples drawn fresh each time; tr["stage2_noise"] = (share, t_min,
    t_max) marks that share of the rows to be seen diffusion-noised at t ~ U[t_min, t_max), their answers the true
    ones (so where the noise hides an object, the model learns to answer from the prior over scenes, as LLaVA
    does on a poor image). The window's rows are sorted by length before they are cut into batches, so a batch pads
    little; the batches' order is then shuffled.
    """

    def __init__(self, scenes, tok, tr, mix, n_image_tokens, image_token_id, seed):
        self.scenes, self.tok, self.tr, self.mix, self.seed = scenes, MemoTokenizer(tok), tr, mix, seed
        self.n_tok, self.img_id, self.pad = n_image_tokens, image_token_id, tok.pad_token_id
        self.prefix_len = None

    def __len__(self):
        return len(windows(self.tr))

    def __getitem__(self, w):
        tr = self.tr
        rng = seeds.rng(self.seed, "stage2", w)
        share, t_min, t_max = tr["stage2_noise"]
        phase, n_steps = windows(tr)[w]
        focus = 1.0 if phase == "exist" else 0.0
        rows = []
        for _ in range(n_steps * tr["batch_size"]):
            i = rng.randrange(len(self.scenes))
            exs = sample_examples(rng, self.scenes[i], tr["per_image"], self.mix, focus)
            ids = [build_example(self.tok, user, answer, self.n_tok, self.img_id) for _, user, answer in exs]
            t = rng.randrange(t_min, t_max) if rng.random() < share else 0
            rows.append((sum(len(e[0]) for e in ids), i, t, ids))
        rows.sort(key=lambda r: r[0])  # stable: equal lengths keep their draw order
        bs = tr["batch_size"]
        batches = [rows[j * bs: (j + 1) * bs] for j in range(n_steps)]
        rng.shuffle(batches)
        prefix_len = rows[0][3][0][0].index(self.img_id) + self.n_tok  # BOS + system line + "USER:" + image
        return [pack_rows([r[3] for r in b], prefix_len, self.pad)
                | {"image": torch.tensor([r[1] for r in b]), "t": torch.tensor([r[2] for r in b])} for b in batches]
