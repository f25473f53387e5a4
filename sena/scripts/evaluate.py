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
        Scores answer files in the official POPE formats, one split per (questions, answers) pair, by LLaVA's
        eval_pope.py rule; answers are paired with questions by question_id (not line order), labels lower-cased.
    python evaluate.py pope --model DIR --image-dir val2014 --questions coco_pope_*.json --out-dir D
        Answers the questions first (greedy, batched, LLaVA-1.5's prompt), writes D/<file>_answers.jsonl, scores them.
    python evaluate.py amber --model DIR --image-dir AMBER/image --queries query_all.json [--annotations A] --out-dir D
        Writes D/amber_responses.json in AMBER's format; with AMBER's annotations.json, scores its discriminative part
        and prints the numbers AMBER's inference.py prints (python evaluate.py amber --responses R --annotations A
        scores a responses file; evaluate.py amber -h says where we differ). sena/amber.py.
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

from sena import amber, cli, flags
from sena.io import atomic_write_text
from sena.pope import answer_pope_files, print_pope_table, score_pope_files
from sena.settings import answer_settings, eval_settings
from sena.world.evaluation import load_answerer
from sena.world.scorecard import compare, evaluate_model

USAGE = """evaluate.py --model DIR [--test-dir D] [options]
       evaluate.py --compare DIR_OR_JSON [DIR_OR_JSON ...]
       evaluate.py pope --questions Q.json [...] (--answers A.jsonl [...] | --model DIR --image-dir D --out-dir O)
       evaluate.py amber (--model DIR --image-dir D --queries Q.json --out-dir O | --responses R.json) [--annotations A]
       evaluate.py report RUN_DIR [--out PATH]
       (evaluate.py pope -h, amber -h, report -h: their own flags)"""


AMBER_HELP = """Answer AMBER's queries in its response format (--model), or read a responses file (--responses);
with AMBER's annotations.json, score the discriminative part as AMBER's inference.py does and print its numbers.

As inference.py: every annotation type but "generative" is a yes/no question (the 689 typed "relation" are relation
questions); a response counts only when it is exactly "Yes" or "No" (no stripping, no case folding: "Yes." and
"yes" are wrong); "No" is positive; rates are in %, rounded to 0.1, from counts that start at 0.001, F1 from the
rounded precision and recall. Ours: responses are matched to annotations by "id" (inference.py reads position
id - 1; the same on AMBER's file); a repeated id counts once, and is refused when its responses differ; a file that
answers fewer than --min-answered of the expected questions is refused; the generative part (CHAIR, Cover, Hal,
Cog) is not scored here: run inference.py --evaluation_type g for it."""


def pope_main(argv):
    p = cli.Parser(prog="evaluate.py pope", description="Score POPE answer files (official formats), "
                   "or answer the question files with --model first. Answers are parsed by LLaVA's eval_pope.py rule; "
                   "unlike eval_pope.py, which zips the two files line by line, answers are paired with questions by "
                   "question_id, labels are compared lower-cased, a repeated question_id counts once, and a split "
                   "with fewer than --min-answered of its questions answered is refused.")
    p.add_argument("--questions", nargs="+", required=True, help="POPE question files (JSON lines), one per split")
    p.add_argument("--answers", nargs="+", help="answer files (JSON lines), same order as --questions")
    p.add_argument("--out", default=None, help="JSON file for the per-split metrics (with --model: "
                   "<out-dir>/pope_metrics.json)")
    p.add_argument("--min-answered", type=cli.fraction, default=0.95,
                   help="refuse to score a split where fewer of the questions have an answer (a fraction; "
                        "questions on images --model could not read aside)")
    flags.add(p, flags.answering_flags())
    args = p.parse_args(argv)
    answers, out, skipped = args.answers, args.out, None
    for q in args.questions:  # before a model is loaded for them
        if not os.path.isfile(q):
            p.error(f"argument --questions: file not found: {q}")
    if args.model:
        if not (args.image_dir and args.out_dir):
            p.error("--model needs --image-dir and --out-dir")
        answer_fn = load_answerer(args.model, args.image_dir, answer_settings(args))[0]
        answers, skipped = answer_pope_files(args.questions, args.image_dir, args.out_dir, answer_fn, args.suffix)
        out = out or os.path.join(args.out_dir, "pope_metrics.json")
    elif not answers:
        p.error("give --answers FILES to score, or --model DIR --image-dir IMGS --out-dir D to answer first")
    results = score_pope_files(args.questions, answers, args.min_answered, skipped or ())
    print_pope_table(results)
    if out:
        atomic_write_text(out, json.dumps(results if skipped is None else {**results, "skipped_images": skipped},
                                          indent=2))
    return results


def amber_main(argv):
    p = cli.Parser(prog="evaluate.py amber", description=AMBER_HELP)
    p.add_argument("--queries", help="AMBER query file (data/query/query_all.json or a part of it): the questions "
                   "--model answers; with --responses, the questions the file should answer")
    p.add_argument("--responses", help="score this responses file instead of answering (needs --annotations)")
    p.add_argument("--annotations", help="AMBER's data/annotations.json: score the discriminative responses")
    p.add_argument("--min-answered", type=cli.fraction, default=0.95,
                   help="refuse to score when fewer of the expected yes/no questions have a response (a fraction; "
                        "expected: those in --queries, else every question of each dimension the responses answer; "
                        "questions on images --model could not read aside)")
    flags.add(p, flags.answering_flags())
    args = p.parse_args(argv)
    asked = None
    if args.responses:
        if not args.annotations:
            p.error("--responses needs --annotations")
        path = args.responses
        if args.queries:
            asked = [q["id"] for q in amber.read_json_list(args.queries, {"id": (int,)}, "query")[0]]
    elif args.model and args.queries and args.image_dir and args.out_dir:
        answer_fn = load_answerer(args.model, args.image_dir, answer_settings(args))[0]
        path = os.path.join(args.out_dir, "amber_responses.json")
        responses, _ = amber.answer_amber(args.queries, args.image_dir, path, answer_fn, args.suffix)
        asked = [r["id"] for r in responses]  # questions on unreadable images were not asked
        print(f"{len(responses)} responses -> {path}")
    else:
        p.error("give --model, --image-dir, --queries and --out-dir (or --responses FILE --annotations FILE)")
    if not args.annotations:
        return None
    res = amber.score_amber(path, args.annotations, args.min_answered, asked)
    amber.print_amber_table(res)
    if args.out_dir:
        atomic_write_text(os.path.join(args.out_dir, "amber_metrics.json"), json.dumps(res, indent=2))
    return res


def report_main(argv):
    p = cli.Parser(prog="evaluate.py report", description="Write a run's self-contained report.html.")
    p.add_argument("run_dir", help="run directory (runs/<name>) holding iter_<k>/ rounds")
    p.add_argument("--out", default=None, help="HTML path (default: <run_dir>/report.html)")
    p.add_argument("--images-per-round", type=cli.non_negative_int, default=6,
                   help="images sampled per round for the pair gallery")
    args = p.parse_args(argv)
    from sena.report import write_report

    return write_report(args.run_dir, args.out, args.images_per_round)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    subcommands = {"pope": pope_main, "amber": amber_main, "report": report_main}
    if argv[:1] and argv[0] in subcommands:
        return subcommands[argv[0]](argv[1:])
    p = cli.Parser(prog="evaluate.py", description=__doc__, usage=USAGE)
    p.add_argument("--compare", nargs="+", metavar="DIR_OR_JSON", help="print these metrics.json side by side")
    flags.add(p, flags.world_eval_flags())
    args = p.parse_args(argv)
    if args.compare:
        return compare(args.compare)
    if not args.model:
        p.error("give --model DIR (or --compare ..., or the pope subcommand)")
    return evaluate_model(args.model, eval_settings(args), args.test_dir, args.test_labels, args.out)


def cli_main():
    """The console script `sena-evaluate` (pip install .), the same as `python evaluate.py`."""
    cli.run(main)


if __name__ == "__main__":
    cli_main()
