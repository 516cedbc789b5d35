"""A guard that fails a distillation run whose teacher is not frozen."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from distill.modules.base import VisionLanguageTask


class TeacherFrozenCheck(pl.Callback):
    """Stop the run if the teacher trains, takes gradients or changes its weights.

    Checks at fit start, every ``every_n_steps`` training steps and at the end of training:
    the module's ``teacher`` must be in eval mode, no parameter may require a gradient, and a
    float64 checksum of every parameter and buffer must stay what it was at the start.

    Args:
        every_n_steps: how often the weights' checksum is compared (0: start and end only).
    """

    def __init__(self, every_n_steps: int = 200) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._checksums: dict[str, float] = {}

    @staticmethod
    def _teacher(pl_module: pl.LightningModule) -> torch.nn.Module | None:
        """The module's teacher; None for a distill module that runs without one (from a teacher cache)."""
        if not isinstance(pl_module, VisionLanguageTask):
            raise ValueError(f"TeacherFrozenCheck: {type(pl_module).__name__} is not a distill module")
        return pl_module.teacher

    @staticmethod
    def _sums(teacher: torch.nn.Module) -> dict[str, float]:
        tensors = {**dict(teacher.named_parameters()), **dict(teacher.named_buffers())}
        return {name: float(t.detach().double().sum()) for name, t in tensors.items() if t.is_floating_point()}

    def _check(self, pl_module: pl.LightningModule, where: str, weights: bool) -> None:
        teacher = self._teacher(pl_module)
        if teacher is None:  # nothing to guard: the teacher's embeddings come from a cache
            return
        if any(m.training for m in teacher.modules()):
            raise RuntimeError(f"teacher is in training mode ({where}); it must stay in eval mode")
        trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
        if trainable:
            raise RuntimeError(f"teacher parameters require gradients ({where}): {trainable[:3]}")
        if weights:
            changed = [n for n, v in self._sums(teacher).items() if v != self._checksums.get(n)]
            if changed:
                raise RuntimeError(f"teacher weights changed during training ({where}): {changed[:3]}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(pl_module, "fit start", weights=False)
        teacher = self._teacher(pl_module)
        if teacher is None:
            rank_zero_info(f"TeacherFrozenCheck: {type(pl_module).__name__} runs without a teacher; nothing to check")
            return
        self._checksums = self._sums(teacher)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        weights = self.every_n_steps > 0 and step % self.every_n_steps == 0
        self._check(pl_module, f"step {step}", weights=weights)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(pl_module, "end of training", weights=True)
