"""Contrastive training objectives for image-text embedding pairs.

Each objective is an ``nn.Module`` whose ``forward`` takes the model's output
dict (L2-normalised ``image_embeds``/``text_embeds`` of shape (N, D), an
already-exponentiated scalar ``logit_scale`` and, depending on the loss,
``logit_bias`` or ``target_similarity``) and returns the unweighted scalar
loss. ``weighted_sum`` combines several objectives using their ``weight`` and
returns per-objective values keyed by ``name`` for logging. Plain PyTorch.
InfoNCE and SigLIP compute through the similarity engine (``distill.cuda_ext``);
their ``backend`` picks the implementation (``auto``: tiled/CUDA for large
batches, the plain formula for small ones), with results equal within float
tolerance.

Data-parallel runs (Lightning DDP/FSDP, ``torch.distributed`` with W > 1): every
objective here is a GLOBAL term. It returns the loss of the global batch (all
ranks' rows; the same value on every rank) with gradients ready for DDP's
averaging (see ``distill.data_parallel``), so a W-process run with batch B
trains as one process with batch W x B. With one process nothing changes.

NaN/inf are checked once per step, on the loss, by ``weighted_sum``: a non-finite input makes
the loss non-finite, and that one check (a single host sync for all terms) names the first
failing term and the non-finite entries of ``outputs``. The objectives therefore leave the
engine's own input check off (``check_finite=False``) and do no value check themselves; called
outside ``weighted_sum``, an objective returns NaN for NaN inputs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from distill import data_parallel
from distill.cuda_ext import check_backend

__all__ = [
    "DCL",
    "InfoNCE",
    "Objective",
    "SigLIP",
    "SimilarityObjective",
    "SoftTargetContrastive",
    "apply_overrides",
    "weighted_sum",
]


def _check_pair(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
    """Validate a batch of paired embeddings.

    Args:
        image_embeds: (N, D) image embeddings.
        text_embeds: (N, D) text embeddings; row i is the positive for image i.

    Raises:
        ValueError: if either is not 2-D, the shapes differ, or the batch is
            empty. Values are not inspected (``weighted_sum`` checks the loss).
    """
    for key, t in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if t.dim() != 2:
            raise ValueError(f"{key} must be 2-D (N, D), got shape {tuple(t.shape)}")
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds has shape {tuple(image_embeds.shape)} but text_embeds has {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape[0] == 0:
        raise ValueError("image_embeds and text_embeds are empty (N == 0)")


class Objective(nn.Module):
    """Base class: holds ``weight`` and ``name`` and reads the validated embedding pair.

    Args:
        weight: Multiplier applied by ``weighted_sum``; ``forward`` is unweighted.
        name: Log key for this term; defaults to the class's ``default_name``.
    """

    default_name: str = "objective"

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        if not math.isfinite(weight):
            raise ValueError(f"weight must be finite, got {weight}")
        self.weight: float = float(weight)
        self.name: str = name if name is not None else self.default_name

    def _get(self, outputs: Mapping[str, torch.Tensor], key: str, hint: str = "") -> torch.Tensor:
        if key not in outputs:
            msg = f"{type(self).__name__} needs outputs['{key}']"
            raise KeyError(f"{msg}; {hint}" if hint else f"{msg}; got keys {sorted(outputs)}")
        return outputs[key]

    def _pair_and_scale(
        self, outputs: Mapping[str, torch.Tensor], max_logit_scale: float | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validated (N, D) image and text embeddings and the 0-d (clamped) logit scale."""
        img = self._get(outputs, "image_embeds")
        txt = self._get(outputs, "text_embeds")
        _check_pair(img, txt)
        scale = torch.as_tensor(self._get(outputs, "logit_scale"), dtype=img.dtype, device=img.device)
        if scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(scale.shape)}")
        scale = scale.reshape(())
        if max_logit_scale is not None:
            scale = torch.clamp(scale, max=max_logit_scale)  # zero gradient above the cap
        return img, txt, scale


class SimilarityObjective(Objective):
    """Base class of the objectives computed by the similarity engine (``distill.cuda_ext``).

    Args:
        weight: Multiplier applied by ``weighted_sum``.
        name: Log key; defaults to the class's ``default_name``.
        backend: Similarity engine backend: ``auto``, ``reference``, ``tiled`` or ``cuda``.
    """

    def __init__(self, weight: float = 1.0, name: str | None = None, backend: str = "auto") -> None:
        super().__init__(weight=weight, name=name)
        self.backend = check_backend(backend)

    def _engine(self) -> dict[str, Any]:
        """Keyword arguments of the engine's ops (no NaN/inf input check: see the module docstring).

        For the local (per-sample) terms; the global ones go through ``distill.data_parallel``.
        """
        return {"backend": self.backend, "check_finite": False}


def _check_max_scale(max_logit_scale: float) -> float:
    if not max_logit_scale > 0:
        raise ValueError(f"max_logit_scale must be > 0, got {max_logit_scale}")
    return float(max_logit_scale)


class InfoNCE(SimilarityObjective):
    """Symmetric CLIP contrastive loss (InfoNCE) with in-batch negatives.

    logits = min(logit_scale, max_logit_scale) * image_embeds @ text_embeds.T,
    shape (N, N), positives on the diagonal; the loss is the mean of the
    image->text and text->image cross entropies. Global under data parallelism:
    N is the global batch.

    Args:
        weight: Multiplier applied by ``weighted_sum``.
        max_logit_scale: Cap on the exponentiated logit scale (CLIP uses 100).
        name: Log key; defaults to "infonce".
        backend: Similarity engine backend: ``auto``, ``reference``, ``tiled`` or ``cuda``.
    """

    default_name = "infonce"

    def __init__(
        self, weight: float = 1.0, max_logit_scale: float = 100.0, name: str | None = None, backend: str = "auto"
    ) -> None:
        super().__init__(weight=weight, name=name, backend=backend)
        self.max_logit_scale = _check_max_scale(max_logit_scale)

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        img, txt, scale = self._pair_and_scale(outputs, self.max_logit_scale)
        return data_parallel.infonce(img, txt, scale, backend=self.backend)


class SigLIP(SimilarityObjective):
    """Pairwise sigmoid loss (SigLIP).

    logits = logit_scale * image_embeds @ text_embeds.T + logit_bias, shape
    (N, N); labels are +1 on the diagonal and -1 elsewhere; the loss is
    -sum(logsigmoid(labels * logits)) / N. The scale is not clamped. Global
    under data parallelism: N is the global batch.

    Args:
        weight: Multiplier applied by ``weighted_sum``.
        name: Log key; defaults to "siglip".
        backend: Similarity engine backend: ``auto``, ``reference``, ``tiled`` or ``cuda``.
    """

    default_name = "siglip"

    def __init__(self, weight: float = 1.0, name: str | None = None, backend: str = "auto") -> None:
        super().__init__(weight=weight, name=name, backend=backend)

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        bias = self._get(outputs, "logit_bias", hint="build the model with init_logit_bias, e.g. -10")
        img, txt, scale = self._pair_and_scale(outputs, None)
        bias = torch.as_tensor(bias, dtype=img.dtype, device=img.device)
        if bias.numel() != 1:
            raise ValueError(f"logit_bias must be a scalar, got shape {tuple(bias.shape)}")
        return data_parallel.siglip(img, txt, scale, bias.reshape(()), backend=self.backend)


class DCL(Objective):
    """Decoupled contrastive loss: InfoNCE with the positive left out of the denominator.

    For logits L of shape (N, N) (scale clamped as in InfoNCE), row i gives
    -L[i, i] + logsumexp_{j != i} L[i, j]; the loss averages this over rows of
    L (image->text) and of L.T (text->image). Needs N >= 2. Global under data
    parallelism: N is the global batch.

    Args:
        weight: Multiplier applied by ``weighted_sum``.
        max_logit_scale: Cap on the exponentiated logit scale.
        name: Log key; defaults to "dcl".
    """

    default_name = "dcl"

    def __init__(self, weight: float = 1.0, max_logit_scale: float = 100.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.max_logit_scale = _check_max_scale(max_logit_scale)

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        img, txt, scale = self._pair_and_scale(outputs, self.max_logit_scale)
        if img.shape[0] < 2 and data_parallel.world_size() == 1:
            raise ValueError(f"DCL needs at least 2 pairs per batch (negatives), got N={img.shape[0]}")

        def one_way(a: torch.Tensor, b: torch.Tensor, offset: int, direction: str) -> torch.Tensor:
            logits = scale * a @ b.T  # (n, N): these rows against every column, positives at (i, offset + i)
            rows = torch.arange(a.shape[0], device=a.device)
            positive = torch.zeros_like(logits, dtype=torch.bool)
            positive[rows, rows + offset] = True
            return (logits.masked_fill(positive, float("-inf")).logsumexp(dim=1) - logits[rows, rows + offset]).mean()

        return data_parallel.global_rows(img, txt, one_way)


class SoftTargetContrastive(Objective):
    """Contrastive loss with soft targets from a similarity matrix (CWCL-style).

    With S = outputs["target_similarity"] of shape (N, N) (detached) and
    logits L as in InfoNCE, the targets are P = softmax(S / target_temperature)
    row-wise for image->text and softmax(S.T / target_temperature) row-wise for
    text->image. Each direction's loss is -sum_j P[i, j] * log_softmax(L)[i, j]
    averaged over rows; the loss is the mean of the two directions. Global under
    data parallelism: each rank passes the rows of S for its own items against the
    global batch, (N_r, N) (``ContrastiveModule`` does), and N is the global batch.

    Args:
        weight: Multiplier applied by ``weighted_sum``.
        target_temperature: Temperature that sharpens S into targets (> 0).
        max_logit_scale: Cap on the exponentiated logit scale.
        name: Log key; defaults to "soft_target".
    """

    default_name = "soft_target"

    def __init__(
        self,
        weight: float = 1.0,
        target_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        if not target_temperature > 0:
            raise ValueError(f"target_temperature must be > 0, got {target_temperature}")
        self.target_temperature = float(target_temperature)
        self.max_logit_scale = _check_max_scale(max_logit_scale)

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        img, txt, scale = self._pair_and_scale(outputs, self.max_logit_scale)
        sim = self._get(outputs, "target_similarity").detach()
        n = img.shape[0]
        if sim.dim() != 2 or sim.shape[0] != n:
            raise ValueError(f"target_similarity has shape {tuple(sim.shape)} but the batch needs ({n}, N)")
        full = data_parallel.gather_rows(sim)  # (N, N): every rank's rows
        if full.shape[1] != full.shape[0]:
            raise ValueError(
                f"target_similarity has shape {tuple(sim.shape)} but the batch needs {(n, full.shape[0])} "
                "(this process's items against the global batch)"
            )
        full = full.to(dtype=img.dtype) / self.target_temperature

        def one_way(a: torch.Tensor, b: torch.Tensor, offset: int, direction: str) -> torch.Tensor:
            # image rows take S's rows as targets, text rows S's columns (S.T's rows)
            targets = (
                full[offset : offset + a.shape[0]] if direction == "i2t" else full[:, offset : offset + a.shape[0]].T
            )
            logits = scale * a @ b.T
            return -(targets.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()

        return data_parallel.global_rows(img, txt, one_way)


def weighted_sum(
    objectives: Sequence[nn.Module], outputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Evaluate objectives and combine them as sum(weight * loss).

    Args:
        objectives: Modules with ``weight``, ``name`` and ``forward(outputs)``.
        outputs: Model output dict passed to every objective.

    Returns:
        (total, terms): the weighted scalar total (differentiable) and
        {name: unweighted loss, detached} for logging.

    Raises:
        ValueError: if ``objectives`` is empty or two share a name.
        FloatingPointError: if a term is NaN or inf (on any rank, under data parallelism), naming
            the first such objective and the non-finite tensors of ``outputs``.
    """
    if len(objectives) == 0:
        raise ValueError("weighted_sum needs at least one objective")
    total: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = {}
    for obj in objectives:
        name = obj.name
        if name in losses:
            raise ValueError(f"two objectives share the name '{name}'; pass name=... to tell them apart")
        losses[name] = loss = obj(outputs)
        term = obj.weight * loss
        total = term if total is None else total + term
    assert total is not None
    # The one NaN/inf check of a step, and its only host sync: the objectives and the similarity
    # engine skip theirs (check_finite=False), since a non-finite input gives a non-finite loss.
    # A finite weight times a non-finite loss is non-finite (0 * inf is nan) and so is any sum
    # holding one, so checking the total checks every term; which term and which input failed
    # is worked out only on the error path. Under data parallelism the ranks agree first (a local
    # term may be non-finite on one rank only): all raise, none is left waiting in a collective.
    finite = torch.isfinite(total).all()
    if not data_parallel.all_ranks_true(finite):
        if bool(finite):
            raise FloatingPointError("a loss term is nan or inf on another process (its own error names it)")
        raise _non_finite_error(losses, outputs)
    return total, {name: loss.detach() for name, loss in losses.items()}


def _non_finite_error(losses: Mapping[str, torch.Tensor], outputs: Mapping[str, object]) -> FloatingPointError:
    """The error for a non-finite total: the first non-finite term and the non-finite inputs."""
    inputs = [
        key
        for key, value in outputs.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    detail = f" (non-finite values in outputs {inputs})" if inputs else ""
    for name, loss in losses.items():
        if not bool(torch.isfinite(loss).all()):
            kind = "nan" if bool(torch.isnan(loss).any()) else "inf"
            return FloatingPointError(f"loss term '{name}' is {kind}{detail}")
    return FloatingPointError(f"the weighted sum of finite loss terms is not finite (check the weights){detail}")


def _init_arguments(cls: type) -> list[str]:
    """Names of the keyword arguments of ``cls.__init__`` (without ``self``, ``*args``, ``**kwargs``)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[1:] if p.kind in kinds]


def _overridable(obj: nn.Module) -> list[str]:
    """The arguments an override may replace (all but ``name``: it is the key the override is found by)."""
    return [arg for arg in _init_arguments(type(obj)) if arg != "name"]


def apply_overrides(
    objectives: Iterable[nn.Module], overrides: Mapping[str, Mapping[str, float]], where: str
) -> list[nn.Module]:
    """Objectives with some constructor arguments replaced, found by their log name.

    Each override rebuilds its objective as ``type(obj)(**current_args, **override)``, so the
    class's own checks run on the new values; the current arguments are read from the
    attributes named like the ``__init__`` parameters. This is how a sweep or the command line
    changes one term of a list of objectives (jsonargparse cannot index a list, but it can set a
    dict key: ``--model.init_args.objective_overrides.logit_kd.temperature=4``). Objectives are
    stateless, so nothing but the arguments is carried over.

    Args:
        objectives: modules with ``name`` (the term's log key ``train/loss_<name>``); an override
            applies to every objective of that name (e.g. a term used in two training stages).
        overrides: ``{name: {argument: value}}``, e.g. ``{"logit_kd": {"temperature": 4.0, "weight": 0.5}}``.
        where: what the overrides are called, for error messages (e.g. ``objective_overrides``).

    Returns:
        The objectives in their order: the rebuilt ones in place of the originals, the others unchanged.

    Raises:
        ValueError: an override names no objective or an argument its class does not take
            (naming the valid names and arguments), a value fails the class's own check, or an
            argument of the objective is not kept as an attribute (so it cannot be rebuilt).
    """
    objectives = list(objectives)
    valid: dict[str, list[str]] = {}
    for obj in objectives:  # a name in two stages (the same term) offers the arguments both classes take
        args = _overridable(obj)
        valid[obj.name] = [a for a in valid[obj.name] if a in args] if obj.name in valid else args
    described = "; ".join(f"{name} ({', '.join(args)})" for name, args in sorted(valid.items())) or "none"
    for key, override in overrides.items():
        if key not in valid:
            raise ValueError(f"{where}: '{key}' names no objective; valid names and arguments: {described}")
        unknown = sorted(set(override) - set(valid[key]))
        if unknown:
            raise ValueError(
                f"{where}.{key}: {', '.join(map(repr, unknown))} is not an argument of objective '{key}'; "
                f"valid names and arguments: {described}"
            )
    return [
        _rebuild(obj, overrides[obj.name], f"{where}.{obj.name}") if obj.name in overrides else obj
        for obj in objectives
    ]


def _rebuild(obj: nn.Module, override: Mapping[str, float], where: str) -> nn.Module:
    """``type(obj)`` built again from its current arguments with ``override`` applied."""
    cls = type(obj)
    current = {}
    for arg in _init_arguments(cls):
        if not hasattr(obj, arg):
            raise ValueError(
                f"{where}: {cls.__name__} cannot be overridden: its argument '{arg}' is not kept as an attribute "
                "of the same name"
            )
        current[arg] = getattr(obj, arg)
    try:
        return cls(**{**current, **override})
    except (ValueError, TypeError) as err:
        # "from None": this message, which names the override, is the one the CLI reports.
        raise ValueError(f"{where}: {err}") from None
