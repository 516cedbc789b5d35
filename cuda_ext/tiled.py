"""Tiled backend: the losses over row blocks of the logit matrix, O(N + M) extra memory.

Plain PyTorch. A forward sweep over row blocks keeps only per-row and per-column statistics:
row maxima and sums, and per column a running (max, sum) merged online with rescaling as in
flash attention's softmax; every exponential is taken relative to its own row's or column's
maximum, so no sum underflows and nothing is recomputed. The backward recomputes each block
from the embeddings. GEMM-sized passes: InfoNCE 1 forward + 3 backward; SigLIP 3 in one fused
pass (it needs no global statistics); KD 2 + 4 (student and teacher blocks).

Precision: the positive logits are read off the diagonal of the same block GEMM, the sums leave
the positives out, and each row's ``lse - pos`` is formed as ``gap + log1p(expm1(-gap) + rest)``
(gap = max - pos, rest = sum of the other exponentials) instead of subtracting two numbers near
the logit scale; the O(N) totals are summed in fp64. So a small loss keeps its relative precision.

Blocks go through one preallocated buffer (``out=``, updated in place) so the sweep does not
fault in fresh pages; where an op needs a second (rows, M) operand it works in row chunks of
a small scratch buffer instead, which keeps the peak near one block.
Functions here take and return plain tensors; autograd lives in ``_tiled_ops``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

#: Elements per (rows, M) block buffer: 16 Mi floats = 64 MiB in fp32 (large GEMMs run faster).
BLOCK_ELEMENTS = 1 << 24
#: Elements per row chunk of the scratch buffer: half a block. Fewer, larger ops matter on a
#: busy CPU (each op wakes the thread pool); smaller chunks measured up to 20% slower.
CHUNK_ELEMENTS = 1 << 23
#: The forward's block: it holds no gradients, so block + scratch may fill two backward blocks.
FORWARD_ELEMENTS = 2 * BLOCK_ELEMENTS - CHUNK_ELEMENTS


def _compute(t: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are accumulated in fp32; fp32/fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _blocks(n: int, m: int, block: int, elements: int = 0) -> Iterator[tuple[int, int]]:
    rows = block if block > 0 else max(1, min(n, (elements or BLOCK_ELEMENTS) // max(m, 1)))
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


def _buffers(count: int, n: int, m: int, block: int, like: torch.Tensor, elements: int = 0) -> list[torch.Tensor]:
    rows = max(r1 - r0 for r0, r1 in _blocks(n, m, block, elements))
    return [like.new_empty(rows, m) for _ in range(count)]


def _chunks(rows: int, m: int, chunk: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    step = max(1, chunk // max(m, 1))
    for c0 in range(0, rows, step):
        yield c0, min(rows, c0 + step)


def _scratch(
    n: int, m: int, block: int, like: torch.Tensor, elements: int = 0, chunk: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    rows = max(r1 - r0 for r0, r1 in _blocks(n, m, block, elements))
    return like.new_empty(min(rows, max(1, chunk // max(m, 1))), m)


def _neg_log(w: float) -> float:
    """-log(w), +inf for w == 0: subtracting it inside exp() folds the weight into the exponent."""
    return math.inf if w == 0 else -math.log(w)


def _exp_floor(dtype: torch.dtype, low: float = -math.inf) -> float | None:
    """Lowest exponent handed to exp(), or None where no exponent can be lower than ``low`` >= floor.

    The CPU's vectorised exp is 10-30x slower where its result is subnormal or zero, as for most
    logits of a trained model at scale 100. exp(floor) (1.6e-38 in fp32, 1e-304 in fp64) stands in
    for anything smaller: it is below the resolution of every sum it joins (each holds a term >= 1
    or is only added to such a sum). ``low`` is a lower bound on the exponents (see ``_span``).
    """
    floor = -87.0 if dtype == torch.float32 else -700.0
    return None if low >= floor else floor


def _block_floor(dtype: torch.dtype, span: float, top: float, block: torch.Tensor) -> float | None:
    """The exp floor for exponents ``block - ref`` with every ``ref`` <= ``top``, or None (no clamp).

    ``span`` bounds |block| (see ``_span``): where even that leaves every exponent above the floor
    no check is needed; where a one-sided range could fit, one amin pass over the block decides
    (random-like logits at scale <= ~80); else (trained logits at scale 100) the floor is kept.
    """
    if _exp_floor(dtype, -span - top) is None or _exp_floor(dtype, -span) is not None:
        return _exp_floor(dtype, -span - top)
    return _exp_floor(dtype, block.amin().item() - top)


def _span(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> float:
    """Bound on |scale x_i . y_j| from the largest row norms: logits lie in [-span, span]."""
    return (scale.abs() * x.norm(dim=1).max() * y.norm(dim=1).max()).item() if x.numel() and y.numel() else 0.0


def _exp_sub(x: torch.Tensor, ref: torch.Tensor, out: torch.Tensor, floor: float | None) -> torch.Tensor:
    """exp(max(x - ref, floor)) into ``out`` (which may be ``x``); ``ref`` broadcasts against x."""
    d = torch.sub(x, ref, out=out)
    return (d if floor is None else d.clamp_(min=floor)).exp_()


def _log_sum(gap: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """log(exp(-gap) + rest) without rounding 1 + rest: the log-sum-exp relative to the maximum
    when one term (the positive, ``gap`` = max - positive >= 0) was left out of the sum ``rest``."""
    return torch.log1p(torch.expm1(-gap).add_(rest))


def _top(*shifts: torch.Tensor) -> float:
    """Largest finite entry of the backward's exponent shifts (-inf if none is finite)."""
    finite = [x[x.isfinite()] for x in shifts]
    return max((x.max().item() for x in finite if x.numel()), default=-math.inf)


def _merge(col_max: torch.Tensor, col_sum: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
    """Rescale the running column sums to the larger maxima ``new_max`` (in place).

    Returns:
        (M,) how much each column maximum grew (+inf where a column had no rows yet).
    """
    grow = new_max - col_max
    col_sum.mul_(torch.exp(-grow))
    col_max.copy_(new_max)
    return grow


def _col_sums_gemv(p: torch.Tensor, row_max: torch.Tensor, col_max: torch.Tensor) -> torch.Tensor:
    """sum_i exp(x_ij - col_max_j) from p = exp(x - row_max) (r, M) by one GEMV.

    Exact only where no exponent x_ij - max(row_max) is below the exp floor (the caller's fast
    path): each term is then a normal float, taken relative to the chunk's top row maximum and
    moved to the column's own maximum afterwards.
    """
    top = row_max.max()
    return torch.mv(p.T, torch.exp(row_max - top)).mul_(torch.exp(top - col_max))


def _merge_cols(
    x: torch.Tensor, col_max: torch.Tensor, col_sum: torch.Tensor, diag: int, out: torch.Tensor, floor: float | None
) -> torch.Tensor:
    """Merge rows ``x`` (r, M) into the running column statistics, updated in place.

    ``col_sum`` holds sum_i exp(x_ij - col_max_j) over the rows seen so far, leaving out the
    entries on diagonal ``diag`` of ``x`` (the positives, added back exactly at the end).

    Returns:
        (M,) how much each column maximum grew (+inf where a column had no rows yet).
    """
    grow = _merge(col_max, col_sum, torch.maximum(col_max, x.amax(dim=0)))
    p = _exp_sub(x, col_max, out[: x.shape[0]], floor)
    p.diagonal(diag).zero_()
    col_sum.add_(p.sum(dim=0))
    return grow


def infonce_fwd(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int, w_row: float, w_col: float, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE loss (see ``reference.infonce``) and its statistics.

    Where a block's logit range is moderate (max - min above the exp floor, as for random-like
    logits at scale <= ~80) no exponent can underflow: the column sums are then GEMVs over the
    row pass's exponentials (one exp per logit); otherwise each column gets its own exp pass.

    Returns:
        loss (0-d), lse_r (N,) row log-sum-exp, lse_c (M,) column log-sum-exp (compute dtype).
    """
    a_c, b_c = _compute(a), _compute(b)
    n, m = a_c.shape[0], b_c.shape[0]
    s = scale.to(a_c.dtype)
    span = _span(a_c, b_c, s)
    pos, row_max, row_rest = (a_c.new_empty(n) for _ in range(3))
    col_max, col_sum = a_c.new_full((m,), -math.inf), a_c.new_zeros(m)
    (buf,) = _buffers(1, n, m, block, a_c, FORWARD_ELEMENTS)
    scratch = _scratch(n, m, block, a_c, FORWARD_ELEMENTS)
    for r0, r1 in _blocks(n, m, block, FORWARD_ELEMENTS):
        logits = torch.mm(a_c[r0:r1] * s, b_c.T, out=buf[: r1 - r0])
        pos[r0:r1] = logits.diagonal(r0 + offset)
        row_max[r0:r1] = logits.amax(dim=1)
        floor = _block_floor(a_c.dtype, span, row_max[r0:r1].max().item(), logits)
        for c0, c1 in _chunks(r1 - r0, m):
            x, rows, diag = logits[c0:c1], slice(r0 + c0, r0 + c1), r0 + c0 + offset
            if floor is None:
                _merge(col_max, col_sum, torch.maximum(col_max, x.amax(dim=0)))
            else:
                _merge_cols(x, col_max, col_sum, diag, scratch, floor)
            p = _exp_sub(x, row_max[rows, None], x, floor)  # in place: the block is not needed again
            p.diagonal(diag).zero_()
            row_rest[rows] = p.sum(dim=1)
            if floor is None:
                col_sum.add_(_col_sums_gemv(p, row_max[rows], col_max))
    # Per-row and per-column lse - pos, exact for small losses (see the module docstring).
    gap_r = row_max - pos
    term_r = _log_sum(gap_r, row_rest).add_(gap_r)
    cols = slice(offset, offset + n)
    gap_c = col_max[cols] - pos
    term_c = _log_sum(gap_c, col_sum[cols]).add_(gap_c)
    lse_c = col_sum.log_().add_(col_max)
    lse_c[cols] = pos + term_c
    loss = w_row * term_r.double().mean() + w_col * term_c.double().mean()
    return loss.to(a.dtype), pos + term_r, lse_c


def infonce_bwd(
    grad: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    lse_r: torch.Tensor,
    lse_c: torch.Tensor,
    offset: int,
    w_row: float,
    w_col: float,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``infonce_fwd``'s loss: (da (N, D), db (M, D), dscale (0-d)).

    dL/dlogits = w_row/N (softmax_rows - onehot) + w_col/N (softmax_cols - onehot), restricted
    to the columns that hold a positive for the column term; each block is recomputed.
    """
    a_c, b_c = _compute(a), _compute(b)
    n, m = a_c.shape[0], b_c.shape[0]
    s = scale.to(a_c.dtype)
    row_shift = lse_r + _neg_log(w_row / n)
    # Columns without a positive have no column term (their exp(floor) is below any gradient's resolution).
    col_shift = torch.full_like(lse_c, math.inf)
    col_shift[offset : offset + n] = lse_c[offset : offset + n] + _neg_log(w_col / n)
    span, top = _span(a_c, b_c, s), _top(row_shift, col_shift)
    da, db = torch.empty_like(a_c), torch.zeros_like(b_c)
    dscale = a_c.new_zeros(())
    (buf,), scratch = _buffers(1, n, m, block, a_c), _scratch(n, m, block, a_c)
    for r0, r1 in _blocks(n, m, block):
        a_blk = a_c[r0:r1]
        g = torch.mm(a_blk * s, b_c.T, out=buf[: r1 - r0])
        floor = _block_floor(a_c.dtype, span, top, g)
        for c0, c1 in _chunks(r1 - r0, m):
            chunk = g[c0:c1]
            p = _exp_sub(chunk, row_shift[r0 + c0 : r0 + c1, None], scratch[: c1 - c0], floor)
            _exp_sub(chunk, col_shift, chunk, floor).add_(p)
        g.diagonal(r0 + offset).sub_((w_row + w_col) / n)
        gb = g @ b_c
        dscale += (gb * a_blk).sum()
        da[r0:r1] = gb.mul_(s)
        db.addmm_(g.T, a_blk)
    del buf, scratch  # free the block buffers before the last O(N D) work
    grad = grad.to(a_c.dtype)
    # In place: out-of-place products would hold a second copy of both gradients at the peak.
    da.mul_(grad)
    db.mul_(s * grad)
    return da.to(a.dtype), db.to(b.dtype), (dscale * grad).to(scale.dtype)


def siglip_fused(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int, block: int, with_grad: bool
) -> tuple[torch.Tensor, ...]:
    """Sigmoid loss and, with ``with_grad``, its gradients in the same sweep (3 GEMM passes).

    loss = -sum logsigmoid(y z) / N with z = scale a b^T + bias: softplus(z) on negatives,
    softplus(-z) on positives (taken from the diagonal of the same block), summed in fp64;
    dL/dz = (sigmoid(z) - onehot) / N needs no global statistics.

    Returns:
        (loss,) or (loss, da (N, D), db (M, D), dscale, dbias).
    """
    a_c, b_c = _compute(a), _compute(b)
    n, m = a_c.shape[0], b_c.shape[0]
    s, c = scale.to(a_c.dtype), bias.to(a_c.dtype)
    total = a_c.new_zeros((), dtype=torch.float64)
    if with_grad:
        da, db = torch.empty_like(a_c), torch.zeros_like(b_c)
        dscale, dbias = a_c.new_zeros(()), a_c.new_zeros(())
    (buf,), scratch = _buffers(1, n, m, block, a_c), _scratch(n, m, block, a_c)
    for r0, r1 in _blocks(n, m, block):
        a_blk = a_c[r0:r1]
        z = torch.mm(a_blk * s, b_c.T, out=buf[: r1 - r0]).add_(c)
        for c0, c1 in _chunks(r1 - r0, m):
            # softplus into the scratch buffer (the public F.softplus has no out=).
            sp = torch._C._nn.softplus(z[c0:c1], 1.0, 20.0, out=scratch[: c1 - c0])
            diag = r0 + c0 + offset
            sp.diagonal(diag).copy_(torch._C._nn.softplus(-z[c0:c1].diagonal(diag), 1.0, 20.0))
            total += sp.sum()
        if not with_grad:
            continue
        g = torch.sigmoid(z, out=z)
        g.diagonal(r0 + offset).sub_(1.0)
        dbias += g.sum()
        gb = g @ b_c
        dscale += (gb * a_blk).sum()
        da[r0:r1] = gb.mul_(s)
        db.addmm_(g.T, a_blk)
    del buf, scratch
    loss = (total / n).to(a.dtype)
    if not with_grad:
        return (loss,)
    db.mul_(s / n)
    da.div_(n)
    return (loss, da.to(a.dtype), db.to(b.dtype), (dscale / n).to(scale.dtype), (dbias / n).to(bias.dtype))


def topk(queries: torch.Tensor, keys: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``queries @ keys.T`` per row, one (rows, M) block at a time.

    Returns:
        scores (N, k) in the queries' dtype and indices (N, k) int64, best first.
    """
    q_c, k_c = _compute(queries), _compute(keys)
    n, m = q_c.shape[0], k_c.shape[0]
    scores = q_c.new_empty(n, k)
    indices = torch.empty(n, k, dtype=torch.long, device=q_c.device)
    (buf,) = _buffers(1, n, m, block, q_c)
    for r0, r1 in _blocks(n, m, block):
        sim = torch.mm(q_c[r0:r1], k_c.T, out=buf[: r1 - r0])
        torch.topk(sim, k, dim=1, out=(scores[r0:r1], indices[r0:r1]))
    return scores.to(queries.dtype), indices
