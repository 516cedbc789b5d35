"""Tiled backend: the losses over row blocks of the logit matrix, O(N + M) extra memory.

Plain PyTorch. A forward sweep over row blocks keeps only per-row and per-column statistics
(log-sum-exp, running column maxima as in flash attention's online softmax); the backward
recomputes each block from the embeddings. GEMM-sized passes: InfoNCE 1 forward + 3 backward;
SigLIP 3 in one fused pass (it needs no global statistics); KD 2 + 4 (student and teacher blocks).
Blocks go through one preallocated buffer (``out=``, updated in place) so the sweep does not
fault in fresh pages; where an op needs a second (rows, M) operand it works in row chunks of
a small scratch buffer instead, which keeps the peak near one block.
Functions here take and return plain tensors; autograd lives in ``_tiled_ops``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

#: Elements per (rows, M) block buffer: 16 Mi floats = 64 MiB in fp32 (large GEMMs run faster).
BLOCK_ELEMENTS = 1 << 24
#: Elements per row chunk of the scratch buffer: half a block. Fewer, larger ops matter on a
#: busy CPU (each op wakes the thread pool); smaller chunks measured up to 20% slower.
CHUNK_ELEMENTS = 1 << 23


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


def _chunks(rows: int, m: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(m, 1))
    for c0 in range(0, rows, step):
        yield c0, min(rows, c0 + step)


def _scratch(n: int, m: int, block: int, like: torch.Tensor) -> torch.Tensor:
    rows = max(r1 - r0 for r0, r1 in _blocks(n, m, block))
    return like.new_empty(min(rows, max(1, CHUNK_ELEMENTS // max(m, 1))), m)


def _neg_log(w: float) -> float:
    """-log(w), +inf for w == 0: subtracting it inside exp() folds the weight into the exponent."""
    return math.inf if w == 0 else -math.log(w)


def _tiny(dtype: torch.dtype) -> float:
    # Column sums below this may have lost their largest term to underflow (see _fix_underflow).
    return 1e-25 if dtype == torch.float32 else 1e-280


def _fix_underflow(
    top: torch.Tensor,
    sums: torch.Tensor,
    recompute: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Per-column reference maxima for column sums taken relative to the block maximum ``top``.

    The sums are sum_i exp(S_ij - top), taken as GEMVs over the row pass's exponentials
    (w_i = exp(m_row_i - top)) instead of a second exp sweep. A column whose entries all sit far
    below ``top`` underflows there; those (rare) columns are recomputed exactly with
    ``recompute(cols) -> S[:, cols]`` and ``sums`` is fixed in place.

    Returns:
        (M,) the maximum each entry of ``sums`` is relative to.
    """
    maxes = top.expand_as(sums).clone()
    bad = (sums < _tiny(sums.dtype)).nonzero().squeeze(1)
    if bad.numel():
        sub = recompute(bad)
        maxes[bad] = sub.amax(dim=0)
        sums[bad] = torch.exp(sub - maxes[bad]).sum(dim=0)
    return maxes


def _merge_cols(col_max: torch.Tensor, col_sum: torch.Tensor, maxes: torch.Tensor, sums: torch.Tensor) -> None:
    """Online softmax merge of a block's (maxes, sums) into the running column state."""
    new_max = torch.maximum(col_max, maxes)
    col_sum.mul_(torch.exp(col_max - new_max)).add_(sums * torch.exp(maxes - new_max))
    col_max.copy_(new_max)


def infonce_fwd(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int, w_row: float, w_col: float, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE loss (see ``reference.infonce``) and its statistics.

    Returns:
        loss (0-d), lse_r (N,) row log-sum-exp, lse_c (M,) column log-sum-exp (compute dtype).
    """
    a_c, b_c = _compute(a), _compute(b)
    n, m = a_c.shape[0], b_c.shape[0]
    s = scale.to(a_c.dtype)
    lse_r = a_c.new_empty(n)
    col_max, col_sum = a_c.new_full((m,), -math.inf), a_c.new_zeros(m)
    # The forward holds one buffer and no gradients yet, so it can take blocks twice as large.
    (buf,) = _buffers(1, n, m, block, a_c, 2 * BLOCK_ELEMENTS)
    for r0, r1 in _blocks(n, m, block, 2 * BLOCK_ELEMENTS):
        a_blk = a_c[r0:r1] * s
        logits = torch.mm(a_blk, b_c.T, out=buf[: r1 - r0])
        row_max = logits.amax(dim=1)
        probs = logits.sub_(row_max[:, None]).exp_()  # in place: the block is not needed again
        lse_r[r0:r1] = probs.sum(dim=1).log_().add_(row_max)
        top = row_max.max()
        sums = torch.mv(probs.T, torch.exp(row_max - top))
        maxes = _fix_underflow(top, sums, lambda cols, x=a_blk: x @ b_c[cols].T)
        _merge_cols(col_max, col_sum, maxes, sums)
    lse_c = col_sum.log_().add_(col_max)
    # Positive logits are N dot products: O(N D), no need to fish them out of the blocks.
    pos = (a_c * b_c[offset : offset + n]).sum(dim=1) * s
    loss = w_row * (lse_r - pos).mean() + w_col * (lse_c[offset : offset + n] - pos).mean()
    return loss.to(a.dtype), lse_r, lse_c


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
    col_shift = torch.full_like(lse_c, math.inf)  # columns without a positive have no column term
    col_shift[offset : offset + n] = lse_c[offset : offset + n] + _neg_log(w_col / n)
    da, db = torch.empty_like(a_c), torch.zeros_like(b_c)
    dscale = a_c.new_zeros(())
    (buf,), scratch = _buffers(1, n, m, block, a_c), _scratch(n, m, block, a_c)
    for r0, r1 in _blocks(n, m, block):
        a_blk = a_c[r0:r1]
        g = torch.mm(a_blk * s, b_c.T, out=buf[: r1 - r0])
        for c0, c1 in _chunks(r1 - r0, m):
            chunk = g[c0:c1]
            p = torch.sub(chunk, row_shift[r0 + c0 : r0 + c1, None], out=scratch[: c1 - c0]).exp_()
            chunk.sub_(col_shift).exp_().add_(p)
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

    loss = (sum softplus(z) - sum_pos z) / N with z = scale a b^T + bias, which equals
    -sum logsigmoid(y z) / N; dL/dz = (sigmoid(z) - onehot) / N needs no global statistics.

    Returns:
        (loss,) or (loss, da (N, D), db (M, D), dscale, dbias).
    """
    a_c, b_c = _compute(a), _compute(b)
    n, m = a_c.shape[0], b_c.shape[0]
    s, c = scale.to(a_c.dtype), bias.to(a_c.dtype)
    total = a_c.new_zeros(())
    if with_grad:
        da, db = torch.empty_like(a_c), torch.zeros_like(b_c)
        dscale, dbias = a_c.new_zeros(()), a_c.new_zeros(())
    (buf,), scratch = _buffers(1, n, m, block, a_c), _scratch(n, m, block, a_c)
    for r0, r1 in _blocks(n, m, block):
        a_blk = a_c[r0:r1]
        z = torch.mm(a_blk * s, b_c.T, out=buf[: r1 - r0]).add_(c)
        for c0, c1 in _chunks(r1 - r0, m):
            # softplus into the scratch buffer (the public F.softplus has no out=).
            total += torch._C._nn.softplus(z[c0:c1], 1.0, 20.0, out=scratch[: c1 - c0]).sum()
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
    pos = (a_c * b_c[offset : offset + n]).sum(dim=1) * s + c
    loss = ((total - pos.sum()) / n).to(a.dtype)
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
