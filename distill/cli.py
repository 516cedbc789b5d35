"""The ``distill`` command: LightningCLI over distill's modules, datamodules and callbacks.

    distill fit --config configs/demo/base.yaml --config configs/demo/teacher.yaml
    distill test --config configs/demo/base.yaml --config configs/demo/teacher_eval.yaml
    distill fit --print_config          # every option, with defaults
    distill fit --model.help ContrastiveModule
    distill export --config configs/distill/base.yaml --config configs/distill/vl2v_adip.yaml \\
        --ckpt_path runs/distill/vl2v_adip/final.ckpt --output_dir runs/export/bundle

Models are subclasses of :class:`~distill.modules.VisionLanguageTask` and datamodules of
:class:`~distill.datamodules.VisionLanguageDataModule`, chosen with ``class_path`` (subclass
mode); classes from ``distill.modules``, ``distill.datamodules`` and ``distill.callbacks`` can
be named bare. Values are derived instead of typed twice: without a ``trainer.logger`` the run
logs to ``CSVLogger(save_dir=<trainer.default_root_dir>, name="logs")``, and the
``total_steps`` of a ``OneCycleLR`` scheduler is linked to ``trainer.max_steps``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so that their classes can be named without a module path in configs.
import distill.callbacks  # noqa: F401
from distill.callbacks.checkpoint import last_checkpoint
from distill.cli_errors import checkpoint_module_error, condensed, fail
from distill.datamodules import VisionLanguageDataModule
from distill.export.command import Gates, Quantisation, run_export
from distill.files import check_writable_dir
from distill.modules import VisionLanguageTask

# Errors a user's config or files cause (bad model name, missing file, unknown domain...):
# reported as one line before any training starts, not as a traceback.
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, TypeError)
_ONE_CYCLE = "torch.optim.lr_scheduler.OneCycleLR"
_RUN_CHECKPOINT = "distill.callbacks.RunCheckpoint"


class DistillArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, reporting a bad option as one line with the closest valid names."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:  # jsonargparse is trying alternatives: let it
            return super().error(message, ex)
        raise fail(condensed(message, [action.dest for action in self._actions]))


class DistillTrainer(pl.Trainer):
    """Lightning's Trainer plus the ``export`` subcommand."""

    def export(
        self,
        model: VisionLanguageTask,
        datamodule: VisionLanguageDataModule | None = None,
        ckpt_path: str | None = None,
        output_dir: str = "runs/export/bundle",
        opset: int = 20,
        quantize: list[Quantisation] | None = None,
        bitsandbytes: list[int] | None = None,
        gates: Gates = Gates(),
        eval_split: Literal["train", "val", "test"] = "test",
        num_eval_images: int | None = 1024,
        num_calibration_images: int = 256,
        latency_repeats: int = 20,
    ) -> dict[str, Any]:
        """Export the trained network to an edge bundle (ONNX fp32 + INT8), gated on parity with PyTorch.

        Needs the ``export`` extra (``pip install 'distill[export]'``).

        Args:
            model: the trained module (from the config; weights from ``ckpt_path``).
            datamodule: task data for the parity gates, calibration and the class bank.
            ckpt_path: a distill training checkpoint; the config's weights when None.
            output_dir: the bundle folder, replaced only when every gate passes.
            opset: ONNX opset (asserted on the exported file).
            quantize: INT8 variants: ``dynamic`` and/or ``static`` (default both; [] for none).
            bitsandbytes: bit widths of PyTorch bitsandbytes students to report (default [8, 4]).
            gates: parity gate thresholds.
            eval_split: the split whose images check parity and accuracy.
            num_eval_images: images for the gates (evenly spaced over the split; None: all).
            num_calibration_images: training images calibrating static INT8.
            latency_repeats: timed repeats at batch 1 (a quarter of them at batch 32).
        """
        return run_export(
            model,
            datamodule,
            ckpt_path,
            output_dir,
            opset,
            quantize,
            bitsandbytes,
            gates,
            eval_split,
            num_eval_images,
            num_calibration_images,
            latency_repeats,
        )


class DistillCLI(LightningCLI):
    """LightningCLI that reports configuration mistakes as one clear line."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # No prefix abbreviations: "--trainer.max_step" must not silently mean "max_steps".
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads a checkpoint's hyperparameters before anything else runs: a file
        # that is not a readable torch checkpoint must stop here with one line, not a traceback.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path not in ("last", "best", "hpc", "registry"):
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except FileNotFoundError:
                return  # Lightning names the missing file itself
            except Exception as err:  # pickle, zip and format errors all mean "not a checkpoint"
                raise fail(
                    f"{path} is not a distill checkpoint (unreadable as a weights-only torch checkpoint: "
                    f"{type(err).__name__})"
                ) from err
            # Its hyperparameters may switch the model class: only to a module they fully describe.
            model_config = self.config[subcommand].get("model") or Namespace()
            problem = checkpoint_module_error(checkpoint, path, model_config.get("class_path"))
            if problem:
                raise fail(problem)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Values that must agree are linked, not typed twice: a one-cycle schedule spans the run.
        # (The link applies only when the model's lr_scheduler has a total_steps argument.)
        parser.link_arguments("trainer.max_steps", "model.init_args.lr_scheduler.init_args.total_steps")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        root = trainer.default_root_dir or "."
        if self.subcommand in ("fit", None):  # None: run=False, a script that will fit
            self._add_run_checkpoint(config, root)
        # One run folder: logs go under default_root_dir unless a logger is configured.
        if trainer.get("logger") in (None, True):
            trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger",
                init_args=Namespace(save_dir=trainer.default_root_dir or ".", name="logs"),
            )
        # OneCycleLR's total_steps is linked to trainer.max_steps (add_arguments_to_parser).
        scheduler = (config.model.get("init_args") or Namespace()).get("lr_scheduler")
        is_one_cycle = isinstance(scheduler, Namespace) and scheduler.get("class_path") == _ONE_CYCLE
        if is_one_cycle and (trainer.get("max_steps") or -1) < 1:
            raise fail("OneCycleLR runs for trainer.max_steps: set trainer.max_steps to a positive number")

    @staticmethod
    def _add_run_checkpoint(config: Namespace, root: str) -> None:
        """Every fit keeps ``<root>/checkpoints/last.ckpt`` (``RunCheckpoint``); ``--ckpt_path last`` reads it."""
        callbacks = config.trainer.get("callbacks") or []
        class_paths = [c.get("class_path", "") for c in callbacks if isinstance(c, Namespace)]
        if not any(path.endswith("RunCheckpoint") for path in class_paths):
            callbacks.append(Namespace(class_path=_RUN_CHECKPOINT, init_args=Namespace(every_n_train_steps=None)))
            config.trainer.callbacks = callbacks
            if not any(path.endswith("ModelCheckpoint") for path in class_paths):
                config.trainer.enable_checkpointing = False  # no second, default ModelCheckpoint
        if config.get("ckpt_path") == "last":
            path = last_checkpoint(root)
            if not path.is_file():
                raise fail(f"nothing to resume: {path} does not exist (trainer.default_root_dir={root})")
            config.ckpt_path = str(path)

    def before_fit(self) -> None:
        # Output folders are checked now, not when the first file is written after training.
        try:
            check_writable_dir(self.trainer.default_root_dir, "trainer.default_root_dir")
            for key, folder in self.model.output_dirs().items():
                check_writable_dir(folder, f"model {key}")
        except ValueError as err:
            raise fail(err) from err

    def fit(self, model: VisionLanguageTask, **kwargs: Any) -> None:
        """``distill fit``: Lightning's fit; a non-finite loss ends it in one line, keeping the last checkpoint."""
        try:
            self.trainer.fit(model, **kwargs)
        except FloatingPointError as err:
            kept = last_checkpoint(self.trainer.default_root_dir)
            note = f"; the last good checkpoint is {kept}" if kept.is_file() else "; no checkpoint was written before"
            raise fail(f"{err} at step {self.trainer.global_step}{note}") from err

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _USER_ERRORS as err:
            cause = _root_cause(err)
            message = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause
            raise fail(message) from err


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception: jsonargparse wraps errors raised in a class's __init__."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err


def main(args: list[str] | None = None, run: bool = True) -> DistillCLI:
    """Run the ``distill`` command line (``args`` for programmatic and test use).

    With ``run=False`` the CLI only builds the trainer, model and datamodule (``args`` then name
    no subcommand), for scripts that drive the Trainer themselves.
    """
    return DistillCLI(
        VisionLanguageTask,
        VisionLanguageDataModule,
        trainer_class=DistillTrainer,
        parser_class=DistillArgumentParser,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def console_main() -> None:
    """Entry point of the ``distill`` console script and ``python -m distill``."""
    main()


if __name__ == "__main__":
    console_main()
