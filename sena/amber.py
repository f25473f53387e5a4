"""AMBER's files (junyangwang0410/AMBER): answer its queries with a user's model, score its discriminative part as
AMBER's own inference.py does.

    queries:          a JSON list [{"id": int, "image": "AMBER_1.jpg", "query": "..."}] (data/query/query_*.json); ids
                      1-1004 are "Describe this image.", the rest yes/no questions
    responses:        a JSON list [{"id": int, "response": "..."}], what inference.py --inference_data reads
    annotations.json: [{"id", "type", "truth"}] (data/annotations.json); type "generative" (truth: the objects
                      present, plus "hallu"), or one of the yes/no types with truth "yes" / "no"

How inference.py scores the yes/no part, and so do we: every type but "generative" is a yes/no question, counted in
one of five counts (existence, attribute state / number / action, and relation for any other type, including the
689 records typed plain "relation"); a response is right only when it is exactly "Yes" or "No" as its truth says;
"No" is the positive class; every count starts at 0.001 and each rate is printed in percent, rounded to 0.1, with F1
from the rounded precision and recall (metrics.amber_printed). The differences are listed in `score_amber`.
Prompts: AMBER's yes/no queries get LLaVA-1.5's short-answer suffix (sena.pope), its generative query is asked
as written.
"""

import json
import os
import sys

from sena import metrics
from sena.cli import UserError
from sena.io import atomic_write_text, read_json
from sena.pope import LLAVA_SHORT_ANSWER, check_images, skipped_line, with_suffix

AMBER_GENERATIVE_QUERY = "Describe this image."
# The counts AMBER's inference.py keeps per yes/no question type (any other type: relation), and the rows it prints.
AMBER_COUNTS = {"discriminative-hallucination": "existence", "discriminative-attribute-state": "state",
                "discriminative-attribute-number": "number", "discriminative-attribute-action": "action"}
AMBER_DIMENSIONS = ("existence", "attribute", "relation")  # one query file each
AMBER_ROWS = {"all": ("all",), "existence": ("existence",), "attribute": ("state", "number", "action"),
              "state": ("state",), "number": ("number",), "action": ("action",), "relation": ("relation",)}


def read_json_list(path, required, what, shown=10):
    """Records of a JSON list whose fields `required` ({name: type}) have the right types; the rest are reported by
    index (the first `shown`, then their count), skipped and counted. Returns (records, n_bad)."""
    data = read_json(path, list, what)
    out, bad = [], 0
    for i, r in enumerate(data):
        wrong = [k for k, t in required.items() if not (isinstance(r, dict) and type(r.get(k)) in t)]
        if wrong:
            bad += 1
            if bad <= shown:
                print(f"{path}[{i}]: skipping {what} record (missing or mistyped {wrong})", file=sys.stderr)
            continue
        out.append(r)
    if bad > shown:
        print(f"{path}: {bad - shown} more malformed {what} records skipped ({bad} in all)", file=sys.stderr)
    return out, bad


def answer_amber(query_file, image_dir, out_path, answer_fn, suffix=LLAVA_SHORT_ANSWER):
    """Answer AMBER's queries and write [{"id", "response"}] sorted by id to out_path (AMBER's inference.py format).

    "Describe this image." is asked as written (task des, the long token cap); every other query is a yes/no
    question and gets `suffix`. Returns (responses, {image: reason} of the skipped images).
    """
    queries, _ = read_json_list(query_file, {"id": (int,), "image": (str,), "query": (str,)}, "query")
    ok, bad = check_images([q["image"] for q in queries], image_dir)
    reqs = []
    for q in queries:
        if q["image"] in ok:
            gen = q["query"].strip() == AMBER_GENERATIVE_QUERY
            reqs.append({"task": "des" if gen else "amber", "image": ok[q["image"]], "id": q["id"],
                         "prompt": q["query"] if gen else with_suffix(q["query"], suffix)})
    answer_fn(reqs)
    responses = sorted(({"id": r["id"], "response": r["answer"]} for r in reqs), key=lambda r: r["id"])
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_write_text(out_path, json.dumps(responses, indent=1))
    print(skipped_line(bad, len(queries) - len(reqs), len(queries)))
    return responses, bad


def read_amber_responses(path):
    """A responses file's records, one per id. Malformed records are reported, skipped and counted; an id repeated
    with the same response counts once; an id repeated with another response is refused, since nothing says which
    one the model gave (inference.py would score both). Returns (records, n_bad, n_repeated)."""
    recs, n_bad = read_json_list(path, {"id": (int,), "response": (str,)}, "response")
    first, n_repeated, clashes = {}, 0, []
    for r in recs:
        if r["id"] not in first:
            first[r["id"]] = r["response"]
            continue
        n_repeated += 1
        if r["response"] != first[r["id"]]:
            clashes.append(r)
    if clashes:
        i = clashes[0]["id"]
        n, again = len({r["id"] for r in clashes}), clashes[0]["response"]
        raise UserError(f"{path}: {n} ids answered more than once with different responses (id {i}: "
                        f"{first[i]!r}, then {again!r}); keep one per id")
    return [{"id": i, "response": x} for i, x in first.items()], n_bad, n_repeated


def amber_count(qtype):
    """The count inference.py adds a yes/no question of this type to; any type it does not name is a relation."""
    return AMBER_COUNTS.get(qtype, "relation")


def amber_dimension(qtype):
    """existence, attribute or relation (AMBER_DIMENSIONS)."""
    return "attribute" if amber_count(qtype) in ("state", "number", "action") else amber_count(qtype)


def score_amber(responses_file, annotation_file, min_answered=0.95, asked=None):
    """AMBER's discriminative metrics of a responses file, per dimension and over all, as inference.py counts them.

    A record is a yes/no question when its annotation's type is not "generative" (so the 689 records of type
    "relation" count, with the relation questions); it is right only when the response is exactly "Yes" or "No" as
    its truth says; "No" is positive. Each row holds the unrounded fractions of `metrics.amber_discriminative` and,
    under "inference_py", the four numbers inference.py prints (`metrics.amber_printed`).

    Where we differ from inference.py, on purpose: a response is matched to the annotation with its "id" (the script
    reads the annotation at position id - 1; in AMBER's file the two agree); a response with no annotation is counted
    and left out; a repeated id counts once (`read_amber_responses`); and a score that cannot be AMBER's stops with
    one line (UserError): no response to any yes/no question, or fewer than min_answered of the expected questions
    answered. Expected: the yes/no questions among `asked` (the ids put to the model), or else every yes/no question
    of each dimension that the responses answer at all (AMBER ships one query file per dimension).
    The generative metrics (CHAIR, Cover, Hal, Cog) need AMBER's relation.json, safe_words.txt and spaCy's
    en_core_web_lg similarity, which we do not ship: run AMBER's inference.py --evaluation_type g for them.
    """
    responses, n_bad, n_repeated = read_amber_responses(responses_file)
    ann, _ = read_json_list(annotation_file, {"id": (int,), "type": (str,)}, "annotation")
    questions, generative = {}, set()
    for a in ann:
        if a["type"] == "generative":
            generative.add(a["id"])
        elif a.get("truth") in ("yes", "no"):
            questions[a["id"]] = a
        else:  # inference.py would count any truth but "yes" as "no"; AMBER's file has none
            print(f"{annotation_file}: skipping annotation {a['id']} (truth {a.get('truth')!r} is not yes/no)",
                  file=sys.stderr)
    answered = {r["id"]: r["response"] for r in responses if r["id"] in questions}
    n_generative = sum(r["id"] in generative for r in responses)
    n_unmatched = len(responses) - len(answered) - n_generative
    if not answered:
        raise UserError(f"{responses_file}: no response answers a discriminative question of {annotation_file} "
                        f"({len(responses)} distinct ids: {n_generative} generative, {n_unmatched} of no annotated "
                        "question)")
    dim = {i: amber_dimension(a["type"]) for i, a in questions.items()}
    touched = {dim[i] for i in answered}
    if asked is None:
        expected = [i for i in questions if dim[i] in touched]
    else:
        expected = [i for i in asked if i in questions]
    n_missing = sum(i not in answered for i in expected)
    if len(expected) - n_missing < min_answered * len(expected):
        n, dims = len(expected) - n_missing, ", ".join(d for d in AMBER_DIMENSIONS if d in {dim[i] for i in expected})
        raise UserError(f"{responses_file}: {n} of {len(expected)} discriminative questions ({dims}) have "
                        f"a response ({100 * n / len(expected):.1f}% < --min-answered {100 * min_answered:g}%); "
                        "a score over part of a dimension is not AMBER's")
    lists = {c: ([], []) for c in ("all", "existence", "state", "number", "action", "relation")}
    for i, text in answered.items():
        for c in ("all", amber_count(questions[i]["type"])):
            lists[c][0].append(text)
            lists[c][1].append(questions[i]["truth"])
    res = {}
    for row, parts in AMBER_ROWS.items():
        rs = [x for c in parts for x in lists[c][0]]
        res[row] = metrics.amber_discriminative(rs, [t for c in parts for t in lists[c][1]])
        res[row]["other"] = sum(metrics.amber_parse(x) == "other" for x in rs)  # neither exactly "Yes" nor "No"
        res[row]["inference_py"] = metrics.amber_printed([metrics.amber_discriminative(*lists[c]) for c in parts],
                                                   f1_eps=1e-3 if row == "existence" else 1e-4)
    dims = [d for d in AMBER_DIMENSIONS if d in touched]
    res.update(dimensions=dims, n_generative=n_generative, n_unmatched=n_unmatched, n_missing=n_missing,
               n_repeated=n_repeated, n_bad=n_bad)
    if n_missing or n_unmatched or n_repeated or n_bad:
        print(f"{responses_file}: left out of the metrics: {n_missing} questions without a response, {n_unmatched} "
              f"responses to no annotated question, {n_repeated} repeated ids, {n_bad} malformed records",
              file=sys.stderr)
    return res


def print_amber_table(res):
    cols = ("n", "accuracy", "precision", "recall", "f1", "other")
    print(f"{'AMBER disc.':<12}" + "".join(f"{c:>10}" for c in cols) + "   (as AMBER's inference.py prints them: "
          '"No" positive, % rounded to 0.1)')
    for row in AMBER_ROWS:
        m = res[row]
        name = f"  {row}" if row in ("state", "number", "action") else row
        print(f"{name:<12}{m['n']:>10d}" + "".join(f"{m['inference_py'][c]:>10.1f}" for c in cols[1:5])
              + f"{m['other']:>10d}")
    unanswered = [d for d in AMBER_DIMENSIONS if d not in res["dimensions"]]
    if unanswered:
        print(f"dimensions scored: {', '.join(res['dimensions'])}; no responses: {', '.join(unanswered)}")
    if res["all"]["other"]:
        print(f"{res['all']['other']} responses are neither exactly \"Yes\" nor \"No\" and count as wrong, as in "
              "AMBER's inference.py (which neither strips spaces nor folds case)")
    print(f"{res['n_generative']} generative responses not scored here (CHAIR/Cover/Hal/Cog need AMBER's word lists "
          "and spaCy: run AMBER's inference.py --evaluation_type g on the responses file)")
