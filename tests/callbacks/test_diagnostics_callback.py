"""TeacherStudentDiagnostics and RunReport on a tiny distillation run driven by the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from distill.callbacks import RunReport, TeacherStudentDiagnostics, ZeroShotEvaluation
from distill.cli import main
from distill.clip_models import build_clip, save_local_dir

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "--data.init_args.num_train=16",
    "--data.init_args.num_val=14",
    "--data.init_args.num_test=21",
    "--data.init_args.batch_size=7",
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.align_steps=1",
    "--model.init_args.student.init_args.image_size=32",
]


def _fit(extra: list[str] | None = None):
    torch.manual_seed(0)
    bundle = build_clip(model_name="tiny-rn-test")
    save_local_dir(bundle.model, bundle.model_config, bundle.preprocess_config, "runs/demo/teacher/open_clip")
    configs = [
        "--config",
        str(ROOT / "configs/distill/base.yaml"),
        "--config",
        str(ROOT / "configs/distill/vl2v_adip.yaml"),
    ]
    return main(["fit", *configs, *SMALL, *(extra or [])])


def _callback(cli, kind):
    return next(c for c in cli.trainer.callbacks if isinstance(c, kind))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """One fit (two validations) and one test of a tiny distillation, shared by the tests below."""
    import os

    folder = tmp_path_factory.mktemp("diagnostics")
    old = os.getcwd()
    os.chdir(folder)
    try:
        cli = _fit()
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    finally:
        os.chdir(old)
    return cli, folder / "runs" / "distill" / "vl2v_adip", folder


def test_the_distillation_config_runs_diagnostics_and_the_report(distilled):
    cli = distilled[0]
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert kinds.index(ZeroShotEvaluation) < kinds.index(TeacherStudentDiagnostics) < kinds.index(RunReport)


def test_diagnostics_agree_with_the_zero_shot_evaluation_on_the_same_items(distilled):
    cli, _, folder = distilled
    diagnostics = _callback(cli, TeacherStudentDiagnostics).results["test"]
    zeroshot = _callback(cli, ZeroShotEvaluation).results["test"]
    assert diagnostics["items"] == 21  # every test item (max_items is larger)
    for domain, value in diagnostics["student"]["top1"].items():
        key = domain if domain.endswith("_top1") else f"top1_{domain}"
        assert value == pytest.approx(zeroshot[key], abs=1e-6), domain
    # The teacher's accuracy is what a zero-shot test of the teacher itself gives on the same split.
    teacher_test = main(
        [
            "test",
            "--config",
            str(ROOT / "configs/distill/base.yaml"),
            "--model=ZeroShotModule",
            f"--model.init_args.model_name=local-dir:{folder / 'runs/demo/teacher/open_clip'}",
            "--trainer.logger=false",
            "--trainer.callbacks=[{class_path: ZeroShotEvaluation, init_args: {retrieval: false}}]",
            "--data.init_args.num_test=21",
            "--data.init_args.batch_size=7",
            "--trainer.enable_progress_bar=false",
        ]
    )
    teacher = teacher_test.trainer.callbacks[0].results["test"]
    assert diagnostics["teacher"]["top1"]["id_top1"] == pytest.approx(teacher["id_top1"], abs=1e-6)
    assert diagnostics["teacher"]["top1"]["ood_top1"] == pytest.approx(teacher["ood_top1"], abs=1e-6)
    agreement = diagnostics["agreement"]["all"]
    assert {"cosine", "cka", "top1_agreement", "affinity_kl"} <= set(agreement)
    assert 0 <= agreement["top1_agreement"] <= 1 and agreement["affinity_kl"] >= 0
    assert set(diagnostics["agreement"]) == {"all", *cli.datamodule.domain_names}


def test_diagnostics_are_logged_by_step_and_written_per_stage(distilled):
    cli, root, _ = distilled
    log_dir = root / "logs" / "version_0"
    with open(log_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    teacher = [float(r["val/teacher_id_top1"]) for r in rows if r.get("val/teacher_id_top1")]
    assert len(teacher) == 2  # one per validation
    # Retention is student / teacher: logged when the teacher gets any item right (a random tiny one may not).
    retention = [float(r["val/id_retention"]) for r in rows if r.get("val/id_retention")]
    assert len(retention) == sum(t > 0 for t in teacher)
    assert {"val/diag/cka", "val/diag/student_uniformity_image", "val/diag/teacher_modality_gap"} <= set(rows[0])
    assert {"test/diag/top1_agreement", "test/teacher_id_top1", "test/teacher_ood_top1"} <= set(rows[0])
    saved = json.loads((log_dir / "diagnostics_test.json").read_text())
    assert saved["stage"] == "test" and saved["id_domains"] == list(cli.datamodule.id_domains)


def test_plots_and_the_report_are_written(distilled, html_problems):
    root = distilled[1]
    plots = root / "logs" / "version_0" / "plots"
    names = {p.name for p in plots.glob("*.png")}
    for stage in ("val", "test"):
        expected = {f"domain_top1_{stage}.png", f"diagnostics_{stage}.png", f"confusion_{stage}.png"}
        assert expected | {f"retrieval_{stage}.png"} <= names
    assert "retention.png" in names or "val/id_retention" not in (root / "logs/version_0/metrics.csv").read_text()
    for name in names:
        with Image.open(plots / name) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    report = root / "report.html"
    assert html_problems(report) == []
    assert report.read_text().count("<img ") >= len(names)


def test_the_teacher_embeds_each_kept_item_once_and_subsampling_keeps_every_stride_th(tmp_path):
    calls = []
    cli = _fit(
        [
            "--trainer.callbacks=[{class_path: TeacherStudentDiagnostics, init_args: {max_items: 5, plots: false}}]",
            "--trainer.logger=false",
        ]
    )
    diagnostics = _callback(cli, TeacherStudentDiagnostics)
    assert diagnostics.results["val"]["items"] == 5  # 14 items, every third: indices 0, 3, 6, 9, 12
    assert sorted(k[1] for k in diagnostics._teacher_cache) == [0, 3, 6, 9, 12]
    teacher = cli.model.teacher
    original = teacher.encode_image
    teacher.encode_image = lambda images, **kw: calls.append(images.shape[0]) or original(images, **kw)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    assert calls == []  # a later validation reuses the teacher's embeddings


def test_retention_is_the_student_over_the_teacher_and_skipped_for_a_teacher_at_zero():
    from distill.callbacks.diagnostics_callback import _logged

    result = {
        "student": {"top1": {"id_top1": 0.45, "ood_top1": 0.2}, "geometry": {"all": {"modality_gap": 0.5}}},
        "teacher": {"top1": {"id_top1": 0.9, "ood_top1": 0.0}, "geometry": {"all": {"modality_gap": 0.7}}},
        "agreement": {"all": {"cka": 0.8, "cosine": float("nan")}},
    }
    assert _logged(result, "val") == {
        "val/diag/cka": 0.8,
        "val/diag/student_modality_gap": 0.5,
        "val/diag/teacher_modality_gap": 0.7,
        "val/teacher_id_top1": 0.9,
        "val/teacher_ood_top1": 0.0,
        "val/id_retention": 0.5,
    }
