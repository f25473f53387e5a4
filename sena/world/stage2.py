"""θ0's stage 2, as LLaVA's: the projector and the language model learn the world's instruction mix together on
features of the frozen tower (stage 1: sena/world/encoder.py), several examples of one image packed behind one shared
prefix (sena/world/data.py), a share of the images diffusion-noised with their true answers kept.
"""

import time

import torch
import torch.nn.functional as F

from sena.losses import IGNORE_INDEX
from sena.noise import add_diffusion_noise
from sena.schedule import lr_at
from sena.world.data import phases, total_steps
from sena.world.encoder import autocast, pixels


def stage2_lr(step, tr) -> float:
    """The learning rate of stage 2's step `step`: in the "mix" phase, warmup then cosine decay to
    tr["lr_floor"]·lr over its tr["steps"] steps; in the "exist" and "settle" phases (sena/world/data.py, phases),
    their own constant rates."""
    for name, n in phases(tr):
        if step < n:
            return lr_at(step, n, tr["lr"], tr["warmup"], tr["lr_floor"]) if name == "mix" else tr[f"{name}_lr"]
        step -= n
    raise ValueError(f"step beyond stage 2's {total_steps(tr)} steps")


def answer_loss(model, batch, pixel_values=None, image_features=None):
    """Cross-entropy over answer tokens, averaged within each example, then over examples.

    Per-example averaging gives a one-word VQA answer the weight of a 30-token description; per-token averaging
    would spend ~90% of the gradient on descriptions and long rewrites. The LM head runs only where a label
    follows (t predicts t+1). batch["example"] (B, T) numbers the examples of a row (0 = none), as pack_rows makes.
    """
    labels = batch["labels"]
    sel = torch.zeros_like(labels, dtype=torch.bool)
    sel[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=pixel_values,
                   image_features=image_features, position_ids=batch.get("position_ids"),
                   logits_slice=sel)  # (n_answer_tokens, V), in (row, position) order
    nll = F.cross_entropy(logits.float(), labels[:, 1:][sel[:, :-1]], reduction="none")  # (n,)
    if "example" not in batch:
        return nll.mean()
    row = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[:, 1:][sel[:, :-1]]
    ex = batch["example"][:, 1:][sel[:, :-1]] + row * (int(batch["example"].max()) + 1)  # unique example id
    _, ex = ex.unique(return_inverse=True)
    count = torch.zeros(int(ex.max()) + 1, device=nll.device).index_add_(0, ex, torch.ones_like(nll))
    return (nll / count[ex]).sum() / len(count)


def input_alignment(model, feats, words):
    """The alignment loss at the language model's input: each image token's projected feature (B, n, D), read
    through the word embedding matrix as logits over the vocabulary, against the words of what is in its cell
    (B, n, K; IGNORE_INDEX where there is nothing to name), averaged over the K words and the named tokens:

        L = (1/K) Σ_k mean_{(b,i) named} −log softmax(f_{b,i} · Eᵀ)[w_{b,i,k}],   E the word embedding matrix.

    An image token then enters the language model looking like the words "red star", so a question that names the star can
    find it by the same attention that finds a word repeated in the text."""
    logits = feats.float() @ model.model.language_model.embed_tokens.weight.float().T  # (B, n, V)
    return sum(F.cross_entropy(logits.flatten(0, 1), w.reshape(-1), ignore_index=IGNORE_INDEX)
               for w in words.unbind(-1)) / words.shape[-1]


def stage2_features(model, images, batch, image_cfg, gen, device):
    """(B, n_image_tokens, D): the frozen tower's features of the batch's images, each noised to its step batch["t"]
    (0: clean) with SENA's forward diffusion, through the trainable projector."""
    x = pixels(images[batch["image"]], image_cfg)
    noised = batch["t"] > 0
    if noised.any():
        x[noised] = add_diffusion_noise(x[noised], batch["t"][noised], generator=gen)
    with torch.no_grad():
        feats = model.vision_hidden(x.to(device))[:, model.config.first_image_feature:]
    return model.model.multi_modal_projector(feats)


def train_stage2(model, images, data, image_cfg, tr, gen, device="cpu", bf16=False, workers=0, log_every=50,
                 log=print, cell_words=None) -> list[float]:
    """Stage 2's loop: projector + language model (the tower is frozen), AdamW (no decay on norms and biases),
    stage2_lr's schedule, clipping; answer_loss on MixWindows' packed batches, plus tr["align"]
    times input_alignment when cell_words (N, n_image_tokens, 2), each scene's colour and shape word per image token,
    is given.
    Returns the per-step losses (the answer loss)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tr["lr"], betas=tuple(tr["betas"]))
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    model.train()
    losses, aligns, t0, step, total = [], [], time.time(), 0, total_steps(tr)
    for window in loader:
        for batch in window:
            batch = {k: v.to(device, non_blocking=True) if k not in ("image", "t") else v for k, v in batch.items()}
            with autocast(device, bf16):
                feats = stage2_features(model, images, batch, image_cfg, gen, device)
                answer = loss = answer_loss(model, batch, image_features=feats)
                if cell_words is not None:
                    align = input_alignment(model, feats, cell_words[batch["image"]].to(device))
                    loss = answer + tr["align"] * align
                    aligns.append(align.item())
            for g in opt.param_groups:
                g["lr"] = stage2_lr(step, tr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], tr["clip"])
            opt.step()
            losses.append(answer.item())
            if log_every and (step % log_every == 0 or step == total - 1):
                avg = sum(losses[-log_every:]) / len(losses[-log_every:])
                el = time.time() - t0
                eta = el / (step + 1) * (total - step - 1)
                align = f" | align {sum(aligns[-log_every:]) / len(aligns[-log_every:]):.4f}" if aligns else ""
                log(f"theta0 stage 2 step {step:05d}/{total} | loss {avg:.4f}{align} | gnorm {gnorm:.2f} | "
                    f"lr {opt.param_groups[0]['lr']:.2e} | {el:.0f}s, eta {eta:.0f}s")
            step += 1
    return losses
