"""The base task: what every distill LightningModule offers to datamodules, callbacks, CLI and export.

One class says what a module must provide, so no other part probes a module with ``hasattr``:

* encoders: ``encode_image`` (required), ``encode_text`` (when ``has_text_tower``);
* what a datamodule feeds it: ``preprocess_train``, ``preprocess_val``, ``tokenizer`` and, for
  a module that runs a teacher on the same samples, ``teacher_preprocess`` /
  ``teacher_tokenizer`` (set in ``__init__``; a datamodule reads them and fails naming a
  missing one);
* the zero-shot classifier ``class_bank(classnames, templates)`` and the ``logit_scale`` that
  turns cosine similarities into logits (exported with the model for its probabilities);
* ``export_network()``: the ``nn.Module`` that ``distill export`` turns into ONNX;
* ``teacher``: the frozen teacher, or None for a module without one;
* shared validation / test / predict steps, the checkpoint marker and the optimizer set-up.

A new training regime is a short subclass: build the parts in ``__init__``, set the transforms,
implement ``encode_image`` (and ``encode_text``), ``logit_scale`` and ``training_step``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

import distill
from distill import CHECKPOINT_MARKER
from distill.augment_replay import AugmentReplay
from distill.teacher_cache import TeacherCache
from distill.zeroshot import build_class_bank


class VisionLanguageTask(pl.LightningModule):
    """Base of every distill LightningModule (contrastive, zero-shot, distillation, adaptation).

    Subclasses call ``super().__init__(optimizer, lr_scheduler)`` first, then build their
    parts and set ``preprocess_train``, ``preprocess_val`` and ``tokenizer`` (and the teacher
    views when they run a teacher).

    Args:
        optimizer: optimizer class and arguments (weight decay applies to matrices only).
        lr_scheduler: optional scheduler, stepped every optimizer step.
    """

    def __init__(
        self, optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: LRSchedulerCallable | None = None
    ) -> None:
        super().__init__()
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        #: PIL image -> (3, H, W) tensor for training batches.
        self.preprocess_train: Callable | None = None
        #: PIL image -> (3, H, W) tensor for validation, test, predict and export.
        self.preprocess_val: Callable | None = None
        #: ``list[str] -> (M, L)`` token ids; None for an image-only module.
        self.tokenizer: Callable[[list[str]], torch.Tensor] | None = None
        #: The teacher's own view of each training image, when a teacher runs per batch.
        self.teacher_preprocess: Callable | None = None
        #: The teacher's tokenizer for the training captions, when a teacher runs per batch.
        self.teacher_tokenizer: Callable[[list[str]], torch.Tensor] | None = None
        #: The frozen teacher (``distill.teachers.Teacher``), None when the module has none.
        self.teacher: nn.Module | None = None
        #: A teacher cache's stored augmentations, replayed by the datamodule on training images (else None).
        self.augment_replay: AugmentReplay | None = None
        #: The teacher embedding cache the module reads (``distill cache``), else None.
        self.embedding_cache: TeacherCache | None = None

    # Encoders ------------------------------------------------------------------------------
    @property
    def has_text_tower(self) -> bool:
        """Whether ``encode_text`` embeds captions with this module's own text tower."""
        return False

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, 3, H, W) preprocessed images -> (N, D) embeddings (L2-normalised by default)."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode_image")

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(M, L) token ids -> (M, D) embeddings; only when ``has_text_tower``."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower (has_text_tower is False)")

    @property
    def logit_scale(self) -> torch.Tensor:
        """The exponentiated temperature that turns cosine similarities into logits (scalar)."""
        raise NotImplementedError(f"{type(self).__name__} must define logit_scale")

    @torch.no_grad()
    def class_bank(
        self,
        classnames: Sequence[str],
        templates: Sequence[str],
        descriptors: Mapping[str, Sequence[str]] | None = None,
    ) -> torch.Tensor:
        """The zero-shot classifier: (C, D) class text embeddings, rows in label order.

        The default embeds the prompts with this module's own text tower; modules that
        classify with a frozen teacher's text tower override it (and cache the result).
        """
        if not self.has_text_tower or self.tokenizer is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no text tower and tokenizer to build a class bank with: override class_bank"
            )
        return build_class_bank(self, self.tokenizer, classnames, templates, descriptors, self.device)

    @property
    def image_conditioned(self) -> bool:
        """Whether the classifier depends on each image (CoCoOp): evaluation then asks
        ``image_conditioned_logits`` instead of ``class_bank``."""
        return False

    def image_conditioned_logits(
        self, image_embeds: torch.Tensor, classnames: Sequence[str], templates: Sequence[str]
    ) -> torch.Tensor:
        """(N, D) image embeddings -> (N, C) class scores, for modules with ``image_conditioned``."""
        raise NotImplementedError(f"{type(self).__name__} has a fixed class bank: use class_bank")

    def export_network(self) -> nn.Module:
        """The network ``distill export`` writes as ONNX: its ``encode_image`` (and
        ``encode_text`` when ``has_text_tower``) become the exported graphs. Training-only
        parts (a teacher, loss modules) stay behind. The default is the module itself."""
        return self

    def output_dirs(self) -> dict[str, str]:
        """Folders the module writes to (``{"export_dir": ...}``), checked before training starts."""
        return {}

    # Shared evaluation ---------------------------------------------------------------------
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """What evaluation reads: ``image_embeds`` (B, D) and ``text_embeds`` (B, D) or None."""
        text = self.encode_text(batch["text"]) if self.has_text_tower and "text" in batch else None
        return {"image_embeds": self.encode_image(batch["image"]), "text_embeds": text}

    def eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor | None]:
        """One validation or test step (``stage`` is ``val`` or ``test``); override to log more."""
        return self.eval_outputs(batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor | None]:
        return self.eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor | None]:
        return self.eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor | None]:
        """Image embeddings, and text embeddings when the module has a text tower."""
        return self.eval_outputs(batch)

    # Optimisation ----------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        """Named parameters the optimizer updates (default: all that require gradients)."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def configure_optimizers(self) -> Any:
        """Two parameter groups, the CLIP recipe: weight decay on matrices only.

        Gains, biases, normalisation parameters and learnable temperatures/biases of the
        logits (``logit_*``) get no weight decay. The scheduler steps every optimizer step.
        """
        decay, no_decay = [], []
        for name, param in self.trainable_parameters():
            if not param.requires_grad:
                continue
            is_gain_or_bias = param.ndim < 2 or "bn" in name or "ln" in name or "logit_" in name
            (no_decay if is_gain_or_bias else decay).append(param)
        if not decay and not no_decay:
            raise ValueError(f"{type(self).__name__} has no trainable parameters")
        opt = self.optimizer([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.lr_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler(opt), "interval": "step"}}

    # Checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Marks the file as ours, naming the module: ``distill export`` checks it before loading.
        checkpoint[CHECKPOINT_MARKER] = {"module": type(self).__name__, "version": distill.__version__}
