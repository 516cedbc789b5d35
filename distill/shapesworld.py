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

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageFilter

from distill._shapes_geometry import _mask, _outline, _place, _sketch_mask, _stroke_mask
from distill.files import atomic_write
from distill.shapesworld_text import POSITION_PHRASES, caption

# Words live in shapesworld_text; ZERO_SHOT_TEMPLATES is part of this module's public API.
from distill.shapesworld_text import ZERO_SHOT_TEMPLATES as ZERO_SHOT_TEMPLATES

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

TASKS: tuple[str, ...] = ("shape", "shape_colour", "shape_size", "shape_position")
"""What an item's label names: its shape, shape and colour, shape and size, or shape and position."""
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
        task: ``"shape"`` (16 classes), ``"shape_colour"`` (shapes x colours, "red circle"),
            ``"shape_size"`` (shapes x 3 sizes, "small circle") or ``"shape_position"``
            (shapes x 5 positions, "circle on the left").
        num_colours: how many of the colours are used.
    """
    if task == "shape":
        return list(SHAPES)
    if task == "shape_colour":
        return [f"{c} {s}" for s in SHAPES for c in list(COLOURS)[:num_colours]]
    if task == "shape_size":
        return [f"{z} {s}" for s in SHAPES for z in SIZES]
    if task == "shape_position":
        # The canonical (first) caption phrase of each position names the class.
        return [f"{s} {POSITION_PHRASES[p][0]}" for s in SHAPES for p in POSITIONS]
    raise ValueError(f"unknown ShapesWorld task {task!r}; choose one of {TASKS}")


_D = TypeVar("_D")
_L = TypeVar("_L")


def domain_and_label(index: int, domains: Sequence[_D], labels: Sequence[_L]) -> tuple[_D, _L]:
    """The domain and label of item ``index`` in a set balanced over domains and labels.

    Items cycle through the domains fastest and through the labels once per round of domains:
    item ``i`` gets ``domains[i % len(domains)]`` and ``labels[(i // len(domains)) % len(labels)]``,
    so any ``len(domains) * len(labels)`` consecutive items hold every (domain, label) pair once.
    """
    return domains[index % len(domains)], labels[(index // len(domains)) % len(labels)]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # A stable hash (not Python's salted hash()) so every process draws the same numbers.
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


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
    if task == "shape_colour":
        shape, colour = SHAPES[label // num_colours], colours[label % num_colours]
    else:
        per_shape = len(names) // len(SHAPES)
        shape, colour = SHAPES[label // per_shape], colours[int(rng.integers(num_colours))]
    domain = int(rng.integers(len(DOMAINS))) if domain is None else int(domain)
    if not 0 <= domain < len(DOMAINS):
        raise ValueError(f"domain index {domain} out of range; there are {len(DOMAINS)} domains")
    domain_name = DOMAINS[domain]
    size_name = SIZES[int(rng.integers(len(SIZES)))]
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    # Size and position are drawn for every task (same random stream), then set by the label.
    if task == "shape_size":
        size_name = SIZES[label % len(SIZES)]
    elif task == "shape_position":
        position = list(POSITIONS)[label % len(POSITIONS)]
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
    cycle through the domains and classes like ``ShapesWorldDataModule``'s (:func:`domain_and_label`).
    The CSV is written last, atomically, so a half-written export never looks complete.

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
    names = domains or list(DOMAINS)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown ShapesWorld domain(s) {unknown}; known: {list(DOMAINS)}")
    classes = class_names(task, num_colours)
    out = Path(root)
    rows = []
    for i in range(num_items):
        domain_name, label = domain_and_label(i, names, range(len(classes)))
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
    with atomic_write(out / f"{split}.csv", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["filepath"])
        writer.writeheader()
        writer.writerows(rows)
    return str(out / f"{split}.csv")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(write_image_folder, as_positional=False)
