"""Atomic file and folder writes: a reader never sees half a file, and a crash leaves the old one.

Everything is staged beside its target (same folder, so same file system) under a hidden
``.<name>.<random>.tmp`` name and renamed into place when complete; on an error the staged copy
is removed and the target is untouched. No fsync: this guards against crashes of the process,
not of the machine. Staged files and folders are created with modes 0o666 / 0o777, so the
kernel applies the user's umask as for a plain ``open`` / ``mkdir`` (``tempfile.mkstemp`` /
``mkdtemp`` would give 0o600 / 0o700).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_dir", "atomic_write", "atomic_write_json", "atomic_write_text", "make_temp_dir", "publish_dir"]


def _sibling(target: Path, tag: str = "tmp") -> Path:
    """A hidden, random name beside ``target`` (48 random bits: callers create it exclusively)."""
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.{tag}")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``.

    Args:
        path: the file to write; its folder must exist.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        **open_kwargs: passed to ``open`` (``encoding``, ``newline``, ...).

    Yields:
        The open handle. If the block raises, the temporary file is removed and ``path`` keeps
        its old content (or stays absent).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    tmp = _sibling(target)
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as handle:
            yield handle
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_text(path, json.dumps(payload, indent=2))


def make_temp_dir(target: str | os.PathLike) -> Path:
    """Create an empty staging folder beside ``target`` (whose parent must exist), honouring the umask."""
    staging = _sibling(Path(target))
    os.mkdir(staging)
    return staging


def publish_dir(tmp_dir: str | os.PathLike, target_dir: str | os.PathLike) -> Path:
    """Replace the folder ``target_dir`` by ``tmp_dir`` (a rename; both in the same folder).

    An existing ``target_dir`` is first renamed aside and removed only after ``tmp_dir`` took
    its place, so at every moment one complete folder holds the name or none does; if the
    second rename fails, the old folder is put back.
    """
    tmp, target = Path(tmp_dir), Path(target_dir)
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_dir(target_dir: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a staging folder beside ``target_dir``; on a clean exit it replaces ``target_dir``.

    The parent of ``target_dir`` is created if missing. If the block raises, the staging folder
    is removed and ``target_dir`` keeps its old content (or stays absent).
    """
    target = Path(target_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(target)
    try:
        yield staging
        publish_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_writable_dir(folder: str | os.PathLike, what: str) -> Path:
    """Fail now, in one line, when ``folder`` could not be created or written to later.

    Nothing is created: the nearest existing ancestor must be a writable folder.

    Args:
        folder: the output folder (it may not exist yet).
        what: the setting that names it, for the message (e.g. ``trainer.default_root_dir``).

    Raises:
        ValueError: ``folder`` or an ancestor is a file, or the first existing ancestor is not writable.
    """
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder} is not writable ({existing} denies writing)")
    return path
