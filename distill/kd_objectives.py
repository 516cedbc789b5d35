"""Distillation objectives: a student learns from a frozen vision-language teacher.

Same contract as ``distill.objectives``: each is an ``nn.Module`` with ``weight`` and ``name``
whose ``forward(outputs)`` returns the unweighted scalar loss, combined with
``distill.objectives.weighted_sum``. The ``outputs`` dict of a distillation step holds:

* ``image_embeds`` (N, D): student image embeddings, L2-normalised;
* ``text_embeds`` (N, D): student caption embeddings (dual-tower students only);
* ``logit_scale``: the student's exponentiated temperature (dual towers), else the teacher's;
* ``teacher_image_embeds`` / ``teacher_text_embeds`` (N, D): the teacher's, L2-normalised;
* ``teacher_logit_scale``: the teacher's exponentiated temperature;
* ``class_bank`` (C, D): the teacher's zero-shot classifier; ``labels`` (N,) class indices, -1
  for items without a class (kept for retrieval only): the label losses leave those out.

Families of CLIP distillation: feature mimicry (:class:`FeatureDistillation`), relational /
affinity KD (:class:`AffinityDistillation`, CLIP-KD's CRD, TinyCLIP's affinity mimicking),
interactive contrastive (:class:`InteractiveContrastive`), logit KD on the class bank
(:class:`LogitDistillation`), and the labelled task loss (:class:`LabelCrossEntropy`).
The similarity losses (affinity, ICL, logit KD) compute through the similarity engine
(``distill.cuda_ext``); ``backend`` picks its implementation. NaN/inf are checked once per step,
on the loss, by ``weighted_sum`` (see ``distill.objectives``).

Data-parallel runs (``distill.data_parallel``): :class:`AffinityDistillation` and
:class:`InteractiveContrastive` are GLOBAL terms (softmaxes over the global batch, the same value
on every rank, gradients ready for DDP's averaging); the per-sample terms
(:class:`FeatureDistillation`, :class:`LogitDistillation`, :class:`LabelCrossEntropy`,
:class:`ClassTextAlignment`) stay local: DDP's average of equal local batches' means is the
global mean. A W-process run with batch B thus trains as one process with batch W x B.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from distill import data_parallel
from distill.cuda_ext import kd_loss
from distill.objectives import Objective, SimilarityObjective

__all__ = [
    "AffinityDistillation",
    "ClassTextAlignment",
    "FeatureDistillation",
    "InteractiveContrastive",
    "LabelCrossEntropy",
    "LogitDistillation",
]


def _student_text(outputs: Mapping[str, torch.Tensor], obj: Objective) -> torch.Tensor:
    """The student's caption embeddings, or the teacher's for image-only students."""
    return outputs["text_embeds"] if "text_embeds" in outputs else obj._get(outputs, "teacher_text_embeds")


class FeatureDistillation(Objective):
    """Feature mimicry: student embeddings regress onto the teacher's (CLIP-KD's FD).

    ``mse``: mean squared error over all N x D elements (``F.mse_loss``; CLIP-KD weighs it x2000);
    ``cosine``: mean of 1 - cos(student, teacher). Local (a per-sample mean) under data parallelism.

    Args:
        weight: multiplier applied by ``weighted_sum``.
        loss: ``mse`` or ``cosine``.
        modality: ``image``, ``text`` (dual-tower students) or ``both``.
        name: log key; defaults to ``fd_<loss>``.
    """

    default_name = "fd"

    def __init__(
        self,
        weight: float = 1.0,
        loss: Literal["mse", "cosine"] = "mse",
        modality: Literal["image", "text", "both"] = "image",
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name or f"fd_{loss}")
        if loss not in ("mse", "cosine"):
            raise ValueError(f"loss must be 'mse' or 'cosine', got {loss!r}")
        self.loss, self.modality = loss, modality

    def _one(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(
                f"student embeddings {tuple(student.shape)} and teacher embeddings "
                f"{tuple(teacher.shape)} differ: give the student a projection to the teacher's width"
            )
        if self.loss == "mse":
            return F.mse_loss(student, teacher)
        return (1 - F.cosine_similarity(student, teacher, dim=1)).mean()

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = []
        if self.modality in ("image", "both"):
            terms.append(self._one(self._get(outputs, "image_embeds"), self._get(outputs, "teacher_image_embeds")))
        if self.modality in ("text", "both"):
            terms.append(
                self._one(
                    self._get(outputs, "text_embeds", "only dual-tower students embed text"),
                    self._get(outputs, "teacher_text_embeds"),
                )
            )
        return sum(terms) / len(terms)


class AffinityDistillation(SimilarityObjective):
    """Relational KD: match the teacher's image-text similarity distributions (rows and columns).

    Teacher logits ``s_t * T_img @ T_txt.T``; student logits ``s * S_img @ S_txt.T`` (an
    image-only student uses the teacher's caption embeddings as ``S_txt``). The loss is the
    mean of KL(teacher || student) over image->text rows and text->image rows. With
    ``temperature`` set, both sides use ``1 / temperature`` instead of their logit scales.
    Equals open_clip's ``DistillClipLoss`` distillation term up to the teacher's entropy.
    Global under data parallelism: rows and columns span the global batch.

    Args:
        weight: multiplier applied by ``weighted_sum``.
        temperature: shared softmax temperature, or None to use the logit scales.
        name: log key; defaults to ``affinity``.
        backend: similarity engine backend: ``auto``, ``reference``, ``tiled`` or ``cuda``.
    """

    default_name = "affinity"

    def __init__(
        self, weight: float = 1.0, temperature: float | None = None, name: str | None = None, backend: str = "auto"
    ) -> None:
        super().__init__(weight=weight, name=name, backend=backend)
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        s_img, s_txt = self._get(outputs, "image_embeds"), _student_text(outputs, self)
        t_img, t_txt = self._get(outputs, "teacher_image_embeds"), self._get(outputs, "teacher_text_embeds")
        if self.temperature is None:
            s_scale, t_scale = self._get(outputs, "logit_scale"), self._get(outputs, "teacher_logit_scale")
        else:
            s_scale = t_scale = 1.0 / self.temperature
        t_img, t_txt = t_img.to(s_img.dtype), t_txt.to(s_img.dtype)
        return data_parallel.kd(s_img, s_txt, t_img, t_txt, s_scale, t_scale, kind="kl", backend=self.backend)


class InteractiveContrastive(SimilarityObjective):
    """Interactive contrastive learning (ICL): the student's images against the teacher's texts.

    InfoNCE between student image embeddings and teacher caption embeddings, so the student
    lands in the teacher's space; for dual-tower students also teacher images against student
    texts, averaged. Uses the teacher's logit scale unless ``temperature`` is given. Global
    under data parallelism: the negatives are the global batch's.

    Args:
        weight: multiplier applied by ``weighted_sum``.
        temperature: softmax temperature, or None for the teacher's logit scale.
        name: log key; defaults to ``icl``.
        backend: similarity engine backend: ``auto``, ``reference``, ``tiled`` or ``cuda``.
    """

    default_name = "icl"

    def __init__(
        self, weight: float = 1.0, temperature: float | None = None, name: str | None = None, backend: str = "auto"
    ) -> None:
        super().__init__(weight=weight, name=name, backend=backend)
        self.temperature = temperature

    def _info_nce(self, a: torch.Tensor, b: torch.Tensor, scale) -> torch.Tensor:
        return data_parallel.infonce(a, b.to(a.dtype), scale, backend=self.backend)

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = 1.0 / self.temperature if self.temperature else self._get(outputs, "teacher_logit_scale")
        loss = self._info_nce(self._get(outputs, "image_embeds"), self._get(outputs, "teacher_text_embeds"), scale)
        if "text_embeds" in outputs:
            loss = (
                loss + self._info_nce(self._get(outputs, "teacher_image_embeds"), outputs["text_embeds"], scale)
            ) / 2
        return loss


class LogitDistillation(SimilarityObjective):
    """Logit KD on the zero-shot classifier: temperature-scaled KL, times T squared (Hinton).

    Student logits ``s_t * S_img @ bank.T``, teacher logits ``s_t * T_img @ bank.T`` with
    the teacher's logit scale ``s_t`` and class bank (C, D). It reads no labels, so items without
    a class (label -1) take part like the others: the teacher's soft prediction is their target.
    Local (a per-image mean) under data parallelism.

    Args:
        weight: multiplier applied by ``weighted_sum``.
        temperature: softening temperature T.
        name: log key; defaults to ``logit_kd``.
        backend: similarity engine backend: ``auto``, ``reference``, ``tiled`` or ``cuda``.
    """

    default_name = "logit_kd"

    def __init__(
        self, weight: float = 1.0, temperature: float = 2.0, name: str | None = None, backend: str = "auto"
    ) -> None:
        super().__init__(weight=weight, name=name, backend=backend)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        bank, scale = self._get(outputs, "class_bank"), self._get(outputs, "teacher_logit_scale")
        img = self._get(outputs, "image_embeds")
        bank, teacher_img = bank.to(img.dtype), self._get(outputs, "teacher_image_embeds").to(img.dtype)
        # Row-only KD over the (N, C) class logits: the bank is both sides' "text".
        s = scale / self.temperature
        loss = kd_loss(
            img, bank, teacher_img, bank.detach(), s, s, row_weight=1.0, col_weight=0.0, kind="kl", **self._engine()
        )
        return loss * self.temperature**2


class LabelCrossEntropy(Objective):
    """The labelled task: cross entropy of the student's zero-shot logits on the teacher's class bank.

    Logits ``s_t * S_img @ bank.T``; the classifier is the teacher's text class bank, so a
    student trained on labels alone is evaluated exactly like the distilled ones. Items without
    a class (label -1) are left out of the mean; a batch with none labelled gives 0. Local (a
    per-sample mean over this process's labelled items) under data parallelism.

    Args:
        weight: multiplier applied by ``weighted_sum``.
        label_smoothing: label smoothing of the cross entropy.
        name: log key; defaults to ``label_ce``.
    """

    default_name = "label_ce"

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.label_smoothing = label_smoothing

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        bank, scale = self._get(outputs, "class_bank"), self._get(outputs, "teacher_logit_scale")
        logits = scale * self._get(outputs, "image_embeds") @ bank.T
        labels = self._get(outputs, "labels")
        # No host sync: a batch without labels scores stand-in label 0, times 0 (a NaN input stays NaN).
        any_labelled = (labels >= 0).any()
        labels = torch.where(any_labelled, labels, torch.zeros_like(labels))
        loss = F.cross_entropy(logits, labels, ignore_index=-1, label_smoothing=self.label_smoothing)
        return loss * any_labelled.to(loss.dtype)


class ClassTextAlignment(Objective):
    """Align student image embeddings with the teacher's text embedding of their class.

    Mean of ``1 - cos(S_img, bank[label])``: VL2V-ADiP's alignment of the student's features
    with the teacher's text side (its image side is ``FeatureDistillation(loss="cosine")``).
    Items without a class (label -1) are left out of the mean; a batch with none labelled gives 0.

    Args:
        weight: multiplier applied by ``weighted_sum``.
        name: log key; defaults to ``class_text_align``.
    """

    default_name = "class_text_align"

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = self._get(outputs, "labels")
        target = self._get(outputs, "class_bank")[labels.clamp(min=0)]
        rows = 1 - F.cosine_similarity(self._get(outputs, "image_embeds"), target, dim=1)
        labelled = (labels >= 0).to(rows.dtype)
        masked = (rows * labelled).sum() / labelled.sum().clamp(min=1)
        return torch.where((labels >= 0).all(), rows.mean(), masked)  # the plain mean when all are labelled
