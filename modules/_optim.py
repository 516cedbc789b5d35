"""Optimizer set-up shared by the LightningModules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def configure_optimizers(named_parameters: Iterable[tuple[str, nn.Parameter]], optimizer, lr_scheduler) -> Any:
    """Two parameter groups, the CLIP recipe: weight decay on matrices only.

    Gains, biases, normalisation parameters and learnable temperatures/biases of the logits
    (``logit_*``) get no weight decay. The scheduler, when given, steps every optimizer step.
    """
    decay, no_decay = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        is_gain_or_bias = param.ndim < 2 or "bn" in name or "ln" in name or "logit_" in name
        (no_decay if is_gain_or_bias else decay).append(param)
    opt = optimizer([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt), "interval": "step"}}
