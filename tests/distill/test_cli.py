"""The CLI end to end: fit, test, validate and predict, and bad input fails in one line.

The shipped configs are run by tests/test_configs.py.
"""

from pathlib import Path

import pytest
import torch

from distill.cli import main

SMALL_DATA = [
    "--data.init_args.num_train=16",
    "--data.init_args.num_val=14",
    "--data.init_args.num_test=14",
    "--data.init_args.batch_size=7",
]


ROOT = Path(__file__).resolve().parents[2]


def test_fit_then_test_then_teacher_from_checkpoint(tmp_path, monkeypatch, tiny_config):
    """Train two steps, reload the checkpoint and the exported folder as teachers: same embeddings."""
    import yaml

    from distill.teachers import Teacher

    monkeypatch.chdir(tmp_path)
    args = [
        "--model=ContrastiveModule",
        "--model.init_args.model_config",
        yaml.safe_dump(tiny_config),
        "--model.init_args.export_dir=exported",
        "--data=ShapesWorldDataModule",
        *SMALL_DATA,
        "--trainer.max_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.default_root_dir=run",
        "--trainer.enable_progress_bar=false",
    ]
    cli = main(["fit", *args])
    ckpt = next(Path("run").rglob("*.ckpt"))
    trained = cli.model.model.eval()
    tokens = cli.model.tokenizer(["a red circle"])
    images = torch.rand(2, 3, 32, 32)
    for teacher in (Teacher(checkpoint=str(ckpt)), Teacher(model_name="local-dir:exported")):
        torch.testing.assert_close(teacher.encode_text(tokens), trained.encode_text(tokens, normalize=True))
        torch.testing.assert_close(teacher.encode_image(images), trained.encode_image(images, normalize=True))
    main(["test", *args, f"--ckpt_path={ckpt}"])
    assert (Path("run") / "logs" / "version_1" / "metrics.csv").is_file()  # fit wrote version_0, test version_1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.init_args.model_name=ViT-B-33"], "unknown open_clip model name 'ViT-B-33'; did you mean"),
        (["--data.init_args.train_domains=[flat,cartoon]"], "unknown ShapesWorld domain(s) ['cartoon']"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--model=ContrastiveModule",
                "--model.init_args.model_name=RN50",
                "--data=ShapesWorldDataModule",
                *args,
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill: error:") and message in err and "Traceback" not in err


def test_missing_checkpoint_file(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "test",
                "--model=ZeroShotModule",
                "--model.init_args.checkpoint=missing/teacher.ckpt",
                "--data=ShapesWorldDataModule",
            ]
        )
    assert "teacher checkpoint not found: missing/teacher.ckpt" in capsys.readouterr().err


def test_unknown_config_key_and_class_split(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model=ContrastiveModule", "--model.init_args.learning_rat=0.1"])
    assert "learning_rat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--model=ContrastiveModule",
                "--data=ShapesWorldDataModule",
                "--data.init_args.train_classes=unseen",
            ]
        )
    assert "unseen" in capsys.readouterr().err


def test_help_comes_from_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--data.help", "ShapesWorldDataModule"])
    out = capsys.readouterr().out
    assert "held-out domains evaluated as OOD" in out


def test_validate_and_predict_with_a_frozen_teacher(tmp_path, monkeypatch, tiny_local_dir):
    monkeypatch.chdir(tmp_path)
    args = [
        "--model=ZeroShotModule",
        f"--model.init_args.model_name=local-dir:{tiny_local_dir}",
        "--data=ShapesWorldDataModule",
        *SMALL_DATA,
        "--data.init_args.train_domains=[flat,outline]",
        "--trainer.accelerator=cpu",
        "--trainer.default_root_dir=run",
        "--trainer.callbacks+=ZeroShotEvaluation",
        "--trainer.enable_progress_bar=false",
    ]
    cli = main(["validate", *args])
    metrics = cli.trainer.callback_metrics
    assert {"val/id_top1", "val/ood_top1", "val/i2t_r1", "val/top5_night"} <= set(metrics)
    assert 0.0 <= float(metrics["val/id_top1"]) <= 1.0
    cli = main(["predict", *args])
    predictions = cli.trainer.predict_loop.predictions
    assert predictions[0]["image_embeds"].shape == (7, 32)


def test_unknown_timm_student_is_one_clear_line(tmp_path, monkeypatch, capsys, tiny_local_dir):
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "distill" / "base.yaml"
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(config),
                f"--model.init_args.teacher.model_name=local-dir:{tiny_local_dir}",
                "--model.init_args.student.init_args.model_name=mobilenetv9_tiny",
            ]
        )
    err = capsys.readouterr().err
    assert "distill: error: unknown timm model name 'mobilenetv9_tiny'" in err


def test_one_cycle_length_and_log_folder_come_from_the_trainer(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [
        "--model=ContrastiveModule",
        "--model.init_args.model_name=tiny-rn-test",
        "--model.init_args.lr_scheduler=torch.optim.lr_scheduler.OneCycleLR",
        "--model.init_args.lr_scheduler.init_args.max_lr=0.01",
        "--data=ShapesWorldDataModule",
        *SMALL_DATA,
        "--trainer.max_steps=3",
        "--trainer.default_root_dir=onecycle",
        "--trainer.enable_progress_bar=false",
    ]
    cli = main(["fit", *args])
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 3  # trainer.max_steps, not typed twice
    assert cli.trainer.logger.log_dir == str(Path("onecycle") / "logs" / "version_0")
    with pytest.raises(SystemExit):
        main(["fit", *args, "--trainer.max_steps=-1"])
    assert "OneCycleLR runs for trainer.max_steps: set trainer.max_steps" in capsys.readouterr().err


def test_model_and_data_must_be_distill_classes(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model=lightning.pytorch.demos.boring_classes.BoringModel"])
    assert "VisionLanguageTask" in capsys.readouterr().err


def test_config_typos_are_one_line_with_the_closest_names(tmp_path, capsys):
    (tmp_path / "typo.yaml").write_text(
        "data:\n  class_path: ImageTextDataModule\n  init_args:\n    train_cvs: a.csv\n"
    )
    cases = [
        (
            ["--config", str(tmp_path / "typo.yaml")],
            "ImageTextDataModule has no option 'train_cvs'; did you mean 'train_csv'?",
        ),
        (["--trainer.max_stepz=3"], "unknown option 'trainer.max_stepz'; did you mean 'trainer.max_steps'"),
        (
            ["--trainer.max_step=3"],
            "unknown option 'trainer.max_step'; did you mean 'trainer.max_steps'",
        ),  # no abbreviations
        (["--data=ShapesWorldDataModule", "--data.init_args.batch_size=0"], "batch_size must be a positive number"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--model=ContrastiveModule", "--model.init_args.model_name=tiny-rn-test", *args])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("distill: error: ") and message in err
