"""Pieces shared by the image-text datamodules: model-supplied transforms and collation.

The image transform and the tokenizer belong to the model being trained (a teacher at 224 px
with CLIP's BPE, a student at 64 px with its own mean/std...), not to the data. A datamodule
therefore asks the attached LightningModule for them in ``setup()``: ``preprocess_train``,
``preprocess_val`` and ``tokenizer`` attributes, each optional. A distillation module also
exposes ``teacher_preprocess`` and ``teacher_tokenizer``: training batches then carry the
teacher's own view of each image (``teacher_image``) and tokens (``teacher_text``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

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


def to_float_tensor(image: Image.Image) -> torch.Tensor:
    """Fallback transform: PIL RGB image -> (3, H, W) float tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ModelIO:
    """Transforms and tokenizer a datamodule takes from the model it feeds.

    Args:
        train_transform: PIL image -> tensor for the training split.
        eval_transform: PIL image -> tensor for val/test/predict.
        tokenizer: ``list[str] -> (M, L)`` token ids; captions are left as strings when None.
        teacher_transform: PIL image -> tensor, the teacher's view (training split only).
        teacher_tokenizer: the teacher's tokenizer (training split only).
        augment: PIL -> PIL augmentation of training images, before every view.
    """

    def __init__(
        self,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        tokenizer: Callable | None = None,
        teacher_transform: Callable | None = None,
        teacher_tokenizer: Callable | None = None,
        augment: Callable | None = None,
    ) -> None:
        self.augment = augment
        self.train_transform = train_transform or to_float_tensor
        self.eval_transform = eval_transform or to_float_tensor
        self.tokenizer = tokenizer
        self.teacher_transform, self.teacher_tokenizer = teacher_transform, teacher_tokenizer

    @classmethod
    def from_model(cls, model: Any, augment: Callable | None = None) -> ModelIO:
        """Read the transforms and tokenizers a module exposes (each attribute optional)."""
        return cls(
            *(
                getattr(model, name, None)
                for name in (
                    "preprocess_train",
                    "preprocess_val",
                    "tokenizer",
                    "teacher_preprocess",
                    "teacher_tokenizer",
                )
            ),
            augment=augment,
        )

    def views(self, split: str) -> Views:
        """The image views of a split: the model's, plus the teacher's when training."""
        if split == "train":
            return Views(self.train_transform, self.teacher_transform, self.augment)
        return Views(self.eval_transform)

    def collate(self, split: str) -> ImageTextCollate:
        """The batch collator of a split (teacher tokens only when training)."""
        return ImageTextCollate(self.tokenizer, self.teacher_tokenizer if split == "train" else None)


class Views:
    """PIL image -> ``{"image": model view, "teacher_image": teacher view}`` (teacher optional).

    Args:
        transform: the model's transform.
        teacher_transform: the teacher's transform, or None.
        augment: PIL -> PIL augmentation applied once, before both views; the sample then
            carries ``augmented=True`` (its teacher embeddings change every epoch).
    """

    def __init__(
        self, transform: Callable, teacher_transform: Callable | None = None, augment: Callable | None = None
    ) -> None:
        self.transform, self.teacher_transform, self.augment = transform, teacher_transform, augment

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        if self.augment is not None:
            image = self.augment(image)
        views: dict[str, Any] = {"image": self.transform(image), "augmented": self.augment is not None}
        if self.teacher_transform is not None:
            views["teacher_image"] = self.teacher_transform(image)
        return views


class ImageTextCollate:
    """Collate dict samples into a batch dict and tokenize the captions.

    The batch holds ``image`` (B, 3, H, W), ``caption`` (list of B strings), ``text``
    (B, L) token ids when a tokenizer is set, ``label`` (B,), ``domain`` (B,) and ``index``
    (B,) dataset indices, ``augmented`` (bool: the images went through a random augmentation);
    plus ``teacher_image`` / ``teacher_text`` when the samples carry a
    teacher view and a teacher tokenizer is set.
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
        if self.tokenizer is not None:
            batch["text"] = self.tokenizer(batch["caption"])
        if self.teacher_tokenizer is not None:
            batch["teacher_text"] = self.teacher_tokenizer(batch["caption"])
        return batch


class LoaderMixin(pl.LightningDataModule):
    """The four Lightning loader hooks over one ``_loader(split, shuffle)`` method."""

    predict_split = "test"

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        raise NotImplementedError

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
        dataset = self._loader(split, shuffle=False).dataset
        saved, dataset.transform = dataset.transform, Views(_unchanged)
        try:
            count = len(dataset) if limit is None else min(limit, len(dataset))
            indices = np.linspace(0, len(dataset) - 1, count).round().astype(int) if count else []
            return [dataset[int(i)] for i in indices]
        finally:
            dataset.transform = saved


def _unchanged(image: Image.Image) -> Image.Image:
    return image
