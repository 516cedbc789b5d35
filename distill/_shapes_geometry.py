"""ShapesWorld geometry: shape outlines as polygons and their anti-aliased, stroked or sketched masks."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


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
    raise ValueError(f"unknown shape {shape!r} (see distill.shapesworld.SHAPES)")


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
