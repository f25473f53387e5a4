"""sena.seeds: every derived seed is one function of its parts."""

import hashlib
import random

import torch

from sena import seeds


def test_derive_by_hand():
    # sha256("7/pool/2"), first 8 bytes big-endian, one bit shifted out: a 63-bit int.
    want = int.from_bytes(hashlib.sha256(b"7/pool/2").digest()[:8], "big") >> 1
    assert seeds.derive(7, "pool", 2) == want and 0 <= want < 2**63
    assert seeds.derive(7, "pool", 2) == seeds.derive("7", "pool", "2")  # parts count by their text


def test_streams_are_distinct_and_stable():
    parts = [(0, "noise", 1, "a.png"), (0, "noise", 2, "a.png"), (1, "noise", 1, "a.png"), (0, "order", 1),
             (0, "lora-init", 1), (0, "pool", 1)]
    values = [seeds.derive(*p) for p in parts]
    assert len(set(values)) == len(values)
    assert seeds.rng(3, "x").random() == random.Random(seeds.derive(3, "x")).random()
    a = torch.randn(4, generator=seeds.generator(3, "x"))
    assert torch.equal(a, torch.randn(4, generator=torch.Generator().manual_seed(seeds.derive(3, "x"))))
