"""The ``distill`` command: LightningCLI over distill's modules, datamodules and callbacks.

    distill fit --config configs/demo/teacher.yaml
    distill test --config configs/demo/teacher_eval.yaml
    distill fit --print_config          # every option, with defaults
    distill fit --model.help ContrastiveModule
    distill export --config configs/distill/labels_only.yaml --config configs/distill/vl2v_adip.yaml \
        --ckpt_path runs/distill/vl2v_adip/checkpoints/last.ckpt --output_dir runs/export/bundle

Models and datamodules are chosen with ``class_path`` (subclass mode); classes from
``distill.modules``, ``distill.datamodules`` and ``distill.callbacks`` can be named bare.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI

# Imported so that their classes can be named without a module path in configs.
import distill.callbacks
import distill.datamodules
import distill.modules  # noqa: F401
from distill.export.parity import ParityError
from distill.export.pipeline import DEFAULT_QUANTIZE, Gates, eval_set_from_datamodule, export_bundle, load_checkpoint
from distill.export.report import markdown_report

# Errors a user's config or files cause (bad model name, missing file, unknown domain...):
# reported as one line before any training starts, not as a traceback.
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError)


class DistillTrainer(pl.Trainer):
    """Lightning's Trainer plus the ``export`` subcommand."""

    def export(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output_dir: str = "runs/export/bundle",
        opset: int = 20,
        quantize: list[Literal["dynamic", "static"]] | None = None,
        bitsandbytes: list[int] | None = None,
        fp32_max_abs_diff: float = 1e-4,
        int8_max_top1_drop: float = 1.0,
        allow_failed_int8: bool = False,
        eval_split: Literal["train", "val", "test"] = "test",
        num_eval_images: int | None = 1024,
        num_calibration_images: int = 256,
        latency_repeats: int = 20,
    ) -> dict[str, Any]:
        """Export the student to an edge bundle (ONNX fp32 + INT8), gated on parity with PyTorch.

        Args:
            model: the trained module (from the config; weights from ``ckpt_path``).
            datamodule: task data for the parity gates, calibration and the class bank.
            ckpt_path: a distill training checkpoint; the config's weights when None.
            output_dir: the bundle folder, replaced only when every gate passes.
            opset: ONNX opset (asserted on the exported file).
            quantize: INT8 variants: ``dynamic`` and/or ``static`` (default both; [] for none).
            bitsandbytes: bit widths of PyTorch bitsandbytes students to report (default [8, 4]).
            fp32_max_abs_diff: gate: ONNX fp32 vs PyTorch embedding max abs difference.
            int8_max_top1_drop: gate: INT8 top-1 drop in points vs fp32, on ID and OOD.
            allow_failed_int8: leave an INT8 variant that misses its gate out of the bundle
                instead of failing.
            eval_split: the split whose images check parity and accuracy.
            num_eval_images: images for the gates (evenly spaced over the split; None: all).
            num_calibration_images: training images calibrating static INT8.
            latency_repeats: timed repeats at batch 1 (a quarter of them at batch 32).
        """
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
        teacher = getattr(model, "teacher", None)
        logit_scale = float(teacher.logit_scale) if teacher is not None else 100.0
        report = export_bundle(
            model,
            eval_set,
            calibration,
            output_dir,
            opset=opset,
            quantize=quantize,
            bitsandbytes=bitsandbytes,
            logit_scale=logit_scale,
            latency_repeats=latency_repeats,
            gates=Gates(fp32_max_abs_diff, int8_max_top1_drop, allow_failed_int8),
        )
        print(markdown_report(report))
        print(f"edge bundle written to {output_dir}")
        return report


class DistillCLI(LightningCLI):
    """LightningCLI that reports configuration mistakes as one clear line."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters before anything else runs: a file
        # that is not a Lightning checkpoint must stop here with one line, not a traceback.
        try:
            super()._parse_ckpt_path()
        except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as err:
            path = self.config[self.config.subcommand].get("ckpt_path")
            print(
                f"distill: error: {path} is not a distill checkpoint (unreadable as a weights-only torch "
                f"checkpoint: {type(err).__name__})",
                file=sys.stderr,
            )
            raise SystemExit(2) from err

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except ParityError as err:
            print(f"distill: export failed a parity gate: {err}", file=sys.stderr)
            raise SystemExit(1) from err
        except _USER_ERRORS as err:
            if subcommand != "export":
                raise
            print(f"distill: error: {err}", file=sys.stderr)
            raise SystemExit(2) from err

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _USER_ERRORS as err:
            cause = _root_cause(err)
            message = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause
            print(f"distill: error: {message}", file=sys.stderr)
            raise SystemExit(2) from err


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception: jsonargparse wraps errors raised in a class's __init__."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err


def main(args: list[str] | None = None) -> DistillCLI:
    """Run the ``distill`` command line (``args`` for programmatic and test use)."""
    return DistillCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        trainer_class=DistillTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def console_main() -> None:
    """Entry point of the ``distill`` console script and ``python -m distill``."""
    main()


if __name__ == "__main__":
    console_main()
