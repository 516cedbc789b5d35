"""distill.files: atomic file writes and folder publishing."""

from __future__ import annotations

import json
import os
import stat

import pytest

from distill.files import atomic_dir, atomic_write, atomic_write_json, atomic_write_text, make_temp_dir, publish_dir


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with atomic_write(target, newline="") as handle:
        handle.write("new\r\n")
    assert target.read_bytes() == b"new\r\n"
    assert atomic_write_json(tmp_path / "b.json", {"x": [1, 2]}) == tmp_path / "b.json"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    atomic_write_text(target, "ünï")
    assert target.read_text(encoding="utf-8") == "ünï"
    with atomic_write(tmp_path / "c.bin", "wb") as handle:
        handle.write(b"\x00\x01")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.bin"]


def test_error_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_json(target, {"run": 1})
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_write(target) as handle:
        handle.write('{"run": 2, "half')
        raise RuntimeError("disk on fire")
    with pytest.raises(TypeError):  # json.dumps fails before anything is written
        atomic_write_json(target, {"run": object()})
    assert json.loads(target.read_text()) == {"run": 1}
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "new.txt") as handle:
        handle.write("x")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), atomic_write(target, "a"):
        pass


def test_written_files_and_folders_honour_the_umask(tmp_path, umask_027):
    atomic_write_text(tmp_path / "f.txt", "x")
    assert _mode(tmp_path / "f.txt") == 0o640  # mkstemp would give 0o600
    assert _mode(make_temp_dir(tmp_path / "out")) == 0o750  # mkdtemp would give 0o700
    with atomic_dir(tmp_path / "deep" / "bundle") as staging:
        (staging / "model.onnx").write_bytes(b"onnx")
    assert _mode(tmp_path / "deep") == 0o750
    assert _mode(tmp_path / "deep" / "bundle") == 0o750


def test_publish_dir_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    staging = make_temp_dir(target)
    assert staging.parent == tmp_path and staging.name.startswith(".bundle.")
    (staging / "fresh.txt").write_text("new")
    assert publish_dir(staging, target) == target
    assert [p.name for p in target.iterdir()] == ["fresh.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging, no old copy left
    publish_dir(make_temp_dir(tmp_path / "first"), tmp_path / "first")  # no previous folder
    assert (tmp_path / "first").is_dir()


def test_publish_dir_puts_the_old_folder_back_when_the_rename_fails(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        publish_dir(tmp_path / "missing", target)
    assert (target / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_atomic_dir_error_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as staging:
        (staging / "weights").write_text("v1")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as staging:
        (staging / "weights").write_text("v2 half")
        raise KeyboardInterrupt
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
