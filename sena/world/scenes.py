"""Scenes of the embedded world: a few shapes on a 3x3 grid, sampled from a seed.

A scene is a small JSON-able record; the renderer draws it and the benchmarks read it, SENA never does:
    {"id": "test_000123", "image": "test_000123.png", "background": "noise", "bg_color": [r, g, b], "seed": int,
     "objects": [{"shape": "circle", "color": "red", "size": "small", "pos": "top left", "row": 0, "col": 0,
                  "faint": false}, ...],
     "clutter": [{"pos": "center", "row": 1, "col": 1}, ...]}
Objects are listed in reading order (row, then column); one object per cell and no shape twice, so "the circle"
always names one object.

Evidence is not equally strong for every object, as in real photographs: a share of the objects is faint (drawn
at low contrast), small ones are small, and some empty cells hold clutter (a faint blob that is no shape and no
object; the labels never name it). A model unsure of a faint thing in a cell has only the co-occurrence prior to
go on, which is where its hallucinations come from; every label stays true.

Co-occurrence: shapes come in buddy pairs (BUDDIES). The sampler puts whole pairs into a scene so that, over
scenes with at least two objects, a present shape's buddy is present at a rate close to `cooc` (the knob).
Absent buddies of present shapes are what POPE's adversarial split asks about and what a language prior
hallucinates.
"""

from sena import seeds

SHAPES = ["circle", "square", "triangle", "star", "heart", "diamond", "cross", "moon"]
# Buddy pairs are visually unlike each other, so telling them apart is easy for the eye and only the
# co-occurrence prior links them.
PAIRS = [("circle", "square"), ("triangle", "star"), ("heart", "diamond"), ("cross", "moon")]
BUDDIES = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
# No colour starts with a vowel, so every template reads "a {color} {shape}".
COLORS = ["red", "green", "blue", "yellow", "purple", "pink", "white", "black"]
SIZES = ["small", "large"]
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
BACKGROUNDS = ["plain", "noise", "stripes"]
N_OBJECTS = [1, 2, 3, 4]
N_OBJECTS_WEIGHTS = [0.2, 0.3, 0.25, 0.25]
COOC = 0.75
FAINT = 0.35  # P(an object is drawn at low contrast)
CLUTTER = (0.7, 0.35)  # P(a scene has at least one clutter blob), P(each further one), in free cells


def _n_pairs(rng, n, cooc):
    """Number of whole buddy pairs in an n-object scene: E[2k/n] = cooc, capped at n // 2."""
    want = cooc * n / 2.0  # expected pair count that makes the per-object buddy rate equal cooc
    k = int(want) + (1 if rng.random() < want - int(want) else 0)
    return min(k, n // 2)


def cell(c: int) -> dict:
    """The position fields of grid cell c (0..8, reading order)."""
    return {"pos": POSITIONS[c], "row": c // 3, "col": c % 3}


def sample_scene(rng, scene_id: str, cooc: float = COOC, faint: float = FAINT, clutter=CLUTTER) -> dict:
    """One scene: 1-4 objects with distinct shapes in distinct cells; whole buddy pairs at rate ~cooc; each object
    faint with probability `faint`; clutter blobs in free cells."""
    n = rng.choices(N_OBJECTS, weights=N_OBJECTS_WEIGHTS)[0]
    k = _n_pairs(rng, n, cooc) if n >= 2 else 0
    pair_ids = rng.sample(range(len(PAIRS)), k + (n - 2 * k))
    shapes = [s for i in pair_ids[:k] for s in PAIRS[i]]
    # Singles come from the remaining pairs, one member each, so their buddies are absent.
    shapes += [rng.choice(PAIRS[i]) for i in pair_ids[k:]]
    cells = sorted(rng.sample(range(9), n))
    rng.shuffle(shapes)
    objects = [{"shape": s, "color": rng.choice(COLORS), "size": rng.choice(SIZES), **cell(c),
                "faint": rng.random() < faint} for s, c in zip(shapes, cells)]
    free = [c for c in range(9) if c not in cells]
    n_clutter = 0
    if rng.random() < clutter[0]:
        n_clutter = 1
        while n_clutter < len(free) and rng.random() < clutter[1]:
            n_clutter += 1
    blobs = [cell(c) for c in sorted(rng.sample(free, n_clutter))]
    background = rng.choice(BACKGROUNDS)
    # Mid-grey tones with a slight tint: white and black objects both stay visible.
    bg_color = [rng.randint(105, 150) for _ in range(3)]
    return {"id": scene_id, "image": f"{scene_id}.png", "background": background, "bg_color": bg_color,
            "seed": rng.randrange(2**31), "objects": objects, "clutter": blobs}


def sample_scenes(n: int, seed: int, prefix: str = "scene", cooc: float = COOC, **knobs) -> list[dict]:
    """n scenes, ids f"{prefix}_{i:06d}", from the stream sena.seeds.rng("scenes", seed, prefix): a run's pools, the
    test split and θ0's training scenes differ by prefix even under one seed. knobs: faint, clutter."""
    rng = seeds.rng("scenes", seed, prefix)
    return [sample_scene(rng, f"{prefix}_{i:06d}", cooc, **knobs) for i in range(n)]


def find(scene: dict, shape: str) -> dict | None:
    """The object with this shape, or None (shapes are unique within a scene)."""
    for o in scene["objects"]:
        if o["shape"] == shape:
            return o
    return None


def absent_buddies(scene: dict) -> list[str]:
    """Buddies of present shapes that are themselves absent: the adversarial negatives of this scene."""
    present = {o["shape"] for o in scene["objects"]}
    return [BUDDIES[s] for s in SHAPES if s in present and BUDDIES[s] not in present]


def neighbours(scene: dict, o: dict) -> list[dict]:
    """Objects in the cells that share a side with o's cell (up, down, left, right)."""
    return [p for p in scene["objects"] if abs(p["row"] - o["row"]) + abs(p["col"] - o["col"]) == 1]


def buddy_rate(scenes: list[dict]) -> float:
    """Share of objects (in scenes with >= 2 objects) whose buddy shape is also present."""
    hits = total = 0
    for sc in scenes:
        present = {o["shape"] for o in sc["objects"]}
        if len(present) < 2:
            continue
        for s in present:
            hits += BUDDIES[s] in present
            total += 1
    return hits / max(total, 1)
