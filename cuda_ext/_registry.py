"""Fake (meta) kernels and autograd rules shared by the tiled and CUDA custom ops.

Both backends expose the same op schemas under their own namespace (``distill_tiled`` in Python,
``distill_cuda`` from C++); this file registers, for a namespace, the shape functions that
``torch.compile`` and ``opcheck`` need and the backward formulas that call the ``*_bwd`` ops.

Second-order gradients are not supported by these backends: the ``*_bwd`` ops and SigLIP's
in-sweep gradients get an autograd rule that raises :data:`DOUBLE_BACKWARD_HINT` when a second
backward reaches them (``create_graph=True`` alone, and first-order gradients, still work). The
auxiliary outputs (log-sum-exp statistics, SigLIP's gradients) are marked non-differentiable.
The ``reference`` backend is plain torch and has exact higher-order gradients.
"""

from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _fake_infonce_fwd(a, b, scale, offset, w_row, w_col, block):
    return a.new_empty(()), a.new_empty(a.shape[0], dtype=_acc(a)), a.new_empty(b.shape[0], dtype=_acc(a))


def _fake_infonce_bwd(grad, a, b, scale, lse_r, lse_c, offset, w_row, w_col, block):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)


def _fake_siglip(a, b, scale, bias, offset, block, with_grad):
    if not with_grad:
        empty = a.new_empty(0)
        return a.new_empty(()), empty, empty.clone(), empty.clone(), empty.clone()
    return a.new_empty(()), torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale), torch.empty_like(bias)


def _fake_kd_fwd(a, b, ta, tb, scale, teacher_scale, w_row, w_col, contrastive_weight, kind, block):
    return a.new_empty(()), a.new_empty(4, max(a.shape[0], b.shape[0]), dtype=_acc(a))


def _fake_kd_bwd(grad, a, b, ta, tb, scale, teacher_scale, stats, w_row, w_col, contrastive_weight, block):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)


def _fake_topk(queries, keys, k, block):
    n = queries.shape[0]
    return queries.new_empty(n, k), queries.new_empty(n, k, dtype=torch.long)


FAKES = {
    "infonce_fwd": _fake_infonce_fwd,
    "infonce_bwd": _fake_infonce_bwd,
    "siglip": _fake_siglip,
    "kd_fwd": _fake_kd_fwd,
    "kd_bwd": _fake_kd_bwd,
    "topk": _fake_topk,
}


#: Raised (after the op name) when a second-order gradient reaches a tiled/CUDA op.
DOUBLE_BACKWARD_HINT = (
    "does not support double backward (create_graph=True followed by a second backward): use "
    "backend='reference' for second-order gradients (e.g. gradient penalties, Hessian-vector products)"
)


def _double_backward_error(op: str) -> RuntimeError:
    return RuntimeError(f"{op} {DOUBLE_BACKWARD_HINT}")


def _no_double_backward(op: str):
    """Autograd rule for a ``*_bwd`` op: it is only ever differentiated by a second backward."""

    def backward(ctx, *grads):
        raise _double_backward_error(op)

    return backward


class _FirstOrderOnly(torch.autograd.Function):
    """SigLIP's gradients ``grads * grad_out`` as a node whose own backward (second order) raises.

    They come out of the forward sweep, not a ``*_bwd`` op, so under ``create_graph=True`` this
    node, tied to the op's inputs, is what a second backward meets.
    """

    @staticmethod
    def forward(ctx, op: str, grad_out: torch.Tensor, inputs: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.op = op
        return tuple(g * grad_out for g in tensors[inputs:])

    @staticmethod
    def backward(ctx, *unused):
        raise _double_backward_error(ctx.op)


def _infonce_setup(ctx, inputs, output):
    a, b, scale, offset, w_row, w_col, block = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(a, b, scale, output[1], output[2])
    ctx.args = (offset, w_row, w_col, block)


def _siglip_setup(ctx, inputs, output):
    a, b, scale, bias, offset, block, with_grad = inputs
    # With with_grad the forward already produced the gradients; otherwise keep the inputs and
    # recompute in the backward (e.g. opcheck, or a caller that asked for the loss only).
    # The inputs are kept either way (references, no copy) to tie a create_graph=True result to them.
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(a, b, scale, bias, *(output[1:] if with_grad else ()))
    ctx.args = (offset, block, with_grad)


def _kd_setup(ctx, inputs, output):
    a, b, ta, tb, scale, teacher_scale, w_row, w_col, cw, _kind, block = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(a, b, ta, tb, scale, teacher_scale, output[1])
    ctx.args = (w_row, w_col, cw, block)


def register(namespace: str, ops: dict[str, object] | None = None) -> None:
    """Register fake kernels and autograd for the ops ``<namespace>::{infonce_fwd, ...}``.

    Args:
        namespace: ``distill_tiled``, ``distill_cuda`` or ``distill_cuda_fused``.
        ops: Python ``custom_op`` objects by name (tiled); None for C++ ops found in torch.ops.
    """
    lib_ops = getattr(torch.ops, namespace)
    for name, fake in FAKES.items():
        if ops is not None:
            ops[name].register_fake(fake)
        else:
            torch.library.register_fake(f"{namespace}::{name}", fake)

    def infonce_backward(ctx, grad, *unused):
        a, b, scale, lse_r, lse_c = ctx.saved_tensors
        da, db, dscale = lib_ops.infonce_bwd(grad, a, b, scale, lse_r, lse_c, *ctx.args)
        return da, db, dscale, None, None, None, None

    def siglip_backward(ctx, grad, *unused):
        offset, block, with_grad = ctx.args
        inputs, grads = ctx.saved_tensors[:4], ctx.saved_tensors[4:]
        if not with_grad:
            with torch.no_grad():
                grads = lib_ops.siglip(*inputs, offset, block, True)[1:]
        if torch.is_grad_enabled():  # create_graph=True: a second backward must fail loudly, not drop terms
            grads = _FirstOrderOnly.apply(f"{namespace}::siglip", grad, len(inputs), *inputs, *grads)
        else:
            grads = tuple(g * grad for g in grads)
        return (*grads, None, None, None)

    def kd_backward(ctx, grad, *unused):
        a, b, ta, tb, scale, teacher_scale, stats = ctx.saved_tensors
        da, db, dscale = lib_ops.kd_bwd(grad, a, b, ta, tb, scale, teacher_scale, stats, *ctx.args)
        return da, db, None, None, dscale, None, None, None, None, None, None

    for name, backward, setup in (
        ("infonce_fwd", infonce_backward, _infonce_setup),
        ("siglip", siglip_backward, _siglip_setup),
        ("kd_fwd", kd_backward, _kd_setup),
    ):
        target = ops[name] if ops is not None else f"{namespace}::{name}"
        torch.library.register_autograd(target, backward, setup_context=setup)
    for name in ("infonce_bwd", "kd_bwd"):
        target = ops[name] if ops is not None else f"{namespace}::{name}"
        torch.library.register_autograd(target, _no_double_backward(f"{namespace}::{name}"))
