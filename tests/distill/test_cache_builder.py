"""Building a teacher cache: resumable to the same bytes, budget planned before any query, DDP, the command."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from distill.cache_builder import OnlineTeacher, build_teacher_cache, cache_command
from distill.datamodules import ShapesWorldDataModule
from distill.teacher_cache import ForeignCacheError, StaleCacheError, TeacherCache
from distill.teachers import Teacher

BUILD = dict(num_augmentations=3, chunk_size=4, batch_size=6, progress=False)  # 2 items (6 views) per call


def _data(num_train=10):
    return ShapesWorldDataModule(num_train=num_train, num_val=7, num_test=7, image_size=32)


class Recorder:
    """A CacheTeacher around an OnlineTeacher that counts queries and can fail ("be killed") at a call."""

    def __init__(self, teacher: Teacher, fail_at_call: int | None = None, budget: int | None = None) -> None:
        self.inner, self.fail_at_call, self.budget = OnlineTeacher(teacher), fail_at_call, budget
        self.embed_dim, self.logit_scale = self.inner.embed_dim, self.inner.logit_scale
        self.calls: list[str] = []

    def fingerprint(self):
        return self.inner.fingerprint()

    def plan(self, num_images, num_texts):
        self.calls.append(f"plan {num_images} {num_texts}")
        if self.budget is not None and num_images > self.budget:
            raise ValueError(f"{num_images} images exceed the budget of {self.budget}")

    def encode_images(self, images):
        self.calls.append(f"images {len(images)}")
        if self.fail_at_call is not None and len(self.calls) >= self.fail_at_call:
            raise KeyboardInterrupt("killed")
        return self.inner.encode_images(images)

    def encode_texts(self, texts):
        self.calls.append(f"texts {len(texts)}")
        return self.inner.encode_texts(texts)


@pytest.fixture
def teacher(tiny_local_dir):
    return Teacher(model_name=f"local-dir:{tiny_local_dir}")


@pytest.fixture
def reference(tmp_path, teacher):
    """An uninterrupted build: file name -> bytes."""
    folder = build_teacher_cache(_data(), teacher, str(tmp_path / "reference"), **BUILD)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_build_killed_half_way_resumes_to_the_same_bytes(tmp_path, teacher, reference):
    folder = tmp_path / "cache"
    # Calls: plan, then (images, texts) per 2 items; call 6 is the first image call of chunk 1's second half.
    killed = Recorder(teacher, fail_at_call=6)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(_data(), killed, str(folder), **BUILD)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [c["sha256"] is not None for c in manifest["chunks"]] == [True, False, False] and not manifest["complete"]
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
    with pytest.raises(Exception, match="incomplete"):
        TeacherCache(folder)
    rerun = Recorder(teacher)
    build_teacher_cache(_data(), rerun, str(folder), **BUILD)
    # Chunks 1 and 2 (6 items, 18 views) and the 16 x 10 class prompts remain, planned before any query.
    assert rerun.calls[0] == "plan 18 166"
    assert rerun.calls[1:] == ["images 6", "texts 2"] * 3 + ["texts 160"]
    assert _files(folder) == reference
    again = Recorder(teacher)
    build_teacher_cache(_data(), again, str(folder), **BUILD)  # complete: nothing left to ask
    assert again.calls == ["plan 0 0"] and _files(folder) == reference


def test_a_chunk_written_before_the_kill_is_kept_and_leftovers_are_removed(tmp_path, teacher, reference):
    folder = tmp_path / "cache"
    for name, data in reference.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    # Killed after chunk 1 was renamed into place but before the manifest recorded it, and while
    # chunk 2 was half written.
    manifest = json.loads(reference["manifest.json"])
    for chunk in manifest["chunks"][1:]:
        chunk["sha256"] = None
    manifest["complete"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "chunk-00002.safetensors").unlink()
    (folder / ".chunk-00002.safetensors.0123456789ab.tmp").write_bytes(b"half")
    rerun = Recorder(teacher)
    build_teacher_cache(_data(), rerun, str(folder), **BUILD)
    assert rerun.calls == ["plan 6 2", "images 6", "texts 2"]  # chunk 2 only
    assert _files(folder) == reference


def test_a_damaged_chunk_is_rebuilt(tmp_path, teacher, reference):
    folder = tmp_path / "cache"
    folder.mkdir()
    for name, data in reference.items():
        (folder / name).write_bytes(data)
    (folder / "chunk-00000.safetensors").write_bytes(b"garbage")
    rerun = Recorder(teacher)
    build_teacher_cache(_data(), rerun, str(folder), **BUILD)
    assert rerun.calls == ["plan 12 4", "images 6", "texts 2", "images 6", "texts 2"]
    assert _files(folder) == reference


def test_an_over_budget_build_stops_before_any_query(tmp_path, teacher):
    limited = Recorder(teacher, budget=20)
    with pytest.raises(ValueError, match="30 images exceed the budget of 20"):
        build_teacher_cache(_data(), limited, str(tmp_path / "cache"), **BUILD)
    assert limited.calls == ["plan 30 170"]


def test_a_folder_of_another_build_is_refused(tmp_path, teacher, reference):
    folder = tmp_path / "cache"
    build_teacher_cache(_data(), teacher, str(folder), **BUILD)
    with pytest.raises(ForeignCacheError, match=r"other settings \(num_augmentations differ\)"):
        build_teacher_cache(_data(), teacher, str(folder), **{**BUILD, "num_augmentations": 2})
    with pytest.raises(ForeignCacheError, match=r"other settings \(items differ\)"):
        build_teacher_cache(_data(num_train=9), teacher, str(folder), **BUILD)
    teacher.bundle.preprocess_config["mean"] = [0.5, 0.5, 0.5]  # the fingerprint reads the config
    with pytest.raises(StaleCacheError, match="preprocess.mean"):
        build_teacher_cache(_data(), teacher, str(folder), **BUILD)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no manifest.json"):
        build_teacher_cache(_data(), teacher, str(other), **BUILD)
    with pytest.raises(ValueError, match="must be positive"):
        build_teacher_cache(_data(), teacher, str(tmp_path / "x"), **{**BUILD, "chunk_size": 0})


def test_the_command_builds_the_same_cache(tmp_path, tiny_local_dir, reference, capsys):
    args = [
        "--data=ShapesWorldDataModule",
        "--data.num_train=10",
        "--data.num_val=7",
        "--data.num_test=7",
        "--data.image_size=32",
        f"--teacher.teacher.model_name=local-dir:{tiny_local_dir}",
        f"--output_dir={tmp_path / 'cli'}",
        "--num_augmentations=3",
        "--chunk_size=4",
        "--batch_size=6",
        "--progress=false",
    ]
    assert _files(cache_command(args)) == reference
    with pytest.raises(SystemExit) as exit_info:
        cache_command([*args[:-2], "--num_augmentations=2", "--progress=false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill cache: error: ") and "other settings" in err and "\n" not in err


_RANK_SCRIPT = """
import sys
import torch
from distill.cache_builder import build_teacher_cache
from distill.datamodules import ShapesWorldDataModule
from distill.teachers import Teacher
data = ShapesWorldDataModule(num_train=10, num_val=7, num_test=7, image_size=32)
teacher = Teacher(model_name="local-dir:" + sys.argv[1])
torch.set_num_threads(int(sys.argv[3]))  # CPU kernels' sums depend on the thread count: the reference's
build_teacher_cache(data, teacher, sys.argv[2], num_augmentations=3, chunk_size=4, batch_size=6, progress=False)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters importing torch and Lightning: ~25 s on 2 cores
def test_two_processes_build_the_same_cache(tmp_path, tiny_local_dir, reference):
    folder = tmp_path / "ddp"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    threads = str(torch.get_num_threads())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(tiny_local_dir), str(folder), threads],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    assert _files(folder) == reference
