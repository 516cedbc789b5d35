"""Similarity engine (distill.cuda_ext): values, gradients, custom-op checks, errors, CUDA build."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, DistillClipLoss, SigLipLoss

from distill import cuda_ext
from distill.cuda_ext import _build, infonce_loss, kd_loss, siglip_loss, similarity_topk

CPU_BACKENDS = ["reference", "tiled"]
HAS_CUDA = torch.cuda.is_available()


def _unit(n: int, d: int, seed: int, dtype=torch.float64, device="cpu", grad=True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.to(device=device, dtype=dtype).requires_grad_(grad)


def _scalar(v: float, dtype=torch.float64, device="cpu") -> torch.Tensor:
    return torch.tensor(v, dtype=dtype, device=device, requires_grad=True)


def _batch(n=12, m=12, d=8, dt=5, dtype=torch.float64, device="cpu"):
    return (
        _unit(n, d, 0, dtype, device),
        _unit(m, d, 1, dtype, device),
        _unit(n, dt, 2, dtype, device, False),
        _unit(m, dt, 3, dtype, device, False),
        _scalar(7.0, dtype, device),
        _scalar(-2.0, dtype, device),
    )


def _close(x, y, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_values_match_open_clip(backend):
    a, b, ta, tb, s, c = _batch()
    _close(infonce_loss(a, b, s, backend=backend, block_rows=5), ClipLoss()(a, b, s))
    _close(siglip_loss(a, b, s, c, backend=backend, block_rows=5), SigLipLoss()(a, b, s, c))
    t_scale = torch.tensor(20.0, dtype=torch.float64)
    ours = kd_loss(a, b, ta, tb, s, t_scale, kind="ce", contrastive_weight=1.0, backend=backend, block_rows=5)
    _close(ours, sum(DistillClipLoss()(a, b, s, ta, tb, t_scale)))
    for x, y in zip(
        torch.autograd.grad(ours, (a, b, s)),
        torch.autograd.grad(sum(DistillClipLoss()(a, b, s, ta, tb, t_scale)), (a, b, s)),
    ):
        _close(x, y)


@pytest.mark.parametrize("n,m,offset", [(12, 12, 0), (7, 19, 5)])
@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_tiled_equals_reference_rectangular_and_offsets(n, m, offset, kind):
    a, b, ta, tb, s, c = _batch(n, m)
    cases = [
        lambda be: infonce_loss(a, b, s, offset=offset, row_weight=0.3, col_weight=0.9, backend=be, block_rows=4),
        lambda be: siglip_loss(a, b, s, c, offset=offset, backend=be, block_rows=4),
        lambda be: kd_loss(a, b, ta, tb, s, 11.0, row_weight=0.4, col_weight=0.8, kind=kind, backend=be, block_rows=4),
    ]
    for fn in cases:
        ref, tiled = fn("reference"), fn("tiled")
        _close(tiled, ref)
        for x, y in zip(torch.autograd.grad(tiled, (a, b, s)), torch.autograd.grad(ref, (a, b, s))):
            _close(x, y)


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_tiled_kd_equals_reference_with_more_rows_than_columns(kind):
    """Rows past the last column have no diagonal entry (nothing left out of their sums)."""
    a, b, ta, tb, s, _ = _batch(19, 7)
    ref = kd_loss(a, b, ta, tb, s, 11.0, row_weight=0.4, col_weight=0.8, kind=kind, backend="reference")
    tiled = kd_loss(a, b, ta, tb, s, 11.0, row_weight=0.4, col_weight=0.8, kind=kind, backend="tiled", block_rows=4)
    _close(tiled, ref)
    for x, y in zip(torch.autograd.grad(tiled, (a, b, s)), torch.autograd.grad(ref, (a, b, s))):
        _close(x, y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_fp64(backend):
    a, b, ta, tb, s, c = _batch(6, 9, d=4, dt=3)
    kw = dict(backend=backend, block_rows=4) if backend != "reference" else dict(backend=backend)
    assert torch.autograd.gradcheck(lambda a, b, s: infonce_loss(a, b, s, offset=2, **kw), (a, b, s))
    assert torch.autograd.gradcheck(lambda a, b, s, c: siglip_loss(a, b, s, c, offset=1, **kw), (a, b, s, c))
    assert torch.autograd.gradcheck(lambda a, b, s: kd_loss(a, b, ta, tb, s, 5.0, **kw), (a, b, s))
    a2, b2 = a[:6].detach().clone().requires_grad_(), b[:6].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, s: kd_loss(a, b, ta, tb[:6], s, 5.0, kind="ce", contrastive_weight=0.5, **kw), (a2, b2, s)
    )


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def test_fp32_gradients_at_4096_match_reference():
    """fp32 tiled vs the fp64 reference at N=4096 (D=64 keeps it a few seconds): 1e-5 relative."""
    n, d = 4096, 64
    a64, b64, ta, tb = (_unit(n, d, i) for i in range(4))
    s64, c64 = _scalar(30.0), _scalar(-10.0)
    ta, tb = ta.detach(), tb.detach()
    a32, b32 = (x.detach().float().requires_grad_() for x in (a64, b64))
    s32, c32 = (x.detach().float().requires_grad_() for x in (s64, c64))
    ops = {
        "infonce": (lambda a, b, s, c, be: infonce_loss(a, b, s, backend=be), 3),
        "siglip": (lambda a, b, s, c, be: siglip_loss(a, b, s, c, backend=be), 4),
        "kd": (lambda a, b, s, c, be: kd_loss(a, b, ta.to(a.dtype), tb.to(a.dtype), s, 50.0, backend=be), 3),
    }
    for name, (fn, k) in ops.items():
        ref = fn(a64, b64, s64, c64, "reference")
        ref_g = torch.autograd.grad(ref, (a64, b64, s64, c64)[:k])
        out = fn(a32, b32, s32, c32, "tiled")
        out_g = torch.autograd.grad(out, (a32, b32, s32, c32)[:k])
        assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item()), name
        for i, (x, y) in enumerate(zip(out_g, ref_g)):
            assert _rel(x, y) <= 1e-5, f"{name} grad {i}: {_rel(x, y):.2e}"


def test_columns_far_below_the_block_maximum_stay_exact():
    """A column far below the block maximum (scale 100): per-column running maxima, no underflow."""
    n, d = 64, 8
    a, b = _unit(n, d, 0, grad=False), _unit(n, d, 1, grad=False)
    b[5] = -F.normalize(a.mean(0), dim=0)
    a[0] = b[0]
    for fn in (
        lambda x, y, be: infonce_loss(x, y, 100.0, backend=be, block_rows=16),
        lambda x, y, be: kd_loss(x, y, y.flip(0), x.flip(0), 100.0, 80.0, backend=be, block_rows=16),
    ):
        ref = fn(a, b, "reference")
        got = fn(a.float(), b.float(), "tiled")
        assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_opcheck_tiled_ops():
    a, b, ta, tb, s, c = _batch(6, 9, d=4, dt=3)
    ops = torch.ops.distill_tiled
    ts = torch.tensor(5.0, dtype=torch.float64)
    _, lse_r, lse_c = ops.infonce_fwd(a, b, s, 2, 0.5, 0.5, 4)
    _, stats = ops.kd_fwd(a, b, ta, tb, s, ts, 0.5, 0.5, 0.0, "kl", 4)
    grad = torch.tensor(1.0, dtype=torch.float64)
    detached = [t.detach() for t in (a, b, s)]
    for op, args in [
        (ops.infonce_fwd, (a, b, s, 2, 0.5, 0.5, 4)),
        (ops.infonce_bwd, (grad, *detached, lse_r.detach(), lse_c.detach(), 2, 0.5, 0.5, 4)),
        (ops.siglip, (a, b, s, c, 1, 4, True)),
        (ops.siglip, (a, b, s, c, 1, 4, False)),
        (ops.kd_fwd, (a, b, ta, tb, s, ts, 0.5, 0.5, 0.0, "kl", 4)),
        (ops.kd_bwd, (grad, detached[0], detached[1], ta, tb, detached[2], ts, stats.detach(), 0.5, 0.5, 0.0, 4)),
        (ops.topk, (a.detach(), b.detach(), 3, 4)),
    ]:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    a, b, _, _, s, _ = _batch()
    compiled = torch.compile(lambda a, b, s: infonce_loss(a, b, s, backend="tiled"), fullgraph=True)
    _close(compiled(a, b, s), infonce_loss(a, b, s, backend="reference"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_matches_full_matrix(backend):
    q, k = _unit(50, 8, 0, grad=False), _unit(30, 8, 1, grad=False)
    scores, idx = similarity_topk(q, k, 5, backend=backend, block_rows=7)
    ref = (q @ k.T).topk(5, dim=1)
    _close(scores, ref.values)
    assert torch.equal(idx, ref.indices)


def test_topk_correct_embeds_equals_topk_correct():
    from distill.zeroshot import topk_correct, topk_correct_embeds

    img, bank = _unit(40, 8, 0, grad=False), _unit(6, 8, 1, grad=False)
    labels = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(0))
    ref = topk_correct(img @ bank.T, labels, ks=(1, 3, 10))
    for backend in CPU_BACKENDS:
        got = topk_correct_embeds(img, bank, labels, ks=(1, 3, 10), backend=backend)
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_auto_backend_choice_on_cpu():
    x = torch.zeros(2, 2)
    assert cuda_ext.resolve_backend("auto", x, 64, 64) == "reference"
    assert cuda_ext.resolve_backend("auto", x, 4096, 4096) == "tiled"


def test_objectives_backend_arg_changes_nothing():
    from distill.kd_objectives import AffinityDistillation, InteractiveContrastive, LogitDistillation
    from distill.objectives import InfoNCE, SigLIP

    a, b, ta, tb, s, c = _batch(20, 20, d=8, dt=8)
    out = {
        "image_embeds": a,
        "text_embeds": b,
        "logit_scale": s,
        "logit_bias": c,
        "teacher_image_embeds": ta,
        "teacher_text_embeds": tb,
        "teacher_logit_scale": torch.tensor(9.0, dtype=torch.float64),
        "class_bank": _unit(5, 8, 9, grad=False),
    }
    for cls in (InfoNCE, SigLIP, AffinityDistillation, InteractiveContrastive, LogitDistillation):
        _close(cls(backend="tiled")(out), cls(backend="reference")(out))
    with pytest.raises(ValueError, match="backend must be one of"):
        InfoNCE(backend="triton")


def test_bad_inputs_name_the_tensor():
    a, b, ta, tb, s, c = _batch()
    with pytest.raises(ValueError, match=r"image has D=8, text has D=5"):
        infonce_loss(a, tb, s)
    bad = a.detach().clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="text contains non-finite"):
        siglip_loss(a, bad, s, c)
    with pytest.raises(TypeError, match="text has dtype torch.float32 but image has torch.float64"):
        infonce_loss(a, b.float(), s)
    with pytest.raises(TypeError, match="teacher_image has dtype"):
        kd_loss(a, b, ta.float(), tb, s, 3.0)
    with pytest.raises(ValueError, match="student_text has 12 rows but teacher_text has 5"):
        kd_loss(a, b, ta, tb[:5], s, 3.0)
    with pytest.raises(ValueError, match="N \\+ offset <= M"):
        infonce_loss(a, b, s, offset=3)
    with pytest.raises(ValueError, match="backend must be one of"):
        infonce_loss(a, b, s, backend="gpu")
    with pytest.raises(ValueError, match="k must be in"):
        similarity_topk(a, b, 13)
    if HAS_CUDA:
        with pytest.raises(TypeError, match="text is on cuda"):
            infonce_loss(a, b.cuda(), s)


def test_non_finite_inputs_named_on_direct_calls_only():
    """Direct calls check NaN/inf and name the tensor; check_finite=False (the objectives) leaves it to the caller."""
    a, b, ta, tb, s, c = _batch()
    bad = tb.detach().clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="teacher_text contains non-finite"):
        kd_loss(a, b, ta, bad, s, 3.0)
    assert not torch.isfinite(kd_loss(a, b, ta, bad, s, 3.0, check_finite=False))
    nan = a.detach().clone()
    nan[1, 1] = float("nan")
    for backend in CPU_BACKENDS:
        with pytest.raises(ValueError, match="image contains non-finite"):
            infonce_loss(nan, b, s, backend=backend)
        assert torch.isnan(infonce_loss(nan, b, s, backend=backend, check_finite=False))
        assert torch.isnan(siglip_loss(nan, b, s, c, backend=backend, check_finite=False))
    with pytest.raises(ValueError, match="teacher_image has D=5, teacher_text has D=8"):
        kd_loss(a, b, ta, b.detach(), s, 3.0)


def test_backend_names_checked_in_one_place():
    assert cuda_ext.BACKENDS == ("auto", "reference", "tiled", "cuda", "cuda_fused")
    assert [cuda_ext.check_backend(name) for name in cuda_ext.BACKENDS] == list(cuda_ext.BACKENDS)
    message = r"backend must be one of \('auto', 'reference', 'tiled', 'cuda', 'cuda_fused'\), got 'gpu'"
    with pytest.raises(ValueError, match=message):
        cuda_ext.check_backend("gpu")
    with pytest.raises(ValueError, match=message):
        kd_loss(*_batch(), backend="gpu")


def test_cuda_backend_errors_are_clear():
    a, b, *_ = _batch()
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors.*cpu"):
        infonce_loss(a, b, 1.0, backend="cuda")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="backend='cuda' is not available: no CUDA device"):
            _build.load()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None, reason="needs nvcc and CUDA torch")
def test_cuda_sources_compile(tmp_path, monkeypatch):
    """Compiles csrc/ with nvcc for sm_90 (about a minute on 2 cores); no GPU needed."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setenv("MAX_JOBS", "2")
    _build.build_cuda(tmp_path / "build")
    assert cuda_ext.cuda_is_loaded()
    assert hasattr(torch.ops.distill_cuda, "infonce_fwd")


# ---- GPU: run with `pytest -m gpu tests/test_cuda_ext.py` on a machine with CUDA ----


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_matches_fp64_reference_at_2048(dtype, tol):
    n, d = 2048, 256
    a64, b64, ta, tb = (_unit(n, d, i) for i in range(4))
    s64, c64 = _scalar(30.0), _scalar(-10.0)
    ta, tb = ta.detach(), tb.detach()
    dev = [x.detach().cuda().to(dtype).requires_grad_() for x in (a64, b64)]
    sd, cd = (x.detach().cuda().float().requires_grad_() for x in (s64, c64))
    tad, tbd = ta.cuda().to(dtype), tb.cuda().to(dtype)
    ops = [
        (lambda a, b, s, c, be: infonce_loss(a, b, s, backend=be), 3),
        (lambda a, b, s, c, be: siglip_loss(a, b, s, c, backend=be), 4),
        (
            lambda a, b, s, c, be: kd_loss(
                a, b, *((ta, tb) if be == "reference" else (tad, tbd)), s, 50.0, contrastive_weight=1.0, backend=be
            ),
            3,
        ),
    ]
    for fn, k in ops:
        ref = fn(a64, b64, s64, c64, "reference")
        ref_g = torch.autograd.grad(ref, (a64, b64, s64, c64)[:k])
        out = fn(*dev, sd, cd, "cuda")
        out_g = torch.autograd.grad(out, (*dev, sd, cd)[:k])
        assert abs(out.item() - ref.item()) <= tol * abs(ref.item())
        for x, y in zip(out_g, ref_g):
            assert _rel(x.cpu(), y) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_gradcheck_opcheck_and_topk():
    a, b, ta, tb, s, c = _batch(6, 9, d=4, dt=3, device="cuda")
    kw = dict(backend="cuda", block_rows=4)
    assert torch.autograd.gradcheck(lambda a, b, s: infonce_loss(a, b, s, offset=2, **kw), (a, b, s))
    assert torch.autograd.gradcheck(lambda a, b, s, c: siglip_loss(a, b, s, c, offset=1, **kw), (a, b, s, c))
    assert torch.autograd.gradcheck(lambda a, b, s: kd_loss(a, b, ta, tb, s, 5.0, **kw), (a, b, s))
    ops = torch.ops.distill_cuda
    torch.library.opcheck(ops.infonce_fwd, (a, b, s, 2, 0.5, 0.5, 4))
    torch.library.opcheck(ops.siglip, (a, b, s, c, 1, 4, True))
    torch.library.opcheck(
        ops.kd_fwd, (a, b, ta, tb, s, torch.tensor(5.0, device="cuda", dtype=torch.float64), 0.5, 0.5, 0.0, "kl", 4)
    )
    q, k = a.detach(), b.detach()
    scores, idx = similarity_topk(q, k, 3, backend="cuda")
    ref = (q @ k.T).topk(3, dim=1)
    _close(scores, ref.values)
    assert torch.equal(idx, ref.indices)
