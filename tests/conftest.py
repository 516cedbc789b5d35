"""Shared fixtures: a tiny open_clip config and a tiny trained-or-random teacher folder."""

from __future__ import annotations

import os

import pytest
import torch

# Tests are CPU-only and must not reach any hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_config() -> dict:
    """A copy of an open_clip model config small enough for CPU tests (32 px, 1-layer text)."""
    import copy

    return copy.deepcopy(TINY_CONFIG)


@pytest.fixture
def tiny_local_dir(tmp_path, tiny_config):
    """A random tiny open_clip model saved as a ``local-dir`` folder."""
    from distill.clip_models import build_clip, save_local_dir

    torch.manual_seed(0)
    bundle = build_clip(model_config=tiny_config)
    return save_local_dir(bundle.model, bundle.model_config, bundle.preprocess_config, tmp_path / "tiny_teacher")
