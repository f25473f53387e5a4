"""The supervised mix that teaches θ0 every skill SENA uses. Every label is true.

Each example is (kind, user prompt, answer) in the words of sena/prompts.py; sena.chat.build_example turns it into
the LLaVA v1 sequence. Kinds:
  des      DESCRIBE_PROMPTS[i] + DES_SUFFIX            -> the gold one-sentence description
  gen      templated question + GEN_SUFFIX             -> the oracle's short answer ("Yes", "red", "top left", ...)
  ask      ASK_QUESTION                                -> a question whose type and subject follow the scene
  check    SELF_CHECK(question)                        -> "QUESTION: <same>" if the image answers it, else a new one
  improve  IMPROVE(description, question, answer)      -> "Improved Answer: <gold>", from a generic corruption

No label carries a fault: no description names an absent object, no existence answer says "Yes" to one, and no
example answers a question the image does not answer (LLaVA's data has almost none; how θ0 answers one is its own
guess). θ0's faults come from the images (faint objects, clutter, small shapes) and from the scenes' co-occurrence:
unsure of what it sees, a model falls back on what usually goes together. The errors that self-enhancement learns to
repair are generic (a wrong colour, shape, count or position, a dropped object, a shape inserted at random), never
the co-occurrence pattern itself.
"""

from dataclasses import dataclass

from sena import prompts
from sena.world.language import (
    NUMBERS,
    RELATIONS,
    describe,
    oracle_answer,
    precise_answer,
    question,
    question_type,
)
from sena.world.scenes import COLORS, POSITIONS, SHAPES, SIZES, cell, neighbours

KINDS = ["des", "gen", "ask", "check", "improve"]
GEN_WEIGHTS = {"exist": 0.35, "attribute": 0.12, "relation": 0.12, "color": 0.12, "shape": 0.12, "count": 0.08,
               "position": 0.12, "next_to": 0.10}
# The question a scene invites, as LLaVA's self-asked questions follow what is in the picture: one object -> what it
# is, two -> the salient one's colour, three -> what is next to it, four -> how many there are.
ASK_BY_COUNT = {1: "shape", 2: "color", 3: "next_to", 4: "count"}
ASK_TYPES = ["color", "shape", "count", "position", "next_to", "relation", "exist"]


@dataclass(frozen=True)
class Mix:
    """The proportions of θ0's instruction mix (recorded in meta.json as the recipe's "mix")."""

    kinds: tuple = (0.32, 0.45, 0.07, 0.07, 0.09)  # weights of KINDS
    ask_mode: float = 0.7  # P(the scene's own question type), and separately P(its salient subject), in ask targets
    check_false_premise: float = 0.5  # P(the self-check's input asks about an absent shape or an empty cell)
    improve_des: float = 0.25  # P(an improve example rewrites a description rather than a short answer)
    improve_corrupt: float = 0.6  # P(the current answer of an improve example has a generic error)
    des_order: str = "reading"  # the order a description names objects in (sena/world/language.py, describe)


def _pick(rng, weights: dict) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def salient(scene: dict) -> dict:
    """The object a viewer notices first: large before small, clear before faint, then reading order."""
    return max(scene["objects"], key=lambda o: (o["size"] == "large", not o.get("faint", False)))


def about(rng, scene: dict, qtype: str, o: dict) -> str:
    """A question of type qtype about the present object o that the image answers (a type that cannot be asked of
    o, such as next_to without exactly one neighbour, becomes a position question)."""
    others = [p for p in scene["objects"] if p is not o]
    if (qtype == "next_to" and len(neighbours(scene, o)) != 1) or (qtype == "relation" and not others):
        qtype = "position"
    if qtype == "exist":
        return question("exist", shape=o["shape"])
    if qtype == "relation":
        return question("relation", shape=o["shape"], rel=rng.choice(RELATIONS), shape2=rng.choice(others)["shape"])
    if qtype == "color":
        return question("color", shape=o["shape"])
    if qtype == "shape":
        return question("shape", pos=o["pos"])
    if qtype == "count":
        return question("count")
    if qtype == "next_to":
        return question("next_to", shape=o["shape"])
    return question("position", color=o["color"], shape=o["shape"])


def answerable_question(rng, scene: dict, qtype: str | None = None) -> str:
    """A templated question the image answers (GEN_WEIGHTS); existence is half present shapes, half absent ones
    drawn uniformly, and attribute questions are half true colours."""
    objs = scene["objects"]
    qtype = qtype or _pick(rng, GEN_WEIGHTS)
    o = rng.choice(objs)
    absent = [s for s in SHAPES if s not in {x["shape"] for x in objs}]
    if qtype == "exist" and rng.random() < 0.5:
        return question("exist", shape=rng.choice(absent))
    if qtype == "attribute":
        u = rng.random()
        if u < 0.5:
            return question("attribute", color=o["color"], shape=o["shape"])
        if u < 0.75:
            return question("attribute", color=rng.choice([c for c in COLORS if c != o["color"]]), shape=o["shape"])
        return question("attribute", color=rng.choice(COLORS), shape=rng.choice(absent))
    if qtype == "next_to":
        with_one = [p for p in objs if len(neighbours(scene, p)) == 1]
        o = rng.choice(with_one) if with_one else o
    return about(rng, scene, qtype, o)


def ask_question(rng, scene: dict, mix: Mix) -> str:
    """What θ0 learns to ask of an image: mostly the scene's own type (ASK_BY_COUNT) about its salient object."""
    o = salient(scene) if rng.random() < mix.ask_mode else rng.choice(scene["objects"])
    qtype = ASK_BY_COUNT[len(scene["objects"])] if rng.random() < mix.ask_mode else rng.choice(ASK_TYPES)
    return about(rng, scene, qtype, o)


def false_premise_question(rng, scene: dict) -> str:
    """A question the image does not answer: about a shape drawn uniformly from the absent ones, or an empty cell."""
    present = [o["shape"] for o in scene["objects"]]
    s = rng.choice([x for x in SHAPES if x not in present])
    kind = rng.choice(["color", "position", "next_to", "relation", "shape"])
    if kind == "shape":
        used = {o["pos"] for o in scene["objects"]}
        return question("shape", pos=rng.choice([p for p in POSITIONS if p not in used]))
    if kind == "relation":
        return question("relation", shape=rng.choice(present), rel=rng.choice(RELATIONS), shape2=s)
    return question(kind, shape=s, color=rng.choice(COLORS))


def corrupt_description(rng, scene: dict, order: str = "reading") -> str:
    """The gold description with one generic error: a wrong colour, shape or position of one object, a dropped
    object, or an inserted one (shape drawn uniformly from the absent ones, random colour, size and free cell)."""
    objs = [dict(o) for o in scene["objects"]]
    present = {o["shape"] for o in objs}
    free = [c for c in range(9) if POSITIONS[c] not in {o["pos"] for o in objs}]
    kinds = ["color", "shape", "insert"] + (["position"] if free else []) + (["drop"] if len(objs) > 1 else [])
    kind, o = rng.choice(kinds), rng.choice(objs)
    if kind == "color":
        o["color"] = rng.choice([c for c in COLORS if c != o["color"]])
    elif kind == "shape":
        o["shape"] = rng.choice([s for s in SHAPES if s not in present])
    elif kind == "position":
        o.update(cell(rng.choice(free)))
    elif kind == "drop":
        objs.remove(o)
    else:
        objs.append({"shape": rng.choice([s for s in SHAPES if s not in present]), "color": rng.choice(COLORS),
                     "size": rng.choice(SIZES), **cell(rng.choice(free or range(9)))})
    objs.sort(key=lambda x: (x["row"], x["col"]))  # a scene record lists objects in reading order
    return describe(scene | {"objects": objs}, order)


def wrong_answer(rng, scene: dict, q: str) -> str:
    """A plausible but wrong short answer of the question's type (Yes <-> No for yes/no questions)."""
    gold = oracle_answer(scene, q)
    values = {"color": COLORS, "shape": SHAPES, "next_to": SHAPES, "position": POSITIONS, "count": NUMBERS[1:5]}
    return rng.choice([v for v in values.get(question_type(q), ["Yes", "No"]) if v != gold])


def improve_example(rng, scene: dict, mix: Mix) -> tuple[str, str]:
    """Self-enhancement: (IMPROVE prompt, "Improved Answer: <gold>"). The current answer is gold or has a generic
    error; the description in the prompt is gold, has a generic error, or is a bare "Yes" (SENA's improve prompt
    passes the model's own description, which may be wrong, so the rewrite must read the image)."""
    if rng.random() < mix.improve_des:  # a description being improved; SENA passes it as its own description
        q = rng.choice(prompts.DESCRIBE_PROMPTS) + (prompts.DES_SUFFIX if rng.random() < 0.7 else "")
        gold = describe(scene, mix.des_order)
        cur = corrupt_description(rng, scene, mix.des_order) if rng.random() < mix.improve_corrupt else gold
        return prompts.improve_prompt(cur, q, cur), f"{prompts.IMPROVED_MARKER} {gold}"
    q = answerable_question(rng, scene)
    gold = oracle_answer(scene, q)
    cur = wrong_answer(rng, scene, q) if rng.random() < mix.improve_corrupt else gold
    u = rng.random()
    desc = ("Yes" if u < 0.1 else describe(scene, mix.des_order) if u < 0.6
            else corrupt_description(rng, scene, mix.des_order))
    # SENA's generate.py passes the whole short-answer prompt (question + GEN_SUFFIX) as the question; the improved
    # answer is "precise and concise": one word or phrase under that suffix, a full sentence for a bare question.
    if rng.random() < 0.7:
        return prompts.improve_prompt(desc, q + prompts.GEN_SUFFIX, cur), f"{prompts.IMPROVED_MARKER} {gold}"
    return prompts.improve_prompt(desc, q, cur), f"{prompts.IMPROVED_MARKER} {precise_answer(scene, q, mix.des_order)}"


def make_example(rng, scene: dict, kind: str, mix: Mix) -> tuple[str, str]:
    """(user prompt, answer) of one supervised example of the given kind."""
    if kind == "des":
        return rng.choice(prompts.DESCRIBE_PROMPTS) + prompts.DES_SUFFIX, describe(scene, mix.des_order)
    if kind == "gen":
        q = answerable_question(rng, scene)
        return q + prompts.GEN_SUFFIX, oracle_answer(scene, q)
    if kind == "ask":
        return prompts.ASK_QUESTION, ask_question(rng, scene, mix)
    if kind == "check":
        if rng.random() < mix.check_false_premise:
            q, new = false_premise_question(rng, scene), ask_question(rng, scene, mix)
        else:
            q = new = ask_question(rng, scene, mix)
        return prompts.SELF_CHECK.format(question=q), f"{prompts.QUESTION_MARKER} {new}"
    return improve_example(rng, scene, mix)


def sample_examples(rng, scene: dict, n: int, mix: Mix, focus: float = 0.0) -> list[tuple[str, str, str]]:
    """n examples (kind, user, answer) for one scene, kinds drawn from mix.kinds; with probability focus an example
    is an existence question instead (stage 2's existence phase, sena/world/data.py)."""
    out = []
    for kind in rng.choices(KINDS, weights=mix.kinds, k=n):
        if focus and rng.random() < focus:
            q = answerable_question(rng, scene, "exist")
            out.append(("gen", q + prompts.GEN_SUFFIX, oracle_answer(scene, q)))
            continue
        user, answer = make_example(rng, scene, kind, mix)
        out.append((kind, user, answer))
    return out
