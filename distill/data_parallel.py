"""Data-parallel objectives: the loss terms that see the global batch, and how they do.

Under Lightning's DDP (or FSDP, or any ``torch.distributed`` group of W > 1 processes) each rank
holds its local batch. The *global* batch is the ranks' local batches concatenated in rank order.

Global terms (batch-relational: a row's loss depends on the other rows): InfoNCE, SigLIP, DCL,
soft-target contrastive, affinity (relational) KD and interactive contrastive (ICL). Every rank
returns the same value, the loss of the global batch, and after ``backward`` holds the exact
gradient of that global loss through its own rows; the logit scale / bias get this rank's share,
so the shares sum to the whole. DDP then *averages* parameter gradients over the W ranks, so each
global term comes back through :func:`scale_grad` (value unchanged, gradient times W): the averaged
gradient is the single-process gradient of the global batch (learning rates, gradient clipping and
Adam's ``eps`` carry over from one device), and the logged value is the true global loss.

Local terms (per-sample means: feature distillation, label cross entropy, logit KD, class-text
alignment, the adaptation losses) stay as they are: with equal local batches, DDP's average of the
local means is the mean over the global batch.

Backends of the global terms: ``reference`` gathers the embeddings with autograd
(:func:`gather_rows`) and evaluates the plain formula on this rank's rows against every column
(O(N_r x N) memory per rank, as open_clip's ``gather_with_grad``); every other backend (``auto``,
``tiled``, ``cuda``, ``cuda_fused``) runs ``distill.cuda_ext.distributed`` (row blocks against the
gathered columns, all-reduced column statistics: no N x N matrix, 4 GEMMs per rank), whose results
equal the reference to float rounding. With one process every function here is the plain
single-process computation (no collective, no gradient scaling). Imports only torch and cuda_ext.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist

from distill.cuda_ext import (
    distributed_infonce_loss,
    distributed_kd_loss,
    distributed_siglip_loss,
    infonce_loss,
    kd_loss,
    siglip_loss,
)

__all__ = [
    "all_ranks_true",
    "gather_items",
    "gather_rows",
    "global_rows",
    "global_value",
    "infonce",
    "kd",
    "scale_grad",
    "siglip",
    "world_size",
]


def world_size(group: Any = None) -> int:
    """Processes in ``group`` (the default group: all of them); 1 when no process group is initialised."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_ranks_true(flag: torch.Tensor, group: Any = None) -> bool:
    """Whether a 0-d bool tensor is true on every rank (one all-reduce; the value itself with one process)."""
    if world_size(group) == 1:
        return bool(flag)
    agreed = flag.to(torch.int32).reshape(1)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    return bool(agreed.item())


def _rank(group: Any = None) -> int:
    return dist.get_rank(group) if world_size(group) > 1 else 0


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged in the forward pass; its gradient multiplied by ``factor`` in the backward pass."""
    return x if factor == 1 else _ScaleGrad.apply(x, float(factor))


def _row_counts(x: torch.Tensor, group: Any) -> list[int]:
    """Rows of ``x`` on every rank (one all-gather); a different width or trailing shape is an error on all ranks."""
    meta = torch.tensor([x.shape[0], *x.shape[1:]], device=x.device, dtype=torch.int64)
    parts = [torch.empty_like(meta) for _ in range(world_size(group))]
    dist.all_gather(parts, meta, group=group)
    table = torch.stack(parts).tolist()
    if len({tuple(row[1:]) for row in table}) > 1:
        shapes = [tuple(row) for row in table]
        raise ValueError(f"tensors gathered across ranks differ beyond the row count: shapes {shapes} (rank order)")
    return [row[0] for row in table]


class _GatherRows(torch.autograd.Function):
    """All-gather rows (padded to the longest rank); the backward sums every rank's gradient of our rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, counts: list[int]) -> torch.Tensor:
        rank = dist.get_rank(group)
        ctx.group, ctx.start, ctx.rows = group, sum(counts[:rank]), x.shape[0]
        pad = x.new_zeros((max(counts), *x.shape[1:]))
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in counts]
        dist.all_gather(parts, pad, group=group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss may depend on our rows: their gradients add up (a reduce-scatter, done as all-reduce).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.rows], None, None


def gather_rows(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """(N_r, ...) rows of every rank concatenated in rank order, (N, ...), with autograd.

    The backward pass gives each rank the sum over ranks of the gradients reaching its own rows, so
    a loss split into per-rank parts that sum to the global loss gets exact gradients. Ranks may hold
    different row counts. With one process, ``x`` itself.
    """
    if world_size(group) == 1:
        return x
    return _GatherRows.apply(x, group, _row_counts(x, group))


def global_value(part: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``part`` summed over ranks as the value, with ``part``'s own gradient (this rank's share)."""
    if world_size(group) == 1:
        return part
    total = part.detach().clone()
    dist.all_reduce(total, group=group)
    return part + (total - part.detach())


def global_rows(
    image: torch.Tensor,
    text: torch.Tensor,
    one_way: Callable[[torch.Tensor, torch.Tensor, int, str], torch.Tensor],
    group: Any = None,
) -> torch.Tensor:
    """A symmetric contrastive loss over the global batch from a per-row formula, DDP-ready.

    The loss is ``(mean over global rows of one_way(image -> text) + mean over global columns of
    one_way(text -> image)) / 2``. This rank evaluates ``one_way(a, b, offset, direction)`` on its
    own rows ``a`` (N_r, D) against all rows ``b`` (N, D) of the other modality (positives at
    ``(i, offset + i)``, ``direction`` is ``"i2t"`` or ``"t2i"``), which must return the mean over
    its N_r rows.

    Args:
        image: (N_r, D) this rank's image embeddings.
        text: (N_r, D) its text embeddings, paired row by row.
        one_way: the per-row formula.
        group: process group (None: the default one).

    Returns:
        Scalar global loss, the same on every rank; gradient scaled by W for DDP's averaging.
    """
    world = world_size(group)
    if world == 1:
        return (one_way(image, text, 0, "i2t") + one_way(text, image, 0, "t2i")) / 2
    counts = _row_counts(image, group)
    offset, n = sum(counts[: _rank(group)]), image.shape[0]
    images, texts = gather_rows(image, group), gather_rows(text, group)
    part = (one_way(image, texts, offset, "i2t") + one_way(text, images, offset, "t2i")) * (n / (2 * sum(counts)))
    return scale_grad(global_value(part, group), world)


def _engine(backend: str) -> dict[str, Any]:
    return {"backend": backend, "check_finite": False}


def infonce(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    backend: str = "auto",
    group: Any = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (``distill.cuda_ext.infonce_loss`` on one process).

    Args:
        image: (N_r, D) this rank's image embeddings.
        text: (N_r, D) its text embeddings, paired row by row.
        logit_scale: exponentiated temperature (float or 0-d tensor).
        backend: similarity engine backend (see the module docstring for the data-parallel path).
        group: process group (None: the default one).

    Returns:
        Scalar global loss; with W > 1 processes its gradient is scaled by W (DDP averages it back).
    """
    world = world_size(group)
    if world == 1:
        return infonce_loss(image, text, logit_scale, **_engine(backend))
    if backend != "reference":
        return scale_grad(distributed_infonce_loss(image, text, logit_scale, group=group, check_finite=False), world)

    def one_way(a: torch.Tensor, b: torch.Tensor, offset: int, direction: str) -> torch.Tensor:
        return infonce_loss(a, b, logit_scale, offset=offset, row_weight=1.0, col_weight=0.0, **_engine(backend))

    return global_rows(image, text, one_way, group)


def siglip(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    *,
    backend: str = "auto",
    group: Any = None,
) -> torch.Tensor:
    """Sigmoid loss over the global batch, normalised by the global N (``siglip_loss`` on one process).

    Args:
        image: (N_r, D) this rank's image embeddings.
        text: (N_r, D) its text embeddings, paired row by row.
        logit_scale: exponentiated temperature (float or 0-d tensor).
        logit_bias: additive bias (float or 0-d tensor).
        backend: similarity engine backend.
        group: process group (None: the default one).

    Returns:
        Scalar global loss; with W > 1 processes its gradient is scaled by W.
    """
    world = world_size(group)
    if world == 1:
        return siglip_loss(image, text, logit_scale, logit_bias, **_engine(backend))
    if backend != "reference":
        loss = distributed_siglip_loss(image, text, logit_scale, logit_bias, group=group, check_finite=False)
        return scale_grad(loss, world)
    counts = _row_counts(image, group)
    offset = sum(counts[: _rank(group)])
    texts = gather_rows(text, group)
    part = siglip_loss(image, texts, logit_scale, logit_bias, offset=offset, **_engine(backend))
    return scale_grad(global_value(part * (image.shape[0] / sum(counts)), group), world)


def kd(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    teacher_logit_scale: float | torch.Tensor,
    *,
    kind: Literal["kl", "ce"] = "kl",
    backend: str = "auto",
    group: Any = None,
) -> torch.Tensor:
    """Relational KD (rows and columns, weights 1/2 each) over the global batch (``kd_loss`` on one process).

    Column softmaxes span every rank's rows. Args as ``distill.cuda_ext.kd_loss``: (N_r, D) student
    image and text rows, (N_r, D_t) teacher rows (no gradient), the student's and the teacher's scales.

    Returns:
        Scalar global loss; with W > 1 processes its gradient is scaled by W.
    """
    world = world_size(group)
    tensors = (student_image, student_text, teacher_image, teacher_text, logit_scale, teacher_logit_scale)
    if world == 1:
        return kd_loss(*tensors, kind=kind, **_engine(backend))
    if backend != "reference":
        return scale_grad(distributed_kd_loss(*tensors, kind=kind, group=group, check_finite=False), world)
    # No positives: this rank's rows need the global columns only, its columns the global rows.
    counts = _row_counts(student_image, group)
    s_img, s_txt = gather_rows(student_image, group), gather_rows(student_text, group)
    t_img, t_txt = gather_rows(teacher_image.detach(), group), gather_rows(teacher_text.detach(), group)
    scales, one_way = (logit_scale, teacher_logit_scale), {"row_weight": 1.0, "col_weight": 0.0, "kind": kind}
    rows = kd_loss(student_image, s_txt, teacher_image, t_txt, *scales, **one_way, **_engine(backend))
    cols = kd_loss(student_text, s_img, teacher_text, t_img, *scales, **one_way, **_engine(backend))
    part = (rows + cols) * (student_image.shape[0] / (2 * sum(counts)))
    return scale_grad(global_value(part, group), world)


def gather_items(
    index: torch.Tensor,
    tensors: dict[str, torch.Tensor | None],
    lists: dict[str, list] | None = None,
    group: Any = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], dict[str, list | None]]:
    """Every rank's evaluation items, each once, in dataset-index order (for evaluation callbacks).

    Lightning's ``DistributedSampler`` gives each rank every W-th item and pads the ranks to equal
    length with repeated items. This gathers the ranks' items (padded to the longest rank for the
    collective, the padding dropped again), keeps the first copy of each ``index`` and sorts by it:
    the single-process evaluation order of a sequential loader, so metrics over the result equal a
    single process's. A rank may hold no items (its tensors None). With one process: as given.

    Args:
        index: (n_r,) dataset index of this rank's items (on the device the collectives use).
        tensors: name -> (n_r, ...) tensor of per-item values, or None where this rank has none.
        lists: name -> list of n_r per-item Python values (e.g. captions); a name whose list does not
            hold one value per item on some rank comes back None.
        group: process group (None: the default one).

    Returns:
        (index (N,), tensors (N, ...) on ``index``'s device, lists), N the number of distinct items.

    Raises:
        ValueError: a rank holds items but no tensor of a name that another rank has.
    """
    lists = dict(lists or {})
    world = world_size(group)
    if world == 1:
        return index, dict(tensors), lists
    described = {k: None if t is None else (tuple(t.shape[1:]), t.dtype) for k, t in tensors.items()}
    metas: list[Any] = [None] * world
    dist.all_gather_object(metas, (int(index.shape[0]), described, lists), group=group)
    counts = [m[0] for m in metas]
    device = index.device

    def gather(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        pad = torch.zeros((max(counts), *shape), dtype=dtype, device=device)
        if t is not None:
            pad[: t.shape[0]] = t.to(device)
        parts = [torch.empty_like(pad) for _ in counts]
        dist.all_gather(parts, pad, group=group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    every = gather(index, (), index.dtype)
    order = torch.argsort(every, stable=True)
    first = torch.ones(order.shape[0], dtype=torch.bool, device=device)
    first[1:] = every[order][1:] != every[order][:-1]
    keep = order[first]  # the first copy of each item, in index order
    out: dict[str, torch.Tensor | None] = {}
    for name in tensors:
        known = [m[1][name] for m in metas if m[1][name] is not None]
        missing = [r for r, m in enumerate(metas) if m[1][name] is None and m[0] > 0]
        if known and missing:
            raise ValueError(f"'{name}' is missing on rank {missing[0]}, which holds evaluation items")
        out[name] = gather(tensors[name], *known[0])[keep] if known else None
    kept = keep.tolist()
    merged: dict[str, list | None] = {}
    for name in lists:
        if any(len(m[2][name]) != m[0] for m in metas):
            merged[name] = None
            continue
        values = [v for m in metas for v in m[2][name]]
        merged[name] = [values[i] for i in kept]
    return every[keep], out, merged
