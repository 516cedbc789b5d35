"""Layout and style machinery shared by the figure builders of :mod:`distill.plots` and :mod:`distill.plot_reports`.

The Okabe-Ito palette and markers, a pyplot-free figure on an Agg canvas, escaped titles and tick labels, bar
labels, collision-free labels for data points, atomic PNG saving (:func:`save_figure`) and the check for colliding
labels (:func:`text_overlaps`). The public names are re-exported by :mod:`distill.plots`.
"""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text

__all__ = ["OKABE_ITO", "save_figure", "text_overlaps"]

# Okabe-Ito order, with grey in place of its yellow (too faint on white for markers and thin lines).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#999999")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "p", "h", "<")
_DPI = 120


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _esc(s: Any) -> str:
    """User text shown literally (a ``$`` would otherwise start mathtext)."""
    return str(s).replace("$", r"\$")


def _suptitle(fig: Figure, title: str, size: float = 12) -> None:
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * size)) - 4)
    fig.suptitle("\n".join(textwrap.wrap(_esc(title), chars)), fontsize=size)


def _category_ticks(ax, xs: Sequence[float], labels: Sequence[str], slot_in: float, size: float = 9) -> None:
    """Names as x tick labels: wrapped onto up to three lines to fit their slot (``slot_in`` inches), else
    rotated 45 degrees."""
    width = max(6, int(0.9 * slot_in * 72 / (0.6 * size)))  # characters per line that fit the slot
    wrapped = [textwrap.fill(str(s), width, break_long_words=False) for s in labels]
    fits = all(w.count("\n") < 3 and max(len(line) for line in w.split("\n")) <= width for w in wrapped)
    if slot_in >= 0.5 and fits:  # a narrow slot (a confusion matrix's cells) always rotates
        ax.set_xticks(list(xs), [_esc(s) for s in wrapped], fontsize=size)
        return
    ax.set_xticks(list(xs), [_esc(s) for s in labels], fontsize=size)
    ax.tick_params(axis="x", labelrotation=45)
    for t in ax.get_xticklabels():
        t.set(ha="right", rotation_mode="anchor")


def _bar_labels(ax, xs: Sequence[float], tops: Sequence[float], values: Sequence[float]) -> None:
    """Vertical "12.3%" labels just above each bar (vertical, so neighbours never collide)."""
    for x, top, v in zip(xs, tops, values):
        ax.annotate(
            f"{v:.1f}%",
            (x, top),
            xytext=(0, 2),
            textcoords="offset points",
            rotation=90,
            ha="center",
            va="bottom",
            fontsize=7.5,
        )


def _percent_axis(ax, label: str = "top-1 accuracy (%)") -> None:
    """0-100 % y axis with headroom for the vertical bar labels."""
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel(label)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _fractions_to_percent(values: Sequence[float]) -> np.ndarray:
    return 100.0 * np.asarray(values, dtype=float)


def _place_labels(
    fig: Figure, ax, points: np.ndarray, labels: Sequence[str], markers: np.ndarray, force: bool
) -> list[Annotation] | None:
    """Annotate data ``points`` (K, 2) with ``labels``, trying 8 offsets each so labels hit neither each other,
    the ``markers`` (data coordinates, (P, 2)) nor the axes edge. Returns the annotations, or None (nothing left
    behind) when one does not fit and ``force`` is off; with ``force`` the least-bad offset is kept."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer).padded(-2)
    disp = ax.transData.transform(markers[~np.isnan(markers).any(1)])
    taken = [(x - 7, y - 7, x + 7, y + 7) for x, y in disp]
    offsets = [
        (7, 5, "left", "bottom"),
        (7, -5, "left", "top"),
        (-7, 5, "right", "bottom"),
        (-7, -5, "right", "top"),
        (0, 9, "center", "bottom"),
        (0, -9, "center", "top"),
        (10, 0, "left", "center"),
        (-10, 0, "right", "center"),
    ]
    placed = []
    for xy, label in zip(points, labels):
        best = None
        for dx, dy, ha, va in offsets:
            ann = ax.annotate(label, xy, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=8)
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            hits = [
                min(box[2], o[2]) - max(box[0], o[0]) > 1 and min(box[3], o[3]) - max(box[1], o[1]) > 1 for o in taken
            ]
            bad = sum(hits) + 10 * (not frame.contains(bb.x0, bb.y0) or not frame.contains(bb.x1, bb.y1))
            if best is None or bad < best[0]:
                if best is not None:
                    best[1].remove()
                best = (bad, ann, box)
            else:
                ann.remove()
            if bad == 0:
                break
        if best[0] and not force:
            for ann in [*placed, best[1]]:
                ann.remove()
            return None
        placed.append(best[1])
        taken.append(best[2])
    return placed


def _cluster(disp: np.ndarray, radius: float = 10.0) -> list[list[int]]:
    """Indices of display points grouped greedily when within ``radius`` px of a group's first point."""
    groups: list[list[int]] = []
    for i, p in enumerate(disp):
        g = next((g for g in groups if np.hypot(*(disp[g[0]] - p)) < radius), None)
        g.append(i) if g is not None else groups.append([i])
    return groups


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG (dpi 120) atomically: a temp file in the same folder, then ``os.replace``.

    Args:
        fig: the figure.
        path: destination ending in ``.png``; parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figure path {path} must end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", prefix=f".{path.stem}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=_DPI)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _text_artists(fig: Figure) -> list[tuple[str, int, Text]]:
    """(description, group key, artist) of each visible, non-empty text the figure draws; a tick's two labels
    share a group key."""
    found: list[tuple[str, int, Text]] = []

    def add(role: str, t: Text | None, key: int | None = None) -> None:
        if t is not None and t.get_visible() and t.get_text().strip():
            found.append((f"{role} {t.get_text()!r}", id(t) if key is None else key, t))

    def add_legend(leg) -> None:
        if leg is not None and leg.get_visible():
            add("legend title", leg.get_title())
            for t in leg.get_texts():
                add("legend", t)

    for role in ("suptitle", "supxlabel", "supylabel"):
        add(role, getattr(fig, f"_{role}", None))
    for t in fig.texts:
        add("figure text", t)
    for leg in fig.legends:
        add_legend(leg)
    stack = list(fig.axes)
    while stack:
        ax = stack.pop(0)
        stack += [child for child in ax.child_axes if child not in stack]
        if not ax.get_visible():
            continue
        for role, t in (("title", ax.title), ("left title", ax._left_title), ("right title", ax._right_title)):
            add(role, t)
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if not (ax.axison and axis.get_visible()):
                continue
            add(f"{name}label", axis.label)
            add(f"{name} offset", axis.offsetText)
            for tick in axis._update_ticks():  # the ticks actually drawn, with current labels
                add(f"{name}tick", tick.label1, id(tick))
                add(f"{name}tick", tick.label2, id(tick))
        for t in ax.texts:
            if not isinstance(t, Annotation) or t._check_xy(fig.canvas.get_renderer()):
                add("annotation" if isinstance(t, Annotation) else "text", t)
        add_legend(ax.get_legend())
    return found


def _corners(t: Text, renderer) -> np.ndarray:
    """(4, 2) display corners of the text's (possibly rotated) box."""
    box = Text.get_window_extent(t, renderer)
    angle = t.get_rotation()
    if angle % 90 == 0:
        return np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1]])
    t.set_rotation(0)
    flat = Text.get_window_extent(t, renderer)
    t.set_rotation(angle)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [flat.width / 2, flat.height / 2]
    # The rotated box's axis-aligned extent is centred on its own centre, whatever the alignment mode.
    return half @ np.array([[c, s], [-s, c]]) + [(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2]


def _polygons_overlap(p: np.ndarray, q: np.ndarray, tol: float = 1.0) -> bool:
    """Whether two convex quadrilaterals overlap by more than ``tol`` px along every separating axis."""
    for poly in (p, q):
        for edge in (poly[1] - poly[0], poly[2] - poly[1]):
            norm = math.hypot(*edge)
            if norm == 0:
                return False
            axis = np.array([-edge[1], edge[0]]) / norm
            a, b = p @ axis, q @ axis
            if min(a.max(), b.max()) - max(a.min(), b.min()) <= tol:
                return False
    return True


def text_overlaps(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts (titles, axis and tick labels, annotations, legend entries) that overlap.

    Draws ``fig`` with an Agg canvas (attaching one if it has another kind) and compares the texts' rotated
    boxes in display pixels; overlaps of at most 1 px and the two labels of one tick are ignored.

    Returns:
        ``[(description, description), ...]``, e.g. ``("xtick 'sketch'", "annotation '87.5%'")``; empty when clean.
    """
    canvas = fig.canvas
    if not isinstance(canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)  # measure with Agg, then hand the figure its own canvas back
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        texts = _text_artists(fig)
        boxes = [_corners(t, renderer) for _, _, t in texts]
    finally:
        fig.set_canvas(canvas)
    return [
        (texts[i][0], texts[j][0])
        for i in range(len(texts))
        for j in range(i + 1, len(texts))
        if texts[i][1] != texts[j][1] and _polygons_overlap(boxes[i], boxes[j])
    ]
