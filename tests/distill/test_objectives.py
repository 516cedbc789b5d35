"""Tests for distill.objectives: golden values vs open_clip and loop formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from distill.objectives import DCL, InfoNCE, SigLIP, SoftTargetContrastive, weighted_sum

N, D = 8, 16
TOL = dict(rtol=1e-7, atol=1e-9)


def _pair(seed: int = 0, n: int = N, d: int = D):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img.requires_grad_(), txt.requires_grad_()


def _scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64, requires_grad=True)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_infonce_matches_open_clip():
    img, txt = _pair()
    scale = _scalar(14.3)
    ours = InfoNCE()({"image_embeds": img, "text_embeds": txt, "logit_scale": scale})
    ref = ClipLoss()(img, txt, scale)
    torch.testing.assert_close(ours, ref, **TOL)
    for a, b in zip(_grads(ours, img, txt, scale), _grads(ref, img, txt, scale)):
        torch.testing.assert_close(a, b, **TOL)


def test_siglip_matches_open_clip():
    img, txt = _pair(1)
    scale, bias = _scalar(10.0), _scalar(-10.0)
    out = {"image_embeds": img, "text_embeds": txt, "logit_scale": scale, "logit_bias": bias}
    ours = SigLIP()(out)
    ref = SigLipLoss()(img, txt, scale, bias)
    torch.testing.assert_close(ours, ref, **TOL)
    for a, b in zip(_grads(ours, img, txt, scale, bias), _grads(ref, img, txt, scale, bias)):
        torch.testing.assert_close(a, b, **TOL)


def test_dcl_matches_loop_formula_and_differs_from_infonce():
    img, txt = _pair(2)
    scale = _scalar(5.0)
    out = {"image_embeds": img, "text_embeds": txt, "logit_scale": scale}
    ours = DCL()(out)
    logits = (scale * img @ txt.T).tolist()
    total = 0.0
    for lg in (logits, [list(col) for col in zip(*logits)]):
        for i, row in enumerate(lg):
            neg = [row[j] for j in range(N) if j != i]
            total += -row[i] + math.log(sum(math.exp(v) for v in neg))
    expected = torch.tensor(total / (2 * N), dtype=torch.float64)
    torch.testing.assert_close(ours.detach(), expected, **TOL)
    assert abs(ours.item() - InfoNCE()(out).item()) > 1e-3


def test_soft_target_one_hot_equals_infonce():
    img, txt = _pair(3)
    out = {
        "image_embeds": img,
        "text_embeds": txt,
        "logit_scale": _scalar(20.0),
        "target_similarity": torch.eye(N, dtype=torch.float64) * 10.0,
    }
    ours = SoftTargetContrastive(target_temperature=0.01)(out)
    torch.testing.assert_close(ours, InfoNCE()(out), **TOL)


def test_soft_target_matches_loop_formula():
    img, txt = _pair(4)
    scale, tau = 7.0, 0.5
    sim = torch.randn(N, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = {"image_embeds": img, "text_embeds": txt, "logit_scale": _scalar(scale), "target_similarity": sim}
    ours = SoftTargetContrastive(target_temperature=tau)(out)
    logits = (scale * img @ txt.T).tolist()
    s = sim.tolist()

    def direction(lg, st):
        acc = 0.0
        for i in range(N):
            zt = sum(math.exp(v / tau) for v in st[i])
            zl = math.log(sum(math.exp(v) for v in lg[i]))
            acc += -sum(math.exp(st[i][j] / tau) / zt * (lg[i][j] - zl) for j in range(N))
        return acc / N

    def tr(m):
        return [list(c) for c in zip(*m)]

    expected = (direction(logits, s) + direction(tr(logits), tr(s))) / 2
    torch.testing.assert_close(ours.detach(), torch.tensor(expected, dtype=torch.float64), **TOL)


def test_soft_target_detaches_similarity():
    img, txt = _pair(6)
    sim = torch.randn(N, N, dtype=torch.float64, requires_grad=True)
    out = {"image_embeds": img, "text_embeds": txt, "logit_scale": _scalar(3.0), "target_similarity": sim}
    SoftTargetContrastive()(out).backward()
    assert sim.grad is None


@pytest.mark.parametrize("cls", [InfoNCE, DCL, SoftTargetContrastive])
def test_logit_scale_clamp(cls):
    img, txt = _pair(7)
    sim = torch.randn(N, N, dtype=torch.float64)
    high, cap = _scalar(200.0), _scalar(100.0)
    base = {"image_embeds": img, "text_embeds": txt, "target_similarity": sim}
    loss_high = cls()({**base, "logit_scale": high})
    (g,) = torch.autograd.grad(loss_high, high)
    assert g.item() == 0.0
    torch.testing.assert_close(loss_high, cls()({**base, "logit_scale": cap}), **TOL)


def test_shape_mismatch_message():
    img, _ = _pair(n=4, d=8)
    _, txt = _pair(n=5, d=8)
    with pytest.raises(ValueError, match=r"image_embeds has shape \(4, 8\) but text_embeds has \(5, 8\)"):
        InfoNCE()({"image_embeds": img, "text_embeds": txt, "logit_scale": _scalar(1.0)})


def test_missing_keys_messages():
    img, txt = _pair()
    with pytest.raises(KeyError, match=r"SigLIP needs outputs\['logit_bias'\]; build the model with init_logit_bias"):
        SigLIP()({"image_embeds": img, "text_embeds": txt, "logit_scale": _scalar(1.0)})
    with pytest.raises(KeyError, match="logit_scale"):
        InfoNCE()({"image_embeds": img, "text_embeds": txt})
    with pytest.raises(KeyError, match="target_similarity"):
        SoftTargetContrastive()({"image_embeds": img, "text_embeds": txt, "logit_scale": _scalar(1.0)})


@pytest.mark.parametrize("cls", [InfoNCE, SigLIP, DCL, SoftTargetContrastive])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_embeds_name_the_term_and_the_tensor(cls, value):
    img, txt = _pair()
    bad = img.detach().clone()
    bad[0, 0] = value
    out = {
        "image_embeds": bad,
        "text_embeds": txt,
        "logit_scale": _scalar(1.0),
        "logit_bias": _scalar(-1.0),
        "target_similarity": (img @ txt.T).detach(),
    }
    # The objective itself does no value check (one check per step, in weighted_sum) ...
    assert not torch.isfinite(cls()(out))
    # ... and weighted_sum names the term and the non-finite input.
    with pytest.raises(FloatingPointError, match=rf"loss term '{cls.default_name}' is (nan|inf).*\['image_embeds'\]"):
        weighted_sum([cls()], out)


def test_one_host_sync_per_weighted_sum(monkeypatch):
    """The NaN/inf check runs once per step (on the total), not per term or per input tensor."""
    img, txt = _pair()
    out = {"image_embeds": img, "text_embeds": txt, "logit_scale": _scalar(3.0), "logit_bias": _scalar(-1.0)}
    calls = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(t) or isfinite(t))
    total, _ = weighted_sum([InfoNCE(), SigLIP(), DCL()], out)
    assert len(calls) == 1 and calls[0] is total


def test_weighted_sum_combines_weights():
    img, txt = _pair(8)
    out = {"image_embeds": img, "text_embeds": txt, "logit_scale": _scalar(10.0), "logit_bias": _scalar(-5.0)}
    objs = [InfoNCE(weight=0.25), SigLIP(weight=2.0), DCL(weight=0.5, name="dcl_aux")]
    total, terms = weighted_sum(objs, out)
    assert list(terms) == ["infonce", "siglip", "dcl_aux"]
    expected = 0.25 * InfoNCE()(out) + 2.0 * SigLIP()(out) + 0.5 * DCL()(out)
    torch.testing.assert_close(total, expected, **TOL)
    torch.testing.assert_close(terms["siglip"], SigLIP()(out).detach(), **TOL)
    assert all(not t.requires_grad for t in terms.values())
    assert total.requires_grad


def test_weighted_sum_nan_names_objective():
    class NaNLoss(nn.Module):
        weight, name = 1.0, "broken"

        def forward(self, outputs):
            return torch.tensor(float("nan"))

    img, txt = _pair()
    out = {"image_embeds": img, "text_embeds": txt, "logit_scale": _scalar(1.0)}
    with pytest.raises(FloatingPointError, match="loss term 'broken' is nan"):
        weighted_sum([InfoNCE(), NaNLoss()], out)
    with pytest.raises(
        FloatingPointError, match=r"loss term 'infonce' is nan \(non-finite values in outputs \['logit_scale'\]"
    ):
        weighted_sum([InfoNCE()], {**out, "logit_scale": _scalar(float("nan"))})
    # The first non-finite term is named, whatever comes after it; a weight of 0 does not hide it.
    with pytest.raises(FloatingPointError, match="loss term 'broken' is nan$"):
        weighted_sum([NaNLoss(), InfoNCE(weight=0.0)], out)
    inf_loss = NaNLoss()
    inf_loss.forward = lambda outputs: torch.tensor(float("inf"))
    inf_loss.name, inf_loss.weight = "exploded", 0.0
    with pytest.raises(FloatingPointError, match="loss term 'exploded' is inf$"):
        weighted_sum([InfoNCE(), inf_loss], out)


def test_backend_name_checked_once_with_the_choices():
    for cls in (InfoNCE, SigLIP):
        choices = r"\('auto', 'reference', 'tiled', 'cuda', 'cuda_fused'\)"
        with pytest.raises(ValueError, match=rf"backend must be one of {choices}, got 'gpu'"):
            cls(backend="gpu")


def test_weighted_sum_rejects_duplicate_names():
    img, txt = _pair()
    out = {"image_embeds": img, "text_embeds": txt, "logit_scale": _scalar(1.0)}
    with pytest.raises(ValueError, match="share the name 'infonce'"):
        weighted_sum([InfoNCE(), InfoNCE(weight=0.5)], out)


# apply_overrides: one term of a list changed by its log name, rebuilt through its own constructor.
def _kd_outputs(seed: int = 0) -> dict[str, torch.Tensor]:
    img, txt = _pair(seed)
    bank = F.normalize(
        torch.randn(5, D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64), dim=-1
    )
    return {
        "image_embeds": img,
        "teacher_image_embeds": txt,
        "class_bank": bank,
        "teacher_logit_scale": _scalar(10.0),
        "labels": torch.tensor([0, 1, 2, 3, 4, 0, 1, -1]),
    }


def test_apply_overrides_rebuilds_the_named_terms_only():
    from distill.kd_objectives import FeatureDistillation, LabelCrossEntropy, LogitDistillation
    from distill.objectives import apply_overrides

    label, kd = LabelCrossEntropy(), LogitDistillation(weight=0.5, temperature=2.0, backend="reference")
    overrides = {"label_ce": {"label_smoothing": 0.1}, "logit_kd": {"temperature": 4, "weight": 3.0}}
    new_label, new_kd = apply_overrides([label, kd], overrides, "objective_overrides")
    assert type(new_kd) is LogitDistillation and new_kd is not kd and kd.temperature == 2.0  # the original is kept
    assert (new_kd.name, new_kd.weight, new_kd.temperature, new_kd.backend) == ("logit_kd", 3.0, 4, "reference")
    assert (new_label.name, new_label.weight, new_label.label_smoothing) == ("label_ce", 1.0, 0.1)

    # The rebuilt terms compute with the new values: cross entropy with smoothing 0.1, KD at T = 4.
    outputs = _kd_outputs()
    total, terms = weighted_sum([new_label, new_kd], outputs)
    s = outputs["teacher_logit_scale"] / 4
    student = 10.0 * outputs["image_embeds"] @ outputs["class_bank"].T
    teacher = 10.0 * outputs["teacher_image_embeds"] @ outputs["class_bank"].T
    kl = F.softmax(teacher * s / 10, 1) * (F.log_softmax(teacher * s / 10, 1) - F.log_softmax(student * s / 10, 1))
    expected_kd = kl.sum(1).mean() * 16
    expected_ce = F.cross_entropy(student, outputs["labels"], ignore_index=-1, label_smoothing=0.1)
    torch.testing.assert_close(terms["logit_kd"], expected_kd.detach(), **TOL)
    torch.testing.assert_close(terms["label_ce"], expected_ce.detach(), **TOL)
    torch.testing.assert_close(total, expected_ce + 3.0 * expected_kd, **TOL)

    # A name used twice (a term of both training stages) changes everywhere; no override, no change.
    both = [FeatureDistillation(loss="cosine"), FeatureDistillation(loss="cosine", weight=2.0)]
    assert [o.weight for o in apply_overrides(both, {"fd_cosine": {"weight": 5.0}}, "x")] == [5.0, 5.0]
    assert all(o.loss == "cosine" for o in apply_overrides(both, {"fd_cosine": {"weight": 5.0}}, "x"))
    assert apply_overrides([label, kd], {}, "x") == [label, kd]


def test_apply_overrides_errors_name_the_key_and_the_valid_choices():
    from distill.kd_objectives import LabelCrossEntropy, LogitDistillation
    from distill.objectives import apply_overrides

    objectives = [LabelCrossEntropy(), LogitDistillation()]
    # The class's own check runs on the new value.
    with pytest.raises(ValueError, match=r"^objective_overrides\.logit_kd: temperature must be > 0, got -1"):
        apply_overrides(objectives, {"logit_kd": {"temperature": -1}}, "objective_overrides")
    valid = "label_ce (weight, label_smoothing); logit_kd (weight, temperature, backend)"
    with pytest.raises(ValueError) as unknown_name:
        apply_overrides(objectives, {"logit": {"temperature": 4}}, "objective_overrides")
    assert (
        str(unknown_name.value)
        == f"objective_overrides: 'logit' names no objective; valid names and arguments: {valid}"
    )
    with pytest.raises(ValueError) as unknown_argument:
        apply_overrides(objectives, {"logit_kd": {"temprature": 4}}, "objective_overrides")
    assert str(unknown_argument.value) == (
        f"objective_overrides.logit_kd: 'temprature' is not an argument of objective 'logit_kd'; "
        f"valid names and arguments: {valid}"
    )

    class Hidden(nn.Module):
        def __init__(self, weight: float = 1.0, scale: float = 2.0) -> None:
            super().__init__()
            self.weight, self.name, self._scale = weight, "hidden", scale

    with pytest.raises(
        ValueError, match="Hidden cannot be overridden: its argument 'scale' is not kept as an attribute"
    ):
        apply_overrides([Hidden()], {"hidden": {"weight": 2.0}}, "objective_overrides")
