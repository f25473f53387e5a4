"""Draw a scene record as a small RGB image (PIL + numpy, deterministic from the record).

Size: 72 px with a 3x3 grid of 24 px cells. θ0's vision tower uses 24 px patches, so each cell is exactly one
image token (9 in all): a tiny language model trained for minutes binds "the star" to its colour and place far more
easily among 9 object slots than among 36 patch fragments, and every SENA forward stays cheap on a CPU. A large
shape (~20 px) fills most of its cell, a small one (~12 px) sits anywhere within it.
Shapes are drawn as masks at 4x resolution and box-filtered down, so edges are anti-aliased and a star, a cross
and a heart stay distinguishable at 12 px. A faint object is blended into the background at low opacity; clutter is
an irregular blob (no shape of SHAPES) at the same opacity, so a faint thing in a cell may be either.
"""

import math
import random

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 72
CELL = IMAGE_SIZE // 3
SUPER = 4  # supersampling factor for the shape masks
RADIUS = {"small": 6.0, "large": 10.0}  # half the shape's extent, px
JITTER = {"small": 4.0, "large": 1.5}  # max centre offset inside the cell, px
FAINT_ALPHA = (0.12, 0.32)  # opacity of a faint object and of a clutter blob, drawn uniformly
RGB = {
    "red": (220, 30, 30), "green": (40, 180, 50), "blue": (30, 70, 230), "yellow": (240, 225, 40),
    "purple": (140, 40, 190), "pink": (255, 130, 200), "white": (250, 250, 250), "black": (15, 15, 15),
}


def _polygon_star(cx, cy, r, points=5, inner=0.45):
    return [(cx + (r if i % 2 == 0 else r * inner) * math.sin(math.pi * i / points),
             cy - (r if i % 2 == 0 else r * inner) * math.cos(math.pi * i / points)) for i in range(2 * points)]


def _draw_mask(shape: str, cx: float, cy: float, r: float) -> Image.Image:
    """An 'L' mask at SUPER x resolution with the shape filled (255) centred at (cx, cy), radius r (final px)."""
    s = SUPER
    m = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    d = ImageDraw.Draw(m)
    x, y, r = cx * s, cy * s, r * s
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif shape == "square":
        a = 0.85 * r
        d.rectangle([x - a, y - a, x + a, y + a], fill=255)
    elif shape == "triangle":
        d.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=255)
    elif shape == "star":
        d.polygon(_polygon_star(x, y, r * 1.1), fill=255)
    elif shape == "heart":
        q = 0.5 * r
        d.ellipse([x - r, y - r * 0.75, x, y - r * 0.75 + 2 * q + 0.1 * r], fill=255)
        d.ellipse([x, y - r * 0.75, x + r, y - r * 0.75 + 2 * q + 0.1 * r], fill=255)
        d.polygon([(x - r * 0.97, y - r * 0.15), (x + r * 0.97, y - r * 0.15), (x, y + r)], fill=255)
    elif shape == "diamond":
        d.polygon([(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)], fill=255)
    elif shape == "cross":
        a = 0.34 * r
        d.rectangle([x - r, y - a, x + r, y + a], fill=255)
        d.rectangle([x - a, y - r, x + a, y + r], fill=255)
    elif shape == "moon":
        d.ellipse([x - r, y - r, x + r, y + r], fill=255)
        o = 0.55 * r  # the bite: a second disc shifted right and up, cut out of the first
        d.ellipse([x - r + o, y - r - 0.2 * r, x + r + o, y + r - 0.2 * r], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _blob_mask(rng: random.Random, cx: float, cy: float) -> Image.Image:
    """Clutter: an irregular polygon (7-10 vertices at random radii), anti-aliased like the shapes."""
    s, n, r = SUPER, rng.randint(7, 10), rng.uniform(5.0, 9.0)
    angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(n))
    pts = [((cx + r * rng.uniform(0.45, 1.1) * math.cos(a)) * s, (cy + r * rng.uniform(0.45, 1.1) * math.sin(a)) * s)
           for a in angles]
    m = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    ImageDraw.Draw(m).polygon(pts, fill=255)
    return m.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _background(scene: dict, nrng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float background: a tinted grey, plus pixel noise or faint diagonal stripes."""
    base = np.array(scene["bg_color"], dtype=np.float64)
    img = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if scene["background"] == "noise":
        img += nrng.normal(0.0, 12.0, size=img.shape)
    elif scene["background"] == "stripes":
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        period, phase = nrng.uniform(6.0, 12.0), nrng.uniform(0.0, 2 * math.pi)
        direction = 1 if nrng.random() < 0.5 else -1
        img += (14.0 * np.sin(2 * math.pi * (xx + direction * yy) / period + phase))[..., None]
    # Every background carries a little noise so no image is pixel-clean.
    img += nrng.normal(0.0, 3.0, size=img.shape)
    return img


def render(scene: dict) -> Image.Image:
    """The scene as a 72x72 RGB PIL image; identical bytes for identical records."""
    rng = random.Random(scene["seed"])
    nrng = np.random.default_rng(scene["seed"])
    img = _background(scene, nrng)
    for o in scene["objects"]:
        j = JITTER[o["size"]]
        cx = (o["col"] + 0.5) * CELL + rng.uniform(-j, j)
        cy = (o["row"] + 0.5) * CELL + rng.uniform(-j, j)
        r = RADIUS[o["size"]] * rng.uniform(0.92, 1.08)
        mask = np.asarray(_draw_mask(o["shape"], cx, cy, r), dtype=np.float64)[..., None] / 255.0
        # Small per-object colour jitter: the model must learn colour categories, not exact RGB values.
        color = np.clip(np.array(RGB[o["color"]], dtype=np.float64) + [rng.uniform(-12, 12) for _ in range(3)], 0, 255)
        alpha = rng.uniform(*FAINT_ALPHA) if o.get("faint") else 1.0
        img = img * (1.0 - alpha * mask) + color * alpha * mask
    for b in scene.get("clutter", []):
        cx = (b["col"] + 0.5) * CELL + rng.uniform(-3, 3)
        cy = (b["row"] + 0.5) * CELL + rng.uniform(-3, 3)
        mask = np.asarray(_blob_mask(rng, cx, cy), dtype=np.float64)[..., None] / 255.0
        color = np.array(RGB[rng.choice(list(RGB))], dtype=np.float64)
        alpha = rng.uniform(*FAINT_ALPHA)
        img = img * (1.0 - alpha * mask) + color * alpha * mask
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
