"""Shared fixtures: the tiny open_clip model config and a random tiny teacher folder."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Tests are CPU-only and must not reach any hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The tests' architecture, an open_clip model config shipped in distill/model_configs and
# registered on import of distill.clip_models: ModifiedResNet of width 8 at 32 px, 1-layer text.
TINY_MODEL = "tiny-rn-test"  # its ViT-shaped sibling, tiny-vit-test, backs tests/distill/conftest.py


@pytest.fixture
def tiny_config() -> dict:
    """A copy of the tiny model's open_clip config (for tests that pass or edit a config dict)."""
    import open_clip

    import distill.clip_models  # noqa: F401  (registers the model configs)

    return open_clip.get_model_config(TINY_MODEL)


@pytest.fixture
def tiny_local_dir(tmp_path):
    """A random tiny open_clip model saved as a ``local-dir`` folder."""
    from distill.clip_models import build_clip, save_local_dir

    torch.manual_seed(0)
    bundle = build_clip(model_name=TINY_MODEL)
    return save_local_dir(bundle.model, bundle.model_config, bundle.preprocess_config, tmp_path / "tiny_teacher")


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own folder: nothing a test writes (configs, logs) lands in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _cli_args_only(monkeypatch):
    """``main(args)`` is the whole command line: pytest's own arguments are not in ``sys.argv`` (else
    LightningCLI warns on stderr, which the one-line error tests read when ``-p no:warnings`` is given)."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
