"""Plots, tables and the HTML report to W&B, when the run has a ``WandbLogger`` (no-ops otherwise)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger  # imports wandb only when a WandbLogger is built


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """The run's W&B loggers (usually none or one)."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_plots(trainer: pl.Trainer, stage: str, paths: Sequence[Path]) -> None:
    """Each PNG as W&B media under ``<stage>/plots/<file stem>`` (stem without the ``_<stage>`` suffix)."""
    for logger in wandb_loggers(trainer):
        for path in paths:
            name = path.stem.removesuffix(f"_{stage}")
            logger.log_image(key=f"{stage}/plots/{name}", images=[str(path)], step=trainer.global_step)


def log_table(trainer: pl.Trainer, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A table as a W&B table under ``key``."""
    if not rows:
        return
    for logger in wandb_loggers(trainer):
        logger.log_table(key=key, columns=columns, data=rows, step=trainer.global_step)


def log_html(trainer: pl.Trainer, key: str, path: Path) -> None:
    """An HTML file (the run report) as W&B media under ``key``."""
    for logger in wandb_loggers(trainer):
        import wandb

        logger.experiment.log({key: wandb.Html(path.read_text(encoding="utf-8"))})
