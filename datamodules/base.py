"""The base datamodule: what every distill datamodule offers, and its wiring to the model it feeds.

The image transform and the tokenizer belong to the model being trained (a teacher at 224 px
with CLIP's BPE, a student at 64 px with its own mean/std...), not to the data. In ``setup()``
the datamodule takes them from the attached :class:`~distill.modules.base.VisionLanguageTask`
(``preprocess_train``, ``preprocess_val``, ``tokenizer`` and the optional teacher views); a
module that offers no transform is an error naming the attribute, never a silent fallback.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, Dataset

from distill.augment_replay import AugmentReplay
from distill.datamodules.common import AugmentPolicy, ImageTextCollate, Views, build_augment
from distill.datamodules.sampling import ResumableBatchSampler, ResumableLoader
from distill.modules.base import VisionLanguageTask

SPLITS = ("train", "val", "test")


class ModelIO:
    """Transforms and tokenizers a datamodule takes from the model it feeds.

    Args:
        train_transform: PIL image -> tensor for the training split.
        eval_transform: PIL image -> tensor for val/test/predict.
        tokenizer: ``list[str] -> (M, L)`` token ids; captions are left as strings when None.
        teacher_transform: PIL image -> tensor, the teacher's view (training split only, unless
            ``teacher_views_in_eval``).
        teacher_tokenizer: the teacher's tokenizer (training split only, unless ``teacher_views_in_eval``).
        augment: PIL -> PIL augmentation of training images, before every view.
        teacher_views_in_eval: evaluation batches also carry the teacher's views (``teacher_image``,
            ``teacher_text``), for callbacks that compare teacher and student on the same images.
        replay: a teacher cache's stored augmentations, replayed on training images (excludes
            ``augment``); training batches then carry ``aug_id``, and the teacher's views only while
            ``replay.needs_teacher_views`` (an online teacher still embeds some items).
    """

    def __init__(
        self,
        train_transform: Callable,
        eval_transform: Callable,
        tokenizer: Callable | None = None,
        teacher_transform: Callable | None = None,
        teacher_tokenizer: Callable | None = None,
        augment: Callable | None = None,
        teacher_views_in_eval: bool = False,
        replay: AugmentReplay | None = None,
    ) -> None:
        self.train_transform, self.eval_transform, self.tokenizer = train_transform, eval_transform, tokenizer
        self.teacher_transform, self.teacher_tokenizer = teacher_transform, teacher_tokenizer
        self.augment, self.teacher_views_in_eval, self.replay = augment, teacher_views_in_eval, replay

    @classmethod
    def from_task(
        cls, task: VisionLanguageTask, augment: Callable | None = None, teacher_views_in_eval: bool = False
    ) -> ModelIO:
        """The transforms and tokenizers ``task`` declares (see ``VisionLanguageTask``).

        A task whose ``augment_replay`` is set (a ``DistillationModule`` reading a teacher cache)
        hands over its replay of the cache's stored augmentations.

        Raises:
            TypeError: ``task`` is not a distill module, or its ``augment_replay`` is not an ``AugmentReplay``.
            ValueError: it sets no ``preprocess_train`` or ``preprocess_val``, or a random ``augment``
                is asked for beside a teacher cache's replay.
        """
        if not isinstance(task, VisionLanguageTask):
            raise TypeError(f"distill datamodules feed a distill.modules.VisionLanguageTask; got {type(task).__name__}")
        transforms = {"preprocess_train": task.preprocess_train, "preprocess_val": task.preprocess_val}
        for name, transform in transforms.items():
            if transform is None:  # declared by the base task: None means "not set"
                raise ValueError(
                    f"{type(task).__name__} offers no {name}: set self.{name} (PIL image -> tensor) in its __init__"
                )
        replay = task.augment_replay
        if replay is not None and not isinstance(replay, AugmentReplay):
            raise TypeError(
                f"{type(task).__name__}.augment_replay must be an AugmentReplay, got {type(replay).__name__}"
            )
        if replay is not None and augment is not None:
            raise ValueError(
                f"the datamodule's augment policy cannot be used with a teacher cache ({type(task).__name__} "
                "teacher_cache): the cache replays its own stored augmentations; set the datamodule's augment: none"
            )
        return cls(
            task.preprocess_train,
            task.preprocess_val,
            task.tokenizer,
            task.teacher_preprocess,
            task.teacher_tokenizer,
            augment,
            teacher_views_in_eval,
            replay,
        )

    def _train_teacher_views(self) -> bool:
        """Whether training batches carry the teacher's views (not when a cache supplies every embedding)."""
        return self.replay is None or self.replay.needs_teacher_views

    def views(self, split: str) -> Views:
        """The image views of a split: the model's, plus the teacher's when training (or when asked in eval)."""
        if split == "train":
            teacher = self.teacher_transform if self._train_teacher_views() else None
            return Views(self.train_transform, teacher, self.augment, self.replay)
        return Views(self.eval_transform, self.teacher_transform if self.teacher_views_in_eval else None)

    def collate(self, split: str) -> ImageTextCollate:
        """The batch collator of a split (teacher tokens when training, or when asked in eval)."""
        with_teacher = (split == "train" and self._train_teacher_views()) or self.teacher_views_in_eval
        return ImageTextCollate(self.tokenizer, self.teacher_tokenizer if with_teacher else None)


class VisionLanguageDataModule(pl.LightningDataModule):
    """Base of every distill datamodule: the task's classes, templates and domains, and its splits.

    Subclasses implement the task description (``classnames``, ``templates``,
    ``domain_names``, ``id_domains``, ``ood_domains``, optionally ``eval_class_indices``) and
    ``split_dataset(split)``: a dataset of dict samples (``image``, ``caption``, ``label``,
    ``domain``, ``index``) with a settable ``transform`` (PIL image -> dict of views; None gives
    the raw PIL image). Loaders, batching, model wiring and ``raw_samples`` are written here once.

    Args:
        batch_size: batch size of every loader.
        num_workers: data loader worker processes.
        augment: auto-augment policy of training images, applied before the model's and the
            teacher's transforms so both see the same image (consistent teaching).
    """

    #: The split ``predict`` reads.
    predict_split: str = "test"

    def __init__(self, batch_size: int = 64, num_workers: int = 0, augment: AugmentPolicy = "none") -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of samples, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        build_augment(augment)  # fail on an unknown policy now, not at setup
        self.batch_size, self.num_workers, self.augment = batch_size, num_workers, augment
        self.io: ModelIO | None = None
        self._teacher_views_in_eval = False
        self._item_keys: dict[str, list[str]] = {}

    # The task (implemented by subclasses) ------------------------------------------------------
    @property
    def classnames(self) -> list[str]:
        """Names of all classes, indexed by the batch's ``label`` value (may be empty: pairs only)."""
        raise NotImplementedError

    @property
    def templates(self) -> list[str]:
        """Zero-shot prompt templates, each with one ``{}`` for the class name."""
        raise NotImplementedError

    @property
    def domain_names(self) -> list[str]:
        """Names of all domains, indexed by the batch's ``domain`` value."""
        raise NotImplementedError

    @property
    def id_domains(self) -> list[str]:
        """In-distribution domains."""
        raise NotImplementedError

    @property
    def ood_domains(self) -> list[str]:
        """Out-of-distribution (held-out) domains."""
        raise NotImplementedError

    @property
    def eval_class_indices(self) -> list[int]:
        """Labels that evaluation splits contain; the zero-shot classifier covers these (default: all)."""
        return list(range(len(self.classnames)))

    @property
    def train_class_indices(self) -> list[int]:
        """Labels the training split contains (default: all); adaptation classifies among these while
        training (e.g. the base classes of a base-to-novel split)."""
        return list(range(len(self.classnames)))

    @property
    def allows_unlabelled(self) -> bool:
        """Whether items may have no class (``label == -1``): kept for retrieval and label-free losses,
        left out of every classification metric. When False, a -1 label reaching evaluation is an error."""
        return False

    def split_dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (``train``, ``val`` or ``test``), built once and kept."""
        raise NotImplementedError

    def num_items(self, split: str) -> int:
        """Number of samples in ``split``."""
        return len(self.split_dataset(split))

    def item_keys(self, split: str) -> list[str]:
        """A stable key per item of ``split``, in dataset-index order: what a teacher cache is keyed by.

        Equal keys must mean equal items (same image, same caption) on every machine, and a changed
        item must get a new key, else a teacher cache would describe another image. The default is
        the SHA-256 of the item's decoded pixels (mode, size, bytes) and caption: right for any
        map-style dataset, but it reads every image once per process (kept afterwards). Subclasses
        whose items have a cheaper identity override it (a file path with the file's size and
        modification time, a generator's seed and index...).
        """
        if split not in self._item_keys:
            keys, count, step = [], self.num_items(split), 256
            for start in range(0, count, step):
                for sample in self.raw_samples_at(split, range(start, min(count, start + step))):
                    image, digest = sample["image"], hashlib.sha256()
                    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
                    digest.update(image.tobytes())
                    digest.update(str(sample.get("caption")).encode())
                    keys.append(f"sha256:{digest.hexdigest()}")
            self._item_keys[split] = keys
        return list(self._item_keys[split])

    # Wiring to the model -----------------------------------------------------------------------
    def connect(self, source: VisionLanguageTask | ModelIO) -> None:
        """Take transforms and tokenizers from a distill module (or an explicit ``ModelIO``)."""
        if isinstance(source, ModelIO):
            self.io = source
        else:
            self.io = ModelIO.from_task(source, build_augment(self.augment), self._teacher_views_in_eval)

    def request_teacher_views_in_eval(self) -> None:
        """Evaluation batches also carry the teacher's views of each item (``teacher_image``, ``teacher_text``).

        Called by callbacks that compare teacher and student on the same evaluation images (e.g.
        ``TeacherStudentDiagnostics``); takes effect for loaders built afterwards.
        """
        self._teacher_views_in_eval = True
        if self.io is not None:
            self.io.teacher_views_in_eval = True

    def setup(self, stage: str | None = None) -> None:
        """Connect to the Trainer's module (subclasses also prepare the stage's splits)."""
        if self.trainer is not None and self.trainer.lightning_module is not None:
            self.connect(self.trainer.lightning_module)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.io is None:
            raise RuntimeError(
                f"{type(self).__name__} has no transforms yet: use it through a Trainer, or call connect(module) first"
            )
        dataset = self.split_dataset(split)
        dataset.transform = self.io.views(split)
        common = dict(
            num_workers=self.num_workers, collate_fn=self.io.collate(split), persistent_workers=self.num_workers > 0
        )
        if shuffle:  # training: a loader Lightning checkpoints, so a killed run resumes mid-epoch
            sampler = ResumableBatchSampler(
                len(dataset), self.batch_size, shuffle=True, drop_last=len(dataset) > self.batch_size
            )
            return ResumableLoader(dataset, batch_sampler=sampler, **common)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split, shuffle=False)

    def raw_samples(self, split: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Untransformed samples of a split: ``{"image": PIL image, "label", "domain", ...}``.

        For checks that must run their own preprocessing (export parity, INT8 calibration).
        With ``limit``, items are taken evenly spaced over the split.
        """
        count = self.num_items(split) if limit is None else min(limit, self.num_items(split))
        indices = np.linspace(0, self.num_items(split) - 1, count).round().astype(int) if count else []
        return self.raw_samples_at(split, [int(i) for i in indices])

    def raw_samples_at(self, split: str, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Untransformed samples of ``split`` at these dataset indices (the batches' ``index`` values)."""
        dataset = self.split_dataset(split)
        saved, dataset.transform = dataset.transform, None
        try:
            return [dataset[int(i)] for i in indices]
        finally:
            dataset.transform = saved
