"""Run metadata: weight fingerprints, the teacher's fingerprint and the git commit."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.run_info import git_commit, git_dirty, model_fingerprint, run_info, teacher_fingerprint
from distill.teachers import Teacher

ROOT = Path(__file__).resolve().parents[2]


class _AThenB(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 4, bias=False)
        self.register_buffer("steps", torch.tensor(7))


class _BThenA(nn.Module):
    """The same names and shapes, created in the other order (so its state dict lists them in that order)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.tensor(7))
        self.b = nn.Linear(2, 4, bias=False)
        self.a = nn.Linear(3, 2)


def test_fingerprint_ignores_creation_order_and_layout_but_sees_every_value():
    first, second = _AThenB(), _BThenA()
    second.load_state_dict(first.state_dict())
    assert list(first.state_dict()) != list(second.state_dict())
    assert model_fingerprint(first) == model_fingerprint(second)
    # A non-contiguous tensor with the same values hashes as its contiguous copy.
    with torch.no_grad():
        second.b.weight.set_(second.b.weight.detach().t().contiguous().t())
    assert not second.b.weight.is_contiguous() and model_fingerprint(first) == model_fingerprint(second)

    with torch.no_grad():
        second.a.weight[1, 2] += 1e-6
    assert model_fingerprint(first) != model_fingerprint(second)
    # dtype is part of the identity, even when the values convert exactly.
    assert model_fingerprint(first) != model_fingerprint(copy.deepcopy(first).double())


def test_fingerprint_is_sha256_of_sorted_headers_and_raw_bytes():
    module = nn.Linear(2, 1)
    expected = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        expected.update((json.dumps([key, str(value.dtype), list(value.shape)]) + "\n").encode())
        expected.update(value.numpy().tobytes())
    assert model_fingerprint(module) == expected.hexdigest()


def test_teacher_fingerprint(tiny_local_dir, tmp_path):
    teacher = Teacher(model_name=f"local-dir:{tiny_local_dir}")
    fingerprint = teacher_fingerprint(teacher)
    assert fingerprint["name"] == "tiny-rn-test"  # the registered open_clip config the folder holds
    assert fingerprint["weights_sha256"] == model_fingerprint(teacher)
    assert fingerprint["preprocess"]["size"] == 32 and fingerprint["dtype"] == "float32"
    assert fingerprint["tokenizer"]["context_length"] == teacher.tokenizer.context_length
    assert json.loads(json.dumps(fingerprint)) == fingerprint  # JSON as is
    assert teacher_fingerprint(Teacher(model_name=f"local-dir:{tiny_local_dir}")) == fingerprint

    # Same weights, other preprocessing (a folder whose config asks for another mean): another fingerprint.
    other = tmp_path / "other_preprocess"
    other.mkdir()
    config = json.loads((tiny_local_dir / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["mean"] = [0.5, 0.5, 0.5]
    (other / "open_clip_config.json").write_text(json.dumps(config))
    (other / "open_clip_model.safetensors").symlink_to(tiny_local_dir / "open_clip_model.safetensors")
    changed = teacher_fingerprint(Teacher(model_name=f"local-dir:{other}"))
    assert changed["weights_sha256"] == fingerprint["weights_sha256"]
    assert changed["preprocess"]["mean"] == [0.5, 0.5, 0.5] and changed != fingerprint


def test_git_commit_of_this_checkout_and_none_outside_one(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}", git_commit(ROOT))
    assert isinstance(git_dirty(ROOT), bool)
    outside = tmp_path / "not_a_repo"
    outside.mkdir()
    assert git_commit(outside) is None and git_dirty(outside) is None


def test_run_info_records_code_command_and_teacher(tiny_local_dir):
    module = nn.Module()
    module.teacher = Teacher(model_name=f"local-dir:{tiny_local_dir}")
    info = run_info(module.teacher)
    assert info["teacher"] == teacher_fingerprint(module.teacher)
    assert info["torch_version"] == torch.__version__ and info["command"]
    assert {"git_commit", "git_dirty", "distill_version", "lightning_version", "hostname", "started"} <= set(info)
    assert "teacher" not in run_info()
    assert json.loads(json.dumps(info)) == info
