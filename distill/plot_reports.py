"""Report-level figures: base-to-novel accuracy per adaptation method, accuracy against shots per class, and the
accuracy vs latency / size trade-off of export variants.

Same conventions as :mod:`distill.plots`, which re-exports every public name here: ``*_figure(...) -> Figure``
builders without pyplot, ``plot_*(path, ...) -> Path`` savers, fractions in and % shown, Okabe-Ito colours.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from distill.plot_layout import (
    _MARKERS,
    OKABE_ITO,
    _bar_labels,
    _category_ticks,
    _cluster,
    _esc,
    _figure,
    _fractions_to_percent,
    _percent_axis,
    _place_labels,
    _suptitle,
    save_figure,
)

__all__ = [
    "adaptation_figure",
    "export_tradeoff_figure",
    "plot_adaptation",
    "plot_export_tradeoff",
    "plot_shots",
    "shots_figure",
]


def adaptation_figure(rows: Sequence[Mapping[str, Any]], title: str = "Base-to-novel accuracy per method") -> Figure:
    """Grouped bars (base, novel, harmonic mean) per adaptation method, with optional std error bars.

    Args:
        rows: one mapping per method with ``method``, ``base``, ``novel``, ``hm`` (fractions) and optional
            ``base_std``, ``novel_std``, ``hm_std`` (fractions).
        title: figure title.
    """
    for i, row in enumerate(rows):
        missing = [key for key in ("method", "base", "novel", "hm") if key not in row]
        if missing:
            raise ValueError(f"adaptation row {i} lacks {missing}")
    fig = _figure(2.6 + 1.2 * len(rows), 4.6)
    ax = fig.add_subplot()
    for k, (key, label) in enumerate((("base", "base classes"), ("novel", "novel classes"), ("hm", "harmonic mean"))):
        xs = np.arange(len(rows)) + (k - 1) * 0.27
        pct = _fractions_to_percent([row[key] for row in rows])
        std = _fractions_to_percent([row.get(f"{key}_std") or 0.0 for row in rows])
        ax.bar(xs, pct, 0.26, yerr=std, capsize=2, color=OKABE_ITO[k], label=label, error_kw={"lw": 1})
        _bar_labels(ax, xs, pct + std, pct)
    _category_ticks(ax, range(len(rows)), [row["method"] for row in rows], 1.2)
    ax.set_xlabel("method")
    _percent_axis(ax)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    _suptitle(fig, title)
    return fig


def shots_figure(
    series: Mapping[str, Sequence[tuple[int, float]]],
    baseline: float | None = None,
    title: str = "Few-shot accuracy",
    baseline_label: str = "zero-shot",
) -> Figure:
    """Accuracy against the number of shots per class (log2 axis), one line per method, dashed baseline.

    Args:
        series: per method, ``(shots, accuracy)`` pairs; shots >= 1, accuracy a fraction.
        baseline: accuracy (fraction) drawn as a dashed line, e.g. zero-shot; None for none.
        title: figure title.
        baseline_label: legend name of the baseline.
    """
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    shots = sorted({int(s) for pts in series.values() for s, _ in pts})
    if not shots or shots[0] < 1:
        raise ValueError(f"shots per class must be >= 1 on a log2 axis, got {shots}")
    for k, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        ax.plot(
            [s for s, _ in pts],
            _fractions_to_percent([a for _, a in pts]),
            marker=_MARKERS[k % 10],
            color=OKABE_ITO[k % 8],
            label=_esc(name),
        )
    if baseline is not None:
        ax.axhline(100 * baseline, ls="--", color="0.35", lw=1.2, label=_esc(baseline_label))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    _suptitle(fig, title)
    return fig


def export_tradeoff_figure(variants: Sequence[Mapping[str, Any]], title: str = "Export variants") -> Figure:
    """Accuracy against latency and against size, one marker per export variant.

    Points carry the variant names when they fit without collisions, else numbers keyed by the legend; variants
    at the same spot share one label. Open markers (same colour) show the OOD accuracy when given.

    Args:
        variants: one mapping per variant with ``name``, ``size_mib``, ``latency_ms`` (batch 1), ``accuracy``
            (ID top-1, fraction) and optional ``ood_accuracy`` (fraction).
        title: figure title.
    """
    for i, v in enumerate(variants):
        missing = [key for key in ("name", "size_mib", "latency_ms", "accuracy") if key not in v]
        if missing:
            raise ValueError(f"export variant {i} lacks {missing}")
    if not variants:
        raise ValueError("variants is empty")
    has_ood = any(v.get("ood_accuracy") is not None for v in variants)
    fig = _figure(11.0, 5.0 + 0.22 * math.ceil(len(variants) / 2))
    axes = fig.subplots(1, 2)
    acc = _fractions_to_percent([v["accuracy"] for v in variants])
    ood = _fractions_to_percent([math.nan if v.get("ood_accuracy") is None else v["ood_accuracy"] for v in variants])
    for ax, key, xlabel in zip(axes, ("latency_ms", "size_mib"), ("latency at batch 1 (ms)", "size (MiB)")):
        xs = np.array([float(v[key]) for v in variants])
        for i in range(len(variants)):
            style = {"color": OKABE_ITO[i % 8], "marker": _MARKERS[i % 10], "ms": 8, "ls": "none"}
            ax.plot([xs[i]], [acc[i]], **style)
            if not math.isnan(ood[i]):
                ax.plot([xs[i], xs[i]], [acc[i], ood[i]], color=OKABE_ITO[i % 8], lw=0.8, alpha=0.6)
                ax.plot([xs[i]], [ood[i]], **style, mfc="white", mew=1.5)
        if xs.min() > 0 and xs.max() / xs.min() > 10:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.margins(0.18)
    handles = [Line2D([], [], color=OKABE_ITO[i % 8], marker=_MARKERS[i % 10], ls="none") for i in range(len(variants))]
    names = [f"{i + 1}  {_esc(v['name'])}" for i, v in enumerate(variants)]
    if has_ood:
        handles += [Line2D([], [], color="0.3", marker="o", ls="none", mfc=mfc) for mfc in ("0.3", "white")]
        names += ["filled: ID top-1", "open: OOD top-1"]
    legend = fig.legend(handles, names, loc="outside lower center", ncols=2, fontsize=9)
    _suptitle(fig, title)
    fig.canvas.draw()  # lay the figure out, so label placement sees final positions
    for ax in axes:
        ax.set_xlim(ax.get_xlim())
        ax.set_ylim(ax.get_ylim())
    if _label_panels(fig, axes, variants, acc, ood, use_names=True):
        for t, v in zip(legend.get_texts(), variants):
            t.set_text(_esc(v["name"]))  # the points carry the names: no numbers needed
    else:
        _label_panels(fig, axes, variants, acc, ood, use_names=False)
    return fig


def _label_panels(
    fig: Figure, axes, variants: Sequence[Mapping[str, Any]], acc: np.ndarray, ood: np.ndarray, use_names: bool
) -> bool:
    """Label the points of both panels with names (False, nothing left behind, if one collides) or numbers."""
    text = [_esc(v["name"]) if use_names else str(i + 1) for i, v in enumerate(variants)]
    done = []
    for ax, key in zip(axes, ("latency_ms", "size_mib")):
        xs = np.array([float(v[key]) for v in variants])
        pts = np.stack([xs, acc], 1)
        groups = _cluster(ax.transData.transform(pts))
        labels = [("; " if use_names else ", ").join(text[i] for i in g) for g in groups]
        markers = np.concatenate([pts, np.stack([xs, ood], 1)])
        placed = _place_labels(fig, ax, pts[[g[0] for g in groups]], labels, markers, force=not use_names)
        if placed is None:
            for ann in done:
                ann.remove()
            return False
        done += placed
    return True


def plot_adaptation(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """:func:`adaptation_figure` saved to ``path`` (PNG); returns the path."""
    return save_figure(adaptation_figure(*args, **kwargs), path)


def plot_shots(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """:func:`shots_figure` saved to ``path`` (PNG); returns the path."""
    return save_figure(shots_figure(*args, **kwargs), path)


def plot_export_tradeoff(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """:func:`export_tradeoff_figure` saved to ``path`` (PNG); returns the path."""
    return save_figure(export_tradeoff_figure(*args, **kwargs), path)
