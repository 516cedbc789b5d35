"""The demo teacher recipe reaches its accuracy bar (slow: ~10 minutes on 2 CPU cores).

Run with ``pytest -m slow tests/test_demo_teacher.py``.
"""

from pathlib import Path

import pytest

from distill.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"


@pytest.mark.slow
def test_demo_teacher_reaches_90_percent_zero_shot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "teacher.yaml")]
    cli = main(["fit", *configs, "--trainer.enable_progress_bar=false"])
    assert float(cli.trainer.callback_metrics["val/id_top1"]) >= 0.90
    assert (tmp_path / "runs/demo/teacher/open_clip/open_clip_config.json").is_file()
