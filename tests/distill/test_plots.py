"""Figures: every builder on realistic inputs has no colliding or cut text, labelled axes, and saves a PNG."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from distill import plot_layout, plot_reports, plots

DOMAINS = ["flat", "outline", "texture", "shaded", "sketch", "pixel", "night"]
SHAPES = ["pentagon", "hexagon", "star", "circle", "square", "triangle", "cross", "heart", "crescent", "diamond"]
CLASSES = [f"{a} {s}" for a in ("a rounded", "a tall thin", "a small", "a striped") for s in SHAPES]
CAPTIONS = [
    "a small red pentagon in the upper left corner next to a blue circle",
    "two striped hexagons on a dark background at night",
    "a sketch of a star",
    "a pixelated heart drawn with thick outlines, shaded in green and partially covered by a square",
]
METHODS = ["zero-shot CLIP", "CoOp", "CoCoOp", "MaPLe", "PromptSRC", "LoRA (r=4, q/v)", "linear probe"]
VARIANTS = [
    ("PyTorch FP32", 21.3, 4.1, 0.912),
    ("PyTorch FP16", 10.7, 2.9, 0.911),
    ("ONNX FP32", 21.3, 3.2, 0.912),
    ("ONNX FP16", 10.7, 2.5, 0.911),
    ("ORT INT8 dynamic", 5.6, 2.1, 0.890),
    ("ORT INT8 static QDQ (per-channel)", 5.6, 1.6, 0.905),
    ("ORT INT8 static QDQ (per-tensor)", 5.5, 1.5, 0.887),
    ("bitsandbytes INT8 (LLM.int8)", 6.0, 6.3, 0.900),
]


def _inputs() -> dict[str, tuple[tuple, dict]]:
    """Arguments of each builder, keyed by the plot name (``<name>_figure`` / ``plot_<name>``)."""
    rng = np.random.default_rng(0)
    student = {d: float(v) for d, v in zip(DOMAINS, rng.uniform(0.4, 1.0, len(DOMAINS)))}
    student["flat"] = 1.0
    teacher = {d: min(1.0, v + 0.05) for d, v in student.items()}
    confusion = rng.integers(0, 4, (40, 40)) + np.diag(rng.integers(20, 60, 40))
    images = [[Image.new("RGB", (24, 24), (40 * r, 90, 200 - 30 * q)) for r in range(5)] for q in range(4)]
    hits = [[r == q for r in range(5)] for q in range(4)]
    diag = {
        "cka": {"teacher": 1.0, "student": 0.82, "student (LoRA)": 0.85},
        "modality_gap": {"teacher": 0.82, "student": 0.61, "student (LoRA)": math.nan},
        "affinity_kl": {"student": 0.31, "student (LoRA)": 0.22},
        "uniformity_image": {"teacher": -1.9, "student": -2.7, "student (LoRA)": -2.5},
    }
    adapt = [
        {"method": m, "base": 0.8, "novel": 0.6 + 0.03 * i, "hm": 0.7, "hm_std": 0.02} for i, m in enumerate(METHODS)
    ]
    shots = {
        m: [(s, 0.5 + 0.08 * math.log2(s) + 0.01 * i) for s in (1, 2, 4, 8, 16)] for i, m in enumerate(METHODS[1:5])
    }
    export = [
        {"name": n, "size_mib": s, "latency_ms": lat, "accuracy": a, "ood_accuracy": a - 0.15}
        for n, s, lat, a in VARIANTS
    ]
    steps = [0, 500, 1000, 1500, 2000]
    return {
        "domain_accuracy": ((student, teacher, DOMAINS[:4], DOMAINS[4:]), {}),
        "retention": ((steps, {"ID": [0.5, 0.8, 0.9, 0.95, 0.97], "OOD": [0.4, 0.7, math.nan, 0.85, 0.9]}), {}),
        "confusion": ((confusion, CLASSES), {}),
        "retrieval_grid": ((CAPTIONS, images, hits), {}),
        "diagnostics": ((diag,), {}),
        "adaptation": ((adapt,), {}),
        "shots": ((shots,), {"baseline": 0.55}),
        "export_tradeoff": ((export,), {}),
    }


# (xlabel, ylabel) of the first axes; None where the figure has no axis labels (image grid, small multiples).
LABELS = {
    "domain_accuracy": ("domain", "top-1 accuracy (%)"),
    "retention": ("training step", "retention (% of teacher)"),
    "confusion": ("predicted class", "true class"),
    "retrieval_grid": None,
    "diagnostics": None,
    "adaptation": ("method", "top-1 accuracy (%)"),
    "shots": ("shots per class", "top-1 accuracy (%)"),
    "export_tradeoff": ("latency at batch 1 (ms)", "top-1 accuracy (%)"),
}


def _cut_texts(fig: Figure) -> list[str]:
    """Texts that reach past the figure's edge (call after a draw)."""
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox.padded(1)
    cut = []
    for name, _, t in plot_layout._text_artists(fig):
        box = t.get_window_extent(renderer)
        if not (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)):
            cut.append(name)
    return cut


@pytest.mark.parametrize("name", list(LABELS))
def test_builder_is_readable_and_saves_png(name, tmp_path):
    import matplotlib.pyplot as plt

    open_figures = len(plt.get_fignums())
    args, kwargs = _inputs()[name]
    fig = getattr(plots, f"{name}_figure")(*args, **kwargs)
    assert plots.text_overlaps(fig) == []
    assert _cut_texts(fig) == []
    assert fig.get_suptitle()
    if LABELS[name] is not None:
        assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == LABELS[name]
    if name == "diagnostics":
        assert all(ax.get_ylabel() and ax.get_title() for ax in fig.axes if ax.get_visible())
    path = getattr(plots, f"plot_{name}")(tmp_path / "figs" / f"{name}.png", *args, **kwargs)
    assert path == tmp_path / "figs" / f"{name}.png"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert 500 <= img.width <= 2500 and 400 <= img.height <= 2000
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
    assert len(plt.get_fignums()) == open_figures


def test_confusion_shows_the_classes_with_most_errors():
    counts = np.diag([10.0] * 6)
    counts[1, 4] = 3  # classes 1 and 4 carry errors, class 5 more
    counts[5, 0] = 1
    counts[5, 2] = 5
    fig = plots.confusion_figure(counts, [f"class {i}" for i in range(6)], max_classes=3, title="Errors")
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["class 1", "class 2", "class 5"]  # in class order; row + column off-diagonal mass 3, 5, 6
    assert " ".join(fig.get_suptitle().split()) == "Errors (3 of 6 classes with the most errors)"  # wrapped
    big = plots.confusion_figure(_inputs()["confusion"][0][0], CLASSES, max_classes=25)
    assert len(big.axes[0].get_xticklabels()) == len(big.axes[0].get_yticklabels()) == 25
    assert "(25 of 40 classes with the most errors)" in " ".join(big.get_suptitle().split())
    assert not big.axes[0].texts  # no cell annotations above 12 classes
    small = plots.confusion_figure(np.array([[3, 1], [0, 0]]), ["flat", "night"])
    assert [t.get_text() for t in small.axes[0].texts] == ["75", "25"]  # the empty row is NaN, not annotated


def test_nan_values_are_skipped():
    diag = plots.diagnostics_figure({"cka": {"teacher": 1.0, "student": math.nan}, "alignment": {"student": math.nan}})
    assert sum(len(c) for c in diag.axes[0].containers) == 1
    assert [t.get_text() for t in diag.axes[1].texts] == ["no finite values"]
    student = {"flat": 0.9, "outline": 0.8, "sketch": 0.5}
    fig = plots.domain_accuracy_figure(student, {"flat": 0.95, "sketch": 0.6}, ["flat", "outline", "pixel"], ["sketch"])
    # Student: flat, outline, sketch, ID mean, OOD mean; teacher: flat, sketch, OOD mean (its ID mean lacks outline).
    assert sum(len(c) for c in fig.axes[0].containers) == 8
    labels = sorted(t.get_text() for t in fig.axes[0].texts)
    assert "85.0%" in labels and "95.0%" in labels
    assert plots.text_overlaps(plots.retention_figure([1, 2], {"ID": [math.nan, math.nan]})) == []


def test_text_overlaps_finds_colliding_text_only():
    fig = Figure()
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "an overlapping label")
    ax.text(0.52, 0.5, "another one")
    ax.text(0.1, 0.1, "far away")
    assert plots.text_overlaps(fig) == [("text 'an overlapping label'", "text 'another one'")]


def test_export_labels_use_names_when_they_fit():
    variants = [
        {"name": "FP32", "size_mib": 21.0, "latency_ms": 4.0, "accuracy": 0.91},
        {"name": "INT8", "size_mib": 5.5, "latency_ms": 1.5, "accuracy": 0.89},
    ]
    fig = plots.export_tradeoff_figure(variants)
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["FP32", "INT8"]
    crowded = plots.export_tradeoff_figure(_inputs()["export_tradeoff"][0][0])
    # Equal size and accuracy put PyTorch and ONNX FP32 on one spot: one numbered label for both.
    assert "1, 3" in {t.get_text() for t in crowded.axes[1].texts}


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(3, 3\), expected \(2, 2\)"):
        plots.confusion_figure(np.zeros((3, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="query 0: 2 images but 1 hit flags"):
        plots.retrieval_grid_figure(["q"], [[Image.new("RGB", (4, 4))] * 2], [[True]])
    with pytest.raises(ValueError, match=r"adaptation row 0 lacks \['hm'\]"):
        plots.adaptation_figure([{"method": "CoOp", "base": 0.8, "novel": 0.7}])
    with pytest.raises(ValueError, match="series 'ID' has 1 values but there are 2 steps"):
        plots.retention_figure([1, 2], {"ID": [0.5]})
    with pytest.raises(ValueError, match="must end in .png"):
        plots.save_figure(Figure(), tmp_path / "x.jpg")


def test_public_names_stay_importable_from_plots():
    expected = {"OKABE_ITO", "save_figure", "text_overlaps"} | {f"{n}_figure" for n in LABELS}
    expected |= {f"plot_{n}" for n in LABELS}
    assert set(plots.__all__) == expected and all(hasattr(plots, n) for n in expected)
    assert set(plot_reports.__all__) < expected and set(plot_layout.__all__) < expected
    assert plots.shots_figure is plot_reports.shots_figure and plots.text_overlaps is plot_layout.text_overlaps
