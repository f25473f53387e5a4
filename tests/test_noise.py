"""sena/noise.py: the sigmoid schedule by hand, the forward-diffusion formula, seeding."""

import os
import subprocess
import sys

import torch

from sena.noise import add_diffusion_noise, noise_generator, noise_seed, sigmoid_schedule

f64 = torch.float64


def _hand_alphas_cumprod():
    # β_i = sigmoid(linspace(-6, 6, 1000))_i·(5e-3 − 1e-5) + 1e-5, ᾱ_t = Π_{i≤t}(1 − β_i), in float64.
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=f64)) * (5e-3 - 1e-5) + 1e-5
    return torch.cumprod(1 - betas, 0)


def test_schedule_equals_hand_formula():
    ac = sigmoid_schedule()
    assert ac.shape == (1000,)
    hand = _hand_alphas_cumprod()
    # diffusers builds the schedule in fp32; the cumulative product drifts ~3e-7 from float64 over 1000 steps.
    torch.testing.assert_close(ac.double(), hand, rtol=0, atol=1e-6)
    assert round(ac[600].item(), 6) == 0.539118  # ᾱ_600 of the released code's sigmoid β schedule (1e-5 .. 5e-3)
    assert round(ac[500].item(), 6) == 0.744799  # ᾱ_500, computed independently from the same schedule
    # The schedule is not linear: a linear β from 1e-5 to 5e-3 gives a different ᾱ_600.
    linear = torch.cumprod(1 - torch.linspace(1e-5, 5e-3, 1000, dtype=f64), 0)
    assert abs(linear[600].item() - 0.539118) > 0.01


def test_schedule_cache_is_not_mutated_by_callers():
    ac = sigmoid_schedule()
    ac.zero_()
    assert sigmoid_schedule()[600].item() > 0.5


def test_formula_with_given_noise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8, generator=g)
    eps = torch.randn(2, 3, 8, 8, generator=g)
    a = sigmoid_schedule().double()  # checked against the hand formula above
    for t in (0, 600, 999):
        expected = a[t].sqrt() * x0.double() + (1 - a[t]).sqrt() * eps.double()
        out = add_diffusion_noise(x0, t=t, noise=eps)
        assert out.shape == x0.shape and out.dtype == x0.dtype
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


def test_t600_coefficients():
    ones, zeros = torch.ones(3, 4, 4), torch.zeros(3, 4, 4)
    signal = add_diffusion_noise(ones, t=600, noise=zeros)  # = sqrt(ᾱ_600)
    noise_part = add_diffusion_noise(zeros, t=600, noise=ones)  # = sqrt(1 − ᾱ_600)
    assert torch.all(signal == signal.flatten()[0]) and torch.all(noise_part == noise_part.flatten()[0])
    assert round(signal.flatten()[0].item(), 3) == 0.734
    assert round(noise_part.flatten()[0].item(), 3) == 0.679


def test_per_sample_timesteps():
    x0 = torch.ones(2, 3, 4, 4)
    out = add_diffusion_noise(x0, t=torch.tensor([0, 600]), noise=torch.zeros_like(x0))
    a = _hand_alphas_cumprod()
    torch.testing.assert_close(out[0, 0, 0, 0].double(), a[0].sqrt(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1, 0, 0, 0].double(), a[600].sqrt(), rtol=0, atol=1e-6)


def test_generator_determinism():
    x0 = torch.randn(3, 16, 16)
    a = add_diffusion_noise(x0, generator=noise_generator(0, "pool/img_001.png", 1))
    b = add_diffusion_noise(x0, generator=noise_generator(0, "pool/img_001.png", 1))
    assert torch.equal(a, b)
    # ε is exactly randn from a generator seeded with noise_seed
    eps = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(noise_seed(0, "pool/img_001.png", 1)))
    assert torch.equal(a, add_diffusion_noise(x0, noise=eps))
    # another round, image or run seed gives another ε
    for other in ((0, "pool/img_001.png", 2), (0, "pool/img_002.png", 1), (1, "pool/img_001.png", 1)):
        assert not torch.allclose(a, add_diffusion_noise(x0, generator=noise_generator(*other)), atol=0.1)


def test_noise_seed_stable_across_processes():
    # sena.seeds.derive(0, "noise", 1, key): sha256 of "0/noise/1/pool/img_001.png", first 8 bytes big-endian, >> 1
    # (worked out with hashlib); the same in a fresh interpreter (python's hash() would differ).
    assert noise_seed(0, "pool/img_001.png", 1) == 4706921078991830181
    code = "from sena.noise import noise_seed; print(noise_seed(0, 'pool/img_001.png', 1))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd="/")
    assert int(out.stdout.strip()) == 4706921078991830181


def test_bf16_input_keeps_dtype():
    x0 = torch.randn(3, 8, 8).bfloat16()
    eps = torch.randn(3, 8, 8)
    out = add_diffusion_noise(x0, noise=eps)
    assert out.dtype == torch.bfloat16
    expected = (0.5391181111335754**0.5) * x0.float() + ((1 - 0.5391181111335754) ** 0.5) * eps
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=0, atol=0)
