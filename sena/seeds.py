"""Every derived seed, from one function of its parts.

A run has one seed (--seed); a θ0 build has one (--seed of sena.world.build). Everything random below them (image
pools, diffusion noise, prompt draws, sampled questions, data order, LoRA init, the θ0 build's scenes and batches)
takes its own stream from `derive(seed, "what", ...)`, so two streams never share a seed, a stream does not depend on
how work is batched, sharded or resumed, and the same parts give the same numbers on every machine (Python's hash()
is salted per process, so it cannot be used).
"""

import hashlib
import random


def derive(*parts) -> int:
    """A 63-bit seed that is a function of `parts` only: the first 8 bytes of sha256("/".join(map(str, parts))),
    big-endian, shifted right by one bit (so torch, numpy and random all take it).

    derive(0, "noise", 1, "a.png") != derive(0, "noise", 2, "a.png") != derive(1, "noise", 1, "a.png").
    """
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def rng(*parts) -> random.Random:
    """random.Random(derive(*parts))."""
    return random.Random(derive(*parts))


def generator(*parts, device="cpu"):
    """torch.Generator(device).manual_seed(derive(*parts))."""
    import torch  # here: the world's scene sampler and the file readers use seeds without torch

    return torch.Generator(device=device).manual_seed(derive(*parts))
