"""The pair filters and text parsing of one round, on hand-made cases."""

from sena.pairs import extract_questions, mentions_name, pair_filter, parse_improved


def test_extract_questions():
    assert extract_questions("QUESTION: What color is the star? It is red.") == "What color is the star?"
    assert extract_questions("What shape is at the top? Where is the red circle?") == (
        "What shape is at the top? Where is the red circle?"
    )
    assert extract_questions("There is a red star.") is None
    assert extract_questions("QUESTION:") is None
    assert extract_questions("  How many objects are there?") == "How many objects are there?"


def test_mentions_name():
    assert mentions_name("What is the name of the shape?")
    assert mentions_name("Name the object?")
    assert not mentions_name("What is the renamed shape?")


def test_parse_improved():
    assert parse_improved("Improved Answer: a red star.") == "a red star."
    assert parse_improved("  Improved Answer:   red ") == "red"
    assert parse_improved("The answer is red.") is None
    assert parse_improved("Improved Answer:") is None


def test_pair_filter_each_rule():
    assert pair_filter("A red star at the top.", "A blue circle.") is None
    assert pair_filter("star " * 31, "circle") == "repetition"
    assert pair_filter("star " * 30, "circle") is None  # 30 repeats are allowed, 31 are not
    assert pair_filter("Red. " * 31, "circle") == "repetition"
    assert pair_filter("?!?!?! a", "circle") == "non_alnum"
    assert pair_filter("red", "red") == "identical"
    assert pair_filter("Yes", "No, there is none.") == "yes_no"
    assert pair_filter("Yes, there is a star.", "No") == "yes_no"
    assert pair_filter("No", "Yes", keep_yes_no=True) is None  # --keep-yes-no: only this rule is lifted
    assert pair_filter("Yes", "Yes", keep_yes_no=True) == "identical"
    assert pair_filter("A small red star.", "RED STAR") == "rejected_in_chosen"
    assert pair_filter("red star", "A small red star.") is None  # chosen inside rejected is allowed
