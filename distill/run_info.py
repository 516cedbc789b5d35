"""What a run was made from: code version, command, machine, and the identity of its teacher.

:func:`run_info` gathers it for one training module; the CLI writes it to ``<log_dir>/run_info.json``
and into the W&B run's config (``run_info``). :func:`model_fingerprint` hashes a module's weights
(state dict order, memory layout and device do not matter; the dtype, shape and bytes of every
tensor do) and :func:`teacher_fingerprint` adds what else decides a teacher's embeddings
(preprocessing, tokenizer, architecture), so a cache of teacher outputs can be keyed by it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

import distill
from distill.teacher_cache import TeacherCache
from distill.teachers import Teacher

__all__ = ["git_commit", "git_dirty", "model_fingerprint", "run_info", "teacher_fingerprint"]


def _git(folder: str | os.PathLike, *args: str) -> str | None:
    """Output of a read-only git command run in ``folder``; None when git fails or is missing."""
    # --no-optional-locks: ``status`` must not rewrite the index of a checkout it only reads.
    command = ["git", "--no-optional-locks", "-C", str(folder), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_commit(folder: str | os.PathLike) -> str | None:
    """The commit (40 hex digits) checked out in the git work tree holding ``folder``; None outside one."""
    commit = _git(folder, "rev-parse", "--verify", "--quiet", "HEAD")
    return commit or None


def git_dirty(folder: str | os.PathLike) -> bool | None:
    """Whether tracked files of the work tree holding ``folder`` differ from its commit; None outside one."""
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor, in row-major order, without a per-element Python loop."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def model_fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex) of a module's state dict: every entry's key, dtype, shape and raw bytes, in key order.

    Two modules with equal weights under equal names give the same hash, whatever order their
    parameters were created in, their memory layout or device; changing any value changes it.
    """
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        if isinstance(value, torch.Tensor):
            header = [key, str(value.dtype), list(value.shape)]
            digest.update((json.dumps(header) + "\n").encode())
            digest.update(_tensor_bytes(value))
        else:  # extra state (get_extra_state) of a submodule
            digest.update((json.dumps([key, repr(value)]) + "\n").encode())
    return digest.hexdigest()


def _registered_name(model_config: dict[str, Any]) -> str | None:
    """The open_clip model name registered with exactly this ``model_cfg``, if any."""
    import open_clip

    return next((n for n in open_clip.list_models() if open_clip.get_model_config(n) == model_config), None)


def teacher_fingerprint(teacher: Teacher) -> dict[str, Any]:
    """What decides a teacher's embeddings of an image or caption, as a JSON-ready dict.

    Keys: ``name`` (the open_clip model name whose registered config the teacher has, else its
    class name), ``weights_sha256`` (:func:`model_fingerprint` of the teacher, learned prompts
    included), ``preprocess`` (the open_clip preprocess config), ``tokenizer`` (class and context
    length), ``dtype`` (of its parameters) and ``model_config`` (the open_clip ``model_cfg``).
    """
    model_config = teacher.bundle.model_config
    tokenizer = teacher.tokenizer
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in teacher.parameters()})
    info = {
        "name": _registered_name(model_config) or type(teacher.model).__name__,
        "weights_sha256": model_fingerprint(teacher),
        "preprocess": teacher.bundle.preprocess_config,
        "tokenizer": {"class": type(tokenizer).__name__, "context_length": getattr(tokenizer, "context_length", None)},
        "dtype": ",".join(dtypes),
        "model_config": model_config,
    }
    return json.loads(json.dumps(info, default=str))  # tuples -> lists: equal to the dict read back from JSON


def run_info(teacher: Teacher | None = None, cache: TeacherCache | None = None) -> dict[str, Any]:
    """The record of a run: code version, command, host, start time and (when there is one) the teacher.

    Keys: ``git_commit`` and ``git_dirty`` (of the git checkout holding the distill package, else
    the working directory; None outside one), ``distill_version``, ``torch_version``,
    ``lightning_version``, ``command`` (``sys.argv``), ``hostname``, ``started`` (ISO 8601, local
    time with offset), ``teacher`` (:func:`teacher_fingerprint` of ``teacher``, when given) and
    ``teacher_cache`` (folder, build id and the fingerprint of the teacher that built it, when the
    run reads a ``distill.teacher_cache.TeacherCache``).
    """
    commit, dirty = None, None
    for folder in (Path(distill.__file__).resolve().parent, Path.cwd()):
        commit = git_commit(folder)
        if commit is not None:
            dirty = git_dirty(folder)
            break
    info: dict[str, Any] = {
        "git_commit": commit,
        "git_dirty": dirty,
        "distill_version": distill.__version__,
        "torch_version": torch.__version__,
        "lightning_version": _version("lightning") or _version("pytorch-lightning"),
        "command": list(sys.argv),
        "hostname": socket.gethostname(),
        "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
    }
    if teacher is not None:
        info["teacher"] = teacher_fingerprint(teacher)
    if cache is not None:
        info["teacher_cache"] = {
            "folder": str(cache.folder),
            "build_id": cache.manifest["build_id"],
            "teacher": cache.fingerprint,
        }
    return info
