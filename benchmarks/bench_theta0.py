"""The θ0 build's precision on this machine: bf16 autocast against fp32, on the build's own steps.

    python -m benchmarks.bench_theta0                 # the default recipe, seed 0, 2 threads, ~3 minutes

Peer: the same steps in fp32. Both contenders run the same stage-1 batches (128 images, half of them noised) and the
same stage-2 batches (the first windows of the seed-0 MixWindows plan, 32 images x 4 examples packed per image),
from the same weights, interleaved, `--repeats` times; the median ms/step of each is reported with the ratio, and
the build is projected from them: rendering as measured, plus steps x median per stage. On a CPU with bf16 matrix
units (AMX, AVX512-BF16) autocast is what `sena.world.build` uses by default for stage 2, and fp32 for stage 1, whose
small matrices gain nothing; the table shows why.
"""

import argparse
import copy
import statistics
import time

import torch

from benchmarks import common
from sena.image import default_image_cfg
from sena.model import Llava
from sena.world import build, stage2
from sena.world.data import MixWindows, render_all
from sena.world.encoder import autocast, cell_targets, pretrain_vision
from sena.world.render import IMAGE_SIZE
from sena.world.scenes import sample_scenes
from sena.world.tasks import Mix
from sena.world.tokenizer import build_tokenizer


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="stage-2 steps timed per repeat (stage 1: 3x as many)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, contenders interleaved (median)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--scenes", type=int, default=3000, help="scenes rendered (the rendering time is scaled up)")
    return p.parse_args(argv)


def stage2_steps(model, images, batches, image_cfg, tr, bf16):
    """ms per step of train_stage2's step (features, loss, backward, clipping, AdamW) over the given batches."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=tr["lr"], betas=tuple(tr["betas"]), weight_decay=tr["weight_decay"])
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for batch in batches:
        with autocast("cpu", bf16):
            feats = stage2.stage2_features(model, images, batch, image_cfg, gen, "cpu")
            loss = stage2.answer_loss(model, batch, image_features=feats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, tr["clip"])
        opt.step()
    return 1000 * (time.perf_counter() - t) / len(batches)


def stage1_steps(model, images, targets, image_cfg, tr, n, bf16):
    t = time.perf_counter()
    pretrain_vision(model, images, targets, image_cfg, torch.Generator().manual_seed(0),
                    tr | {"vision_steps": n, "vision_warmup": 1}, "cpu", bf16, log=None)
    return 1000 * (time.perf_counter() - t) / n


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tr = build.TRAIN
    tok = build_tokenizer()
    image_cfg = default_image_cfg(IMAGE_SIZE)
    config = build.model_config(tok)
    scenes = sample_scenes(args.scenes, seed=0, prefix="train")
    t = time.perf_counter()
    images = render_all(scenes)
    render_s = (time.perf_counter() - t) * tr["n_scenes"] / args.scenes
    targets = cell_targets(scenes, config.vision.image_size // config.vision.patch_size)
    base = Llava(config)
    data = MixWindows(scenes, tok, tr, Mix(), config.n_image_tokens, config.image_token_index, seed=0)
    batches = data[0][: args.steps]  # the first window's batches (16 steps)
    tokens = statistics.mean(b["input_ids"].numel() for b in batches)
    times = {(stage, prec): [] for stage in ("stage 1", "stage 2") for prec in ("fp32", "bf16")}
    for _ in range(args.repeats):
        for prec in ("fp32", "bf16"):
            m = copy.deepcopy(base)
            times[("stage 1", prec)].append(stage1_steps(m, images, targets, image_cfg, tr, 3 * args.steps,
                                                         prec == "bf16"))
            m.model.vision_tower.requires_grad_(False)
            times[("stage 2", prec)].append(stage2_steps(m, images, batches, image_cfg, tr, prec == "bf16"))
    med = {k: statistics.median(v) for k, v in times.items()}
    steps = {"stage 1": tr["vision_steps"], "stage 2": tr["steps"]}
    print(f"θ0 build, default recipe, {args.threads} threads; median of {args.repeats}, contenders interleaved; "
          f"stage 2: {tr['batch_size']} images x {tr['per_image']} examples, {tokens:.0f} tokens/step (padded)")
    print(f"{'stage':<10}{'steps':>7}{'fp32 ms/step':>14}{'bf16 ms/step':>14}{'fp32/bf16':>11}")
    for stage in ("stage 1", "stage 2"):
        print(f"{stage:<10}{steps[stage]:>7}{med[(stage, 'fp32')]:>14.1f}{med[(stage, 'bf16')]:>14.1f}"
              f"{med[(stage, 'fp32')] / med[(stage, 'bf16')]:>10.2f}x")
    proj = {p: render_s + sum(steps[s] * med[(s, p)] / 1000 for s in steps) for p in ("fp32", "bf16")}
    best = render_s + sum(steps[s] * min(med[(s, "fp32")], med[(s, "bf16")]) / 1000 for s in steps)
    print(f"projected build (rendering {render_s:.0f} s + steps): all fp32 {proj['fp32']:.0f} s, all bf16 "
          f"{proj['bf16']:.0f} s, each stage's faster precision {best:.0f} s")
    common.write_json("theta0_build.json", {
        "machine": common.machine(), "threads": args.threads, "tokens_per_step": tokens, "render_s": render_s,
        "steps": steps, "ms_per_step": {f"{s} {p}": v for (s, p), v in med.items()},
        "projected_s": proj | {"best": best},
    })


if __name__ == "__main__":
    main()
