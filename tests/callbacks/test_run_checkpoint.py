"""Runs resume: last.ckpt at a fixed place, a SIGKILLed run resumes to the same weights, Ctrl-C and NaN."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from distill.cli import main

# Test-only callbacks and objectives, importable by the `distill` subprocesses through PYTHONPATH.
HELPERS = """
import os
import signal

import lightning.pytorch as pl
import torch

from distill.objectives import Objective


class KillAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception: a crash


class InterruptAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class NanAfter(Objective):
    def __init__(self, calls: int, weight: float = 1.0) -> None:
        super().__init__(weight=weight, name="nan_after")
        self.calls, self.seen = calls, 0

    def forward(self, outputs):
        self.seen += 1
        value = outputs["image_embeds"].pow(2).mean()
        return value * float("nan") if self.seen > self.calls else value
"""


@pytest.fixture
def helpers(tmp_path, monkeypatch):
    folder = tmp_path / "helpers"
    folder.mkdir()
    (folder / "run_helpers.py").write_text(textwrap.dedent(HELPERS))
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("run_helpers", None)


def _args(teacher, root, steps=10):
    # 48 training items in batches of 8: 6 steps per epoch, so step 8 is in the middle of epoch 2.
    return [
        "--seed_everything=3",
        "--model=DistillationModule",
        f"--model.init_args.teacher.model_name=local-dir:{teacher}",
        "--model.init_args.student=distill.students.TimmStudent",
        "--model.init_args.student.init_args.model_name=test_resnet",
        "--model.init_args.student.init_args.image_size=32",
        "--model.init_args.objectives=[{class_path: distill.kd_objectives.LabelCrossEntropy}, "
        "{class_path: distill.kd_objectives.FeatureDistillation}]",
        "--data=ShapesWorldDataModule",
        "--data.init_args.image_size=32",
        "--data.init_args.num_train=48",
        "--data.init_args.num_val=14",
        "--data.init_args.batch_size=8",
        "--data.init_args.augment=trivialaugment",  # random draws per batch: the RNG must resume too
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.deterministic=true",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
    ]


def _fit(args, cwd, helpers) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{helpers}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = "import sys; from distill.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, "fit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, tiny_local_dir, helpers):
    whole = _fit([*_args(tiny_local_dir, "whole")], tmp_path, helpers)
    assert whole.returncode == 0, whole.stderr[-3000:]
    every_step = "--trainer.callbacks=[{class_path: RunCheckpoint, init_args: {every_n_train_steps: 1}}]"
    killed = _fit(
        [
            *_args(tiny_local_dir, "killed"),
            every_step,
            "--trainer.callbacks+=run_helpers.KillAt",
            "--trainer.callbacks.init_args.step=8",
        ],
        tmp_path,
        helpers,
    )
    assert killed.returncode == -9  # SIGKILL, mid-epoch
    saved = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] in (7, 8)  # the kill came right before or after step 8's save
    resumed = _fit([*_args(tiny_local_dir, "killed"), every_step, "--ckpt_path=last"], tmp_path, helpers)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = (
        _weights(tmp_path / "whole/checkpoints/last.ckpt"),
        _weights(tmp_path / "killed/checkpoints/last.ckpt"),
    )
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_ctrl_c_saves_and_nan_keeps_the_last_good_checkpoint(tmp_path, tiny_local_dir, helpers, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        main(
            [
                "fit",
                *_args(tiny_local_dir, "ctrl_c"),
                "--trainer.callbacks+=run_helpers.InterruptAt",
                "--trainer.callbacks.init_args.step=3",
            ]
        )
    assert torch.load(tmp_path / "ctrl_c/checkpoints/last.ckpt", weights_only=True)["global_step"] == 3

    nan = [
        *_args(tiny_local_dir, "nan"),
        "--trainer.callbacks=[{class_path: RunCheckpoint, init_args: {every_n_train_steps: 2}}]",
        "--model.init_args.objectives=[{class_path: run_helpers.NanAfter, init_args: {calls: 5}}]",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *nan])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("distill: error: loss term 'nan_after' is nan") and "at step 5" in err
    assert "the last good checkpoint is" in err
    assert torch.load(tmp_path / "nan/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4


def test_resume_with_nothing_to_resume_and_output_folders_under_a_file(tmp_path, tiny_local_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_args(tiny_local_dir, "fresh"), "--ckpt_path=last"])
    assert exit_info.value.code == 2
    assert "nothing to resume: fresh/checkpoints/last.ckpt does not exist" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit):
        main(["fit", *_args(tiny_local_dir, "a_file/run")])
    assert "distill: error: trainer.default_root_dir a_file/run cannot be created: " in capsys.readouterr().err
    contrastive = [
        "--model=ContrastiveModule",
        "--model.init_args.model_name=tiny-rn-test",
        "--model.init_args.export_dir=a_file/open_clip",
        "--data=ShapesWorldDataModule",
        "--trainer.default_root_dir=ok",
        "--trainer.max_steps=1",
    ]
    with pytest.raises(SystemExit):
        main(["fit", *contrastive])
    assert "distill: error: model export_dir a_file/open_clip cannot be created" in capsys.readouterr().err
