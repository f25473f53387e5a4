"""θ0's vision tower, stage 1 of the build: a ViT pretrained on per-cell labels of clean and noised images, then frozen.

LLaVA starts from CLIP, which has seen every kind of poor image; that is why the evidence in its features fades,
rather than turns into other objects, when SENA noises an image. Our tower learns the same way: half of its
training images are diffusion-noised (SENA's forward process, t ~ U[1, 1000)) and keep their true labels, so
under noise it reports what it can still see and, beyond that, the prior over scenes, never the shapes the noise
happens to resemble. Labels are world labels, as everywhere in the θ0 build; SENA never runs this.
"""

import contextlib

import torch
import torch.nn.functional as F

from sena import seeds
from sena.noise import add_diffusion_noise
from sena.schedule import lr_at
from sena.world.scenes import COLORS, SHAPES, SIZES


def pixels(images_uint8: torch.Tensor, image_cfg: dict) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> normalized float32, the same arithmetic as sena.image.preprocess at native size."""
    x = (images_uint8.double() * image_cfg["rescale_factor"]).float()
    mean = torch.tensor(image_cfg["image_mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(image_cfg["image_std"], dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def cell_targets(scenes, grid: int) -> torch.Tensor:
    """(N, grid*grid, 3) per-patch labels: the (shape, colour, size) index of the object in the patch's 3x3 cell,
    len(SHAPES) / len(COLORS) / len(SIZES) for an empty cell."""
    out = torch.empty(len(scenes), grid * grid, 3, dtype=torch.long)
    for n, sc in enumerate(scenes):
        cells = {(o["row"], o["col"]): o for o in sc["objects"]}
        for p in range(grid * grid):
            o = cells.get((p // grid * 3 // grid, p % grid * 3 // grid))
            out[n, p] = torch.tensor([SHAPES.index(o["shape"]), COLORS.index(o["color"]), SIZES.index(o["size"])]
                                     if o else [len(SHAPES), len(COLORS), len(SIZES)])
    return out


def presence(targets) -> torch.Tensor:
    """(N, n_shapes) float: 1 where the shape is somewhere in the scene, from cell_targets' shape column."""
    shapes = targets[..., 0]  # (N, cells), len(SHAPES) = empty
    return F.one_hot(shapes, len(SHAPES) + 1)[..., : len(SHAPES)].amax(1).float()


def noise_batch(x, noise, generator) -> torch.Tensor:
    """Noise a share of the images of x (B, C, H, W, normalized pixels) with SENA's forward diffusion
    (sena.noise.add_diffusion_noise), noise = (share, t_min, t_max), and leave the rest as they are:

        x_b' = sqrt(ᾱ_t_b)·x_b + sqrt(1 − ᾱ_t_b)·ε_b  if u_b < share, else x_b;   t_b ~ U[t_min, t_max), u_b ~ U[0, 1)
    """
    share, t_min, t_max = noise
    t = torch.randint(t_min, t_max, (len(x),), generator=generator)
    eps = torch.randn(x.shape, generator=generator)
    noised = torch.rand(len(x), generator=generator) < share
    return torch.where(noised[:, None, None, None], add_diffusion_noise(x, t, noise=eps), x)


def autocast(device, enabled):
    """bf16 autocast on `device` when enabled, else a no-op context (the build's one precision switch)."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def pretrain_vision(model, images, targets, image_cfg, gen, tr, device="cpu", bf16=False, log=print) -> float:
    """Stage 1: the vision tower learns to name the object in each patch's cell (linear heads, dropped afterwards).

    Loss: sum over (shape, colour, size) of the mean per-patch cross-entropy of linear heads on the features LLaVA
    reads (hidden states of layer vision_feature_layer, the patches), plus the mean binary cross-entropy of a head
    that says from every token LLaVA reads (CLS too under "full") which shapes are anywhere in the image (global
    context, as CLIP's patches carry). tr["vision_noise"] = (share, t_min, t_max) noises that share of each batch
    (noise_batch), true labels kept. AdamW, linear warmup over tr["vision_warmup"] steps, cosine to lr/10.
    images: (N, 3, S, S) uint8 on the CPU; gen: the torch.Generator that draws batches and noise.
    Returns (mean loss of the last 20 steps, the heads), the heads for tower_report.
    """
    c = model.config
    splits = [len(SHAPES) + 1, len(COLORS) + 1, len(SIZES) + 1, len(SHAPES)]
    heads = torch.nn.Linear(c.vision.hidden_size, sum(splits)).to(device)
    present = presence(targets)  # (N, n_shapes)
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=tr["vision_lr"], weight_decay=0.01)
    steps, losses = tr["vision_steps"], []
    for step in range(steps):
        idx = torch.randint(0, len(images), (tr["vision_batch"],), generator=gen)
        x = noise_batch(pixels(images[idx], image_cfg), tr["vision_noise"], gen).to(device)
        with autocast(device, bf16):
            out = heads(model.vision_hidden(x)).float()  # (B, 1+N, sum(splits))
        *logits, _ = out[:, 1:].split(splits, dim=-1)  # the cells' heads read the patches
        bag = out[:, c.first_image_feature:, -splits[-1]:]  # the bag head: every token LLaVA reads (CLS if "full")
        tgt = targets[idx].to(device)
        loss = sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt[..., k].reshape(-1))
                   for k, lg in enumerate(logits))
        loss = loss + F.binary_cross_entropy_with_logits(bag, present[idx].to(device)[:, None].expand_as(bag))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, tr["vision_lr"], tr["vision_warmup"], floor=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and (step % 500 == 0 or step == steps - 1):
            log(f"theta0 stage 1 step {step:04d}/{steps} | loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return sum(losses[-20:]) / max(1, len(losses[-20:])), heads


@torch.no_grad()
def tower_report(model, heads, image_cfg, seed, n=600, t=600, device="cpu") -> dict:
    """How well the trained tower reads each kind of cell of n held-out scenes, clean and noised at step t (the
    rejected image's): shape accuracy of clear and of faint objects, the share of faint objects it calls empty, and
    the share of clutter cells and of empty cells it calls an object. Weak evidence is where θ0 will lean on the prior.
    """
    from sena.world.data import render_all
    from sena.world.scenes import sample_scenes

    scenes = sample_scenes(n, seed, "tower")
    grid = model.config.vision.image_size // model.config.vision.patch_size
    shape = cell_targets(scenes, grid)[..., 0]  # (N, cells)
    kind = torch.zeros_like(shape)  # 0 empty, 1 clear object, 2 faint object, 3 clutter
    for i, sc in enumerate(scenes):
        for p in range(grid * grid):
            r, c = p // grid * 3 // grid, p % grid * 3 // grid
            o = next((o for o in sc["objects"] if (o["row"], o["col"]) == (r, c)), None)
            blob = any((b["row"], b["col"]) == (r, c) for b in sc.get("clutter", []))
            kind[i, p] = 0 if o is None and not blob else 3 if o is None else 2 if o.get("faint") else 1
    images = render_all(scenes)
    gen = seeds.generator(seed, "tower-report")
    out = {}
    for name, steps in (("clean", None), (f"t{t}", torch.full((n,), t))):
        feats = tower_features(model, images, image_cfg, steps, gen, device)
        pred = heads(feats[:, 1:])[..., : len(SHAPES) + 1].argmax(-1).cpu()  # (N, cells); len(SHAPES) = empty
        empty = len(SHAPES)
        out[f"{name}_clear_shape_acc"] = (pred == shape)[kind == 1].float().mean().item()
        out[f"{name}_faint_shape_acc"] = (pred == shape)[kind == 2].float().mean().item()
        out[f"{name}_faint_seen_empty"] = (pred == empty)[kind == 2].float().mean().item()
        out[f"{name}_clutter_seen_object"] = (pred != empty)[kind == 3].float().mean().item()
        out[f"{name}_empty_seen_object"] = (pred != empty)[kind == 0].float().mean().item()
    return out


def tower_features(model, images, image_cfg, t, generator, device, chunk=256):
    """(N, 1 + patches, Dv) hidden states of layer vision_feature_layer, CLS included, optionally noised to step t."""
    feats = []
    for s in range(0, len(images), chunk):
        x = pixels(images[s: s + chunk], image_cfg)
        if t is not None:
            x = add_diffusion_noise(x, t[s: s + chunk], generator=generator)
        feats.append(model.vision_hidden(x.to(device)))
    return torch.cat(feats)
