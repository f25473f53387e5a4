"""POPE and AMBER files with a user's image folder: a tiny model answers, the official formats are written, the
scorers read them back, and questions on missing, unreadable or escaping images are skipped and counted."""

import json

import pytest

import evaluate
from sena import amber, pope, tiny
from sena.cli import UserError
from sena.pope import score_pope_files
from sena.world import evaluation

MODEL_ARGS = ["--batch-size", "4", "--max-new-tokens", "5", "--max-new-tokens-short", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    imgs = tiny.images(d / "images", 3)  # img_0.png .. img_2.png
    (d / "images" / "broken.png").write_bytes(b"not a png")
    return d, tiny.model_dir(d / "model"), imgs


@pytest.fixture
def prompts_seen(monkeypatch):
    """Every request the model answers, recorded on its way to the real sena.world.evaluation.answer_requests."""
    seen, real = [], evaluation.answer_requests

    def spy(model, tok, image_cfg, reqs, *a):
        seen.extend(dict(r) for r in reqs)
        return real(model, tok, image_cfg, reqs, *a)

    monkeypatch.setattr(evaluation, "answer_requests", spy)
    return seen


def pope_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pope_answers_written_in_the_official_format_and_scored(setup, prompts_seen, capsys, tmp_path):
    d, model, imgs = setup

    def q(i, im, obj, label):
        return {"question_id": i, "image": im, "text": f"Is there a {obj} in the image?", "label": label}

    rnd = pope_file(tmp_path / "coco_pope_random.json", [
        q(1, "img_0.png", "star", "yes"), q(2, "img_0.png", "circle", "no"), q(3, "img_1.png", "star", "no"),
        q(4, "img_9.png", "star", "yes"), q(5, "broken.png", "star", "no")])
    adv = pope_file(
        tmp_path / "coco_pope_adversarial.json",
        [q(1, "img_0.png", "star", "yes"), q(2, "img_2.png", "square", "yes"), q(3, "../model/config.json", "x", "no")],
    )
    res = evaluate.main(["pope", "--model", model, "--image-dir", imgs, "--questions", rnd, adv,
                  "--out-dir", str(tmp_path / "out"), *MODEL_ARGS])
    out = capsys.readouterr().out
    ans = {s: [json.loads(x) for x in (tmp_path / "out" / f"coco_pope_{s}_answers.jsonl").read_text().splitlines()]
           for s in ("random", "adversarial")}
    # POPE's/SeVa's answer lines exactly, in question order, only for questions whose image could be read.
    assert [a["question_id"] for a in ans["random"]] == [1, 2, 3]
    assert [a["question_id"] for a in ans["adversarial"]] == [1, 2]
    assert all(set(a) == {"question", "answer", "question_id"} and isinstance(a["answer"], str)
               for rows in ans.values() for a in rows)
    assert ans["random"][0]["question"] == "Is there a star in the image?"
    assert ans["random"][0]["answer"] == ans["adversarial"][0]["answer"]  # same image and question: same answer
    # LLaVA-1.5's POPE prompt: the question, a newline, the short-answer instruction; the short token cap.
    suffix = "\nAnswer the question using a single word or phrase."
    assert {r["prompt"] for r in prompts_seen} == {
        f"Is there a {o} in the image?{suffix}" for o in ("star", "circle", "square")
    }
    assert {r["task"] for r in prompts_seen} == {"pope"}
    # The scorer read the written files: answered questions scored, skipped ones counted as missing.
    assert (res["random"]["n"], res["random"]["n_missing"], res["random"]["n_bad"]) == (3, 2, 0)
    assert (res["adversarial"]["n"], res["adversarial"]["n_missing"]) == (2, 1)
    assert res == score_pope_files([rnd, adv], [str(tmp_path / "out" / f"coco_pope_{s}_answers.jsonl")
                                                  for s in ("random", "adversarial")], min_answered=0.5)
    assert (
        "skipped 3 of 8 questions on 3 images: missing 1 (img_9.png); outside the image folder 1 "
        "(../model/config.json); unreadable 1 (broken.png)"
    ) in out
    saved = json.loads((tmp_path / "out" / "pope_metrics.json").read_text())
    assert saved["skipped_images"] == {"img_9.png": "missing", "broken.png": "unreadable",
                                       "../model/config.json": "outside the image folder"}
    assert "mean F1" in out


def test_pope_suffix_not_doubled_for_llava_question_files():
    text = "Is there a cat in the image?\nAnswer the question using a single word or phrase."
    assert pope.with_suffix(text, pope.LLAVA_SHORT_ANSWER) == text
    assert pope.with_suffix("Is there a cat in the image?", "") == "Is there a cat in the image?"


def test_amber_responses_in_the_official_format(setup, prompts_seen, capsys, tmp_path):
    d, model, imgs = setup
    queries = [{"id": 1, "image": "img_0.png", "query": "Describe this image."},
               {"id": 2, "image": "AMBER_2.jpg", "query": "Describe this image."},
               {"id": 1006, "image": "img_1.png", "query": "Is the star red in this image?"},
               {"id": 1005, "image": "img_0.png", "query": "Is there a star in this image?"},
               {"id": 1007, "image": "img_1.png", "query": "Is the star at the top left in this image?"},
               {"id": "x", "image": "img_1.png"}]
    annotations = [{"id": 1, "type": "generative", "truth": ["star"], "hallu": ["dog"]},
                   {"id": 2, "type": "generative", "truth": ["circle"], "hallu": []},
                   {"id": 1005, "type": "discriminative-hallucination", "truth": "no"},
                   {"id": 1006, "type": "discriminative-attribute-state", "truth": "yes"},
                   {"id": 1007, "type": "discriminative-relation", "truth": "no"}]
    (tmp_path / "query_all.json").write_text(json.dumps(queries))
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    res = evaluate.main(["amber", "--model", model, "--image-dir", imgs, "--queries", str(tmp_path / "query_all.json"),
                  "--annotations", str(tmp_path / "annotations.json"), "--out-dir", str(tmp_path / "out"),
                  *MODEL_ARGS])
    out, err = capsys.readouterr()
    responses = json.loads((tmp_path / "out" / "amber_responses.json").read_text())
    # AMBER's inference.py format: a JSON list of {"id", "response"}, by id; AMBER_2.jpg is missing, "x" malformed.
    assert [r["id"] for r in responses] == [1, 1005, 1006, 1007]
    assert all(set(r) == {"id", "response"} and isinstance(r["response"], str) for r in responses)
    assert "skipped 1 of 5 questions on 1 images: missing 1 (AMBER_2.jpg)" in out and "[5]: skipping query" in err
    by_id = {r["id"]: r for r in prompts_seen}
    assert by_id[1]["prompt"] == "Describe this image." and by_id[1]["task"] == "des"  # generative: as written
    assert by_id[1005]["prompt"] == "Is there a star in this image?" + pope.LLAVA_SHORT_ANSWER
    assert by_id[1005]["task"] == "amber"
    assert res["all"]["n"] == 3 and res["n_generative"] == 1 and res["n_unmatched"] == res["n_missing"] == 0
    assert (res["existence"]["n"], res["attribute"]["n"], res["relation"]["n"]) == (1, 1, 1)
    assert json.loads((tmp_path / "out" / "amber_metrics.json").read_text()) == res
    # Scoring the written file on its own gives the same numbers.
    assert evaluate.main(["amber", "--responses", str(tmp_path / "out" / "amber_responses.json"),
                   "--annotations", str(tmp_path / "annotations.json")]) == res


def test_amber_discriminative_scores_by_hand(tmp_path, capsys):
    annotations = [{"id": 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]},
                   {"id": 1005, "type": "discriminative-hallucination", "truth": "no"},
                   {"id": 1006, "type": "discriminative-attribute-number", "truth": "yes"},
                   {"id": 1007, "type": "discriminative-relation", "truth": "no"},
                   {"id": 1008, "type": "relation", "truth": "yes"}]
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    responses = [
        {"id": 1, "response": "A dog."},
        {"id": 1005, "response": "No"},
        {"id": 1006, "response": "No"},
        {"id": 1007, "response": "Yes."},
        {"id": 1008, "response": "Yes"},
        {"id": 4242, "response": "No"},
    ]
    (tmp_path / "r.json").write_text(json.dumps(responses))
    res = amber.score_amber(str(tmp_path / "r.json"), str(tmp_path / "a.json"))
    # "No" is positive. 1005: TP. 1006: FP. 1007: "Yes." is neither Yes nor No (AMBER compares exact strings): FN.
    # 1008 (type "relation", a relation question as in inference.py): TN. So P = 1/2, R = 1/2, F1 = 1/2, accuracy
    # 2/4; printed from counts that start at 0.001: P = 1/2.001 -> 50.0, accuracy 2/4.001 -> 50.0.
    a = res["all"]
    assert (a["n"], a["tp"], a["fp"], a["fn"], a["tn"], a["other"]) == (4, 1, 1, 1, 1, 1)
    assert a["precision"] == a["recall"] == a["f1"] == a["accuracy"] == 0.5
    assert a["inference_py"] == {"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0}
    assert res["existence"]["f1"] == 1.0 and res["attribute"]["f1"] == 0.0 and res["number"]["n"] == 1
    assert (res["relation"]["n"], res["relation"]["accuracy"], res["relation"]["recall"]) == (2, 0.5, 0.0)
    assert res["n_generative"] == 1 and res["n_unmatched"] == 1
    amber.print_amber_table(res)
    assert "1 generative responses not scored here" in capsys.readouterr().out


def test_subcommands_say_what_is_missing(tmp_path):
    with pytest.raises(SystemExit):
        evaluate.main(["pope", "--questions", "q.json"])  # neither answers nor a model
    with pytest.raises(SystemExit):
        evaluate.main(["amber", "--queries", "q.json"])
    with pytest.raises(UserError, match="image folder not found"):
        pope.check_images(["a.jpg"], str(tmp_path / "nowhere"))
