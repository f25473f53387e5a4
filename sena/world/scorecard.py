"""A model's world benchmarks as a table: evaluate one model (metrics.json, eval_answers.jsonl), print its table,
and print several side by side. evaluate.py --model and --compare are the command line over these, and a SENA run
calls evaluate_model after each round.
"""

import json
import os
import time

from sena.cli import UserError
from sena.io import atomic_write_text, read_json
from sena.settings import EvalSettings
from sena.world.evaluation import LOWER_IS_BETTER, load_answerer, load_test_scenes, run_benchmarks, shown, summary


def evaluate_model(model_dir, settings: EvalSettings, test_dir, test_labels=None, out=None):
    """Greedy answers of the model in model_dir on the held-out scenes of test_dir (labels: test_labels, or found
    beside it), every world benchmark; writes metrics.json (`out`, or inside the model directory) and
    eval_answers.jsonl beside it, prints the table, returns the metrics."""
    answer_fn, device = load_answerer(model_dir, test_dir, settings.answer)
    scenes, labels = load_test_scenes(test_dir, test_labels, settings.n_test, settings.test_seed)
    t0 = time.time()
    m, reqs = run_benchmarks(scenes, answer_fn, settings.seed, settings.pope_k)
    m["meta"] = {"model": os.path.abspath(model_dir), "test_dir": os.path.abspath(test_dir),
                 "test_labels": os.path.abspath(labels), "n_scenes": len(scenes), "test_seed": settings.test_seed,
                 "seed": settings.seed, "pope_k": settings.pope_k,
                 "n_prompts": len({(r["image"], r["prompt"]) for r in reqs}), "seconds": time.time() - t0,
                 "device": device, "dtype": settings.answer.dtype}
    out = out or os.path.join(model_dir, "metrics.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # The answers first, metrics.json last: a run takes metrics.json's presence to mean "evaluated".
    atomic_write_text(os.path.join(os.path.dirname(os.path.abspath(out)), "eval_answers.jsonl"),
                      "".join(json.dumps(r) + "\n" for r in reqs))
    atomic_write_text(out, json.dumps(m, indent=2))
    print_table(m)
    print(f"{m['meta']['n_prompts']} prompts in {m['meta']['seconds']:.1f} s -> {out}")
    return m


def print_table(m):
    print(f"{'metric (%; des_words: words)':<26}{'value':>10}")
    for k, v in summary(m).items():
        print(f"{k + (' ↓' if k in LOWER_IS_BETTER else ''):<26}{shown(k, v):>10.2f}")


def compare(paths):
    """Print metrics side by side (×100), each column's delta against the first; ↓ marks lower-is-better rows."""
    runs = []
    for p in paths:
        f = os.path.join(p, "metrics.json") if os.path.isdir(p) else p
        if not os.path.isfile(f):
            raise UserError(f"--compare: no metrics file {f} (evaluate.py --model DIR writes one)")
        runs.append((p, summary(read_json(f))))  # a damaged file: one line naming it
    # Columns are named by the paths below their common folder: runs/x/theta0, runs/x/iter_1/model -> theta0, ...
    dirs = [os.path.abspath(os.path.dirname(p) if p.endswith(".json") else p) for p in paths]
    common = os.path.commonpath(dirs) if len(set(dirs)) > 1 else os.path.dirname(dirs[0])
    names = [os.path.relpath(d, common) for d in dirs]
    print(f"{'metric (%)':<26}" + "".join(f"{n[-20:]:>22}" for n in names))
    for key in runs[0][1]:
        cells = []
        for i, (_, s) in enumerate(runs):
            v = s.get(key)
            cell = "-" if v is None else f"{shown(key, v):.2f}"
            if i and v is not None and key in runs[0][1]:
                cell += f" ({shown(key, v - runs[0][1][key]):+.2f})"
            cells.append(f"{cell:>22}")
        print(f"{key + (' ↓' if key in LOWER_IS_BETTER else ''):<26}" + "".join(cells))
