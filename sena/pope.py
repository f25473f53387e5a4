"""Official benchmark files with a user's image folder: POPE questions in, its answer format out, and the image
checks and prompt suffix that AMBER's files (sena/amber.py) share.

    POPE  questions: JSON lines {"question_id", "image", "text", "label"} (RUCAIBox/POPE output/coco/*.json)
          answers:   JSON lines {"question", "answer", "question_id"} (POPE's and SeVa's format; evaluate.py pope
                     scores them, and so does LLaVA's eval_pope.py, which reads 'text' or 'answer' alike)

Scoring follows LLaVA's eval_pope.py (metrics.pope_parse). Where the file handling differs on purpose: answers are
paired with questions by question_id, not by line order (eval_pope.py zips the two files), so a reordered or partial
answer file is scored right or refused rather than misaligned; labels are compared lower-cased and stripped; a
repeated question_id counts once; a split with fewer than --min-answered of its questions answered is refused.

Prompts follow LLaVA-1.5's POPE evaluation (llava_pope_test.jsonl): the question text, a newline, then "Answer the
question using a single word or phrase.", greedy. AMBER's yes/no queries get the same suffix (AMBER counts only the
exact responses "Yes" and "No"). SENA's own gen prompts join the same suffix with a space (sena.prompts.GEN_SUFFIX);
--suffix changes it, e.g. for the embedded world's model.

Images are checked once before any decoding: a path that leaves the image folder, a missing file or an unreadable
image is skipped with its questions, counted, and named in one summary line, so a run never stops halfway.
The model is a callable answer_fn(requests) that sets r["answer"] on dicts with image (a path), prompt and task
(the world's answer_requests, through load_answerer), so everything here runs without a model in the tests.
"""

import json
import os
import sys

from sena import metrics
from sena.cli import UserError
from sena.io import atomic_write_text, read_jsonl, safe_join

LLAVA_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def check_images(names, image_dir):
    """({name: path} of the images that open, {name: reason} of the rest), each distinct name checked once."""
    from sena.image import load_image  # torch comes with it; evaluate.py's scorers stay light without

    if not os.path.isdir(image_dir):
        raise UserError(f"image folder not found: {image_dir}")
    ok, bad = {}, {}
    for name in dict.fromkeys(names):
        try:
            path = safe_join(image_dir, name)
        except ValueError:
            bad[name] = "outside the image folder"
            continue
        if not os.path.isfile(path):
            bad[name] = "missing"
            continue
        try:
            load_image(path)
        except ValueError:
            bad[name] = "unreadable"
            continue
        ok[name] = path
    return ok, bad


def skipped_line(bad, n_skipped, n_total, shown=10):
    """'skipped 7 of 60 questions on 2 images: missing 1 (a.jpg), unreadable 1 (b.jpg)', or 'all images read'."""
    if not bad:
        return f"all images read: {n_total} questions answered"
    parts = []
    for reason in sorted(set(bad.values())):
        names = [n for n, r in bad.items() if r == reason]
        more = f", +{len(names) - shown} more" if len(names) > shown else ""
        parts.append(f"{reason} {len(names)} ({', '.join(names[:shown])}{more})")
    return f"skipped {n_skipped} of {n_total} questions on {len(bad)} images: " + "; ".join(parts)


def with_suffix(text, suffix):
    """text + suffix, unless the file already carries it (LLaVA's llava_pope_test.jsonl does)."""
    return text if suffix.strip() and text.rstrip().endswith(suffix.strip()) else text + suffix


# ---------------------------------------------------------------------------------------------------------- POPE


def read_pope_questions(path):
    """POPE question records in file order; a malformed line, a non-string image or text, or a repeated question_id
    is reported with file and line, skipped and counted. Returns (records, n_bad)."""
    recs, bad = read_jsonl(path, required=("question_id", "image", "text"))
    out, seen = [], set()
    for r in recs:
        if not (isinstance(r["image"], str) and isinstance(r["text"], str)) or r["question_id"] in seen:
            print(f"{path}: skipping question {r['question_id']!r} (repeated, or image/text not strings)",
                  file=sys.stderr)
            bad += 1
            continue
        seen.add(r["question_id"])
        out.append(r)
    return out, bad


def answer_pope_files(question_files, image_dir, out_dir, answer_fn, suffix=LLAVA_SHORT_ANSWER):
    """Answer every question of every file in one batched pass; write out_dir/<question file stem>_answers.jsonl.

    Returns (answer file paths in the order of question_files, {image: reason} of the skipped images). Questions on
    a skipped image get no answer line; the scorer counts them as n_missing.
    """
    stems = [os.path.splitext(os.path.basename(q))[0] for q in question_files]
    if len(set(stems)) != len(stems):
        raise UserError(f"question files must have distinct names (their answer files are named after them): {stems}")
    files = [read_pope_questions(q)[0] for q in question_files]
    ok, bad = check_images([r["image"] for qs in files for r in qs], image_dir)
    reqs = [[{"task": "pope", "image": ok[r["image"]], "prompt": with_suffix(r["text"], suffix), "q": r}
             for r in qs if r["image"] in ok] for qs in files]
    answer_fn([r for rs in reqs for r in rs])
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for stem, rs in zip(stems, reqs):
        path = os.path.join(out_dir, f"{stem}_answers.jsonl")
        lines = [{"question": r["q"]["text"], "answer": r["answer"], "question_id": r["q"]["question_id"]} for r in rs]
        atomic_write_text(path, "".join(json.dumps(x) + "\n" for x in lines))
        out.append(path)
    n_total = sum(len(qs) for qs in files)
    print(skipped_line(bad, n_total - sum(len(rs) for rs in reqs), n_total))
    return out, bad


# ---------------------------------------------------------------------------------- POPE answer-file scoring


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

    A score that cannot be trusted is refused with a UserError instead: a missing file, swapped question and answer
    files, a split where fewer than min_answered of the questions have an answer (questions on
    skipped_images, which --model could not read, aside), and answers whose own 'question' field shows they were
    given to other questions (answer files not in the order of the question files).
    """
    if len(question_files) != len(answer_files):
        raise UserError(f"{len(question_files)} question files but {len(answer_files)} answer files")
    for what, path in [("questions", q) for q in question_files] + [("answers", a) for a in answer_files]:
        if not os.path.isfile(path):
            raise UserError(f"--{what} file not found: {path}")
    results = {}
    for qf, af in zip(question_files, answer_files):
        if "label" not in _first_record(qf) and "label" in _first_record(af):
            raise UserError(f"--questions {qf} has no 'label' and --answers {af} has: the two files are "
                            "swapped (questions first, then answers)")
        base = os.path.basename(qf)
        split = next((s for s in metrics.POPE_SPLITS if s in base), os.path.splitext(base)[0])
        split = split if split not in results else f"{split}_{len(results)}"
        where = f"split {split} ({base} / {os.path.basename(af)})"
        tq, ta = {}, {}
        qs, bad_q = read_jsonl(qf, ("question_id",), _check_question, unique="question_id", tally=tq)
        ans, bad_a = read_jsonl(af, ("question_id",), _check_answer, unique="question_id", tally=ta)
        qs, ans = ({r["question_id"]: r for r in recs} for recs in (qs, ans))
        if not qs:
            raise UserError(f"{where}: {qf} holds no valid question line ({bad_q} malformed)")
        ids = [i for i in qs if i in ans]
        n_unmatched = sum(i not in qs for i in ans)
        # Dropping unanswered questions changes the score (F1 over the answered half is not the split's F1).
        expected = sum(q.get("image") not in skipped_images for q in qs.values())
        if not ids or len(ids) < min_answered * expected:
            raise UserError(f"{where}: {len(ids)} of {len(qs)} questions have an answer "
                            f"({100 * len(ids) / len(qs):.1f}% < --min-answered {100 * min_answered:g}%); "
                            f"{len(ans)} valid answer lines, {n_unmatched} with a question_id of no question")
        other = [i for i in ids if isinstance(ans[i].get("question"), str) and isinstance(qs[i].get("text"), str)
                 and not _same_question(ans[i]["question"], qs[i]["text"])]
        if other:
            i = other[0]
            raise UserError(f"{where}: {len(other)} answers were given to other questions (question_id "
                            f"{i!r}: {ans[i]['question']!r} vs {qs[i]['text']!r}); are the --answers files in the "
                            "order of --questions?")
        answers = [ans[i].get("answer", ans[i].get("text")) for i in ids]
        m = metrics.pope_metrics(answers, [qs[i]["label"] for i in ids])
        m.update(n_bad=bad_q + bad_a, n_duplicate=tq["repeated"] + ta["repeated"], n_missing=len(qs) - len(ids),
                 n_unmatched=n_unmatched)
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
