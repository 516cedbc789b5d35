"""Zero-shot evaluation of a frozen vision-language model (no training)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from distill.modules.base import VisionLanguageTask
from distill.teachers import Teacher


class ZeroShotModule(VisionLanguageTask):
    """Evaluate a frozen open_clip model zero-shot with ``distill validate/test/predict``.

    Takes the same model sources as the distillation teacher: an open_clip name with a
    pretrained tag or weights file, a training checkpoint, a ``local-dir`` folder or a config.
    Pair it with the ``ZeroShotEvaluation`` callback for per-domain top-k and retrieval.

    Args:
        model_name: open_clip model name or ``local-dir:/folder``.
        pretrained: pretrained tag in the local cache, or a weights file.
        checkpoint: a distill training checkpoint, an open_clip state dict or a local-dir folder.
        model_config: open_clip model config (dict or JSON path).
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        model_config: dict | str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.teacher = Teacher(
            model_name=model_name, pretrained=pretrained, checkpoint=checkpoint, model_config=model_config
        )
        self.tokenizer = self.teacher.tokenizer
        self.preprocess_train = self.teacher.preprocess
        self.preprocess_val = self.teacher.preprocess

    @property
    def has_text_tower(self) -> bool:
        return True

    @property
    def logit_scale(self) -> torch.Tensor:
        """The model's learned temperature, exponentiated."""
        return self.teacher.logit_scale

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, D) embeddings."""
        return self.teacher.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(M, L) token ids -> (M, D) embeddings."""
        return self.teacher.encode_text(tokens, normalize=normalize)

    def class_bank(
        self,
        classnames: Sequence[str],
        templates: Sequence[str],
        descriptors: Mapping[str, Sequence[str]] | None = None,
    ) -> torch.Tensor:
        """(C, D) zero-shot classifier, cached per class list (the model is frozen)."""
        return self.teacher.class_bank(classnames, templates, descriptors)

    def export_network(self) -> nn.Module:
        """The open_clip model (both towers)."""
        return self.teacher.model

    def configure_optimizers(self) -> Any:
        raise RuntimeError("ZeroShotModule does not train; use validate, test or predict")
