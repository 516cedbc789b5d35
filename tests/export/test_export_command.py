"""``distill export`` as a user runs it: which checkpoints and configs it takes, the bundle's
folder mode, and the rule that picks the bundle's default image model."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.cli_errors import checkpoint_module_error
from distill.datamodules import ShapesWorldDataModule
from distill.export.command import eval_set_from_datamodule
from distill.export.pipeline import (
    DEFAULT_MODEL_MAX_LATENCY_RATIO,
    choose_default_image_model,
    default_model_rule,
    export_bundle,
    interleaved_latencies,
)
from distill.modules import ContrastiveModule, DistillationModule
from distill.students import TimmStudent
from distill.teachers import Teacher

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_DATA = [
    "--data.init_args.image_size=32",
    "--data.init_args.num_train=16",
    "--data.init_args.num_val=8",
    "--data.init_args.num_test=14",
    "--data.init_args.batch_size=8",
    "--trainer.logger=false",
    "--trainer.callbacks=[]",
]
DISTILL_RECIPE = [
    "--config",
    str(CONFIGS / "distill" / "base.yaml"),
    "--config",
    str(CONFIGS / "distill" / "labels_only.yaml"),
    "--model.init_args.student.init_args.image_size=32",
]
ZERO_SHOT = ["--config", str(CONFIGS / "demo" / "base.yaml"), "--config", str(CONFIGS / "demo" / "teacher_eval.yaml")]
FAST_EXPORT = ["--quantize=[]", "--bitsandbytes=[]", "--latency_repeats=2", "--output_dir=bundle"]


# The default image model --------------------------------------------------------------------
def test_int8_becomes_the_default_only_when_it_passed_and_is_clearly_faster():
    both = ["fp32", "int8_dynamic", "int8_static"]
    assert DEFAULT_MODEL_MAX_LATENCY_RATIO == 0.5
    name, reason = choose_default_image_model({"fp32": 1.0, "int8_dynamic": 7.0, "int8_static": 0.8}, both)
    assert name == "fp32"
    assert reason == "int8_dynamic at 7.00x, int8_static at 0.80x fp32's batch-1 time (the rule needs at most 0.5x)"
    name, reason = choose_default_image_model({"fp32": 1.0, "int8_dynamic": 7.0, "int8_static": 0.45}, both)
    assert (name, reason) == ("int8_static", "int8_static runs at 0.45x fp32's batch-1 time (at most 0.5x)")
    assert choose_default_image_model({"fp32": 2.0, "int8_static": 1.0}, ["fp32", "int8_static"])[0] == "int8_static"
    assert choose_default_image_model({"fp32": 1.0, "int8_dynamic": 0.3, "int8_static": 0.4}, both)[0] == "int8_dynamic"
    # A fast variant that missed its gate (dropped with allow_failed_int8) is never the default.
    assert choose_default_image_model({"fp32": 1.0, "int8_static": 0.2}, ["fp32"]) == (
        "fp32",
        "no INT8 variant passed its gate",
    )
    assert choose_default_image_model({"fp32": 1.0}, ["fp32"]) == ("fp32", "no INT8 variant was made")
    assert choose_default_image_model({"fp32": 1.0, "int8_static": 0.9}, both, max_ratio=0.95)[0] == "int8_static"


@pytest.mark.parametrize("true_ratio, expected", [(0.8, "fp32"), (1.0, "fp32"), (0.3, "int8_static")])
def test_the_default_does_not_flip_with_latency_noise(true_ratio, expected):
    # Each figure may be off by +-20 % from run to run; the choice must not depend on that noise
    # for the demo student's true INT8 speed (0.8x) nor for a clearly faster or slower variant.
    for fp32_noise in (0.8, 0.9, 1.0, 1.1, 1.2):
        for int8_noise in (0.8, 0.9, 1.0, 1.1, 1.2):
            latencies = {"fp32": fp32_noise, "int8_static": true_ratio * int8_noise}
            assert choose_default_image_model(latencies, ["fp32", "int8_static"])[0] == expected


def test_the_rule_is_stated_in_words():
    assert default_model_rule() == (
        "fp32, unless an INT8 variant passed its gate and its median batch-1 latency is at most 0.5x fp32's "
        "(the ONNX variants timed interleaved, same repeats); then the fastest such variant"
    )


def test_variants_are_timed_in_turn():
    calls = []
    runs = {name: (lambda x, n=name: calls.append((n, len(x)))) for name in ("fp32", "int8_static")}
    timings = interleaved_latencies(runs, np.zeros((5, 3), np.float32), repeats=4, warmup=1)
    assert set(timings) == {"fp32", "int8_static"}
    assert all(set(t) == {"latency_ms_b1", "latency_ms_b32"} and min(t.values()) >= 0 for t in timings.values())
    batch1 = [name for name, size in calls if size == 1]
    assert batch1 == ["fp32", "int8_static"] * 5  # one warm-up each, then round after round
    assert [name for name, size in calls if size == 32] == ["fp32", "int8_static"] * 4  # max(3, 4 // 4) rounds + 1


# The bundle folder ---------------------------------------------------------------------------
def test_bundle_follows_the_umask_and_states_its_default_rule(tiny_local_dir, tmp_path):
    torch.manual_seed(0)
    module = DistillationModule(
        teacher=Teacher(model_name=f"local-dir:{tiny_local_dir}"),
        student=lambda dim: TimmStudent(dim, "test_resnet", image_size=32),
    ).eval()
    data = ShapesWorldDataModule(
        image_size=32, num_train=16, num_test=14, train_domains=["flat", "outline"], ood_domains=["night"]
    )
    with torch.no_grad():
        bank = module.class_bank(data.classnames, data.templates)
    previous = os.umask(0o022)
    try:
        report = export_bundle(
            module,
            eval_set_from_datamodule(data, bank, "test"),
            [],
            tmp_path / "bundle",
            quantize=[],
            bitsandbytes=[],
            latency_repeats=2,
        )
    finally:
        os.umask(previous)
    bundle = tmp_path / "bundle"
    assert bundle.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in bundle.iterdir()} == {
        name: 0o644
        for name in (
            "bundle.json",
            "class_bank.npy",
            "classnames.json",
            "image_fp32.onnx",
            "report.json",
            "report.md",
            "run.py",
        )
    }
    meta = json.loads((bundle / "bundle.json").read_text())
    stored = json.loads((bundle / "report.json").read_text())
    for record in (meta, stored, report):
        assert record["default_image_model"] == "fp32"
        assert record["default_image_model_rule"] == default_model_rule()
        assert record["default_image_model_reason"] == "no INT8 variant was made"
    assert stored["module"] == "DistillationModule" and stored["towers"] == ["image"]
    assert f"Rule: {default_model_rule()}." in (bundle / "report.md").read_text()


# Which checkpoint the command takes ------------------------------------------------------------
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Parsing of ckpt_path" not in err
    lines = [line for line in err.splitlines() if line.startswith("distill:")]
    assert len(lines) == 1, err
    return lines[0]


def test_checkpoint_module_error_names_the_module_and_what_is_accepted():
    distill_cfg = "distill.modules.DistillationModule"
    contrastive = {"_class_path": "distill.modules.ContrastiveModule", "model_name": "tiny-rn-test"}
    assert checkpoint_module_error({"distill": {"module": "DistillationModule"}}, "s.ckpt", distill_cfg) is None
    # A module that its own hyperparameters fully describe: LightningCLI builds it, export takes it.
    ckpt = {"distill": {"module": "ContrastiveModule"}, "hyper_parameters": contrastive}
    assert checkpoint_module_error(ckpt, "t.ckpt", distill_cfg) is None
    ckpt = {"distill": {"module": "ContrastiveModule"}, "hyper_parameters": {"model_name": "tiny-rn-test"}}
    assert checkpoint_module_error(ckpt, "t.ckpt", distill_cfg) == (
        "t.ckpt holds a ContrastiveModule but the config builds a DistillationModule: "
        "pass the --config files the checkpoint was trained with"
    )
    student = {"_class_path": "distill.modules.DistillationModule", "align_steps": 0}
    ckpt = {"distill": {"module": "DistillationModule"}, "hyper_parameters": student}
    assert checkpoint_module_error(ckpt, "s.ckpt", "distill.modules.ZeroShotModule") == (
        "s.ckpt holds a DistillationModule but the config builds a ZeroShotModule, and the checkpoint cannot "
        "rebuild a DistillationModule (student, teacher not saved): pass the --config files the checkpoint was "
        "trained with"
    )
    assert checkpoint_module_error(torch.zeros(2), "w.pt", distill_cfg) == (
        "w.pt is not a distill checkpoint: it holds a Tensor, not a checkpoint dict"
    )


def test_export_refuses_a_checkpoint_the_config_cannot_take_in_one_line(tmp_path, monkeypatch, capsys):
    from distill.cli import main

    monkeypatch.chdir(tmp_path)
    student = {"_class_path": "distill.modules.DistillationModule", "align_steps": 0, "cache_teacher": True}
    torch.save({"state_dict": {}, "distill": {"module": "DistillationModule"}, "hyper_parameters": student}, "s.ckpt")
    torch.save(
        {"state_dict": {}, "distill": {"module": "ContrastiveModule"}, "hyper_parameters": {"model_name": "x"}},
        "t.ckpt",
    )
    cases = [
        (ZERO_SHOT, "s.ckpt", "s.ckpt holds a DistillationModule but the config builds a ZeroShotModule, and"),
        (DISTILL_RECIPE, "t.ckpt", "t.ckpt holds a ContrastiveModule but the config builds a DistillationModule:"),
    ]
    for configs, ckpt, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", *configs, *TINY_DATA, *FAST_EXPORT, f"--ckpt_path={ckpt}"])
        assert exit_info.value.code == 2
        assert _one_error_line(capsys).startswith(f"distill: error: {message}")
    assert not Path("bundle").exists()


# What the command exports -----------------------------------------------------------------------
def test_a_contrastive_checkpoint_exports_both_towers(tmp_path, monkeypatch, capsys):
    """A teacher's checkpoint given with a distillation recipe's configs (the class comes from the checkpoint)."""
    from distill.cli import main

    monkeypatch.chdir(tmp_path)
    teacher = [
        *ZERO_SHOT[:2],
        "--config",
        str(CONFIGS / "demo" / "teacher.yaml"),
        "--model.init_args.model_name=tiny-rn-test",
        "--model.init_args.lr_scheduler=null",
        "--model.init_args.export_dir=null",
        "--trainer.max_time=null",
    ]
    fit = ["fit", *teacher, *TINY_DATA, "--trainer.max_steps=1", "--trainer.num_sanity_val_steps=0"]
    cli = main([*fit, "--trainer.default_root_dir=teacher_run", "--trainer.enable_progress_bar=false"])
    cli.trainer.save_checkpoint("teacher.ckpt", weights_only=True)
    capsys.readouterr()
    # The recipe names a DistillationModule whose teacher folder does not exist here: neither is used.
    main(["export", *DISTILL_RECIPE, *TINY_DATA, *FAST_EXPORT, "--ckpt_path=teacher.ckpt"])
    assert "Export report: ContrastiveModule (image and text towers)" in capsys.readouterr().out
    bundle = Path("bundle")
    report = json.loads((bundle / "report.json").read_text())
    for tower in ("onnx_fp32", "onnx_text_fp32"):
        assert report["variants"][tower]["gate"] == "passed"
        assert report["variants"][tower]["max_abs_diff"] <= 1e-4
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["text_model"] == "text_fp32.onnx" and set(meta["image_models"]) == {"fp32"}
    # The class bank is the contrastive model's own text tower over the task's classes.
    trained = ContrastiveModule(model_name="tiny-rn-test")
    trained.load_state_dict(torch.load("teacher.ckpt", weights_only=True)["state_dict"])
    data = cli.datamodule
    with torch.no_grad():
        bank = trained.eval().class_bank(data.classnames, data.templates)
    np.testing.assert_allclose(np.load(bundle / "class_bank.npy"), bank.numpy(), atol=1e-5)


def test_a_zero_shot_config_exports_the_frozen_model(tmp_path, monkeypatch, tiny_local_dir, capsys):
    from distill.cli import main

    monkeypatch.chdir(tmp_path)
    main(["export", *ZERO_SHOT, *TINY_DATA, *FAST_EXPORT, f"--model.init_args.model_name=local-dir:{tiny_local_dir}"])
    assert "Export report: ZeroShotModule (image and text towers)" in capsys.readouterr().out
    report = json.loads(Path("bundle/report.json").read_text())
    assert report["variants"]["onnx_fp32"]["gate"] == report["variants"]["onnx_text_fp32"]["gate"] == "passed"
    assert {p.name for p in Path("bundle").glob("*.onnx")} == {"image_fp32.onnx", "text_fp32.onnx"}
