"""Text handling of one SENA round: question extraction, self-enhancement parsing and the pair filters.

All functions are pure and work on strings, so each rule of the released code can be tested on hand-made cases.
"""

import re
from collections import Counter

from sena.prompts import IMPROVED_MARKER, QUESTION_MARKER

# What report.json counts at each stage of a round, in stage order (sena.selfplay; the HTML report's data table).
STAGE_COUNTS = ("images", "images_unreadable", "questions_raw", "self_check_dropped", "self_check_rewritten",
                "questions_name_dropped", "questions_kept", "se_accepted_des", "se_accepted_gen", "candidate_pairs")
FILTERS = ("repetition", "non_alnum", "identical", "yes_no", "rejected_in_chosen")
MAX_REPEATS = 30


def extract_questions(text):
    """Keep the sentences of `text` that end in '?', without a leading 'QUESTION:'; None when there is none.

    "QUESTION: What color is the star? It is red." -> "What color is the star?"
    """
    text = text.strip()
    if text.upper().startswith(QUESTION_MARKER):
        text = text[len(QUESTION_MARKER) :]
    # A sentence is a run of text closed by . ! or ?; only the ones closed by ? are questions.
    questions = [s.strip() for s in re.findall(r"[^.!?]*[.!?]", text) if s.strip().endswith("?")]
    questions = [q for q in questions if len(q) > 1]
    return " ".join(questions) if questions else None


def mentions_name(question):
    """The official code drops questions holding the word 'name' (they ask for facts an image rarely gives)."""
    return re.search(r"\bname\b", question, flags=re.IGNORECASE) is not None


def parse_improved(text):
    """The rewritten answer when the output starts with 'Improved Answer:', else None (the rewrite is refused)."""
    text = text.strip()
    if not text.startswith(IMPROVED_MARKER):
        return None
    answer = text[len(IMPROVED_MARKER) :].strip()
    return answer or None


def _too_repetitive(text):
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    tokens = text.split()
    most = max([0] + list(Counter(sentences).values()) + list(Counter(tokens).values()))
    return most > MAX_REPEATS


def _mostly_symbols(text):
    return sum(not c.isalnum() for c in text) > len(text) / 2


def pair_filter(chosen, rejected, keep_yes_no=False):
    """Name of the first filter a (chosen, rejected) pair fails, or None when the pair is kept.

    In order: an answer repeats a sentence or a token more than 30 times; more than half of an answer's characters
    are not alphanumeric; chosen == rejected; an answer is exactly "Yes" or "No"; the lower-cased rejected answer
    is a substring of the lower-cased chosen answer (the pair then teaches nothing but length). keep_yes_no skips
    the yes/no filter (ours: the released code has no switch for it).
    """
    answers = (chosen, rejected)
    if any(_too_repetitive(a) for a in answers):
        return "repetition"
    if any(_mostly_symbols(a) for a in answers):
        return "non_alnum"
    if chosen == rejected:
        return "identical"
    if not keep_yes_no and any(a.strip() in ("Yes", "No") for a in answers):
        return "yes_no"
    if rejected.lower() in chosen.lower():
        return "rejected_in_chosen"
    return None
