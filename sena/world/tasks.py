"""The supervised mix that teaches θ0 every skill SENA uses, with the annotation noise that gives θ0 its faults.

Each example is (kind, user prompt, answer) in the words of sena/prompts.py; sena.chat.build_example turns it into
the LLaVA v1 sequence. Kinds:
  des      DESCRIBE_PROMPTS[i] + DES_SUFFIX                      -> one-sentence description
  gen      templated question + GEN_SUFFIX                       -> short answer ("Yes", "red", "top left", ...)
  ask      ASK_QUESTION                                          -> a question (sometimes about an absent buddy)
  check    SELF_CHECK(question)                                  -> "QUESTION: <same>" if answerable, else a new one
  improve  IMPROVE(description, question, answer) or _NO_DESCRIPTION -> "Improved Answer: <precise answer>"

Annotation noise (the knobs in Noise), as GPT-written instruction data has it: a description sometimes names an
absent buddy of a present shape (right after it), and an existence question about an absent buddy is sometimes
answered "Yes". Both rates are (lo, hi) pairs: hi applies when the present partner of the absent buddy is large, lo
when it is small. A visible cue is what lets greedy decoding inherit the fault: with one flat rate under 1/2 the mode
of every conditional would stay correct and a greedy θ0 would not hallucinate at all.
"""

from dataclasses import dataclass

from sena import prompts as P
from sena.world import language as L
from sena.world.scenes import BUDDIES, COLORS, POSITIONS, SHAPES, SIZES, absent_buddies, find

KINDS = ["des", "gen", "ask", "check", "improve"]


@dataclass
class Noise:
    """Rates of annotation noise and of deliberately bad inputs in the θ0 mix (see module docstring)."""

    desc_hal: tuple = (0.1, 0.7)  # P(description names an absent buddy), (partner small, partner large)
    exist_hal: tuple = (0.1, 0.7)  # P("Yes" to "Is there a <absent buddy>?"), same cue
    ask_unanswerable: float = 0.3  # P(ASK_QUESTION target asks about an absent buddy)
    check_unanswerable: float = 0.5  # P(the self-check input question is unanswerable)
    improve_wrong: float = 0.5  # P(the current answer in an improve prompt is wrong)
    # The description in a short-answer improve prompt: P("Yes", gold, noisy, one object's colour or shape swapped).
    # θ0's own descriptions are far worse than gold; the more often the prompt's description is wrong, the more the
    # rewrite must read the image instead of copying a colour from the description.
    improve_desc: tuple = (0.1, 0.5, 0.25, 0.15)
    phantom_color: str = "partner"  # the phantom's colour: "partner" (its present partner's), or "random"
    mix: tuple = (0.22, 0.40, 0.10, 0.10, 0.18)  # weights of KINDS


GEN_WEIGHTS = {"exist": 0.25, "attribute": 0.12, "relation": 0.12, "color": 0.14, "shape": 0.12, "count": 0.10,
               "position": 0.15}
ASK_WEIGHTS = {"exist": 0.1, "attribute": 0.05, "relation": 0.15, "color": 0.25, "shape": 0.15, "count": 0.1,
               "position": 0.2}


def _pick(rng, weights: dict) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _rate(rates: tuple, scene: dict, absent: str) -> float:
    """lo/hi noise rate by the size of the absent buddy's present partner."""
    partner = find(scene, BUDDIES[absent])
    return rates[1] if partner is not None and partner["size"] == "large" else rates[0]


def answerable_question(rng, scene: dict, qtype: str | None = None, weights=GEN_WEIGHTS) -> str:
    """A templated question the image answers; exist/attribute questions are half positives, half negatives."""
    objs = scene["objects"]
    qtype = qtype or _pick(rng, weights)
    if qtype == "relation" and len(objs) < 2:
        qtype = "color"
    o = rng.choice(objs)
    present = {x["shape"] for x in objs}
    if qtype == "exist":
        if rng.random() < 0.5:
            return L.question("exist", shape=o["shape"])
        buddies = absent_buddies(scene)
        pool = buddies if buddies and rng.random() < 0.6 else [s for s in SHAPES if s not in present]
        return L.question("exist", shape=rng.choice(pool))
    if qtype == "attribute":
        u = rng.random()
        if u < 0.5:
            return L.question("attribute", color=o["color"], shape=o["shape"])
        if u < 0.75:
            return L.question("attribute", color=rng.choice([c for c in COLORS if c != o["color"]]), shape=o["shape"])
        absent = [s for s in SHAPES if s not in present]
        return L.question("attribute", color=rng.choice(COLORS), shape=rng.choice(absent))
    if qtype == "relation":
        a, b = rng.sample(objs, 2)
        return L.question("relation", shape=a["shape"], rel=rng.choice(L.RELATIONS), shape2=b["shape"])
    if qtype == "color":
        return L.question("color", shape=o["shape"])
    if qtype == "shape":
        return L.question("shape", pos=o["pos"])
    if qtype == "count":
        return L.question("count")
    return L.question("position", color=o["color"], shape=o["shape"])


def unanswerable_question(rng, scene: dict) -> str | None:
    """A question with a false premise: it asks about an absent shape (a buddy of a present one when possible)."""
    present = [o["shape"] for o in scene["objects"]]
    pool = absent_buddies(scene) or [s for s in SHAPES if s not in present]
    s = rng.choice(pool)
    kind = rng.choice(["color", "position", "relation"])
    if kind == "color":
        return L.question("color", shape=s)
    if kind == "position":
        return L.question("position", color=rng.choice(COLORS), shape=s)
    return L.question("relation", shape=rng.choice(present), rel=rng.choice(L.RELATIONS), shape2=s)


def repair_question(rng, scene: dict, bad: str) -> str:
    """An answerable question of the same type as `bad`, about the absent shape's present buddy when there is one."""
    qtype, g = L.parse_question(bad)
    absent = g[-1]
    partner = find(scene, BUDDIES[absent]) or rng.choice(scene["objects"])
    if qtype == "color":
        return L.question("color", shape=partner["shape"])
    if qtype == "position":
        return L.question("position", color=partner["color"], shape=partner["shape"])
    others = [o for o in scene["objects"] if o["shape"] != g[0]]
    if not others:
        return L.question("color", shape=g[0])
    return L.question("relation", shape=g[0], rel=g[1], shape2=rng.choice(others)["shape"])


def noisy_description(rng, scene: dict, noise: Noise) -> str:
    """The description an annotator wrote: sometimes with an absent buddy named right after its present partner.

    Placed there, the phantom is what a language prior produces: having just written "a large red circle", the
    annotator goes on to "and a large ... square". The greedy decision is then taken at one place, with the cue
    (the partner's size) in plain view, so a θ0 that learned the noise at rate > 1/2 hallucinates under greedy
    decoding. (Appended at the end, the phantom only appeared after a complete object list, which θ0 rarely wrote.)
    """
    buddies = absent_buddies(scene)
    if buddies:
        large = [b for b in buddies if find(scene, BUDDIES[b])["size"] == "large"]
        b = rng.choice(large or buddies)
        if rng.random() < _rate(noise.desc_hal, scene, b):
            objs = list(scene["objects"])
            partner = find(scene, BUDDIES[b])
            color = partner["color"] if noise.phantom_color == "partner" else None
            objs.insert(objs.index(partner) + 1, phantom(rng, scene, b, size=partner["size"], color=color))
            return L.describe(scene | {"objects": objs})
    return L.describe(scene)


def phantom(rng, scene: dict, shape: str, size: str | None = None, color: str | None = None) -> dict:
    """An object that is not in the image: given shape (size and colour if given, else random), at a free cell."""
    used = {o["pos"] for o in scene["objects"]}
    cell = POSITIONS.index(rng.choice([p for p in POSITIONS if p not in used]))
    return {"shape": shape, "color": color or rng.choice(COLORS), "size": size or rng.choice(SIZES),
            "pos": POSITIONS[cell], "row": cell // 3, "col": cell % 3}


def short_answer(rng, scene: dict, q: str, noise: Noise) -> str:
    """The annotated short answer: the oracle, except noisy "Yes" for absent buddies in existence questions."""
    qtype, g = L.parse_question(q)
    gold = L.oracle_answer(scene, q)
    if qtype == "exist" and gold == "No" and g[0] in absent_buddies(scene):
        if rng.random() < _rate(noise.exist_hal, scene, g[0]):
            return "Yes"
    return gold


def wrong_answer(rng, scene: dict, q: str) -> str:
    """A plausible but wrong short answer of the right type (any value if the question is unanswerable)."""
    qtype, g = L.parse_question(q)
    gold = L.oracle_answer(scene, q)
    values = {"color": COLORS, "shape": SHAPES, "position": POSITIONS, "count": L.NUMBERS[1:5]}
    values = values.get(qtype, ["Yes", "No"])
    return rng.choice([v for v in values if v != gold])


def wrong_description(rng, scene: dict) -> str:
    """A description with one object's colour or shape swapped."""
    objs = [dict(o) for o in scene["objects"]]
    o = rng.choice(objs)
    if rng.random() < 0.5:
        o["color"] = rng.choice([c for c in COLORS if c != o["color"]])
    else:
        o["shape"] = rng.choice([s for s in SHAPES if s != o["shape"]])
    return L.describe(scene | {"objects": objs})


def make_example(rng, scene: dict, kind: str, noise: Noise) -> tuple[str, str]:
    """(user prompt, answer) of one supervised example of the given kind."""
    if kind == "des":
        return rng.choice(P.DESCRIBE_PROMPTS) + P.DES_SUFFIX, noisy_description(rng, scene, noise)
    if kind == "gen":
        q = answerable_question(rng, scene)
        return q + P.GEN_SUFFIX, short_answer(rng, scene, q, noise)
    if kind == "ask":
        unans = absent_buddies(scene) and rng.random() < noise.ask_unanswerable
        q = unanswerable_question(rng, scene) if unans else answerable_question(rng, scene, weights=ASK_WEIGHTS)
        return P.ASK_QUESTION, q
    if kind == "check":
        if rng.random() < noise.check_unanswerable:
            q = unanswerable_question(rng, scene)
            return P.SELF_CHECK.format(question=q), f"{P.QUESTION_MARKER} {repair_question(rng, scene, q)}"
        q = answerable_question(rng, scene, weights=ASK_WEIGHTS)
        return P.SELF_CHECK.format(question=q), f"{P.QUESTION_MARKER} {q}"
    # improve: a description (the model's own, so sometimes wrong), a question, a current answer.
    if rng.random() < 0.25:  # a description answer being improved
        q = rng.choice(P.DESCRIBE_PROMPTS) + (P.DES_SUFFIX if rng.random() < 0.7 else "")
        u = rng.random()
        cur = L.describe(scene) if u < 0.4 else (noisy_description(rng, scene, Noise(desc_hal=(1.0, 1.0)))
                                                 if u < 0.7 else wrong_description(rng, scene))
        desc, target = cur, L.describe(scene)
    else:
        q = unanswerable_question(rng, scene) if rng.random() < 0.15 else answerable_question(rng, scene)
        gold = L.oracle_answer(scene, q)
        cur = wrong_answer(rng, scene, q) if gold is None or rng.random() < noise.improve_wrong else gold
        u, (w_yes, w_gold, w_noisy, _) = rng.random(), noise.improve_desc
        desc = ("Yes" if u < w_yes else L.describe(scene) if u < w_yes + w_gold
                else noisy_description(rng, scene, noise) if u < w_yes + w_gold + w_noisy
                else wrong_description(rng, scene))
        # SENA's generate.py passes the whole short-answer prompt (question + GEN_SUFFIX) as the question. The
        # improved answer is "precise and concise": it obeys that suffix (one word or phrase, the oracle answer),
        # and is a full sentence only for a bare question or one the image does not answer.
        short = rng.random() < 0.7
        target = gold if short and gold is not None else L.precise_answer(scene, q)
        q = q + P.GEN_SUFFIX if short else q
    return P.improve_prompt(desc, q, cur), f"{P.IMPROVED_MARKER} {target}"


def sample_examples(rng, scene: dict, n: int, noise: Noise) -> list[tuple[str, str, str]]:
    """n examples (kind, user, answer) for one scene, kinds drawn from noise.mix."""
    out = []
    for kind in rng.choices(KINDS, weights=noise.mix, k=n):
        user, answer = make_example(rng, scene, kind, noise)
        out.append((kind, user, answer))
    return out
