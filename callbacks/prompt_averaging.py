"""PromptSRC's Gaussian-weighted prompt aggregation (GPA) as a Lightning callback."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["GaussianPromptAveraging"]


def gaussian_weights(num_points: int, mean: float, std: float) -> list[float]:
    """Normalised Gaussian weights of the points t = 1..num_points at training fractions t / num_points.

    ``w_t ∝ pdf(t / num_points; mean, std)``; the pdf's constant cancels in the normalisation, and
    the exponents are shifted by their maximum first, so a narrow ``std`` never underflows to an
    all-zero weight vector.

    Args:
        num_points: number of snapshots.
        mean: centre, as a fraction of training.
        std: width, as a fraction of training.

    Returns:
        ``num_points`` weights (float64 Python floats) that sum to 1.
    """
    logs = [-0.5 * ((t / num_points - mean) / std) ** 2 for t in range(1, num_points + 1)]
    top = max(logs)
    raw = [math.exp(v - top) for v in logs]
    total = math.fsum(raw)
    return [w / total for w in raw]


class GaussianPromptAveraging(pl.Callback):
    """Average the trainable (prompt) parameters over training with Gaussian weights (PromptSRC's GPA).

    Training is cut into ``num_points`` evenly spaced points; after the optimizer step that ends
    point t (t = 1..num_points) the trainable parameters are added to a running sum with weight
    ``w_t ∝ pdf(t / num_points; mean, std)``, the weights normalised over the points. When the last
    point is reached the averaged values are copied into the module's parameters that require a
    gradient (frozen parameters and buffers are left alone). The copy happens in the last step's
    ``on_train_batch_end``, before that step's validation, so the final validation, checkpoints
    and a following ``test`` see the averaged prompts; validations before it see the current ones.

    Points: with ``num_points`` unset there is one per epoch (``num_points = max_epochs``), as in
    PromptSRC; the point ends are ``ceil(t * S / num_points)`` optimizer steps with
    ``S = trainer.estimated_stepping_batches`` (which honours ``max_steps``, ``max_epochs``,
    ``limit_train_batches`` and gradient accumulation), i.e. the epoch ends when training runs all
    its epochs. With ``num_points`` set, the points spread evenly over the same S steps.

    Defaults follow PromptSRC's base-to-novel recipe (configs/trainers/PromptSRC/
    vit_b16_c2_ep20_batch4_4+4ctx.yaml: MAX_EPOCH 20, GPA_MEAN 15, GPA_STD 1, weights
    pdf(epoch) for epochs 1..20): mean 15/20 = 0.75, std 1/20 = 0.05. Its few-shot recipe (50
    epochs) uses mean 30/50 = 0.6, std 30/50 = 0.6 (ImageNet, Caltech101, OxfordPets, Food101,
    UCF101, SUN397) or mean 45/50 = 0.9, std 5/50 = 0.1 (the other five data sets).

    A run that ends before its last point (early stopping, ``max_time``) gets the average of the
    points it reached, re-normalised, with a warning. Only a running weighted sum is kept (one
    float32-or-wider copy of the trainable parameters), and it is saved in the checkpoint with this
    callback's state, so a resumed run averages the same. Unlike Lightning's ``WeightAveraging``,
    which this does not subclass, no copy of the whole module (the frozen backbone) is made and
    the averaged weights are not swapped in for intermediate validations.

    Args:
        num_points: number of averaging points (None: one per epoch, ``max_epochs``).
        mean: centre of the Gaussian, as a fraction of training, in (0, 1].
        std: standard deviation of the Gaussian, as a fraction of training (> 0).
    """

    def __init__(self, num_points: int | None = None, mean: float = 0.75, std: float = 0.05) -> None:
        super().__init__()
        if num_points is not None and num_points < 1:
            raise ValueError(f"num_points must be >= 1 or None (one per epoch), got {num_points}")
        if not 0.0 < mean <= 1.0:
            raise ValueError(f"mean must be a fraction of training in (0, 1], got {mean}")
        if not (std > 0 and math.isfinite(std)):
            raise ValueError(f"std must be > 0, got {std}")
        self.num_points = num_points
        self.mean, self.std = float(mean), float(std)
        self._points: list[int] = []  # optimizer step that ends each point
        self._weights: list[float] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._weight_total = 0.0
        self._taken = 0  # points added to the sums so far
        self._applied_step: int | None = None
        self._resumed_from: tuple[int, float, float] | None = None  # (num_points, mean, std) of a loaded state

    @staticmethod
    def _trainable(pl_module: pl.LightningModule) -> dict[str, torch.nn.Parameter]:
        params = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError(
                f"GaussianPromptAveraging: {type(pl_module).__name__} has no parameter with requires_grad=True "
                "(nothing to average)"
            )
        return params

    def _schedule(self, trainer: pl.Trainer) -> tuple[int, int]:
        """(number of points, total optimizer steps) of this run."""
        n = self.num_points
        if n is None:
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise ValueError(
                    "GaussianPromptAveraging: trainer.max_epochs is not set, so there is no epoch count; "
                    "set num_points (points spread over max_steps)"
                )
            n = trainer.max_epochs
        total = trainer.estimated_stepping_batches
        if not (isinstance(total, int) or (isinstance(total, float) and math.isfinite(total))) or total < 1:
            raise ValueError(
                f"GaussianPromptAveraging needs a known number of optimizer steps, got {total}: set trainer.max_steps"
            )
        total = int(total)
        if n > total:  # a short run (a smoke test, fast_dev_run): one point per step
            rank_zero_warn(
                f"GaussianPromptAveraging: num_points={n} exceeds the run's {total} optimizer steps; using {total}"
            )
            n = total
        return n, total

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._trainable(pl_module)
        n, total = self._schedule(trainer)
        self._points = [-(-t * total // n) for t in range(1, n + 1)]  # ceil(t * total / n), strictly increasing
        self._weights = gaussian_weights(n, self.mean, self.std)
        if self._resumed_from is not None:  # load_state_dict ran before on_fit_start
            self._check_resumed(params, n)
        else:
            self._sums = {
                name: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                for name, p in params.items()
            }
            self._weight_total, self._taken, self._applied_step = 0.0, 0, None
        rank_zero_info(
            f"GaussianPromptAveraging: {len(params)} trainable tensors, {n} points over {total} steps "
            f"(mean {self.mean:g}, std {self.std:g} of training)"
        )

    def _check_resumed(self, params: dict[str, torch.nn.Parameter], n: int) -> None:
        """Check a loaded state against this run and move its sums next to the parameters."""
        if self._resumed_from != (n, self.mean, self.std):
            raise ValueError(
                "GaussianPromptAveraging: the checkpoint averaged with (num_points, mean, std) = "
                f"{self._resumed_from}, this run with {(n, self.mean, self.std)}"
            )
        if set(self._sums) != set(params):
            differ = sorted(set(self._sums) ^ set(params))[:3]
            raise KeyError(f"GaussianPromptAveraging: averaged and trainable parameters differ in {differ}")
        for name, p in params.items():
            if self._sums[name].shape != p.shape:
                raise ValueError(
                    f"GaussianPromptAveraging: averaged '{name}' has shape {tuple(self._sums[name].shape)}, "
                    f"the parameter {tuple(p.shape)}"
                )
            self._sums[name] = self._sums[name].to(device=p.device, dtype=torch.promote_types(p.dtype, torch.float32))
        self._resumed_from = None

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # ">=": a run resumed from a checkpoint written between a point's step and this hook
        # takes that point one step late rather than never.
        if self._taken >= len(self._points) or trainer.global_step < self._points[self._taken]:
            return
        weight = self._weights[self._taken]
        params = self._trainable(pl_module)
        for name, total in self._sums.items():
            total.add_(params[name].detach().to(total.dtype), alpha=weight)
        self._weight_total += weight
        self._taken += 1
        if self._taken == len(self._points):
            self._apply(pl_module, trainer.global_step)

    @torch.no_grad()
    def _apply(self, pl_module: pl.LightningModule, step: int) -> None:
        params = self._trainable(pl_module)
        for name, total in self._sums.items():
            params[name].copy_(total / self._weight_total)
        self._applied_step = step
        rank_zero_info(f"GaussianPromptAveraging: averaged parameters of {self._taken} points loaded at step {step}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = len(self._points)
        if self._applied_step is None:
            if self._taken == 0:
                rank_zero_warn(
                    "GaussianPromptAveraging: training ended before the first point; parameters left as trained"
                )
                return
            rank_zero_warn(
                f"GaussianPromptAveraging: training ended after {self._taken} of {n} points; "
                "the parameters are their re-normalised average"
            )
            self._apply(pl_module, trainer.global_step)
        elif trainer.global_step != self._applied_step:
            rank_zero_warn(
                f"GaussianPromptAveraging: training went on {trainer.global_step - self._applied_step} steps after "
                "the last point; the parameters are the average plus those steps"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_points": len(self._points) or self.num_points,
            "mean": self.mean,
            "std": self.std,
            "sums": {name: t.clone() for name, t in self._sums.items()},
            "weight_total": self._weight_total,
            "taken": self._taken,
            "applied_step": self._applied_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checked against the module and the run's schedule in on_fit_start, which comes after this.
        self._resumed_from = (state_dict["num_points"], state_dict["mean"], state_dict["std"])
        self._sums = {name: t.clone() for name, t in state_dict["sums"].items()}
        self._weight_total, self._taken = float(state_dict["weight_total"]), int(state_dict["taken"])
        self._applied_step = state_dict["applied_step"]
