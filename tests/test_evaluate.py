"""evaluate.py: the POPE answer-file scorer on the real fixture files, bad-line handling, the world benchmarks with
scripted answerers whose scores are known, side-by-side comparison, and the data-side pair measures."""

import json
import os
from pathlib import Path

import pytest

import evaluate
from sena import cli, prompts
from sena.cli import UserError
from sena.pope import score_pope_files
from sena.world import evaluation
from sena.world.language import describe, oracle_answer
from sena.world.scenes import absent_buddies, sample_scenes

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pope")
SPLITS = ("random", "popular", "adversarial")


def _fixture_paths():
    qs = [os.path.join(FIXTURES, f"coco_pope_{s}.json") for s in SPLITS]
    ans = [os.path.join(FIXTURES, f"seva_answers_{s}.jsonl") for s in SPLITS]
    return qs, ans


def _official(question_file, answer_file):
    """The official eval_pope.py procedure written out literally: file order, zip, first sentence, word test."""
    labels = [json.loads(line)["label"] for line in Path(question_file).read_text().splitlines()]
    preds = []
    for line in Path(answer_file).read_text().splitlines():
        text = json.loads(line)["answer"]
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        preds.append("no" if ("No" in words or "not" in words or "no" in words) else "yes")
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(preds, labels))
    return tp, fp, tn, fn


def test_pope_scorer_on_fixture_files(capsys):
    qs, ans = _fixture_paths()
    res = evaluate.main(["pope", "--questions", *qs, "--answers", *ans])
    out = capsys.readouterr().out
    # Counts pinned from this scorer and cross-checked against the literal official procedure.
    pinned = {"random": (1280, 87, 1413, 220), "popular": (1280, 156, 1344, 220), "adversarial": (1280, 274, 1226, 220)}
    for q, a, split in zip(qs, ans, SPLITS):
        m = res[split]
        assert (m["tp"], m["fp"], m["tn"], m["fn"]) == pinned[split] == _official(q, a)
        assert m["n"] == 3000 and m["n_bad"] == 0 and m["n_missing"] == 0 and m["n_unmatched"] == 0
        tp, fp, tn, fn = pinned[split]
        p, r = tp / (tp + fp), tp / (tp + fn)
        assert m["f1"] == pytest.approx(2 * p * r / (p + r), abs=1e-12)
        assert m["accuracy"] == pytest.approx((tp + tn) / 3000, abs=1e-12)
        assert m["yes_ratio"] == pytest.approx((tp + fp) / 3000, abs=1e-12)
        assert split in out
    assert res["mean_f1"] == pytest.approx(sum(res[s]["f1"] for s in SPLITS) / 3)
    assert round(100 * res["mean_f1"], 2) == 86.77
    assert "mean F1" in out


def test_pope_scorer_bad_lines(tmp_path, capsys):
    q = tmp_path / "coco_pope_random.json"
    a = tmp_path / "answers.jsonl"
    q.write_text(
        '{"question_id": 1, "image": "x.jpg", "text": "Is there a cat in the image?", "label": "yes"}\n'
        "{not json\n"
        '{"question_id": 2, "image": "x.jpg", "text": "Is there a dog in the image?", "label": "maybe"}\n'
        '{"question_id": 3, "image": "x.jpg", "text": "Is there a cow in the image?", "label": "no"}\n'
        "\n"
        '{"question_id": 4, "image": "x.jpg", "text": "Is there a pig in the image?", "label": "no"}\n'
    )
    a.write_text(
        '{"question_id": 1, "answer": "Yes, there is a cat."}\n'
        '{"question_id": 3, "text": "No, there is not."}\n'  # LLaVA's 'text' field is accepted
        '{"question_id": 3, "answer": "Yes"}\n'  # repeated id: the first one counts
        '{"question_id": 9}\n'
        "[1, 2]\n"
    )
    res = score_pope_files([str(q)], [str(a)], min_answered=0.5)
    err = capsys.readouterr().err
    assert f"{q}:2: skipping malformed line (not valid JSON" in err
    assert f"{q}:3: skipping malformed line (label 'maybe' is not yes/no)" in err
    assert f"{a}:4: skipping malformed line (no string 'answer'" in err
    assert f"{a}:5: skipping malformed line (not a JSON object)" in err
    assert f"{a}:3: skipping malformed line (repeats question_id 3)" in err
    m = res["random"]
    assert m["n_bad"] == 5 and m["n_duplicate"] == 1  # 2 question lines, 2 answer lines, 1 repeated id
    assert m["n"] == 2 and m["n_missing"] == 1  # question 4 has no answer
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 0, 1, 0)
    assert "left out of the metrics: 1 questions without an answer, 0 answers to no question, 1 repeated" in err


def _copy_answers(tmp_path, split, edit):
    """A copy of the fixture's answer file for `split`, its records passed through edit(list) -> list."""
    qs, ans = _fixture_paths()
    i = SPLITS.index(split)
    with open(ans[i]) as f:
        recs = [json.loads(line) for line in f]
    out = tmp_path / f"answers_{split}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in edit(recs)))
    return qs[i], str(out)


def _refusal(argv):
    """The one line evaluate.py exits with (through cli.run, as on the command line)."""
    with pytest.raises(SystemExit) as e:
        cli.run(evaluate.main, argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_pope_files_that_would_mislead_are_refused_with_one_line(tmp_path, capsys):
    """Ids removed, changed, duplicated, swapped files, an empty or missing file, splits out of order: each is
    counted and printed, or refused, never scored silently."""
    q, a = _copy_answers(tmp_path, "random", lambda r: r[:-30] + r[:5])  # 30 unanswered, 5 lines repeated
    m = evaluate.main(["pope", "--questions", q, "--answers", a])["random"]
    assert (m["n"], m["n_missing"], m["n_duplicate"], m["n_bad"], m["n_unmatched"]) == (2970, 30, 5, 5, 0)
    assert "left out of the metrics: 30 questions without an answer, 0 answers to no question, 5 repeated" in \
        capsys.readouterr().err
    # Half the ids changed: the answered half alone scores another F1 than the split's; refused by default.
    q, a = _copy_answers(tmp_path, "random", lambda r: [dict(x, question_id=x["question_id"] + 10**6 * (i % 2))
                                                        for i, x in enumerate(r)])
    msg = _refusal(["pope", "--questions", q, "--answers", a])
    assert "1500 of 3000 questions have an answer (50.0% < --min-answered 95%)" in msg
    assert "1500 with a question_id of no question" in msg
    m = evaluate.main(["pope", "--questions", q, "--answers", a, "--min-answered", "0.5"])["random"]  # asked: scored
    assert (m["n"], m["n_missing"], m["n_unmatched"]) == (1500, 1500, 1500) and round(100 * m["f1"], 2) == 92.09
    q, a = _copy_answers(tmp_path, "random", lambda r: [dict(x, question_id=x["question_id"] + 10**6) for x in r])
    assert "0 of 3000 questions have an answer" in _refusal(["pope", "--questions", q, "--answers", a])
    q, a = _copy_answers(tmp_path, "random", lambda r: [])  # an empty answer file
    assert "0 of 3000 questions have an answer (0.0% < --min-answered 95%); 0 valid answer lines" in \
        _refusal(["pope", "--questions", q, "--answers", a])
    q, a = _copy_answers(tmp_path, "random", lambda r: r)
    assert "swapped" in _refusal(["pope", "--questions", a, "--answers", q])
    assert f"--answers file not found: {a}x" in _refusal(["pope", "--questions", q, "--answers", a + "x"])
    # The popular split's answers given for the random questions: the same ids, other questions.
    qs, ans = _fixture_paths()
    msg = _refusal(["pope", "--questions", *qs, "--answers", ans[1], ans[0], ans[2]])
    assert "split random" in msg and "answers were given to other questions" in msg and "order of --questions" in msg
    capsys.readouterr()


# ------------------------------------------------------------------------------------------- world benchmarks

SCENES = sample_scenes(40, seed=7, prefix="test")
BY_IMAGE = {sc["image"]: sc for sc in SCENES}


def _answerer(short, des):
    def answer(reqs):
        for r in reqs:
            sc = BY_IMAGE[r["image"]]
            r["answer"] = {
                "ask": "How many objects are there?",
                "self_check": "QUESTION: How many objects are there?",
                "improve": "Improved Answer: two",
                "des": des(sc),
            }.get(r["task"]) or short(sc, r)

    return answer


def _perfect_short(sc, r):
    return oracle_answer(sc, r["text"])


def _hallucinated_description(sc):
    extra = [{"shape": b, "color": "red", "size": "small", "pos": "center"} for b in absent_buddies(sc)]
    return describe(sc | {"objects": sc["objects"] + extra})


def test_world_benchmarks_perfect_answerer():
    m, reqs = evaluation.run_benchmarks(SCENES, _answerer(_perfect_short, describe), seed=0, pope_k=3)
    s = evaluation.summary(m)
    for key in ("pope_random_acc", "pope_adversarial_f1", "chair_recall", "amber_cover", "amber_f1_all", "amber_score",
                "vqa_overall", "open_next_to_acc", "fmt_ask_question", "fmt_self_check", "fmt_improve", "des_exact"):
        assert s[key] == 1.0, key
    assert s["chair_i"] == s["chair_s"] == s["amber_hal"] == s["amber_cog"] == s["open_absent"] == 0.0
    assert m["open"]["n"] > 0
    for split in SPLITS:  # POPE is balanced by construction and only uses scenes with >= 3 objects
        assert s[f"pope_{split}_yes"] == 0.5
        assert m["pope"][split]["n"] == 6 * sum(len(sc["objects"]) >= 3 for sc in SCENES)
    assert {r["task"] for r in reqs} == {"pope", "amber", "vqa", "open", "des", "ask", "self_check", "improve"}


def test_world_benchmarks_yes_sayer_and_hallucinating_describer():
    yes_sayer = _answerer(lambda sc, r: "Yes", _hallucinated_description)
    m, _ = evaluation.run_benchmarks(SCENES, yes_sayer, seed=0, pope_k=3)
    for split in SPLITS:
        p = m["pope"][split]
        assert (p["yes_ratio"], p["recall"], p["precision"], p["accuracy"]) == (1.0, 1.0, 0.5, 0.5)
    assert m["amber"]["discriminative"]["all"]["f1"] == 0.0  # 'No' is the positive class and never said
    n_hall = sum(len(absent_buddies(sc)) for sc in SCENES)
    n_all = sum(len(sc["objects"]) for sc in SCENES) + n_hall
    assert m["chair"]["chair_i"] == pytest.approx(n_hall / n_all)
    assert m["chair"]["chair_s"] == pytest.approx(sum(bool(absent_buddies(sc)) for sc in SCENES) / len(SCENES))
    assert m["amber"]["generative"]["cog"] == 1.0 and m["amber"]["generative"]["cover"] == 1.0
    assert m["amber"]["score"] == pytest.approx((1 - n_hall / n_all + 0.0) / 2)
    assert m["format"]["des_exact"] == pytest.approx(sum(not absent_buddies(sc) for sc in SCENES) / len(SCENES))


@pytest.mark.parametrize("rewrite, after", [("Improved Answer: two", 0.0), ("I can't.", 1.0), ("gold", 1.0)])
def test_self_enhancement_correctness(rewrite, after):
    """improve_*_correct: the colour answer before the rewrite, and after it (a refused rewrite keeps the answer)."""
    base = _answerer(_perfect_short, describe)

    def answer(reqs):
        base(reqs)
        for r in reqs:
            if r["task"] == "improve":
                r["answer"] = f"Improved Answer: The shape is {r['gold']}." if rewrite == "gold" else rewrite

    m, reqs = evaluation.run_benchmarks(SCENES, answer, seed=0, pope_k=3)
    improve = [r for r in reqs if r["task"] == "improve"]
    assert len(improve) == len(SCENES) and all(r["prompt"].count(prompts.GEN_SUFFIX.strip()) == 1 for r in improve)
    assert m["format"]["improve_before_correct"] == 1.0
    assert m["format"]["improve_after_correct"] == after


def test_compare_prints_deltas(tmp_path, capsys):
    for name, short in (("theta0", lambda sc, r: "Yes"), ("iter_1", _perfect_short)):
        m, _ = evaluation.run_benchmarks(SCENES, _answerer(short, describe))
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    evaluate.main(["--compare", str(tmp_path / "theta0"), str(tmp_path / "iter_1" / "metrics.json")])
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert "theta0" in lines["metric"] and "iter_1" in lines["metric"]
    assert lines["pope_random_acc"].split()[1:] == ["50.00", "100.00", "(+50.00)"]
    assert lines["amber_f1_all"].split()[1:] == ["0.00", "100.00", "(+100.00)"]


def test_score_pairs_hand_case():
    scene = {"image": "s1.png", "objects": [
        {"shape": "circle", "color": "red", "size": "small", "pos": "top left", "row": 0, "col": 0},
        {"shape": "star", "color": "blue", "size": "large", "pos": "center", "row": 1, "col": 1}]}
    star_q = "Is there a star in the image?"
    pairs = [
        {"type": "gen", "image": "pool/s1.png", "question_raw": "What color is the square?",
         "question": "What color is the circle?", "chosen": "The circle is red.", "rejected": "blue"},
        {"type": "des", "image": "pool/s1.png", "question_raw": "What color is the square?",
         "question": "What color is the circle?", "chosen": describe(scene),
         "rejected": "There is a red circle and a square."},
        {"type": "gen", "image": "s1.png", "question_raw": star_q, "question": star_q,
         "chosen": "Yes, there is a blue star.", "rejected": "Yes"},
        {"type": "des", "image": "s1.png", "question_raw": star_q, "question": star_q,
         "chosen": "A red circle and a blue star.", "rejected": "There is a red circle."},
        {"type": "gen", "image": "s1.png", "question_raw": "How many objects are there?",
         "question": "Where is the green moon?", "chosen": "center", "rejected": "top"},
        {"type": "gen", "image": "s1.png", "question_raw": "What color is the star?",
         "question": "What color is the star?", "chosen": "red and blue", "rejected": "blue"},
        {"type": "gen", "image": "other.png", "question_raw": "x?", "question": "x?", "chosen": "a", "rejected": "b"},
    ]
    d = evaluation.score_pairs(pairs, {"s1.png": scene})
    assert d["n_pairs"] == 7 and d["n_missing_scene"] == 1 and d["n_questions"] == 4
    assert d["question_raw_answerable"] == pytest.approx(3 / 4)  # the square question is not answerable
    assert d["question_answerable"] == pytest.approx(3 / 4)  # the green moon is not there
    # gen scored on answerable questions: circle (right / wrong), star exists (right / right), star colour
    # ('red and blue' names two colours: not right / 'blue' is right).
    assert d["n_gen_scored"] == 3
    assert d["gen_chosen_correct"] == pytest.approx(2 / 3) and d["gen_rejected_wrong"] == pytest.approx(1 / 3)
    assert d["n_des"] == 2 and d["des_chosen_correct"] == 1.0 and d["des_rejected_wrong"] == pytest.approx(1 / 2)
    assert d["chosen_correct"] == pytest.approx(4 / 5) and d["rejected_wrong"] == pytest.approx(2 / 5)
    assert d["se_des"]["buddy"] == {"raw": 0, "fixed": 0, "introduced": 0}  # no pair carries an accepted rewrite


def test_score_pairs_counts_what_self_enhancement_fixed():
    """Description pairs whose rewrite was accepted: errors of the raw answer (bench.description_errors) that the
    rewrite removed, and errors it added, per kind. Scene: a small red circle (top left), a large blue star (center)."""
    scene = {"image": "s1.png", "objects": [
        {"shape": "circle", "color": "red", "size": "small", "pos": "top left", "row": 0, "col": 0},
        {"shape": "star", "color": "blue", "size": "large", "pos": "center", "row": 1, "col": 1}]}  # fmt: skip
    gold = describe(scene)
    phantom = "There is a small red circle at the top left, a large blue star in the center and a small red square."
    wrong = "There is a small green circle at the top left and a large blue star in the center."
    pairs = [  # the square is the circle's absent buddy; a moon is another absent shape
        {"type": "des", "image": "s1.png", "chosen_raw": phantom, "chosen": gold, "se_accepted": True},
        {"type": "des", "image": "s1.png", "chosen_raw": wrong, "chosen": gold, "se_accepted": True},
        {"type": "des", "image": "s1.png", "chosen_raw": gold, "chosen": "There is a large blue star and a moon.",
         "se_accepted": True},
        {"type": "des", "image": "s1.png", "chosen_raw": phantom, "chosen": phantom, "se_accepted": False},
    ]
    for p in pairs:
        p |= {"rejected": "There is a star.", "prompt": "x"}
    se = evaluation.score_pairs(pairs, {"s1.png": scene})["se_des"]
    assert se["buddy"] == {"raw": 1, "fixed": 1, "introduced": 0}  # the refused rewrite is not counted
    assert se["attribute"] == {"raw": 1, "fixed": 1, "introduced": 0}  # the green circle
    assert se["other"] == {"raw": 0, "fixed": 0, "introduced": 1}  # the moon
    assert se["missing"] == {"raw": 0, "fixed": 0, "introduced": 1}  # the circle dropped


def test_main_end_to_end_tiny_model(tmp_path, capsys):
    """A tiny random LLaVA with the world tokenizer: greedy answers for every benchmark, metrics.json written."""
    from sena.checkpoint import save_pretrained
    from sena.image import default_image_cfg
    from sena.model import Llava, ModelConfig, TextConfig, VisionConfig
    from sena.world.render import render
    from sena.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = ModelConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            image_size=24, patch_size=8),
        text=TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1),
        image_token_index=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    save_pretrained(Llava(cfg), str(tmp_path / "model"), tokenizer=tok, image_cfg=default_image_cfg(24))
    test_dir = tmp_path / "world_test"
    test_dir.mkdir()
    scenes = sample_scenes(4, seed=3, prefix="test")
    for sc in scenes:
        render(sc).save(test_dir / sc["image"])
    (tmp_path / "world_test_labels.jsonl").write_text("".join(json.dumps(sc) + "\n" for sc in scenes))
    m = evaluate.main(["--model", str(tmp_path / "model"), "--test-dir", str(test_dir), "--batch-size", "16",
                "--max-new-tokens", "6", "--max-new-tokens-short", "3", "--device", "cpu"])
    saved = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert saved["meta"]["n_scenes"] == 4 and saved["pope"]["mean_f1"] == m["pope"]["mean_f1"]
    # rates; des_words counts words
    assert all(0.0 <= v <= 1.0 for k, v in evaluation.summary(saved).items() if k not in evaluation.WORDS)
    answers = [json.loads(line) for line in (tmp_path / "model" / "eval_answers.jsonl").read_text().splitlines()]
    assert len(answers) > 50 and all(isinstance(r["answer"], str) for r in answers)
    # Greedy decoding: the same (image, prompt) always gets the same answer, whichever task asked it.
    seen = {}
    for r in answers:
        assert seen.setdefault((r["image"], r["prompt"]), r["answer"]) == r["answer"]
    assert "pope_mean_f1" in capsys.readouterr().out


def test_test_split_written_once_and_never_overwritten(tmp_path):
    d = tmp_path / "test"
    scenes, labels = evaluation.load_test_scenes(str(d), None, 3, 5)
    assert labels == str(tmp_path / "test_labels.jsonl") and len(scenes) == 3
    assert sorted(os.listdir(d)) == sorted(sc["image"] for sc in scenes)  # images only in the folder
    again, _ = evaluation.load_test_scenes(str(d), None, 99, 6)  # present: read back, not rewritten
    assert again == scenes
    # What a kill leaves while the split is written (its labels come last): the split's images and no labels. It is
    # finished, not refused.
    os.remove(labels)
    os.remove(d / scenes[-1]["image"])
    assert evaluation.load_test_scenes(str(d), None, 3, 5) == (scenes, labels)
    assert sorted(os.listdir(d)) == sorted(sc["image"] for sc in scenes)
    # A folder that holds anything else and no labels is not the split: refused, nothing in it touched.
    os.remove(labels)
    (d / "mine.png").write_bytes(b"a user's image")
    with pytest.raises(UserError, match=f"^{d} holds 1 file\\(s\\) that are not the images of this split \\(mine.png"):
        evaluation.load_test_scenes(str(d), None, 3, 5)
    assert (d / "mine.png").read_bytes() == b"a user's image" and not os.path.exists(labels)
