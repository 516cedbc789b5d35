"""Diagnostics against hand-computed values and naive formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill import diagnostics as dg


def _naive_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA from the N x N HSIC definition: tr(K H L H) / (n-1)^2 with linear kernels."""
    x, y = x.double(), y.double()
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, lk = x @ x.T, y @ y.T

    def hsic(a, b):
        return float(torch.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(k, lk) / math.sqrt(hsic(k, k) * hsic(lk, lk))


def test_mean_cosine_hand_value():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    assert dg.mean_cosine(a, b) == pytest.approx((1 / math.sqrt(2) - 1) / 2)


def test_linear_cka_identity_rotation_scale_and_independence():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert dg.linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert dg.linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0, abs=1e-9)
    assert dg.linear_cka(x, torch.randn(200, 8)) < 0.15


def test_linear_cka_matches_naive_hsic():
    torch.manual_seed(1)
    x, y = torch.randn(30, 5), torch.randn(30, 7)
    y[:, :3] += x[:, :3]  # partly shared, so the value is neither ~0 nor 1
    assert dg.linear_cka(x, y) == pytest.approx(_naive_cka(x, y), abs=1e-6)


def test_modality_gap_hand_values():
    a = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert dg.modality_gap(a, a) == pytest.approx(0.0, abs=1e-12)
    # Normalised image centroid: (0.5, 0.5); normalised text rows (-1, 0), (0, -1), (-1, 0): centroid (-2/3, -1/3).
    text = torch.tensor([[-2.0, 0.0], [0.0, -5.0], [-1.0, 0.0]])
    expected = math.hypot(0.5 + 2 / 3, 0.5 + 1 / 3)
    assert dg.modality_gap(a, text) == pytest.approx(expected)


def test_uniformity_two_points_closed_form():
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # unit rows (1,0), (0,1): squared distance 2
    assert dg.uniformity(x, t=2.0) == pytest.approx(-4.0)
    assert dg.uniformity(x, t=0.5) == pytest.approx(-1.0)
    assert math.isnan(dg.uniformity(x[:1]))


def test_uniformity_matches_direct_mean():
    torch.manual_seed(2)
    x = torch.randn(9, 4)
    u = F.normalize(x.double(), dim=-1)
    i, j = torch.triu_indices(9, 9, offset=1)
    expected = math.log(float(torch.exp(-2.0 * (u[i] - u[j]).pow(2).sum(-1)).mean()))
    assert dg.uniformity(x) == pytest.approx(expected, abs=1e-10)


def test_alignment_hand_values():
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert dg.alignment(x, x) == pytest.approx(0.0, abs=1e-12)
    y = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # distances sqrt(2) and 2
    assert dg.alignment(x, y) == pytest.approx((2.0 + 4.0) / 2)
    assert dg.alignment(x, y, alpha=1.0) == pytest.approx((math.sqrt(2) + 2.0) / 2)


def test_affinity_kl_zero_and_matches_kl_div():
    torch.manual_seed(3)
    sq, sk, tq, tk = torch.randn(5, 4), torch.randn(6, 4), torch.randn(5, 3), torch.randn(6, 3)
    assert dg.affinity_kl(sq, sk, sq, sk, 10.0, 10.0) == pytest.approx(0.0, abs=1e-12)
    log_ps = F.log_softmax(7.0 * F.normalize(sq.double(), dim=-1) @ F.normalize(sk.double(), dim=-1).T, dim=-1)
    log_pt = F.log_softmax(20.0 * F.normalize(tq.double(), dim=-1) @ F.normalize(tk.double(), dim=-1).T, dim=-1)
    expected = float(F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True))
    assert dg.affinity_kl(sq, sk, tq, tk, 7.0, 20.0) == pytest.approx(expected, abs=1e-10)


def test_top1_agreement_hand_example():
    s = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    t = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.0, 0.1, 0.9], [0.1, 0.8, 0.1]])
    assert dg.top1_agreement(s, t) == pytest.approx(0.5)


def test_intra_modal_recall_hand_example_with_unlabelled():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 0.05]])
    # Row 4 (label -1) is the nearest neighbour of rows 0 and 1 but is out of the gallery.
    labels = torch.tensor([0, 0, 1, 2, -1])
    # 0 -> 1 (same), 1 -> 0 (same), 2 -> 3 (different), 3 -> 2 (different).
    assert dg.intra_modal_recall_at_1(x, labels) == pytest.approx(0.5)
    assert math.isnan(dg.intra_modal_recall_at_1(x, torch.tensor([0, -1, -1, -1, -1])))


def test_chunking_does_not_change_results(monkeypatch):
    torch.manual_seed(4)
    x, y, k, tk = torch.randn(37, 6), torch.randn(37, 6), torch.randn(11, 6), torch.randn(11, 5)
    ty = torch.randn(37, 5)
    labels = torch.randint(-1, 4, (37,))

    def run():
        return [
            dg.mean_cosine(x, y),
            dg.linear_cka(x, ty),
            dg.affinity_kl(x, k, ty, tk, 5.0, 9.0),
            dg.modality_gap(x, y),
            dg.uniformity(x),
            dg.alignment(x, y),
            dg.intra_modal_recall_at_1(x, labels),
        ]

    full = run()
    monkeypatch.setattr(dg, "_CHUNK", 4)
    assert run() == pytest.approx(full, abs=1e-10)


def test_summaries_and_per_group():
    torch.manual_seed(5)
    img, txt, labels = torch.randn(12, 4), torch.randn(12, 4), torch.randint(0, 3, (12,))
    geo = dg.geometry_metrics(img, txt, labels)
    assert set(geo) == {"uniformity_image", "modality_gap", "alignment", "uniformity_text", "image_r1"}
    assert set(dg.geometry_metrics(img, None, None)) == {"uniformity_image"}
    agree = dg.agreement_metrics(img, txt, img[:, :3], txt[:, :3], img[:5], txt[:5], 2.0, 3.0)
    assert set(agree) == {"cosine", "cka", "top1_agreement", "affinity_kl"}
    assert set(dg.agreement_metrics(img, torch.randn(12, 7))) == {"cka"}
    groups = torch.tensor([0, 2, 0, 2, 0, 2, -1, 0, 2, 0, 2, 0])
    out = dg.per_group(dg.geometry_metrics, groups, ["flat", "unused", "sketch"], img, None, labels)
    assert list(out) == ["flat", "sketch"]
    assert out["sketch"]["uniformity_image"] == pytest.approx(dg.uniformity(img[groups == 2]))


def test_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        dg.mean_cosine(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 4\)"):
        dg.linear_cka(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="same width"):
        dg.modality_gap(torch.zeros(3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="2-D"):
        dg.uniformity(torch.zeros(3))
    with pytest.raises(ValueError, match="same items"):
        dg.affinity_kl(torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(4, 4), torch.zeros(2, 4), 1.0, 1.0)
    with pytest.raises(ValueError, match="teacher_scores"):
        dg.agreement_metrics(torch.zeros(3, 4), torch.zeros(3, 4), student_scores=torch.zeros(3, 2))
