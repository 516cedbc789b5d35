"""A teacher reachable only through queries (a paid API, a remote service), under a query budget.

:class:`BlackBoxTeacher` turns PIL images and caption strings into L2-normalised embeddings by
calling either a Python function or an external program, counts every queried item in a
write-ahead spend ledger (:mod:`distill.blackbox_ledger`) and refuses, before sending anything,
a run or a query that would exceed the budget. The teacher cache builder queries it only for
items missing from the on-disk cache; within a process, repeated items are answered from memory.

Query protocols:

- ``query="package.module:function"`` or ``query="/path/to/file.py:function"``: the function is
  called as ``function(kind, items)`` with ``kind`` ``"image"`` (``items``: ``list[PIL.Image]``)
  or ``"text"`` (``items``: ``list[str]``) and returns an array-like ``(len(items), embed_dim)``
  (numpy array, torch tensor or nested lists).
- ``command=["prog", "arg", ...]``: for each query the program runs as ``prog arg ... REQUEST_DIR``.
  ``REQUEST_DIR/request.json`` holds ``{"format": "distill.blackbox-request/1", "kind": "image" |
  "text", "count": N, "embed_dim": D, "items": [...], "output": "embeddings.npy"}``; for images the
  items are PNG files relative to ``REQUEST_DIR`` (``images/000000.png``...), for texts the strings
  themselves. The program writes ``REQUEST_DIR/embeddings.npy`` (``numpy.save`` of an ``(N, D)``
  float array, row i for item i) and exits 0. Its stdout is ignored; on failure its stderr is shown.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from distill.blackbox_ledger import BudgetExceededError, LedgerError, Spend, SpendLedger, fmt_units

__all__ = ["REQUEST_FORMAT", "BlackBoxQueryError", "BlackBoxTeacher", "BudgetExceededError", "LedgerError"]

REQUEST_FORMAT = "distill.blackbox-request/1"
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


class BlackBoxQueryError(RuntimeError):
    """A query failed: the function raised, the program exited non-zero, or the answer is unusable."""


def load_query_function(target: str) -> Callable[[str, list], Any]:
    """The callable a ``"package.module:function"`` or ``"/path/to/file.py:function"`` string names.

    Raises:
        ValueError: the string has no ``:function`` part, the file or module is missing, or the
            attribute is not callable.
    """
    source, sep, attr = target.rpartition(":")
    if not sep or not source or not attr:
        raise ValueError(f"query {target!r} must be 'package.module:function' or '/path/to/file.py:function'")
    if source.endswith(".py") or "/" in source or "\\" in source:
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"query {target!r}: file {path} does not exist")
        # One module per file path, kept in sys.modules so two teachers share it (and its state).
        name = f"_distill_blackbox_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as err:
                del sys.modules[name]
                raise ValueError(f"query {target!r}: {path} fails to load: {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as err:
            raise ValueError(f"query {target!r}: cannot import {source!r} ({err})") from err
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"query {target!r}: {source} has no function {attr!r}")
    return function


class BlackBoxTeacher:
    """A teacher known only through a query function or program, with a budget and a spend ledger.

    Give exactly one of ``query`` (a Python function) and ``command`` (a program); the module
    docstring of ``distill.blackbox`` defines both protocols. Every queried item costs
    ``cost_per_image`` or ``cost_per_text`` units; the spend is kept in ``ledger`` (write-ahead:
    a query is recorded before it is sent, so after a crash the spend still counts it, reported
    as "queried but not received"). A run whose :meth:`plan` would exceed ``budget`` stops with
    :class:`BudgetExceededError` before any query, and each query checks the budget again.

    The remote model cannot be hashed: ``name`` and ``version`` are its identity in
    :meth:`fingerprint` (which keys the teacher cache). Change ``version`` whenever the provider's
    model changes, or cached embeddings of the old model will be mixed with new ones.

    Args:
        embed_dim: width D of the returned embeddings (checked on every answer).
        name: the teacher's name, e.g. ``acme-clip-large``.
        version: the remote model's version; change it when the provider's model changes.
        query: ``"package.module:function"`` or ``"/path/to/file.py:function"``: a function
            ``(kind, items) -> (len(items), D)`` array-like.
        command: a program and its arguments, run once per query with the request folder appended.
        logit_scale: the teacher's temperature (exponentiated) for similarity logits.
        budget: most units that may ever be spent, over all runs sharing the ledger; ``None``: no limit.
        ledger: the spend file (JSON). ``None``: the teacher cache builder attaches
            ``<cache_dir>/spend.json`` (:meth:`attach_ledger`); a budget needs a ledger file.
        cost_per_image: units one queried image costs.
        cost_per_text: units one queried text costs.
        max_batch: most items per query.
        timeout: seconds a ``command`` may run per query before it counts as failed; ``None``: no limit.
        memo_items: answers kept in memory (by content hash) so a repeated item is neither
            re-queried nor counted within a process; 0 turns this off.
    """

    def __init__(
        self,
        embed_dim: int,
        name: str,
        version: str,
        query: str | None = None,
        command: list[str] | None = None,
        logit_scale: float = 100.0,
        budget: float | None = None,
        ledger: str | None = None,
        cost_per_image: float = 1.0,
        cost_per_text: float = 1.0,
        max_batch: int = 64,
        timeout: float | None = None,
        memo_items: int = 100_000,
    ) -> None:
        if (query is None) == (command is None):
            raise ValueError("BlackBoxTeacher needs exactly one of query (a Python function) and command (a program)")
        if embed_dim < 1 or max_batch < 1 or memo_items < 0:
            raise ValueError(
                f"embed_dim and max_batch must be >= 1, memo_items >= 0: {embed_dim}, {max_batch}, {memo_items}"
            )
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, got {budget}")
        if cost_per_image <= 0 or cost_per_text <= 0:
            raise ValueError(f"cost_per_image and cost_per_text must be > 0: {cost_per_image}, {cost_per_text}")
        if not name or not version:
            raise ValueError("name and version must be non-empty: they identify the remote model in the cache key")
        self.embed_dim = int(embed_dim)
        self.logit_scale = float(logit_scale)
        self.name, self.version = name, version
        self.query, self.command = query, None if command is None else [str(c) for c in command]
        self.budget = budget
        self.cost = {"image": float(cost_per_image), "text": float(cost_per_text)}
        self.max_batch, self.timeout, self.memo_items = int(max_batch), timeout, int(memo_items)
        if query is not None:
            self._function = load_query_function(query)
            self.target = f"query {query}"
        else:
            if not self.command or shutil.which(self.command[0]) is None:
                raise ValueError(
                    f"command {self.command}: program {self.command[:1]} not found (give a path or a name on PATH)"
                )
            self._function = None
            self.target = f"command {' '.join(self.command)}"
        self._memo: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.ledger: str | None = None
        self._ledger = SpendLedger(None)
        if ledger is not None:
            self.attach_ledger(ledger)

    # ----------------------------------------------------------------- identity and budget

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity for the cache key: type, name, version, query target and ``embed_dim``."""
        target = {"query": self.query} if self.query is not None else {"command": self.command}
        return {"type": "blackbox", "name": self.name, "version": self.version, "embed_dim": self.embed_dim, **target}

    def attach_ledger(self, path: str | Path) -> Path:
        """Keep the spend in ``path`` (read now: a corrupt file is an error before any query).

        Raises:
            RuntimeError: queries were already counted in memory (attach before the first query).
            LedgerError: the file exists but is not a valid ledger.
        """
        if self.ledger is None and self._ledger.spend().calls:
            raise RuntimeError("attach the spend ledger before the first query: queries were already counted in memory")
        self._ledger = SpendLedger(path)
        self.ledger = str(path)
        return Path(path)

    def spend(self) -> Spend:
        """The ledger's totals now (all processes sharing it)."""
        return self._ledger.spend()

    def spend_report(self) -> str:
        """One line for logs: spent, not received, budget left, and the ledger file."""
        where = self.ledger or "memory only"
        return f"black-box teacher {self.name}@{self.version}: {self.spend().describe(self.budget)} ({where})"

    def units(self, num_images: int, num_texts: int) -> float:
        """Cost in units of querying ``num_images`` images and ``num_texts`` texts."""
        return num_images * self.cost["image"] + num_texts * self.cost["text"]

    def plan(self, num_images: int, num_texts: int) -> None:
        """Check, before any query, that ``num_images`` images and ``num_texts`` texts fit the budget.

        Raises:
            BudgetExceededError: the spend so far plus this run would exceed ``budget``.
            ValueError: a budget is set but no ledger file is attached.
        """
        if num_images < 0 or num_texts < 0:
            raise ValueError(f"plan needs counts >= 0, got {num_images} images, {num_texts} texts")
        self._check(self.spend(), num_images, num_texts, "this run")

    def _check(self, spend: Spend, num_images: int, num_texts: int, what: str) -> None:
        if self.budget is None:
            return
        if self.ledger is None:
            raise ValueError(
                f"black-box teacher {self.name}: budget {fmt_units(self.budget)} needs a spend ledger file "
                "(set ledger, or build through the teacher cache, which attaches <cache_dir>/spend.json)"
            )
        need = self.units(num_images, num_texts)
        if spend.units + need <= self.budget * (1 + 1e-12):
            return
        left = max(self.budget - spend.units, 0.0)
        lost = (
            f" (of which {fmt_units(spend.not_received_units)} queried but not received)"
            if spend.not_received_units
            else ""
        )
        raise BudgetExceededError(
            f"black-box teacher {self.name}@{self.version} ({self.ledger}): {what} needs {fmt_units(need)} units "
            f"({num_images} images x {fmt_units(self.cost['image'])} + "
            f"{num_texts} texts x {fmt_units(self.cost['text'])}) "
            f"but the budget is {fmt_units(self.budget)} and {fmt_units(spend.units)} are already spent{lost}; "
            f"the {fmt_units(left)} units left fit {int(left // self.cost['image'])} images or "
            f"{int(left // self.cost['text'])} texts. Nothing was queried: raise budget or query fewer items"
        )

    # ----------------------------------------------------------------- encoding

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Embeddings of PIL images: (N, D) float32, L2-normalised, row i for image i."""
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"encode_images: item {i} is a {type(image).__name__}, not a PIL image")
        return self._encode("image", list(images))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of texts: (M, D) float32, L2-normalised, row i for text i."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_texts: item {i} is a {type(text).__name__}, not a str")
        return self._encode("text", list(texts))

    @staticmethod
    def _key(kind: str, item: Image.Image | str) -> str:
        digest = hashlib.sha256()
        if kind == "image":
            # Pixels, not file bytes: the same picture decoded from JPEG or PNG is the same item.
            digest.update(f"{item.mode}|{item.size}|".encode())
            digest.update(item.tobytes())
        else:
            digest.update(item.encode("utf-8"))
        return digest.hexdigest()

    def _encode(self, kind: str, items: list) -> torch.Tensor:
        keys = [self._key(kind, item) for item in items]
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, Any] = {}  # unique, in first-seen order
        for key, item in zip(keys, items):
            if key in found or key in missing:
                continue
            row = self._memo.get((kind, key))
            if row is None:
                missing[key] = item
            else:
                found[key] = row
                self._memo.move_to_end((kind, key))
        if missing:
            counts = (len(missing), 0) if kind == "image" else (0, len(missing))
            self._check(self.spend(), *counts, f"encoding {len(missing)} new {kind}s")
            order = list(missing)
            for start in range(0, len(order), self.max_batch):
                chunk = order[start : start + self.max_batch]
                for key, row in zip(chunk, self._query_batch(kind, [missing[k] for k in chunk])):
                    found[key] = row
                    self._remember((kind, key), row)
        if not keys:
            return torch.empty(0, self.embed_dim)
        return torch.stack([found[key] for key in keys])

    def _remember(self, key: tuple[str, str], row: torch.Tensor) -> None:
        if self.memo_items == 0:
            return
        self._memo[key] = row
        if len(self._memo) > self.memo_items:
            self._memo.popitem(last=False)

    def _query_batch(self, kind: str, batch: list) -> torch.Tensor:
        """Record (pending), send, validate, settle: the write-ahead cycle of one query."""
        counts = (len(batch), 0) if kind == "image" else (0, len(batch))
        entry = self._ledger.reserve(
            kind,
            len(batch),
            self.units(*counts),
            f"{self.name}@{self.version}",
            self.budget,
            check=lambda spend: self._check(spend, *counts, f"a query of {len(batch)} {kind}s"),
        )
        try:
            raw = self._call_function(kind, batch) if self._function is not None else self._run_command(kind, batch)
            rows = self._validate(raw, kind, len(batch))
        except BaseException as err:
            # The provider may have charged for it: the entry stays spent, marked not received.
            self._ledger.settle(entry, "failed", f"{type(err).__name__}: {err}")
            raise
        self._ledger.settle(entry, "ok")
        return rows

    def _call_function(self, kind: str, batch: list) -> Any:
        try:
            return self._function(kind, batch)
        except Exception as err:
            raise BlackBoxQueryError(
                f"black-box {self.target} raised on a batch of {len(batch)} {kind}s: {type(err).__name__}: {err}"
            ) from err

    def _run_command(self, kind: str, batch: list) -> np.ndarray:
        where = f"black-box {self.target} on a batch of {len(batch)} {kind}s"
        with tempfile.TemporaryDirectory(prefix="distill-blackbox-") as tmp:
            folder = Path(tmp)
            if kind == "image":
                (folder / "images").mkdir()
                items = [f"images/{i:06d}.png" for i in range(len(batch))]
                for name, image in zip(items, batch):
                    (image if image.mode in _PNG_MODES else image.convert("RGB")).save(folder / name, format="PNG")
            else:
                items = batch
            request = {
                "format": REQUEST_FORMAT,
                "kind": kind,
                "count": len(batch),
                "embed_dim": self.embed_dim,
                "items": items,
                "output": "embeddings.npy",
            }
            (folder / "request.json").write_text(json.dumps(request), encoding="utf-8")
            try:
                done = subprocess.run(
                    [*self.command, str(folder)], capture_output=True, text=True, timeout=self.timeout, check=False
                )
            except subprocess.TimeoutExpired as err:
                raise BlackBoxQueryError(f"{where}: no answer within timeout {self.timeout} s") from err
            except OSError as err:
                raise BlackBoxQueryError(f"{where}: cannot start the program: {err}") from err
            if done.returncode != 0:
                how = f"was killed by signal {-done.returncode}" if done.returncode < 0 else f"exited {done.returncode}"
                tail = " | ".join((done.stderr or "").strip().splitlines()[-5:])
                raise BlackBoxQueryError(f"{where} {how}; stderr: {tail or '(empty)'}")
            output = folder / "embeddings.npy"
            if not output.is_file():
                raise BlackBoxQueryError(f"{where} exited 0 but wrote no {output.name} in the request folder")
            try:
                return np.load(output, allow_pickle=False)
            except (ValueError, OSError) as err:
                raise BlackBoxQueryError(f"{where} wrote an unreadable {output.name}: {err}") from err

    def _validate(self, raw: Any, kind: str, count: int) -> torch.Tensor:
        """(count, D) float32 L2-normalised rows out of an answer, or a clear error."""
        where = f"black-box {self.target} on a batch of {count} {kind}s"
        try:
            array = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
            array = array.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise BlackBoxQueryError(
                f"{where} returned a {type(raw).__name__} that is not a numeric array: {err}"
            ) from err
        if array.shape != (count, self.embed_dim):
            raise BlackBoxQueryError(
                f"{where} returned shape {tuple(array.shape)}, expected ({count}, {self.embed_dim}) (items, embed_dim)"
            )
        bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
        if bad.size:
            raise BlackBoxQueryError(f"{where} returned non-finite values (NaN/inf) in rows {bad[:10].tolist()}")
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        zero = np.flatnonzero(norms[:, 0] == 0)
        if zero.size:
            raise BlackBoxQueryError(f"{where} returned all-zero embeddings in rows {zero[:10].tolist()}")
        return torch.from_numpy(array / norms).to(torch.float32)
