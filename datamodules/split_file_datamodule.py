"""Classification data listed in CoOp split files: the few-shot and base-to-novel protocols.

The split files (``split_zhou_<Name>.json``: ``train`` / ``val`` / ``test`` lists of
``[relative_image_path, label, classname]``) are read and checked by ``distill.datamodules.split_files``.

Protocols (prompt-learning papers):

- few-shot: ``shots`` = K items per class sampled from ``train`` under ``seed``; validation
  takes min(K, 4) per class from ``val``; test is the full ``test`` list.
- base-to-novel: labels sorted, the first ceil(C/2) are *base*, the rest *novel*; train on base
  (``train_classes=base``), then test with ``eval_classes=base`` and again with
  ``eval_classes=novel``; the zero-shot classifier covers only the evaluated subset. Report
  HM = 2BN / (B + N) of the two accuracies.

Everything is checked when the datamodule is built (before a Trainer exists): the files'
format, labels and names, and that every image in use exists. Images are not decoded then
(too slow for 100k files); a file that fails to decode later is an error naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from distill.datamodules.base import SPLITS, VisionLanguageDataModule
from distill.datamodules.common import AugmentPolicy, sample_views
from distill.datamodules.image_text_datamodule import UnreadableImageError
from distill.datamodules.split_files import (
    ClassSplit,
    SplitEntry,
    class_subset,
    read_classnames_file,
    read_split_file,
    sample_shots,
)

#: Checking more images than this shows a progress bar.
PROGRESS_FROM = 5000


def _some(items: Sequence, shown: int = 3) -> str:
    head = "; ".join(str(i) for i in items[:shown])
    return f"{head}; and {len(items) - shown} more" if len(items) > shown else head


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def _names_by_label(entries: Sequence[SplitEntry], known: dict[int, SplitEntry]) -> None:
    """Record each label's first entry in ``known``; a label named two ways is an error naming both entries."""
    for e in entries:
        first = known.setdefault(e.label, e)
        if first.classname != e.classname:
            raise ValueError(
                f"label {e.label} has two class names: {first.classname!r} ({first.where()}) and "
                f"{e.classname!r} ({e.where()})"
            )


class SplitFileDataset(Dataset):
    """Split-file entries as samples ``{image, caption, label, domain, index}``.

    Args:
        entries: the entries, in order.
        domains: domain index of each entry.
        root: folder the image paths are relative to.
        captions: caption of each class (by label): the first template filled with the class name.
        transform: PIL image -> dict of views (None: the raw PIL image).
    """

    def __init__(
        self, entries: list[SplitEntry], domains: list[int], root: Path, captions: list[str], transform=None
    ) -> None:
        self.entries, self.domains, self.root, self.captions = entries, domains, root, captions
        self.labels = [e.label for e in entries]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        path = self.root / entry.path
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except Exception as err:  # only existence is checked at set-up: name the file that fails
            raise UnreadableImageError(
                f"{entry.where()}: cannot read image {path} ({type(err).__name__}: {err})"
            ) from err
        return {
            **sample_views(self.transform, image, index),
            "caption": self.captions[entry.label],
            "label": entry.label,
            "domain": self.domains[index],
            "index": index,
        }


class SplitFileDataModule(VisionLanguageDataModule):
    """Image classification listed in CoOp split files, with the few-shot and base-to-novel protocols.

    Labels are 0..C-1 and index ``classnames``. Validation and test hold only the labels of
    ``eval_classes``; training holds those of ``train_classes``. The main split file is one
    in-distribution domain; each file in ``ood_split_files`` (same label space, e.g. an
    ImageNet-Sketch-style variant) adds its ``test`` list as an out-of-distribution domain of
    the *test* split only (validation stays in-distribution, so model selection never sees OOD
    data). Captions are the first template filled with the class name ("a photo of a dog."), so
    retrieval metrics still work.

    Few-shot sampling is deterministic under ``seed``: each class draws from its entries sorted by
    image path, with a generator of its own, so the selection does not depend on the order of the
    JSON entries nor on which other classes are trained.

    Args:
        root: folder the split files' image paths are relative to.
        split_file: the ``split_zhou_<Name>.json`` file.
        classnames_file: class names overriding the split file's, in label order: a ``.txt`` with
            one name per line (or ``<wordnet_id> <name>`` lines, as CoOp's ImageNet classnames.txt),
            or a ``.json`` list / ``{label: name}`` object.
        underscores_to_spaces: write class names with spaces ("golden_retriever" -> "golden retriever").
        shots: K training items per class (None: every training item); validation then takes
            min(K, 4) per class, test stays complete.
        seed: few-shot sampling seed.
        train_classes: classes trained on: ``all``, ``base`` (the first ceil(C/2) labels) or ``novel``.
        eval_classes: classes of validation and test (default: same as ``train_classes``); the
            zero-shot classifier covers only these.
        ood_split_files: domain name -> another split file over the same labels; its ``test`` list
            is evaluated as an OOD domain.
        domain_name: name of the main split's domain (default: ``<Name>`` of ``split_zhou_<Name>.json``,
            else the file's stem).
        templates: zero-shot prompt templates with one ``{}`` (default: ``["a photo of a {}."]``).
        skip_bad_images: leave out entries whose image file does not exist (warn once with their
            count) instead of stopping with an error naming them.
        batch_size: batch size of every loader.
        num_workers: data loader worker processes.
        augment: auto-augment policy of training images, applied before the student's and the
            teacher's transforms so both see the same image.
    """

    def __init__(
        self,
        root: str,
        split_file: str,
        classnames_file: str | None = None,
        underscores_to_spaces: bool = True,
        shots: int | None = None,
        seed: int = 1,
        train_classes: ClassSplit = "all",
        eval_classes: ClassSplit | None = None,
        ood_split_files: dict[str, str] | None = None,
        domain_name: str | None = None,
        templates: list[str] | None = None,
        skip_bad_images: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        augment: AugmentPolicy = "none",
    ) -> None:
        super().__init__(batch_size, num_workers, augment)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root folder not found: {self.root}")
        if shots is not None and shots < 1:
            raise ValueError(f"shots must be a positive number of items per class (or None for all), got {shots}")
        self._templates = list(templates or ["a photo of a {}."])
        bad = [t for t in self._templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"templates must each hold exactly one '{{}}' for the class name; bad: {bad}")
        self.split_file, self.shots, self.seed = Path(split_file), shots, seed

        main = read_split_file(self.split_file)
        self._classnames = self._read_classnames(main, classnames_file, underscores_to_spaces)
        num_classes = len(self._classnames)
        self.train_labels = class_subset(num_classes, train_classes)
        self.eval_labels = class_subset(num_classes, eval_classes or train_classes)

        match = re.fullmatch(r"split_zhou_(.+)\.json", self.split_file.name)
        main_domain = domain_name or (match.group(1) if match else self.split_file.stem)
        ood_tests = self._read_ood(ood_split_files or {}, main_domain, num_classes)
        self._domain_names = [main_domain, *ood_tests]

        train_set, eval_set = set(self.train_labels), set(self.eval_labels)
        lists = {
            "train": [e for e in main["train"] if e.label in train_set],
            "val": [e for e in main["val"] if e.label in eval_set],
            "test": [e for e in main["test"] if e.label in eval_set],
            **{f"ood/{d}": [e for e in t if e.label in eval_set] for d, t in ood_tests.items()},
        }
        self.skipped = self._check_images(lists, skip_bad_images)
        if self.skipped:
            dropped = set(self.skipped)
            lists = {k: [e for e in v if e not in dropped] for k, v in lists.items()}
        if shots is not None:
            # The CoOp protocol: K shots per class for training, min(K, 4) for validation.
            for split, labels, k in (("train", self.train_labels, shots), ("val", self.eval_labels, min(shots, 4))):
                lists[split] = sample_shots(lists[split], labels, k, seed, split, self._classnames)

        captions = [self._templates[0].format(name) for name in self._classnames]
        tests = [(lists["test"], 0)] + [(lists[f"ood/{d}"], i) for i, d in enumerate(ood_tests, 1)]
        self.datasets = {
            "train": SplitFileDataset(lists["train"], [0] * len(lists["train"]), self.root, captions),
            "val": SplitFileDataset(lists["val"], [0] * len(lists["val"]), self.root, captions),
            "test": SplitFileDataset(
                [e for t, _ in tests for e in t], [d for t, d in tests for _ in t], self.root, captions
            ),
        }
        counts = ", ".join(f"{s} {len(d)}" for s, d in self.datasets.items())
        rank_zero_info(
            f"{self.split_file.name}: {num_classes} classes; items {counts} (shots={shots}, seed={seed}, train_classes="
            f"{train_classes}, eval_classes={eval_classes or train_classes}, domains {self._domain_names})"
        )

    # Reading and checking -------------------------------------------------------------------------
    def _read_classnames(
        self, main: dict[str, list[SplitEntry]], classnames_file: str | None, underscores_to_spaces: bool
    ) -> list[str]:
        """Class names by label; labels must be 0..C-1 and each named one way."""
        entries = [e for split in SPLITS for e in main[split]]
        if not entries:
            raise ValueError(f"{self.split_file}: the train, val and test lists are all empty")
        self._first_entry: dict[int, SplitEntry] = {}
        _names_by_label(entries, self._first_entry)
        num_classes = max(self._first_entry) + 1
        if num_classes != len(self._first_entry):
            # The first gaps lie below len + 10, however large the largest label.
            gaps = [i for i in range(min(num_classes, len(self._first_entry) + 10)) if i not in self._first_entry]
            raise ValueError(
                f"{self.split_file}: labels must be 0..C-1 with none missing; the largest is {num_classes - 1} "
                f"but no entry has label(s) {gaps[:10]}{' ...' if num_classes - len(self._first_entry) > 10 else ''}"
            )
        names = [self._first_entry[label].classname for label in range(num_classes)]
        if classnames_file:
            names = read_classnames_file(classnames_file)
            if len(names) != num_classes:
                raise ValueError(
                    f"{classnames_file} lists {len(names)} class names but {self.split_file} has {num_classes} "
                    f"labels (0..{num_classes - 1})"
                )
        names = [n.replace("_", " ") if underscores_to_spaces else n for n in names]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            rank_zero_warn(
                f"{self.split_file}: several labels share a class name: {repeated[:5]}; zero-shot classification "
                "cannot tell them apart"
            )
        return names

    def _read_ood(self, files: dict[str, str], main_domain: str, num_classes: int) -> dict[str, list[SplitEntry]]:
        """The ``test`` list of each OOD split file, checked against the main label space."""
        if main_domain in files:
            raise ValueError(f"ood_split_files names {main_domain!r}, the main split's domain; give another name")
        tests = {}
        for domain, path in files.items():
            entries = read_split_file(path, required=("test",))["test"]
            outside = [e for e in entries if e.label >= num_classes]
            if outside:
                raise ValueError(
                    f"OOD domain {domain!r}: {_entries(len(outside))} with labels outside the {num_classes} classes of "
                    f"{self.split_file}, e.g. {_some([f'{e.where()} (label {e.label})' for e in outside])}"
                )
            _names_by_label(entries, self._first_entry)  # same label, same name as the main file
            tests[domain] = entries
        return tests

    def _check_images(self, lists: dict[str, list[SplitEntry]], skip: bool) -> list[SplitEntry]:
        """Every image in use exists (existence only: decoding 100k files here would be too slow)."""
        entries = [e for group in lists.values() for e in group]
        progress = tqdm(
            entries, desc=f"checking images of {self.split_file.name}", disable=len(entries) < PROGRESS_FROM
        )
        missing = [e for e in progress if not os.path.isfile(self.root / e.path)]
        if not missing:
            return []
        listed = _some([f"{e.where()}: {e.path}" for e in missing])
        if not skip:
            raise FileNotFoundError(
                f"{len(missing)} image file(s) not found under {self.root}: {listed}. Fix the paths or root, or set "
                "skip_bad_images=true to skip and count them"
            )
        rank_zero_warn(f"skipped {_entries(len(missing))} whose image file is missing (skip_bad_images): {listed}")
        return missing

    # The task -----------------------------------------------------------------------------------------
    @property
    def classnames(self) -> list[str]:
        """Names of all C classes, indexed by label (from the split file or ``classnames_file``)."""
        return self._classnames

    @property
    def templates(self) -> list[str]:
        """Zero-shot prompt templates."""
        return self._templates

    @property
    def domain_names(self) -> list[str]:
        """The main split's domain, then the OOD domains."""
        return list(self._domain_names)

    @property
    def id_domains(self) -> list[str]:
        """The main split file's domain."""
        return self._domain_names[:1]

    @property
    def ood_domains(self) -> list[str]:
        """The domains of ``ood_split_files`` (test split only)."""
        return self._domain_names[1:]

    @property
    def eval_class_indices(self) -> list[int]:
        """Labels of ``eval_classes``: what validation and test hold and the classifier covers."""
        return list(self.eval_labels)

    @property
    def train_class_indices(self) -> list[int]:
        """Labels the training split contains."""
        return sorted(set(self.datasets["train"].labels))

    def split_dataset(self, split: str) -> SplitFileDataset:
        """The (sampled) entries of ``split``; ``test`` also holds the OOD domains' items."""
        if split not in self.datasets:
            raise ValueError(f"unknown split {split!r}; SplitFileDataModule has {list(self.datasets)}")
        return self.datasets[split]
