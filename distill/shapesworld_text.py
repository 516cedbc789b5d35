"""ShapesWorld's words: synonyms, caption templates and zero-shot prompt templates.

Captions are built from many templates and synonyms so that text is not a lookup table; the
canonical word of each attribute is the first of its synonyms.
"""

from __future__ import annotations

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "three-sided shape", "wedge"),
    "star": ("star", "five-pointed star", "starburst"),
    "cross": ("cross", "plus sign", "plus"),
    "heart": ("heart", "love heart", "heart symbol"),
    "ring": ("ring", "donut", "hoop"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "pentagon": ("pentagon", "five-sided polygon", "pentagon shape"),
    "hexagon": ("hexagon", "six-sided polygon", "honeycomb cell"),
    "crescent": ("crescent", "crescent moon", "sickle"),
    "arrow": ("arrow", "right arrow", "pointer"),
    "ellipse": ("ellipse", "oval", "flattened circle"),
    "semicircle": ("semicircle", "half circle", "half disc"),
    "trapezoid": ("trapezoid", "trapezium", "truncated triangle"),
    "bolt": ("bolt", "lightning bolt", "zigzag"),
}

COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "leaf-green"),
    "blue": ("blue", "navy", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "orange": ("orange", "tangerine", "amber"),
    "purple": ("purple", "violet", "lilac"),
    "pink": ("pink", "rose", "magenta"),
    "cyan": ("cyan", "turquoise", "teal"),
    "brown": ("brown", "chocolate", "tan"),
    "gray": ("gray", "grey", "silver"),
}

SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "medium": ("medium", "mid-sized", "medium-sized"),
    "large": ("large", "big", "huge"),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle", "at the centre"),
    "top": ("near the top", "at the top", "in the upper part"),
    "bottom": ("near the bottom", "at the bottom", "in the lower part"),
    "left": ("on the left", "to the left", "at the left side"),
    "right": ("on the right", "to the right", "at the right side"),
}

DOMAIN_PHRASES: dict[str, tuple[str, ...]] = {
    "flat": ("a picture of", "an image of", "a flat icon of"),
    "outline": ("an outline of", "a line drawing of", "the contour of"),
    "texture": ("a textured picture of", "a noisy image of", "a grainy picture of"),
    "shaded": ("a 3d render of", "a shaded picture of", "a glossy rendering of"),
    "sketch": ("a sketch of", "a hand-drawn doodle of", "a scribble of"),
    "pixel": ("a pixelated image of", "a pixel-art picture of", "a low-resolution image of"),
    "night": ("a picture on a dark background of", "a glowing image of", "a night-mode icon of"),
}

_CAPTION_TEMPLATES: tuple[str, ...] = (
    "{style} {obj}{where}.",
    "{obj}{where}.",
    "{style} {obj}.",
    "there is {obj}{where}.",
    "{obj}, drawn{where}.",
    "this shows {obj}{where}.",
    "{style} {obj}{where}, nothing else.",
    "a single shape: {obj}{where}.",
)

ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "a drawing of a {}.",
    "an outline of a {}.",
    "a sketch of a {}.",
    "a pixelated image of a {}.",
    "a 3d render of a {}.",
    "a textured picture of a {}.",
    "a {} shape.",
)
"""Prompt templates for zero-shot classification of ShapesWorld classes."""


def _pick(rng, options) -> str:
    # The canonical word (first option) half of the time, so zero-shot prompts that use the
    # class name match the training text, and a synonym otherwise, so text is not a lookup.
    return options[0] if rng.random() < 0.5 else options[int(rng.integers(1, len(options)))]


def caption(
    rng, shape: str, colour: str, size_name: str, position: str, domain_name: str, second: tuple[str, str] | None
) -> str:
    """A random caption of one item, drawn with ``rng`` (a numpy Generator)."""
    words = [_pick(rng, SHAPE_SYNONYMS[shape])]
    # Attributes are dropped at random: the shape is the one word every caption has.
    if rng.random() < 0.6:
        words.insert(0, _pick(rng, COLOUR_SYNONYMS[colour]))
    if rng.random() < 0.4:
        words.insert(0, _pick(rng, SIZE_SYNONYMS[size_name]))
    obj = " ".join(words)
    obj = ("an " if obj[0] in "aeiou" else "a ") + obj
    where = " " + _pick(rng, POSITION_PHRASES[position]) if rng.random() < 0.4 else ""
    if second is not None:
        where += f" beside a small {second[1]} {second[0]}"
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    style = _pick(rng, DOMAIN_PHRASES[domain_name])
    return template.format(style=style, obj=obj, where=where).capitalize()
