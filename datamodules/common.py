"""Pieces shared by the image-text datamodules: model-supplied transforms and collation.

The image transform and the tokenizer belong to the model being trained (a teacher at 224 px
with CLIP's BPE, a student at 64 px with its own mean/std...), not to the data. A datamodule
therefore asks the attached LightningModule for them in ``setup()``: ``preprocess_train``,
``preprocess_val`` and ``tokenizer`` attributes, each optional.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image


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
    """

    def __init__(self, train_transform: Callable | None = None, eval_transform: Callable | None = None,
                 tokenizer: Callable | None = None) -> None:
        self.train_transform = train_transform or to_float_tensor
        self.eval_transform = eval_transform or to_float_tensor
        self.tokenizer = tokenizer

    @classmethod
    def from_model(cls, model: Any) -> ModelIO:
        """Read ``preprocess_train`` / ``preprocess_val`` / ``tokenizer`` off a module, when present."""
        return cls(getattr(model, "preprocess_train", None), getattr(model, "preprocess_val", None),
                   getattr(model, "tokenizer", None))


class ImageTextCollate:
    """Collate dict samples into a batch dict and tokenize the captions.

    The batch holds ``image`` (B, 3, H, W), ``caption`` (list of B strings), ``text``
    (B, L) token ids when a tokenizer is set, ``label`` (B,) and ``domain`` (B,).
    """

    def __init__(self, tokenizer: Callable | None = None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "image": torch.stack([s["image"] for s in samples]),
            "caption": [s["caption"] for s in samples],
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "domain": torch.tensor([s["domain"] for s in samples], dtype=torch.long),
        }
        if self.tokenizer is not None:
            batch["text"] = self.tokenizer(batch["caption"])
        return batch
