"""Distillation of a frozen vision-language teacher into a compact student."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from distill.kd_objectives import LabelCrossEntropy
from distill.modules.base import VisionLanguageTask
from distill.objectives import apply_overrides, weighted_sum
from distill.students import Student
from distill.teachers import Teacher


class DistillationModule(VisionLanguageTask):
    """Train a student on a frozen teacher's embeddings with weighted distillation objectives.

    The teacher (frozen, eval mode) and the student each see their own view of the same raw
    sample (resolution, mean/std) and tokenize with their own tokenizer. The student's width
    is the teacher's: ``student`` is given without ``embed_dim`` and built here with
    ``teacher.embed_dim``. Predictions use the teacher's text class bank as the classifier.

    VL2V-ADiP (align, distill, predict): with ``align_steps > 0`` the first steps train on
    ``align_objectives`` (alignment of the student's features with the teacher's image and
    text embeddings), the remaining steps on ``objectives``.

    Args:
        teacher: the frozen teacher (open_clip name + tag, checkpoint, local-dir or config).
        student: student class and arguments, without ``embed_dim`` (e.g. ``TimmStudent``).
        objectives: weighted loss terms of the distillation stage (default: labels only).
        align_objectives: loss terms of the alignment stage (VL2V-ADiP stage 1).
        align_steps: optimizer steps spent on the alignment stage.
        objective_overrides: constructor arguments replaced in the objectives of both stages, keyed
            by the term's log name (``train/loss_<name>``): ``{name: {argument: value}}``; a name
            used in both stages is changed in both. Sweeps and the command line set one term with
            ``--model.init_args.objective_overrides.logit_kd.temperature=4`` (a list element
            cannot be addressed there); see ``distill.objectives.apply_overrides``.
        templates: zero-shot templates for the training class bank (default: the datamodule's).
        cache_teacher: keep the teacher's embeddings of each training item in memory after
            their first computation, so later epochs skip the teacher's forward pass. Batches
            of randomly augmented images (``batch["augmented"]``) always run the teacher.
        optimizer: optimizer class and arguments.
        lr_scheduler: optional scheduler, stepped every optimizer step.
    """

    def __init__(
        self,
        teacher: Teacher,
        student: Callable[[int], Student],
        objectives: list[nn.Module] | None = None,
        align_objectives: list[nn.Module] | None = None,
        align_steps: int = 0,
        objective_overrides: dict[str, dict[str, float]] | None = None,
        templates: list[str] | None = None,
        cache_teacher: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(
            ignore=["teacher", "student", "objectives", "align_objectives", "optimizer", "lr_scheduler"]
        )
        self.teacher = teacher
        self.student = student(teacher.embed_dim)
        if not isinstance(self.student, Student):
            raise TypeError(f"student must be a distill.students.Student, got {type(self.student).__name__}")
        if self.student.embed_dim != teacher.embed_dim:
            raise ValueError(
                f"student embeds into {self.student.embed_dim} dimensions but the teacher into {teacher.embed_dim}: "
                "the student needs a projection to the teacher's width"
            )
        objectives = list(objectives) if objectives is not None else [LabelCrossEntropy()]
        align_objectives = list(align_objectives or [])
        if objective_overrides:
            both = apply_overrides([*objectives, *align_objectives], objective_overrides, "objective_overrides")
            objectives, align_objectives = both[: len(objectives)], both[len(objectives) :]
        self.objectives = nn.ModuleList(objectives)
        self.align_objectives = nn.ModuleList(align_objectives)
        if align_steps > 0 and not len(self.align_objectives):
            raise ValueError("align_steps > 0 needs align_objectives (VL2V-ADiP stage 1)")
        self.align_steps, self.templates, self.cache_teacher = align_steps, templates, cache_teacher
        # What the datamodule reads: the student's views and tokenizer, plus the teacher's.
        self.preprocess_train = self.student.preprocess_train
        self.preprocess_val = self.student.preprocess_val
        self.tokenizer = self.student.tokenizer
        self.teacher_preprocess = teacher.preprocess
        self.teacher_tokenizer = teacher.tokenizer
        self._cache: dict[str, torch.Tensor] = {}

    # Encoders ------------------------------------------------------------------------------
    @property
    def has_text_tower(self) -> bool:
        """Whether the student has a text tower of its own."""
        return self.student.has_text_tower

    @property
    def logit_scale(self) -> torch.Tensor:
        """The teacher's temperature: predictions use the teacher's text class bank."""
        return self.teacher.logit_scale

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Student text embeddings (M, D) (dual-tower students)."""
        return self.student.encode_text(tokens, normalize=normalize)

    def export_network(self) -> nn.Module:
        """The student (the teacher and the objectives are training-only)."""
        return self.student

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Student image embeddings (N, D)."""
        return self.student.encode_image(images, normalize=normalize)

    def class_bank(
        self,
        classnames: Sequence[str],
        templates: Sequence[str],
        descriptors: Mapping[str, Sequence[str]] | None = None,
    ) -> torch.Tensor:
        """The classifier: the teacher's (C, D) text class bank (cached per class list)."""
        return self.teacher.class_bank(classnames, templates, descriptors)

    def _train_bank(self) -> torch.Tensor:
        datamodule = self.trainer.datamodule
        return self.class_bank(datamodule.classnames, self.templates or datamodule.templates)

    @torch.no_grad()
    def _teacher_embeddings(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher (image, caption) embeddings of the batch, from the cache when filled.

        Caption embeddings are cached per item; image embeddings only while the images are
        not randomly augmented (an augmented image differs every epoch).
        """
        if "teacher_image" not in batch or "teacher_text" not in batch:
            raise KeyError("batch lacks 'teacher_image'/'teacher_text': the datamodule got no teacher views")
        index = batch.get("index")
        use_cache = self.cache_teacher and self.training and index is not None
        image_cacheable = use_cache and not batch.get("augmented", False)
        image = self._cached("image", index) if image_cacheable else None
        text = self._cached("text", index) if use_cache else None
        if image is None:
            image = self.teacher.encode_image(batch["teacher_image"])
            if image_cacheable:
                self._store("image", index, image)
        if text is None:
            text = self.teacher.encode_text(batch["teacher_text"])
            if use_cache:
                self._store("text", index, text)
        return image, text

    def _cached(self, kind: str, index: torch.Tensor) -> torch.Tensor | None:
        """Cached (B, D) teacher embeddings of ``kind`` for these items, if all are filled."""
        if kind not in self._cache or not bool(self._cache[kind + "_filled"][index].all()):
            return None
        return self._cache[kind][index]

    def _store(self, kind: str, index: torch.Tensor, values: torch.Tensor) -> None:
        if kind not in self._cache:
            # One row per training item: the datamodule's ``index`` addresses them.
            size = self.trainer.datamodule.num_items("train")
            self._cache[kind] = values.new_zeros(size, values.shape[1])
            self._cache[kind + "_filled"] = torch.zeros(size, dtype=torch.bool, device=values.device)
        self._cache[kind][index] = values
        self._cache[kind + "_filled"][index] = True

    def forward(self, batch: dict[str, Any], with_teacher: bool = True) -> dict[str, torch.Tensor]:
        """The ``outputs`` dict every objective reads (see ``distill.kd_objectives``).

        With ``with_teacher=False`` the teacher's embeddings are left out (and not computed).
        """
        outputs = {
            "image_embeds": self.encode_image(batch["image"]),
            "teacher_logit_scale": self.teacher.logit_scale,
            "logit_scale": self.teacher.logit_scale,
            "labels": batch["label"],
        }
        if with_teacher:
            outputs["teacher_image_embeds"], outputs["teacher_text_embeds"] = self._teacher_embeddings(batch)
        if self.has_text_tower:
            outputs["text_embeds"] = self.student.encode_text(batch["text"])
            outputs["logit_scale"] = self.student.logit_scale
        return outputs

    # Steps -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        objectives = self.align_objectives if self.global_step < self.align_steps else self.objectives
        # Labels alone read only the class bank: skip the teacher's per-batch forward pass.
        outputs = self(batch, with_teacher=not all(isinstance(o, LabelCrossEntropy) for o in objectives))
        outputs["class_bank"] = self._train_bank()
        loss, terms = weighted_sum(objectives, outputs)
        size = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train/loss_{k}": v for k, v in terms.items()}, batch_size=size)
        return loss

    def trainable_parameters(self):
        """The student's parameters (the teacher is frozen)."""
        return self.student.named_parameters()

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        # The frozen teacher is rebuilt from its own source; checkpoints hold the student only.
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("teacher.")}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if strict and (missing or unexpected):
            raise RuntimeError(f"student weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)
