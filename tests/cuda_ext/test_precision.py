"""Similarity engine precision: fp32 error vs an fp64 reference, at least as good as open_clip's.

Trained-like inputs at logit scale 100: positives at cosine 0.9 and hard negatives (images share a
component), so the loss is small (lse and the positive logit both near 90, their difference ~1e-4).
Errors are relative to the reference formula run in float64 on the same (fp32-rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, DistillClipLoss

from distill.cuda_ext import infonce_loss, kd_loss, reference, siglip_loss

#: One fp32 ulp, relative: an error this small is rounding of the result itself.
ULP32 = 2.0**-23


def _unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _trained(n: int, paired: float, rho: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(image, text, teacher_image, teacher_text), fp32-representable fp64, D=512.

    Images share a component (pairwise cosine ~rho: hard negatives); the first ``paired`` fraction
    of texts sit at cosine 0.9 to their image, the rest are random; teachers are noisy copies.
    """
    g = torch.Generator().manual_seed(seed)
    d = 512
    image = F.normalize(rho**0.5 * _unit(1, d, g) + (1 - rho) ** 0.5 * _unit(n, d, g), dim=1)
    text = F.normalize(0.9 * image + 0.19**0.5 * _unit(n, d, g), dim=1)
    k = int(n * paired)
    text[k:] = _unit(n - k, d, g)
    t_image = F.normalize(image + 0.1 * _unit(n, d, g), dim=1)
    t_text = F.normalize(text + 0.1 * _unit(n, d, g), dim=1)
    return tuple(x.float().double() for x in (image, text, t_image, t_text))


def _err(value: torch.Tensor, ref: torch.Tensor) -> float:
    return abs(value.double().item() - ref.item()) / abs(ref.item())


def _no_worse(err: float, baseline: float) -> bool:
    return err <= max(baseline, ULP32)


# rho=0.8, all pairs: InfoNCE ~5e-5, KD ~1e-3 (open_clip's fp32 error 1e-3..1e-2); 0.5: mixed.
CASES = [pytest.param(1.0, 0.8, id="tiny-loss"), pytest.param(0.5, 0.0, id="half-paired")]


@pytest.mark.parametrize("paired,rho", CASES)
def test_infonce_fp32_error_at_most_open_clip(paired, rho):
    a, b, _, _ = _trained(512, paired, rho)
    s = torch.tensor(100.0, dtype=torch.float64)
    ref = reference.infonce(a, b, s)
    a32, b32, s32 = a.float(), b.float(), s.float()
    base = _err(ClipLoss()(a32, b32, s32), ref)
    tiled = _err(infonce_loss(a32, b32, s32, backend="tiled", block_rows=96), ref)
    plain = _err(infonce_loss(a32, b32, s32, backend="reference"), ref)
    assert _no_worse(tiled, base), (tiled, base)
    assert _no_worse(plain, base * (1 + 1e-3)), (plain, base)
    if paired == 1.0:
        assert base > 1e-4 and tiled < 1e-5, (base, tiled)  # the case does test the small-loss regime


@pytest.mark.parametrize("paired,rho", CASES)
def test_kd_fp32_error_at_most_open_clip(paired, rho):
    a, b, ta, tb = _trained(512, paired, rho)
    s = torch.tensor(100.0, dtype=torch.float64)
    ref = reference.kd(a, b, ta, tb, s, s, kind="ce", contrastive_weight=1.0)
    ref_distill = reference.kd(a, b, ta, tb, s, s, kind="ce")
    x32 = [x.float() for x in (a, b, ta, tb)]
    s32 = s.float()
    contrastive, distill = DistillClipLoss()(x32[0], x32[1], s32, x32[2], x32[3], s32)
    for weight, ref_, base in (
        (1.0, ref, _err(contrastive + distill, ref)),
        (0.0, ref_distill, _err(distill, ref_distill)),
    ):
        for backend, block in (("tiled", 96), ("reference", 0)):
            got = kd_loss(*x32, s32, s32, kind="ce", contrastive_weight=weight, backend=backend, block_rows=block)
            slack = 1.0 if backend == "tiled" else 1 + 1e-3
            assert _no_worse(_err(got, ref_), base * slack), (backend, weight, _err(got, ref_), base)
    if paired == 1.0:
        tiled = kd_loss(*x32, s32, s32, kind="ce", backend="tiled", block_rows=96)
        assert _err(distill, ref_distill) > 1e-4 and _err(tiled, ref_distill) < 1e-5


@pytest.mark.parametrize("paired,rho", CASES)
def test_kl_and_siglip_fp32_error_at_most_reference_formula(paired, rho):
    a, b, ta, tb = _trained(512, paired, rho)
    s, c = torch.tensor(100.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    x32 = [x.float() for x in (a, b, ta, tb)]
    ref = reference.kd(a, b, ta, tb, s, s, kind="kl")
    plain = _err(kd_loss(*x32, s.float(), s.float(), backend="reference"), ref)
    assert _no_worse(_err(kd_loss(*x32, s.float(), s.float(), backend="tiled", block_rows=96), ref), plain)
    ref = reference.siglip(a, b, s, c)
    plain = _err(siglip_loss(x32[0], x32[1], s.float(), c.float(), backend="reference"), ref)
    tiled = _err(siglip_loss(x32[0], x32[1], s.float(), c.float(), backend="tiled", block_rows=96), ref)
    assert _no_worse(tiled, plain), (tiled, plain)


def _far_column_batch() -> tuple[torch.Tensor, ...]:
    """64 x 64 at scale 100 where text 5 points away from every image: its logits sit > 87 below
    each 16-row block's maximum, so exp relative to the block maximum would underflow to zero."""
    g = torch.Generator().manual_seed(0)
    z = _unit(1, 8, g)
    a, b = F.normalize(3 * z + _unit(64, 8, g), dim=1), _unit(64, 8, g)  # images near z
    b[5] = -z[0]
    for r0 in range(0, 64, 16):
        b[r0] = a[r0]  # a logit of 100 in every block
    return a, b, b.flip(0).clone(), a.flip(0).clone()


def test_far_column_gives_exact_column_lse_without_recompute():
    a, b, ta, tb = _far_column_batch()
    s = torch.tensor(100.0, dtype=torch.float64)
    logits = s * a @ b.T
    blocks = logits.view(4, 16, 64)
    assert (blocks.amax(dim=(1, 2)) - blocks[:, :, 5].amax(dim=1)).min() > 87.5  # the regime under test
    a32, b32, ta32, tb32, s32 = (x.float() for x in (a, b, ta, tb, s))
    ops = torch.ops.distill_tiled
    _, lse_r, lse_c = ops.infonce_fwd(a32, b32, s32, 0, 0.5, 0.5, 16)
    torch.testing.assert_close(lse_c.double(), logits.logsumexp(dim=0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse_r.double(), logits.logsumexp(dim=1), rtol=1e-6, atol=1e-5)
    t_logits = 80.0 * ta @ tb.T
    _, stats = ops.kd_fwd(a32, b32, ta32, tb32, s32, torch.tensor(80.0), 0.5, 0.5, 0.0, "kl", 16)
    for row, want in zip(stats.double(), (logits, t_logits, logits.T, t_logits.T)):
        torch.testing.assert_close(row, want.logsumexp(dim=1), rtol=1e-6, atol=1e-5)
    for kind in ("kl", "ce"):
        want = reference.kd(a, b, ta, tb, s, 80.0, kind=kind, contrastive_weight=0.5)
        got = kd_loss(
            a32, b32, ta32, tb32, s32, 80.0, kind=kind, contrastive_weight=0.5, backend="tiled", block_rows=16
        )
        assert _err(got, want) < 1e-6, kind


def test_gradcheck_fp64_at_scale_100_with_far_column():
    """Exponents below the exp floor are clamped: gradients stay exact where that happens."""
    a, b, ta, tb = (x[::4].clone() for x in _far_column_batch())  # 16 rows; the far text is row 5 of b
    b[5] = -F.normalize(a.mean(0), dim=0)
    a, b = a.requires_grad_(), b.requires_grad_()
    s = torch.tensor(100.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: infonce_loss(a, b, s, backend="tiled", block_rows=4), (a, b, s))
    assert torch.autograd.gradcheck(
        lambda a, b, s: kd_loss(a, b, ta, tb, s, 80.0, contrastive_weight=0.5, backend="tiled", block_rows=4),
        (a, b, s),
    )
