"""Tiled teacher-student distillation: KL of row and column softmax distributions, O(N + M).

Student logits S = scale a b^T, teacher logits T = teacher_scale ta tb^T (treated as constants).
The forward sweep keeps, per row, the student's and teacher's log-sum-exp and the teacher-weighted
sum of X (X = T - S for KL, -S for soft cross entropy); per column the same with online rescaling
of the running sums when a column maximum grows. The backward recomputes S and T per block:
dL/dS = w_row/N ((1+c) P_s - P_t - c I) + w_col/M ((1+c) Q_s - Q_t - c I), with P row and Q
column softmaxes and c the contrastive weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .tiled import _blocks, _buffers, _chunks, _compute, _fix_underflow, _merge_cols, _neg_log, _scratch, _tiny


def _teacher_cols(
    row_max: torch.Tensor, probs: torch.Tensor, x: torch.Tensor, recompute: Callable, col: list[torch.Tensor]
) -> None:
    """Online column update of (max, sum exp(T - max), sum exp(T - max) X) for one block.

    ``probs`` holds exp(T - row max) and is overwritten with probs * X. As in
    ``tiled._fix_underflow`` the column sums are GEMVs with weights exp(row max - block max);
    columns that underflow are recomputed exactly by ``recompute(cols) -> (T[:, cols], X[:, cols])``.
    """
    top = row_max.max()
    w = torch.exp(row_max - top)
    sums = torch.mv(probs.T, w)
    dots = torch.mv(probs.mul_(x).T, w)
    maxes = top.expand_as(sums).clone()
    bad = (sums < _tiny(sums.dtype)).nonzero().squeeze(1)
    if bad.numel():
        t_sub, x_sub = recompute(bad)
        maxes[bad] = t_sub.amax(dim=0)
        e = torch.exp(t_sub - maxes[bad])
        sums[bad], dots[bad] = e.sum(dim=0), (e * x_sub).sum(dim=0)
    col_max, col_sum, col_dot = col
    new_max = torch.maximum(col_max, maxes)
    old, new = torch.exp(col_max - new_max), torch.exp(maxes - new_max)
    col_sum.mul_(old).add_(sums * new)
    col_dot.mul_(old).add_(dots * new)
    col_max.copy_(new_max)


def kd_fwd(
    a: torch.Tensor,
    b: torch.Tensor,
    ta: torch.Tensor,
    tb: torch.Tensor,
    scale: torch.Tensor,
    teacher_scale: torch.Tensor,
    w_row: float,
    w_col: float,
    contrastive_weight: float,
    kind: str,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KD loss (see ``reference.kd``) and its statistics.

    Returns:
        loss (0-d) and stats (4, max(N, M)): rows 0-1 the student's and teacher's row
        log-sum-exp (first N entries), rows 2-3 their column log-sum-exp (first M entries).
    """
    a_c, b_c, ta_c, tb_c = _compute(a), _compute(b), _compute(ta), _compute(tb)
    n, m = a_c.shape[0], b_c.shape[0]
    s, ts = scale.to(a_c.dtype), teacher_scale.to(a_c.dtype)
    lse_s, lse_t, row_dot = (a_c.new_empty(n) for _ in range(3))
    s_col = [a_c.new_full((m,), -math.inf), a_c.new_zeros(m)]
    t_col = [a_c.new_full((m,), -math.inf), a_c.new_zeros(m), a_c.new_zeros(m)]
    buf_s, buf_t = _buffers(2, n, m, block, a_c)
    scratch = _scratch(n, m, block, a_c)
    for r0, r1 in _blocks(n, m, block):
        r = r1 - r0
        a_blk, ta_blk = a_c[r0:r1] * s, ta_c[r0:r1] * ts
        sb = torch.mm(a_blk, b_c.T, out=buf_s[:r])
        tb_ = torch.mm(ta_blk, tb_c.T, out=buf_t[:r])
        # Student statistics in row chunks (S itself is still needed for X below).
        row_max = sb.amax(dim=1)
        top = row_max.max()
        w, row_sum, sums = torch.exp(row_max - top), a_c.new_empty(r), a_c.new_zeros(m)
        for c0, c1 in _chunks(r, m):
            p = torch.sub(sb[c0:c1], row_max[c0:c1, None], out=scratch[: c1 - c0]).exp_()
            row_sum[c0:c1] = p.sum(dim=1)
            sums.addmv_(p.T, w[c0:c1])
        lse_s[r0:r1] = row_sum.log_().add_(row_max)
        _merge_cols(*s_col, _fix_underflow(top, sums, lambda cols, a_blk=a_blk: a_blk @ b_c[cols].T), sums)
        x = torch.sub(tb_, sb, out=sb) if kind == "kl" else sb.neg_()  # X overwrites S
        # Teacher statistics in place: T is not needed once exp(T - row max) is formed.
        row_max = tb_.amax(dim=1)
        probs = tb_.sub_(row_max[:, None]).exp_()
        row_sum = probs.sum(dim=1)
        lse_t[r0:r1] = row_sum.log().add_(row_max)

        def recompute(cols: torch.Tensor, a_blk=a_blk, ta_blk=ta_blk) -> tuple[torch.Tensor, torch.Tensor]:
            t_sub, s_sub = ta_blk @ tb_c[cols].T, a_blk @ b_c[cols].T
            return t_sub, (t_sub - s_sub if kind == "kl" else -s_sub)

        _teacher_cols(row_max, probs, x, recompute, t_col)
        row_dot[r0:r1] = probs.sum(dim=1) / row_sum  # probs now holds exp(T - row max) * X
    lse_sc = s_col[1].log_().add_(s_col[0])
    lse_tc = t_col[1].log().add_(t_col[0])
    col_dot = t_col[2] / t_col[1]
    # Row i: sum_j P_t X_ij + lse_S(i) (- lse_T(i) for KL, since sum_j P_t T_ij - lse_T(i) = -H(P_t)).
    rows = row_dot + lse_s - (lse_t if kind == "kl" else 0.0)
    cols = col_dot + lse_sc - (lse_tc if kind == "kl" else 0.0)
    loss = w_row * rows.mean() + w_col * cols.mean()
    if contrastive_weight:
        pos = (a_c * b_c).sum(dim=1) * s
        loss = loss + contrastive_weight * (w_row * (lse_s - pos).mean() + w_col * (lse_sc - pos).mean())
    stats = a_c.new_full((4, max(n, m)), math.inf)
    stats[0, :n], stats[1, :n], stats[2, :m], stats[3, :m] = lse_s, lse_t, lse_sc, lse_tc
    return loss.to(a.dtype), stats


def kd_bwd(
    grad: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ta: torch.Tensor,
    tb: torch.Tensor,
    scale: torch.Tensor,
    teacher_scale: torch.Tensor,
    stats: torch.Tensor,
    w_row: float,
    w_col: float,
    contrastive_weight: float,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``kd_fwd``'s loss for the student: (da (N, D), db (M, D), dscale (0-d))."""
    a_c, b_c, ta_c, tb_c = _compute(a), _compute(b), _compute(ta), _compute(tb)
    n, m = a_c.shape[0], b_c.shape[0]
    s, ts = scale.to(a_c.dtype), teacher_scale.to(a_c.dtype)
    c = contrastive_weight
    # Each weight is folded into its exponent: w * exp(x - lse) = exp(x - (lse - log w)).
    s_row = stats[0, :n] + _neg_log(w_row * (1 + c) / n)
    t_row = stats[1, :n] + _neg_log(w_row / n)
    s_col = stats[2, :m] + _neg_log(w_col * (1 + c) / m)
    t_col = stats[3, :m] + _neg_log(w_col / m)
    da, db = torch.empty_like(a_c), torch.zeros_like(b_c)
    dscale = a_c.new_zeros(())
    buf_s, buf_t = _buffers(2, n, m, block, a_c)
    scratch = _scratch(n, m, block, a_c)
    for r0, r1 in _blocks(n, m, block):
        r, a_blk = r1 - r0, a_c[r0:r1]
        g = torch.mm(a_blk * s, b_c.T, out=buf_s[:r])
        t = torch.mm(ta_c[r0:r1] * ts, tb_c.T, out=buf_t[:r])
        for c0, c1 in _chunks(r, m):
            gc_, tc_, rows = g[c0:c1], t[c0:c1], slice(r0 + c0, r0 + c1)
            p = torch.sub(gc_, s_row[rows, None], out=scratch[: c1 - c0]).exp_()
            gc_.sub_(s_col).exp_().add_(p)
            p = torch.sub(tc_, t_row[rows, None], out=scratch[: c1 - c0]).exp_()
            tc_.sub_(t_col).exp_().add_(p)
            gc_.sub_(tc_)
        if c:
            g.diagonal(r0).sub_(c * (w_row / n + w_col / m))
        gb = g @ b_c
        dscale += (gb * a_blk).sum()
        da[r0:r1] = gb.mul_(s)
        db.addmm_(g.T, a_blk)
    del buf_s, buf_t, scratch  # free the block buffers before the last O(N D) work
    grad = grad.to(a_c.dtype)
    # In place: out-of-place products would hold a second copy of both gradients at the peak.
    da.mul_(grad)
    db.mul_(s * grad)
    return da.to(a.dtype), db.to(b.dtype), (dscale * grad).to(scale.dtype)
