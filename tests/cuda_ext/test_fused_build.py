"""Fused CUDA backend (cuda_fused): name, gating before GPU verification, CPU never builds, build, GPU values."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from distill import cuda_ext
from distill.cuda_ext import _build, infonce_loss, kd_loss

HAS_CUDA = torch.cuda.is_available()
FUSED_OPS = ("infonce_fwd", "infonce_bwd", "siglip", "kd_fwd", "kd_bwd", "topk")


def _unit(n: int, d: int, seed: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.to(device=device, dtype=dtype).requires_grad_()


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if anything tries to compile an extension."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"an extension build was triggered: {args[:2]}")

    monkeypatch.setattr(_build, "_compile", refuse)


@pytest.fixture
def unverified(monkeypatch):
    monkeypatch.setattr(_build, "FUSED_VERIFIED", False)
    monkeypatch.setattr(_build, "FUSED_OPT_IN", False)


def test_fused_backend_name_is_validated():
    assert "cuda_fused" in cuda_ext.BACKENDS
    assert cuda_ext.check_backend("cuda_fused") == "cuda_fused"
    with pytest.raises(ValueError, match=r"backend must be one of \(.*'cuda_fused'\), got 'cuda-fused'"):
        cuda_ext.check_backend("cuda-fused")


def test_fused_is_off_by_default():
    assert _build.FUSED_VERIFIED is False, "flip only after benchmarks/gpu_similarity_check.py passed on a GPU"


def test_fused_refused_before_verification(unverified, no_build):
    a, b = _unit(6, 4, 0), _unit(6, 4, 1)
    message = r"backend='cuda_fused' has not yet passed benchmarks/gpu_similarity_check.py.*DISTILL_FUSED_CUDA=1"
    with pytest.raises(RuntimeError, match=message):
        infonce_loss(a, b, 3.0, backend="cuda_fused")
    with pytest.raises(RuntimeError, match=message):
        _build.load_fused()
    # Without the opt-in, backend="cuda" is the blocked path, unchanged (its own CPU-tensor error).
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs CUDA tensors"):
        infonce_loss(a, b, 3.0, backend="cuda")


def test_fused_on_cpu_tensors_is_a_clear_error(monkeypatch, no_build):
    monkeypatch.setattr(_build, "FUSED_OPT_IN", True)
    a, b = _unit(6, 4, 0), _unit(6, 4, 1)
    with pytest.raises(RuntimeError, match=r"backend='cuda_fused' needs CUDA tensors, but the embeddings are on cpu"):
        infonce_loss(a, b, 3.0, backend="cuda_fused")
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs CUDA tensors"):
        kd_loss(a, b, a.detach(), b.detach(), 3.0, 2.0, backend="cuda")


def test_cpu_use_never_builds(monkeypatch, no_build):
    monkeypatch.setattr(_build, "FUSED_OPT_IN", True)  # the opt-in only concerns CUDA tensors
    a, b = _unit(70, 4, 0), _unit(70, 4, 1)
    assert cuda_ext.resolve_backend("auto", a.detach(), 4096, 4096) == "tiled"
    tiled = infonce_loss(a, b, 5.0, backend="tiled", block_rows=16)
    auto = infonce_loss(a, b, 5.0, backend="auto")
    torch.testing.assert_close(tiled, infonce_loss(a, b, 5.0, backend="reference"), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(auto, tiled, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None, reason="needs nvcc and CUDA torch")
def test_fused_sources_compile(tmp_path, monkeypatch):
    """Compiles the fused sources with nvcc for sm_90 (about 2 minutes on 2 cores); no GPU needed."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setenv("MAX_JOBS", "2")
    _build.build_cuda_fused(tmp_path / "build")
    assert _build.fused_cuda_is_loaded()
    for name in FUSED_OPS:
        assert hasattr(torch.ops.distill_cuda_fused, name), name
    # The fake kernels from _registry give the shapes torch.compile sees: loss, lse_r (N), lse_c (M).
    a, b = (
        torch.empty(5, 3, device="meta", dtype=torch.bfloat16),
        torch.empty(7, 3, device="meta", dtype=torch.bfloat16),
    )
    loss, lse_r, lse_c = torch.ops.distill_cuda_fused.infonce_fwd(a, b, torch.empty((), device="meta"), 1, 0.5, 0.5, 0)
    assert (loss.shape, lse_r.shape, lse_c.shape, lse_r.dtype) == ((), (5,), (7,), torch.float32)


# ---- GPU: run with `pytest -m gpu tests/cuda_ext/test_fused_build.py` on a machine with CUDA ----


@pytest.fixture
def allow_fused(monkeypatch):
    monkeypatch.setattr(_build, "FUSED_VERIFIED", True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,m,d,offset", [(130, 200, 40, 5), (64, 64, 32, 0), (1, 3, 7, 2)])
def test_fused_matches_reference_fp64_ragged(allow_fused, n, m, d, offset):
    """Shapes that are not multiples of the 64 x 64 tile or the 32-wide slice, with an offset."""
    a, b = _unit(n, d, 0), _unit(m, d, 1)
    s = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    kw = dict(offset=offset, row_weight=0.3, col_weight=0.9)
    ref = infonce_loss(a, b, s, backend="reference", **kw)
    ref_g = torch.autograd.grad(ref, (a, b, s))
    dev = [x.detach().cuda().requires_grad_() for x in (a, b, s)]
    out = infonce_loss(*dev, backend="cuda_fused", **kw)
    out_g = torch.autograd.grad(out, dev)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-12)
    for x, y in zip(out_g, ref_g):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-9, atol=1e-11)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
def test_fused_matches_fp64_reference_at_2048(allow_fused, dtype, tol):
    a, b = _unit(2048, 256, 0), _unit(2048, 256, 1)
    ar, br = (x.detach().to(dtype).double().requires_grad_() for x in (a, b))  # same rounded inputs
    s = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    ref = infonce_loss(ar, br, s, backend="reference")
    ref_g = torch.autograd.grad(ref, (ar, br, s))
    dev = [x.detach().cuda().to(dtype).requires_grad_() for x in (a, b)]
    sd = torch.tensor(30.0, device="cuda", requires_grad=True)
    out = infonce_loss(*dev, sd, backend="cuda_fused")
    out_g = torch.autograd.grad(out, (*dev, sd))
    assert abs(out.item() - ref.item()) <= tol * abs(ref.item())
    for x, y in zip(out_g, ref_g):
        assert ((x.double().cpu() - y).norm() / y.norm()).item() <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_fused_gradcheck_opcheck_and_cuda_opt_in(allow_fused, monkeypatch):
    a, b = _unit(6, 4, 0, device="cuda"), _unit(9, 4, 1, device="cuda")
    s = torch.tensor(7.0, dtype=torch.float64, device="cuda", requires_grad=True)
    fn = lambda a, b, s: infonce_loss(a, b, s, offset=2, backend="cuda_fused")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b, s))
    torch.library.opcheck(torch.ops.distill_cuda_fused.infonce_fwd, (a, b, s, 2, 0.5, 0.5, 0))
    assert cuda_ext.resolve_backend("cuda", a, 6, 9) == "cuda"
    monkeypatch.setattr(_build, "FUSED_OPT_IN", True)
    assert cuda_ext.resolve_backend("cuda", a, 6, 9) == "cuda_fused"
    torch.testing.assert_close(
        infonce_loss(a, b, s, offset=2, backend="cuda"), infonce_loss(a, b, s, offset=2, backend="reference")
    )
