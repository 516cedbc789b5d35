"""Adaptation objectives (KgCoOp, PromptSRC) against hand-written fp64 formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.adapt_objectives import (
    AdaptedCrossEntropy,
    ImageConsistencyL1,
    KnowledgeGuidedRegulariser,
    TextConsistencyL1,
    ZeroShotLogitKL,
)
from distill.objectives import weighted_sum

B, C, D = 5, 4, 8
LEARNED = ("logits", "class_text_embeds", "image_embeds")
FROZEN = ("zero_shot_class_bank", "frozen_image_embeds")


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def _outputs(per_image: bool = False) -> dict:
    torch.manual_seed(0)
    img = _unit(B, D)
    text = _unit(B, C, D) if per_image else _unit(C, D)
    scale = torch.tensor(7.5, dtype=torch.float64)
    logits = scale * (torch.einsum("bd,bcd->bc", img, text) if per_image else img @ text.T)
    out = {
        "logits": logits,
        "labels": torch.tensor([0, 3, 1, 2, 3]),
        "class_text_embeds": text,
        "zero_shot_class_bank": _unit(C, D),
        "image_embeds": img,
        "frozen_image_embeds": _unit(B, D),
        "logit_scale": scale,
    }
    for key in LEARNED + FROZEN:  # frozen ones too: the test checks no gradient reaches them
        out[key] = out[key].detach().clone().requires_grad_()
    return out


def _text_rows(out, b):
    """Learned class features seen by image b, as a list of C lists of floats."""
    t = out["class_text_embeds"].detach()
    return (t[b] if t.dim() == 3 else t).tolist()


def _ref_ce(out, smoothing=0.0):
    total = 0.0
    for row, y in zip(out["logits"].detach().tolist(), out["labels"].tolist()):
        lse = math.log(sum(math.exp(v) for v in row))
        logp = [v - lse for v in row]
        total += -(1 - smoothing) * logp[y] - smoothing * sum(logp) / len(row)
    return total / len(out["labels"])


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _ref_kg(out):
    bank = out["zero_shot_class_bank"].detach().tolist()
    per_image = out["class_text_embeds"].dim() == 3
    rows = [_text_rows(out, b) for b in range(B)] if per_image else [_text_rows(out, 0)]
    vals = [1 - _cos(w, bank[c]) for rs in rows for c, w in enumerate(rs)]
    return sum(vals) / len(vals)


def _ref_text_l1(out):
    bank = out["zero_shot_class_bank"].detach().tolist()
    per_image = out["class_text_embeds"].dim() == 3
    rows = [_text_rows(out, b) for b in range(B)] if per_image else [_text_rows(out, 0)]
    vals = [abs(x - y) for rs in rows for c, w in enumerate(rs) for x, y in zip(w, bank[c])]
    return sum(vals) / len(vals)


def _ref_image_l1(out):
    a, b = out["image_embeds"].detach().tolist(), out["frozen_image_embeds"].detach().tolist()
    vals = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(vals) / len(vals)


def _softmax(row):
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def _ref_kl(out, temperature=1.0):
    """PromptSRC: sum over b, c of q log(q / p), divided by B * C, times T^2; q zero-shot, p prompted."""
    s = float(out["logit_scale"]) / temperature
    img, frozen = out["image_embeds"].detach().tolist(), out["frozen_image_embeds"].detach().tolist()
    bank = out["zero_shot_class_bank"].detach().tolist()
    total = 0.0
    for b in range(B):
        p = _softmax([s * sum(x * y for x, y in zip(img[b], w)) for w in _text_rows(out, b)])
        q = _softmax([s * sum(x * y for x, y in zip(frozen[b], w)) for w in bank])
        total += sum(qc * math.log(qc / pc) for pc, qc in zip(p, q))
    return total * temperature**2 / (B * C)


CASES = [
    (AdaptedCrossEntropy(), _ref_ce),
    (AdaptedCrossEntropy(label_smoothing=0.1), lambda o: _ref_ce(o, 0.1)),
    (KnowledgeGuidedRegulariser(), _ref_kg),
    (TextConsistencyL1(), _ref_text_l1),
    (ImageConsistencyL1(), _ref_image_l1),
    (ZeroShotLogitKL(backend="reference"), _ref_kl),
    (ZeroShotLogitKL(backend="tiled"), _ref_kl),
    (ZeroShotLogitKL(temperature=2.0), lambda o: _ref_kl(o, 2.0)),
]
IDS = ["ce", "ce_smooth", "kg", "text_l1", "image_l1", "kl_reference", "kl_tiled", "kl_t2"]


@pytest.mark.parametrize("per_image", [False, True], ids=["CD", "BCD"])
@pytest.mark.parametrize(("objective", "reference"), CASES, ids=IDS)
def test_value_matches_formula_and_grads_reach_learned_side_only(objective, reference, per_image):
    out = _outputs(per_image)
    loss = objective(out)
    assert loss.dim() == 0
    assert float(loss.detach()) == pytest.approx(reference(out), abs=1e-6, rel=1e-6)
    assert float(loss.detach()) > 0
    loss.backward()
    for key in FROZEN:
        assert out[key].grad is None, key
    assert any(out[k].grad is not None and out[k].grad.abs().sum() > 0 for k in LEARNED)


def test_zero_when_learned_equals_frozen():
    out = _outputs()
    out["class_text_embeds"] = out["zero_shot_class_bank"].detach().clone()
    out["image_embeds"] = out["frozen_image_embeds"].detach().clone()
    for obj in (KnowledgeGuidedRegulariser(), TextConsistencyL1(), ImageConsistencyL1(), ZeroShotLogitKL()):
        assert float(obj(out)) == pytest.approx(0.0, abs=1e-12), obj.name


def test_kl_engine_path_equals_direct_path():
    """(C, D) features through kd_loss equal the same features broadcast to (B, C, D), computed directly."""
    out = _outputs()
    expanded = dict(out, class_text_embeds=out["class_text_embeds"].expand(B, C, D))
    a, b = ZeroShotLogitKL()(out), ZeroShotLogitKL()(expanded)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ga = torch.autograd.grad(a, out["class_text_embeds"])[0]
    gb = torch.autograd.grad(b, out["class_text_embeds"])[0]
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-12)


def test_kl_matches_published_reduction():
    """F.kl_div(log p, log q, reduction='sum', log_target=True) / logits.numel(), as PromptSRC's code."""
    out = _outputs()
    p = (out["logits"]).log_softmax(dim=1)
    q = (out["logit_scale"] * out["frozen_image_embeds"] @ out["zero_shot_class_bank"].T).log_softmax(dim=1)
    published = F.kl_div(p, q, reduction="sum", log_target=True) / p.numel()
    torch.testing.assert_close(ZeroShotLogitKL()(out), published.detach(), rtol=1e-10, atol=1e-12)


def test_float32_inputs_close_to_fp64_reference():
    out = _outputs()
    out32 = {k: (v.detach().float() if v.is_floating_point() else v) for k, v in out.items()}
    for obj, ref in zip(
        (KnowledgeGuidedRegulariser(), TextConsistencyL1(), ZeroShotLogitKL()), (_ref_kg, _ref_text_l1, _ref_kl)
    ):
        assert float(obj(out32)) == pytest.approx(ref(out), abs=1e-5), obj.name


def test_recipe_weights_and_names_in_weighted_sum():
    objs = [
        AdaptedCrossEntropy(),
        KnowledgeGuidedRegulariser(),
        TextConsistencyL1(),
        ImageConsistencyL1(),
        ZeroShotLogitKL(),
    ]
    assert [o.weight for o in objs] == [1.0, 8.0, 25.0, 10.0, 1.0]
    out = _outputs()
    total, terms = weighted_sum(objs, out)
    assert set(terms) == {"ce", "kg", "scl_text", "scl_image", "scl_logits"}
    expected = _ref_ce(out) + 8 * _ref_kg(out) + 25 * _ref_text_l1(out) + 10 * _ref_image_l1(out) + _ref_kl(out)
    assert float(total.detach()) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("obj", "key", "value", "match"),
    [
        (KnowledgeGuidedRegulariser(), "class_text_embeds", torch.zeros(C + 1, D), "class_text_embeds has shape"),
        (TextConsistencyL1(), "zero_shot_class_bank", torch.zeros(B, C, D), "zero_shot_class_bank must be 2-D"),
        (ImageConsistencyL1(), "frozen_image_embeds", torch.zeros(B + 1, D), "frozen_image_embeds"),
        (ZeroShotLogitKL(), "class_text_embeds", torch.zeros(B + 1, C, D), "images but image_embeds"),
        (ZeroShotLogitKL(), "logit_scale", torch.ones(2), "logit_scale must be a scalar"),
        (AdaptedCrossEntropy(), "labels", torch.zeros(B + 1, dtype=torch.long), "labels"),
    ],
)
def test_bad_shapes_name_the_key(obj, key, value, match):
    out = _outputs()
    out[key] = value.to(out[key].dtype)
    with pytest.raises(ValueError, match=match):
        obj(out)


def test_missing_key_and_bad_arguments():
    out = _outputs()
    del out["zero_shot_class_bank"]
    with pytest.raises(KeyError, match="zero_shot_class_bank"):
        TextConsistencyL1()(out)
    with pytest.raises(ValueError, match="temperature"):
        ZeroShotLogitKL(temperature=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        AdaptedCrossEntropy(label_smoothing=1.0)
