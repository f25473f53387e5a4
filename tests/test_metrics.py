"""Metric functions on hand-made cases whose answers were worked out on paper."""

import random

import pytest

from sena.metrics import (
    amber_discriminative,
    amber_generative,
    amber_parse,
    amber_printed,
    amber_score,
    binary_metrics,
    chair,
    is_improved,
    is_question,
    is_self_check,
    normalize_answer,
    pope_metrics,
    pope_parse,
    pope_question,
    pope_sample,
    pope_select,
    pope_statistics,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No, there is not a dog in the image.", "no"),
        ("Yes.", "yes"),
        ("Yes", "yes"),
        ("not sure", "no"),
        ("Yes, there is a dog. No other animal is visible.", "yes"),  # only the first sentence counts
        ("There is no dog", "no"),
        ("No", "no"),
        ("No.", "no"),
        ("NO", "yes"),  # the official word test is case-sensitive
        ("Not really", "yes"),  # 'Not' is not in the list, only 'not'
        ("Nope", "yes"),
        ("I cannot see one", "yes"),  # 'cannot' is one word
        ("Yes,no", "yes"),  # commas are deleted, not turned into spaces: 'Yesno'
        ("Yes, no doubt", "no"),
        ("", "yes"),
        ("no\nthere is none", "yes"),  # split on single spaces only: 'no\nthere' is one word
    ],
)
def test_pope_parse(text, expected):
    assert pope_parse(text) == expected


def test_binary_metrics_hand_values():
    # TP: 1,5  FP: 2  TN: 3  FN: 4
    m = binary_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)


def test_pope_metrics_parses_then_scores():
    answers = ["Yes, there is.", "No, there is not.", "There is no cat.", "Yes", "not sure"]
    labels = ["yes", "yes", "no", "no", "no"]  # preds: yes no no yes no -> TP1 FN1 TN2 FP1
    m = pope_metrics(answers, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 2, 1)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5) and m["accuracy"] == pytest.approx(0.6)
    assert m["yes_ratio"] == pytest.approx(0.4)


def test_amber_discriminative_no_is_positive():
    responses = ["No", "No", "Yes", "Yes", "No.", "No"]  # "No." is not exactly "No": wrong, and not a 'No'
    truths = ["no", "yes", "no", "yes", "no", "no"]
    m = amber_discriminative(responses, truths)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 2)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(4 / 7)
    # With 'yes' as positive the same answers give a different F1: the class choice matters.
    yes_pos = binary_metrics(["no", "no", "yes", "yes", "other", "no"], truths, positive="yes")
    assert (yes_pos["tp"], yes_pos["fp"], yes_pos["fn"]) == (1, 1, 1) and yes_pos["f1"] == pytest.approx(0.5)


def test_amber_parse_takes_exact_strings_only():
    # inference.py compares `response == 'Yes'`: spaces, a period or another case make a wrong answer.
    assert [amber_parse(x) for x in ("Yes", "No")] == ["yes", "no"]
    assert {amber_parse(x) for x in (" Yes", "Yes.", "yes", "No\n", "NO", "No, there is not.", "")} == {"other"}


def test_amber_printed_rounds_counts_that_start_at_0001():
    # 15 questions: TP 5, FP 4, FN 5, TN 1. inference.py divides by counts that start at 0.001 and rounds to 0.1:
    # precision 100·5/9.001 = 55.549 -> 55.5 (5/9 would print 55.6); recall 100·5/10.001 = 49.995 -> 50.0;
    # accuracy 100·6/15.001 = 39.997 -> 40.0; F1 = 100·2·0.555·0.5/(0.555 + 0.5 + 0.0001) = 52.60 -> 52.6.
    m = {"n": 15, "tp": 5, "fp": 4, "fn": 5, "tn": 1}
    assert amber_printed([m]) == {"accuracy": 40.0, "precision": 55.5, "recall": 50.0, "f1": 52.6}
    # One right "No": 100·1/1.001 = 99.9, not 100. Attribute sums three counts, so three right "No"s divide by
    # 3.003: 99.9 again; F1 = 100·2·0.999²/(1.998 + 0.0001) = 99.895 -> 99.9.
    one = {"n": 1, "tp": 1, "fp": 0, "fn": 0, "tn": 0}
    assert amber_printed([one]) == amber_printed([one] * 3) == {"accuracy": 99.9, "precision": 99.9,
                                                                 "recall": 99.9, "f1": 99.9}
    # No "No" said and no "no" truth: precision, recall and F1 are 0 (0/0.001) where a plain division would fail;
    # two right "Yes"s: accuracy 100·2/2.001 = 99.950 -> 100.0.
    assert amber_printed([{"n": 2, "tp": 0, "fp": 0, "fn": 0, "tn": 2}]) == {"accuracy": 100.0, "precision": 0.0,
                                                                            "recall": 0.0, "f1": 0.0}


def test_chair_counts_every_mention():
    mentions = [["circle", "square", "square"], ["star"], [], ["moon"]]
    gt = [{"circle"}, {"star", "moon"}, {"heart"}, {"cross"}]
    m = chair(mentions, gt)
    # Mentions: 3 + 1 + 0 + 1 = 5; hallucinated: square x2, moon x1 = 3 (unique-per-caption would give 2/4).
    assert m["chair_i"] == pytest.approx(3 / 5)
    assert m["chair_s"] == pytest.approx(2 / 4)
    # Covered distinct gt objects: circle, star = 2 of 1 + 2 + 1 + 1 = 5.
    assert m["recall"] == pytest.approx(2 / 5)
    assert m["n_mentions"] == 5 and m["n_hallucinated_captions"] == 2


def test_amber_generative_hand_values():
    mentions = [["circle", "square"], ["star", "triangle", "triangle"], ["moon"]]
    gt = [{"circle"}, {"star"}, {"moon", "cross"}]
    prone = [["square"], ["triangle", "heart"], ["cross"]]  # 'cross' is present, so it is not prone
    m = amber_generative(mentions, gt, prone)
    assert m["chair"] == pytest.approx(3 / 6)  # square, triangle, triangle of 6 mentions
    assert m["cover"] == pytest.approx(3 / 4)  # circle, star, moon of circle, star, moon, cross
    assert m["hal"] == pytest.approx(2 / 3)
    assert m["cog"] == pytest.approx(2 / 3)  # prone: square, triangle, heart; named: square, triangle
    assert m["cog_share_of_hallucinated"] == pytest.approx(3 / 3)


def test_amber_score_units():
    # Paper form: (100 - CHAIR% + F1%) / 2 = (100 - 10 + 80) / 2 = 85 points = 0.85 as a fraction.
    assert amber_score(0.10, 0.80) == pytest.approx(0.85)


def test_vqa_accuracy_normalized_exact_match():
    preds = ["Red", "2", "top left.", "circle", "The square", "a red circle"]
    golds = ["red", "two", "top left", "square", "square", "red"]
    types = ["color", "count", "position", "shape", "shape", "color"]
    acc = vqa_accuracy(preds, golds, types)
    assert acc["color"] == {"accuracy": 0.5, "n": 2}
    assert acc["count"]["accuracy"] == 1.0 and acc["position"]["accuracy"] == 1.0
    assert acc["shape"]["accuracy"] == 0.5
    assert acc["overall"]["accuracy"] == pytest.approx(4 / 6)
    assert normalize_answer("The Top-Left!") == "top left"


def test_format_checks():
    assert is_question("What color is the star?")
    assert is_question("  Is there a circle in the image? ")
    assert not is_question("The star is red.")
    assert not is_question("Red?")  # ends with '?' but is not a question
    assert is_self_check("QUESTION: What color is the star?")
    assert not is_self_check("What color is the star?")
    assert not is_self_check("QUESTION: the star")
    assert is_improved("Improved Answer: red")
    assert not is_improved("improved answer: red")


# ---------------------------------------------------------------------------------------------- POPE sampling

HAND = [
    {"image": "A", "objects": ["cat", "dog"]},
    {"image": "B", "objects": ["cat", "dog", "bird"]},
    {"image": "C", "objects": ["cat", "fish"]},
    {"image": "D", "objects": ["dog", "bird", "cow"]},
]


def _negatives(questions):
    return [(q["image"], q["object"]) for q in questions if q["label"] == "no"]


def test_pope_statistics_hand():
    by_freq, by_co = pope_statistics(HAND)
    assert by_freq == ["cat", "dog", "bird", "fish", "cow"]  # 3, 3, 2, 1, 1; ties in first-seen order
    assert by_co["cat"] == ["dog", "bird", "fish"]
    assert by_co["dog"] == ["cat", "bird", "cow"]
    assert by_co["bird"] == ["dog", "cat", "cow"]
    assert by_co["fish"] == ["cat"]


def test_pope_popular_hand():
    qs = pope_sample(HAND, 2, "popular", random.Random(0))
    assert [q["question_id"] for q in qs] == list(range(1, 17))
    assert [q["label"] for q in qs] == ["yes", "no"] * 8
    assert [(q["image"], q["object"]) for q in qs if q["label"] == "yes"] == [
        ("A", "cat"), ("A", "dog"), ("B", "cat"), ("B", "dog"),
        ("C", "cat"), ("C", "fish"), ("D", "dog"), ("D", "bird"),
    ]
    assert _negatives(qs) == [
        ("A", "bird"), ("A", "fish"), ("B", "fish"), ("B", "cow"),
        ("C", "dog"), ("C", "bird"), ("D", "cat"), ("D", "fish"),
    ]
    assert qs[0]["text"] == "Is there a cat in the image?"


def test_pope_adversarial_hand():
    qs = pope_sample(HAND, 2, "adversarial", random.Random(0))
    neg = _negatives(qs)
    # A: cat->bird (dog present), dog->cow (cat present, bird used); B: cat->fish; dog's list exhausted -> random,
    # and cow is the only object left; C: cat->dog; fish's list [cat] exhausted -> random from {bird, cow};
    # D: dog->cat; bird's list [dog, cat, cow] exhausted -> random, fish is the only one left.
    assert neg[:4] == [("A", "bird"), ("A", "cow"), ("B", "fish"), ("B", "cow")]
    assert neg[4] == ("C", "dog") and neg[5][1] in {"bird", "cow"}
    assert neg[6:] == [("D", "cat"), ("D", "fish")]


def test_pope_random_is_uniform_over_allowed_objects():
    counts = {}
    rng = random.Random(1)
    for _ in range(3000):
        qs = pope_sample(HAND, 2, "random", rng)
        for im, obj in _negatives(qs):
            assert obj not in next(h["objects"] for h in HAND if h["image"] == im)
        first = _negatives(qs)[0][1]  # image A: allowed {bird, fish, cow}
        counts[first] = counts.get(first, 0) + 1
    assert set(counts) == {"bird", "fish", "cow"}
    for c in counts.values():
        assert abs(c / 3000 - 1 / 3) < 0.04
    # Within an image the negatives never repeat.
    for im in "ABCD":
        objs = [o for i, o in _negatives(qs) if i == im]
        assert len(objs) == len(set(objs))


def test_pope_select_and_article():
    assert [im["image"] for im in pope_select(HAND, 3, None, random.Random(0))] == ["B", "D"]
    assert len(pope_select(HAND, 2, 3, random.Random(0))) == 3
    assert pope_question("apple") == "Is there an apple in the image?"
    assert pope_question("dog") == "Is there a dog in the image?"
    with pytest.raises(ValueError):
        pope_sample(HAND, 3, "popular", random.Random(0))  # A has only 2 objects


def test_pope_pool_for_small_sets():
    # One image with 3 of 4 seen objects cannot get 3 distinct absent negatives from what it has seen...
    images = [{"image": "A", "objects": ["cat", "dog", "cow"]}, {"image": "B", "objects": ["pig"]}]
    with pytest.raises(ValueError, match="no object left"):
        pope_sample(images[:1] + [{"image": "B", "objects": ["pig", "cat", "dog"]}], 3, "random", random.Random(0))
    # ...but can from the full vocabulary, and the negatives then come from outside the image.
    qs = pope_sample(images[:1], 3, "random", random.Random(0), pool=["cat", "dog", "cow", "pig", "owl", "bee"])
    assert sorted(o for _, o in _negatives(qs)) == ["bee", "owl", "pig"]
