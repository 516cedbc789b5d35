"""Export: ONNX towers, parity gates, INT8, the torch-free runner and the bundle."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from distill.datamodules import ShapesWorldDataModule
from distill.export import pipeline
from distill.export.command import Gates, eval_set_from_datamodule, load_checkpoint
from distill.export.parity import ParityError
from distill.export.pipeline import export_bundle
from distill.export.preprocess_spec import preprocess_spec
from distill.export.runtime import EdgeClassifier, preprocess
from distill.modules import DistillationModule
from distill.students import OpenClipStudent, TimmStudent
from distill.teachers import Teacher

STUDENT_TEXT = {
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _module(teacher_dir, dual_tower=False):
    torch.manual_seed(0)
    student = (
        (lambda d: OpenClipStudent(d, STUDENT_TEXT))
        if dual_tower
        else (lambda d: TimmStudent(d, "test_resnet", image_size=32))
    )
    return DistillationModule(teacher=Teacher(model_name=f"local-dir:{teacher_dir}"), student=student).eval()


def _data():
    return ShapesWorldDataModule(
        image_size=32,
        num_train=48,
        num_val=8,
        num_test=42,
        batch_size=16,
        train_domains=["flat", "outline"],
        ood_domains=["night"],
    )


def _eval_set(module, data):
    with torch.no_grad():
        bank = module.class_bank(data.classnames, data.templates)
    return eval_set_from_datamodule(data, bank, "test")


def _export(module, tmp_path, **kwargs):
    data = _data()
    calibration = [s["image"] for s in data.raw_samples("train", 16)]
    kwargs = {"quantize": [], "bitsandbytes": [], "latency_repeats": 2, **kwargs}
    return export_bundle(module, _eval_set(module, data), calibration, tmp_path / "bundle", **kwargs)


def _batch_sizes_work(path, shape, dtype):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = np.random.rand(batch, *shape).astype(dtype) if dtype == np.float32 else np.ones((batch, *shape), dtype)
        assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape[0] == batch


def test_timm_student_exports_passes_the_fp32_gate_and_quantises(tiny_local_dir, tmp_path):
    module = _module(tiny_local_dir)
    report = _export(module, tmp_path, quantize=["dynamic", "static"], bitsandbytes=[8])
    bundle = tmp_path / "bundle"
    fp32 = report["variants"]["onnx_fp32"]
    assert fp32["gate"] == "passed" and fp32["max_abs_diff"] <= 1e-4
    assert report["variants"]["onnx_fp32"]["id_top1"] == pytest.approx(report["variants"]["pytorch_fp32"]["id_top1"])
    static = report["variants"]["onnx_int8_static"]
    assert static["ops"]["integer_ops"].get("QLinearConv", 0) > 0  # convolutions really run in INT8
    assert static["size_ratio_vs_fp32"] < 0.6
    assert report["variants"]["pytorch_bnb8"]["linear_layers"] == 1
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["default_image_model"] in meta["image_models"] and meta["text_model"] is None
    for variant in meta["image_models"].values():
        _batch_sizes_work(bundle / variant["file"], (3, 32, 32), np.float32)
    assert not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())  # no temporary folder left
    assert "| ORT fp32 |" in (bundle / "report.md").read_text()


def test_open_clip_dual_tower_exports_both_towers(tiny_local_dir, tmp_path):
    module = _module(tiny_local_dir, dual_tower=True)
    report = _export(module, tmp_path)
    assert report["variants"]["onnx_fp32"]["gate"] == "passed"
    assert report["variants"]["onnx_text_fp32"]["gate"] == "passed"
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    _batch_sizes_work(tmp_path / "bundle" / meta["text_model"], (32,), np.int64)
    _batch_sizes_work(tmp_path / "bundle" / "image_fp32.onnx", (3, 32, 32), np.float32)


def test_wrong_normalisation_in_the_bundle_fails_the_gate(tiny_local_dir, tmp_path, monkeypatch):
    module = _module(tiny_local_dir)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "previous.txt").write_text("an earlier bundle")

    def wrong_mean(transform):
        return {**preprocess_spec(transform), "mean": [0.0, 0.0, 0.0]}

    monkeypatch.setattr(pipeline, "preprocess_spec", wrong_mean)
    with pytest.raises(ParityError, match="image fp32: max abs diff"):
        _export(module, tmp_path)
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["previous.txt"]  # untouched
    failed = json.loads((tmp_path / "bundle.failed.json").read_text())
    assert failed["variants"]["onnx_fp32"]["gate"].startswith("failed")
    assert not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())


def test_a_failing_int8_gate_is_loud_or_dropped(tiny_local_dir, tmp_path):
    module = _module(tiny_local_dir)
    with pytest.raises(ParityError, match="int8_dynamic"):
        _export(module, tmp_path, quantize=["dynamic"], gates=Gates(int8_max_top1_drop=-1.0))
    report = _export(
        module, tmp_path, quantize=["dynamic"], gates=Gates(int8_max_top1_drop=-1.0, allow_failed_int8=True)
    )
    assert report["variants"]["onnx_int8_dynamic"]["gate"].startswith("failed: ID top-1 drops")
    assert not (tmp_path / "bundle" / "image_int8_dynamic.onnx").exists()
    assert report["default_image_model"] == "fp32"


def test_runner_matches_torchvision_and_imports_no_torch(tiny_local_dir, tmp_path):
    module = _module(tiny_local_dir)
    _export(module, tmp_path)
    image = _data().raw_samples("test", 1)[0]["image"].resize((40, 52))  # non-square: resize + crop
    spec = preprocess_spec(module.preprocess_val)
    np.testing.assert_allclose(preprocess(image, spec), module.preprocess_val(image).numpy(), atol=1e-6)
    image_path = tmp_path / "shape.png"
    image.save(image_path)
    bundle = tmp_path / "bundle"
    # The bundle's own run.py in a fresh interpreter where any torch import fails.
    code = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(bundle / "run.py"), str(bundle), str(image_path), "--top", "3"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(image_path) and len(lines) == 4 and lines[1].strip().endswith(tuple(_data().classnames))
    top = EdgeClassifier(bundle).classify([image], top=1)[0][0]
    assert top[0] in lines[1]


def test_bad_checkpoint_output_folder_and_opset(tiny_local_dir, tmp_path):
    module = _module(tiny_local_dir)
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("hello")
    with pytest.raises(ValueError, match="is not a distill checkpoint"):
        load_checkpoint(module, not_ckpt)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="has no 'state_dict'"):
        load_checkpoint(module, tmp_path / "plain.pt")
    torch.save(
        {"state_dict": {"student.x": torch.zeros(1)}, "distill": {"module": "ContrastiveModule"}},
        tmp_path / "other.ckpt",
    )
    with pytest.raises(ValueError, match="written by ContrastiveModule"):
        load_checkpoint(module, tmp_path / "other.ckpt")
    torch.save({"state_dict": {"student.x": torch.zeros(1)}}, tmp_path / "mismatch.ckpt")
    with pytest.raises(ValueError, match="does not match DistillationModule"):
        load_checkpoint(module, tmp_path / "mismatch.ckpt")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot create the export folder's parent"):
        export_bundle(module, None, [], blocker / "sub" / "bundle")
    with pytest.raises(ValueError, match="opset"):
        _export(module, tmp_path, opset=7)
    assert not (tmp_path / "bundle").exists()
    assert not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())


def test_runner_rejects_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    from distill.export.runtime import main

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main([str(tmp_path), str(tmp_path / "x.png")]) == 2
    assert "is not a distill edge bundle" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2


def test_distill_export_command_from_a_training_checkpoint(tmp_path, monkeypatch, tiny_config, capsys):
    from distill.cli import main
    from distill.clip_models import build_clip, save_local_dir

    monkeypatch.chdir(tmp_path)
    tiny = build_clip(model_config=tiny_config)
    save_local_dir(tiny.model, tiny.model_config, tiny.preprocess_config, "runs/demo/teacher/open_clip")
    base = [
        "--config",
        str(Path(__file__).resolve().parents[2] / "configs" / "distill" / "base.yaml"),
        "--config",
        str(Path(__file__).resolve().parents[2] / "configs" / "distill" / "labels_only.yaml"),
        "--data.init_args.num_train=16",
        "--data.init_args.num_val=14",
        "--data.init_args.num_test=21",
        "--data.init_args.batch_size=8",
        "--model.init_args.student.init_args.image_size=32",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
    ]
    cli = main(
        ["fit", *base, "--trainer.max_steps=2", "--trainer.default_root_dir=run", "--trainer.enable_progress_bar=false"]
    )
    ckpt = "student.ckpt"
    cli.trainer.save_checkpoint(ckpt, weights_only=True)
    export = [
        "export",
        *base,
        "--output_dir=bundle",
        "--quantize=[static]",
        "--bitsandbytes=[]",
        "--num_calibration_images=16",
        "--latency_repeats=2",
    ]
    main([*export, f"--ckpt_path={ckpt}"])
    assert "| ORT INT8 static QDQ (per-channel) |" in capsys.readouterr().out
    meta = json.loads(Path("bundle/bundle.json").read_text())
    assert set(meta["image_models"]) == {"fp32", "int8_static"}  # a failing INT8 gate would have raised
    Path("bad.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        main([*export, "--ckpt_path=bad.ckpt"])
    assert exit_info.value.code == 2 and "is not a distill checkpoint" in capsys.readouterr().err


def test_bitsandbytes_copy_keeps_the_resnet_attention_pool_float():
    """The ResNet attention pool passes its projections' weights to F.multi_head_attention_forward:
    they must stay float in the bitsandbytes copy (an int8 weight there fails at the first forward)."""
    from distill.clip_models import build_clip
    from distill.export.bnb import quantise_linears

    model = build_clip(model_name="tiny-rn-test").model.eval()
    images = torch.rand(2, 3, 32, 32)
    quantised, info = quantise_linears(model, 8)
    assert quantised.visual.attnpool.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(quantised.encode_image(images), model.encode_image(images))
    assert info["linear_layers"] == 2  # the text MLP (c_fc, c_proj): the only plain Linear layers left
