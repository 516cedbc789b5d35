"""Data-parallel similarity losses, exact over the global batch, without gathering the N x M logits.

Each rank passes its local rows, (N_r, D) image and text embeddings (N_r may differ between
ranks); the global batch is their concatenation in group-rank order, positives its pairs (i, i).
A rank gathers the text embeddings (M x D, cheap), computes only its own row block against all
columns and all-reduces O(M) column statistics (maxima first, then sums rescaled to them). Every
rank returns the global loss (the same value on all), and after ``backward`` holds the global
loss's gradient with respect to its own samples: ``image.grad`` and ``text.grad`` are the rows of
a single-process run on the concatenated batch (the text gradient sums every rank's row block:
one all-reduce of (M, D)). GEMM passes per logit matrix and rank: InfoNCE and KD 1 + 3 (the
backward recomputes the blocks; nothing N x M outlives a block), SigLIP 3 (gradients in the
forward sweep). Without a process group, or with one rank, the values are ``reference.*``'s
(to rounding: 1e-15 relative in fp64).

The shared scalars (``logit_scale``, ``logit_bias``) are replicated parameters, so by default
(``scalar_grads="partial"``) a rank gets its own row block's share of their gradient: the shares
sum to the global gradient over ranks, as the encoder parameters' gradients do.
``scalar_grads="global"`` all-reduces them (every rank holds the whole, for a scale that no
data-parallel wrapper synchronises).

Under Lightning DDP (or ``DistributedDataParallel``) call the loss in ``training_step`` on every
rank with its local batch; every rank must run ``backward`` (it all-reduces). DDP *averages* the
parameter gradients over the W ranks, and each rank's gradient is the global loss's gradient
through its own samples (and its share of the scalars), so the average is ``1/W`` of the global
gradient. Recommended: backpropagate ``loss * trainer.world_size`` and log ``loss`` (already
global: no ``sync_dist``). Then every gradient, the logit scale's included, equals the
single-process gradient of the global batch, as with open_clip's ``ClipLoss(gather_with_grad=True)``,
so learning rates and gradient-clipping thresholds carry over from one-device runs unchanged.
Unscaled, SGD behaves as with the learning rate divided by W (Adam's steps are scale-free, but
its ``eps`` and gradient clipping are not).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._validate import as_scalar, check_embeddings, check_weights

ScalarGrads = Literal["partial", "global"]
#: Logits per row block when ``block_rows=0``: 8 Mi (32 MiB in fp32).
BLOCK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class _Layout:
    """Who holds which rows in one call, agreed on by every rank of ``group``."""

    group: Any
    world: int
    rank: int
    rows: tuple[int, ...]  # image rows per rank
    cols: tuple[int, ...]  # text rows per rank
    need: tuple[bool, bool, bool]  # gradients wanted on any rank: image, text, scalars

    @property
    def row0(self) -> int:
        return sum(self.rows[: self.rank])

    @property
    def col0(self) -> int:
        return sum(self.cols[: self.rank])

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return t

    def gather_cols(self, x: torch.Tensor) -> torch.Tensor:
        """(cols[rank], K) local text rows -> (M, K) of every rank, padded for the collective."""
        if self.world == 1:
            return x
        pad = x.new_zeros(max(self.cols), x.shape[1])
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad, group=self.group)
        return torch.cat([p[:c] for p, c in zip(parts, self.cols)])


def _layout(
    group: Any, named: dict[str, torch.Tensor], widths: tuple[str, ...], need: tuple[bool, ...], check_finite: bool
):
    """Exchange row counts, widths, gradient needs and finiteness, so that every rank raises the same error.

    ``named``: the op's tensors, the first the (rows, D) image, the second the (cols, D) text.
    """
    initialised = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if initialised else (1, 0)
    tensors, names = list(named.values()), list(named)
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]) if check_finite else torch.ones(len(named))
    sizes = [tensors[0].shape[0], tensors[1].shape[0], *need, *(named[w].shape[1] for w in widths)]
    meta = torch.cat([torch.tensor(sizes, device=tensors[0].device), finite.to(tensors[0].device, torch.int64)])
    parts = [torch.empty_like(meta) for _ in range(world)] if world > 1 else [meta]
    if world > 1:
        dist.all_gather(parts, meta, group=group)
    table = torch.stack(parts).tolist()  # the one host sync of the checks
    for col, name in enumerate(widths, start=5):
        if len({row[col] for row in table}) > 1:
            per_rank = [row[col] for row in table]
            raise ValueError(f"{name} width D differs across ranks: {per_rank} (rank order); all need the same D")
    for r, row in enumerate(table):
        for name, ok in zip(names, row[5 + len(widths) :]):
            if not ok:
                raise ValueError(f"{name} contains non-finite values (NaN or inf) on rank {r}")
    rows, cols, *need_any = zip(*(row[:5] for row in table))
    return _Layout(group, world, rank, rows, cols, tuple(any(x) for x in need_any))


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _compute(t: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are accumulated in fp32; fp32/fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _blocks(n: int, m: int, block_rows: int, like: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Row blocks (r0, r1) of an (n, m) logit matrix and the local row indices 0..r1-r0 on ``like``'s device."""
    rows = block_rows if block_rows > 0 else max(1, BLOCK_ELEMENTS // max(m, 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        yield r0, r1, torch.arange(r1 - r0, device=like.device)


def _row_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row maximum and sum(exp(x - max)) of a (rows, M) block."""
    top = x.amax(1)
    return top, torch.exp(x - top[:, None]).sum(1)


def _col_update(x: torch.Tensor, top: torch.Tensor, sums: torch.Tensor, diff=None, acc=None) -> None:
    """Online column log-sum-exp: fold block ``x`` into running maxima and rescaled sums (in place).

    With ``diff``, ``acc`` also accumulates sum_i exp(x_ij - top_j) * diff_ij on the same scale.
    """
    new = torch.maximum(top, x.amax(0))
    factor = torch.exp(top - new)
    e = torch.exp(x - new)
    sums.mul_(factor).add_(e.sum(0))
    if acc is not None:
        acc.mul_(factor).add_((e * diff).sum(0))
    top.copy_(new)


def _softmax_into(out: torch.Tensor, x: torch.Tensor, top: torch.Tensor, weight: torch.Tensor) -> None:
    """``out += exp(x - top) * weight`` (weight = coefficient / sum): no max + log(sum) rounding in the exponent."""
    out.addcmul_(torch.exp(x - top), weight)


def _no_double_backward() -> None:
    """The backward passes are plain tensor code on saved tensors: a graph of them would give wrong second
    derivatives, so ``create_graph=True`` is refused in one line (as the tiled and CUDA ops refuse it)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the distributed similarity losses do not support double backward (create_graph=True): "
            "use cuda_ext.reference on gathered embeddings for second-order gradients"
        )


class _SoftmaxLoss(torch.autograd.Function):
    """Symmetric InfoNCE and teacher-student KD (row and column softmaxes) over the global batch.

    Softmaxes are kept as (maximum, sum) pairs, never as max + log(sum): at scale 100 that sum
    would round the exponent by ~1e-5 and cost fp32 gradients a factor 4 in accuracy.
    """

    @staticmethod
    def forward(ctx, lay, a, b, ta, tb, scale, t_scale, w_row, w_col, cw, kind, block_rows, global_scalars):
        ctx.dtypes = (a.dtype, b.dtype, scale.dtype)
        a, b = _compute(a), _compute(b)
        scale = scale.to(a.dtype)
        teacher = ta is not None
        n, m_local, d = a.shape[0], b.shape[0], b.shape[1]
        N, M, row0 = sum(lay.rows), sum(lay.cols), lay.row0
        ctx.coef = (cw * w_row / N, cw * w_col / N, w_row / N if teacher else 0.0, w_col / M if teacher else 0.0)
        cr, cc, kr, kc = ctx.coef
        if teacher:
            ta, t_scale = ta.to(a.dtype), t_scale.to(a.dtype)
            both = lay.gather_cols(torch.cat([b, tb.to(a.dtype)], dim=1))
            B, TB = both[:, :d], both[:, d:]
        else:
            B = TB = lay.gather_cols(b)
        kl = kind == "kl"
        # Column statistics (M,): student max, sum; teacher max, sum; sum_i p_teacher * diff; positives.
        cols = a.new_zeros(6, M)
        top, sums, t_top, t_sums, acc, pos = cols
        top.fill_(-math.inf)
        t_top.fill_(-math.inf)
        rows = a.new_zeros(4, n)  # student max, sum; teacher max, sum
        row_terms = a.new_zeros(2, n)  # InfoNCE, KD
        for r0, r1, i in _blocks(n, M, block_rows, a):
            S = torch.mm(a[r0:r1], B.T).mul_(scale)
            mx, sm = rows[0, r0:r1], rows[1, r0:r1]
            mx[:], sm[:] = _row_stats(S)
            if cw:
                p = S[i, row0 + r0 + i]  # positives from the block GEMM, not a separate dot product
                pos[row0 + r0 : row0 + r1] = p
                row_terms[0, r0:r1] = (mx - p) + sm.log()
            if teacher:
                T = torch.mm(ta[r0:r1], TB.T).mul_(t_scale)
                t_mx, t_sm = rows[2, r0:r1], rows[3, r0:r1]
                t_mx[:], t_sm[:] = _row_stats(T)
                diff = T - S if kl else S.neg()
                cross = (torch.exp(T - t_mx[:, None]) * diff).sum(1) / t_sm  # sum_j p_teacher * diff
                lse_gap = (mx - t_mx) + (sm / t_sm).log() if kl else mx + sm.log()
                row_terms[1, r0:r1] = cross + lse_gap
                _col_update(T, t_top, t_sums, diff, acc)
            _col_update(S, top, sums)
        g_top = lay.all_reduce(torch.stack([top, t_top]), "max")
        sums.mul_(torch.exp(top - g_top[0]))
        factor = torch.exp(t_top - g_top[1]) if teacher else torch.zeros_like(t_top)
        t_sums.mul_(factor)
        acc.mul_(factor)
        tot = lay.all_reduce(torch.cat([cols[[1, 3, 4, 5]].flatten(), row_terms.sum(1)]))
        sums, t_sums, acc, pos, local = tot[:M], tot[M : 2 * M], tot[2 * M : 3 * M], tot[3 * M : 4 * M], tot[4 * M :]
        loss = cr * local[0] + kr * local[1]
        if cw:
            loss = loss + cc * ((g_top[0] - pos) + sums.log()).sum()
        if teacher:
            lse_gap = (g_top[0] - g_top[1]) + (sums / t_sums).log() if kl else g_top[0] + sums.log()
            loss = loss + kc * (acc / t_sums + lse_gap).sum()
        col_stats = torch.stack([g_top[0], sums, g_top[1], t_sums])
        ctx.lay, ctx.block_rows, ctx.global_scalars, ctx.m_local = lay, block_rows, global_scalars, m_local
        ctx.save_for_backward(a, B, ta, TB if teacher else None, scale, t_scale, rows, col_stats)
        return loss.to(ctx.dtypes[0])

    @staticmethod
    def backward(ctx, grad):
        _no_double_backward()
        a, B, ta, TB, scale, t_scale, rows, cols = ctx.saved_tensors
        lay, (cr, cc, kr, kc) = ctx.lay, ctx.coef
        grad = grad.to(a.dtype)
        row0, teacher = lay.row0, ta is not None
        # dL/dlogits = sum of coefficient * softmax terms; each weight is coefficient * grad / softmax sum.
        row_w = torch.stack([(cr + kr) / rows[1], -kr / rows[3]]) * grad
        col_w = torch.stack([(cc + kc) / cols[1], -kc / cols[3]]) * grad
        da = torch.empty_like(a) if lay.need[0] else None
        dB = torch.zeros_like(B) if lay.need[1] else None
        ds = a.new_zeros(())
        for r0, r1, i in _blocks(a.shape[0], B.shape[0], ctx.block_rows, a):
            S = torch.mm(a[r0:r1], B.T).mul_(scale)
            P = torch.exp(S - cols[0]).mul_(col_w[0])
            _softmax_into(P, S, rows[0, r0:r1, None], row_w[0, r0:r1, None])
            if teacher:
                T = torch.mm(ta[r0:r1], TB.T).mul_(t_scale)
                _softmax_into(P, T, cols[2], col_w[1])
                _softmax_into(P, T, rows[2, r0:r1, None], row_w[1, r0:r1, None])
            if cr + cc:
                P[i, row0 + r0 + i] -= (cr + cc) * grad
            G = torch.mm(P, B)
            if da is not None:
                da[r0:r1] = G * scale
            ds += (G * a[r0:r1]).sum()
            if dB is not None:
                dB.addmm_(P.T, a[r0:r1])
        db = None
        if dB is not None:
            db = lay.all_reduce(dB.mul_(scale))[lay.col0 : lay.col0 + ctx.m_local].to(ctx.dtypes[1])
        if lay.need[2] and ctx.global_scalars:
            lay.all_reduce(ds)
        da = da.to(ctx.dtypes[0]) if da is not None else None
        return None, da, db, None, None, ds.to(ctx.dtypes[2]), *([None] * 7)


class _SigLip(torch.autograd.Function):
    """Sigmoid loss over the global batch; gradients taken in the forward sweep, summed in backward."""

    @staticmethod
    def forward(ctx, lay, a, b, scale, bias, block_rows, global_scalars):
        ctx.dtypes = (a.dtype, b.dtype, scale.dtype, bias.dtype)
        a, b = _compute(a), _compute(b)
        scale, bias = scale.to(a.dtype), bias.to(a.dtype)
        B, N, row0 = lay.gather_cols(b), sum(lay.rows), lay.row0
        with_grad = any(lay.need)
        total = a.new_zeros(())
        da, ds, dbias = torch.empty_like(a), a.new_zeros(()), a.new_zeros(())
        dB = torch.zeros_like(B) if with_grad else B.new_zeros(0, B.shape[1])
        for r0, r1, i in _blocks(a.shape[0], B.shape[0], block_rows, a):
            V = torch.mm(a[r0:r1], B.T).mul_(scale).add_(bias)
            V[i, row0 + r0 + i] *= -1  # V = -y * logits, so the loss is sum(softplus(V))
            total -= F.logsigmoid(-V).sum()
            if with_grad:
                P = V.sigmoid_().mul_(1.0 / N)
                P[i, row0 + r0 + i] *= -1
                dbias += P.sum()
                G = torch.mm(P, B)
                da[r0:r1] = G * scale
                ds += (G * a[r0:r1]).sum()
                dB.addmm_(P.T, a[r0:r1])
        ctx.lay, ctx.global_scalars, ctx.m_local = lay, global_scalars, b.shape[0]
        ctx.save_for_backward(da, dB.mul_(scale), ds, dbias)
        return (lay.all_reduce(total) / N).to(ctx.dtypes[0])

    @staticmethod
    def backward(ctx, grad):
        _no_double_backward()
        da, dB, ds, dbias = ctx.saved_tensors
        lay = ctx.lay
        grad = grad.to(da.dtype)
        db = None
        if lay.need[1]:
            db = lay.all_reduce(dB * grad)[lay.col0 : lay.col0 + ctx.m_local].to(ctx.dtypes[1])
        scalars = torch.stack([ds, dbias]) * grad
        if lay.need[2] and ctx.global_scalars:
            lay.all_reduce(scalars)
        da = (da * grad).to(ctx.dtypes[0]) if lay.need[0] else None
        return None, da, db, scalars[0].to(ctx.dtypes[2]), scalars[1].to(ctx.dtypes[3]), None, None


def _check_paired(x: torch.Tensor, y: torch.Tensor, x_name: str, y_name: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{x_name} has {x.shape[0]} rows but {y_name} has {y.shape[0]}: each rank must hold them row for row"
        )


def _check_scalar_grads(scalar_grads: str) -> bool:
    """True for ``global``; raises on anything but ``partial`` / ``global``."""
    if scalar_grads not in ("partial", "global"):
        raise ValueError(f"scalar_grads must be 'partial' or 'global', got {scalar_grads!r}")
    return scalar_grads == "global"


def distributed_infonce_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    row_weight: float = 0.5,
    col_weight: float = 0.5,
    group: Any = None,
    block_rows: int = 0,
    scalar_grads: ScalarGrads = "partial",
    check_finite: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch of a data-parallel group (see the module docstring).

    Args:
        image: (N_r, D) this rank's image embeddings.
        text: (N_r, D) this rank's text embeddings, paired with ``image`` row by row.
        logit_scale: exponentiated temperature, a float or a 0-d tensor (gets a gradient).
        row_weight: weight of the image->text term (mean over the N global rows).
        col_weight: weight of the text->image term (mean over the N global columns).
        group: process group (None: the default group, or a single process when none is initialised).
        block_rows: rows per block (0: about 8 Mi logits per block).
        scalar_grads: ``partial`` (this rank's share of the scale's gradient) or ``global`` (the whole of it).
        check_finite: reject NaN/inf embeddings (checked on every rank; all ranks raise).

    Returns:
        Scalar global loss, the same on every rank, in the embeddings' dtype.
    """
    check_embeddings({"image": image, "text": text}, same_width=(("image", "text"),), check_finite=False)
    _check_paired(image, text, "image", "text")
    check_weights(row_weight=row_weight, col_weight=col_weight)
    global_scalars = _check_scalar_grads(scalar_grads)
    scale = as_scalar(logit_scale, "logit_scale", image)
    need = (_wants_grad(image), _wants_grad(text), _wants_grad(scale))
    lay = _layout(group, {"image": image, "text": text}, ("image",), need, check_finite)
    weights = (float(row_weight), float(col_weight), 1.0, "kl", block_rows, global_scalars)
    return _SoftmaxLoss.apply(lay, image, text, None, None, scale, None, *weights)


def distributed_siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    *,
    group: Any = None,
    block_rows: int = 0,
    scalar_grads: ScalarGrads = "partial",
    check_finite: bool = True,
) -> torch.Tensor:
    """Sigmoid loss ``-sum(logsigmoid(y * (scale * image @ text.T + bias))) / N`` over the global batch.

    Args:
        image: (N_r, D) this rank's image embeddings.
        text: (N_r, D) this rank's text embeddings, paired with ``image`` row by row.
        logit_scale: exponentiated temperature (float or 0-d tensor).
        logit_bias: additive bias (float or 0-d tensor).
        group: process group (None: the default group, or a single process).
        block_rows: rows per block (0: automatic).
        scalar_grads: ``partial`` or ``global`` share of the scale's and bias's gradients.
        check_finite: reject NaN/inf embeddings (checked on every rank; all ranks raise).

    Returns:
        Scalar global loss (normalised by the global N), the same on every rank.
    """
    check_embeddings({"image": image, "text": text}, same_width=(("image", "text"),), check_finite=False)
    _check_paired(image, text, "image", "text")
    global_scalars = _check_scalar_grads(scalar_grads)
    scale = as_scalar(logit_scale, "logit_scale", image)
    bias = as_scalar(logit_bias, "logit_bias", image)
    need = (_wants_grad(image), _wants_grad(text), _wants_grad(scale, bias))
    lay = _layout(group, {"image": image, "text": text}, ("image",), need, check_finite)
    return _SigLip.apply(lay, image, text, scale, bias, block_rows, global_scalars)


def distributed_kd_loss(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    teacher_logit_scale: float | torch.Tensor,
    *,
    row_weight: float = 0.5,
    col_weight: float = 0.5,
    contrastive_weight: float = 0.0,
    kind: Literal["kl", "ce"] = "kl",
    group: Any = None,
    block_rows: int = 0,
    scalar_grads: ScalarGrads = "partial",
    check_finite: bool = True,
) -> torch.Tensor:
    """Relational distillation (as ``ops.kd_loss``) over the global batch; column softmaxes span every rank.

    Args:
        student_image: (N_r, D) this rank's student embeddings.
        student_text: (M_r, D) this rank's student (or teacher) text embeddings.
        teacher_image: (N_r, D_t) teacher embeddings (no gradient).
        teacher_text: (M_r, D_t) teacher embeddings (no gradient).
        logit_scale: the student's exponentiated temperature (float or 0-d tensor).
        teacher_logit_scale: the teacher's.
        row_weight: weight of the row term (mean over the N global rows).
        col_weight: weight of the column term (mean over the M global columns).
        contrastive_weight: weight of the added student InfoNCE (needs paired rows, N_r == M_r).
        kind: ``kl`` or ``ce`` (KL plus the teacher's entropy, as open_clip's ``DistillClipLoss``).
        group: process group (None: the default group, or a single process).
        block_rows: rows per block (0: automatic).
        scalar_grads: ``partial`` or ``global`` share of the student scale's gradient.
        check_finite: reject NaN/inf embeddings (checked on every rank; all ranks raise).

    Returns:
        Scalar global loss, the same on every rank.
    """
    named = {
        "student_image": student_image,
        "student_text": student_text,
        "teacher_image": teacher_image,
        "teacher_text": teacher_text,
    }
    pairs = (("student_image", "student_text"), ("teacher_image", "teacher_text"))
    check_embeddings(named, same_width=pairs, check_finite=False)
    _check_paired(student_image, teacher_image, "student_image", "teacher_image")
    _check_paired(student_text, teacher_text, "student_text", "teacher_text")
    if kind not in ("kl", "ce"):
        raise ValueError(f"kind must be 'kl' or 'ce', got {kind!r}")
    check_weights(row_weight=row_weight, col_weight=col_weight, contrastive_weight=contrastive_weight)
    if contrastive_weight:
        _check_paired(student_image, student_text, "student_image", "student_text")
    global_scalars = _check_scalar_grads(scalar_grads)
    scale = as_scalar(logit_scale, "logit_scale", student_image)
    t_scale = as_scalar(teacher_logit_scale, "teacher_logit_scale", student_image).detach()
    need = (_wants_grad(student_image), _wants_grad(student_text), _wants_grad(scale))
    lay = _layout(group, named, ("student_image", "teacher_image"), need, check_finite)
    teacher = (teacher_image.detach(), teacher_text.detach())
    weights = (float(row_weight), float(col_weight), float(contrastive_weight), kind, block_rows)
    return _SoftmaxLoss.apply(lay, student_image, student_text, *teacher, scale, t_scale, *weights, global_scalars)
