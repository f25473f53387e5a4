"""evaluate.py amber --responses against AMBER's own inference.py: the numbers it prints, on records of every type of
its real annotations.json (tests/fixtures/amber), and the response files that would mislead a score."""

import json
import os
import subprocess
import sys

import pytest

import evaluate
from sena import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "amber")
ANNOTATIONS = os.path.join(FIXTURES, "annotations.json")
RESPONSES = os.path.join(FIXTURES, "responses.json")
ROWS = ("all", "existence", "attribute", "state", "number", "action", "relation")

# What AMBER's inference.py (--evaluation_type d) prints for responses.json: accuracy, precision, recall, F1 in %
# per dimension (how they were made: tests/fixtures/amber/README.md). Two rows by hand, "No" positive:
# existence: 4 questions, truth no; "No." and "no" are wrong (exact strings), "No" right, "Yes" wrong. Every count
#   starts at 0.001: accuracy 1/4.001 -> 25.0, precision 1/1.001 -> 99.9 (not 100), recall 1/4.001 -> 25.0,
#   F1 = 2·0.999·0.25/(0.999 + 0.25 + 0.001) = 0.3996 -> 40.0 (ε is 0.001 on this row, 0.0001 on the others).
# relation: the 4 "discriminative-relation" (truth yes) and the 4 "relation" (truth no) records; one right ("No" to
#   a no), one "No" to a yes: accuracy 1/8.001 -> 12.5, precision 1/2.001 -> 50.0, recall 1/4.001 -> 25.0,
#   F1 = 2·0.5·0.25/(0.75 + 0.0001) -> 33.3.
INFERENCE_PY = {
    "all": (20.0, 57.1, 23.5, 33.3), "existence": (25.0, 99.9, 25.0, 40.0), "attribute": (22.2, 50.0, 22.2, 30.7),
    "state": (33.3, 99.9, 33.3, 49.9), "number": (33.3, 50.0, 33.3, 40.0), "action": (0.0, 0.0, 0.0, 0.0),
    "relation": (12.5, 50.0, 25.0, 33.3),
}


def responses_file(tmp_path, records, name="responses.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def fixture_responses():
    with open(RESPONSES) as f:
        return json.load(f)


def refusal(argv):
    """The one line evaluate.py exits with (through cli.run, as on the command line)."""
    with pytest.raises(SystemExit) as e:
        cli.run(evaluate.main, argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_fixture_holds_every_record_type_of_the_real_annotation_file():
    with open(ANNOTATIONS) as f:
        ann = json.load(f)
    # The seven types of AMBER's data/annotations.json (15,220 records); "relation" (689 records, truth "no") has no
    # "discriminative-" prefix, and inference.py scores it with the relation questions.
    assert {a["type"] for a in ann} == {
        "generative", "discriminative-hallucination", "discriminative-attribute-state",
        "discriminative-attribute-number", "discriminative-attribute-action", "discriminative-relation", "relation",
    }
    assert {r["id"] for r in fixture_responses()} == {a["id"] for a in ann}


def test_scores_equal_what_inference_py_prints(capsys):
    res = evaluate.main(["amber", "--responses", RESPONSES, "--annotations", ANNOTATIONS])
    out = capsys.readouterr().out
    got = {row: tuple(res[row]["inference_py"][k] for k in ("accuracy", "precision", "recall", "f1")) for row in ROWS}
    assert got == INFERENCE_PY
    assert {row: res[row]["n"] for row in ROWS} == {"all": 30, "existence": 4, "attribute": 18, "state": 6,
                                                    "number": 6, "action": 6, "relation": 8}
    assert (res["n_generative"], res["n_unmatched"], res["n_missing"]) == (2, 0, 0)
    # The table shows the same numbers, and how many responses AMBER counts wrong for their form alone.
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.split()}
    assert lines["relation"][:5] == ["8", "12.5", "50.0", "25.0", "33.3"]
    assert res["all"]["other"] == 18 and "18 responses are neither exactly" in out


def test_refuses_files_that_would_mislead(tmp_path, capsys):
    """An empty file, ids of no question, one response repeated, a few questions answered, every id answered twice
    in two ways: each used to print a table (exit 0); each is refused with one line, or scored once per id."""
    argv = ["amber", "--annotations", ANNOTATIONS, "--responses"]
    recs = fixture_responses()
    assert "no response answers a discriminative question" in refusal(argv + [responses_file(tmp_path, [])])
    moved = [dict(r, id=r["id"] + 10**6) for r in recs]
    msg = refusal(argv + [responses_file(tmp_path, moved)])
    assert "no response answers a discriminative question" in msg and "32 of no annotated question" in msg
    # 200,000 copies of one existence answer: one question answered of the 4 existence questions.
    copies = [{"id": 8635, "response": "No"}] * 200_000
    msg = refusal(argv + [responses_file(tmp_path, copies)])
    assert "1 of 4 discriminative questions (existence) have a response (25.0% < --min-answered 95%)" in msg
    res = evaluate.main(argv + [responses_file(tmp_path, copies), "--min-answered", "0"])
    assert res["all"]["n"] == 1 and res["n_repeated"] == 199_999
    assert "199999 repeated ids" in capsys.readouterr().err
    # 20 of the 22 existence and attribute questions answered (no relation ones): refused at 95%, scored at 90%.
    some = [r for r in recs if r["id"] < 13557 and r["id"] not in (8633, 8634)]
    msg = refusal(argv + [responses_file(tmp_path, some)])
    assert "20 of 22 discriminative questions (existence, attribute) have a response (90.9%" in msg
    res = evaluate.main(argv + [responses_file(tmp_path, some), "--min-answered", "0.9"])
    assert (res["all"]["n"], res["n_missing"], res["relation"]["n"]) == (20, 2, 0)
    out, err = capsys.readouterr()
    assert "2 questions without a response" in err and "no responses: relation" in out
    # Every id twice, the second time otherwise: which one is the model's? Refused, naming the first such id.
    twice = recs + [dict(r, response=r["response"] + "!") for r in recs]
    msg = refusal(argv + [responses_file(tmp_path, twice)])
    assert "32 ids answered more than once with different responses (id 1:" in msg
    # Every id twice, the same way: scored once per id, and said.
    res = evaluate.main(argv + [responses_file(tmp_path, recs + recs)])
    assert res["all"]["n"] == 30 and res["n_repeated"] == 32 and res["all"]["inference_py"]["f1"] == 33.3
    assert "32 repeated ids" in capsys.readouterr().err


def test_refusal_from_the_command_line(tmp_path):
    """`python evaluate.py amber --responses EMPTY ...`: one line on stderr, exit status 1."""
    p = subprocess.run([sys.executable, "evaluate.py", "amber", "--responses", responses_file(tmp_path, []),
                        "--annotations", ANNOTATIONS], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1
    assert "no response answers a discriminative question" in p.stderr


def test_queries_say_which_questions_a_file_should_answer(tmp_path, capsys):
    """Only the existence questions answered: a whole dimension, scored as AMBER's existence query file would be;
    but with --queries naming all 30 yes/no questions, 4 of 30 is refused."""
    existence = [r for r in fixture_responses() if 8633 <= r["id"] <= 8636]
    argv = ["amber", "--annotations", ANNOTATIONS, "--responses", responses_file(tmp_path, existence)]
    res = evaluate.main(argv)
    assert res["dimensions"] == ["existence"] and res["all"]["n"] == res["existence"]["n"] == 4
    assert "no responses: attribute, relation" in capsys.readouterr().out
    msg = refusal(argv + ["--queries", os.path.join(FIXTURES, "query.json")])
    assert "4 of 30 discriminative questions (existence, attribute, relation) have a response (13.3%" in msg
