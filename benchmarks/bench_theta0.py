"""Where the θ0 build's time goes, against the same steps' matrix multiplies alone (issue #3's 5-minute target).

    python benchmarks/bench_theta0.py                # the default recipe, seed 0, 2 threads, ~2 minutes

Peer: stage 2's steps reduced to their GEMMs. For a sample of the real recipe's steps (the seed-0 plan of
sena.world.build, reading phases and mix), each contender runs the same steps:
  step    train_language's loop as the build runs it (packing, forward, backward, clipping, AdamW)
  GEMMs   only the step's matrix multiplies, same shapes: per decoder layer the 7 projections forward and their
          input- and weight-gradient products backward, and the LM head on the answer tokens
The GEMMs are what a step cannot do without; attention, element-wise ops and the optimizer come on top. Stage 2's
time is projected from the per-phase median ms/step times the phase's step count; stages 1 and 1b (tower, projector)
and the data step are timed on a short run of the same loops and projected the same way. The "GEMM floor" is the
build with stage 2 reduced to its GEMMs and everything else as measured: no faster build of this recipe exists on
the machine unless the GEMMs themselves get faster.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from sena.image import default_image_cfg  # noqa: E402
from sena.model import Llava  # noqa: E402
from sena.world import build as B  # noqa: E402
from sena.world.encoder import align_projector, cell_targets, pretrain_vision, tower_features  # noqa: E402
from sena.world.render import IMAGE_SIZE, render  # noqa: E402
from sena.world.scenes import sample_scenes  # noqa: E402
from sena.world.tasks import Noise  # noqa: E402
from sena.world.tokenizer import build_tokenizer  # noqa: E402

TARGET_S = 300


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="the build's seed (its data plan)")
    p.add_argument("--sample", type=int, default=24, help="stage-2 steps timed per phase (evenly spaced)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, contenders interleaved (median)")
    p.add_argument("--stage1-frac", type=float, default=0.1, help="share of stage 1 / 1b steps timed")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the build's default on 2 cores)")
    return p.parse_args(argv)


def gemm_replay(m, proj, n_layers, dims, n_answer):
    """The step's matrix multiplies alone: M = B*T rows through n_layers x proj [(in, out) per projection], and the
    LM head on n_answer rows. dims holds the operands by shape."""
    for _ in range(n_layers):
        for d_in, d_out in proj:
            x, w, g = dims[(m, d_in)], dims[(d_out, d_in)], dims[(m, d_out)]
            torch.mm(x, w.t())  # forward
            torch.mm(g, w)  # grad of the input
            torch.mm(g.t(), x)  # grad of the weight
    x, w, g = dims["head"]
    torch.mm(x[:n_answer], w.t()), torch.mm(g[:n_answer], w), torch.mm(g[:n_answer].t(), x[:n_answer])


def projected(run, n, total):
    """Seconds of run(total) from timed run(1) and run(n): the call's fixed cost (targets, optimizer) plus total-1
    times the per-step cost."""
    t = time.perf_counter()
    run(1)
    one = time.perf_counter() - t
    t = time.perf_counter()
    run(n)
    return one + (time.perf_counter() - t - one) / max(1, n - 1) * (total - 1)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tr = B.TRAIN

    # The data step, exactly as build_theta0 does it (scenes, rendering, the stage-2 plan).
    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    config = B.model_config(tok)
    model = Llava(config)
    scenes = sample_scenes(tr["n_images"], seed=rng.randrange(2**31), prefix="train")
    images = torch.from_numpy(np.stack([np.asarray(render(sc)) for sc in scenes])).permute(0, 3, 1, 2)
    n_tok, img_id = config.n_image_tokens, config.image_token_index
    rows, owner, batches, phase, _ = B.plan_rows(rng, scenes, tok, tr, Noise(), n_tok, img_id)
    prefix_len = rows[0][0][0].index(img_id) + n_tok
    data_s = time.perf_counter() - t0

    # Stages 1 and 1b on a share of their steps (the step cost does not depend on the step).
    image_cfg = default_image_cfg(IMAGE_SIZE)
    grid = config.vision.image_size // config.vision.patch_size
    n_v, n_a = max(2, int(tr["vision_steps"] * args.stage1_frac)), max(2, int(tr["align_steps"] * args.stage1_frac))
    targets = cell_targets(scenes, grid)

    def vision(n):
        pretrain_vision(model, images, targets, image_cfg, rng, n, tr["vision_batch"], tr["vision_lr"])

    vision(3)  # warm-up
    vision_s = projected(vision, n_v, tr["vision_steps"])
    t = time.perf_counter()
    feats = tower_features(model, images, image_cfg)
    features_s = time.perf_counter() - t

    def align(n):
        align_projector(model, feats, scenes, tok, rng, n, tr["vision_batch"], tr["vision_lr"], tr["align_scale"],
                        tr["align_bag"], tr["bag_basis"], tr["bag_token"])

    align_s = projected(align, n_a, tr["align_steps"])

    # Stage 2 as the build sets it up.
    B.freeze_image_side(model, tr)
    with torch.no_grad():
        image_features = model.model.multi_modal_projector(feats)
    text = config.text
    D, F_, V = text.hidden_size, text.intermediate_size, text.vocab_size
    proj = [(D, D)] * 4 + [(D, F_), (D, F_), (F_, D)]  # q, k, v, o, gate, up, down

    phases = {"reading": [s for s, p in enumerate(phase) if p != "mix"],
              "mix": [s for s, p in enumerate(phase) if p == "mix"]}
    stats = {}
    for name, steps in phases.items():
        pick = [steps[int(i * len(steps) / args.sample)] for i in range(args.sample)]
        shapes = []  # (M = B*T, answer tokens) per picked step
        for s in pick:
            b = B.pack_rows([rows[i] for i in batches[s]], prefix_len, config.pad_token_id)
            shapes.append((b["input_ids"].numel(), int((b["labels"] != -100).sum())))
        ms = sorted({m for m, _ in shapes})
        dims = {(m, d): torch.randn(m, d) for m in ms for d in (D, F_)}
        dims |= {(o, i): torch.randn(o, i) * 0.05 for i, o in proj}
        n_max = max(n for _, n in shapes)
        dims["head"] = (torch.randn(n_max, D), torch.randn(V, D) * 0.05, torch.randn(n_max, V))
        real, gemm = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            B.train_language(model, rows, owner, [batches[s] for s in pick], [0] * len(pick), image_features,
                             prefix_len, tr, 0, t, time.process_time())
            real.append((time.perf_counter() - t) / len(pick))
            t = time.perf_counter()
            for m, n in shapes:
                gemm_replay(m, proj, text.num_hidden_layers, dims, n)
            gemm.append((time.perf_counter() - t) / len(pick))
        flops = sum(6 * m * sum(i * o for i, o in proj) * text.num_hidden_layers + 6 * n * D * V
                    for m, n in shapes) / len(shapes)
        stats[name] = {"steps": len(steps), "tokens_per_step": statistics.mean(m for m, _ in shapes),
                       "gemm_gflop_per_step": flops / 1e9, "step_ms": 1e3 * statistics.median(real),
                       "gemm_ms": 1e3 * statistics.median(gemm), "step_ms_all": [1e3 * x for x in real],
                       "gemm_ms_all": [1e3 * x for x in gemm]}

    print(f"θ0 build, seed {args.seed}, {args.threads} threads; stage 2 sampled {args.sample} steps per phase, "
          f"median of {args.repeats}")
    print(f"{'stage 2 phase':<10} {'steps':>5} {'tokens/step':>11} {'GFLOP/step':>10} {'step ms':>8} {'GEMMs ms':>8} "
          f"{'step/GEMMs':>10} {'GEMM GFLOP/s':>12}")
    for name, s in stats.items():
        print(f"{name:<10} {s['steps']:>5} {s['tokens_per_step']:>11.0f} {s['gemm_gflop_per_step']:>10.1f} "
              f"{s['step_ms']:>8.1f} {s['gemm_ms']:>8.1f} {s['step_ms'] / s['gemm_ms']:>9.2f}x "
              f"{s['gemm_gflop_per_step'] / s['gemm_ms'] * 1e3:>12.0f}")
    stage2 = sum(s["steps"] * s["step_ms"] for s in stats.values()) / 1e3
    stage2_gemm = sum(s["steps"] * s["gemm_ms"] for s in stats.values()) / 1e3
    other = data_s + vision_s + features_s + align_s
    print(f"projected: data {data_s:.0f} s, tower {vision_s:.0f} s, features {features_s:.0f} s, projector "
          f"{align_s:.0f} s, stage 2 {stage2:.0f} s (GEMMs alone {stage2_gemm:.0f} s)")
    print(f"build {other + stage2:.0f} s; GEMM floor {other + stage2_gemm:.0f} s "
          f"(ratio {(other + stage2) / (other + stage2_gemm):.2f}x); target {TARGET_S} s")
    out = {"machine": common.machine(), "args": vars(args), "data_s": data_s, "vision_s": vision_s,
           "features_s": features_s, "align_s": align_s, "stage2": stats, "stage2_s": stage2,
           "stage2_gemm_s": stage2_gemm, "build_s": other + stage2, "floor_s": other + stage2_gemm,
           "target_s": TARGET_S}
    os.makedirs(common.RESULTS, exist_ok=True)
    with open(os.path.join(common.RESULTS, "theta0_build.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
