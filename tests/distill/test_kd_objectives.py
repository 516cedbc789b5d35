"""Distillation losses against open_clip's DistillClipLoss and their written formulas (fp64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import DistillClipLoss

from distill.kd_objectives import (
    AffinityDistillation,
    ClassTextAlignment,
    FeatureDistillation,
    InteractiveContrastive,
    LabelCrossEntropy,
    LogitDistillation,
)
from distill.objectives import InfoNCE, weighted_sum


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.fixture
def outputs():
    torch.manual_seed(0)
    n, d, c = 6, 8, 4
    return {
        "image_embeds": _unit(n, d).requires_grad_(),
        "text_embeds": _unit(n, d).requires_grad_(),
        "teacher_image_embeds": _unit(n, d),
        "teacher_text_embeds": _unit(n, d),
        "logit_scale": torch.tensor(12.0, dtype=torch.float64),
        "teacher_logit_scale": torch.tensor(30.0, dtype=torch.float64),
        "class_bank": _unit(c, d),
        "labels": torch.tensor([0, 1, 2, 3, 0, 1]),
    }


def _entropy_rows(logits):
    p = logits.softmax(1)
    return -(p * p.log()).sum(1).mean()


def test_affinity_matches_open_clip_distill_clip_loss(outputs):
    o = outputs
    task, distill = DistillClipLoss()(
        o["image_embeds"],
        o["text_embeds"],
        o["logit_scale"],
        o["teacher_image_embeds"],
        o["teacher_text_embeds"],
        o["teacher_logit_scale"],
    )
    ours = AffinityDistillation()(o)
    teacher = o["teacher_logit_scale"] * o["teacher_image_embeds"] @ o["teacher_text_embeds"].T
    # open_clip's term is a cross entropy: KL plus the teacher's (constant) entropy.
    entropy = (_entropy_rows(teacher) + _entropy_rows(teacher.T)) / 2
    torch.testing.assert_close(ours + entropy, distill, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(InfoNCE()(o), task, rtol=1e-10, atol=1e-10)
    g_ours = torch.autograd.grad(ours, o["image_embeds"])[0]
    g_ref = torch.autograd.grad(distill, o["image_embeds"])[0]
    torch.testing.assert_close(g_ours, g_ref)


def test_affinity_uses_teacher_text_for_image_only_students(outputs):
    o = {k: v for k, v in outputs.items() if k != "text_embeds"}
    o["image_embeds"] = o["teacher_image_embeds"].clone()
    o["logit_scale"] = o["teacher_logit_scale"]
    assert AffinityDistillation()(o).item() == pytest.approx(0.0, abs=1e-12)  # identical to the teacher


def test_feature_distillation_formulas(outputs):
    o = outputs
    s, t = o["image_embeds"], o["teacher_image_embeds"]
    mse = sum(((s[i] - t[i]) ** 2).sum() for i in range(len(s))) / s.numel()
    torch.testing.assert_close(FeatureDistillation(loss="mse")(o), mse)
    cos = sum(1 - (s[i] @ t[i]) for i in range(len(s))) / len(s)  # unit vectors
    torch.testing.assert_close(FeatureDistillation(loss="cosine")(o), cos)
    both = FeatureDistillation(loss="cosine", modality="both")(o)
    text_cos = (1 - (o["text_embeds"] * o["teacher_text_embeds"]).sum(1)).mean()
    torch.testing.assert_close(both, (cos + text_cos) / 2)


def test_feature_distillation_shape_mismatch_names_projection(outputs):
    o = dict(outputs, image_embeds=torch.zeros(6, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="projection to the teacher's width"):
        FeatureDistillation()(o)


def test_interactive_contrastive_formula(outputs):
    o = {k: v for k, v in outputs.items() if k != "text_embeds"}
    s, t, scale = o["image_embeds"], o["teacher_text_embeds"], o["teacher_logit_scale"]
    logits = scale * s @ t.T
    rows = sum(-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(6)) / 6
    cols = sum(-(logits[i, i] - torch.logsumexp(logits[:, i], 0)) for i in range(6)) / 6
    torch.testing.assert_close(InteractiveContrastive()(o), (rows + cols) / 2)


def test_logit_distillation_formula(outputs):
    o, temp = outputs, 2.0
    bank, scale = o["class_bank"], o["teacher_logit_scale"]
    total = 0.0
    for i in range(6):
        p = torch.softmax(scale * o["teacher_image_embeds"][i] @ bank.T / temp, 0)
        q = torch.log_softmax(scale * o["image_embeds"][i] @ bank.T / temp, 0)
        total = total + (p * (p.log() - q)).sum()
    torch.testing.assert_close(LogitDistillation(temperature=temp)(o), total / 6 * temp**2)


def test_label_cross_entropy_and_class_text_alignment(outputs):
    o = outputs
    logits = o["teacher_logit_scale"] * o["image_embeds"] @ o["class_bank"].T
    torch.testing.assert_close(LabelCrossEntropy()(o), F.cross_entropy(logits, o["labels"]))
    target = o["class_bank"][o["labels"]]
    torch.testing.assert_close(ClassTextAlignment()(o), (1 - (o["image_embeds"] * target).sum(1)).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_label_losses_leave_out_items_without_a_class(outputs, dtype):
    o = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in outputs.items()}
    image = o["image_embeds"].requires_grad_()
    bank, labels = o["class_bank"], o["labels"]

    def old_ce(lab, smoothing=0.0):
        return F.cross_entropy(o["teacher_logit_scale"] * image @ bank.T, lab, label_smoothing=smoothing)

    def old_align(lab):
        return (1 - F.cosine_similarity(image, bank[lab], dim=1)).mean()

    # Every item labelled: bit-identical values and gradients (ShapesWorld runs do not change).
    for new, old in (
        (LabelCrossEntropy(), lambda: old_ce(labels)),
        (LabelCrossEntropy(label_smoothing=0.1), lambda: old_ce(labels, 0.1)),
        (ClassTextAlignment(), lambda: old_align(labels)),
    ):
        ours, ref = new(o), old()
        assert torch.equal(ours, ref)
        assert torch.equal(*(torch.autograd.grad(v, image)[0] for v in (ours, ref)))
    # Two items without a class: the mean over the labelled ones (before: -1 indexed the last class).
    part = dict(o, labels=torch.tensor([0, -1, 2, 3, -1, 1]))
    keep = part["labels"] >= 0
    labelled = dict(o, image_embeds=image[keep], labels=part["labels"][keep])
    torch.testing.assert_close(LabelCrossEntropy()(part), LabelCrossEntropy()(labelled))
    torch.testing.assert_close(ClassTextAlignment()(part), ClassTextAlignment()(labelled))
    # No labelled item: 0 and finite gradients through weighted_sum; logit KD reads no labels.
    none = dict(o, labels=torch.full((6,), -1))
    total, terms = weighted_sum([LabelCrossEntropy(), ClassTextAlignment(), LogitDistillation()], none)
    assert terms["label_ce"] == 0 and terms["class_text_align"] == 0
    assert terms["logit_kd"] == LogitDistillation()(o)
    total.backward()
    assert torch.isfinite(image.grad).all()


def test_names_and_validation():
    assert FeatureDistillation(loss="cosine").name == "fd_cosine"
    assert LogitDistillation().name == "logit_kd"
    with pytest.raises(ValueError, match="temperature"):
        LogitDistillation(temperature=0)
    with pytest.raises(KeyError, match="class_bank"):
        LabelCrossEntropy()({"image_embeds": torch.zeros(2, 3)})
    assert math.isfinite(InteractiveContrastive(temperature=0.07).weight)


@pytest.mark.parametrize(
    "objective",
    [FeatureDistillation(), AffinityDistillation(), InteractiveContrastive(), LogitDistillation()],
    ids=lambda o: o.name,
)
def test_nan_teacher_embeddings_name_the_term_and_the_tensor(outputs, objective):
    outputs["teacher_image_embeds"][2, 0] = float("nan")
    with pytest.raises(
        FloatingPointError, match=rf"loss term '{objective.name}' is nan \(.*\['teacher_image_embeds'\]\)"
    ):
        weighted_sum([LabelCrossEntropy(), objective], outputs)


@pytest.mark.parametrize("cls", [AffinityDistillation, InteractiveContrastive, LogitDistillation])
def test_backend_name_is_checked_by_the_engine(cls):
    with pytest.raises(
        ValueError, match=r"backend must be one of \('auto', 'reference', 'tiled', 'cuda', 'cuda_fused'\), got 'tiles'"
    ):
        cls(backend="tiles")
    assert cls(backend="tiled").backend == "tiled"
