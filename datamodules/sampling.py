"""A training loader that resumes mid-epoch: same batches, same random draws, after a kill.

Lightning saves the state of a loader that has ``state_dict`` / ``load_state_dict`` in every
checkpoint and hands it back when a run resumes from one. :class:`ResumableBatchSampler`
shuffles exactly as ``DataLoader(shuffle=True)`` does (one int64 seed drawn from the global
torch generator when the epoch's first batch is requested, then ``torch.randperm``), so a run's
batches are the same as with a plain shuffled loader, and it remembers the epoch's seed and how
many batches it has handed out.

Lightning does not fetch ahead from a loader that has a length (this one has), so when a
checkpoint is written after step k the sampler has handed out exactly the batches trained on.
The saved state is the epoch's seed, that count, and the global torch RNG state at that moment
(random augmentations, dropout): a resumed run restores the RNG when it asks for its first batch
and continues with the same batches and the same random draws as an uninterrupted run (with
``num_workers=0``; worker processes draw their own seeds).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of ``size`` items, shuffled per epoch like ``DataLoader(shuffle=True)``, resumable.

    Args:
        size: number of items.
        batch_size: items per batch.
        shuffle: a new random order every epoch (else 0..size-1).
        drop_last: drop a last incomplete batch.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool = True, drop_last: bool = False) -> None:
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self._seed: int | None = None  # the current epoch's shuffle seed
        self._handed_out = 0  # batches of the current epoch handed to the loader
        self._exhausted = True
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else math.ceil(self.size / self.batch_size)

    def _order(self, seed: int | None) -> list[int]:
        if seed is None:
            return list(range(self.size))
        generator = torch.Generator()
        generator.manual_seed(seed)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: this body runs when the loader asks for the epoch's first batch, which is
        # when RandomSampler draws its seed too (after the loader iterator drew its base seed).
        start = 0
        if self._resume is not None:
            state, self._resume = self._resume, None
            self._seed, start = state["seed"], state["next_batch"]
            torch.set_rng_state(state["rng"])
        else:
            self._seed = int(torch.empty((), dtype=torch.int64).random_().item()) if self.shuffle else None
        order = self._order(self._seed)
        self._exhausted = False
        for batch in range(start, len(self)):
            self._handed_out = batch + 1
            yield order[batch * self.batch_size : (batch + 1) * self.batch_size]
        self._exhausted = True

    def state_dict(self) -> dict[str, Any]:
        """Where to resume: the epoch's seed, the first batch not handed out yet, and the RNG state now."""
        new_epoch = self._exhausted  # between epochs: the next iteration starts a new one
        return {
            "seed": None if new_epoch else self._seed,
            "next_batch": 0 if new_epoch else self._handed_out,
            "rng": torch.get_rng_state(),
            "new_epoch": new_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved batch on the next iteration (a new epoch when the saved one was done)."""
        if state.get("new_epoch", False):
            torch.set_rng_state(state["rng"])
            return
        self._resume = dict(state)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableBatchSampler` whose position Lightning checkpoints."""

    def state_dict(self) -> dict[str, Any]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)
