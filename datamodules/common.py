"""Pieces of every datamodule's samples and batches: augmentation, image views and collation.

A distillation module also declares ``teacher_preprocess`` and ``teacher_tokenizer``: training
batches then carry the teacher's own view of each image (``teacher_image``) and tokens
(``teacher_text``) beside the student's. A module that reads a teacher embedding cache also
hands over its augmentation replay (``distill.augment_replay.AugmentReplay``): each training
sample then becomes one of the cache's stored views, drawn at random, and carries its ``aug_id``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from PIL import Image
from torchvision.transforms import v2

from distill.augment_replay import AugmentReplay

AugmentPolicy = Literal["none", "trivialaugment", "randaugment", "augmix"]


def build_augment(policy: AugmentPolicy) -> Callable[[Image.Image], Image.Image] | None:
    """A torchvision auto-augment policy on PIL images (``none`` -> None).

    It runs on the raw sample *before* the model's and the teacher's transforms, so both see the
    same augmented image ("consistent teaching"): the teacher's targets describe exactly what the
    student sees.
    """
    policies = {
        "none": None,
        "trivialaugment": v2.TrivialAugmentWide,
        "randaugment": v2.RandAugment,
        "augmix": v2.AugMix,
    }
    if policy not in policies:
        raise ValueError(f"augment must be one of {sorted(policies)}, got {policy!r}")
    return None if policies[policy] is None else policies[policy]()


class Views:
    """PIL image -> ``{"image": model view, "teacher_image": teacher view}`` (teacher optional).

    Args:
        transform: the model's transform.
        teacher_transform: the teacher's transform, or None.
        augment: PIL -> PIL augmentation applied once, before both views; the sample then
            carries ``augmented=True`` (its teacher embeddings change every epoch).
        replay: a teacher cache's stored augmentations (instead of ``augment``): the sample becomes
            view ``aug_id`` of its item, ``aug_id`` drawn at random, and carries ``aug_id``.
    """

    def __init__(
        self,
        transform: Callable,
        teacher_transform: Callable | None = None,
        augment: Callable | None = None,
        replay: AugmentReplay | None = None,
    ) -> None:
        if augment is not None and replay is not None:
            raise ValueError("a random augment and a teacher cache's augmentation replay exclude each other")
        self.transform, self.teacher_transform = transform, teacher_transform
        self.augment, self.replay = augment, replay

    def __call__(self, image: Image.Image, index: int) -> dict[str, Any]:
        """The views of dataset item ``index`` (the index lets an augmentation be replayed per item)."""
        views: dict[str, Any] = {}
        if self.augment is not None:
            image = self.augment(image)
        elif self.replay is not None:
            views["aug_id"] = self.replay.draw()
            image = self.replay(image, index, views["aug_id"])
        views.update(image=self.transform(image), augmented=self.augment is not None or self.replay is not None)
        if self.teacher_transform is not None:
            views["teacher_image"] = self.teacher_transform(image)
        return views


def sample_views(
    transform: Callable[[Image.Image, int], dict[str, Any]] | None, image: Image.Image, index: int
) -> dict[str, Any]:
    """A dataset's views of item ``index``: ``transform(image, index)``, or the raw PIL image when None."""
    return {"image": image} if transform is None else transform(image, index)


class ImageTextCollate:
    """Collate dict samples into a batch dict and tokenize the captions.

    The batch holds ``image`` (B, 3, H, W), ``caption`` (list of B strings), ``text``
    (B, L) token ids when a tokenizer is set, ``label`` (B,), ``domain`` (B,) and ``index``
    (B,) dataset indices, ``augmented`` (bool: the images went through a random augmentation);
    plus ``teacher_image`` / ``teacher_text`` when the samples carry a
    teacher view and a teacher tokenizer is set, and ``aug_id`` (B,) when they carry the view id
    of a teacher cache's replayed augmentation.
    """

    def __init__(self, tokenizer: Callable | None = None, teacher_tokenizer: Callable | None = None) -> None:
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "caption": [s["caption"] for s in samples],
            "augmented": any(s.get("augmented", False) for s in samples),
        }
        for key in ("image", "teacher_image"):
            if key in samples[0]:
                batch[key] = torch.stack([s[key] for s in samples])
        for key in ("label", "domain", "index"):
            batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.long)
        if "aug_id" in samples[0]:
            batch["aug_id"] = torch.tensor([s["aug_id"] for s in samples], dtype=torch.long)
        if self.tokenizer is not None:
            batch["text"] = self.tokenizer(batch["caption"])
        if self.teacher_tokenizer is not None:
            batch["teacher_text"] = self.teacher_tokenizer(batch["caption"])
        return batch
