"""One-line messages of the ``distill`` command: what went wrong, where, and the closest valid name.

Shared by the CLI (``distill.cli``) and the export command (``distill.export.command``) so every
failure a user causes prints as ``distill: error: ...`` (or ``distill: ...`` for a missed gate)
and exits with a status, instead of a traceback or jsonargparse's usage dump.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distill import CHECKPOINT_MARKER


def fail(message: object, status: int = 2, prefix: str = "error: ") -> SystemExit:
    """Print ``distill: <prefix><message>`` to stderr; return the ``SystemExit(status)`` to raise."""
    print(f"distill: {prefix}{message}", file=sys.stderr)
    return SystemExit(status)


def class_at(class_path: str) -> type:
    """The class a dotted ``module.Name`` path names."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def condensed(message: str, option_names: list[str]) -> str:
    """One line out of jsonargparse's multi-line message, with "did you mean" for unknown keys.

    Args:
        message: the parser's error message.
        option_names: the parser's option names (``trainer.max_steps``...), for suggestions.
    """
    unknown_init_arg = re.search(r"class_path '([\w.]+)':\s+Option '([^']+)' is not accepted", message)
    if unknown_init_arg:
        class_path, key = unknown_init_arg.groups()
        known = list(inspect.signature(class_at(class_path)).parameters)
        return f"{class_path.rpartition('.')[2]} has no option {key!r}{_did_you_mean(key, known)}"
    unknown = re.search(r"does not accept option '([^']+)'|unrecognized arguments: --?([^\s=]+)", message)
    if unknown:
        key = unknown.group(1) or unknown.group(2)
        return f"unknown option {key!r}{_did_you_mean(key, option_names)}"
    return _union_errors(message) or "; ".join(line.strip() for line in message.splitlines()[:2] if line.strip())


def _union_errors(message: str) -> str | None:
    """The real reasons inside jsonargparse's "does not validate against any of the Union subtypes"."""
    lines = message.splitlines()
    if not any(line.strip() == "Errors:" for line in lines):
        return None
    start = next(i for i, line in enumerate(lines) if line.strip() == "Errors:") + 1
    entries: list[list[str]] = []
    for line in lines[start:]:
        if line.strip().startswith("Given value"):
            break
        if line.strip().startswith("- "):
            entries.append([line.strip()[2:]])
        elif entries and line.strip():
            entries[-1].append(line.strip())
    reasons = [" ".join(e) for e in entries if "NoneType" not in " ".join(e)]
    key = re.match(r'Parser key "([^"]+)"', message)
    text = "; ".join(reasons)
    text = re.sub(r"Problem with given class_path '(?:[\w]+\.)*(\w+)':", r"\1:", text)
    text = re.sub(r'Parser key "([^"]+)":', r"\1:", text)
    return f"{key.group(1)}: {text}" if key else text


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def checkpoint_module_error(checkpoint: Any, path: str | Path, config_class_path: str | None) -> str | None:
    """Why the module the command line builds could not take ``checkpoint``, in one line; None when it can.

    LightningCLI applies a checkpoint's hyperparameters to the config before it builds the model:
    when they name their class (``_class_path``, saved when the CLI built the module) it builds
    that class from them, else it merges them into the config's model. A checkpoint of another
    module than the config's therefore works only when it names its class and holds every
    argument that class needs: a ContrastiveModule or ZeroShotModule does (``distill export``
    then exports it, both towers), a DistillationModule does not (its teacher and student are
    not saved in it).

    Args:
        checkpoint: the checkpoint as ``torch.load(..., weights_only=True)`` returns it.
        path: its file, for the message.
        config_class_path: the config's ``model.class_path``.
    """
    if not isinstance(checkpoint, Mapping):
        return f"{path} is not a distill checkpoint: it holds a {type(checkpoint).__name__}, not a checkpoint dict"
    hparams = checkpoint.get("hyper_parameters") or {}
    marker = checkpoint.get(CHECKPOINT_MARKER) or {}
    ckpt_class = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
    written_by = marker.get("module") if isinstance(marker, Mapping) else None
    written_by = written_by or (ckpt_class.rsplit(".", 1)[-1] if ckpt_class else None)
    config_class = (config_class_path or "").rsplit(".", 1)[-1]
    if written_by is None or not config_class or written_by == config_class:
        return None
    mismatch = f"{path} holds a {written_by} but the config builds a {config_class}"
    advice = "pass the --config files the checkpoint was trained with"
    if not ckpt_class:
        return f"{mismatch}: {advice}"
    missing = sorted(_required_arguments(ckpt_class) - set(hparams))
    if missing:
        unsaved = ", ".join(missing)
        return f"{mismatch}, and the checkpoint cannot rebuild a {written_by} ({unsaved} not saved): {advice}"
    return None


def _required_arguments(class_path: str) -> set[str]:
    """Names of the ``__init__`` arguments without a default of the class at ``class_path``."""
    try:
        cls = class_at(class_path)
    except (ImportError, AttributeError, ValueError):
        return set()  # Lightning names a class it cannot import itself
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty}
