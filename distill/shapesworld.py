"""ShapesWorld: a procedural, seeded image-text world (plain numpy + PIL, no torch).

Every item is a pure function of ``(seed, split, index)``: the same item renders to the same
pixels and caption on every machine and in every process. An item is one coloured shape
(optionally a second, smaller one) drawn in one of several visual domains (styles), with a
natural-language caption built from many templates and synonyms.

The class of an item is its shape (``task="shape"``) or its shape and colour
(``task="shape_colour"``). Domains play the role of distribution shift: a model trained on
some domains and evaluated on the others measures out-of-distribution (OOD) accuracy.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Words live in shapesworld_text; ZERO_SHOT_TEMPLATES is part of this module's public API.
from distill.shapesworld_text import ZERO_SHOT_TEMPLATES as ZERO_SHOT_TEMPLATES
from distill.shapesworld_text import caption

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "ring",
    "diamond",
    "pentagon",
    "hexagon",
    "crescent",
    "arrow",
    "ellipse",
    "semicircle",
    "trapezoid",
    "bolt",
)
"""Canonical shape names; the class names of the ``shape`` task, in label order."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "orange": (245, 135, 20),
    "purple": (140, 60, 190),
    "pink": (240, 120, 180),
    "cyan": (30, 200, 210),
    "brown": (130, 80, 40),
    "gray": (128, 128, 128),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Radius range per size, as a fraction of the image side.
_SIZE_RADIUS = {"small": (0.19, 0.24), "medium": (0.25, 0.31), "large": (0.32, 0.38)}

POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top": (0.5, 0.34),
    "bottom": (0.5, 0.66),
    "left": (0.34, 0.5),
    "right": (0.66, 0.5),
}
DOMAINS: tuple[str, ...] = ("flat", "outline", "texture", "shaded", "sketch", "pixel", "night")
"""Visual domains (styles), in domain-index order."""

TASKS: tuple[str, ...] = ("shape", "shape_colour")
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class ShapesItem:
    """One rendered ShapesWorld item.

    Attributes:
        image: (H, W, 3) uint8 RGB pixels.
        caption: natural-language description.
        label: class index under the world's task.
        domain: domain index into ``DOMAINS``.
        shape: canonical shape name.
        colour: canonical colour name.
    """

    image: np.ndarray
    caption: str
    label: int
    domain: int
    shape: str
    colour: str


def class_names(task: str = "shape", num_colours: int = len(COLOURS)) -> list[str]:
    """Class names of a task, in label order.

    Args:
        task: ``"shape"`` (16 classes) or ``"shape_colour"`` (shapes x colours).
        num_colours: how many of the colours are used.
    """
    if task == "shape":
        return list(SHAPES)
    if task == "shape_colour":
        return [f"{c} {s}" for s in SHAPES for c in list(COLOURS)[:num_colours]]
    raise ValueError(f"unknown ShapesWorld task {task!r}; choose one of {TASKS}")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # A stable hash (not Python's salted hash()) so every process draws the same numbers.
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _regular_polygon(n: int, phase: float) -> np.ndarray:
    angles = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(angles), np.sin(angles)], 1)


def _outline(shape: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Unit-radius outline of a shape (and of its hole, if any), y pointing down."""
    up = -math.pi / 2
    if shape == "circle":
        return _regular_polygon(64, 0.0), None
    if shape == "square":
        return _regular_polygon(4, math.pi / 4) * 0.95, None
    if shape == "triangle":
        return _regular_polygon(3, up) * 1.05 + [0, 0.2], None
    if shape == "pentagon":
        return _regular_polygon(5, up), None
    if shape == "hexagon":
        return _regular_polygon(6, 0.0), None
    if shape == "diamond":
        return _regular_polygon(4, up) * [0.7, 1.0], None
    if shape == "star":
        outer, inner = _regular_polygon(5, up), _regular_polygon(5, up + math.pi / 5) * 0.42
        return np.stack([outer, inner], 1).reshape(-1, 2), None
    if shape == "cross":
        a, b = 0.32, 0.95
        return np.array(
            [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]]
        ), None
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x, -y - 2], 1) / 16.5, None
    if shape == "ring":
        return _regular_polygon(64, 0.0), _regular_polygon(64, 0.0) * 0.55
    if shape == "crescent":
        return _regular_polygon(64, 0.0), _regular_polygon(64, 0.0) * 0.85 + [0.45, -0.1]
    if shape == "arrow":
        return np.array(
            [[-0.95, -0.25], [0.15, -0.25], [0.15, -0.65], [0.95, 0.0], [0.15, 0.65], [0.15, 0.25], [-0.95, 0.25]]
        ), None
    if shape == "ellipse":
        return _regular_polygon(64, 0.0) * [1.0, 0.55], None
    if shape == "semicircle":
        t = np.linspace(math.pi, 2 * math.pi, 33)
        return np.stack([np.cos(t), np.sin(t) + 0.45], 1), None
    if shape == "trapezoid":
        return np.array([[-0.5, -0.6], [0.5, -0.6], [1.0, 0.6], [-1.0, 0.6]]), None
    if shape == "bolt":
        return np.array(
            [[0.15, -1.0], [-0.55, 0.1], [-0.05, 0.1], [-0.3, 1.0], [0.6, -0.2], [0.05, -0.2], [0.35, -1.0]]
        ), None
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _place(points: np.ndarray, centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return points @ rot.T * radius + centre


def _mask(outer: np.ndarray, hole: np.ndarray | None, size: int, scale: int) -> np.ndarray:
    """Anti-aliased (size, size) float mask, drawn at ``scale`` x resolution then reduced."""
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([tuple(p) for p in outer * scale], fill=255)
    if hole is not None:
        draw.polygon([tuple(p) for p in hole * scale], fill=0)
    if scale > 1:
        canvas = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _stroke_mask(mask: np.ndarray, width: int) -> np.ndarray:
    """Band of ``width`` pixels along the inside of a mask's boundary (outline style)."""
    img = Image.fromarray((mask * 255).astype(np.uint8))
    eroded = np.asarray(img.filter(ImageFilter.MinFilter(2 * width + 1)), dtype=np.float32) / 255
    return np.clip(mask - eroded, 0, 1)


def _sketch_mask(outer: np.ndarray, hole: np.ndarray | None, size: int, rng) -> np.ndarray:
    """Two passes of jittered, thin strokes along the shape's boundary (hand-drawn style)."""
    strokes = np.zeros((size, size), np.float32)
    for _ in range(2):

        def jitter(c: np.ndarray | None) -> np.ndarray | None:
            return None if c is None else c + rng.normal(0, size * 0.012, c.shape)

        filled = _mask(jitter(outer), jitter(hole), size, scale=2)
        strokes = np.maximum(strokes, _stroke_mask(filled, width=1))
    return strokes


def _background(domain: str, size: int, rng) -> np.ndarray:
    if domain == "night":
        base = rng.uniform(5, 35)
        bg = np.full((size, size, 3), base, np.float32)
        stars = rng.random((size, size)) > 0.985
        bg[stars] = rng.uniform(120, 220)
        return bg
    tint = rng.uniform(200, 250) + rng.uniform(-12, 12, 3)
    bg = np.broadcast_to(tint, (size, size, 3)).astype(np.float32)
    if domain == "texture":
        bg = bg + rng.normal(0, 28, (size, size, 1)) + rng.normal(0, 10, (size, size, 3))
    if domain == "sketch":
        bg = bg + rng.normal(0, 4, (size, size, 1))  # paper grain
    return bg


def _paint(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    alpha = mask[..., None]
    return image * (1 - alpha) + colour * alpha


def _render_object(image, domain, shape, colour_rgb, centre, radius, angle, rng) -> np.ndarray:
    size = image.shape[0]
    outer_unit, hole_unit = _outline(shape)
    outer = _place(outer_unit, centre, radius, angle)
    hole = None if hole_unit is None else _place(hole_unit, centre, radius, angle)
    colour = np.asarray(colour_rgb, np.float32) + rng.uniform(-18, 18, 3)
    if domain == "sketch":
        return _paint(image, _sketch_mask(outer, hole, size, rng), colour * 0.85)
    mask = _mask(outer, hole, size, scale=2)
    if domain == "outline":
        return _paint(image, _stroke_mask(mask, width=max(1, size // 32)), colour)
    if domain == "texture":
        fill = colour * rng.uniform(0.6, 1.25, (size, size, 1)).astype(np.float32)
        return _paint(image, mask, fill)
    if domain == "shaded":
        shadow = np.roll(mask, (size // 20, size // 20), (0, 1))
        shadow = (
            np.asarray(
                Image.fromarray((shadow * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 40)), np.float32
            )
            / 255
        )
        image = image * (1 - 0.45 * shadow[..., None])
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        light = centre - radius * 0.45
        dist = np.hypot(xx - light[0], yy - light[1]) / (radius * 1.6)
        shade = np.clip(1.35 - 0.85 * dist, 0.35, 1.35)[..., None]
        return _paint(image, mask, np.clip(colour * shade + 25 * (shade > 1.2), 0, 255))
    if domain == "night":
        glow = (
            np.asarray(
                Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 25)), np.float32
            )
            / 255
        )
        image = _paint(image, glow * 0.5, colour)
        return _paint(image, mask, colour)
    return _paint(image, mask, colour)  # flat, pixel


def render(
    index: int,
    *,
    seed: int = 0,
    split: str = "train",
    domain: int | None = None,
    image_size: int = 64,
    task: str = "shape",
    num_colours: int = len(COLOURS),
    second_object_prob: float = 0.0,
    label: int | None = None,
) -> ShapesItem:
    """Render one ShapesWorld item, deterministically from ``(seed, split, index)``.

    Args:
        index: item index.
        seed: world seed.
        split: one of ``train``, ``val``, ``test`` (each split draws its own items).
        domain: domain index into ``DOMAINS``; drawn at random when None.
        image_size: side of the square image in pixels.
        task: ``shape`` or ``shape_colour``; decides what ``label`` means.
        num_colours: number of colours in use (the first ``num_colours`` of ``COLOURS``).
        second_object_prob: probability of a second, smaller distractor object.
        label: class to draw; drawn at random when None.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown ShapesWorld split {split!r}; choose one of {SPLITS}")
    if not 1 <= num_colours <= len(COLOURS):
        raise ValueError(f"num_colours must be in [1, {len(COLOURS)}], got {num_colours}")
    names = class_names(task, num_colours)
    rng = _rng(seed, split, index)
    colours = list(COLOURS)[:num_colours]
    if label is None:
        label = int(rng.integers(len(names)))
    if not 0 <= label < len(names):
        raise ValueError(f"label {label} out of range for task {task!r} ({len(names)} classes)")
    if task == "shape":
        shape, colour = names[label], colours[int(rng.integers(num_colours))]
    else:
        shape, colour = SHAPES[label // num_colours], colours[label % num_colours]
    domain = int(rng.integers(len(DOMAINS))) if domain is None else int(domain)
    if not 0 <= domain < len(DOMAINS):
        raise ValueError(f"domain index {domain} out of range; there are {len(DOMAINS)} domains")
    domain_name = DOMAINS[domain]
    size_name = SIZES[int(rng.integers(len(SIZES)))]
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    radius = rng.uniform(*_SIZE_RADIUS[size_name]) * image_size
    centre = (np.asarray(POSITIONS[position]) + rng.uniform(-0.04, 0.04, 2)) * image_size
    angle = rng.uniform(-0.26, 0.26)  # small tilt only: a rotated cross must stay a cross

    image = _background(domain_name, image_size, rng)
    second = None
    if rng.random() < second_object_prob:
        second = (SHAPES[int(rng.integers(len(SHAPES)))], colours[int(rng.integers(num_colours))])
        corner = np.array([rng.choice([0.14, 0.86]), rng.choice([0.14, 0.86])]) * image_size
        image = _render_object(image, domain_name, second[0], COLOURS[second[1]], corner, 0.11 * image_size, 0.0, rng)
    image = _render_object(image, domain_name, shape, COLOURS[colour], centre, radius, angle, rng)
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    if domain_name == "pixel":
        small = max(4, image_size // 4)
        pil = Image.fromarray(pixels).resize((small, small), Image.Resampling.BILINEAR)
        pixels = np.asarray(pil.resize((image_size, image_size), Image.Resampling.NEAREST))

    text = caption(rng, shape, colour, size_name, position, domain_name, second)
    return ShapesItem(pixels, text, label, domain, shape, colour)


def write_image_folder(
    root: str,
    split: str = "train",
    num_items: int = 1000,
    domains: list[str] | None = None,
    seed: int = 0,
    image_size: int = 64,
    task: str = "shape",
    num_colours: int = len(COLOURS),
    second_object_prob: float = 0.0,
) -> str:
    """Write ShapesWorld items as PNG files plus a captions CSV (the real-data layout).

    Files go to ``<root>/<split>/<domain>/<index>.png``; ``<root>/<split>.csv`` has the columns
    ``filepath`` (relative to root), ``caption``, ``label``, ``classname``, ``domain``. Items
    cycle through the domains and classes like ``ShapesWorldDataModule`` does. The CSV is written
    last, through a temporary file, so a half-written export never looks complete.

    Args:
        root: output folder.
        split: ``train``, ``val`` or ``test``.
        num_items: number of items.
        domains: domain names (default: all).
        seed: world seed.
        image_size: image side in pixels.
        task: ``shape`` or ``shape_colour``.
        num_colours: colours in use.
        second_object_prob: chance of a distractor object.

    Returns:
        Path of the CSV file.
    """
    import csv
    import os
    import tempfile
    from pathlib import Path

    names = domains or list(DOMAINS)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown ShapesWorld domain(s) {unknown}; known: {list(DOMAINS)}")
    classes = class_names(task, num_colours)
    out = Path(root)
    rows = []
    for i in range(num_items):
        domain_name = names[i % len(names)]
        label = (i // len(names)) % len(classes)
        item = render(
            i,
            seed=seed,
            split=split,
            domain=DOMAINS.index(domain_name),
            image_size=image_size,
            task=task,
            num_colours=num_colours,
            second_object_prob=second_object_prob,
            label=label,
        )
        rel = Path(split) / domain_name / f"{i:06d}.png"
        (out / rel.parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(item.image).save(out / rel)
        rows.append(
            {
                "filepath": rel.as_posix(),
                "caption": item.caption,
                "label": label,
                "classname": classes[label],
                "domain": domain_name,
            }
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{split}.csv.", dir=out)
    with os.fdopen(fd, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["filepath"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / f"{split}.csv")
    return str(out / f"{split}.csv")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(write_image_folder, as_positional=False)
