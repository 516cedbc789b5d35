"""Prompt files: a trained prompt learner saved apart from the (frozen) model it prompts.

A prompt file holds the learner's class (a :class:`distill.prompts.PromptLearner` subclass), its
state dict (the learned context, its settings and class list as extra state) and nothing of
the frozen model, so it is a few KB and is applied to the model it was trained on (a
:class:`~distill.teachers.Teacher` with ``prompts=...``, or ``AdaptationModule``). It is read
with ``torch.load(weights_only=True)``: tensors, strings and numbers only.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.files import atomic_write

PROMPT_FILE_FORMAT = "distill.prompts/1"
"""Format tag stored in every prompt file."""


def save_prompt_file(learner: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``learner``'s class and state dict to ``path`` atomically."""
    path = Path(path)
    cls = type(learner)
    payload: dict[str, Any] = {
        "format": PROMPT_FILE_FORMAT,
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "state_dict": {
            k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in learner.state_dict().items()
        },
    }
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)
    return path


def load_prompt_file(
    path: str | os.PathLike, clip_model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor]
) -> nn.Module:
    """Rebuild the prompt learner saved in ``path`` over ``clip_model`` and load its weights.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a prompt file, or a learner class that is not a distill prompt learner.
    """
    from distill.prompts import PromptLearner

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle that weights_only refuses, or not a torch file at all
        raise ValueError(f"{path} is not a distill prompt file ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != PROMPT_FILE_FORMAT:
        raise ValueError(f"{path} is not a distill prompt file (no format tag {PROMPT_FILE_FORMAT!r})")
    module_name, _, class_name = payload["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, PromptLearner)):
        raise ValueError(f"{path}: {payload['class_path']} is not a distill.prompts.PromptLearner")
    learner = cls.from_state_dict(clip_model, tokenizer, payload["state_dict"])
    return learner
