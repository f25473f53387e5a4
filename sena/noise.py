"""Forward-diffusion noise for SENA's rejected answers (the paper's rejected-image step; docs/method.md).

The rejected answer of a pair is the model's answer on a noised copy of the image:

    x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε,    ε ~ N(0, I),    ᾱ_t = Π_{i≤t} (1 − β_i)
    β_i = sigmoid(linspace(−6, 6, 1000))_i · (5e-3 − 1e-5) + 1e-5        (1000-step "sigmoid" schedule)

At t = 600, ᾱ_600 = 0.539118, so x_t = 0.734·x_0 + 0.679·ε. x_0 is the already-normalized image tensor (after
CLIP preprocessing and padding to square), as in the official code. The official code does not seed ε; we derive
one seed per (run seed, image, round) with `noise_generator` so every run is reproducible.
"""

import functools

from sena.seeds import derive

# The forward process, written once: a STEPS-step sigmoid β schedule between BETA_START and BETA_END, and the step
# of SENA's rejected image (the paper's t, --noise-step's default). torch is imported where it is used, so that
# sena.flags can read these without it (evaluate.py's file scorers never load torch).
STEPS = 1000
BETA_START, BETA_END = 1e-5, 5e-3
REJECTED_STEP = 600


@functools.lru_cache(maxsize=4)
def _ddpm_scheduler(num_steps, beta_start, beta_end):
    # Imported here: diffusers costs ~1.2 s at import and only the generation stage needs it.
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_steps, beta_start=beta_start, beta_end=beta_end, beta_schedule="sigmoid"
    )


def sigmoid_schedule(num_steps=STEPS, beta_start=BETA_START, beta_end=BETA_END):
    """ᾱ_t for t = 0..num_steps−1 of the sigmoid β schedule, from diffusers' DDPMScheduler. Returns (num_steps,) fp32.

    β_i = sigmoid(linspace(−6, 6, num_steps))_i · (beta_end − beta_start) + beta_start,   ᾱ_t = Π_{i≤t} (1 − β_i).
    The scheduler is built once per setting and cached; a copy is returned so callers cannot alter the cache.
    Library API, for plots and checks: add_diffusion_noise reads the same ᾱ_t through the scheduler itself.
    """
    return _ddpm_scheduler(num_steps, beta_start, beta_end).alphas_cumprod.detach().cpu().clone()


def add_diffusion_noise(x0, t=REJECTED_STEP, noise=None, generator=None):
    """Noise x0 to diffusion step t:  x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε   (default schedule, see module docstring).

    x0: (..., C, H, W) or any shape, any float dtype and device (normalized pixel values).
    t: int step in [0, STEPS), or an int tensor (B,) with one step per leading-dim sample.
    noise: ε with x0's shape; if None, ε = randn(x0.shape, generator=generator) drawn in fp32 on the generator's
           device (CPU by default) and moved to x0's device, so the same generator gives the same ε on any device.
    returns: x_t with x0's shape, dtype and device (computed in fp32).
    """
    import torch

    if noise is None:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32, device=gen_device)
    scheduler = _ddpm_scheduler(STEPS, BETA_START, BETA_END)
    # diffusers' add_noise indexes ᾱ with the timestep, so it must be a tensor (a python int raises).
    timesteps = torch.as_tensor(t, dtype=torch.long)
    x_t = scheduler.add_noise(x0.float(), noise.to(device=x0.device, dtype=torch.float32), timesteps)
    return x_t.to(x0.dtype)


def noise_seed(seed, image_key, round):
    """The seed of one (run seed, image, round)'s noise: sena.seeds.derive(seed, "noise", round, image_key).
    image_key: any string naming the image, e.g. its path relative to the pool folder."""
    return derive(seed, "noise", round, image_key)


def noise_generator(seed, image_key, round, device="cpu"):
    """A torch.Generator seeded with noise_seed(seed, image_key, round): pass it to add_diffusion_noise."""
    import torch

    return torch.Generator(device=device).manual_seed(noise_seed(seed, image_key, round))


def noised_image(x0, t, seed, image_key, round):
    """The rejected answer's image: x0 noised to step t with the (seed, image, round) generator. generate.py makes
    the pairs with it and the image-reliance telemetry re-makes the same image with it."""
    return add_diffusion_noise(x0, t, generator=noise_generator(seed, image_key, round))
