"""The world benchmarks: every question asked of a model on held-out world scenes, and their scores.

POPE random/popular/adversarial, CHAIR_i/CHAIR_s/recall and AMBER generative on descriptions, AMBER discriminative
F1 (existence, attribute, relation; "No" positive) and AMBER score, VQA accuracy per type, open answers that name an
object ("What is next to the star?": right, or naming an absent shape), and the format-following rates of SENA's own
prompts; also the data-side measures of a round's pairs (score_pairs). One belief about what is in the image is read
out three ways here: descriptions (CHAIR), yes/no answers (POPE, AMBER) and open answers. evaluate.py is the
command line over these; the θ0 build scores the model it made with them.

Descriptions use DESCRIBE_PROMPTS round-robin over the scenes (scene i gets prompt i mod 11) + DES_SUFFIX: SENA's
des pairs draw from all eleven, so the benchmark measures the same distribution it trains on. All rates are
fractions.
"""

import json
import os
import re
from collections import Counter

from sena import metrics as M
from sena import prompts as P
from sena import seeds
from sena.pairs import extract_questions, parse_improved
from sena.world.language import (
    DES_ORDERS,
    NUMBERS,
    RELATIONS,
    SYNONYMS,
    TEMPLATES,
    describe,
    mentioned_shapes,
    oracle_answer,
    question,
    question_type,
    where,
)
from sena.world.scenes import BUDDIES, COLORS, POSITIONS, SHAPES, absent_buddies, neighbours

SPLITS = M.POPE_SPLITS
LOWER_IS_BETTER = ("chair_i", "chair_s", "amber_chair", "amber_hal", "amber_cog")
# Summary rows that are counts (words per description, question types asked); every other row is a fraction, shown
# in %.
WORDS = ("des_words", "sq_types")


def shown(key, v):
    """A summary value as tables print it: fractions in %, counts as they are."""
    return v if key in WORDS else 100 * v


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
    for dim in ("existence", "attribute", "relation"):  # AMBER's answers are "yes"/"no"/other; "No" is its positive
        s[f"amber_yes_{dim}"] = m["amber"]["discriminative"][dim]["yes_ratio"]
    s["amber_score"] = m["amber"]["score"]
    s.update({f"vqa_{t}": v["accuracy"] for t, v in m["vqa"].items()})
    s.update({f"open_{k}": v for k, v in m["open"].items() if k != "n"})
    s.update(m["format"])
    # The self-asked questions: how many types make up at least 2% of them, and the largest type's share.
    types = m["ask_types"]
    n = max(1, sum(types.values()))
    s["sq_types"] = sum(c / n >= 0.02 for t, c in types.items() if t != "other")
    s["sq_top_type"] = max(types.values(), default=0) / n
    return s


def present_shapes(scene):
    return {o["shape"] for o in scene["objects"]}


# One object phrase of a world description: "a small red circle at the top left" -> size, colour, shape, place.
_PLACES = sorted({where(p) for p in POSITIONS}, key=len, reverse=True)
_PHRASE = re.compile(rf"\ba (small|large) ([a-z]+) ([a-z]+) ({'|'.join(_PLACES)})")


def description_errors(text, scene) -> dict:
    """The errors of one description against its scene, as sets of shapes: absent buddies of present shapes that
    it names (the co-occurrence prior's guess), other absent shapes it names, present shapes named with a wrong
    size, colour or place, and present shapes it leaves out."""
    present = {o["shape"]: o for o in scene["objects"]}
    named = mentioned_shapes(text)
    buddies = set(absent_buddies(scene))
    wrong = {shape for size, color, shape, place in _PHRASE.findall(text)
             if shape in present and (size, color, place) != (present[shape]["size"], present[shape]["color"],
                                                               where(present[shape]["pos"]))}
    return {"buddy": {s for s in named if s in buddies}, "other": {s for s in named if s not in present} - buddies,
            "attribute": wrong, "missing": set(present) - set(named)}


def shape_mentions(text):
    """Every word that names a shape, repeats kept (CHAIR counts each mention), via the world's synonym table."""
    table = {w: s for s, ws in SYNONYMS.items() for w in ws}
    return [table[w] for w in re.findall(r"[a-z]+", text.lower()) if w in table]


def build_requests(scenes, seed, pope_k):
    """Every benchmark question on the scenes: dicts with task, image, prompt (user text), gold and grouping keys."""
    rng = seeds.rng(seed, "requests")
    reqs = []
    exist_t = TEMPLATES["exist"].replace("{shape}", "{}")
    images = [{"image": sc["image"], "objects": [o["shape"] for o in sc["objects"]]} for sc in scenes]
    chosen = M.pope_select(images, pope_k, None, seeds.rng(seed, "pope"))
    for split in SPLITS:
        for q in M.pope_sample(chosen, pope_k, split, seeds.rng(seed, "pope", split), exist_t, SHAPES):
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
        with_one = [o for o in sc["objects"] if len(neighbours(sc, o)) == 1]
        if with_one:  # an open answer that names an object: right, wrong, or naming a shape that is not there
            q = question("next_to", shape=rng.choice(with_one)["shape"])
            reqs.append({"task": "open", "split": "next_to", "image": sc["image"], "prompt": q + P.GEN_SUFFIX,
                         "gold": oracle_answer(sc, q), "text": q})
        reqs.append({"task": "des", "split": "des", "image": sc["image"],
                     "gold": describe(sc), "gold_orders": [describe(sc, o) for o in DES_ORDERS],
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
    opened = pick("open")
    named = [(mentioned_shapes(r["answer"]), by_image[r["image"]]) for r in opened]
    fmt = {
        "fmt_ask_question": M.rate(M.is_question(r["answer"]) for r in pick("ask")),
        "fmt_self_check": M.rate(M.is_self_check(r["answer"]) for r in pick("self_check")),
        "fmt_improve": M.rate(M.is_improved(r["answer"]) for r in pick("improve")),
        "sq_answerable_raw": M.rate(oracle_answer(by_image[r["image"]], r["answer"]) is not None
                                    for r in pick("ask")),
        "sq_answerable_checked": M.rate(r["question"] is not None and oracle_answer(by_image[r["image"]],
                                        r["question"]) is not None for r in pick("self_check")),
        "des_exact": M.rate(r["answer"].strip() in r["gold_orders"] for r in des),  # either order a θ0 may use
        "des_words": sum(len(r["answer"].split()) for r in des) / max(1, len(des)),  # descriptions must not shrink
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
        # The greedy self-asked questions by type (None: not a world template): SQ needs a variety to work with.
        "ask_types": dict(Counter(question_type(r["answer"]) or "other" for r in pick("ask")).most_common()),
        "open": {"n": len(opened),
                 "next_to_acc": M.rate(M.answer_correct(r["answer"], r["gold"], SHAPES) for r in opened),
                 "absent": M.rate(any(s not in present_shapes(sc) for s in ss) for ss, sc in named),
                 "absent_buddy": M.rate(any(s in absent_buddies(sc) for s in ss) for ss, sc in named)},
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
            out.append({"task": "improve", "split": "improve", "image": r["image"], "gold": r["gold"],
                        "before": a, "prompt": P.improve_prompt(d, q, a)})  # fmt: skip
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
    The mechanism SENA relies on shows in des_{chosen,rejected}_{buddies,others}: how many absent buddies of present
    shapes (the co-occurrence prior's guesses) and how many other absent shapes the descriptions name, each mention
    counted. Where the noise removes evidence and the prior fills the gap, rejected names far more buddies.
    se_des: what self-enhancement did to the description pairs whose rewrite was accepted, per kind of error
    (description_errors): errors in the raw answer, fixed by the rewrite, and introduced by it.
    """
    vocab = {"color": COLORS, "shape": SHAPES, "count": NUMBERS, "position": POSITIONS}
    questions, gen_c, gen_r, des_c, des_r, missing = {}, [], [], [], [], 0
    se = {kind: dict.fromkeys(("raw", "fixed", "introduced"), 0) for kind in ("buddy", "other", "attribute", "missing")}
    named = dict.fromkeys(("des_chosen_buddies", "des_rejected_buddies", "des_chosen_others", "des_rejected_others"), 0)
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
            buddies = set(absent_buddies(sc))
            for side in ("chosen", "rejected"):
                absent = [s for s in shape_mentions(p[side]) if s not in present]
                named[f"des_{side}_buddies"] += sum(s in buddies for s in absent)
                named[f"des_{side}_others"] += sum(s not in buddies for s in absent)
            if p.get("se_accepted") and p.get("chosen_raw") is not None:
                raw, after = description_errors(p["chosen_raw"], sc), description_errors(p["chosen"], sc)
                for kind, counts in se.items():
                    counts["raw"] += len(raw[kind])
                    counts["fixed"] += len(raw[kind] - after[kind])
                    counts["introduced"] += len(after[kind] - raw[kind])
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
        "des_chosen_correct": M.rate(des_c), "des_rejected_wrong": M.rate(des_r), "n_des": len(des_c), **named,
        "se_des": se,
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


def load_answerer(model_dir, image_dir, settings):
    """(answer_fn, device): greedy answers from the model in model_dir on images under image_dir (answer_requests),
    as settings (sena.settings.AnswerSettings) say."""
    import torch

    from sena.checkpoint import load_pretrained

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, image_cfg = load_pretrained(model_dir, dtype=getattr(torch, settings.dtype), device=device,
                                            need_tokenizer=True)
    model.eval()
    caps = {True: settings.max_new_tokens_short, False: settings.max_new_tokens}
    return lambda rs: answer_requests(model, tok, image_cfg, rs, image_dir, settings.batch_size, caps), device


def load_test_scenes(test_dir, labels, n, seed):
    """The held-out scenes and their labels path. Labels live outside the image folder, at `labels` or by default
    <test_dir>_labels.jsonl (the world's convention; <test_dir>.jsonl is accepted too). A missing split is written
    once from `seed`, and one a kill interrupted is finished (write_split); a folder that holds other images but no
    labels is an error, never overwritten."""
    base = os.path.normpath(test_dir)
    labels = labels or next((p for p in (base + "_labels.jsonl", base + ".jsonl") if os.path.isfile(p)), None)
    if labels is None or not os.path.isfile(labels):
        from sena.world import write_split

        labels = labels or base + "_labels.jsonl"
        print(f"writing the world test split: {n} scenes, seed {seed} -> {test_dir}, labels {labels}")
        write_split(test_dir, n, seed, "test", labels)
    with open(labels, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()], labels
