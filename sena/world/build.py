"""Build the embedded world: θ0 (a tiny LLaVA trained from scratch on the labeled world mix) and image splits.

    python -m sena.world.build --out runs/world --seed 0

writes runs/world/theta0/ (a Hugging Face LLaVA directory), runs/world/pool/*.png with runs/world/pool_labels.jsonl
beside it (never inside: SENA sees the folder, which holds images only), and runs/world/test/ + test_labels.jsonl.
θ0 is cached: a complete runs/world/theta0 (meta.json says complete) is reused with a message.

Training is a plain loop: AdamW, linear warmup then cosine decay, fp32 on the CPU, loss = mean token cross-entropy
over answer tokens. Everything is seeded (scenes, task draws, batch order, init), so the same seed on the same
machine and thread count gives identical weights.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

from sena.chat import build_example
from sena.image import default_image_cfg
from sena.model import Llava, ModelConfig, TextConfig, VisionConfig, save_pretrained
from sena.world.encoder import align_projector, cell_targets, lr_at, pretrain_vision, tower_features
from sena.world.render import IMAGE_SIZE, render
from sena.world.scenes import COOC, sample_scenes
from sena.world.tasks import Noise, reading_examples, sample_examples
from sena.world.tokenizer import build_tokenizer, save_tokenizer

# θ0's shape: 72 px / 24 px patches -> 9 patch tokens, one per grid cell, and CLS (select="full" keeps it as a 10th
# image token, which carries the bag of shapes; see build_theta0's docstring).
MODEL = dict(vision_hidden=256, vision_layers=3, vision_heads=4, text_hidden=192, text_layers=4, text_heads=6,
             text_kv_heads=6, text_intermediate=512, patch=24, tie=False, select="full")
TRAIN = dict(steps=2000, batch_size=8, n_images=6000, per_image=4, lr=1e-3, warmup=50, weight_decay=0.01,
             vision_steps=600, vision_batch=64, vision_lr=1e-3, align_steps=1500, align_scale=16.0, align_bag=1.0,
             bag_basis="words", bag_token="cls",
             # Measured (docs/world-experiments.md), 150 held-out scenes: the bag of shapes in the CLS token alone
             # and existence + colour + position read together first give VQA 59%, position 47%, CHAIR_i 9.8% and
             # existence answers that no longer say "Yes" to everything (yes-ratio 58%) but do not follow the image
             # (POPE accuracy 49%). Existence *alone* first is learned (POPE-adversarial F1 0.88) and colour never is
             # (12%); existence after the mixed warm-up is never learned (yes-ratio 100%).
             reading=(("exist+color+position", 800), ("color+shape+position+exist+count", 500)),
             freeze_embed=True,
             # (share, t_min, t_max): stage 1 sees that share of its images diffusion-noised, true labels. Opt-in:
             # over seeds 0-2 it gave no better θ0 (VQA 55.7 vs 55.4, CHAIR_i better on one seed, worse on two;
             # docs/world-experiments.md), so the default recipe stays as measured.
             vision_noise=None,
             # (share, t_min, t_max, desc_hal): a positive control, opt-in. Stage 2 also sees that share of the
             # images diffusion-noised at t ~ U[t_min, t_max), and their descriptions name an absent buddy at rate
             # desc_hal whatever the partner's size: the premise the paper makes of LLaVA (where the image says
             # little, the language prior speaks) built into θ0, so that SENA's clean/noised contrast would carry the
             # planted phantom. It did not take (seeds 0-1, two doses): θ0's noised descriptions name the buddy no more
             # often than its clean ones (docs/world-experiments.md, session 9), so it stays off.
             degraded=None)
THETA0_FILES = ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "meta.json"]


def load_scenes(path) -> list[dict]:
    """Scene records from a jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_split(out_dir, n, seed, prefix, labels_path, cooc=COOC) -> list[dict]:
    """Render n seeded scenes to out_dir/<id>.png; their records go to labels_path, which must lie outside out_dir."""
    out_dir, labels_path = os.path.abspath(out_dir), os.path.abspath(labels_path)
    if os.path.commonpath([out_dir, labels_path]) == out_dir:
        raise ValueError(f"labels {labels_path} must not be inside the image folder {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(os.path.dirname(labels_path), exist_ok=True)
    scenes = sample_scenes(n, seed, prefix, cooc)
    for sc in scenes:
        render(sc).save(os.path.join(out_dir, sc["image"]), optimize=False)
    with open(labels_path, "w") as f:
        for sc in scenes:
            f.write(json.dumps(sc) + "\n")
    return scenes


def model_config(tok, **over) -> ModelConfig:
    m = MODEL | over
    vision = VisionConfig(hidden_size=m["vision_hidden"], intermediate_size=4 * m["vision_hidden"],
                          num_hidden_layers=m["vision_layers"], num_attention_heads=m["vision_heads"],
                          image_size=IMAGE_SIZE, patch_size=m["patch"])
    text = TextConfig(vocab_size=len(tok), hidden_size=m["text_hidden"], intermediate_size=m["text_intermediate"],
                      num_hidden_layers=m["text_layers"], num_attention_heads=m["text_heads"],
                      num_key_value_heads=m["text_kv_heads"], max_position_embeddings=512,
                      tie_word_embeddings=m["tie"])
    return ModelConfig(vision, text, vision_feature_select_strategy=m["select"],
                       image_token_index=tok.convert_tokens_to_ids("<image>"),
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def pack_rows(examples, prefix_len, pad_token_id):
    """Shared-prefix packing: several examples of one image in one row, the prefix (BOS, system line, image) once.

    examples: list of rows, each a list of (input_ids, labels) that share their first prefix_len tokens.
        columns   [ prefix (P) | example 1 suffix | example 2 suffix | ... | pad ]
        positions   0 .. P-1     P .. P+n1-1        P .. P+n2-1              0
        sees        prefix       prefix + itself    prefix + itself          itself
    Every example token has exactly the keys and positions of its own unpacked sequence, so the loss equals that of
    the unpacked batch (up to float summation order) at a fraction of the compute. The first token of each suffix
    is a prompt token (label -100), so no example is ever asked to predict the next example.
    Returns input_ids, labels, position_ids (B, T) and attention_mask, a (B, T, T) bool block mask.
    """
    rows = []
    for exs in examples:
        ids, labels, pos, seg = list(exs[0][0][:prefix_len]), [-100] * prefix_len, list(range(prefix_len)), \
            [0] * prefix_len
        for j, (e_ids, e_labels) in enumerate(exs):
            assert e_ids[:prefix_len] == ids[:prefix_len], "examples of one row must share the prefix"
            n = len(e_ids) - prefix_len
            ids += e_ids[prefix_len:]
            labels += e_labels[prefix_len:]
            pos += range(prefix_len, prefix_len + n)
            seg += [j + 1] * n
        rows.append((ids, labels, pos, seg))
    B, T = len(rows), max(len(r[0]) for r in rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # -1: padding, sees only itself
    for b, (i, lab, p, sg) in enumerate(rows):
        n = len(i)
        input_ids[b, :n], labels[b, :n] = torch.tensor(i), torch.tensor(lab)
        position_ids[b, :n], segment[b, :n] = torch.tensor(p), torch.tensor(sg)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T): key column <= query column
    sq, sk = segment[:, :, None], segment[:, None, :]  # (B, T, 1), (B, 1, T)
    mask = causal & (sk >= 0) & ((sk == 0) | (sk == sq))  # (B, T, T)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask,
            "example": segment.clamp(min=0)}


def answer_loss(model, batch, pixel_values=None, image_features=None):
    """Cross-entropy over answer tokens, averaged within each example, then over examples.

    Per-example averaging gives a one-word VQA answer the weight of a 30-token description; per-token averaging
    would spend ~90% of the gradient on descriptions and long rewrites. The LM head runs only where a label
    follows (t predicts t+1). batch["example"] (B, T) numbers the examples of a row (0 = none), as pack_rows makes.
    """
    labels = batch["labels"]
    sel = torch.zeros_like(labels, dtype=torch.bool)
    sel[:, :-1] = labels[:, 1:] != -100
    logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=pixel_values,
                   image_features=image_features, position_ids=batch.get("position_ids"),
                   logits_slice=sel)  # (n_answer_tokens, V)
    nll = F.cross_entropy(logits.float(), labels[:, 1:][sel[:, :-1]], reduction="none")  # (n,)
    if "example" not in batch:
        return nll.mean()
    row = torch.arange(labels.shape[0])[:, None].expand_as(labels)[:, 1:][sel[:, :-1]]
    ex = batch["example"][:, 1:][sel[:, :-1]] + row * (int(batch["example"].max()) + 1)  # unique example id
    _, ex = ex.unique(return_inverse=True)
    count = torch.zeros(int(ex.max()) + 1).index_add_(0, ex, torch.ones_like(nll))
    return (nll / count[ex]).sum() / len(count)


class MemoTokenizer:
    """tok's encoding with a cache, for build_example: the θ0 mix tokenizes ~4k distinct strings ~50k times (the
    system line, templated prompts, short answers); the cache makes plan_rows ~3x faster, with identical ids."""

    def __init__(self, tok):
        self.tok, self.cache = tok, {}
        self.bos_token_id, self.eos_token_id = tok.bos_token_id, tok.eos_token_id

    def __call__(self, text, add_special_tokens=False):
        key = (text, add_special_tokens)
        if key not in self.cache:
            self.cache[key] = tuple(self.tok(text, add_special_tokens=add_special_tokens).input_ids)
        return types.SimpleNamespace(input_ids=list(self.cache[key]))  # a fresh list: callers may extend it


def plan_rows(rng, scenes, tok, tr, noise, n_tok, img_id, noise_degraded=None):
    """Stage 2's data, in training order: the reading warm-up phases one after another, then the whole mix.

    One row = one image with tr["per_image"] examples (fresh task draws each time an image comes round again), token
    ids built once. tr["reading"] lists the warm-up phases as (type, steps) or (type, steps, first_layer); a type is
    one VQA type or "a+b" for a mixture; first_layer > 0 trains only the decoder layers from that one up (and the final
    norm and LM head) during the phase. The mix owns the steps left of tr["steps"]. Batches are shuffled within a
    phase, never across phases (until 2026-11-30 they were shuffled across, so the "one type at a time" warm-up was
    really one mixture).
    A scene marked "degraded" (TRAIN["degraded"]) draws its mix examples with noise_degraded instead of noise.
    Returns rows (lists of (input_ids, labels)), owner (scene index per row), batches (row indices per step),
    phase (the reading type per step, "mix" for the mix) and first_layer (per step).
    """
    bs, tok = tr["batch_size"], MemoTokenizer(tok)
    phases = [(*p, 0)[:3] for p in tr["reading"]] + [("mix", tr["steps"], 0)]
    rows, owner, batches, phase, first_layer = [], [], [], [], []
    for qtype, n, lowest in phases:
        n = min(n, tr["steps"] - len(batches))
        first = len(rows)
        for r in range(len(batches) * bs, (len(batches) + n) * bs):
            sc = scenes[r % len(scenes)]
            sc_noise = noise_degraded if sc.get("degraded") else noise
            exs = (sample_examples(rng, sc, tr["per_image"], sc_noise) if qtype == "mix"
                   else reading_examples(rng, sc, tr["per_image"], qtype))
            rows.append([build_example(tok, user, answer, n_tok, img_id) for _, user, answer in exs])
            owner.append(r % len(scenes))
        lengths = [sum(len(e[0]) for e in row) for row in rows[first:]]
        batches += [[first + i for i in b] for b in make_batches(rng, lengths, bs, n)]
        phase += [qtype] * n
        first_layer += [lowest] * n
    return rows, owner, batches, phase, first_layer


def make_batches(rng, lengths, batch_size, n_batches):
    """Index batches: shuffled, then sorted by length within windows of 16 batches (less padding), order shuffled."""
    order = []
    while len(order) < n_batches * batch_size:
        idx = list(range(len(lengths)))
        rng.shuffle(idx)
        order += idx
    order = order[: n_batches * batch_size]
    batches, window = [], 16 * batch_size
    for s in range(0, len(order), window):
        chunk = sorted(order[s: s + window], key=lambda i: lengths[i])
        batches += [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def degraded_features(model, images, image_cfg, t_min, t_max, rng) -> torch.Tensor:
    """tower_features of images noised with SENA's forward diffusion, each at its own t ~ U[t_min, t_max)."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    t = torch.randint(t_min, t_max, (len(images),), generator=gen)
    return tower_features(model, images, image_cfg, t=t, generator=gen)


def freeze_image_side(model, tr):
    """Stage 2's frozen parts: the tower, the aligned projector and, with tr["freeze_embed"], the input embeddings.

    (Trained jointly, the projector lets the language model blow the image tokens up to a large, nearly constant
    vector within a few hundred steps, and the image content is lost.)
    The projector wrote each cell's words in the initial embeddings' basis; trained embeddings drift away from it
    (cosine 0.33 after 800 steps) and the image tokens stop meaning their words (shape 94% -> 56% decodable). Frozen,
    text and image tokens keep speaking one language; the untied LM head learns freely. (Frozen and tied, the small
    init embeddings also cap the logits: the warm-up loss stalled at 2.4.)
    """
    model.model.vision_tower.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(False)
    if tr["freeze_embed"]:
        model.model.language_model.embed_tokens.requires_grad_(False)


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_language(model, rows, owner, batches, first_layer, image_features, prefix_len, tr, log_every, t0,
                   c0) -> list[float]:
    """Stage 2's loop: AdamW (no decay on norms and biases), warmup then cosine, clipping at 1, answer_loss on packed
    rows of one image each. Trains whatever requires grad, except decoder layers below first_layer[step] at that step;
    returns the per-step losses."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tr["lr"], betas=(0.9, 0.98))
    model.train()
    log = []
    for step, idx in enumerate(batches):
        batch = pack_rows([rows[i] for i in idx], prefix_len, model.config.pad_token_id)
        loss = answer_loss(model, batch, image_features=image_features[[owner[i] for i in idx]])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tr["steps"], tr["lr"], tr["warmup"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for layer in model.model.language_model.layers[: first_layer[step]]:
            for p in layer.parameters():
                p.grad = None  # AdamW skips a parameter without a gradient: no step, no decay, moments kept
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)  # skips the grads set to None
        opt.step()
        log.append(loss.item())
        if log_every and (step % log_every == 0 or step == tr["steps"] - 1):
            avg = sum(log[-log_every:]) / len(log[-log_every:])
            print(f"theta0 step {step:04d}/{tr['steps']} | loss {avg:.4f} | gnorm {gnorm:.2f} | "
                  f"lr {opt.param_groups[0]['lr']:.2e} | {time.time() - t0:.0f}s wall, "
                  f"{time.process_time() - c0:.0f}s cpu")
    return log


def _complete(path) -> bool:
    if not all(os.path.isfile(os.path.join(path, f)) for f in THETA0_FILES):
        return False
    with open(os.path.join(path, "meta.json")) as f:
        return bool(json.load(f).get("complete"))


class RecipeError(ValueError):
    """A cached θ0 built with another recipe than the one asked for (the CLIs print it as one line)."""


def check_recipe(out, recipe):
    """Refuse a cached θ0 built with another recipe (seed, train, model, noise) than the one asked for: it would be
    reused silently and every number after it would belong to another θ0. Keys an older meta.json does not record
    are not compared."""
    path = os.path.join(out, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    asked = json.loads(json.dumps(recipe))  # as meta.json holds it: tuples -> lists
    diffs = [f"seed {meta['seed']} (asked {asked['seed']})"] if meta.get("seed", asked["seed"]) != asked["seed"] else []
    for part in ("train", "model", "noise"):
        have = meta.get(part, {})
        diffs += [f"{part}.{k} {have[k]} (asked {v})" for k, v in asked[part].items() if k in have and have[k] != v]
    if diffs:
        raise RecipeError(f"{path}: the cached θ0 was built with {'; '.join(diffs)}. Use another run directory, or "
                         f"delete {out} to rebuild it")


def build_theta0(run_dir, seed=0, noise: Noise | None = None, threads=None, log_every=50, model_over=None,
                 **train_over) -> str:
    """Train θ0 on the world mix and save it to run_dir/theta0 (skipped when a complete one is there).

    Stages: (1) the ViT learns per-cell labels with linear heads, then freezes; (1b) the projector learns to write
    each cell's words into its image token (and the bag of the image's shapes into CLS's), then freezes; (2) the
    language model (input embeddings frozen, a separate LM head) first reads the image through short answers
    (TRAIN["reading"]), then learns the instruction mix, several examples of one image packed per row behind one
    shared prefix.
    Sizes: 72 px images with 24 px patches give 9 patch tokens (one per cell) + CLS; a 4-layer, 192-wide Llama and a
    3-layer, 256-wide ViT (~4.8M parameters, ~0.8M of it the ViT's last layer, which LLaVA never reads).
    train_over: any key of TRAIN (steps, batch_size = images per step, per_image = examples per image, ...).
    Returns the path of the saved directory.
    """
    out = os.path.join(run_dir, "theta0")
    noise = noise or Noise()
    tr = TRAIN | train_over
    recipe = {"seed": seed, "train": tr, "model": MODEL | (model_over or {}), "noise": vars(noise)}  # meta.json's
    if _complete(out):
        check_recipe(out, recipe)
        print(f"theta0: {out} exists and is complete; reusing it")
        return out
    t0, c0 = time.time(), time.process_time()
    if threads:  # else torch's default, which honours OMP_NUM_THREADS (parallel builds must not oversubscribe)
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_tokenizer()
    image_cfg = default_image_cfg(IMAGE_SIZE)
    config = model_config(tok, **(model_over or {}))
    model = Llava(config)
    n_tok, img_id = config.n_image_tokens, config.image_token_index

    # Data: seeded scenes rendered once as uint8, and stage 2's rows in training order (plan_rows).
    scenes = sample_scenes(tr["n_images"], seed=rng.randrange(2**31), prefix="train")
    images = torch.from_numpy(np.stack([np.asarray(render(sc)) for sc in scenes])).permute(0, 3, 1, 2)  # (N,3,S,S)
    deg_idx, noise_deg = [], None
    if tr["degraded"]:  # a stream of its own, so the default recipe's draws (and its θ0) stay as they were
        share, t_min, t_max, rate = tr["degraded"]
        drng = random.Random(seed + 7919)
        deg_idx = sorted(drng.sample(range(len(scenes)), int(share * len(scenes))))
        noise_deg = dataclasses.replace(noise, desc_hal=(rate, rate))
    plan = scenes + [dict(scenes[i], degraded=True) for i in deg_idx]  # owner indexes image_features in this order
    rows, owner, batches, _, first_layer = plan_rows(rng, plan, tok, tr, noise, n_tok, img_id, noise_deg)
    n_rows = len(rows)
    prefix_len = rows[0][0][0].index(img_id) + n_tok  # BOS + system line + "USER:" + image tokens
    t_data = time.time() - t0
    grid = config.vision.image_size // config.vision.patch_size
    vloss = pretrain_vision(model, images, cell_targets(scenes, grid), image_cfg, rng, tr["vision_steps"],
                            tr["vision_batch"], tr["vision_lr"], tr["vision_noise"])
    feats = tower_features(model, images, image_cfg)  # the tower is frozen from here on: compute it once
    ploss = align_projector(model, feats, scenes, tok, rng, tr["align_steps"], tr["vision_batch"], tr["vision_lr"],
                            tr["align_scale"], tr["align_bag"], tr["bag_basis"], tr["bag_token"])
    print(f"theta0: vision tower pretrained ({tr['vision_steps']} steps, loss {vloss:.4f}), projector aligned "
          f"({tr['align_steps']} steps, loss {ploss:.4f}) at {time.time() - t0:.0f}s")
    print(f"theta0: {len(scenes)} images, {n_rows} rows x {tr['per_image']} examples ready in {t_data:.1f}s; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {tr['steps']} steps")

    freeze_image_side(model, tr)  # stage 2 trains the language model only
    if deg_idx:  # the noised copies' features go after the clean ones, where plan_rows' owner indices expect them
        feats = torch.cat([feats, degraded_features(model, images[deg_idx], image_cfg, t_min, t_max, drng)])
    with torch.no_grad():
        image_features = model.model.multi_modal_projector(feats)  # (N, n_image_tokens, D)
    log = train_language(model, rows, owner, batches, first_layer, image_features, prefix_len, tr, log_every, t0, c0)

    # Save to a temporary folder, then rename, so an interrupted build never looks complete.
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    save_pretrained(model, tmp, tokenizer=None, image_cfg=image_cfg)
    save_tokenizer(tok, tmp)
    meta = {"complete": True, **recipe, "threads": torch.get_num_threads(),
            "final_loss": sum(log[-20:]) / max(1, len(log[-20:])), "vision_loss": vloss,
            "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
            "data_seconds": round(t_data, 1),
            "weights_sha256": weights_hash(model), "n_examples": n_rows * tr["per_image"]}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"theta0: saved {out} in {meta['seconds']}s (final loss {meta['final_loss']:.4f})")
    return out


def recipe_args(steps=None, vision_noise=None, degraded=None) -> dict:
    """TRAIN overrides from the command line's floats (build.py's and train.py's flags): the diffusion steps as ints.
    Only what was given, so a cached default θ0 is checked against the default recipe."""
    over = {"steps": steps} if steps else {}
    if vision_noise is not None:
        over["vision_noise"] = (vision_noise[0], int(vision_noise[1]), int(vision_noise[2]))
    if degraded is not None:
        over["degraded"] = (degraded[0], int(degraded[1]), int(degraded[2]), degraded[3])
    return over


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build the embedded world: θ0 and the pool/test image splits.")
    ap.add_argument("--out", default="runs/world", help="output directory")
    ap.add_argument("--seed", type=int, default=0, help="seed for scenes, data order and init")
    ap.add_argument("--n-pool", type=int, default=3000, help="unlabeled pool images (for SENA rounds)")
    ap.add_argument("--n-test", type=int, default=500, help="held-out test images (benchmarks)")
    ap.add_argument("--steps", type=int, default=TRAIN["steps"], help="θ0 optimizer steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--degraded", type=float, nargs=4, metavar=("SHARE", "T_MIN", "T_MAX", "RATE"), default=None,
                    help="stage 2: also SHARE of the images noised at t ~ U[T_MIN, T_MAX), their descriptions naming "
                         "an absent buddy at RATE (opt-in positive control; README)")
    ap.add_argument("--vision-noise", type=float, nargs=3, metavar=("SHARE", "T_MIN", "T_MAX"), default=None,
                    help="stage 1: noise SHARE of the tower's images at t ~ U[T_MIN, T_MAX), true labels (opt-in)")
    args = ap.parse_args(argv)
    try:
        build_theta0(args.out, seed=args.seed, threads=args.threads,
                     **recipe_args(args.steps, args.vision_noise, args.degraded))
    except RecipeError as e:  # a cached θ0 of another seed or recipe: the message names the file and the fix
        raise SystemExit(f"error: {e}") from None
    # Split seeds differ from the training-scene seed stream, so test scenes are held out.
    for name, n, off in (("pool", args.n_pool, 1000), ("test", args.n_test, 2000)):
        labels = os.path.join(args.out, f"{name}_labels.jsonl")
        if not os.path.isfile(labels):
            write_split(os.path.join(args.out, name), n, args.seed + off, name, labels)
            print(f"{name}: {n} images in {os.path.join(args.out, name)}, labels in {labels}")


if __name__ == "__main__":
    main()
