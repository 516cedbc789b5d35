"""The ``distill export`` command: from a trained module and its datamodule to a gated edge bundle.

``distill.cli.DistillTrainer.export`` only forwards its arguments to :func:`run_export`. This
module imports nothing beyond torch at import time: onnx, onnxruntime and bitsandbytes (the
``export`` extra) are imported when an export runs, and their absence is one line and exit
status 2, so ``distill fit`` / ``test`` work without them.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from distill.datamodules.base import VisionLanguageDataModule
from distill.modules.base import CHECKPOINT_MARKER, VisionLanguageTask

if TYPE_CHECKING:
    from distill.export.parity import EvalSet

Quantisation = Literal["dynamic", "static"]
DEFAULT_QUANTIZE: tuple[Quantisation, ...] = ("dynamic", "static")
#: Modules the ``export`` extra provides (``pip install 'distill[export]'``).
EXPORT_EXTRA = ("onnx", "onnxruntime", "onnxscript", "bitsandbytes")


@dataclass(frozen=True)
class Gates:
    """Parity gates: the exported model must behave like the PyTorch one.

    Attributes:
        fp32_max_abs_diff: max abs difference of ONNX fp32 vs PyTorch embeddings.
        int8_max_top1_drop: max drop of INT8 top-1 (points) vs ONNX fp32, on ID and on OOD.
        allow_failed_int8: drop an INT8 variant that misses its gate from the bundle (and say
            so in the report) instead of failing the export.
    """

    fp32_max_abs_diff: float = 1e-4
    int8_max_top1_drop: float = 1.0
    allow_failed_int8: bool = False


def _fail(message: str, status: int) -> SystemExit:
    print(f"distill: {message}", file=sys.stderr)
    return SystemExit(status)


def run_export(
    model: VisionLanguageTask,
    datamodule: VisionLanguageDataModule | None,
    ckpt_path: str | None,
    output_dir: str,
    opset: int,
    quantize: list[Quantisation] | None,
    bitsandbytes: list[int] | None,
    gates: Gates,
    eval_split: str,
    num_eval_images: int | None,
    num_calibration_images: int,
    latency_repeats: int,
) -> dict[str, Any]:
    """``distill export`` (see ``DistillTrainer.export`` for the arguments).

    Exits with status 2 and one line on bad input or a missing optional dependency, and with
    status 1 when a parity gate is missed (the bundle is then not written).
    """
    try:
        from distill.export.parity import ParityError
        from distill.export.pipeline import export_bundle
        from distill.export.report import markdown_report

        if bitsandbytes is None or bitsandbytes:  # the bitsandbytes rows of the report
            from distill.export.bnb import load_bitsandbytes

            load_bitsandbytes()
    except ImportError as err:
        missing = err.name or str(err)
        raise _fail(
            f"error: distill export needs the export extra (module {missing!r} is missing): "
            "pip install 'distill[export]'",
            2,
        ) from err
    try:
        if not isinstance(model, VisionLanguageTask):
            raise ValueError(f"distill export needs a distill module (VisionLanguageTask), got {type(model).__name__}")
        if datamodule is None:
            raise ValueError("distill export needs a datamodule (--data) for the parity gates and the class bank")
        if ckpt_path is not None:
            load_checkpoint(model, ckpt_path)
        model = model.cpu().eval()
        with torch.no_grad():
            bank = model.class_bank(list(datamodule.classnames), list(datamodule.templates))
        eval_set = eval_set_from_datamodule(datamodule, bank, eval_split, num_eval_images)
        quantize = list(DEFAULT_QUANTIZE if quantize is None else quantize)
        calibration = []
        if "static" in quantize:
            calibration = [s["image"] for s in datamodule.raw_samples("train", num_calibration_images)]
        report = export_bundle(
            model,
            eval_set,
            calibration,
            output_dir,
            opset=opset,
            quantize=quantize,
            bitsandbytes=bitsandbytes,
            latency_repeats=latency_repeats,
            gates=gates,
        )
    except ParityError as err:
        raise _fail(f"export failed a parity gate: {err}", 1) from err
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise _fail(f"error: {err}", 2) from err
    print(markdown_report(report))
    print(f"edge bundle written to {output_dir}")
    return report


def eval_set_from_datamodule(
    datamodule: VisionLanguageDataModule, class_bank: torch.Tensor, split: str = "test", limit: int | None = None
) -> EvalSet:
    """Task images of a datamodule's split, with its domains and class list.

    Args:
        datamodule: the task data.
        class_bank: (C, D) class text embeddings for ``datamodule.classnames``.
        split: ``train``, ``val`` or ``test``.
        limit: at most this many images, evenly spaced over the split (all when None).
    """
    from distill.export.parity import EvalSet

    # Items without a class (label -1, ``allows_unlabelled``) have nothing to score: top-1 leaves them out.
    samples = [s for s in datamodule.raw_samples(split, limit) if s["label"] >= 0]
    if not samples:
        raise ValueError(f"the datamodule's {split} split has no images to check the export on")
    classnames = list(datamodule.classnames)
    if class_bank.shape[0] != len(classnames):
        raise ValueError(f"class bank has {class_bank.shape[0]} rows for {len(classnames)} class names")
    return EvalSet(
        images=[s["image"] for s in samples],
        labels=np.array([s["label"] for s in samples]),
        domains=np.array([s["domain"] for s in samples]),
        domain_names=list(datamodule.domain_names),
        id_domains=list(datamodule.id_domains),
        ood_domains=list(datamodule.ood_domains),
        class_bank=class_bank.detach().float().cpu().numpy(),
        classnames=classnames,
        eval_classes=list(datamodule.eval_class_indices),
    )


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
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return set()  # Lightning names a class it cannot import itself
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty}


def load_checkpoint(model: VisionLanguageTask, path: str | Path) -> None:
    """Load a distill training checkpoint's weights into ``model``, or fail clearly.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a distill checkpoint of this model (unreadable with
            ``weights_only=True``, no ``state_dict``, written by another module, or weights that
            do not match).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and format errors all mean "not ours"
        raise ValueError(
            f"{path} is not a distill checkpoint (unreadable as a weights-only torch file: {type(err).__name__})"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path} is not a distill checkpoint: it has no 'state_dict'")
    written_by = (checkpoint.get(CHECKPOINT_MARKER) or {}).get("module")
    if written_by is not None and written_by != type(model).__name__:
        raise ValueError(f"{path} was written by {written_by}, not {type(model).__name__}: use its config")
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path} does not match {type(model).__name__}: {str(err).splitlines()[0]}") from err
