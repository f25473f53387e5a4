"""Benchmarks of a LLaVA model on the embedded world, POPE answer-file scoring, and side-by-side comparison.

    python evaluate.py --model runs/x/iter_1/model [--test-dir runs/world/test] [--out PATH] [--batch-size 32]
        Greedy answers on held-out world scenes (built with sena.world.write_split from a fixed seed if missing):
        POPE random/popular/adversarial, CHAIR_i/CHAIR_s/recall and AMBER generative on descriptions, AMBER
        discriminative F1 (existence, attribute, relation; "No" positive) and AMBER score, VQA accuracy per type,
        and the format-following rates of SENA's own prompts. Prints a table; writes metrics.json beside the model
        (or --out) and every prompt with its answer to eval_answers.jsonl beside it.
    python evaluate.py --compare DIR_OR_JSON [DIR_OR_JSON ...]
        Prints several models' metrics.json side by side (θ0, round 1, ...) with deltas against the first.
    python evaluate.py pope --questions coco_pope_random.json [...] --answers answers_random.jsonl [...]
        Scores answer files in the official POPE formats, one split per (questions, answers) pair.
    python evaluate.py pope --model DIR --image-dir val2014 --questions coco_pope_*.json --out-dir D
        Answers the questions first (greedy, batched, LLaVA-1.5's prompt), writes D/<file>_answers.jsonl, scores them.
    python evaluate.py amber --model DIR --image-dir AMBER/image --queries query_all.json [--annotations A] --out-dir D
        Writes D/amber_responses.json in AMBER's format; with AMBER's annotations.json, scores its discriminative part
        (python evaluate.py amber --responses R --annotations A scores a responses file). sena/benchfiles.py.
    python evaluate.py report runs/<name> [--out PATH] [--images-per-round 6]
        Writes runs/<name>/report.html (sena/report.py): sampled pairs with right/wrong marks, the data report,
        training curves and the benchmark table θ0 → round k, in one self-contained file.

Descriptions use DESCRIBE_PROMPTS round-robin over the scenes (scene i gets prompt i mod 11) + DES_SUFFIX: SENA's
des pairs draw from all eleven, so the benchmark measures the same distribution it trains on. All rates are
fractions in metrics.json; tables print them ×100.
"""

import json
import os
import sys
import time

from sena import benchfiles as BF
from sena import cli
from sena import metrics as M
from sena.io import read_jsonl
from sena.world.bench import (  # noqa: F401  (the world-benchmark library; re-exported for evaluate.X callers)
    LOWER_IS_BETTER,
    SPLITS,
    WORDS,
    answer_requests,
    build_requests,
    follow_up_requests,
    load_test_scenes,
    run_benchmarks,
    score_pairs,
    score_world,
    shape_mentions,
    shown,
    summary,
)

USAGE = """evaluate.py --model DIR [--test-dir D] [options]
       evaluate.py --compare DIR_OR_JSON [DIR_OR_JSON ...]
       evaluate.py pope --questions Q.json [...] (--answers A.jsonl [...] | --model DIR --image-dir D --out-dir O)
       evaluate.py amber (--model DIR --image-dir D --queries Q.json --out-dir O | --responses R.json) [--annotations A]
       evaluate.py report RUN_DIR [--out PATH]
       (evaluate.py pope -h, amber -h, report -h: their own flags)"""

# ---------------------------------------------------------------------------------------- POPE answer files


def _check_question(rec):
    if str(rec.get("label", "")).strip().lower() not in ("yes", "no"):
        return f"label {rec.get('label')!r} is not yes/no"
    return None


def _check_answer(rec):
    if not isinstance(rec.get("answer", rec.get("text")), str):
        return "no string 'answer' (or 'text') field"
    return None


def _first_record(path):
    """The first line of a JSONL file that parses as an object ({} if none): enough to tell the file's kind."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                return rec
    return {}


def _same_question(asked, text):
    """An answer's own copy of its question matches the question file's text (a suffix added to it is allowed)."""
    a, t = " ".join(asked.split()), " ".join(text.split())
    return a.startswith(t) or t.startswith(a)


def score_pope_files(question_files, answer_files, min_answered=0.95, skipped_images=()):
    """{split: metrics} for paired question/answer files (matched on question_id), plus 'mean_f1' over splits.

    Question lines: question_id, image, text, label (yes/no). Answer lines: question_id and 'answer' (POPE, SeVa)
    or 'text' (LLaVA's model_vqa). Each split also reports n_bad (lines skipped, repeats included), n_duplicate
    (repeated question_ids), n_missing (questions without an answer, left out of the metrics) and n_unmatched
    (answers to no question); when any is non-zero, one line on stderr says so.

    A score that cannot be trusted stops with one line instead (SystemExit): a missing file, swapped question and
    answer files, a split where fewer than min_answered of the questions have an answer (questions on
    skipped_images, which --model could not read, aside), and answers whose own 'question' field shows they were
    given to other questions (answer files not in the order of the question files).
    """
    if len(question_files) != len(answer_files):
        raise SystemExit(f"error: {len(question_files)} question files but {len(answer_files)} answer files")
    for what, path in [("questions", q) for q in question_files] + [("answers", a) for a in answer_files]:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --{what} file not found: {path}")
    results = {}
    for qf, af in zip(question_files, answer_files):
        if "label" not in _first_record(qf) and "label" in _first_record(af):
            raise SystemExit(f"error: --questions {qf} has no 'label' and --answers {af} has: the two files are "
                             "swapped (questions first, then answers)")
        base = os.path.basename(qf)
        split = next((s for s in SPLITS if s in base), os.path.splitext(base)[0])
        split = split if split not in results else f"{split}_{len(results)}"
        where = f"split {split} ({base} / {os.path.basename(af)})"
        tq, ta = {}, {}
        qs, bad_q = read_jsonl(qf, ("question_id",), _check_question, unique="question_id", tally=tq)
        ans, bad_a = read_jsonl(af, ("question_id",), _check_answer, unique="question_id", tally=ta)
        qs, ans = ({r["question_id"]: r for r in recs} for recs in (qs, ans))
        if not qs:
            raise SystemExit(f"error: {where}: {qf} holds no valid question line ({bad_q} malformed)")
        ids = [i for i in qs if i in ans]
        n_unmatched = sum(i not in qs for i in ans)
        # Dropping unanswered questions changes the score (F1 over the answered half is not the split's F1).
        expected = sum(q.get("image") not in skipped_images for q in qs.values())
        if not ids or len(ids) < min_answered * expected:
            raise SystemExit(f"error: {where}: {len(ids)} of {len(qs)} questions have an answer "
                             f"({100 * len(ids) / len(qs):.1f}% < --min-answered {100 * min_answered:g}%); "
                             f"{len(ans)} valid answer lines, {n_unmatched} with a question_id of no question")
        other = [i for i in ids if isinstance(ans[i].get("question"), str) and isinstance(qs[i].get("text"), str)
                 and not _same_question(ans[i]["question"], qs[i]["text"])]
        if other:
            i = other[0]
            raise SystemExit(f"error: {where}: {len(other)} answers were given to other questions (question_id "
                             f"{i!r}: {ans[i]['question']!r} vs {qs[i]['text']!r}); are the --answers files in the "
                             "order of --questions?")
        m = M.pope_metrics([ans[i].get("answer", ans[i].get("text")) for i in ids], [qs[i]["label"] for i in ids])
        m.update(n_bad=bad_q + bad_a, n_duplicate=tq["repeated"] + ta["repeated"], n_missing=len(qs) - len(ids),
                 n_unmatched=n_unmatched)  # fmt: skip
        if m["n_bad"] or m["n_missing"] or m["n_unmatched"]:
            print(f"{where}: left out of the metrics: {m['n_missing']} questions without an answer, "
                  f"{m['n_unmatched']} answers to no question, {m['n_duplicate']} repeated question_ids, "
                  f"{m['n_bad'] - m['n_duplicate']} malformed lines", file=sys.stderr)
        results[split] = m
    results["mean_f1"] = sum(m["f1"] for m in results.values()) / len(results)
    return results


def print_pope_table(results):
    cols = ("n", "accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn", "n_bad", "n_missing",
            "n_unmatched")
    print(f"{'split':<12}" + "".join(f"{c:>12}" for c in cols))
    for split, m in results.items():
        if split != "mean_f1":
            cells = [f"{m[c]:>12d}" if isinstance(m[c], int) else f"{100 * m[c]:>12.2f}" for c in cols]
            print(f"{split:<12}" + "".join(cells))
    print(f"mean F1 over splits: {100 * results['mean_f1']:.2f}  (rates in %)")


def pope_main(argv):
    p = cli.Parser(prog="evaluate.py pope", description="Score POPE answer files (official formats), "
                   "or answer the question files with --model first.")  # fmt: skip
    p.add_argument("--questions", nargs="+", required=True, help="POPE question files (JSON lines), one per split")
    p.add_argument("--answers", nargs="+", help="answer files (JSON lines), same order as --questions")
    p.add_argument("--out", default=None, help="JSON file for the per-split metrics (with --model: "
                   "<out-dir>/pope_metrics.json)")  # fmt: skip
    p.add_argument("--min-answered", type=cli.fraction, default=0.95,
                   help="refuse to score a split where fewer of the questions have an answer (a fraction; "
                        "questions on images --model could not read aside)")
    BF.add_model_args(p)
    args = p.parse_args(argv)
    skipped = None
    for q in args.questions:  # before a model is loaded for them
        if not os.path.isfile(q):
            p.error(f"argument --questions: file not found: {q}")
    if args.model:
        if not (args.image_dir and args.out_dir):
            p.error("--model needs --image-dir and --out-dir")
        answer_fn = load_answerer(args, args.image_dir)[0]
        args.answers, skipped = BF.answer_pope_files(args.questions, args.image_dir, args.out_dir, answer_fn,
                                                     args.suffix)  # fmt: skip
        args.out = args.out or os.path.join(args.out_dir, "pope_metrics.json")
    elif not args.answers:
        p.error("give --answers FILES to score, or --model DIR --image-dir IMGS --out-dir D to answer first")
    results = score_pope_files(args.questions, args.answers, args.min_answered, skipped or ())
    print_pope_table(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results if skipped is None else {**results, "skipped_images": skipped}, f, indent=2)
    return results


def amber_main(argv):
    p = cli.Parser(prog="evaluate.py amber", description="Answer AMBER's queries in its response "
                   "format; score the discriminative part from its annotations.json.")  # fmt: skip
    p.add_argument("--queries", help="AMBER query file (data/query/query_all.json or a part of it)")
    p.add_argument("--responses", help="score this responses file instead of answering (needs --annotations)")
    p.add_argument("--annotations", help="AMBER's data/annotations.json: score the discriminative responses")
    BF.add_model_args(p)
    args = p.parse_args(argv)
    if args.responses:
        if not args.annotations:
            p.error("--responses needs --annotations")
        responses = BF.read_json_list(args.responses, {"id": (int,), "response": (str,)}, "response")[0]
    elif args.model and args.queries and args.image_dir and args.out_dir:
        answer_fn = load_answerer(args, args.image_dir)[0]
        out = os.path.join(args.out_dir, "amber_responses.json")
        responses, _ = BF.answer_amber(args.queries, args.image_dir, out, answer_fn, args.suffix)
        print(f"{len(responses)} responses -> {out}")
    else:
        p.error("give --model, --image-dir, --queries and --out-dir (or --responses FILE --annotations FILE)")
    if not args.annotations:
        return None
    res = BF.score_amber(responses, args.annotations)
    BF.print_amber_table(res)
    if args.out_dir:
        with open(os.path.join(args.out_dir, "amber_metrics.json"), "w") as f:
            json.dump(res, f, indent=2)
    return res


# ------------------------------------------------------------------------------------------------ comparison


def compare(paths):
    """Print metrics side by side (×100), each column's delta against the first; ↓ marks lower-is-better rows."""
    runs = []
    for p in paths:
        f = os.path.join(p, "metrics.json") if os.path.isdir(p) else p
        if not os.path.isfile(f):
            raise SystemExit(f"error: --compare: no metrics file {f} (evaluate.py --model DIR writes one)")
        with open(f) as fh:
            runs.append((p, summary(json.load(fh))))
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


# ---------------------------------------------------------------------------------------- world benchmarks


def load_answerer(args, image_dir):
    """(answer_fn, device): greedy answers from args.model on images under image_dir (answer_requests)."""
    import torch

    from sena.model import load_pretrained

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, image_cfg = load_pretrained(args.model, dtype=getattr(torch, args.dtype), device=device,
                                            need_tokenizer=True)
    model.eval()
    caps = {True: args.max_new_tokens_short, False: args.max_new_tokens}
    return lambda rs: answer_requests(model, tok, image_cfg, rs, image_dir, args.batch_size, caps), device


def print_table(m):
    print(f"{'metric (%; des_words: words)':<26}{'value':>10}")
    for k, v in summary(m).items():
        print(f"{k + (' ↓' if k in LOWER_IS_BETTER else ''):<26}{shown(k, v):>10.2f}")


def report_main(argv):
    p = cli.Parser(prog="evaluate.py report", description="Write a run's self-contained report.html.")
    p.add_argument("run_dir", help="run directory (runs/<name>) holding iter_<k>/ rounds")
    p.add_argument("--out", default=None, help="HTML path (default: <run_dir>/report.html)")
    p.add_argument("--images-per-round", type=cli.non_negative_int, default=6,
                   help="images sampled per round for the pair gallery")
    args = p.parse_args(argv)
    from sena.report import write_report

    return write_report(args.run_dir, args.out, args.images_per_round, score_pairs=score_pairs, summary=summary,
                        lower_is_better=LOWER_IS_BETTER)  # fmt: skip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pope"]:
        return pope_main(argv[1:])
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    if argv[:1] == ["amber"]:
        return amber_main(argv[1:])
    p = cli.Parser(prog="evaluate.py", description=__doc__, usage=USAGE)
    p.add_argument("--model", help="Hugging Face LLaVA directory to evaluate (metrics.json is written inside)")
    p.add_argument("--compare", nargs="+", metavar="DIR_OR_JSON", help="print these metrics.json side by side")
    p.add_argument("--test-dir", default="runs/world/test", help="held-out world images (labels: <dir>_labels.jsonl)")
    p.add_argument("--test-labels", default=None, help="scene records of --test-dir (default <dir>_labels.jsonl)")
    p.add_argument("--n-test", type=cli.positive_int, default=200,
                   help="number of test scenes written when the split is missing")
    p.add_argument("--test-seed", type=cli.non_negative_int, default=424242,
                   help="seed of the test split (keep apart from training)")
    p.add_argument("--seed", type=cli.non_negative_int, default=0,
                   help="seed of the question sampling over the test scenes")
    p.add_argument("--pope-k", type=cli.positive_int, default=3, help="POPE positives per image (official 3); images "
                   "with fewer objects are left out of POPE, as in the official builder")  # fmt: skip
    p.add_argument("--out", default=None, help="metrics.json path (default: <model>/metrics.json)")
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=96,
                   help="new-token cap for descriptions and SENA prompts")
    p.add_argument("--max-new-tokens-short", type=cli.positive_int, default=16,
                   help="new-token cap for short answers")
    p.add_argument("--device", type=cli.device, default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    args = p.parse_args(argv)
    if args.compare:
        return compare(args.compare)
    if not args.model:
        p.error("give --model DIR (or --compare ..., or the pope subcommand)")

    answer_fn, device = load_answerer(args, args.test_dir)
    scenes, labels = load_test_scenes(args.test_dir, args.test_labels, args.n_test, args.test_seed)
    t0 = time.time()
    m, reqs = run_benchmarks(scenes, answer_fn, args.seed, args.pope_k)
    m["meta"] = {"model": os.path.abspath(args.model), "test_dir": os.path.abspath(args.test_dir),
                 "test_labels": os.path.abspath(labels),
                 "n_scenes": len(scenes), "test_seed": args.test_seed, "seed": args.seed, "pope_k": args.pope_k,
                 "n_prompts": len({(r["image"], r["prompt"]) for r in reqs}), "seconds": time.time() - t0,
                 "device": device, "dtype": args.dtype}  # fmt: skip
    out = args.out or os.path.join(args.model, "metrics.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(m, f, indent=2)
    with open(os.path.join(os.path.dirname(os.path.abspath(out)), "eval_answers.jsonl"), "w") as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")
    print_table(m)
    print(f"{m['meta']['n_prompts']} prompts in {m['meta']['seconds']:.1f} s -> {out}")
    return m


if __name__ == "__main__":
    cli.run(main)
