"""What a run folder holds, how to read it, and the plots drawn from its files alone.

A ``distill fit``/``test`` run writes, in its log folder (``<default_root_dir>/logs/version_N``
with the CSV logger): ``config.yaml`` (the resolved config), ``run_info.json`` (commit,
versions, teacher fingerprint), ``metrics.csv`` (every logged value by step),
``zeroshot_<stage>.json`` (``ZeroShotEvaluation``), ``diagnostics_<stage>.json``
(``TeacherStudentDiagnostics``) and ``plots/*.png``. An export bundle holds ``report.json``
with ``variants``. The run report (``distill report``) and the callbacks read them through
this module; the plots drawn here need only these files, so a report can be rebuilt later.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from distill.plots import plot_diagnostics, plot_domain_accuracy, plot_export_tradeoff, plot_retention

ZEROSHOT_FILE = "zeroshot_{stage}.json"
DIAGNOSTICS_FILE = "diagnostics_{stage}.json"
METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
PLOTS_DIR = "plots"
STAGES = ("val", "test")
#: Files that mark a folder as a run's log folder.
RUN_MARKERS = (
    METRICS_FILE,
    CONFIG_FILE,
    RUN_INFO_FILE,
    *(f.format(stage=s) for s in STAGES for f in (ZEROSHOT_FILE, DIAGNOSTICS_FILE)),
)


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when the file is absent.

    Raises:
        ValueError: the file is not valid JSON (names the file).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def read_metrics(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every column of a Lightning ``metrics.csv`` as ``(step, value)`` pairs (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    series.setdefault(key, []).append((int(float(step)), float(value)))
                except ValueError:
                    continue  # a non-numeric column (never written by Lightning's loggers)
    return series


def last_values(series: dict[str, list[tuple[int, float]]], prefix: str) -> dict[str, float]:
    """The last value of every column starting with ``prefix`` (the prefix removed from the key)."""
    return {key[len(prefix) :]: values[-1][1] for key, values in series.items() if key.startswith(prefix) and values}


def log_folders(run_dir: str | os.PathLike) -> list[Path]:
    """Folders under ``run_dir`` (itself included) holding run files, in path order.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder not found: {root}")
    found = {p.parent for marker in RUN_MARKERS for p in root.rglob(marker)}
    return sorted(p for p in found if "wandb" not in p.relative_to(root).parts)


def export_reports(run_dir: str | os.PathLike) -> list[Path]:
    """Export reports (``report.json`` of ``distill export``, holding ``variants``) under ``run_dir``."""
    reports, seen = [], set()
    for path in sorted(Path(run_dir).rglob("*.json")):
        if path.name in ("report.json", "export_report.json"):
            data = read_json(path)
            content = path.read_bytes()
            # export_report.py copies the bundle's report beside it: one section per distinct report.
            if isinstance(data, dict) and isinstance(data.get("variants"), dict) and content not in seen:
                seen.add(content)
                reports.append(path)
    return reports


def domain_groups(*payloads: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """The ID and OOD domain names recorded in zero-shot or diagnostics files (the first that has them)."""
    for payload in payloads:
        if payload and "id_domains" in payload:
            return list(payload["id_domains"]), list(payload.get("ood_domains", []))
    return [], []


def student_top1(zeroshot: dict[str, Any] | None, diagnostics: dict[str, Any] | None) -> dict[str, float]:
    """Per-domain top-1 of the run's model: beside a teacher, the diagnostics' (measured on the same items as the
    teacher's, so the two compare); else ``ZeroShotEvaluation``'s (every item), else the diagnostics'."""
    if diagnostics and diagnostics.get("teacher", {}).get("top1") and diagnostics.get("student", {}).get("top1"):
        return dict(diagnostics["student"]["top1"])
    if zeroshot:
        metrics = zeroshot.get("metrics", {})
        out = {k[len("top1_") :]: v for k, v in metrics.items() if k.startswith("top1_")}
        out.update({k: metrics[k] for k in ("id_top1", "ood_top1") if k in metrics})
        if out:
            return out
    return dict((diagnostics or {}).get("student", {}).get("top1", {}))


def model_name(diagnostics: dict[str, Any], who: str) -> str:
    """How tables and plots name a diagnostics side: the run's own model is the "student" only beside a teacher."""
    return "model" if who == "student" and "teacher" not in diagnostics else who


def diagnostics_rows(diagnostics: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The diagnostics as one table: columns ``model, domain, <metrics...>``; a row per model (or the
    student-teacher agreement) and domain ("all" first). Missing values are None."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for who in ("student", "teacher"):
        for domain, values in diagnostics.get(who, {}).get("geometry", {}).items():
            rows[(model_name(diagnostics, who), domain)] = dict(values)
    for domain, values in diagnostics.get("agreement", {}).items():
        rows[("student vs teacher", domain)] = dict(values)
    metrics = sorted({m for values in rows.values() for m in values})
    return ["model", "domain", *metrics], [[w, d, *(v.get(m) for m in metrics)] for (w, d), v in rows.items()]


def diagnostics_values(diagnostics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Panels of the diagnostics plot: agreement metrics per domain, geometry metrics teacher vs student."""
    values: dict[str, dict[str, float]] = {}
    for domain, metrics in diagnostics.get("agreement", {}).items():
        for metric, value in metrics.items():
            values.setdefault(metric, {})[domain] = value
    for who in ("teacher", "student"):
        for metric, value in diagnostics.get(who, {}).get("geometry", {}).get("all", {}).items():
            values.setdefault(metric, {})[model_name(diagnostics, who)] = value
    return {m: {k: v for k, v in d.items() if v is not None and not math.isnan(v)} for m, d in values.items()}


def derived_plots(folder: str | os.PathLike, stages: Iterable[str] = STAGES) -> list[Path]:
    """Draw the plots a log folder's files allow into ``<folder>/plots``; returns the written PNGs.

    Per stage: per-domain top-1 (the run's model, and the teacher when diagnostics recorded it),
    the diagnostics panels; once: retention (student / teacher top-1, ID and OOD) over training steps.
    """
    folder = Path(folder)
    plots = folder / PLOTS_DIR
    written: list[Path] = []
    for stage in stages:
        zeroshot = read_json(folder / ZEROSHOT_FILE.format(stage=stage))
        diagnostics = read_json(folder / DIAGNOSTICS_FILE.format(stage=stage))
        id_domains, ood_domains = domain_groups(zeroshot, diagnostics)
        student = student_top1(zeroshot, diagnostics)
        teacher = (diagnostics or {}).get("teacher", {}).get("top1") or None
        split = "validation" if stage == "val" else "test"
        if student and (id_domains or ood_domains):
            written.append(
                plot_domain_accuracy(
                    plots / f"domain_top1_{stage}.png",
                    student,
                    teacher,
                    id_domains,
                    ood_domains,
                    student_label="student" if teacher else "model",
                    teacher_label="teacher",
                    title=f"Zero-shot top-1 per domain ({split} split{_items(teacher, diagnostics)})",
                )
            )
        if diagnostics:
            values = diagnostics_values(diagnostics)
            if values:
                written.append(
                    plot_diagnostics(
                        plots / f"diagnostics_{stage}.png",
                        values,
                        title=f"Embedding diagnostics ({split} split, {diagnostics.get('items', '?')} items)",
                    )
                )
    metrics_file = folder / METRICS_FILE
    if metrics_file.is_file():
        retention = retention_series(read_metrics(metrics_file))
        if retention:
            steps, series = retention
            written.append(
                plot_retention(
                    plots / "retention.png",
                    steps,
                    series,
                    title="Retention of the teacher's top-1 over training (validation)",
                )
            )
    return written


def _items(teacher: dict[str, float] | None, diagnostics: dict[str, Any] | None) -> str:
    """ ", N items" when the values come from the diagnostics (a subsample when the split is larger)."""
    return f", {diagnostics['items']} items" if teacher and diagnostics and "items" in diagnostics else ""


def retention_series(metrics: dict[str, list[tuple[int, float]]]) -> tuple[list[int], dict[str, list[float]]] | None:
    """Steps and ``{"ID": [...], "OOD": [...]}`` from the logged ``val/<group>_retention`` columns."""
    columns = {"ID": metrics.get("val/id_retention", []), "OOD": metrics.get("val/ood_retention", [])}
    columns = {k: v for k, v in columns.items() if v}
    if not columns:
        return None
    steps = sorted({s for values in columns.values() for s, _ in values})
    series = {}
    for name, values in columns.items():
        by_step = dict(values)
        series[name] = [by_step.get(s, math.nan) for s in steps]
    return steps, series


def export_variants(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the export trade-off plot from an export ``report.json`` (variants with size, latency and accuracy)."""
    from distill.export.report import variant_label

    rows = []
    for name, row in report.get("variants", {}).items():
        if {"size_mib", "latency_ms_b1", "id_top1"} <= set(row):
            rows.append(
                {
                    "name": variant_label(name),
                    "size_mib": row["size_mib"],
                    "latency_ms": row["latency_ms_b1"],
                    "accuracy": row["id_top1"] / 100.0,
                    **({"ood_accuracy": row["ood_top1"] / 100.0} if "ood_top1" in row else {}),
                }
            )
    return rows


def export_plot(report_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path | None:
    """The size / latency / accuracy plot of an export report (beside it, or at ``out``); None when it has no rows."""
    report_path = Path(report_path)
    rows = export_variants(read_json(report_path) or {})
    if not rows:
        return None
    target = Path(out) if out else report_path.parent / PLOTS_DIR / "export_tradeoff.png"
    return plot_export_tradeoff(target, rows, title="Export variants: accuracy vs latency and size (this CPU)")


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a string ("." for the root itself)."""
    rel = path.relative_to(root)
    return "." if rel == Path(".") else str(rel)


def sorted_domains(values: dict[str, float], id_domains: Sequence[str], ood_domains: Sequence[str]) -> list[str]:
    """Domain names in report order: ID, then OOD, then any other."""
    order = [*id_domains, *ood_domains]
    return [d for d in order if d in values] + sorted(d for d in values if d not in order and not d.endswith("_top1"))
