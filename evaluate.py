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
import random
import re
import sys
import time

from sena import benchfiles as BF
from sena import cli
from sena import metrics as M
from sena import prompts as P
from sena.io import read_jsonl
from sena.pairs import extract_questions, parse_improved
from sena.world.language import (
    NUMBERS,
    RELATIONS,
    SYNONYMS,
    TEMPLATES,
    describe,
    oracle_answer,
    question,
    question_type,
)
from sena.world.scenes import COLORS, POSITIONS, SHAPES, absent_buddies

SPLITS = ("random", "popular", "adversarial")
USAGE = """evaluate.py --model DIR [--test-dir D] [options]
       evaluate.py --compare DIR_OR_JSON [DIR_OR_JSON ...]
       evaluate.py pope --questions Q.json [...] (--answers A.jsonl [...] | --model DIR --image-dir D --out-dir O)
       evaluate.py amber (--model DIR --image-dir D --queries Q.json --out-dir O | --responses R.json) [--annotations A]
       evaluate.py report RUN_DIR [--out PATH]
       (evaluate.py pope -h, amber -h, report -h: their own flags)"""
LOWER_IS_BETTER = ("chair_i", "chair_s", "amber_chair", "amber_hal", "amber_cog")

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


def summary(m):
    """Flat {name: fraction} view of a metrics.json, in table order."""
    s = {}
    for split in SPLITS:
        for k, short in (("accuracy", "acc"), ("f1", "f1"), ("yes_ratio", "yes")):
            s[f"pope_{split}_{short}"] = m["pope"][split][k]
    s["pope_mean_f1"] = m["pope"]["mean_f1"]
    s.update({"chair_i": m["chair"]["chair_i"], "chair_s": m["chair"]["chair_s"], "chair_recall": m["chair"]["recall"]})
    s.update({f"amber_{k}": v for k, v in m["amber"]["generative"].items() if k != "cog_share_of_hallucinated"})
    for dim in ("existence", "attribute", "relation", "all"):
        s[f"amber_f1_{dim}"] = m["amber"]["discriminative"][dim]["f1"]
    s["amber_score"] = m["amber"]["score"]
    s.update({f"vqa_{t}": v["accuracy"] for t, v in m["vqa"].items()})
    s.update(m["format"])
    return s


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
            cell = "-" if v is None else f"{100 * v:.2f}"
            if i and v is not None and key in runs[0][1]:
                cell += f" ({100 * (v - runs[0][1][key]):+.2f})"
            cells.append(f"{cell:>22}")
        print(f"{key + (' ↓' if key in LOWER_IS_BETTER else ''):<26}" + "".join(cells))


# ---------------------------------------------------------------------------------------- world benchmarks


def shape_mentions(text):
    """Every word that names a shape, repeats kept (CHAIR counts each mention), via the world's synonym table."""
    table = {w: s for s, ws in SYNONYMS.items() for w in ws}
    return [table[w] for w in re.findall(r"[a-z]+", text.lower()) if w in table]


def build_requests(scenes, seed, pope_k):
    """Every benchmark question on the scenes: dicts with task, image, prompt (user text), gold and grouping keys."""
    rng = random.Random(seed)
    reqs = []
    exist_t = TEMPLATES["exist"].replace("{shape}", "{}")
    images = [{"image": sc["image"], "objects": [o["shape"] for o in sc["objects"]]} for sc in scenes]
    chosen = M.pope_select(images, pope_k, None, random.Random(seed))
    for split in SPLITS:
        for q in M.pope_sample(chosen, pope_k, split, random.Random(seed), exist_t, SHAPES):
            reqs.append({"task": "pope", "split": split, "image": q["image"], "prompt": q["text"] + P.GEN_SUFFIX,
                         "gold": q["label"], "question_id": q["question_id"], "text": q["text"]})  # fmt: skip
    for i, sc in enumerate(scenes):
        shapes = [o["shape"] for o in sc["objects"]]
        o = rng.choice(sc["objects"])
        absent = [s for s in SHAPES if s not in shapes]
        # AMBER discriminative: one yes and one no per dimension; the 'no' existence target is an absent buddy when
        # there is one (AMBER's hallucination-prone objects), the 'no' attribute a wrong colour of a present shape.
        amber = [("existence", question("exist", shape=o["shape"]))]
        neg = absent_buddies(sc) or absent
        amber.append(("existence", question("exist", shape=rng.choice(neg))))
        amber.append(("attribute", question("attribute", color=o["color"], shape=o["shape"])))
        wrong = rng.choice([c for c in COLORS if c != o["color"]])
        amber.append(("attribute", question("attribute", color=wrong, shape=o["shape"])))
        if len(shapes) >= 2:
            a, b = rng.sample(shapes, 2)
            by_answer = {}
            for rel in RELATIONS:
                q = question("relation", shape=a, rel=rel, shape2=b)
                by_answer.setdefault(oracle_answer(sc, q), []).append(q)
            amber += [("relation", rng.choice(by_answer[ans])) for ans in ("Yes", "No") if ans in by_answer]
        for dim, q in amber:
            reqs.append({"task": "amber", "split": dim, "image": sc["image"], "prompt": q + P.GEN_SUFFIX,
                         "gold": oracle_answer(sc, q).lower(), "text": q})  # fmt: skip
        vqa = [question("color", shape=rng.choice(shapes)), question("shape", pos=rng.choice(sc["objects"])["pos"]),
               question("count")]  # fmt: skip
        o = rng.choice(sc["objects"])
        vqa.append(question("position", color=o["color"], shape=o["shape"]))
        for q in vqa:
            reqs.append({"task": "vqa", "split": question_type(q), "image": sc["image"], "prompt": q + P.GEN_SUFFIX,
                         "gold": oracle_answer(sc, q), "text": q})  # fmt: skip
        reqs.append({"task": "des", "split": "des", "image": sc["image"], "gold": describe(sc),
                     "prompt": P.DESCRIBE_PROMPTS[i % len(P.DESCRIBE_PROMPTS)] + P.DES_SUFFIX})  # fmt: skip
        reqs.append({"task": "ask", "split": "ask", "image": sc["image"], "prompt": P.ASK_QUESTION, "gold": None})
    return reqs


def score_world(reqs, scenes):
    """metrics.json's content from answered requests (each has 'answer'), plus the two-turn format requests."""
    by_image = {sc["image"]: sc for sc in scenes}
    pick = lambda task, split=None: [r for r in reqs if r["task"] == task and split in (None, r["split"])]  # noqa: E731
    pope = {s: M.pope_metrics([r["answer"] for r in pick("pope", s)], [r["gold"] for r in pick("pope", s)])
            for s in SPLITS}  # fmt: skip
    pope["mean_f1"] = sum(pope[s]["f1"] for s in SPLITS) / len(SPLITS)
    des = pick("des")
    mentions = [shape_mentions(r["answer"]) for r in des]
    gt = [{o["shape"] for o in by_image[r["image"]]["objects"]} for r in des]
    prone = [absent_buddies(by_image[r["image"]]) for r in des]
    disc = {d: M.amber_discriminative([r["answer"] for r in pick("amber", d)], [r["gold"] for r in pick("amber", d)])
            for d in ("existence", "attribute", "relation")}  # fmt: skip
    disc["all"] = M.amber_discriminative([r["answer"] for r in pick("amber")], [r["gold"] for r in pick("amber")])
    gen = M.amber_generative(mentions, gt, prone)
    vqa = pick("vqa")
    fmt = {
        "fmt_ask_question": M.rate(M.is_question(r["answer"]) for r in pick("ask")),
        "fmt_self_check": M.rate(M.is_self_check(r["answer"]) for r in pick("self_check")),
        "fmt_improve": M.rate(M.is_improved(r["answer"]) for r in pick("improve")),
        "sq_answerable_raw": M.rate(oracle_answer(by_image[r["image"]], r["answer"]) is not None
                                    for r in pick("ask")),
        "sq_answerable_checked": M.rate(r["question"] is not None and oracle_answer(by_image[r["image"]],
                                        r["question"]) is not None for r in pick("self_check")),
        "des_exact": M.rate(r["answer"].strip() == r["gold"] for r in des),
        # Self-enhancement's effect on its own colour answers: correct before, and after (a refused rewrite keeps
        # the answer, as in generate.py).
        "improve_before_correct": M.rate(M.answer_correct(r["before"], r["gold"], COLORS) for r in pick("improve")),
        "improve_after_correct": M.rate(M.answer_correct(parse_improved(r["answer"]) or r["before"], r["gold"],
                                                         COLORS) for r in pick("improve")),
    }  # fmt: skip
    return {
        "pope": pope, "chair": M.chair(mentions, gt),
        "amber": {"generative": gen, "discriminative": disc, "score": M.amber_score(gen["chair"], disc["all"]["f1"])},
        "vqa": M.vqa_accuracy([r["answer"] for r in vqa], [r["gold"] for r in vqa], [r["split"] for r in vqa]),
        "format": fmt,
    }  # fmt: skip


def follow_up_requests(reqs):
    """Second-turn prompts built from first-turn answers, as a SENA round builds them: the self-check of each asked
    question, and the self-enhancement of each scene's colour answer with its own description."""
    des = {r["image"]: r["answer"].strip() for r in reqs if r["task"] == "des"}
    out = []
    for r in reqs:
        if r["task"] == "ask":
            out.append({"task": "self_check", "split": "self_check", "image": r["image"], "gold": None,
                        "prompt": P.SELF_CHECK.format(question=r["answer"].strip())})  # fmt: skip
        if r["task"] == "vqa" and r["split"] == "color":
            # The question is the whole short-answer prompt, suffix included, as generate.py passes it.
            d, q, a = des[r["image"]], r["prompt"], r["answer"].strip()
            prompt = (P.IMPROVE_NO_DESCRIPTION.format(question=q, answer=a) if d == "Yes"
                      else P.IMPROVE.format(description=d, question=q, answer=a))  # fmt: skip
            out.append({"task": "improve", "split": "improve", "image": r["image"], "gold": r["gold"],
                        "before": a, "prompt": prompt})  # fmt: skip
    return out


def run_benchmarks(scenes, answer_fn, seed=0, pope_k=3):
    """(metrics, answered requests) of all world benchmarks; answer_fn(requests) sets r['answer'] on each.

    Two passes, as in a SENA round: the first-turn prompts, then the self-check and self-enhancement prompts that
    are built from the first answers.
    """
    reqs = build_requests(scenes, seed, pope_k)
    answer_fn(reqs)
    follow = follow_up_requests(reqs)
    answer_fn(follow)
    for r in follow:
        r["question"] = extract_questions(r["answer"]) if r["task"] == "self_check" else None
    return score_world(reqs + follow, scenes), reqs + follow


def score_pairs(pairs, scenes):
    """Data-side measures of one round's pairs, from the scene records keyed by image file name.

    pairs: dicts with question_raw (the model's own question), question (after the self-check), chosen, rejected,
    type ('gen' or 'des') and image (a path; its base name keys `scenes`). Questions are counted once per
    (image, question_raw, question). A question is answerable when the world oracle answers it — the oracle knows
    the templates only, so a free-form question counts as unanswerable. A gen answer is correct when it matches the
    oracle (yes/no by POPE parsing; else normalized equality, or the one colour/shape/number/position it names is
    the gold one); a des answer is correct when it names no absent shape, and wrong when it names one.
    """
    vocab = {"color": COLORS, "shape": SHAPES, "count": NUMBERS, "position": POSITIONS}
    questions, gen_c, gen_r, des_c, des_r, missing = {}, [], [], [], [], 0
    for p in pairs:
        sc = scenes.get(os.path.basename(p["image"]))
        if sc is None:
            missing += 1
            continue
        questions[(sc["image"], p.get("question_raw"), p.get("question"))] = sc
        if p["type"] == "des":
            present = {o["shape"] for o in sc["objects"]}
            des_c.append(all(s in present for s in shape_mentions(p["chosen"])))
            des_r.append(any(s not in present for s in shape_mentions(p["rejected"])))
            continue
        gold = oracle_answer(sc, p.get("question") or "")
        if gold is not None:  # an unanswerable question has no right answer; it shows in question_answerable
            voc = vocab.get(question_type(p["question"]), ())
            gen_c.append(M.answer_correct(p["chosen"], gold, voc))
            gen_r.append(not M.answer_correct(p["rejected"], gold, voc))
    raw = [q is not None and oracle_answer(sc, q) is not None for (_, q, _), sc in questions.items()]
    checked = [q is not None and oracle_answer(sc, q) is not None for (_, _, q), sc in questions.items()]
    return {
        "n_pairs": len(pairs), "n_missing_scene": missing, "n_questions": len(questions),
        "question_raw_answerable": M.rate(raw), "question_answerable": M.rate(checked),
        "chosen_correct": M.rate(gen_c + des_c), "rejected_wrong": M.rate(gen_r + des_r),
        "gen_chosen_correct": M.rate(gen_c), "gen_rejected_wrong": M.rate(gen_r), "n_gen_scored": len(gen_c),
        "des_chosen_correct": M.rate(des_c), "des_rejected_wrong": M.rate(des_r), "n_des": len(des_c),
    }  # fmt: skip


def answer_requests(model, tok, image_cfg, reqs, image_dir, batch_size, max_new_tokens):
    """Greedy answers for requests in place (r['answer']); identical (image, prompt) pairs are decoded once."""
    import torch
    from tqdm import tqdm

    from sena.chat import encode_prompt
    from sena.generation import generate
    from sena.image import load_image, preprocess

    cfg = model.config
    todo = sorted({(r["image"], r["prompt"], max_new_tokens[r["task"] in ("pope", "amber", "vqa")]) for r in reqs},
                  key=lambda t: (t[2], len(t[1]), t[0]))  # fmt: skip
    done = {}
    dev = next(model.parameters()).device
    for start in tqdm(range(0, len(todo), batch_size), desc="generate", leave=False):
        batch = todo[start : start + batch_size]
        ids = [encode_prompt(tok, p, cfg.n_image_tokens, cfg.image_token_index) for _, p, _ in batch]
        pixels = torch.stack([preprocess(load_image(os.path.join(image_dir, im)), image_cfg) for im, _, _ in batch])
        dtype = next(model.parameters()).dtype
        new = generate(model, ids, pixel_values=pixels.to(dev, dtype), max_new_tokens=max(t[2] for t in batch),
                       eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)  # fmt: skip
        for (im, p, _), toks in zip(batch, new):
            done[(im, p)] = tok.decode(toks, skip_special_tokens=True).strip()
    for r in reqs:
        r["answer"] = done[(r["image"], r["prompt"])]


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


def load_test_scenes(test_dir, labels, n, seed):
    """The held-out scenes and their labels path. Labels live outside the image folder, at `labels` or by default
    <test_dir>_labels.jsonl (the world's convention; <test_dir>.jsonl is accepted too). A missing split is written
    once from `seed`; a folder that holds images but no labels is an error, never overwritten."""
    base = os.path.normpath(test_dir)
    labels = labels or next((p for p in (base + "_labels.jsonl", base + ".jsonl") if os.path.isfile(p)), None)
    if labels is None or not os.path.isfile(labels):
        if os.path.isdir(test_dir) and os.listdir(test_dir):
            raise SystemExit(f"{test_dir} holds files but its labels ({labels or base + '_labels.jsonl'}) are missing")
        from sena.world import write_split

        labels = labels or base + "_labels.jsonl"
        print(f"writing the world test split: {n} scenes, seed {seed} -> {test_dir}, labels {labels}")
        write_split(test_dir, n, seed, "test", labels)
    with open(labels, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()], labels


def print_table(m):
    print(f"{'metric (%)':<26}{'value':>10}")
    for k, v in summary(m).items():
        print(f"{k + (' ↓' if k in LOWER_IS_BETTER else ''):<26}{100 * v:>10.2f}")


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
