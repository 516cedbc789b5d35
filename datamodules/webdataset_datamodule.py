"""Image-text pairs from WebDataset shards (``distill.shards`` writes them), on one process or many.

Training batches are planned from ``dataset.json`` alone (:class:`ShardPlan`): shards shuffled
per epoch with a seed every rank shares, one contiguous part per DDP rank, a shuffle buffer,
the same number of whole batches on every rank; the DataLoader's workers take a rank's batches
in turn. Evaluation batches: each rank reads its share of the split in order, nothing padded,
repeated or left out. Samples and batches are the other datamodules' (``image`` views through
the model's transforms, ``caption``, ``label``, ``domain``, ``index`` = position in the split).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from distill.datamodules.base import SPLITS, VisionLanguageDataModule
from distill.datamodules.common import AugmentPolicy, sample_views
from distill.datamodules.image_text_datamodule import DEFAULT_TEMPLATES
from distill.shard_reader import BadSampleError, ShardReader
from distill.shards import METADATA, Unlabelled, load_metadata


def _rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def buffer_shuffle(items: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """``items`` through a shuffle buffer (as ``webdataset.shuffle``): each output is a random pick
    among the next ``buffer`` waiting items, so reads stay within a window of nearby shards."""
    if buffer <= 1 or len(items) <= 1:
        return items.copy()
    if buffer >= len(items):
        return rng.permutation(items)
    waiting, out = items[:buffer].tolist(), []
    for pick, item in zip(rng.integers(0, buffer, len(items) - buffer).tolist(), items[buffer:].tolist()):
        out.append(waiting[pick])
        waiting[pick] = item
    return np.asarray(out + rng.permutation(waiting).tolist(), dtype=items.dtype)


@dataclass(frozen=True)
class ShardPlan:
    """Which samples of a split one rank reads in an epoch, in which order: batch ``j`` is
    ``order(epoch)[j * batch_size : (j + 1) * batch_size]``, and there are ``len(plan)`` batches.

    Training: the shards are shuffled by a generator seeded with ``(seed, epoch)`` (the same on
    every rank), their samples laid end to end and cut into ``world_size`` equal contiguous parts
    (rank ``r`` reads part ``r``: only its own shards, nothing twice); the part goes through a
    shuffle buffer seeded with ``(seed, epoch, rank)`` and is cut to whole batches, so every rank
    has the same number. The last ``total % world_size`` samples of the shuffled stream and each
    part's incomplete batch are left out of that epoch (other samples in the next one).
    Evaluation: rank ``r`` reads its contiguous share of the split in order, nothing left out.

    Attributes:
        counts: samples per shard, in ``dataset.json`` order.
        batch_size: samples per batch.
        rank: this process's rank.
        world_size: number of processes.
        train: shuffle and cut as for training.
        seed: shuffle seed.
        shuffle_buffer: shuffle buffer size in samples (0 or 1: shard order only).
    """

    counts: tuple[int, ...]
    batch_size: int
    rank: int = 0
    world_size: int = 1
    train: bool = False
    seed: int = 0
    shuffle_buffer: int = 0

    def __len__(self) -> int:
        total, size = sum(self.counts), self.batch_size
        if self.train:
            per_rank = total // self.world_size
            return per_rank // size if per_rank >= size else int(per_rank > 0)
        return -(-len(self._share(total)) // size)

    def _share(self, total: int) -> range:
        return range(total * self.rank // self.world_size, total * (self.rank + 1) // self.world_size)

    def resume_key(self) -> list[int]:
        """What fixes the batches besides the epoch (a resumed run must match it; the rank need not)."""
        return [sum(self.counts), self.batch_size, self.world_size, self.seed, self.shuffle_buffer]

    def order(self, epoch: int = 0) -> np.ndarray:
        """This rank's sample indices in ``epoch``, in order."""
        if not self.train:
            return np.asarray(self._share(sum(self.counts)))
        offsets = np.cumsum([0, *self.counts])
        shards = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
        stream = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shards])
        per_rank = len(stream) // self.world_size
        part = stream[self.rank * per_rank : (self.rank + 1) * per_rank]
        part = buffer_shuffle(part, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, self.rank]))
        return part[: len(self) * self.batch_size]


class ShardSplit(Dataset):
    """One split of a shard folder with random access: sample ``i`` is the split's ``i``-th key.

    Args:
        reader: the folder's reader.
        split: split name.
        transform: ``(PIL image, index) -> dict of views`` (None: the raw PIL image).

    Attributes:
        skipped: ``key -> message`` of the bad samples skipped so far (``skip_bad_samples``),
            in this process; the loaders report those their workers skipped.
    """

    def __init__(self, reader: ShardReader, split: str, transform: Callable | None = None) -> None:
        self.reader, self.split, self.transform = reader, split, transform
        self.counts = reader.meta.splits[split].counts
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return sum(self.counts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self.reader.read(self.split, int(index))
        return {**sample_views(self.transform, raw.pop("image"), raw["index"]), **raw}

    def note_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Count bad samples that were skipped, and warn once for each (naming shard and key)."""
        for key, message in skipped:
            if key not in self.skipped:
                self.skipped[key] = message
                warnings.warn(f"skipped a bad sample (skip_bad_samples): {message}", stacklevel=2)


class ShardBatches(IterableDataset):
    """One rank's batches of a split in an epoch, collated; the DataLoader's workers take them in turn
    (batch ``j`` from worker ``j % num_workers``, so the batches do not depend on ``num_workers``).

    Args:
        items: the split.
        plan: which samples, in which order.
        skip_bad_samples: leave bad samples out of their batch (which gets smaller) instead of failing.
        collate: list of samples -> batch dict.
    """

    def __init__(self, items: ShardSplit, plan: ShardPlan, skip_bad_samples: bool, collate: Callable) -> None:
        self.items, self.plan, self.skip, self.collate = items, plan, skip_bad_samples, collate
        self.epoch, self.start = 0, 0  # set by the loader before each iteration (workers get a copy)

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order, size = self.plan.order(self.epoch), self.plan.batch_size
        for batch in range(self.start + worker, len(self), workers):
            yield self._batch(order[batch * size : (batch + 1) * size].tolist())

    def _batch(self, indices: list[int]) -> dict[str, Any]:
        samples, skipped = [], []
        for index in indices:
            try:
                samples.append(self.items[index])
            except BadSampleError as err:
                if not self.skip:
                    raise
                skipped.append((err.key, str(err)))
        if not samples:  # an empty batch would break DDP's equal batch counts: stop instead
            raise BadSampleError(f"all {len(indices)} samples of a batch are bad, e.g. {skipped[0][1]}")
        return {**self.collate(samples), "skipped_samples": skipped}


def _whole_batch(batch: dict[str, Any]) -> dict[str, Any]:
    return batch  # the dataset yields collated batches


class ShardLoader(DataLoader):
    """A ``DataLoader`` over :class:`ShardBatches` that reports skipped samples and resumes mid-epoch.

    Lightning saves ``state_dict()`` of the training loader in every checkpoint and hands it back
    on resume: the epoch, the batches handed out so far and the torch RNG state. The resumed
    epoch re-plans the same batches and starts after the last one trained on, with the RNG
    restored (random augmentations repeat exactly with ``num_workers=0``; workers draw their own
    seeds). A checkpoint from a run with another batch size, number of processes, seed or
    shuffle buffer restarts the epoch, with a warning.
    """

    epoch_of: Callable[[], int | None] | None = None  # the trainer's epoch, when one runs
    _resume: dict[str, Any] | None = None
    _epoch, _next_epoch, _handed_out, _exhausted = 0, 0, 0, True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._batches()  # a generator: nothing starts before the first batch is asked for

    def _batches(self) -> Iterator[dict[str, Any]]:
        batches: ShardBatches = self.dataset
        state, self._resume = self._resume, None
        if state is not None:
            batches.epoch, batches.start = state["epoch"], state["next_batch"]
            torch.set_rng_state(state["rng"])
        else:
            epoch = self.epoch_of() if self.epoch_of is not None else None
            batches.epoch, batches.start = self._next_epoch if epoch is None else epoch, 0
        self._epoch, self._next_epoch = batches.epoch, batches.epoch + 1
        self._handed_out, self._exhausted = batches.start, False
        for batch in super().__iter__():
            batches.items.note_skipped(batch.pop("skipped_samples"))
            self._handed_out += 1
            yield batch
        self._exhausted = True

    def state_dict(self) -> dict[str, Any]:
        """Where to resume: epoch, first batch not handed out yet, RNG state now, and the plan."""
        return {
            "epoch": self._epoch,
            "next_batch": 0 if self._exhausted else self._handed_out,
            "new_epoch": self._exhausted,
            "next_epoch": self._next_epoch,
            "rng": torch.get_rng_state(),
            "plan": self.dataset.plan.resume_key(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved batch on the next iteration (a new epoch when the saved one was done)."""
        self._next_epoch = state["next_epoch"]
        if list(state["plan"]) != self.dataset.plan.resume_key():
            warnings.warn(
                f"the checkpoint's shard loader plan {state['plan']} (samples, batch size, processes, seed, buffer) "
                f"differs from this run's {self.dataset.plan.resume_key()}: the epoch restarts from its first batch",
                stacklevel=2,
            )
        elif state["new_epoch"]:
            torch.set_rng_state(state["rng"])
        else:
            self._resume = dict(state)


class WebDatasetDataModule(VisionLanguageDataModule):
    """Image-text pairs in WebDataset shards: a folder of ``.tar`` shards and its ``dataset.json``.

    Write the folder with ``python -m distill.shards csv ...`` (a pairs CSV) or
    ``python -m distill.shards shapesworld ...``. The class list (label order), domains, OOD
    domains and templates come from ``dataset.json``; the arguments below override the last two.
    The index, every listed shard file and the splits asked for are checked when the datamodule
    is built; each sample is checked when read: no image, an image that does not decode, no
    caption, a class or domain outside ``dataset.json``'s lists are errors naming the shard file
    and the sample key, or, with ``skip_bad_samples``, left out of their batch (which gets one
    smaller), warned about once and counted in ``skipped_samples``.

    Training reads a different shuffled order each epoch, split over the DDP processes and the
    loader's workers without duplicates; every process yields the same number of batches (the
    few samples that do not fill one are left out of that epoch: see the module docstring).
    A resumed run continues mid-epoch with the batches an uninterrupted run would have read.

    Args:
        root: the shard folder (with ``dataset.json``).
        splits: splits to read (default: those of train, val and test that ``dataset.json`` has).
        ood_domains: domain names treated as out-of-distribution (default: ``dataset.json``'s).
        templates: zero-shot prompt templates with one ``{}`` (default: ``dataset.json``'s, else
            ``ImageTextDataModule``'s).
        unlabelled_samples: samples without a class while ``dataset.json`` lists classes are an
            ``error``, or kept with label -1 for retrieval and label-free losses (``retrieval_only``).
        shuffle_buffer: training shuffle buffer, in samples (0: shard order only).
        seed: training shuffle seed (with the epoch; the same on every process).
        skip_bad_samples: skip, count and report bad samples instead of stopping at the first.
        batch_size: batch size (per process).
        num_workers: data loader worker processes (per process).
        augment: auto-augment policy of training images, applied before the student's and the
            teacher's transforms so both see the same image.
    """

    def __init__(
        self,
        root: str,
        splits: list[str] | None = None,
        ood_domains: list[str] | None = None,
        templates: list[str] | None = None,
        unlabelled_samples: Unlabelled = "error",
        shuffle_buffer: int = 2000,
        seed: int = 0,
        skip_bad_samples: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        augment: AugmentPolicy = "none",
    ) -> None:
        super().__init__(batch_size, num_workers, augment)
        if unlabelled_samples not in ("error", "retrieval_only"):
            raise ValueError(f"unlabelled_samples must be 'error' or 'retrieval_only', got {unlabelled_samples!r}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 samples, got {shuffle_buffer}")
        self.root, self.meta = Path(root), load_metadata(root)
        index = self.root / METADATA
        self.splits = [s for s in SPLITS if s in self.meta.splits] if splits is None else list(splits)
        wrong = [s for s in self.splits if s not in SPLITS or s not in self.meta.splits]
        if wrong or not self.splits:
            raise ValueError(
                f"{index} has splits {list(self.meta.splits)}; cannot read {wrong or 'none of train/val/test'}"
            )
        for split in self.splits:
            for shard in self.meta.splits[split].shards:
                if not (self.root / shard).is_file():
                    raise FileNotFoundError(f"shard file {self.root / shard} not found (split {split!r} of {index})")
        unlabelled = {s: self.meta.splits[s].unlabelled for s in self.splits if self.meta.splits[s].unlabelled}
        if unlabelled and self.meta.classnames and unlabelled_samples == "error":
            raise ValueError(
                f"{index}: samples without a class ({unlabelled}) while it lists classes: "
                "set unlabelled_samples=retrieval_only to keep them with label -1"
            )
        self._ood = list(self.meta.ood_domains if ood_domains is None else ood_domains)
        unknown = [d for d in self._ood if d not in self.meta.domain_names]
        if unknown:
            raise ValueError(f"ood_domains {unknown} are not domains of {index} ({self.meta.domain_names})")
        self._templates = list(templates or self.meta.templates or DEFAULT_TEMPLATES)
        self.shuffle_buffer, self.seed, self.skip_bad_samples = shuffle_buffer, seed, skip_bad_samples
        self.predict_split = "test" if "test" in self.splits else self.splits[-1]
        self.reader = ShardReader(self.root, self.meta, unlabelled_samples)
        self.datasets: dict[str, ShardSplit] = {}

    # The task -------------------------------------------------------------------------------------
    @property
    def classnames(self) -> list[str]:
        """Class names of ``dataset.json`` in label order (empty: pairs only, every label -1)."""
        return list(self.meta.classnames)

    @property
    def allows_unlabelled(self) -> bool:
        """Whether some samples have no class (label -1): a folder of pairs only, or samples kept
        by ``unlabelled_samples=retrieval_only``."""
        return not self.meta.classnames or any(self.meta.splits[s].unlabelled for s in self.splits)

    @property
    def templates(self) -> list[str]:
        """Zero-shot prompt templates."""
        return self._templates

    @property
    def domain_names(self) -> list[str]:
        """Domain names of ``dataset.json`` (``default`` for samples without one)."""
        return list(self.meta.domain_names)

    @property
    def id_domains(self) -> list[str]:
        """Every domain not in ``ood_domains``."""
        return [d for d in self.meta.domain_names if d not in self._ood]

    @property
    def ood_domains(self) -> list[str]:
        """Out-of-distribution domains."""
        return list(self._ood)

    # Splits -----------------------------------------------------------------------------------------
    def split_dataset(self, split: str) -> ShardSplit:
        """Random access to the samples of ``split`` (the loaders stream them instead)."""
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not read from {self.root / METADATA} (splits: {self.splits})")
        if split not in self.datasets:
            self.datasets[split] = ShardSplit(self.reader, split)
        return self.datasets[split]

    def num_items(self, split: str) -> int:
        """Samples in ``split`` (``dataset.json``'s count)."""
        return len(self.split_dataset(split))

    def item_keys(self, split: str) -> list[str]:
        """A content key per sample of ``split``, by ``index``, from ``dataset.json`` (no image is read):
        ``<shard digest>/<sample key>``, new whenever the shard holding the sample was written with other data."""
        self.split_dataset(split)
        return self.meta.splits[split].item_keys()

    @property
    def skipped_samples(self) -> dict[str, str]:
        """``"<split>/<key>" -> message`` of every bad sample skipped so far (``skip_bad_samples``)."""
        return {f"{s}/{key}": message for s, d in self.datasets.items() for key, message in d.skipped.items()}

    def raw_samples_at(self, split: str, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Untransformed samples at these indices, reading only the shards that hold them. With
        ``skip_bad_samples`` a bad one is left out (and counted), else it is an error."""
        items = self.split_dataset(split)
        saved, items.transform = items.transform, None
        samples = []
        try:
            for index in indices:
                try:
                    samples.append(items[int(index)])
                except BadSampleError as err:
                    if not self.skip_bad_samples:
                        raise
                    items.note_skipped([(err.key, str(err))])
        finally:
            items.transform = saved
        return samples

    # Loaders ----------------------------------------------------------------------------------------
    def _trainer_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def _shard_loader(self, split: str, train: bool) -> ShardLoader:
        if self.io is None:
            raise RuntimeError(
                f"{type(self).__name__} has no transforms yet: use it through a Trainer, or call connect(module) first"
            )
        rank, world_size = _rank_and_world_size()
        items = self.split_dataset(split)
        items.transform = self.io.views(split)
        plan = ShardPlan(tuple(items.counts), self.batch_size, rank, world_size, train, self.seed, self.shuffle_buffer)
        batches = ShardBatches(items, plan, self.skip_bad_samples, self.io.collate(split))
        if train and not len(batches):
            raise ValueError(f"split {split!r} has {len(items)} samples: not one for each of {world_size} processes")
        # Training workers restart each epoch: they must see the epoch and the resume point.
        persistent = self.num_workers > 0 and not train
        loader = ShardLoader(
            batches,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_whole_batch,
            persistent_workers=persistent,
        )
        loader.epoch_of = self._trainer_epoch if train else None
        return loader

    def train_dataloader(self) -> ShardLoader:
        return self._shard_loader("train", train=True)

    def val_dataloader(self) -> ShardLoader:
        return self._shard_loader("val", train=False)

    def test_dataloader(self) -> ShardLoader:
        return self._shard_loader("test", train=False)

    def predict_dataloader(self) -> ShardLoader:
        return self._shard_loader(self.predict_split, train=False)
