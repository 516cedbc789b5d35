"""The run report: a sound, self-contained HTML page built from a run folder's files alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from distill.report import markdown_html, table_html, write_run_report
from distill.run_files import derived_plots, read_json, read_metrics, retention_series

DOMAINS_ID, DOMAINS_OOD = ["flat", "outline"], ["sketch"]


def _write_run(folder: Path) -> Path:
    """A log folder as a distillation run leaves it: metrics, zero-shot and diagnostics files, config, run facts."""
    folder.mkdir(parents=True)
    rows = ["epoch,step,train/loss,val/id_top1,val/id_retention,val/ood_retention"]
    rows += [f"0,{s},{2.0 - s / 100},,," for s in (9, 19)] + ["0,19,,0.8,0.85,0.6", "1,39,,0.9,0.95,0.7"]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    (folder / "config.yaml").write_text("model:\n  class_path: DistillationModule\n")
    (folder / "run_info.json").write_text(json.dumps({"git_commit": "a" * 40, "teacher": {"name": "t"}}))
    metrics = {"top1_flat": 0.9, "top1_outline": 0.8, "top1_sketch": 0.5, "id_top1": 0.85, "ood_top1": 0.5}
    metrics |= {"i2t_r1": 0.3, "t2i_r1": 0.2}
    zeroshot = {"stage": "test", "metrics": metrics, "id_domains": DOMAINS_ID, "ood_domains": DOMAINS_OOD}
    (folder / "zeroshot_test.json").write_text(json.dumps(zeroshot))
    geometry = {"all": {"modality_gap": 0.8, "uniformity_image": -1.5, "image_r1": 0.7}}
    diagnostics = {
        "stage": "test",
        "items": 30,
        "id_domains": DOMAINS_ID,
        "ood_domains": DOMAINS_OOD,
        "student": {"geometry": geometry},
        "teacher": {"geometry": geometry, "top1": {"flat": 1.0, "outline": 0.9, "sketch": 1.0, "id_top1": 0.95}},
        "agreement": {"all": {"cka": 0.9, "cosine": 0.8}, "flat": {"cka": 0.95, "cosine": float("nan")}},
    }
    (folder / "diagnostics_test.json").write_text(json.dumps(diagnostics))
    return folder


def test_metrics_and_retention_read_back_by_step(tmp_path):
    folder = _write_run(tmp_path / "run" / "logs" / "version_0")
    series = read_metrics(folder / "metrics.csv")
    assert series["train/loss"] == [(9, 1.91), (19, 1.81)]
    steps, retention = retention_series(series)
    assert steps == [19, 39] and retention == {"ID": [0.85, 0.95], "OOD": [0.6, 0.7]}


def test_report_page_is_sound_and_holds_the_runs_tables_and_plots(tmp_path, html_problems):
    folder = _write_run(tmp_path / "run" / "logs" / "version_0")
    path = write_run_report(str(tmp_path / "run"))
    assert path == tmp_path / "run" / "report.html"
    assert html_problems(path) == []
    page = path.read_text()
    # The plots the files allow were drawn beside the run's files and embedded.
    drawn = sorted(p.name for p in (folder / "plots").glob("*.png"))
    assert drawn == ["diagnostics_test.png", "domain_top1_test.png", "retention.png"]
    assert page.count("<img ") == 3 and 'src="data:image/png;base64,' in page
    # Teacher vs student with retention: flat 90 % of a 100 % teacher; the OOD mean has no teacher value.
    assert re.search(r"<td>flat</td><td>ID</td><td>90</td><td>100</td><td>90</td>", page)
    assert re.search(r"<td>OOD mean</td><td>OOD</td><td>50</td><td>-</td><td>-</td>", page)
    assert "a" * 40 in page and "class_path: DistillationModule" in page
    assert "Run: logs/version_0" in page


def test_report_covers_an_export_and_links_other_pages(tmp_path, html_problems):
    _write_run(tmp_path / "demo" / "student" / "logs" / "version_0")
    bundle = tmp_path / "demo" / "export" / "bundle"
    bundle.mkdir(parents=True)
    variants = {
        "onnx_fp32": {"size_mib": 1.5, "latency_ms_b1": 0.5, "latency_ms_b32": 8.0, "id_top1": 97.6, "ood_top1": 77.2},
        "onnx_int8_static": {"size_mib": 0.4, "latency_ms_b1": 0.4, "id_top1": 96.8, "gate": "passed"},
    }
    (bundle / "report.json").write_text(json.dumps({"variants": variants, "num_eval_images": 64}))
    (tmp_path / "demo" / "export" / "export_report.html").write_text("<!DOCTYPE html><html></html>")
    path = write_run_report(str(tmp_path / "demo"))
    assert html_problems(path) == []
    page = path.read_text()
    assert "Export: export/bundle" in page and "ORT INT8 static QDQ (per-channel)" in page
    assert (bundle / "plots" / "export_tradeoff.png").is_file()
    assert 'href="export/export_report.html"' in page


def test_report_of_a_folder_without_run_files_says_what_it_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no run files"):
        write_run_report(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        write_run_report(str(tmp_path / "missing"))


def test_a_corrupt_json_file_is_named(tmp_path):
    (tmp_path / "zeroshot_test.json").write_text("{not json")
    with pytest.raises(ValueError, match="zeroshot_test.json is not valid JSON"):
        read_json(tmp_path / "zeroshot_test.json")
    with pytest.raises(ValueError, match="zeroshot_test.json"):
        derived_plots(tmp_path)


def test_markdown_tables_and_headings_become_html():
    text = "## Title\n\nsome words\n| a | b |\n| --- | --- |\n| 1 | x < y |\n"
    out = markdown_html(text)
    assert out.startswith("<h3>Title</h3>")
    assert "<p>some words</p>" in out and "<td>x &lt; y</td>" in out and "<th>a</th>" in out
    assert table_html(["a"], []) == ""  # no empty tables


def test_distill_report_command_writes_the_page_and_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from distill.cli import console_main

    _write_run(tmp_path / "run" / "logs" / "version_0")
    monkeypatch.setattr("sys.argv", ["distill", "report", str(tmp_path / "run"), "--output", str(tmp_path / "a.html")])
    console_main()
    assert (tmp_path / "a.html").is_file()
    assert f"report: {tmp_path / 'a.html'}" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["distill", "report", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as stop:
        console_main()
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == f"distill report: error: run folder not found: {tmp_path / 'nowhere'}"
