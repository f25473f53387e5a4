"""Benchmark metrics, computed by the rules of the official evaluation code, as plain functions on strings and sets.

Every rate here is a fraction in [0, 1]; tables print them ×100. The sources whose logic is followed:
- POPE: answer parsing and metrics of LLaVA's `llava/eval/eval_pope.py` (same as POPE's own `evaluate.py`);
  negative sampling of POPE's `utils.py` (`pope`, `compute_co_occurrence`, `generate_ground_truth_objects`).
- CHAIR: `chair.py` of Rohrbach et al. (LisaAnne/Hallucination) plus the recall that later forks add.
- AMBER: `inference.py` of AMBER (junyangwang0410/AMBER), generative and discriminative parts.
"""

import re
from collections import Counter

# ---------------------------------------------------------------------------------------------------------- POPE


POPE_SPLITS = ("random", "popular", "adversarial")  # POPE's three negative-sampling strategies


def pope_parse(text):
    """'yes' or 'no' from a free-form answer, by the official POPE/LLaVA rule.

    Keep the text before the first '.', drop commas, split on single spaces; the answer is 'no' when any word is
    exactly 'No', 'not' or 'no' (case-sensitive, so 'NO' or 'Not' do not count), else 'yes'.
    "No, there is not a dog." -> no;  "Yes." -> yes;  "not sure" -> no;  "" -> yes.
    """
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds, labels, positive="yes"):
    """Confusion counts and rates of yes/no predictions against yes/no labels, `positive` being the positive class.

    preds, labels: equal-length lists of 'yes' / 'no' (a prediction may be anything else, e.g. 'other' for an
    unparsable AMBER response: it is never correct and never counts as a positive prediction).
    precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R), accuracy = correct/n, yes_ratio = share of
    predictions equal to 'yes'. An empty denominator gives 0.0 (the official script would divide by zero).
    """
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = correct = 0
    for p, y in zip(preds, labels):
        correct += p == y
        if p == positive:
            tp += y == positive
            fp += y != positive
        else:
            fn += y == positive
            tn += y != positive and p == y
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": correct / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": sum(p == "yes" for p in preds) / n if n else 0.0,
    }


def pope_metrics(answers, labels):
    """POPE metrics (positive = 'yes') of raw answer strings against 'yes'/'no' labels."""
    return binary_metrics([pope_parse(a) for a in answers], [y.strip().lower() for y in labels], positive="yes")


def pope_question(obj, template="Is there a {} in the image?"):
    """POPE's question text: 'a' becomes 'an' before a vowel (the intent of the official a/an rule)."""
    text = template.format(obj)
    return text.replace(f" a {obj}", f" an {obj}") if obj[:1] in "aeiou" else text


def pope_statistics(images):
    """(objects sorted by frequency, {object: co-occurring objects sorted by count}) over `images`, as POPE does.

    images: list of {"image": name, "objects": [distinct object names]}. Ties keep first-seen order (Python's
    sort is stable over insertion-ordered dicts), which is what the official code gets.
    """
    freq, co = {}, {}
    for im in images:
        for o in im["objects"]:
            freq[o] = freq.get(o, 0) + 1
            row = co.setdefault(o, {})
            for other in im["objects"]:
                if other != o:
                    row[other] = row.get(other, 0) + 1
    by_freq = [o for o, _ in sorted(freq.items(), key=lambda kv: kv[1], reverse=True)]
    by_co = {o: [x for x, _ in sorted(row.items(), key=lambda kv: kv[1], reverse=True)] for o, row in co.items()}
    return by_freq, by_co


def pope_sample(images, k, strategy, rng, template="Is there a {} in the image?", pool=None):
    """POPE questions for `images`: per image, its first k objects as 'yes' questions, each followed by a negative.

    images: the already selected images (official: a random sample of those with >= k objects; see
    `pope_select`); frequency and co-occurrence are computed over exactly these images.
    Negatives never repeat within an image and are never in the image:
      random      — uniform over all objects seen in `images` (rejection sampling with rng.choice, as official);
      popular     — the most frequent object overall;
      adversarial — the object that co-occurs most often with *this* positive object;
    popular/adversarial fall back to random when their list runs out. pool: the objects random draws from
    (default, as official: every object seen in `images`; a small world test set passes its full vocabulary, since
    a few images may not hold enough distinct objects). Returns dicts with question_id (from 1), image, text,
    label, object — the official question-file fields plus the object.
    """
    if strategy not in ("random", "popular", "adversarial"):
        raise ValueError(f"unknown POPE strategy {strategy!r}")
    by_freq, by_co = pope_statistics(images)
    pool = list(pool) if pool is not None else by_freq
    questions = []

    def add(image, obj, label):
        questions.append(
            {"question_id": len(questions) + 1, "image": image, "text": pope_question(obj, template),
             "label": label, "object": obj}
        )

    for im in images:
        if len(im["objects"]) < k:
            raise ValueError(f"{im['image']}: {len(im['objects'])} objects, fewer than k={k}")
        used = []
        for pos in im["objects"][:k]:
            used.append(pos)
            add(im["image"], pos, "yes")
            ranked = {"random": [], "popular": by_freq, "adversarial": by_co.get(pos, [])}[strategy]
            neg = next((o for o in ranked if o not in used and o not in im["objects"]), None)
            if neg is None:
                if not any(o not in used and o not in im["objects"] for o in pool):
                    raise ValueError(f"{im['image']}: no object left to ask about as a negative")
                neg = rng.choice(pool)
                while neg in used or neg in im["objects"]:
                    neg = rng.choice(pool)
            used.append(neg)
            add(im["image"], neg, "no")
    return questions


def pope_select(images, k, n, rng):
    """The official image selection: keep images with >= k objects, then rng.sample n of them (all if n is None)."""
    eligible = [im for im in images if len(im["objects"]) >= k]
    if n is None or n >= len(eligible):
        return eligible
    return rng.sample(eligible, n)


# ---------------------------------------------------------------------------------------------------------- CHAIR


def chair(mentions, gt_objects):
    """CHAIR_i, CHAIR_s and recall of object mentions in captions (Rohrbach et al. 2018, official counting).

    mentions:   per caption, the list of canonical objects it mentions, in order, *with repeats* ("a circle and
                another circle" -> ["circle", "circle"]). The official chair.py counts every mention: each
                occurrence adds one to the denominator of CHAIR_i and, if absent from the image, one to the numerator.
    gt_objects: per caption, the set of objects truly in the image.
    CHAIR_i = hallucinated mentions / all mentions          (micro over all captions)
    CHAIR_s = captions with >= 1 hallucinated mention / captions
    recall  = sum_c |distinct mentioned ∩ gt_c| / sum_c |gt_c|   (micro, as the forks that add recall compute it)
    """
    n_mentions = n_hall = n_hall_caps = n_gt = n_covered = 0
    for objs, gt in zip(mentions, gt_objects, strict=True):
        gt = set(gt)
        hallucinated = [o for o in objs if o not in gt]
        n_mentions += len(objs)
        n_hall += len(hallucinated)
        n_hall_caps += bool(hallucinated)
        n_gt += len(gt)
        n_covered += len(set(objs) & gt)
    n = len(mentions)
    return {
        "chair_i": n_hall / n_mentions if n_mentions else 0.0, "chair_s": n_hall_caps / n if n else 0.0,
        "recall": n_covered / n_gt if n_gt else 0.0, "n_captions": n, "n_mentions": n_mentions,
        "n_hallucinated_mentions": n_hall, "n_hallucinated_captions": n_hall_caps,
    }


# ---------------------------------------------------------------------------------------------------------- AMBER


def amber_generative(mentions, gt_objects, prone_objects):
    """AMBER's generative metrics, following inference.py (fractions; AMBER prints them ×100).

    mentions, gt_objects: as for `chair`. prone_objects: per response, AMBER's 'hallu' list — absent objects the
    image invites a model to hallucinate (on the world: the buddies of the present shapes that are not present).
    CHAIR = hallucinated mentions / all mentions (repeats counted, as inference.py counts every extracted noun)
    Cover = sum |distinct mentioned ∩ gt| / sum |gt|
    Hal   = share of responses with >= 1 hallucinated mention
    Cog   = sum |distinct mentioned ∩ prone| / sum |prone|   — inference.py's `hallu_cover_score/hallu_cover_num`:
            the share of hallucination-prone objects that the responses name (not the share of hallucinations that
            are prone; that one is returned as `cog_share_of_hallucinated` for reference).
    """
    c = chair(mentions, gt_objects)
    n_prone = n_prone_hit = n_hall_mentions_prone = 0
    for objs, gt, prone in zip(mentions, gt_objects, prone_objects, strict=True):
        prone = set(prone) - set(gt)
        n_prone += len(prone)
        n_prone_hit += len(set(objs) & prone)
        n_hall_mentions_prone += sum(o in prone for o in objs)
    n_hall = c["n_hallucinated_mentions"]
    return {
        "chair": c["chair_i"], "cover": c["recall"], "hal": c["chair_s"],
        "cog": n_prone_hit / n_prone if n_prone else 0.0,
        "cog_share_of_hallucinated": n_hall_mentions_prone / n_hall if n_hall else 0.0,
    }


def amber_parse(text):
    """'yes' / 'no' for the exact responses 'Yes' / 'No', else 'other': AMBER's inference.py compares strings as they
    are, so 'Yes.', 'yes' and 'No ' are wrong answers there and here (answer files are written stripped)."""
    return {"Yes": "yes", "No": "no"}.get(text, "other")


def amber_discriminative(responses, truths):
    """AMBER discriminative metrics: 'No' is the positive class (the benchmark targets saying no to hallucinations).

    precision = (truth no and answered No) / answered No;  recall = (truth no and answered No) / truth no.
    A response other than exactly 'Yes'/'No' is wrong and not a 'No'. Unrounded fractions; `amber_printed` turns
    the counts into the rounded numbers inference.py prints.
    """
    return binary_metrics([amber_parse(r) for r in responses], [t.strip().lower() for t in truths], positive="no")


def _amber_count(n):
    """inference.py's count of n records: 0.001, then += 1 per record. The float sum is not 0.001 + n in its last
    bits (from n = 4 on); summed the same way, the printed numbers are equal by construction, not by luck."""
    c = 0.001
    for _ in range(n):
        c += 1
    return c


def amber_printed(parts, f1_eps=1e-4):
    """Accuracy, precision, recall and F1 in percent, exactly as AMBER's inference.py prints them for one dimension.

    parts: `amber_discriminative` results, one per count inference.py keeps for the dimension (attribute sums three:
    state, number and action; every other dimension has one). Each count starts at 0.001, so an empty one gives 0
    rather than a division by zero, and a rate is rounded to 0.1 point:
        accuracy  = round(100·correct/Σ(0.001 + n)),  precision = round(100·TP/Σ(0.001 + TP + FP)),
        recall    = round(100·TP/Σ(0.001 + TP + FN)),
        F1        = round(100·2pr/(p + r + ε)) with p, r the *rounded* precision and recall as fractions,
    ε = 1e-4 (inference.py uses 1e-3 for existence). On a perfect 1-of-1 precision this prints 99.9, not 100.
    """

    def pct(num, den):
        return round(sum(num(m) for m in parts) / sum(_amber_count(den(m)) for m in parts) * 100, 1)

    p = pct(lambda m: m["tp"], lambda m: m["tp"] + m["fp"])
    r = pct(lambda m: m["tp"], lambda m: m["tp"] + m["fn"])
    return {
        "accuracy": pct(lambda m: m["tp"] + m["tn"], lambda m: m["n"]), "precision": p, "recall": r,
        "f1": round(2 * (p / 100) * (r / 100) / ((p / 100) + (r / 100) + f1_eps) * 100, 1),
    }


def amber_score(chair_rate, f1):
    """AMBER score = (100 − CHAIR% + F1%) / 2 in percent points; here with fractions: (1 − chair + f1) / 2 ∈ [0, 1]."""
    return (1.0 - chair_rate + f1) / 2.0


# ------------------------------------------------------------------------------------------------------------ VQA

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text):
    """VQA-style normalization: lower-case, punctuation to spaces, digits to number words, articles dropped."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    words = [NUMBER_WORDS[int(w)] if w.isdigit() and int(w) <= 10 else w for w in text.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def vqa_accuracy(preds, golds, types):
    """Normalized exact-match accuracy per question type and overall (one gold answer, so VQA's min(n/3, 1) is 0/1).

    Returns {type: {"accuracy", "n"}, ..., "overall": {"accuracy", "n"}}.
    """
    hits, counts = Counter(), Counter()
    for p, g, t in zip(preds, golds, types, strict=True):
        ok = normalize_answer(p) == normalize_answer(g)
        for key in (t, "overall"):
            hits[key] += ok
            counts[key] += 1
    keys = [k for k in counts if k != "overall"] + ["overall"] * bool(counts)
    return {k: {"accuracy": hits[k] / counts[k], "n": counts[k]} for k in keys}


def answer_values(text, vocab):
    """The distinct phrases of `vocab` that `text` names as whole words (longest first, so 'top left' is not 'top')."""
    text, found = f" {normalize_answer(text)} ", []
    for v in sorted(vocab, key=len, reverse=True):
        if f" {v} " in text:
            found.append(v)
            text = text.replace(f" {v} ", " | ")
    return found


def answer_correct(pred, gold, vocab=()):
    """Lenient correctness of a sentence answer (e.g. a self-enhanced one) against a short gold answer.

    yes/no gold: the POPE parse of pred equals it. Otherwise: normalized exact match, or the only phrase of `vocab`
    (the answer set of the question's type) that pred names is the gold one. "The star is red." is right for
    'red'; "red and blue" is not.
    """
    g = normalize_answer(gold)
    if g in ("yes", "no"):
        return pope_parse(pred) == g
    return normalize_answer(pred) == g or answer_values(pred, vocab) == [g]


# ------------------------------------------------------------------------------------------------ format following

QUESTION_WORDS = {
    "is", "are", "was", "were", "do", "does", "did", "can", "could", "what", "which", "where", "how", "who",
    "whose", "why", "when", "whom", "has", "have", "will", "would", "should", "in", "on",
}


def is_question(text):
    """A SENA self-question: ends with '?' and opens with a question word ('What ...?', 'Is ...?', 'In which ...?')."""
    text = text.strip()
    words = text.split()
    return text.endswith("?") and bool(words) and words[0].lower().strip(",") in QUESTION_WORDS


def is_self_check(text, marker="QUESTION:"):
    """A well-formed self-check output: starts with the marker and holds a '?'."""
    text = text.strip()
    return text.startswith(marker) and "?" in text


def is_improved(text, marker="Improved Answer:"):
    """A well-formed self-enhancement output: starts with the marker (the only form SENA accepts)."""
    return text.strip().startswith(marker)


def rate(flags):
    """Share of true values (0.0 for an empty list)."""
    flags = list(flags)
    return sum(map(bool, flags)) / len(flags) if flags else 0.0
