"""The ``distill`` command: LightningCLI over distill's modules, datamodules and callbacks.

    distill fit --config configs/demo/teacher.yaml
    distill test --config configs/demo/teacher_eval.yaml
    distill fit --print_config          # every option, with defaults
    distill fit --model.help ContrastiveModule

Models and datamodules are chosen with ``class_path`` (subclass mode); classes from
``distill.modules``, ``distill.datamodules`` and ``distill.callbacks`` can be named bare.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

# Imported so that their classes can be named without a module path in configs.
import distill.callbacks  # noqa: F401
import distill.datamodules  # noqa: F401
import distill.modules  # noqa: F401

# Errors a user's config or files cause (bad model name, missing file, unknown domain...):
# reported as one line before any training starts, not as a traceback.
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError)


class DistillCLI(LightningCLI):
    """LightningCLI that reports configuration mistakes as one clear line."""

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
