"""Words about scenes: gold descriptions, the question templates, their oracle answers, and a shape synonym table.

Templates (the benchmark asks exactly these; θ0 is trained on them):
    exist      "Is there a {shape} in the image?"                  -> "Yes" / "No"
    attribute  "Is there a {color} {shape} in the image?"          -> "Yes" / "No"
    relation   "Is the {shape} {rel} the {shape}?"  rel in RELATIONS -> "Yes" / "No"   (both present, else None)
    color      "What color is the {shape}?"                        -> "red"              (None if absent)
    shape      "What shape is at the {pos}?"                       -> "circle"           (None if the cell is empty)
    count      "How many objects are there?"                       -> "two"
    position   "Where is the {color} {shape}?"                     -> "top left"         (None unless it exists)
    next_to    "What is next to the {shape}?"                      -> "square"           (None unless exactly one
                                                                       object shares a side with the shape's cell)
A question whose oracle answer is None is one the image does not answer (a false premise).
"""

import re

from sena.world.scenes import COLORS, POSITIONS, SHAPES, find, neighbours

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RELATIONS = ["to the left of", "to the right of", "above", "below"]
TEMPLATES = {
    "exist": "Is there a {shape} in the image?",
    "attribute": "Is there a {color} {shape} in the image?",
    "relation": "Is the {shape} {rel} the {shape2}?",
    "color": "What color is the {shape}?",
    "shape": "What shape is at the {pos}?",
    "count": "How many objects are there?",
    "position": "Where is the {color} {shape}?",
    "next_to": "What is next to the {shape}?",
}
QUESTION_TYPES = list(TEMPLATES)
VQA_TYPES = ["color", "shape", "count", "position"]
_W = r"([a-z]+)"
_PATTERNS = {
    "exist": re.compile(rf"^Is there a {_W} in the image\?"),
    "attribute": re.compile(rf"^Is there a {_W} {_W} in the image\?"),
    "relation": re.compile(rf"^Is the {_W} ({'|'.join(RELATIONS)}) the {_W}\?"),
    "color": re.compile(rf"^What color is the {_W}\?"),
    "shape": re.compile(rf"^What shape is at the ({'|'.join(sorted(POSITIONS, key=len, reverse=True))})\?"),
    "count": re.compile(r"^How many objects are there\?"),
    "position": re.compile(rf"^Where is the {_W} {_W}\?"),
    "next_to": re.compile(rf"^What is next to the {_W}\?"),
}
# Words that name each shape (CHAIR's synonym table): plurals and a few near-synonyms a captioner might use.
SYNONYMS = {
    "circle": ["circle", "circles", "disc", "discs", "disk", "disks", "dot", "dots", "ball", "balls"],
    "square": ["square", "squares", "box", "boxes", "block", "blocks"],
    "triangle": ["triangle", "triangles", "pyramid", "pyramids"],
    "star": ["star", "stars"],
    "heart": ["heart", "hearts"],
    "diamond": ["diamond", "diamonds", "rhombus", "rhombi", "rhombuses", "lozenge", "lozenges"],
    "cross": ["cross", "crosses"],
    "moon": ["moon", "moons", "crescent", "crescents"],
}
_WORD_TO_SHAPE = {w: s for s, ws in SYNONYMS.items() for w in ws}


def question(qtype: str, shape=None, color=None, pos=None, rel=None, shape2=None) -> str:
    """Fill one template, e.g. question("relation", shape="circle", rel="above", shape2="star")."""
    return TEMPLATES[qtype].format(shape=shape, color=color, pos=pos, rel=rel, shape2=shape2)


def where(pos: str) -> str:
    """'top left' -> 'at the top left', 'left' -> 'on the left', 'center' -> 'in the center'."""
    if pos in ("left", "right"):
        return f"on the {pos}"
    if pos == "center":
        return "in the center"
    return f"at the {pos}"


def object_phrase(o: dict) -> str:
    return f"a {o['size']} {o['color']} {o['shape']} {where(o['pos'])}"


DES_ORDERS = ("reading", "kind")


def describe(scene: dict, order: str = "reading") -> str:
    """One sentence naming every object of scene["objects"]: in list order (reading order for a scene record), or
    with order="kind" by shape in the fixed order of SHAPES, where buddies stand side by side.

    "There is a small red circle at the top left and a large blue star in the center."

    Why "kind": in reading order a description reads the cells one after another, a skill apart from the search
    that a yes/no question needs ("is a star anywhere?"). Naming objects by kind makes each step of a description
    that search ("is there a circle? a square? ..."), so the two read out one belief, and the co-occurrence prior
    enters a description where it enters an answer: right after the buddy's partner is named.
    """
    objs = scene["objects"]
    if order == "kind":
        objs = sorted(objs, key=lambda o: SHAPES.index(o["shape"]))
    elif order != "reading":
        raise ValueError(f"description order {order!r} is not one of {DES_ORDERS}")
    phrases = [object_phrase(o) for o in objs]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"There is {body}."


def parse_question(text: str) -> tuple[str, tuple] | None:
    """(type, captured words) for a templated question (a trailing suffix is ignored), else None."""
    text = text.strip()
    for qtype in ("attribute", "exist", "relation", "color", "shape", "count", "position", "next_to"):
        m = _PATTERNS[qtype].match(text)
        if m is None:
            continue
        g = m.groups()
        words_ok = {
            "exist": g and g[0] in SHAPES,
            "attribute": len(g) == 2 and g[0] in COLORS and g[1] in SHAPES,
            "relation": len(g) == 3 and g[0] in SHAPES and g[2] in SHAPES and g[0] != g[2],
            "color": g and g[0] in SHAPES,
            "shape": True, "count": True,
            "position": len(g) == 2 and g[0] in COLORS and g[1] in SHAPES,
            "next_to": g and g[0] in SHAPES,
        }[qtype]
        if words_ok:
            return qtype, g
    return None


def question_type(question: str) -> str | None:
    """One of QUESTION_TYPES for a templated question, else None."""
    p = parse_question(question)
    return None if p is None else p[0]


def _related(a: dict, rel: str, b: dict) -> bool:
    return {"to the left of": a["col"] < b["col"], "to the right of": a["col"] > b["col"],
            "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[rel]


def oracle_answer(scene: dict, question: str) -> str | None:
    """The gold short answer, or None when the image does not answer the question (absent object, empty cell)."""
    p = parse_question(question)
    if p is None:
        return None
    qtype, g = p
    if qtype == "exist":
        return "Yes" if find(scene, g[0]) else "No"
    if qtype == "attribute":
        o = find(scene, g[1])
        return "Yes" if o and o["color"] == g[0] else "No"
    if qtype == "relation":
        a, b = find(scene, g[0]), find(scene, g[2])
        return None if a is None or b is None else ("Yes" if _related(a, g[1], b) else "No")
    if qtype == "color":
        o = find(scene, g[0])
        return None if o is None else o["color"]
    if qtype == "shape":
        hits = [o for o in scene["objects"] if o["pos"] == g[0]]
        return hits[0]["shape"] if hits else None
    if qtype == "count":
        return NUMBERS[len(scene["objects"])]
    if qtype == "next_to":
        o = find(scene, g[0])
        near = neighbours(scene, o) if o else []
        return near[0]["shape"] if len(near) == 1 else None
    o = find(scene, g[1])  # position
    return None if o is None or o["color"] != g[0] else o["pos"]


def precise_answer(scene: dict, question: str, order: str = "reading") -> str:
    """The full-sentence answer that self-enhancement should produce ("Improved Answer: <this>"); order: describe's."""
    p = parse_question(question)
    if p is None:
        return describe(scene, order)
    qtype, g = p
    if qtype in ("exist", "attribute"):
        shape = g[-1]
        o = find(scene, shape)
        if o is None:
            return f"No, there is no {shape} in the image."
        if qtype == "attribute" and o["color"] != g[0]:
            return f"No, the {shape} is {o['color']}."
        return f"Yes, there is {object_phrase(o)}."
    if qtype == "relation":
        a, b = find(scene, g[0]), find(scene, g[2])
        if a is None or b is None:
            return f"There is no {g[0] if a is None else g[2]} in the image."
        neg = "" if _related(a, g[1], b) else "not "
        return f"{'Yes' if not neg else 'No'}, the {g[0]} is {neg}{g[1]} the {g[2]}."
    if qtype == "color":
        o = find(scene, g[0])
        return f"There is no {g[0]} in the image." if o is None else f"The {g[0]} is {o['color']}."
    if qtype == "shape":
        hits = [o for o in scene["objects"] if o["pos"] == g[0]]
        return f"There is nothing {where(g[0])}." if not hits else f"There is {object_phrase(hits[0])}."
    if qtype == "count":
        n = len(scene["objects"])
        return "There is one object." if n == 1 else f"There are {NUMBERS[n]} objects."
    if qtype == "next_to":
        o = find(scene, g[0])
        if o is None:
            return f"There is no {g[0]} in the image."
        near = neighbours(scene, o)
        if len(near) != 1:
            return f"{'Nothing is' if not near else 'Several objects are'} next to the {g[0]}."
        return f"Next to the {g[0]} there is {object_phrase(near[0])}."
    o = find(scene, g[1])  # position
    if o is None or o["color"] != g[0]:
        return f"There is no {g[0]} {g[1]} in the image."
    return f"The {g[0]} {g[1]} is {where(o['pos'])}."


def mentioned_shapes(text: str) -> list[str]:
    """Shapes named in a text through SYNONYMS, each once, in order of first mention."""
    out = []
    for w in re.findall(r"[a-z]+", text.lower()):
        s = _WORD_TO_SHAPE.get(w)
        if s is not None and s not in out:
            out.append(s)
    return out
