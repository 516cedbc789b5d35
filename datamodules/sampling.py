"""A training loader that resumes mid-epoch (same batches, same random draws, after a kill) and
splits the global batch across data-parallel processes.

Lightning saves the state of a loader that has ``state_dict`` / ``load_state_dict`` in every
checkpoint and hands it back when a run resumes from one. :class:`ResumableBatchSampler`
shuffles as Lightning's ``DistributedSampler`` does: epoch e's order is ``torch.randperm`` under
the seed ``seed + e``, where ``seed`` is the run's seed (``seed_everything``'s, which Lightning
keeps in ``PL_GLOBAL_SEED``). The order thus depends on the seed and the epoch only, not on how
many random numbers the model's construction drew (a DDP process re-seeds before training, a
single process does not). It remembers the epoch's seed and how many batches it has handed out.

Lightning does not fetch ahead from a loader that has a length (this one has), so when a
checkpoint is written after step k the sampler has handed out exactly the batches trained on.
The saved state is the epoch's seed, that count, and the global torch RNG state at that moment
(random augmentations, dropout): a resumed run restores the RNG when it asks for its first batch
and continues with the same batches and the same random draws as an uninterrupted run (with
``num_workers=0``; worker processes draw their own seeds).

Data parallelism (W processes, e.g. Lightning DDP): every rank orders the epoch with the same
seed (rank 0's, broadcast once per run) and cuts it into GLOBAL batches of ``batch_size * W``
items; rank r takes rows ``[r * batch_size, (r + 1) * batch_size)`` of each. So W processes with
batch B see exactly the items, in the same order, of one process with batch W x B, and every rank
has the same number of batches. Lightning's own ``DistributedSampler`` is not used for training:
when Lightning injects one (``use_distributed_sampler=True``, the default, rebuilds this sampler
as ``ResumableBatchSampler(distributed_sampler, batch_size=..., drop_last=...)``) only its
replica count and rank are taken; with ``use_distributed_sampler=False`` they are read from
``torch.distributed``. The checkpoint (written by rank 0) holds the position in global batches,
the same on every rank, so every rank resumes at the same place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` items per process, shuffled per epoch (seed + epoch), resumable.

    With W > 1 processes each batch is this rank's slice of a global batch of ``batch_size * W``
    items (see the module docstring). ``drop_last`` drops an incomplete last global batch, except
    when it is the only one (a split smaller than one global batch still trains); an incomplete
    last global batch that is kept is split as evenly as possible (it must hold at least W items).

    Args:
        size: number of items; or the ``DistributedSampler`` Lightning builds in its place, whose
            dataset length, replica count, rank and shuffle flag are taken.
        batch_size: items per batch and process.
        shuffle: a new random order every epoch (else 0..size-1).
        drop_last: drop a last incomplete global batch (unless it is the only one).
        num_replicas: processes sharing the epoch (default: the ``torch.distributed`` world size, 1 without it).
        rank: this process's rank among them (default: the ``torch.distributed`` rank, 0 without it).
        seed: the shuffle seed (default: ``PL_GLOBAL_SEED``, set by Lightning's ``seed_everything``; a
            random draw from the global torch RNG without it). Rank 0's value is used on every rank.

    Attributes:
        sampler: the item order as a torch sampler type (``RandomSampler`` when shuffling, else
            ``SequentialSampler``), as ``torch.utils.data.BatchSampler`` has: Lightning reads it to
            tell whether the loader shuffles and hands that back in the ``DistributedSampler`` it injects.
    """

    def __init__(
        self,
        size: int | DistributedSampler,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(size, DistributedSampler):  # Lightning's injection: keep our order, take its layout
            size, num_replicas, rank, shuffle = len(size.dataset), size.num_replicas, size.rank, size.shuffle
        elif not isinstance(size, int):
            raise TypeError(
                f"ResumableBatchSampler takes a number of items (or Lightning's DistributedSampler), got "
                f"{type(size).__name__}"
            )
        initialised = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if initialised else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        if batch_size < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(
                f"ResumableBatchSampler needs batch_size >= 1 and 0 <= rank < num_replicas, got batch_size="
                f"{batch_size}, rank={self.rank}, num_replicas={self.num_replicas}"
            )
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self.sampler = RandomSampler(range(size)) if shuffle else SequentialSampler(range(size))
        last = size % self.global_batch_size if len(self) * self.global_batch_size > size else 0
        if 0 < last < self.num_replicas:
            raise ValueError(
                f"the last global batch holds {last} of {size} items, fewer than the {self.num_replicas} processes: "
                "set drop_last, or a batch_size or number of items that leaves each process at least one"
            )
        self.seed = seed  # the run's shuffle seed: resolved (and agreed on by the ranks) at the first epoch
        self._next_epoch = 0  # the epoch the next fresh iteration starts
        self._seed: int | None = None  # the current epoch's shuffle seed
        self._handed_out = 0  # global batches of the current epoch handed to the loader
        self._exhausted = True
        self._resume: dict[str, Any] | None = None

    @property
    def global_batch_size(self) -> int:
        """Items per step over all processes: ``batch_size * num_replicas``."""
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        full = self.size // self.global_batch_size
        keep_last = self.size % self.global_batch_size and (not self.drop_last or full == 0)
        return full + 1 if keep_last else full

    def _order(self, seed: int | None) -> list[int]:
        if seed is None:
            return list(range(self.size))
        generator = torch.Generator()
        generator.manual_seed(seed)
        return torch.randperm(self.size, generator=generator).tolist()

    def _run_seed(self) -> int:
        """The run's seed: given, else ``PL_GLOBAL_SEED``, else drawn; rank 0's on every rank (resolved once)."""
        if self.seed is None:
            env = os.environ.get("PL_GLOBAL_SEED")
            seed = int(env) if env is not None else int(torch.empty((), dtype=torch.int64).random_().item())
            if self.num_replicas > 1 and dist.is_available() and dist.is_initialized():
                # Ranks launched apart (torchrun with a random seed per process) would otherwise train
                # on overlapping items without a word: rank 0's seed decides.
                box = [seed]
                dist.broadcast_object_list(box, src=0)
                seed = int(box[0])
            self.seed = seed
        return self.seed

    def _start_batch(self, state: dict[str, Any]) -> int:
        """The saved position in this run's global batches (it may have been saved with another world size)."""
        saved = state.get("global_batch_size", self.global_batch_size)
        items = state["next_batch"] * saved
        if items % self.global_batch_size:
            raise ValueError(
                f"cannot resume mid-epoch: the checkpoint stopped after {items} items (global batch {saved}), "
                f"which is not a whole number of global batches of {self.global_batch_size} "
                f"(batch_size {self.batch_size} x {self.num_replicas} processes)"
            )
        return items // self.global_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: this body runs when the loader asks for the epoch's first batch (not when
        # Lightning only checks that the loader is iterable), so only real epochs count.
        start = 0
        if self._resume is not None:
            state, self._resume = self._resume, None
            self._seed, start = state["seed"], self._start_batch(state)
            torch.set_rng_state(state["rng"])
        else:
            self._seed = self._run_seed() + self._next_epoch if self.shuffle else None
            self._next_epoch += 1
        order = self._order(self._seed)
        self._exhausted = False
        for batch in range(start, len(self)):
            self._handed_out = batch + 1
            rows = order[batch * self.global_batch_size : (batch + 1) * self.global_batch_size]
            # Full global batches give rank r rows [r B, (r + 1) B); a short last one is split evenly.
            count = len(rows)
            yield rows[self.rank * count // self.num_replicas : (self.rank + 1) * count // self.num_replicas]
        self._exhausted = True

    def state_dict(self) -> dict[str, Any]:
        """Where to resume: the epoch's seed, the first global batch not handed out yet, and the RNG state now."""
        new_epoch = self._exhausted  # between epochs: the next iteration starts a new one
        return {
            "seed": None if new_epoch else self._seed,
            "next_batch": 0 if new_epoch else self._handed_out,
            "run_seed": self.seed,
            "next_epoch": self._next_epoch,
            "global_batch_size": self.global_batch_size,
            "rng": torch.get_rng_state(),
            "new_epoch": new_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved batch on the next iteration (a new epoch when the saved one was done)."""
        self.seed = state.get("run_seed", self.seed)
        self._next_epoch = state.get("next_epoch", self._next_epoch)
        if state.get("new_epoch", False):
            torch.set_rng_state(state["rng"])
            return
        self._start_batch(state)  # a position this world size cannot reach is an error now, not at the first batch
        self._resume = dict(state)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableBatchSampler` whose position Lightning checkpoints."""

    def state_dict(self) -> dict[str, Any]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)
