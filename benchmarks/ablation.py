"""The paper's ablation on the embedded world: full SENA vs without SQ / SE / ICA and a SeVa-style baseline, over
several seeds, as one table of mean ± spread (θ0 → after the last round).

    python benchmarks/ablation.py --seeds 0 1 2 --variants none no-sq no-se no-ica seva --jobs 2

Each (seed, variant) is `python train.py --run-dir runs/ablation/s<seed>-<variant> --seed <seed> --ablation <v>`;
all variants of a seed share that seed's θ0 (built once, copied), pools and test set, so they differ only in the
ablated component. Runs are resumable (train.py skips finished rounds). Writes runs/ablation/table.json.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evaluate import LOWER_IS_BETTER, summary  # noqa: E402

ROWS = ["pope_adversarial_f1", "pope_adversarial_yes", "pope_popular_f1", "pope_random_f1", "chair_i", "chair_s",
        "chair_recall", "amber_f1_all", "amber_score", "vqa_overall", "vqa_color", "vqa_shape", "vqa_count",
        "vqa_position", "improve_before_correct", "improve_after_correct", "sq_answerable_checked"]


def run(cmd, log, threads):
    env = dict(os.environ, OMP_NUM_THREADS=threads, TQDM_DISABLE="1")
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="world/run seeds")
    p.add_argument("--variants", nargs="+", default=["none", "no-sq", "no-se", "no-ica", "seva"],
                   help="train.py --ablation values; 'none' is full SENA")
    p.add_argument("--n-iters", type=int, default=3, help="SENA rounds per run")
    p.add_argument("--out", default="runs/ablation", help="parent folder of the runs")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with cores/jobs torch threads)")
    p.add_argument("--train-args", default="", help="extra train.py arguments, one string")
    args = p.parse_args(argv)
    out = os.path.join(ROOT, args.out) if not os.path.isabs(args.out) else args.out
    os.makedirs(out, exist_ok=True)
    env_threads = str(max(1, (os.cpu_count() or 2) // args.jobs))

    def one(seed, variant):
        run_dir = os.path.join(out, f"s{seed}-{variant}")
        shared = os.path.join(out, f"s{seed}-none", "theta0")
        if variant != "none" and os.path.isdir(shared) and not os.path.isdir(os.path.join(run_dir, "theta0")):
            shutil.copytree(shared, os.path.join(run_dir, "theta0"))  # same θ0 for every variant of a seed
        cmd = [sys.executable, "train.py", "--run-dir", run_dir, "--seed", str(seed), "--ablation", variant,
               "--n-iters", str(args.n_iters), *args.train_args.split()]
        os.makedirs(run_dir, exist_ok=True)
        rc = run(cmd, os.path.join(run_dir, "train.log"), env_threads)
        print(f"seed {seed} {variant}: exit {rc}", flush=True)
        return rc

    # A seed's variants start once its 'none' run has built θ0 (and copy it); the pool's FIFO queue starts every
    # 'none' run before any variant, so a waiting variant never blocks one, and no worker idles while work is ready.
    built = {s: threading.Event() for s in args.seeds}

    def job(seed, variant):
        if variant == "none":
            try:
                return one(seed, variant)
            finally:
                built[seed].set()
        if "none" in args.variants:
            built[seed].wait()
        return one(seed, variant)

    jobs = [(s, "none") for s in args.seeds if "none" in args.variants]
    jobs += [(s, v) for s in args.seeds for v in args.variants if v != "none"]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda sv: job(*sv), jobs))
    table(out, args.seeds, args.variants, args.n_iters)


def table(out, seeds, variants, n_iters):
    """Mean ± spread (population std over seeds) of θ0 and of each variant after the last round."""
    cols = {"θ0": []}
    for v in variants:
        cols[v] = []
    for s in seeds:
        base = os.path.join(out, f"s{s}-none", "theta0", "metrics.json")
        if os.path.exists(base):
            cols["θ0"].append(summary(json.load(open(base))))
        for v in variants:
            f = os.path.join(out, f"s{s}-{v}", f"iter_{n_iters}", "model", "metrics.json")
            if os.path.exists(f):
                cols[v].append(summary(json.load(open(f))))
    res = {c: {r: (statistics.mean(x[r] for x in ms), statistics.pstdev(x[r] for x in ms), len(ms))
               for r in ROWS} for c, ms in cols.items() if ms}
    names = {"none": "SENA", "no-sq": "w/o SQ", "no-se": "w/o SE", "no-ica": "w/o ICA", "seva": "SeVa-style"}
    print(f"{'metric (%), mean ± sd':<24}" + "".join(f"{names.get(c, c) + f' (n={v[ROWS[0]][2]})':>18}"
                                                  for c, v in res.items()))
    for r in ROWS:
        print(f"{r + (' ↓' if r in LOWER_IS_BETTER else ''):<24}" + "".join(
            f"{100 * v[r][0]:>11.1f} ± {100 * v[r][1]:<4.1f}" for v in res.values()))
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
