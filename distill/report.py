"""One self-contained HTML page per run: config, result tables and plots (images embedded).

    distill report runs/distill/vl2v_adip            # writes runs/distill/vl2v_adip/report.html
    distill report runs/demo --output demo.html      # every run under runs/demo on one page

The page has one section per log folder found under the run folder (``distill.run_files``):
run facts (commit, versions, teacher fingerprint), zero-shot top-1 per domain (teacher vs
student, ID vs OOD, retention), retrieval, diagnostics, the last logged metrics, the plots and
the resolved config; then every export report (sizes, latency, accuracy per variant, with its
trade-off plot) and links to the other HTML reports below the folder. Images are embedded as
base64 PNG, so the file can be mailed or attached as it is. The benchmark reports build their
pages with :func:`write_html` and the table/image helpers here.
"""

from __future__ import annotations

import base64
import html
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from distill.files import atomic_write_text
from distill.run_files import (
    CONFIG_FILE,
    DIAGNOSTICS_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    RUN_INFO_FILE,
    ZEROSHOT_FILE,
    derived_plots,
    diagnostics_rows,
    domain_groups,
    export_plot,
    export_reports,
    last_values,
    log_folders,
    read_json,
    read_metrics,
    relative,
    sorted_domains,
    student_top1,
)

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #1a1a1a; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em; }
.note { color: #555; font-size: .9em; }
"""


@dataclass
class Section:
    """A titled part of a page: ``body`` is HTML (tables, figures, paragraphs)."""

    title: str
    body: str


def table_html(headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> str:
    """An HTML table; floats print with 4 significant digits, None as "-". Empty string when there are no rows."""
    if not rows:
        return ""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    title = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image_html(path: str | os.PathLike, caption: str | None = None) -> str:
    """A PNG embedded as a base64 data URI inside a ``<figure>``."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    text = html.escape(caption or Path(path).stem.replace("_", " "))
    return f'<figure><img src="data:image/png;base64,{data}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def paragraph(text: str) -> str:
    """An escaped paragraph of plain text."""
    return f"<p>{html.escape(text)}</p>"


def render_page(title: str, sections: Sequence[Section], subtitle: str | None = None) -> str:
    """A complete HTML5 document."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<p class="note">{html.escape(subtitle)}</p>')
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>\n{section.body}")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(path: str | os.PathLike, title: str, sections: Sequence[Section], subtitle: str | None = None) -> Path:
    """Write a page atomically (the folder is created); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"written {time.strftime('%Y-%m-%d %H:%M:%S')} by distill"
    return atomic_write_text(path, render_page(title, sections, f"{subtitle} · {stamp}" if subtitle else stamp))


# Run sections --------------------------------------------------------------------------------
def _pct(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 1)


def _accuracy_table(folder: Path, stage: str) -> str:
    zeroshot = read_json(folder / ZEROSHOT_FILE.format(stage=stage))
    diagnostics = read_json(folder / DIAGNOSTICS_FILE.format(stage=stage))
    student = student_top1(zeroshot, diagnostics)
    if not student:
        return ""
    teacher = (diagnostics or {}).get("teacher", {}).get("top1", {})
    id_domains, ood_domains = domain_groups(zeroshot, diagnostics)
    rows = []
    for domain in sorted_domains(student, id_domains, ood_domains):
        group = "ID" if domain in id_domains else "OOD" if domain in ood_domains else "-"
        rows.append((domain, group, student[domain], teacher.get(domain)))
    for key, name in (("id_top1", "ID mean"), ("ood_top1", "OOD mean")):
        if key in student:
            rows.append((name, key[: key.index("_")].upper(), student[key], teacher.get(key)))
    headers = ["domain", "split", "model top-1 (%)"]
    if teacher:
        headers = ["domain", "split", "student top-1 (%)", "teacher top-1 (%)", "retention (%)"]
    body = []
    for domain, group, s, t in rows:
        row = [domain, group, _pct(s)]
        if teacher:
            row += [_pct(t), None if not t else round(100 * s / t, 1)]
        body.append(row)
    split = "validation" if stage == "val" else "test"
    items = f", {diagnostics['items']} items" if teacher and diagnostics and "items" in diagnostics else ""
    return table_html(headers, body, f"Zero-shot top-1 per domain ({split} split{items})")


def _retrieval_table(folder: Path, stage: str) -> str:
    zeroshot = read_json(folder / ZEROSHOT_FILE.format(stage=stage)) or {}
    metrics = zeroshot.get("metrics", {})
    rows = [(k, _pct(v)) for k, v in sorted(metrics.items()) if k.startswith(("i2t_", "t2i_"))]
    return table_html(["retrieval", "recall (%)"], rows, f"Image-text retrieval ({stage})")


def _diagnostics_table(folder: Path, stage: str) -> str:
    diagnostics = read_json(folder / DIAGNOSTICS_FILE.format(stage=stage))
    if not diagnostics:
        return ""
    columns, rows = diagnostics_rows(diagnostics)
    return table_html(columns, rows, f"Diagnostics ({stage}, {diagnostics.get('items', '?')} items)")


def _run_info_table(folder: Path) -> str:
    info = read_json(folder / RUN_INFO_FILE)
    if not info:
        return ""
    rows = []
    for key, value in info.items():
        if isinstance(value, dict):
            for sub, item in value.items():
                rows.append((f"{key}.{sub}", item if not isinstance(item, (dict, list)) else str(item)))
        elif isinstance(value, list):
            rows.append((key, " ".join(map(str, value))))
        else:
            rows.append((key, value))
    return table_html(["fact", "value"], rows, "Run")


def _metrics_table(folder: Path) -> str:
    if not (folder / METRICS_FILE).is_file():
        return ""
    series = read_metrics(folder / METRICS_FILE)
    rows = []
    for prefix in ("train/", "val/", "test/"):
        for key, value in sorted(last_values(series, prefix).items()):
            steps = series[prefix + key]
            rows.append((prefix + key, value, steps[-1][0]))
    return table_html(["metric", "last value", "at step"], rows, "Last logged values (metrics.csv)")


def run_section(folder: Path, root: Path) -> Section | None:
    """The section of one log folder, or None when it holds nothing to show."""
    parts = [_run_info_table(folder)]
    for stage in ("test", "val"):
        parts += [_accuracy_table(folder, stage), _retrieval_table(folder, stage), _diagnostics_table(folder, stage)]
    parts.append(_metrics_table(folder))
    plots = sorted((folder / PLOTS_DIR).glob("*.png")) if (folder / PLOTS_DIR).is_dir() else []
    parts += [image_html(p) for p in plots]
    config = folder / CONFIG_FILE
    if config.is_file():
        text = html.escape(config.read_text(encoding="utf-8"))
        parts.append(f"<details><summary>Resolved config ({CONFIG_FILE})</summary><pre>{text}</pre></details>")
    body = "\n".join(p for p in parts if p)
    return Section(f"Run: {relative(folder, root)}", body) if body else None


def export_section(report_path: Path, root: Path) -> Section:
    """Sizes, latency and accuracy of every variant of an export report, and its trade-off plot."""
    from distill.export.report import variant_label

    report = read_json(report_path) or {}
    rows = [
        [
            variant_label(name),
            row.get("size_mib"),
            row.get("latency_ms_b1"),
            row.get("latency_ms_b32"),
            row.get("id_top1"),
            row.get("ood_top1"),
            row.get("gate", "-"),
        ]
        for name, row in report.get("variants", {}).items()
    ]
    headers = ["variant", "size (MiB)", "ms @ batch 1", "ms @ batch 32", "ID top-1 (%)", "OOD top-1 (%)", "gate"]
    parts = [table_html(headers, rows, f"Export variants ({report.get('num_eval_images', '?')} task images)")]
    plot = report_path.parent / PLOTS_DIR / "export_tradeoff.png"
    if plot.is_file():
        parts.append(image_html(plot, "accuracy vs latency and size per export variant"))
    if report.get("failures"):
        parts.append(paragraph("Gates missed: " + "; ".join(map(str, report["failures"]))))
    return Section(f"Export: {relative(report_path.parent, root)}", "\n".join(p for p in parts if p))


def write_run_report(run_dir: str, output: str | None = None, plots: bool = True) -> Path:
    """Write the HTML report of a run folder (and every run below it); prints and returns its path.

    Args:
        run_dir: a run folder (``trainer.default_root_dir``) or any folder above several runs.
        output: the HTML file (default ``<run_dir>/report.html``).
        plots: redraw the plots that the run's files allow (per-domain top-1, diagnostics,
            retention, export trade-off) before writing; plots drawn from embeddings during the
            run (confusion matrix, retrieval grid) are kept as they are.
    """
    root = Path(run_dir)
    folders = log_folders(root)
    exports = export_reports(root)
    if not folders and not exports:
        raise FileNotFoundError(
            f"{root} holds no run files (metrics.csv, config.yaml, zeroshot_*.json, diagnostics_*.json or an "
            "export report.json): give the run's trainer.default_root_dir"
        )
    target = Path(output) if output else root / "report.html"
    sections = []
    for folder in tqdm(folders, desc="report: runs", disable=len(folders) < 4):
        if plots:
            derived_plots(folder)
        section = run_section(folder, root)
        if section is not None:
            sections.append(section)
    for path in exports:
        if plots:
            export_plot(path)
        sections.append(export_section(path, root))
    others = sorted(p for p in root.rglob("*.html") if p.resolve() != target.resolve())
    if others:
        links = "".join(
            f'<li><a href="{html.escape(os.path.relpath(p, target.parent))}">{html.escape(relative(p, root))}</a></li>'
            for p in others
        )
        sections.append(Section("Other reports in this folder", f"<ul>{links}</ul>"))
    path = write_html(
        target, f"distill report: {root}", sections, f"{len(folders)} run folder(s), {len(exports)} export(s)"
    )
    print(f"report: {path}")
    return path


def markdown_html(text: str) -> str:
    """The small markdown subset the benchmark reports print (``#`` headings, pipe tables, paragraphs) as HTML."""
    blocks, table, paragraph_lines = [], [], []

    def flush() -> None:
        if table:
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
            body = [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            blocks.append(table_html(rows[0], body))
            table.clear()
        if paragraph_lines:
            blocks.append(paragraph(" ".join(paragraph_lines)))
            paragraph_lines.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            if paragraph_lines:
                flush()
            table.append(stripped)
            continue
        flush()
        if stripped.startswith("#"):
            level = min(len(stripped) - len(stripped.lstrip("#")) + 1, 4)
            blocks.append(f"<h{level}>{html.escape(stripped.lstrip('#').strip())}</h{level}>")
        elif stripped:
            paragraph_lines.append(stripped)
    flush()
    return "\n".join(b for b in blocks if b)


def report_command(args: list[str] | None = None) -> Path:
    """``distill report RUN_DIR [--output FILE] [--plots false]``: :func:`write_run_report` from the command line.

    A missing or empty run folder is one line on stderr and exit status 2, not a traceback.
    """
    from jsonargparse import CLI

    try:
        return CLI(write_run_report, args=args, as_positional=True, prog="distill report")
    except (FileNotFoundError, ValueError) as err:
        print(f"distill report: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
