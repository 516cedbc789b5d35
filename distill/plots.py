"""Result figures for people: per-domain accuracy, retention, confusion, retrieval, diagnostics, adaptation, shots,
export trade-offs.

Each plot is a ``*_figure(...) -> Figure`` builder plus a one-call ``plot_*(path, ...) -> Path`` that saves a PNG
with :func:`save_figure`. Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas, never through
pyplot: no global figure state, and the user's interactive backend is left as it is (``matplotlib.use`` is never
called). Fractions come in as [0, 1] and are shown in %. The palette is Okabe-Ito (colour-blind safe); hits and
misses are also told apart by text and frame width, not by colour alone. :func:`text_overlaps` checks a figure for
colliding labels.

The shared layout machinery lives in :mod:`distill.plot_layout` and the report-level builders (adaptation, shots,
export trade-off) in :mod:`distill.plot_reports`; their public names are re-exported here.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from distill.plot_layout import (
    _MARKERS,
    OKABE_ITO,
    _bar_labels,
    _category_ticks,
    _esc,
    _figure,
    _fractions_to_percent,
    _percent_axis,
    _suptitle,
    save_figure,
    text_overlaps,
)
from distill.plot_reports import (
    adaptation_figure,
    export_tradeoff_figure,
    plot_adaptation,
    plot_export_tradeoff,
    plot_shots,
    shots_figure,
)

__all__ = [
    "OKABE_ITO",
    "adaptation_figure",
    "confusion_figure",
    "diagnostics_figure",
    "domain_accuracy_figure",
    "export_tradeoff_figure",
    "plot_adaptation",
    "plot_confusion",
    "plot_diagnostics",
    "plot_domain_accuracy",
    "plot_export_tradeoff",
    "plot_retention",
    "plot_retrieval_grid",
    "plot_shots",
    "retention_figure",
    "retrieval_grid_figure",
    "save_figure",
    "shots_figure",
    "text_overlaps",
]

_HIT, _MISS = "#009E73", "#D55E00"
_METRIC_UNITS = {
    "cosine": "mean cosine (unitless)",
    "cka": "linear CKA (unitless)",
    "top1_agreement": "fraction of images (unitless)",
    "affinity_kl": "KL divergence (nats)",
    "modality_gap": "centroid distance (unitless)",
    "uniformity": "log mean Gaussian kernel (nats)",
    "alignment": "mean squared distance (unitless)",
    "image_r1": "recall@1 (fraction)",
}


def domain_accuracy_figure(
    student: Mapping[str, float],
    teacher: Mapping[str, float] | None,
    id_domains: Sequence[str],
    ood_domains: Sequence[str],
    student_label: str = "student",
    teacher_label: str = "teacher",
    title: str = "Top-1 accuracy per domain",
) -> Figure:
    """Grouped bars per domain (teacher beside student), ID and OOD domains in shaded groups, then their means.

    Args:
        student: top-1 accuracy (fraction) per domain name; domains missing here are skipped.
        teacher: the teacher's accuracies, or None for student bars only. A mean bar is drawn only when the
            teacher has every domain of the group.
        id_domains: in-distribution domain names, in display order.
        ood_domains: out-of-distribution domain names.
        student_label: legend name of the student.
        teacher_label: legend name of the teacher.
        title: figure title.
    """
    groups = [(g, [d for d in ds if d in student]) for g, ds in (("ID", id_domains), ("OOD", ood_domains))]
    groups = [(g, ds) for g, ds in groups if ds]
    if not groups:
        raise ValueError(f"student has none of the domains {[*id_domains, *ood_domains]}; it has {sorted(student)}")
    names, xs, spans, x = [], [], [], 0.0
    for g, ds in [*groups, ("mean", [f"{g} mean" for g, _ in groups])]:
        spans.append((g, x - 0.5, x + len(ds) - 0.5))
        names += ds
        xs += [x + k for k in range(len(ds))]
        x += len(ds) + 0.6
    models = [(student_label, student, OKABE_ITO[1])]
    if teacher is not None:
        models.insert(0, (teacher_label, teacher, OKABE_ITO[0]))
    longest = max(len(str(d)) for d in names)
    fig = _figure(2.6 + 0.85 * len(xs), 4.2 + 0.045 * max(0, longest - 8))
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for k, (label, acc, color) in enumerate(models):
        vals = [acc.get(d, math.nan) for _, ds in groups for d in ds]
        vals += [np.mean([acc.get(d, math.nan) for d in ds]) for _, ds in groups]
        pos = np.asarray(xs) + (k - (len(models) - 1) / 2) * width
        ok = ~np.isnan(vals)
        pct = _fractions_to_percent(vals)[ok]
        ax.bar(pos[ok], pct, width * 0.95, color=color, label=_esc(label))
        _bar_labels(ax, pos[ok], pct, pct)
    for (_, lo, hi), shade in zip(spans, ("#E8E8E8", "#DCEBF5", "none")):
        ax.axvspan(lo - 0.15, hi + 0.15, color=shade, zorder=0, lw=0)
    top = ax.secondary_xaxis("top")
    top.set_xticks([(lo + hi) / 2 for _, lo, hi in spans], [g for g, _, _ in spans], fontweight="bold")
    top.tick_params(length=0)
    top.spines["top"].set_visible(False)
    ax.set_xlim(spans[0][1] - 0.2, spans[-1][2] + 0.2)
    _category_ticks(ax, xs, names, 0.85)
    ax.set_xlabel("domain")
    _percent_axis(ax)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    _suptitle(fig, title)
    return fig


def retention_figure(
    steps: Sequence[int], series: Mapping[str, Sequence[float]], title: str = "Student retention of teacher accuracy"
) -> Figure:
    """Retention (student / teacher accuracy, as a fraction) of each series against the training step.

    Args:
        steps: training steps, shared by all series.
        series: one sequence of retention fractions per name (e.g. ``{"ID": [...], "OOD": [...]}``); NaN = gap.
        title: figure title.
    """
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    for k, (name, vals) in enumerate(series.items()):
        if len(vals) != len(steps):
            raise ValueError(f"series {name!r} has {len(vals)} values but there are {len(steps)} steps")
        ax.plot(steps, _fractions_to_percent(vals), marker=_MARKERS[k % 10], color=OKABE_ITO[k % 8], label=_esc(name))
    ax.axhline(100, ls="--", color="0.35", lw=1.2, label="teacher (100 %)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if steps:  # from step 0: a short run's one or two validations sit in the run's context
        ax.set_xlim(0, max(steps) * 1.05 + 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("retention (% of teacher)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    _suptitle(fig, title)
    return fig


def confusion_figure(
    confusion: np.ndarray, classnames: Sequence[str], max_classes: int = 25, title: str = "Confusion matrix"
) -> Figure:
    """Row-normalised confusion matrix (% of each true class), restricted to the classes with most errors.

    Args:
        confusion: (C, C) counts, rows = true class, columns = predicted class.
        classnames: the C class names.
        max_classes: when C is larger, only the ``max_classes`` classes with the most off-diagonal counts (row plus
            column) are shown, in their original order.
        title: figure title; the class subset is appended when one is taken.
    """
    counts = np.asarray(confusion, dtype=float)
    c = len(classnames)
    if counts.shape != (c, c):
        raise ValueError(f"confusion has shape {counts.shape}, expected ({c}, {c}) for {c} classnames")
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = 100.0 * counts / counts.sum(1, keepdims=True)
    keep = np.arange(c)
    if c > max_classes:
        off = counts - np.diag(np.diag(counts))
        keep = np.sort(np.argsort(-(off.sum(0) + off.sum(1)), kind="stable")[:max_classes])
        title = f"{title} ({len(keep)} of {c} classes with the most errors)"
    n = len(keep)
    cell = 0.55 if n <= 12 else 0.3
    longest = max(len(str(classnames[i])) for i in keep)
    fig = _figure(n * cell + longest * 0.075 + 2.2, n * cell + longest * 0.055 + 1.4)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    im = ax.imshow(pct[np.ix_(keep, keep)], cmap=cmap, vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, shrink=min(1.0, 0.4 + 0.03 * n)).set_label("% of true class")
    size = 9 if n <= 12 else 8
    ax.set_yticks(range(n), [_esc(classnames[i]) for i in keep], fontsize=size)
    _category_ticks(ax, range(n), [classnames[i] for i in keep], 0.0, size)
    if n <= 12:
        for (r, k), v in np.ndenumerate(pct[np.ix_(keep, keep)]):
            if not np.isnan(v):
                ax.text(k, r, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 50 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    _suptitle(fig, title)
    return fig


def retrieval_grid_figure(
    queries: Sequence[str],
    images: Sequence[Sequence[Any]],
    hits: Sequence[Sequence[bool]],
    title: str = "Text-to-image retrieval: top results per query",
) -> Figure:
    """One row per query: its caption, then the top-k retrieved images with their rank and hit / miss frame.

    Args:
        queries: the query captions.
        images: per query, its retrieved images in rank order (PIL images or (H, W[, 3]) arrays).
        hits: per query and rank, whether the image matches the query.
        title: figure title.
    """
    if not (len(queries) == len(images) == len(hits)) or not queries:
        raise ValueError(f"queries ({len(queries)}), images ({len(images)}) and hits ({len(hits)}) must be as long")
    k = max(len(row) for row in images)
    fig = _figure(2.9 + 1.45 * k, 0.5 + 1.75 * len(queries))
    axes = fig.subplots(len(queries), k + 1, squeeze=False, width_ratios=[1.9] + [1] * k)
    for q, (caption, row, row_hits) in enumerate(zip(queries, images, hits)):
        if len(row) != len(row_hits):
            raise ValueError(f"query {q}: {len(row)} images but {len(row_hits)} hit flags")
        lines = textwrap.wrap(_esc(caption), 28)
        text = "\n".join(lines[:5]) + ("…" if len(lines) > 5 else "")
        axes[q, 0].axis("off")
        axes[q, 0].text(0.0, 0.5, f"Query {q + 1}\n{text}", va="center", ha="left", fontsize=9)
        for r, ax in enumerate(axes[q, 1:]):
            if r >= len(row):
                ax.axis("off")
                continue
            img = np.asarray(row[r].convert("RGB") if hasattr(row[r], "convert") else row[r])
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            color = _HIT if row_hits[r] else _MISS
            for spine in ax.spines.values():
                spine.set(edgecolor=color, linewidth=5 if row_hits[r] else 2)
            ax.set_title(
                f"#{r + 1} {'hit' if row_hits[r] else 'miss'}",
                color=color,
                fontsize=9,
                fontweight="bold" if row_hits[r] else "normal",
            )
    _suptitle(fig, title)
    return fig


def _unit_label(metric: str) -> str:
    return next((u for key, u in _METRIC_UNITS.items() if metric.startswith(key)), f"{metric} (unitless)")


def diagnostics_figure(values: Mapping[str, Mapping[str, float]], title: str = "Embedding diagnostics") -> Figure:
    """Small multiples: one panel per metric, one bar per series (model or group); NaN values are skipped.

    Args:
        values: ``{metric: {series: value}}``, e.g. ``{"cka": {"student": 0.8}, "modality_gap": {...}}``.
        title: figure title.
    """
    if not values:
        raise ValueError("values is empty: give at least one metric")
    series = list(dict.fromkeys(s for inner in values.values() for s in inner))
    widest = max(len(inner) for inner in values.values())
    panel_w = max(3.0, 0.6 * widest + 1.3)
    ncols = max(1, min(3, len(values), int(13 // panel_w)))
    nrows = math.ceil(len(values) / ncols)
    fig = _figure(panel_w * ncols, 3.2 * nrows + 0.5)
    fig.get_layout_engine().set(hspace=0.08, wspace=0.04)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (metric, inner) in zip(axes, values.items()):
        shown = [(s, float(v)) for s, v in inner.items() if v is not None and not math.isnan(float(v))]
        ax.set_title(_esc(metric), fontsize=10)
        ax.set_ylabel(_unit_label(metric), fontsize=9)
        if not shown:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        vals = [v for _, v in shown]
        ax.bar(range(len(shown)), vals, 0.7, color=[OKABE_ITO[series.index(s) % 8] for s, _ in shown])
        for x, v in enumerate(vals):
            ax.annotate(
                f"{v:.2f}" if 0.01 <= abs(v) < 1000 else f"{v:.3g}",
                (x, v),
                xytext=(0, 2 if v >= 0 else -2),
                textcoords="offset points",
                ha="center",
                va="bottom" if v >= 0 else "top",
                fontsize=8,
            )
        ax.axhline(0, color="0.3", lw=0.8)
        ax.margins(x=0.1, y=0.22)
        _category_ticks(ax, range(len(shown)), [s for s, _ in shown], 0.6)
    for ax in axes[len(values) :]:
        ax.set_visible(False)
    _suptitle(fig, title)
    return fig


def plot_domain_accuracy(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """:func:`domain_accuracy_figure` saved to ``path`` (PNG); returns the path."""
    return save_figure(domain_accuracy_figure(*args, **kwargs), path)


def plot_retention(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """:func:`retention_figure` saved to ``path`` (PNG); returns the path."""
    return save_figure(retention_figure(*args, **kwargs), path)


def plot_confusion(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """:func:`confusion_figure` saved to ``path`` (PNG); returns the path."""
    return save_figure(confusion_figure(*args, **kwargs), path)


def plot_retrieval_grid(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """:func:`retrieval_grid_figure` saved to ``path`` (PNG); returns the path."""
    return save_figure(retrieval_grid_figure(*args, **kwargs), path)


def plot_diagnostics(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """:func:`diagnostics_figure` saved to ``path`` (PNG); returns the path."""
    return save_figure(diagnostics_figure(*args, **kwargs), path)
