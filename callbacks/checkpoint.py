"""One resumable checkpoint per run, at a fixed place: ``<default_root_dir>/checkpoints/last.ckpt``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

#: The checkpoint ``--ckpt_path last`` resumes from, relative to ``trainer.default_root_dir``.
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


def last_checkpoint(default_root_dir: str | os.PathLike) -> Path:
    """Where a run in ``default_root_dir`` keeps its ``last.ckpt``."""
    return Path(default_root_dir) / LAST_CHECKPOINT


class RunCheckpoint(pl.Callback):
    """Keep ``<default_root_dir>/checkpoints/last.ckpt`` up to date, so a run can always resume.

    Written (atomically: a temporary file renamed over the old one, so a kill mid-write leaves
    the previous checkpoint intact) after every validation, every ``every_n_train_steps``
    training steps, at the end of training and on Ctrl-C. A run stopped by an error (a NaN
    loss...) keeps the last good checkpoint: nothing is written then. ``distill fit`` adds this
    callback to every run that configures none; ``--ckpt_path last`` resumes from its file.

    Args:
        every_n_train_steps: also save every this many optimizer steps (None: at validation,
            at the end and on Ctrl-C only).
    """

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        super().__init__()
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1 or None, got {every_n_train_steps}")
        self.every_n_train_steps = every_n_train_steps
        self._saved_step: int | None = None
        self.path: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.path = last_checkpoint(trainer.default_root_dir)

    def _save(self, trainer: pl.Trainer) -> None:
        if self.path is None or self._saved_step == trainer.global_step:
            return
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # full state, to resume from (and no Lightning notice)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)
        rank_zero_info(f"last checkpoint: {self.path} (step {trainer.global_step}; resume with --ckpt_path last)")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):  # a graceful stop: keep what was trained
            self._save(trainer)
            rank_zero_info(f"interrupted: saved {self.path} at step {trainer.global_step}")
