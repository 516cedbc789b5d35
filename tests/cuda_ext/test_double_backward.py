"""Second-order gradients of the similarity ops: tiled/CUDA raise a clear error, reference is exact.

The ``*_bwd`` ops (and SigLIP's in-sweep gradients) have an autograd rule that raises on a
second backward; first-order gradients, with or without ``create_graph=True``, are unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.optests.generate_tests import OpCheckError

from distill.cuda_ext import _registry, infonce_loss, kd_loss, siglip_loss

HAS_CUDA = torch.cuda.is_available()
#: Every opcheck test except the one that differentiates the op's outputs (a double backward for a ``*_bwd`` op).
NO_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")
MATCH = r"does not support double backward \(create_graph=True.*backend='reference'"


def _unit(n: int, d: int, seed: int, device: str = "cpu", grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.to(device).requires_grad_(grad)


def _batch(n: int = 6, m: int = 9, device: str = "cpu"):
    def scalar(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float64, device=device, requires_grad=True)

    return (
        _unit(n, 4, 0, device),
        _unit(m, 4, 1, device),
        _unit(n, 3, 2, device, False),
        _unit(m, 3, 3, device, False),
        scalar(7.0),
        scalar(-2.0),
    )


def _losses(backend: str, block: int = 4):
    """(name, fn(a, b, ta, tb, s, c) -> loss) for the three losses on one backend (N=6 != M=9 for siglip/kd)."""
    kw = dict(backend=backend, block_rows=block)
    return [
        ("infonce", lambda a, b, ta, tb, s, c: infonce_loss(a, b, s, offset=2, **kw)),
        ("siglip", lambda a, b, ta, tb, s, c: siglip_loss(a, b, s, c, offset=1, **kw)),
        ("kd", lambda a, b, ta, tb, s, c: kd_loss(a, b, ta, tb, s, 5.0, **kw)),
        (
            "kd_ce",  # open_clip's DistillClipLoss: soft cross entropy plus the contrastive term (N == M)
            lambda a, b, ta, tb, s, c: kd_loss(a, b[:6], ta, tb[:6], s, 5.0, kind="ce", contrastive_weight=1.0, **kw),
        ),
    ]


@pytest.mark.parametrize("name", ["infonce", "siglip", "kd", "kd_ce"])
def test_tiled_first_order_unchanged_with_create_graph(name):
    batch = _batch()
    a, b, s = batch[0], batch[1], batch[4]
    ref = dict(_losses("reference"))[name]
    fn = dict(_losses("tiled"))[name]
    want = torch.autograd.grad(ref(*batch), (a, b, s))
    plain = torch.autograd.grad(fn(*batch), (a, b, s))
    graph = torch.autograd.grad(fn(*batch), (a, b, s), create_graph=True)
    for w, p, g in zip(want, plain, graph):
        torch.testing.assert_close(p, w, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g.detach(), p, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda a, b, s: fn(a, b, batch[2], batch[3], s, batch[5]), (a, b, s))


@pytest.mark.parametrize("name", ["infonce", "siglip", "kd", "kd_ce"])
def test_tiled_second_backward_raises(name):
    batch = _batch()
    a, b, s = batch[0], batch[1], batch[4]
    loss = dict(_losses("tiled"))[name](*batch)
    ga, _, gs = torch.autograd.grad(loss, (a, b, s), create_graph=True)
    with pytest.raises(RuntimeError, match=MATCH):
        torch.autograd.grad(ga.pow(2).sum(), a)
    # A gradient penalty added to the loss must fail too, not silently lose its second-order term.
    loss = dict(_losses("tiled"))[name](*batch)
    (gs,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match=MATCH):
        (loss + gs.square()).backward()


def test_siglip_loss_only_forward_second_backward_raises():
    """The op called without ``with_grad`` recomputes the gradients in the backward: same rule."""
    a, b, _, _, s, c = _batch()
    loss = torch.ops.distill_tiled.siglip(a, b, s, c, 1, 4, False)[0]
    (ga,) = torch.autograd.grad(loss, a, create_graph=True)
    with pytest.raises(RuntimeError, match=r"distill_tiled::siglip does not support double backward"):
        ga.sum().backward()


@pytest.mark.parametrize("name", ["infonce", "siglip", "kd", "kd_ce"])
def test_reference_second_derivative(name):
    batch = _batch()
    fn = dict(_losses("reference"))[name]
    rest = (batch[2], batch[3], batch[5])
    args = (batch[0], batch[1], batch[4])
    assert torch.autograd.gradgradcheck(lambda a, b, s: fn(a, b, rest[0], rest[1], s, rest[2]), args)


def test_reference_second_derivative_in_scale_by_hand():
    """d2/ds2 of the row term of InfoNCE (N = M, offset 0) is the mean softmax variance of the cosines."""
    a, b, _, _, s, _ = _batch(5, 5)
    loss = infonce_loss(a, b, s, row_weight=1.0, col_weight=0.0, backend="reference")
    (gs,) = torch.autograd.grad(loss, s, create_graph=True)
    (hss,) = torch.autograd.grad(gs, s)
    cos = (a @ b.T).detach()
    p = torch.softmax(s.detach() * cos, dim=1)
    want = ((p * cos**2).sum(1) - (p * cos).sum(1) ** 2).mean()
    torch.testing.assert_close(hss, want, rtol=1e-10, atol=1e-12)


def _bwd_op_args(device: str = "cpu"):
    """opcheck arguments of the backward ops with requires-grad inputs (grad, embeddings, scale, stats)."""
    a, b, ta, tb, s, _ = _batch(device=device)
    ops = getattr(torch.ops, "distill_cuda" if device == "cuda" else "distill_tiled")
    ts = torch.tensor(5.0, dtype=torch.float64, device=device)
    _, lse_r, lse_c = ops.infonce_fwd(a, b, s, 2, 0.5, 0.5, 4)
    _, stats = ops.kd_fwd(a, b, ta, tb, s, ts, 0.5, 0.5, 0.0, "kl", 4)
    assert not (lse_r.requires_grad or lse_c.requires_grad or stats.requires_grad)  # marked non-differentiable
    grad = torch.tensor(1.0, dtype=torch.float64, device=device, requires_grad=True)
    lse_r, lse_c, stats = (t.detach().requires_grad_() for t in (lse_r, lse_c, stats))
    return [
        (ops.infonce_bwd, (grad, a, b, s, lse_r, lse_c, 2, 0.5, 0.5, 4)),
        (ops.kd_bwd, (grad, a, b, ta, tb, s, ts, stats, 0.5, 0.5, 0.0, 4)),
    ]


def test_opcheck_backward_ops_with_requires_grad_inputs():
    """opcheck passes; only test_aot_dispatch_dynamic, which differentiates the ``*_bwd`` op, hits the clear error."""
    for op, args in _bwd_op_args():
        torch.library.opcheck(op, args, test_utils=NO_AOT)
        detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
        torch.library.opcheck(op, detached)  # all four tests, aot_dispatch_dynamic included
        with pytest.raises(OpCheckError, match=MATCH):
            torch.library.opcheck(op, args, test_utils="test_aot_dispatch_dynamic")


def test_opcheck_forward_ops_with_requires_grad_inputs():
    """Forward ops keep passing every opcheck test now that their auxiliary outputs are non-differentiable."""
    a, b, ta, tb, s, c = _batch()
    ops = torch.ops.distill_tiled
    ts = torch.tensor(5.0, dtype=torch.float64)
    for op, args in [
        (ops.infonce_fwd, (a, b, s, 2, 0.5, 0.5, 4)),
        (ops.siglip, (a, b, s, c, 1, 4, True)),
        (ops.siglip, (a, b, s, c, 1, 4, False)),
        (ops.kd_fwd, (a, b, ta, tb, s, ts, 0.5, 0.5, 0.0, "kl", 4)),
    ]:
        torch.library.opcheck(op, args)
        assert not any(t.requires_grad for t in op(*args)[1:])


def test_error_message_names_op():
    assert str(_registry._double_backward_error("distill_tiled::kd_bwd")).startswith(
        "distill_tiled::kd_bwd does not support double backward (create_graph=True"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_double_backward_raises_and_opcheck():
    batch = _batch(device="cuda")
    a, s = batch[0], batch[4]
    for _, fn in _losses("cuda"):
        (ga,) = torch.autograd.grad(fn(*batch), a, create_graph=True)
        with pytest.raises(RuntimeError, match=r"distill_cuda::\w+ " + MATCH):
            torch.autograd.grad(ga.sum(), (a, s))
    for op, args in _bwd_op_args("cuda"):
        torch.library.opcheck(op, args, test_utils=NO_AOT)
