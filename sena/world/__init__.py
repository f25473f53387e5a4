"""The embedded world: seeded scenes of shapes, their images, the question templates, and θ0's builder.

Light parts import eagerly; the builder (torch, transformers) loads on first use.
"""

from sena.world.language import (
    NUMBERS,
    QUESTION_TYPES,
    RELATIONS,
    SYNONYMS,
    TEMPLATES,
    VQA_TYPES,
    describe,
    mentioned_shapes,
    oracle_answer,
    parse_question,
    precise_answer,
    question,
    question_type,
)
from sena.world.render import IMAGE_SIZE, render
from sena.world.scenes import (
    BACKGROUNDS,
    BUDDIES,
    COLORS,
    COOC,
    PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    absent_buddies,
    buddy_rate,
    find,
    sample_scene,
    sample_scenes,
)
from sena.world.theta0 import SHIPPED as SHIPPED_THETA0
from sena.world.theta0 import RecipeError, Theta0Error
from sena.world.theta0 import install as install_theta0

_LAZY = {"build_theta0", "write_split", "load_scenes"}


def __getattr__(name):
    if name in _LAZY:
        from sena.world import build

        return getattr(build, name)
    raise AttributeError(f"module 'sena.world' has no attribute {name!r}")


__all__ = ["BACKGROUNDS", "BUDDIES", "COLORS", "COOC", "IMAGE_SIZE", "NUMBERS", "PAIRS", "POSITIONS", "QUESTION_TYPES",
           "RecipeError", "RELATIONS", "SHAPES", "SHIPPED_THETA0", "SIZES", "SYNONYMS", "TEMPLATES", "Theta0Error",
           "VQA_TYPES",
           "absent_buddies", "buddy_rate", "describe", "find", "install_theta0", "mentioned_shapes", "oracle_answer",
           "parse_question", "precise_answer", "question", "question_type", "render", "sample_scene", "sample_scenes",
           *sorted(_LAZY)]
