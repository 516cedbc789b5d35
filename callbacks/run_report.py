"""The run's HTML report at the end of fit and of test (``distill report`` on the run folder)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from distill.callbacks.media import log_html, log_plots
from distill.report import write_run_report
from distill.run_files import PLOTS_DIR


class RunReport(pl.Callback):
    """Write ``<default_root_dir>/report.html`` when fit and test end: config, tables and plots on one page.

    The page is what ``distill report <default_root_dir>`` writes (``distill.report``): every
    log folder of the run with its zero-shot, retrieval and diagnostics tables, the last logged
    metrics, the plots (this callback first draws those that need the whole ``metrics.csv``,
    e.g. retention over training) and the resolved config. With a ``WandbLogger`` the page and
    the retention plot are logged to the W&B run too. Put it after ``ZeroShotEvaluation`` and
    ``TeacherStudentDiagnostics`` in ``trainer.callbacks``.

    Args:
        output: the HTML file (default ``<default_root_dir>/report.html``).
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__()
        self.output = output
        self.path: Path | None = None

    def _write(self, trainer: pl.Trainer, stage: str) -> None:
        if trainer.sanity_checking:
            return
        # trainer.log_dir is a collective (a broadcast from rank 0): every rank reads it, rank 0 writes.
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # metrics.csv holds every value logged so far
            logger.save()
        self.path = write_run_report(trainer.default_root_dir, self.output)
        retention = folder / PLOTS_DIR / "retention.png"
        if stage == "fit" and retention.is_file():
            log_plots(trainer, "val", [retention])
        log_html(trainer, f"report/{stage}", self.path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, "fit")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, "test")
