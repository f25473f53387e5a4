"""Build the embedded world's θ0: a tiny LLaVA trained from scratch on the labeled world mix.

    python -m sena.world.build --out runs/theta0 --device cpu      # or --device cuda
    python -m sena.world.build --out sena/world/theta0             # replace the θ0 the repository ships

The recipe is LLaVA's, at world scale:
  stage 1  the vision tower (a ViT, 72 px images, 24 px patches: one token per grid cell, plus CLS) learns per-cell
           shape / colour / size labels and the bag of shapes in the image, on clean and diffusion-noised images
           (sena/world/encoder.py), then is frozen, as LLaVA freezes CLIP;
  stage 2  the projector and the language model learn the instruction mix together (sena/world/tasks.py: describe,
           short answers, ask, self-check, improve; every label true), on fresh draws over pre-rendered scenes,
           several examples of one image packed behind one shared prefix (sena/world/data.py). A share of the images
           is diffusion-noised with the true answers kept.
Loss: token cross-entropy over answer tokens, averaged per example, then over examples. AdamW, warmup then cosine
decay, gradient clipping. bf16 autocast (on CUDA, and on CPUs with bf16 matrix units, where it is the fastest
correct path; fp32 master weights either way). Everything is seeded (sena.seeds), so the same seed, device and
thread count give the same weights hash. meta.json records the recipe, device, torch version, hash, build time, how
well the tower reads faint objects and clutter, and θ0's world benchmark scores on the validation split (VAL).
"""

import argparse
import io
import json
import os
import shutil
import tempfile
import time

import torch

from sena import cli, seeds
from sena.checkpoint import save_pretrained
from sena.cli import UserError
from sena.image import default_image_cfg
from sena.io import atomic_write_bytes, atomic_write_text, sha256_file
from sena.model import Llava, ModelConfig, TextConfig, VisionConfig
from sena.world.data import MixWindows, render_all
from sena.world.encoder import cell_targets, pretrain_vision, tower_report
from sena.world.language import DES_ORDERS
from sena.world.render import IMAGE_SIZE, render
from sena.world.scenes import sample_scenes
from sena.world.stage2 import train_stage2
from sena.world.tasks import GEN_WEIGHTS, Mix
from sena.world.theta0 import check_recipe, is_complete, weights_hash
from sena.world.tokenizer import build_tokenizer, save_tokenizer

# θ0's shape: 72 px / 24 px patches -> 9 patch tokens, one per grid cell, and CLS (select="full" keeps it as a 10th
# image token; stage 1's bag head teaches it which shapes are anywhere in the image).
MODEL = dict(vision_hidden=256, vision_layers=3, vision_heads=4, text_hidden=256, text_layers=4, text_heads=4,
             text_kv_heads=4, text_intermediate=704, patch=24, tie=False, select="full")
TRAIN = dict(n_scenes=30000,
             vision_steps=2000, vision_batch=128, vision_lr=1e-3, vision_warmup=100, vision_noise=(0.5, 1, 1000),
             steps=1008, exist_steps=256, exist_lr=2e-4, settle_steps=176, settle_lr=1e-4,
             batch_size=32, per_image=4, lr=5e-4, warmup=100, lr_floor=0.1, weight_decay=0.01,
             betas=(0.9, 0.98), clip=1.0, stage2_noise=(0.3, 1, 1000), align=0.5)
# The validation split that θ0's metrics in meta.json (and the choice among θ0 seeds) are measured on; SENA's results
# use evaluate.py's test split, which is drawn apart (another seed and prefix).
VAL = dict(n=1000, seed=0, prefix="val")


def load_scenes(path) -> list[dict]:
    """Scene records from a jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_split(out_dir, n, seed, prefix, labels_path, remove_others=False) -> list[dict]:
    """Render n seeded scenes to out_dir/<id>.png; their records go to labels_path, which must lie outside out_dir.

    Each image is written to a temp file and renamed, and the labels come last, so labels that are there mean the
    split is whole. A split already written with these records is reused as it is; one a kill interrupted (some of
    its images, no labels) is finished. Files in out_dir that are not this split's images (another split, the
    user's own) are refused with a UserError, or removed with remove_others (a folder the caller owns)."""
    out_dir, labels_path = os.path.abspath(out_dir), os.path.abspath(labels_path)
    if os.path.commonpath([out_dir, labels_path]) == out_dir:
        raise ValueError(f"labels {labels_path} must not be inside the image folder {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(os.path.dirname(labels_path), exist_ok=True)
    scenes = sample_scenes(n, seed, prefix)
    records = "".join(json.dumps(sc) + "\n" for sc in scenes)
    names = {sc["image"] for sc in scenes}
    present = set(os.listdir(out_dir))
    for name in present:
        if name.startswith(".tmp-"):  # an image whose write a kill cut short
            os.remove(os.path.join(out_dir, name))
    others = sorted(m for m in present - names if not m.startswith(".tmp-"))
    if others and not remove_others:
        raise UserError(f"{out_dir} holds {len(others)} file(s) that are not the images of this split "
                        f"({others[0]}, ...), and they are not written over: give another folder, or delete it")
    for name in others:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if os.path.isfile(labels_path) and not others and all(os.path.isfile(os.path.join(out_dir, m)) for m in names):
        with open(labels_path, encoding="utf-8") as f:
            if f.read() == records:
                return scenes
    for sc in scenes:
        buf = io.BytesIO()
        render(sc).save(buf, "PNG", optimize=False)
        atomic_write_bytes(os.path.join(out_dir, sc["image"]), buf.getvalue())
    atomic_write_text(labels_path, records)
    return scenes


def cell_words(scenes, tok, grid, n_image_tokens) -> torch.Tensor:
    """(N, n_image_tokens, 2) the input alignment's targets (sena/world/stage2.py): at each patch token, the token ids of the colour and
    the shape word of the object in its cell (" red", " star"); IGNORE_INDEX at CLS and at empty cells."""
    from sena.losses import IGNORE_INDEX
    from sena.world.scenes import COLORS, SHAPES

    t = cell_targets(scenes, grid)
    out = []
    for col, words in ((1, COLORS), (0, SHAPES)):
        ids = torch.tensor([tok.convert_tokens_to_ids("▁" + w) for w in words] + [IGNORE_INDEX])
        cls = torch.full((len(scenes), n_image_tokens - grid * grid), IGNORE_INDEX)
        out.append(torch.cat([cls, ids[t[..., col]]], dim=1))
    return torch.stack(out, dim=-1)


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


def evaluate_theta0(model_dir, device="cpu", batch_size=64) -> dict:
    """θ0's world benchmarks (sena/world/evaluation.py) on the validation split (VAL), written to a temporary folder."""
    from sena.checkpoint import load_pretrained
    from sena.settings import eval_settings
    from sena.world.evaluation import answer_requests, run_benchmarks, summary

    split = eval_settings()  # evaluate.py's test split and token caps
    model, tok, image_cfg = load_pretrained(model_dir, device=device)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        scenes = write_split(os.path.join(tmp, "val"), VAL["n"], VAL["seed"], VAL["prefix"],
                             os.path.join(tmp, "labels.jsonl"))
        caps = {True: split.answer.max_new_tokens_short, False: split.answer.max_new_tokens}
        metrics, _ = run_benchmarks(scenes, lambda rs: answer_requests(model, tok, image_cfg, rs,
                                                                       os.path.join(tmp, "val"), batch_size, caps))
    return summary(metrics)


def build_theta0(out, seed=0, mix: Mix | None = None, device="cpu", threads=None, workers=None, bf16=None,
                 log_every=50, model_over=None, evaluate=True, **train_over) -> str:
    """Train θ0 and save it to `out` (a Hugging Face LLaVA directory); a complete one there is reused.

    train_over: any key of TRAIN (steps, batch_size = images per step, per_image = examples per image, ...).
    workers: DataLoader processes making stage 2's batches (default: 0 on CPU, where they would take the compute's
    cores, 8 on CUDA). bf16: autocast on (default: on CUDA, and on a CPU with bf16 matrix units). Returns `out`.
    """
    mix = mix or Mix()
    tr = TRAIN | train_over
    recipe = {"seed": seed, "train": tr, "model": MODEL | (model_over or {}), "mix": vars(mix),
              "questions": GEN_WEIGHTS}  # meta.json's
    if is_complete(out):
        check_recipe(out, recipe)
        print(f"theta0: {out} exists and is complete; reusing it")
        return out
    cuda = device.startswith("cuda")
    bf16 = (cuda or cpu_has_bf16()) if bf16 is None else bf16
    workers = (8 if cuda else 0) if workers is None else workers
    t0 = time.time()
    # Stage 2's packed batches take a new shape almost every step, and under bf16 autocast on a CPU oneDNN caches
    # a kernel per shape (1024 by default), and the build's memory grew to 13-14 GB. A cap of 16 cut a 60-step build
    # from 4.1 to 2.9 GB at the same speed and weights (a full one still grows, more slowly). oneDNN reads this when
    # it first runs, so it only helps a process that has not used it yet.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
    if threads:  # else torch's default, which honours OMP_NUM_THREADS (parallel builds must not oversubscribe)
        torch.set_num_threads(threads)
    torch.manual_seed(seeds.derive(seed, "init"))
    gen = seeds.generator(seed, "build")  # stage 1's batches and noise, then stage 2's noise, in order
    tok = build_tokenizer()
    image_cfg = default_image_cfg(IMAGE_SIZE)
    config = model_config(tok, **(model_over or {}))
    model = Llava(config).to(device)

    scenes = sample_scenes(tr["n_scenes"], seed=seed, prefix="train")
    images = render_all(scenes, workers=max(workers, 2 if cuda else 0))
    t_data = time.time() - t0
    grid = config.vision.image_size // config.vision.patch_size
    n_params = sum(p.numel() for p in model.parameters())
    print(f"theta0: {len(scenes)} scenes rendered in {t_data:.0f}s; {n_params / 1e6:.2f}M params; {device}, "
          f"bf16 autocast {'on' if bf16 else 'off'}, {torch.get_num_threads()} threads")
    # The tower's small matrices gain nothing from bf16 on a CPU (measured slower), so stage 1 autocasts on CUDA only.
    vloss, heads = pretrain_vision(model, images, cell_targets(scenes, grid), image_cfg, gen, tr, device,
                                   bf16 and cuda)
    t_vision = time.time() - t0 - t_data
    model.model.vision_tower.requires_grad_(False)  # frozen from here on, as LLaVA freezes CLIP
    tower = tower_report(model, heads, image_cfg, seed, device=device)
    print("theta0: tower " + ", ".join(f"{k} {v:.3f}" for k, v in tower.items()))
    data = MixWindows(scenes, tok, tr, mix, config.n_image_tokens, config.image_token_index, seed)
    words = cell_words(scenes, tok, grid, config.n_image_tokens) if tr["align"] else None
    losses = train_stage2(model, images, data, image_cfg, tr, gen, device, bf16, workers, log_every, cell_words=words)

    # Save to a temporary folder, then rename, so an interrupted build never looks complete.
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    save_pretrained(model.float().cpu(), tmp, tokenizer=None, image_cfg=image_cfg)
    save_tokenizer(tok, tmp)
    t_train = time.time() - t0
    meta = {"complete": True, **recipe, "device": device, "bf16_autocast": bf16, "threads": torch.get_num_threads(),
            "workers": workers, "torch": torch.__version__, "weights_sha256": weights_hash(model),
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])), "vision_loss": vloss, "tower": tower,
            "seconds": {"data": round(t_data, 1), "stage1": round(t_vision, 1),
                        "stage2": round(t_train - t_data - t_vision, 1), "build": round(t_train, 1)}}
    if evaluate:
        meta["metrics"] = evaluate_theta0(tmp, device)
        meta["seconds"]["evaluate"] = round(time.time() - t0 - t_train, 1)
    meta["files_sha256"] = {f: sha256_file(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"theta0: saved {out} in {meta['seconds']['build']}s (final loss {meta['final_loss']:.4f}, "
          f"weights sha256 {meta['weights_sha256'][:12]}…)")
    return out


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX512-BF16), where bf16 autocast is ~2x faster."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build the embedded world's θ0 (a tiny LLaVA) from its seed.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="runs/theta0", help="θ0 directory to write (sena/world/theta0 is the shipped one)")
    ap.add_argument("--seed", type=int, default=0, help="seed for scenes, data order, noise and init")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader processes for stage 2 (default: 0 on CPU, "
                    "8 on CUDA)")
    ap.add_argument("--steps", type=int, default=TRAIN["steps"], help="stage-2 steps of the instruction mix (then "
                    "the existence and settle phases: sena/world/data.py, phases)")
    ap.add_argument("--des-order", choices=DES_ORDERS, default=Mix.des_order, help="the order descriptions name "
                    "objects in: reading order, or by kind (sena/world/language.py, describe)")
    args = ap.parse_args(argv)
    build_theta0(args.out, seed=args.seed, mix=Mix(des_order=args.des_order), device=args.device,
                 threads=args.threads, workers=args.workers, steps=args.steps)


def cli_main():
    """The console script `sena-build-theta0` (pip install -e .), the same as `python -m sena.world.build`. A cached
    θ0 of another seed or recipe (RecipeError, a UserError) ends it with one line naming the file and the fix."""
    cli.run(main)


if __name__ == "__main__":
    cli_main()
