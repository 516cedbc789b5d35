"""Write-ahead spend ledger of a black-box teacher: what was paid for, exact even after a crash.

A paid teacher charges when it receives a query, not when its answer arrives. So every query is
written to the ledger *before* it is sent (status ``pending``) and settled after (``ok`` when the
embeddings came back valid, ``failed`` when the query raised or returned something unusable).
All three statuses count as spent: a ``pending`` entry left by a killed process and a ``failed``
one are reported as "queried but not received". The ledger never rewrites a ``pending`` entry of
another process, which may still be in flight.

The file is JSON, rewritten atomically (temp + ``os.replace``) on each change, under an
exclusive ``flock`` on ``<ledger>.lock`` (POSIX) so processes sharing it (DDP ranks building one
cache) neither lose updates nor overshoot the budget together. Layout::

    {"format": "distill.blackbox-spend/1", "budget": 1000, "spent_units": 24.0,
     "not_received_units": 8.0, "items": {"image": 16, "text": 8}, "calls": 3,
     "history": [{"id": "4242-a1b2c3d4", "time": "...", "teacher": "name@version",
                  "kind": "image", "count": 8, "units": 8.0, "status": "ok"}, ...]}

The totals are derived from ``history`` (append-only) and checked against it when read: a file
whose totals disagree, that is not JSON or lacks a key is an error naming it, never reset.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill.files import atomic_write_json

try:  # POSIX only; elsewhere the ledger is safe for one process at a time
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LEDGER_FORMAT", "BudgetExceededError", "LedgerError", "Spend", "SpendLedger", "fmt_units"]

LEDGER_FORMAT = "distill.blackbox-spend/1"
KINDS = ("image", "text")
STATUSES = ("pending", "ok", "failed")


class LedgerError(ValueError):
    """The spend ledger file cannot be trusted (not JSON, wrong format, totals disagree with history)."""


class BudgetExceededError(RuntimeError):
    """A query (or a planned run) would spend more than the black-box teacher's budget."""


def fmt_units(value: float) -> str:
    """``12`` for whole numbers, ``12.5`` otherwise."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


@dataclass(frozen=True)
class Spend:
    """Totals of a ledger. Units weigh items by their cost; every queried item counts as spent.

    Attributes:
        units: units spent (received + not received).
        not_received_units: units of queries sent but never answered with valid embeddings
            (a crash left them ``pending``, or they ``failed``).
        items: queried items per kind (``{"image": n, "text": m}``), received or not.
        not_received_items: the part of ``items`` that was not received.
        calls: number of queries sent.
        pending_calls: queries still ``pending`` (lost in a crash, or in flight in another process).
    """

    units: float = 0.0
    not_received_units: float = 0.0
    items: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    not_received_items: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    calls: int = 0
    pending_calls: int = 0

    def describe(self, budget: float | None = None) -> str:
        """One line: ``spent 24 units (16 images, 8 texts) in 3 queries; 8 units ... not received; ...``."""
        line = (
            f"spent {fmt_units(self.units)} units ({self.items['image']} images, {self.items['text']} texts) "
            f"in {self.calls} queries"
        )
        if self.not_received_units or self.pending_calls:
            nr = self.not_received_items
            line += (
                f"; {fmt_units(self.not_received_units)} units ({nr['image']} images, {nr['text']} texts) "
                "queried but not received"
            )
            if self.pending_calls:
                line += f" ({self.pending_calls} query(ies) still pending: lost in a crash or in flight)"
        if budget is not None:
            line += f"; budget {fmt_units(budget)}, {fmt_units(max(budget - self.units, 0.0))} left"
        return line


def _totals(history: list[dict[str, Any]]) -> Spend:
    items, missing = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
    units = lost = 0.0
    pending = 0
    for entry in history:
        items[entry["kind"]] += entry["count"]
        units += entry["units"]
        if entry["status"] != "ok":
            missing[entry["kind"]] += entry["count"]
            lost += entry["units"]
            pending += entry["status"] == "pending"
    return Spend(units, lost, items, missing, len(history), pending)


def _check_entry(path: Path, index: int, entry: Any) -> None:
    def bad(why: str) -> LedgerError:
        return LedgerError(f"{path}: spend ledger history entry {index} {why}; restore the file or delete it knowingly")

    if not isinstance(entry, dict):
        raise bad("is not an object")
    for key in ("id", "kind", "count", "units", "status"):
        if key not in entry:
            raise bad(f"has no {key!r}")
    if entry["kind"] not in KINDS or entry["status"] not in STATUSES:
        raise bad(f"has kind {entry['kind']!r} / status {entry['status']!r}")
    count, units = entry["count"], entry["units"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise bad(f"has count {count!r}")
    if isinstance(units, bool) or not isinstance(units, int | float) or not units >= 0:
        raise bad(f"has units {units!r}")


class SpendLedger:
    """The spend of one black-box teacher, in a JSON file or (``path=None``) in memory only.

    Args:
        path: the ledger file (created at the first query; its folder too). ``None`` keeps the
            spend in this process only: nothing survives the run.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self._memory: dict[str, Any] = self._empty()
        if self.path is not None:
            self._read()  # a corrupt ledger is an error now, before any query

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"format": LEDGER_FORMAT, "history": []}

    def _read(self) -> dict[str, Any]:
        if self.path is None:
            return self._memory
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return self._empty()
        except OSError as err:
            raise LedgerError(f"{self.path}: spend ledger cannot be read: {err}") from err
        try:
            state = json.loads(text)
        except json.JSONDecodeError as err:
            raise LedgerError(
                f"{self.path}: spend ledger is not valid JSON ({err}); it records money spent, so it is never "
                "reset silently: restore it or delete it knowingly"
            ) from err
        if not isinstance(state, dict) or state.get("format") != LEDGER_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise LedgerError(f"{self.path}: not a spend ledger (format {found!r}, expected {LEDGER_FORMAT!r})")
        history = state.get("history")
        if not isinstance(history, list):
            raise LedgerError(f"{self.path}: spend ledger has no 'history' list")
        for index, entry in enumerate(history):
            _check_entry(self.path, index, entry)
        spend = _totals(history)
        units = state.get("spent_units")
        if (
            state.get("calls") != spend.calls
            or state.get("items") != spend.items
            or isinstance(units, bool)
            or not isinstance(units, int | float)
            or abs(units - spend.units) > 1e-9 * max(1.0, spend.units)
        ):
            stored = (state.get("calls"), state.get("items"), units)
            raise LedgerError(
                f"{self.path}: spend ledger totals (calls, items, spent_units) = {stored} disagree with its history "
                f"({spend.calls}, {spend.items}, {fmt_units(spend.units)}): edited by hand or corrupt"
            )
        return state

    def _write(self, state: dict[str, Any]) -> None:
        spend = _totals(state["history"])
        state.update(
            spent_units=spend.units,
            not_received_units=spend.not_received_units,
            items=spend.items,
            calls=spend.calls,
        )
        if self.path is None:
            self._memory = state
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Keys in a fixed, readable order: format and totals first, history last.
        ordered = {k: state.get(k) for k in ("format", "budget", "spent_units", "not_received_units", "items", "calls")}
        atomic_write_json(self.path, {**ordered, "history": state["history"]})

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.path is None or fcntl is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def spend(self) -> Spend:
        """The totals now (re-read from the file, so other processes' queries count too)."""
        return _totals(self._read()["history"])

    @property
    def history(self) -> list[dict[str, Any]]:
        """A copy of the per-query history, oldest first."""
        return [dict(entry) for entry in self._read()["history"]]

    def reserve(
        self,
        kind: str,
        count: int,
        units: float,
        teacher: str,
        budget: float | None,
        check: Callable[[Spend], None] | None = None,
    ) -> str:
        """Record a query as ``pending`` before it is sent (write-ahead); return its entry id.

        Args:
            kind: ``"image"`` or ``"text"``.
            count: items in the query.
            units: their cost.
            teacher: ``name@version``, stored with the entry.
            budget: the budget in force (stored in the file for the reader).
            check: called with the current spend, under the lock, before anything is recorded;
                it raises (``BudgetExceededError``) to stop the query.
        """
        with self._locked():
            state = self._read()
            if check is not None:
                check(_totals(state["history"]))
            entry_id = f"{os.getpid()}-{secrets.token_hex(4)}"
            entry = {
                "id": entry_id,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "teacher": teacher,
                "kind": kind,
                "count": int(count),
                "units": float(units),
                "status": "pending",
            }
            state["history"].append(entry)
            state["budget"] = budget
            self._write(state)
        return entry_id

    def settle(self, entry_id: str, status: str, error: str | None = None) -> None:
        """Mark the entry ``entry_id`` ``ok`` (answer received) or ``failed`` (with a short ``error``)."""
        if status not in ("ok", "failed"):
            raise ValueError(f"settle status must be 'ok' or 'failed', got {status!r}")
        with self._locked():
            state = self._read()
            entry = next((e for e in reversed(state["history"]) if e["id"] == entry_id), None)
            if entry is None:
                raise LedgerError(f"{self.path}: spend ledger lost its pending entry {entry_id} (replaced meanwhile?)")
            entry["status"] = status
            if error:
                entry["error"] = error[:300]
            self._write(state)
