"""ShapesWorld as a LightningDataModule: image-text pairs, classes, domains, ID vs OOD splits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from distill import shapesworld as sw
from distill.datamodules.base import VisionLanguageDataModule
from distill.datamodules.common import AugmentPolicy, sample_views

ClassSplit = Literal["all", "base", "novel"]


def split_classes(names: Sequence[str], which: ClassSplit) -> list[int]:
    """Label indices of a class split: base = first ceil(C/2) of the sorted names, novel = rest."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    n_base = math.ceil(len(names) / 2)
    if which == "all":
        return list(range(len(names)))
    if which == "base":
        return sorted(order[:n_base])
    if which == "novel":
        return sorted(order[n_base:])
    raise ValueError(f"unknown class split {which!r}; choose one of all, base, novel")


class ShapesWorldDataset(Dataset):
    """A fixed set of ShapesWorld items, balanced over domains and classes.

    Item ``i`` takes its domain and label from :meth:`domain_and_label` (domains cycle fastest,
    labels once per round of domains); everything else is drawn from ``(seed, split, i)``, so
    the same index gives the same pixels in every process.

    Args:
        split: ``train``, ``val`` or ``test``.
        size: number of items.
        domains: domain indices to cycle through.
        labels: label indices to cycle through.
        image_size: image side in pixels.
        task: ``shape`` or ``shape_colour``.
        num_colours: colours in use.
        second_object_prob: chance of a distractor object.
        seed: world seed.
        transform: PIL image -> dict of views (``image``, optionally ``teacher_image``).
        cache: render every item once up front (fast epochs) instead of on access.
    """

    def __init__(
        self,
        split: str,
        size: int,
        domains: Sequence[int],
        labels: Sequence[int],
        image_size: int,
        task: str,
        num_colours: int,
        second_object_prob: float,
        seed: int,
        transform=None,
        cache: bool = True,
    ) -> None:
        self.split, self.size, self.domains, self.labels = split, size, list(domains), list(labels)
        self.kwargs = dict(
            seed=seed,
            split=split,
            image_size=image_size,
            task=task,
            num_colours=num_colours,
            second_object_prob=second_object_prob,
        )
        self.transform = transform
        self._images: np.ndarray | None = None
        self._captions: list[str] | None = None
        if cache:
            items = [
                self.item(i)
                for i in tqdm(range(size), desc=f"rendering ShapesWorld {split}", leave=False, disable=size < 2000)
            ]
            self._images = np.stack([it.image for it in items])
            self._captions = [it.caption for it in items]

    def __len__(self) -> int:
        return self.size

    def domain_and_label(self, index: int) -> tuple[int, int]:
        """Domain and label indices of item ``index`` (:func:`distill.shapesworld.domain_and_label`)."""
        return sw.domain_and_label(index, self.domains, self.labels)

    def item(self, index: int) -> sw.ShapesItem:
        """The raw rendered item at ``index`` (uint8 pixels, caption, label, domain)."""
        domain, label = self.domain_and_label(index)
        return sw.render(index, domain=domain, label=label, **self.kwargs)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.split} split of {self.size} items")
        domain, label = self.domain_and_label(index)
        if self._images is not None:
            pixels, caption = self._images[index], self._captions[index]
        else:
            it = self.item(index)
            pixels, caption = it.image, it.caption
        views = sample_views(self.transform, Image.fromarray(pixels), index)
        return {**views, "caption": caption, "label": label, "domain": domain, "index": index}


class ShapesWorldDataModule(VisionLanguageDataModule):
    """ShapesWorld: a procedural, seeded image-text world with domains and class splits.

    The training split draws from ``train_domains`` only; validation and test cover the
    training domains (in-distribution, ID) and the ``ood_domains`` (out-of-distribution).
    Images are transformed and captions tokenized by the model being trained (its
    ``preprocess_train`` / ``preprocess_val`` / ``tokenizer``).

    Args:
        train_domains: domains seen in training (default: all). Known domains: flat, outline,
            texture, shaded, sketch, pixel, night.
        ood_domains: held-out domains evaluated as OOD (default: every domain not trained on).
        task: ``shape`` (16 classes), ``shape_colour`` (shape x colour), ``shape_size`` (shape x
            3 sizes) or ``shape_position`` (shape x 5 positions); see ``distill.shapesworld.class_names``.
        train_classes: class split trained on: ``all``, ``base`` (first half of the sorted
            class names) or ``novel`` (the rest).
        eval_classes: class split evaluated on (default: same as ``train_classes``).
        image_size: image side in pixels.
        num_colours: number of colours used (at most 10).
        second_object_prob: probability of a smaller distractor object in an image.
        num_train: training items.
        num_val: validation items (spread over ID and OOD domains).
        num_test: test items (spread over ID and OOD domains).
        batch_size: batch size of every loader.
        num_workers: data loader worker processes.
        seed: world seed: the same seed gives the same items on every machine.
        cache_images: render all items once in ``setup`` (fast) rather than on every access.
        augment: auto-augment policy of training images (torchvision TrivialAugmentWide,
            RandAugment or AugMix), applied before the student's and the teacher's transforms so
            both see the same image (consistent teaching).
    """

    def __init__(
        self,
        train_domains: list[str] | None = None,
        ood_domains: list[str] | None = None,
        task: Literal["shape", "shape_colour", "shape_size", "shape_position"] = "shape",
        train_classes: ClassSplit = "all",
        eval_classes: ClassSplit | None = None,
        image_size: int = 64,
        num_colours: int = 10,
        second_object_prob: float = 0.0,
        num_train: int = 20000,
        num_val: int = 1400,
        num_test: int = 2800,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        cache_images: bool = True,
        augment: AugmentPolicy = "none",
    ) -> None:
        super().__init__(batch_size, num_workers, augment)
        self.train_domain_names = self._check_domains(train_domains or list(sw.DOMAINS), "train_domains")
        default_ood = [d for d in sw.DOMAINS if d not in self.train_domain_names]
        self.ood_domain_names = self._check_domains(default_ood if ood_domains is None else ood_domains, "ood_domains")
        overlap = set(self.train_domain_names) & set(self.ood_domain_names)
        if overlap:
            raise ValueError(f"domains {sorted(overlap)} are both in train_domains and ood_domains")
        self.classnames_all = sw.class_names(task, num_colours)
        self.train_labels = split_classes(self.classnames_all, train_classes)
        self.eval_labels = split_classes(self.classnames_all, eval_classes or train_classes)
        if not 16 <= image_size <= 1024:
            raise ValueError(f"image_size must be in [16, 1024], got {image_size}")
        self.world_kwargs = dict(
            image_size=image_size, task=task, num_colours=num_colours, second_object_prob=second_object_prob, seed=seed
        )
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.cache_images = cache_images
        self.datasets: dict[str, ShapesWorldDataset] = {}

    @staticmethod
    def _check_domains(names: Sequence[str], key: str) -> list[str]:
        unknown = [d for d in names if d not in sw.DOMAINS]
        if unknown:
            raise ValueError(f"{key}: unknown ShapesWorld domain(s) {unknown}; known: {list(sw.DOMAINS)}")
        return list(names)

    # What evaluation callbacks read ---------------------------------------------------------
    @property
    def domain_names(self) -> list[str]:
        """Names of all domains, indexed by the batch's ``domain`` value."""
        return list(sw.DOMAINS)

    @property
    def id_domains(self) -> list[str]:
        """In-distribution (training) domains."""
        return self.train_domain_names

    @property
    def ood_domains(self) -> list[str]:
        """Held-out (out-of-distribution) domains."""
        return self.ood_domain_names

    @property
    def classnames(self) -> list[str]:
        """Names of all classes, indexed by the batch's ``label`` value."""
        return self.classnames_all

    @property
    def eval_class_indices(self) -> list[int]:
        """Labels that evaluation splits contain (the zero-shot classifier covers these)."""
        return self.eval_labels

    @property
    def train_class_indices(self) -> list[int]:
        """Labels the training split contains (``train_classes``)."""
        return self.train_labels

    @property
    def templates(self) -> list[str]:
        """Zero-shot prompt templates for ShapesWorld classes."""
        return list(sw.ZERO_SHOT_TEMPLATES)

    # Splits -------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Take transforms/tokenizer from the model and render the splits the stage needs."""
        super().setup(stage)
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in wanted.get(stage, ["train", "val", "test"]):
            self.split_dataset(split)

    def split_dataset(self, split: str) -> ShapesWorldDataset:
        """The rendered items of ``split`` (rendered on first use)."""
        if split not in self.sizes:
            raise ValueError(f"unknown split {split!r}; ShapesWorld has {list(self.sizes)}")
        if split not in self.datasets:
            names = self.train_domain_names if split == "train" else self.train_domain_names + self.ood_domain_names
            labels = self.train_labels if split == "train" else self.eval_labels
            domains = [sw.DOMAINS.index(d) for d in names]
            self.datasets[split] = ShapesWorldDataset(
                split, self.sizes[split], domains, labels, cache=self.cache_images, **self.world_kwargs
            )
        return self.datasets[split]
