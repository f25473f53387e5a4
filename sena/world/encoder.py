"""θ0's image side, stages 1 and 1b of the build: the ViT learns per-cell labels, then the projector learns to write
each cell's words into its image token. Both are frozen afterwards (sena/world/build.py explains why).

Labels are world labels, as everywhere in the θ0 build; SENA never runs this.
"""

import math

import torch
import torch.nn.functional as F

from sena.noise import add_diffusion_noise
from sena.world.scenes import COLORS, POSITIONS, SHAPES, SIZES


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
    """Stage 1's optional augmentation: noise=(share, t_min, t_max) noises that share of the images of x (B, C, H, W,
    normalized pixels) with SENA's forward diffusion (sena.noise.add_diffusion_noise) and leaves the rest as they are:

        x_b' = sqrt(ᾱ_t_b)·x_b + sqrt(1 − ᾱ_t_b)·ε_b  if u_b < share, else x_b;   t_b ~ U[t_min, t_max), u_b ~ U[0, 1)

    The labels stay the true ones, so the tower learns what it can still see through the noise and, where it sees
    nothing, the prior over scenes (co-occurrence included) instead of whatever shapes the noise looks like."""
    share, t_min, t_max = noise
    t = torch.randint(t_min, t_max, (len(x),), generator=generator)
    eps = torch.randn(x.shape, generator=generator)
    noised = torch.rand(len(x), generator=generator) < share
    return torch.where(noised[:, None, None, None], add_diffusion_noise(x, t, noise=eps), x)


def pretrain_vision(model, images, targets, image_cfg, rng, steps, batch_size, lr, noise=None):
    """Stage 1: the vision tower learns to name the object in each patch's cell (linear heads, dropped afterwards).

    LLaVA starts from a pretrained CLIP and keeps it frozen; our tower starts from scratch, and a language model
    trained jointly with a blank tower learns the caption prior long before it learns to look (its image tokens
    drift to a large constant and stop carrying content). So the tower is pretrained here and frozen afterwards.
    Loss: sum over (shape, colour, size) of the mean per-patch cross-entropy of linear heads on the features LLaVA
    reads (hidden states of layer vision_feature_layer, the patches), plus the mean binary cross-entropy of a head
    that says from every token LLaVA reads (CLS too under "full") which shapes are anywhere in the image (global
    context, as CLIP's patches carry).
    noise: None, or (share, t_min, t_max) for noise_batch (a generator seeded from rng draws it).
    Labels are world labels, as everywhere in the θ0 build.
    """
    c = model.config
    gen = torch.Generator().manual_seed(rng.randrange(2**31)) if noise else None
    splits = [len(SHAPES) + 1, len(COLORS) + 1, len(SIZES) + 1, len(SHAPES)]
    heads = torch.nn.Linear(c.vision.hidden_size, sum(splits))
    present = presence(targets)  # (N, n_shapes)

    def batch_loss(idx):
        x = pixels(images[idx], image_cfg)
        out = heads(model.vision_hidden(noise_batch(x, noise, gen) if noise else x))  # (B, 1+N, sum(splits))
        *logits, _ = out[:, 1:].split(splits, dim=-1)  # the cells' heads read the patches
        bag = out[:, c.first_image_feature:, -splits[-1]:]  # the bag head: every token LLaVA reads (CLS if "full")
        loss = sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[idx][..., k].reshape(-1))
                   for k, lg in enumerate(logits))
        return loss + F.binary_cross_entropy_with_logits(bag, present[idx][:, None].expand_as(bag))

    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    return fit(params, batch_loss, len(images), rng, steps, batch_size, lr, weight_decay=0.01)


def align_projector(model, feats, scenes, tok, rng, steps, batch_size, lr, scale=16.0, bag=0.0, bag_basis="words",
                    bag_token="all"):
    """Stage 1b: the projector learns to write each cell's words into its image token.

    Target for the token of a cell: the sum of the (frozen, initial) input embeddings of its words, e.g.
    E[▁small] + E[▁red] + E[▁star] + E[▁top] + E[▁left], or E[▁nothing] + position words for an empty cell. A
    language model then finds "star" and reads "red" in the image token with the same embeddings it reads text
    with, instead of discovering an image code first (the input embeddings stay frozen at init in stage 2, so this
    basis holds). Loss: squared error relative to the targets' mean squared norm,
        L = mean_{b,p} |proj(f_bp) - t_bp|^2 / mean_{b,p} |t_bp|^2.
    feats: (N, n_image_tokens, Dv) frozen tower outputs (CLS first if the strategy is "full").
    bag: every token (or CLS alone, bag_token) also carries bag x the sum of the embeddings of all shapes in the
    image. "Is there a star?" is then a readout of one image token (the MLP compares the question's shape with the
    bag) instead of a content match over the nine cells, which stage 2 learns only after hundreds of existence steps,
    if at all.
    bag_basis: "words" writes the bag with the shapes' word embeddings, which puts 8 x E[star] into every token of an
    image with a star and blurs the content match of "What color is the star?". "free" writes it with one fixed
    random direction per shape, orthogonal to the embeddings of every word a cell is written with: the cells' words
    stay the only word signal, and existence reads a separate channel (the language model learns the word ->
    direction map).
    bag_token: "all" adds the bag to every cell's token; "cls" (needs vision_feature_select_strategy "full") writes
    it into the CLS token alone, which then carries nothing else, and leaves the cells' tokens their own words only.
    scale: the targets are scale x the embedding sums, so an image token is ~10x larger than a text embedding: small
    image tokens are swamped by the first layer's residual updates and the language model never reads them.
    """
    embed = model.model.language_model.embed_tokens.weight.detach()
    cls = 1 - model.config.first_image_feature  # feats[:, 0] is CLS when 1
    target = align_targets(scenes, embed, tok, feats.shape[1], cls, scale, bag, bag_basis, bag_token)
    proj = model.model.multi_modal_projector
    norm = target.pow(2).sum(-1).mean()
    batch_loss = lambda idx: (proj(feats[idx]) - target[idx]).pow(2).sum(-1).mean() / norm  # noqa: E731
    return fit(proj.parameters(), batch_loss, len(scenes), rng, steps, batch_size, lr, weight_decay=0.0)


def align_targets(scenes, embed, tok, n_tokens, cls, scale, bag, bag_basis, bag_token) -> torch.Tensor:
    """(N, n_tokens, D): stage 1b's target per image token (align_projector's docstring); token 0 is CLS if cls."""
    if bag_token == "cls" and not cls:
        raise ValueError('bag_token="cls" needs vision_feature_select_strategy="full" (a CLS image token)')
    grid = int(round((n_tokens - cls) ** 0.5))
    wid = lambda w: tok.convert_tokens_to_ids("▁" + w)  # noqa: E731
    target = torch.zeros(len(scenes), n_tokens, embed.shape[1])
    cell_words = sorted({w for p in POSITIONS for w in p.split()} | {*SHAPES, *COLORS, *SIZES, "nothing"})
    basis = (embed[[wid(s) for s in SHAPES]] if bag_basis == "words"
             else free_directions(embed[[wid(w) for w in cell_words]], len(SHAPES)))
    for n, sc in enumerate(scenes):
        cells = {(o["row"], o["col"]): o for o in sc["objects"]}
        for p in range(grid * grid):
            r, c = p // grid * 3 // grid, p % grid * 3 // grid
            o = cells.get((r, c))
            words = ([o["size"], o["color"], o["shape"]] if o else ["nothing"]) + POSITIONS[3 * r + c].split()
            target[n, cls + p] = scale * embed[[wid(w) for w in words]].sum(0)
        bag_vec = scale * bag * basis[[SHAPES.index(o["shape"]) for o in sc["objects"]]].sum(0)
        if bag_token == "cls":
            target[n, 0] = bag_vec  # CLS carries the bag alone
        else:
            target[n] += bag_vec
    return target


def free_directions(embed, n, seed=0) -> torch.Tensor:
    """(n, D): random directions orthogonal to every row of embed (needs D > rows + n), at the mean row norm."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(embed.T.double())  # (D, V): an orthonormal basis of the embeddings' span
    x = torch.randn(n, embed.shape[1], generator=g, dtype=torch.float64)
    x = x - (x @ q) @ q.T
    x = x / x.norm(dim=1, keepdim=True) * embed.norm(dim=1).mean().double()
    return x.to(embed.dtype)


def fit(params, batch_loss, n, rng, steps, batch_size, lr, weight_decay):
    """The loop of stages 1 and 1b: AdamW on batch_loss(idx) for random index batches of range(n), linear warmup over
    the first 10% of steps, then cosine decay (lr_at). Returns the mean loss of the last 20 steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        loss = batch_loss([rng.randrange(n) for _ in range(batch_size)])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 10))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / max(1, len(losses[-20:]))


@torch.no_grad()
def tower_features(model, images, image_cfg, chunk=256, t=None, generator=None) -> torch.Tensor:
    """(N, n_image_tokens, Dv): the frozen tower's features LLaVA reads (layer vision_feature_layer, CLS dropped
    unless the strategy is "full").
    t: None, or (N,) diffusion steps: image i is seen as x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε (SENA's forward
    diffusion, sena.noise), ε drawn from generator chunk by chunk."""
    first = model.config.first_image_feature
    feats = []
    for s in range(0, len(images), chunk):
        x = pixels(images[s: s + chunk], image_cfg)
        if t is not None:
            x = add_diffusion_noise(x, t[s: s + chunk], generator=generator)
        feats.append(model.vision_hidden(x)[:, first:])
    return torch.cat(feats)


def lr_at(step, steps, lr, warmup):
    """Linear warmup to lr, then cosine decay to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
