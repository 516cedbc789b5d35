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
be named bare. Values are derived instead of typed twice: the ``total_steps`` of a ``OneCycleLR``
scheduler is linked to ``trainer.max_steps``.

Logging: the run logs to ``CSVLogger(save_dir=<trainer.default_root_dir>, name="logs")``, so
``trainer.log_dir`` is ``<root>/logs/version_N`` (where the run's JSON reports go). A configured
``trainer.logger`` (one or a list) without a CSVLogger gets this one put first, so the CSV logs
and the log dir stay; a ``WandbLogger`` whose ``save_dir`` is left at "." writes under the run
folder (``<root>/wandb/``); ``--trainer.logger=false`` means no logger at all. W&B:

    distill fit --config configs/distill/base.yaml --config configs/distill/vl2v_adip.yaml --config configs/wandb.yaml

Every run writes, beside Lightning's ``config.yaml`` in the log dir, ``run_info.json`` (git commit,
versions, command, host, teacher fingerprint: ``distill.run_info``) and hands the resolved config
to every logger (``hparams.yaml`` of the CSV logger, the W&B run's config, which also gets
``run_info``). Sweeps (``sweeps/*.yaml``) set single loss terms with
``--model.init_args.objective_overrides.<name>.<argument>=<value>``; jsonargparse keeps only the
last argument per name of such dotted nested-dict flags, so the parser first combines the flags
of one name into one (``...objective_overrides.<name>={"weight": 0.5, "temperature": 4}``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger  # the W&B class only: wandb is imported when used

# Imported so that their classes can be named without a module path in configs.
import distill.callbacks  # noqa: F401
from distill.callbacks.checkpoint import last_checkpoint
from distill.cli_errors import checkpoint_module_error, class_at, condensed, fail
from distill.datamodules import VisionLanguageDataModule
from distill.export.command import Gates, Quantisation, run_export
from distill.files import atomic_write_json, check_writable_dir
from distill.modules import VisionLanguageTask
from distill.run_info import run_info
from distill.teacher_cache import CacheError
from distill.teachers import Teacher

# Errors a user's config or files cause (bad model name, missing file, unknown domain...):
# reported as one line before any training starts, not as a traceback.
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, TypeError)
_ONE_CYCLE = "torch.optim.lr_scheduler.OneCycleLR"
_RUN_CHECKPOINT = "distill.callbacks.RunCheckpoint"
_CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
# --<prefix>objective_overrides.<name>.<argument>[=<value>]
_OVERRIDE_FLAG = re.compile(r"^(--\S*objective_overrides)\.([^.=\s]+)\.([^.=\s]+)(?:=(.*))?$", re.S)


class DistillArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, reporting a bad option as one line with the closest valid names."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:  # jsonargparse is trying alternatives: let it
            return super().error(message, ex)
        raise fail(condensed(message, [action.dest for action in self._actions]))

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Namespace:
        args = sys.argv[1:] if args is None else args
        return super().parse_args(_combined_override_flags(list(args)), *rest, **kwargs)


def _combined_override_flags(args: list[str]) -> list[str]:
    """``--...objective_overrides.<name>.<arg>=<v>`` flags as ``--...objective_overrides.<name>=<dict>``,
    each holding every argument given so far for that name.

    jsonargparse sets a dotted key of a nested dict by replacing the whole inner dict (and needs
    a dict to be there already), so ``logit_kd.weight`` then ``logit_kd.temperature`` would keep
    the temperature only. Values are read as YAML scalars, as on the command line.
    """
    combined: dict[tuple[str, str], dict[str, Any]] = {}
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        match = _OVERRIDE_FLAG.match(arg) if isinstance(arg, str) else None
        if match is None:
            out.append(arg)
            i += 1
            continue
        prefix, name, argument, value = match.groups()
        if value is None and i + 1 < len(args):  # "--flag value"
            value, i = args[i + 1], i + 1
        try:
            parsed = yaml.safe_load(value) if value is not None else None
        except yaml.YAMLError:
            parsed = value
        values = combined.setdefault((prefix, name), {})
        values[argument] = parsed
        out.append(f"{prefix}.{name}={json.dumps(values)}")
        i += 1
    return out


class DistillSaveConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` in the log dir, plus what makes a run reproducible and findable.

    For every logger, the resolved config (all of ``model``, ``trainer``, ``data``...) goes to its
    hyperparameters (the CSV logger's ``hparams.yaml``, the W&B run's config); ``run_info.json``
    (``distill.run_info.run_info``: git commit, versions, command, host, teacher fingerprint) is
    written to the log dir and, for W&B, into the run's config under ``run_info``.
    """

    _log_dir: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.already_saved:
            self._log_dir = trainer.log_dir  # a collective call: every rank, before save_config (rank zero only)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        teacher = pl_module.teacher if isinstance(pl_module, VisionLanguageTask) else None
        cache = pl_module.embedding_cache if isinstance(pl_module, VisionLanguageTask) else None
        info = run_info(teacher if isinstance(teacher, Teacher) else None, cache)
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"run_info": info}, allow_val_change=True)
        if self._log_dir is not None:
            Path(self._log_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(self._log_dir) / "run_info.json", info)


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
    """LightningCLI that reports configuration mistakes as one clear line.

    ``save_config_callback`` defaults to :class:`DistillSaveConfig` (config, resolved config to the
    loggers, ``run_info.json``); the other arguments are LightningCLI's.
    """

    def __init__(
        self, *args: Any, save_config_callback: type[SaveConfigCallback] | None = DistillSaveConfig, **kwargs: Any
    ) -> None:
        super().__init__(*args, save_config_callback=save_config_callback, **kwargs)

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
        # One run folder: the CSV logs (and the log dir) stay under default_root_dir whatever else logs.
        if trainer.get("logger") in (None, True):
            trainer.logger = _csv_logger(root)
        elif trainer.get("logger") is not False:
            trainer.logger = _with_csv_logger(trainer.logger, root)
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
        except CacheError as err:  # a teacher cache that does not fit this run: found in setup, before training
            raise fail(err) from err

    # A W&B run ends with its command (an agent, a test or a notebook may run the next one in this process).
    def after_fit(self) -> None:
        self._finish_wandb()

    def after_validate(self) -> None:
        self._finish_wandb()

    def after_test(self) -> None:
        self._finish_wandb()

    def after_predict(self) -> None:
        self._finish_wandb()

    def _finish_wandb(self) -> None:
        if any(isinstance(logger, WandbLogger) for logger in self.trainer.loggers):
            import wandb

            if wandb.run is not None:
                wandb.finish()

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _USER_ERRORS as err:
            cause = _root_cause(err)
            message = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause
            raise fail(message) from err


def _csv_logger(root: str) -> Namespace:
    return Namespace(class_path=_CSV_LOGGER, init_args=Namespace(save_dir=root, name="logs"))


def _configures(item: Any, cls: type) -> bool:
    """Whether a logger entry of the config (a class_path namespace or an instance) is a ``cls``."""
    if isinstance(item, Namespace):
        try:
            return issubclass(class_at(item.get("class_path") or ""), cls)
        except (ImportError, AttributeError, ValueError, TypeError):
            return False  # Lightning reports a class it cannot import itself
    return isinstance(item, cls)


def _with_csv_logger(logger: Any, root: str) -> list[Any]:
    """The configured logger(s) after the run's CSV logger (unless one is configured); a WandbLogger
    left at ``save_dir="."`` (and no ``dir``) writes under ``root``."""
    loggers = list(logger) if isinstance(logger, list) else [logger]
    for item in loggers:
        if isinstance(item, Namespace) and _configures(item, WandbLogger):
            init_args = item.get("init_args") or Namespace()
            if init_args.get("save_dir", ".") in (".", None) and init_args.get("dir") is None:
                init_args.save_dir = root
                item.init_args = init_args
    if not any(_configures(item, CSVLogger) for item in loggers):
        loggers.insert(0, _csv_logger(root))
    return loggers


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception: jsonargparse wraps errors raised in a class's __init__ (one raised
    ``from None`` replaces the error it handled, so it is innermost)."""
    while True:
        inner = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if inner is None:
            return err
        err = inner


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
    """Entry point of the ``distill`` console script and ``python -m distill``.

    ``distill report RUN_DIR [--output FILE]`` writes a run's HTML page (``distill.report``);
    ``distill cache --data ... --teacher ... --output_dir DIR`` builds a teacher embedding cache
    (``distill.cache_builder``); every other subcommand is LightningCLI's.
    """
    if sys.argv[1:2] == ["report"]:
        from distill.report import report_command

        report_command(sys.argv[2:])
        return
    if sys.argv[1:2] == ["cache"]:
        from distill.cache_builder import cache_command

        cache_command(sys.argv[2:])
        return
    main()


if __name__ == "__main__":
    console_main()
