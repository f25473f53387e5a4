"""The paper's ablation on the embedded world: full SENA vs without SQ / SE / ICA and a SeVa-style baseline, over
several seeds, as one table of mean ± spread (θ0 → after the last round).

    python -m benchmarks.ablation --seeds 0 1 2 --variants none no-sq no-se no-ica seva --jobs 2

Each (seed, variant) is `python train.py --run-dir runs/ablation/s<seed>-<variant> --seed <seed> --ablation <v>`:
every run starts from the same θ0 (the shipped one, or --train-args "--theta0 DIR"), and the seed sets the pools, the
noise, the data order and the LoRA init, so a seed's variants differ only in the ablated component. Runs are
resumable (train.py skips finished rounds). Prints the table after the last round and the per-round curve; writes
<out>/table.json.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from sena.world.evaluation import LOWER_IS_BETTER, shown, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = ["pope_adversarial_f1", "pope_adversarial_yes", "pope_popular_f1", "pope_random_f1", "chair_i", "chair_s",
        "chair_recall", "amber_f1_all", "amber_f1_existence", "amber_f1_attribute", "amber_f1_relation",
        "amber_score", "vqa_overall", "vqa_color", "vqa_shape", "vqa_count", "vqa_position", "open_next_to_acc",
        "open_absent", "improve_before_correct", "improve_after_correct", "sq_answerable_raw",
        "sq_answerable_checked", "des_words", "fmt_ask_question", "fmt_self_check", "fmt_improve"]
CURVE = ["chair_i", "chair_recall", "pope_adversarial_f1", "vqa_overall", "amber_score", "des_words"]


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
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs; give 1 "
                   "when another job shares the cores)")
    p.add_argument("--train-args", default="", help="extra train.py arguments, one string")
    p.add_argument("--eval", choices=["every", "last"], default="every",
                   help="benchmark every round's model, or only the last one's (train.py --no-eval, then evaluate.py "
                   "on round n, and on round 1 of full SENA for the mechanism: no per-round curve)")
    args = p.parse_args(argv)
    out = os.path.join(ROOT, args.out) if not os.path.isabs(args.out) else args.out
    os.makedirs(out, exist_ok=True)
    env_threads = str(args.threads or max(1, (os.cpu_count() or 2) // args.jobs))
    shared = theta0_evaluated_once(out, args.train_args.split(), str(args.threads or os.cpu_count() or 2))

    def one(seed, variant):
        run_dir = os.path.join(out, f"s{seed}-{variant}")
        cmd = [sys.executable, "train.py", "--run-dir", run_dir, "--seed", str(seed), "--ablation", variant,
               "--n-iters", str(args.n_iters), *args.train_args.split(), *(["--no-eval"] if args.eval == "last" else [])]
        os.makedirs(run_dir, exist_ok=True)
        for name in ("theta0", "test", "test_labels.jsonl"):  # θ0 and its scores on the test split, made once
            src, dst = os.path.join(shared, name), os.path.join(run_dir, name)
            if not os.path.exists(dst):
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
        rc = run(cmd, os.path.join(run_dir, "train.log"), env_threads)
        # --eval last: the last round, and round 1 of full SENA for the mechanism's flipped existence answers.
        for k in sorted({args.n_iters, *([1] if variant == "none" else [])}) if args.eval == "last" else []:
            model = os.path.join(run_dir, f"iter_{k}", "model")
            if rc == 0 and not os.path.exists(os.path.join(model, "metrics.json")):
                rc = run([sys.executable, "evaluate.py", "--model", model, "--test-dir", os.path.join(run_dir, "test")],
                         os.path.join(run_dir, f"evaluate_{k}.log"), env_threads)
        print(f"seed {seed} {variant}: exit {rc}", flush=True)
        return rc

    jobs = [(s, v) for v in args.variants for s in args.seeds]  # full SENA on every seed first
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda sv: one(*sv), jobs))
    table(out, args.seeds, args.variants, args.n_iters)


def theta0_evaluated_once(out, train_args, threads):
    """<out>/theta0-eval: the runs' θ0 (train.py's --theta0, else the shipped one), installed and evaluated on the
    test split once. Every run starts from a copy of it: train.py reuses a θ0 copy that holds the same weights and
    skips θ0's evaluation when its metrics.json is there, so the runs do not score the same model on the same split
    again and again. Returns the folder."""
    from sena.world import SHIPPED_THETA0, install_theta0

    shared = os.path.join(out, "theta0-eval")
    src = train_args[train_args.index("--theta0") + 1] if "--theta0" in train_args else SHIPPED_THETA0
    theta0 = install_theta0(shared, src)
    if not os.path.exists(os.path.join(theta0, "metrics.json")):
        rc = run([sys.executable, "evaluate.py", "--model", theta0, "--test-dir", os.path.join(shared, "test")],
                 os.path.join(shared, "evaluate.log"), threads)
        if rc:
            raise SystemExit(f"error: evaluating θ0 failed (exit {rc}); see {os.path.join(shared, 'evaluate.log')}")
    return shared


def metrics(out, seed, variant, k):
    """summary() of run s<seed>-<variant> after round k (0: its θ0), or None if that model was not evaluated."""
    run_dir = os.path.join(out, f"s{seed}-{variant}")
    f = os.path.join(run_dir, "theta0" if k == 0 else os.path.join(f"iter_{k}", "model"), "metrics.json")
    if not os.path.exists(f):
        return None
    with open(f) as fh:
        return summary(json.load(fh))


def mean_sd(ms, row):
    """(mean, population sd, n) of one row over the runs that have it."""
    xs = [m[row] for m in ms if m is not None]
    return (statistics.mean(xs), statistics.pstdev(xs), len(xs)) if xs else None


def table(out, seeds, variants, n_iters):
    """Mean ± spread (population std over seeds) of θ0 and of each variant after the last round, then every
    variant's per-round curve of the headline rows."""
    cols = {"θ0": [metrics(out, s, v, 0) for s in seeds for v in variants[:1]]}
    for v in variants:
        cols[v] = [metrics(out, s, v, n_iters) for s in seeds]
    res = {c: {r: mean_sd(ms, r) for r in ROWS} for c, ms in cols.items() if any(ms)}
    names = {"none": "SENA", "no-sq": "w/o SQ", "no-se": "w/o SE", "no-ica": "w/o ICA", "seva": "SeVa-style"}
    print(f"{'metric (%), mean ± sd':<24}" + "".join(f"{names.get(c, c) + f' (n={v[ROWS[0]][2]})':>18}"
                                                  for c, v in res.items()))
    for r in ROWS:
        print(f"{r + (' ↓' if r in LOWER_IS_BETTER else ''):<24}" + "".join(
            f"{shown(r, v[r][0]):>11.1f} ± {shown(r, v[r][1]):<4.1f}" if v[r] else f"{'-':>18}" for v in res.values()))
    curve = {v: {k: {r: mean_sd([metrics(out, s, v, k) for s in seeds], r) for r in CURVE}
                 for k in range(n_iters + 1)} for v in variants}
    print(f"\nper round (mean over seeds): {', '.join(CURVE)}")
    for v in variants:
        cells = [" / ".join("-" if curve[v][k][r] is None else f"{shown(r, curve[v][k][r][0]):.1f}" for r in CURVE)
                 for k in range(n_iters + 1)]
        print(f"{names.get(v, v):<12}" + " | ".join(f"iter {k}: {c}" for k, c in enumerate(cells)))
    eff = effects(out, seeds, variants[0], n_iters)
    mech = {v: mechanism(out, seeds, v) for v in variants}
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump({"final": res, "curve": curve, "effects": eff, "mechanism": mech}, f, indent=2)


# SENA's effect after the last round against the run's own θ0, per seed: (name, row, how, what counts as a gain).
# The first five are the pass criteria of docs/world.md; the last two are shown beside them.
EFFECTS = [("CHAIR_i ratio", "chair_i", "ratio", "<= 0.7"), ("recall Δ", "chair_recall", "diff", ">= -3"),
           ("POPE-adv F1 Δ", "pope_adversarial_f1", "diff", ">= +1"), ("AMBER disc F1 Δ", "amber_f1_all", "diff",
                                                                      ">= +1"),
           ("VQA Δ", "vqa_overall", "diff", ">= -1"), ("AMBER score Δ", "amber_score", "diff", "> 0"),
           ("words ratio", "des_words", "ratio", "0.75-1.25")]


def effects(out, seeds, variant, n_iters):
    """Per seed, the last round against θ0 on each EFFECTS row (ratios of raw values, differences in points)."""
    rows = {}
    for s in seeds:
        m0, m = metrics(out, s, variant, 0), metrics(out, s, variant, n_iters)
        if m0 and m:
            rows[s] = {name: (m[r] / m0[r] if m0[r] else float("nan")) if how == "ratio" else shown(r, m[r] - m0[r])
                       for name, r, how, _ in EFFECTS}
    if rows:
        print(f"\n{variant} after round {n_iters} vs θ0, per seed")
        print(f"{'seed':<6}" + "".join(f"{name + ' (' + want + ')':>24}" for name, _, _, want in EFFECTS))
        for s, e in rows.items():
            print(f"{s:<6}" + "".join(f"{e[name]:>24.2f}" for name, *_ in EFFECTS))
    return rows


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def flips(run_dir, k):
    """POPE-adversarial answers of θ0 and θ(k) to the same questions: (negatives answered yes by θ0 and no by θ(k),
    the reverse, positives yes -> no, the reverse), from the eval_answers.jsonl each evaluation writes."""
    a = os.path.join(run_dir, "theta0", "eval_answers.jsonl")
    b = os.path.join(run_dir, f"iter_{k}", "model", "eval_answers.jsonl")
    if not (os.path.exists(a) and os.path.exists(b)):
        return None
    from sena.metrics import pope_parse

    def answers(path):
        return {r["question_id"]: (pope_parse(r["answer"]), r["gold"]) for r in read_jsonl(path)
                if r["task"] == "pope" and r["split"] == "adversarial"}

    before, after = answers(a), answers(b)
    n = dict.fromkeys(("neg_yes_to_no", "neg_no_to_yes", "pos_yes_to_no", "pos_no_to_yes"), 0)
    for q, (x, gold) in before.items():
        y = after[q][0]
        if x != y:
            n[f"{'neg' if gold == 'no' else 'pos'}_{x}_to_{y}"] += 1
    return n


def mechanism(out, seeds, variant, k=1):
    """Round k's mechanism per seed, from the world's labels: absent buddies named by chosen / rejected descriptions
    (pair_scores.json), what self-enhancement fixed and introduced in them, and POPE-adversarial answers that flip
    between θ0 and θ(k)."""
    rows = {}
    for s in seeds:
        run_dir = os.path.join(out, f"s{s}-{variant}")
        f = os.path.join(run_dir, f"iter_{k}", "pair_scores.json")
        if not os.path.exists(f):
            continue
        with open(f) as fh:
            ps = json.load(fh)
        rows[s] = {"des_buddies_chosen": ps["des_chosen_buddies"], "des_buddies_rejected": ps["des_rejected_buddies"],
                   "des_others_chosen": ps["des_chosen_others"], "des_others_rejected": ps["des_rejected_others"],
                   "se_des": ps.get("se_des"), "flips": flips(run_dir, k)}
    if rows:
        print(f"\n{variant}, round {k}: absent buddies named by descriptions chosen / rejected; self-enhancement "
              f"fixed / raw (introduced) per error kind; POPE-adversarial flips θ0 -> θ{k}")
        for s, r in rows.items():
            se = " ".join(f"{kind} {c['fixed']}/{c['raw']} (+{c['introduced']})" for kind, c in (r["se_des"] or {}).items())
            fl = r["flips"] or {}
            print(f"seed {s}: buddies {r['des_buddies_chosen']} / {r['des_buddies_rejected']}, others "
                  f"{r['des_others_chosen']} / {r['des_others_rejected']} | SE {se} | flips " +
                  ", ".join(f"{key} {v}" for key, v in fl.items()))
    return rows


if __name__ == "__main__":
    main()
