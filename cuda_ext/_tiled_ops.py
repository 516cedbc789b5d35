"""The tiled backend registered as torch custom ops (``torch.ops.distill_tiled.*``).

Custom ops make the tiled path opaque to ``torch.compile`` (no graph breaks inside the Python
block loop) and let ``torch.library.opcheck`` test it on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _registry, tiled, tiled_kd


@torch.library.custom_op("distill_tiled::infonce_fwd", mutates_args=())
def infonce_fwd(
    a: Tensor, b: Tensor, scale: Tensor, offset: int, w_row: float, w_col: float, block: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric InfoNCE: (loss, row lse (N,), column lse (M,))."""
    return tiled.infonce_fwd(a, b, scale, offset, w_row, w_col, block)


@torch.library.custom_op("distill_tiled::infonce_bwd", mutates_args=())
def infonce_bwd(
    grad: Tensor,
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    lse_r: Tensor,
    lse_c: Tensor,
    offset: int,
    w_row: float,
    w_col: float,
    block: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``infonce_fwd``: (da, db, dscale)."""
    return tiled.infonce_bwd(grad, a, b, scale, lse_r, lse_c, offset, w_row, w_col, block)


@torch.library.custom_op("distill_tiled::siglip", mutates_args=())
def siglip(
    a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, offset: int, block: int, with_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sigmoid loss with its gradients computed in the same sweep when ``with_grad``.

    Returns:
        (loss, da, db, dscale, dbias); the gradients are empty (0,) tensors without ``with_grad``.
    """
    out = tiled.siglip_fused(a, b, scale, bias, offset, block, with_grad)
    if with_grad:
        return out
    empty = a.new_empty(0)
    return out[0], empty, empty.clone(), empty.clone(), empty.clone()


@torch.library.custom_op("distill_tiled::kd_fwd", mutates_args=())
def kd_fwd(
    a: Tensor,
    b: Tensor,
    ta: Tensor,
    tb: Tensor,
    scale: Tensor,
    teacher_scale: Tensor,
    w_row: float,
    w_col: float,
    contrastive_weight: float,
    kind: str,
    block: int,
) -> tuple[Tensor, Tensor]:
    """Teacher-student KL (or soft cross entropy): (loss, stats (4, max(N, M)))."""
    return tiled_kd.kd_fwd(a, b, ta, tb, scale, teacher_scale, w_row, w_col, contrastive_weight, kind, block)


@torch.library.custom_op("distill_tiled::kd_bwd", mutates_args=())
def kd_bwd(
    grad: Tensor,
    a: Tensor,
    b: Tensor,
    ta: Tensor,
    tb: Tensor,
    scale: Tensor,
    teacher_scale: Tensor,
    stats: Tensor,
    w_row: float,
    w_col: float,
    contrastive_weight: float,
    block: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Student gradients of ``kd_fwd``: (da, db, dscale)."""
    return tiled_kd.kd_bwd(grad, a, b, ta, tb, scale, teacher_scale, stats, w_row, w_col, contrastive_weight, block)


@torch.library.custom_op("distill_tiled::topk", mutates_args=())
def topk(queries: Tensor, keys: Tensor, k: int, block: int) -> tuple[Tensor, Tensor]:
    """Top-k of ``queries @ keys.T`` per row without the (N, M) matrix: ((N, k), (N, k) int64)."""
    return tiled.topk(queries, keys, k, block)


OPS = {
    "infonce_fwd": infonce_fwd,
    "infonce_bwd": infonce_bwd,
    "siglip": siglip,
    "kd_fwd": kd_fwd,
    "kd_bwd": kd_bwd,
    "topk": topk,
}
_registry.register("distill_tiled", OPS)
