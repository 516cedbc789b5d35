"""Tiled teacher-student distillation: KL of row and column softmax distributions, O(N + M).

Student logits S = scale a b^T, teacher logits T = teacher_scale ta tb^T (treated as constants).
Per row, with student maximum m and teacher maximum t: KL = sum_j P Y / sum_j P + log sum_j
exp(S_j - m) - log sum_j exp(T_j - t), where P = exp(T - t) and Y = (m - S) - (t - T); the soft
cross entropy (``ce``) drops the teacher's part of Y and the last log. Y is centred on the row's
own maxima, so a small loss is never the difference of two numbers near the logit scale. Columns
use the same formula on running column maxima: when a maximum grows the running sums are
rescaled and the weighted sum of Y recentred (Y grows by the same amount in the whole column).
As in ``tiled``, each exponential is relative to its own row's or column's maximum (no underflow,
no recompute) and the diagonal (the contrastive positives) is left out of every sum and added
back exactly. The backward recomputes S and T per block:
dL/dS = w_row/N ((1+c) P_s - P_t - c I) + w_col/M ((1+c) Q_s - Q_t - c I), with P row and Q
column softmaxes and c the contrastive weight.
"""

from __future__ import annotations

import math

import torch

from .tiled import (
    BLOCK_ELEMENTS,
    CHUNK_ELEMENTS,
    _block_floor,
    _blocks,
    _buffers,
    _chunks,
    _col_sums_gemv,
    _compute,
    _exp_sub,
    _log_sum,
    _merge,
    _neg_log,
    _scratch,
    _span,
    _top,
)

#: The forward's two row chunks of scratch together take what the backward's one does.
_FWD_CHUNK = CHUNK_ELEMENTS // 2


class _Stats:
    """Statistics of one direction (rows or columns) of both similarity matrices, (L,) each.

    ``s_max``/``t_max``: student/teacher maxima (running for columns); ``s_rest``/``t_rest``: sums
    of exp(x - max) without the diagonal; ``dot``: sum of exp(T - t_max) Y without the diagonal;
    ``s_pos``/``t_pos``: the diagonal entries.
    """

    def __init__(self, length: int, like: torch.Tensor) -> None:
        self.s_max, self.t_max = (like.new_full((length,), -math.inf) for _ in range(2))
        self.s_rest, self.t_rest, self.dot = (like.new_zeros(length) for _ in range(3))
        self.s_pos, self.t_pos = (like.new_empty(length) for _ in range(2))

    def finish(self, k: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Close the sums; the first ``k`` entries have a diagonal entry, the others none.

        Returns:
            (terms, contrastive, lse_s, lse_t), each (L,): the KD term of each entry, the student's
            lse - diagonal (its InfoNCE term), and the student's and teacher's log-sum-exp.
        """
        # Without a diagonal the maximum's own term (1) is in the rest: treat it as the left-out one.
        self.s_pos[k:], self.t_pos[k:] = self.s_max[k:], self.t_max[k:]
        self.s_rest[k:] -= 1
        self.t_rest[k:] -= 1
        gap_s, gap_t = self.s_max - self.s_pos, self.t_max - self.t_pos
        log_s, log_t = _log_sum(gap_s, self.s_rest), _log_sum(gap_t, self.t_rest)
        diag_y = gap_s - gap_t if kind == "kl" else gap_s.clone()
        diag_y[k:] = 0.0  # no diagonal: nothing was left out of the weighted sum
        dot = torch.exp(-gap_t).mul_(diag_y).add_(self.dot)
        terms = dot.div_(torch.exp(log_t)).add_(log_s)
        if kind == "kl":
            terms.sub_(log_t)
        return terms, log_s + gap_s, log_s + self.s_max, log_t.add_(self.t_max)


def _y(s: torch.Tensor, t: torch.Tensor, s_ref: torch.Tensor, t_ref: torch.Tensor, out: torch.Tensor, kind: str):
    """Y = (s_ref - S) - (t_ref - T) for KL, s_ref - S for ce, into ``out``."""
    y = torch.sub(s_ref, s, out=out)
    return y.add_(t).sub_(t_ref) if kind == "kl" else y


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
    k = min(n, m)
    s, ts = scale.to(a_c.dtype), teacher_scale.to(a_c.dtype)
    spans = _span(a_c, b_c, s), _span(ta_c, tb_c, ts)
    row, col = _Stats(n, a_c), _Stats(m, a_c)
    buf_s, buf_t = _buffers(2, n, m, block, a_c)
    w1, w2 = (_scratch(n, m, block, a_c, BLOCK_ELEMENTS, _FWD_CHUNK) for _ in range(2))
    for r0, r1 in _blocks(n, m, block):
        sb = torch.mm(a_c[r0:r1] * s, b_c.T, out=buf_s[: r1 - r0])
        tb_ = torch.mm(ta_c[r0:r1] * ts, tb_c.T, out=buf_t[: r1 - r0])
        d = slice(r0, max(r0, min(r1, k)))  # rows of this block with a diagonal entry
        for stats in (row, col):
            stats.s_pos[d], stats.t_pos[d] = sb.diagonal(r0), tb_.diagonal(r0)
        row.s_max[r0:r1], row.t_max[r0:r1] = sb.amax(dim=1), tb_.amax(dim=1)
        # Moderate logit ranges (see tiled.infonce_fwd): no clamp, column sums as GEMVs of the row pass.
        floor = _block_floor(a_c.dtype, spans[0], row.s_max[r0:r1].max().item(), sb)
        if floor is None:
            floor = _block_floor(a_c.dtype, spans[1], row.t_max[r0:r1].max().item(), tb_)
        for c0, c1 in _chunks(r1 - r0, m, _FWD_CHUNK):
            rows, diag, sc, tc = slice(r0 + c0, r0 + c1), r0 + c0, sb[c0:c1], tb_[c0:c1]
            y_out, e_out, s_row, t_row = w1[: c1 - c0], w2[: c1 - c0], row.s_max[rows], row.t_max[rows]
            # Columns: grow the running maxima, rescale the sums and recentre Y (it grows by s_grow - t_grow).
            s_max, t_max = torch.maximum(col.s_max, sc.amax(dim=0)), torch.maximum(col.t_max, tc.amax(dim=0))
            s_grow = torch.nan_to_num(_merge(col.s_max, col.s_rest, s_max), posinf=0.0)
            t_grow = torch.nan_to_num(_merge(col.t_max, col.t_rest, t_max), posinf=0.0)
            col.dot.mul_(torch.exp(-t_grow)).addcmul_(s_grow - t_grow if kind == "kl" else s_grow, col.t_rest)
            # Teacher rows (S and T stay for the columns).
            e = _exp_sub(tc, t_row[:, None], e_out, floor)
            e.diagonal(diag).zero_()
            row.t_rest[rows] = e.sum(dim=1)
            if floor is None:  # fast path: teacher columns from the row exponentials
                y = _y(sc, tc, s_max, t_max, y_out, kind).mul_(e)
                col.dot.add_(_col_sums_gemv(y, t_row, t_max))
                col.t_rest.add_(_col_sums_gemv(e, t_row, t_max))
            y = _y(sc, tc, s_row[:, None], t_row[:, None], y_out, kind)
            row.dot[rows] = e.mul_(y).sum(dim=1)
            if floor is not None:  # columns, each exponential relative to its own column maximum
                y = _y(sc, tc, s_max, t_max, y_out, kind)
                e = _exp_sub(tc, t_max, e_out, floor)
                e.diagonal(diag).zero_()
                col.t_rest.add_(e.sum(dim=0))
                col.dot.add_(e.mul_(y).sum(dim=0))
                e = _exp_sub(sc, s_max, e_out, floor)
                e.diagonal(diag).zero_()
                col.s_rest.add_(e.sum(dim=0))
            # Student rows last: S is not needed after this.
            e = _exp_sub(sc, s_row[:, None], sc, floor)
            e.diagonal(diag).zero_()
            row.s_rest[rows] = e.sum(dim=1)
            if floor is None:
                col.s_rest.add_(_col_sums_gemv(e, s_row, s_max))
    rows, con_r, lse_s, lse_t = row.finish(k, kind)
    cols, con_c, lse_sc, lse_tc = col.finish(k, kind)
    loss = w_row * rows.double().mean() + w_col * cols.double().mean()
    if contrastive_weight:  # the student's InfoNCE (N == M)
        loss = loss + contrastive_weight * (w_row * con_r.double().mean() + w_col * con_c.double().mean())
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
    spans, tops = (_span(a_c, b_c, s), _span(ta_c, tb_c, ts)), (_top(s_row, s_col), _top(t_row, t_col))
    da, db = torch.empty_like(a_c), torch.zeros_like(b_c)
    dscale = a_c.new_zeros(())
    buf_s, buf_t = _buffers(2, n, m, block, a_c)
    scratch = _scratch(n, m, block, a_c)
    for r0, r1 in _blocks(n, m, block):
        r, a_blk = r1 - r0, a_c[r0:r1]
        g = torch.mm(a_blk * s, b_c.T, out=buf_s[:r])
        t = torch.mm(ta_c[r0:r1] * ts, tb_c.T, out=buf_t[:r])
        floor = _block_floor(a_c.dtype, spans[0], tops[0], g)
        if floor is None:
            floor = _block_floor(a_c.dtype, spans[1], tops[1], t)
        for c0, c1 in _chunks(r, m):
            gc_, tc_, rows = g[c0:c1], t[c0:c1], slice(r0 + c0, r0 + c1)
            p = _exp_sub(gc_, s_row[rows, None], scratch[: c1 - c0], floor)
            _exp_sub(gc_, s_col, gc_, floor).add_(p)
            p = _exp_sub(tc_, t_row[rows, None], scratch[: c1 - c0], floor)
            _exp_sub(tc_, t_col, tc_, floor).add_(p)
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
