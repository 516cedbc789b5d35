"""A stand-in paid teacher for the black-box tests: query functions and a command-protocol program.

Loaded by file path (``/.../blackbox_fixture.py:embed``), never imported by name (tests run with
``--import-mode=importlib``). Every query appends one JSON line ``{"kind", "count"}`` to the file
named by ``BLACKBOX_FIXTURE_LOG`` (when set), so tests count the queries the provider received,
including those of other processes. Run as a program (``python blackbox_fixture.py REQUEST_DIR``)
it answers the command protocol; ``BLACKBOX_FIXTURE_MODE`` makes it fail in a chosen way.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DIM = 8
"""Embedding width of this teacher."""


def _log(kind: str, count: int) -> None:
    log = os.environ.get("BLACKBOX_FIXTURE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"kind": kind, "count": count}) + "\n")


def reference(kind: str, items: list) -> np.ndarray:
    """Deterministic, NOT normalised (N, DIM) embeddings: a seeded draw per item content, times 3."""
    rows = []
    for item in items:
        data = item.convert("RGB").tobytes() if kind == "image" else item.encode("utf-8")
        seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
        rows.append(3.0 * np.random.default_rng(seed).standard_normal(DIM))
    return np.stack(rows).reshape(len(items), DIM)


def embed(kind: str, items: list) -> np.ndarray:
    """The well-behaved query function."""
    _log(kind, len(items))
    return reference(kind, items)


def embed_lists(kind: str, items: list) -> list[list[float]]:
    """Answers as nested Python lists (array-like, not an array)."""
    return embed(kind, items).tolist()


def embed_wrong_width(kind: str, items: list) -> np.ndarray:
    _log(kind, len(items))
    return np.ones((len(items), DIM + 1))


def embed_one_short(kind: str, items: list) -> np.ndarray:
    _log(kind, len(items))
    return reference(kind, items)[:-1]


def embed_nan(kind: str, items: list) -> np.ndarray:
    out = embed(kind, items)
    out[-1, 0] = np.nan
    return out


def embed_raises(kind: str, items: list) -> np.ndarray:
    """The provider received (and charged) the query, then the connection broke."""
    _log(kind, len(items))
    raise ConnectionError("provider hung up")


def embed_exits(kind: str, items: list) -> np.ndarray:
    """The process dies mid-query (kill -9, power cut): no Python cleanup runs."""
    _log(kind, len(items))
    os._exit(17)


def _serve(request_dir: Path) -> int:
    mode = os.environ.get("BLACKBOX_FIXTURE_MODE", "ok")
    request = json.loads((request_dir / "request.json").read_text(encoding="utf-8"))
    kind, items = request["kind"], request["items"]
    _log(kind, len(items))
    if mode == "fail":
        print("quota exceeded at provider", file=sys.stderr)
        return 3
    if mode == "silent":
        return 0
    if kind == "image":
        items = [Image.open(request_dir / name) for name in items]
    out = reference(kind, items)
    if mode == "short":
        out = out[:-1]
    elif mode == "nan":
        out[0, 0] = np.inf
    np.save(request_dir / request["output"], out)
    return 0


if __name__ == "__main__":
    sys.exit(_serve(Path(sys.argv[1])))
