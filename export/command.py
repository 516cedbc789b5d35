"""The ``distill export`` command: from a trained module and its datamodule to a gated edge bundle.

``distill.cli.DistillTrainer.export`` only forwards its arguments to :func:`run_export`. This
module imports nothing beyond torch at import time: onnx, onnxruntime and bitsandbytes (the
``export`` extra) are imported when an export runs, and their absence is one line and exit
status 2, so ``distill fit`` / ``test`` work without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from distill import CHECKPOINT_MARKER
from distill.cli_errors import fail
from distill.datamodules.base import VisionLanguageDataModule
from distill.modules.base import VisionLanguageTask

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
        raise fail(
            f"distill export needs the export extra (module {missing!r} is missing): pip install 'distill[export]'",
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
        raise fail(f"export failed a parity gate: {err}", 1, prefix="") from err
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise fail(err) from err
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
