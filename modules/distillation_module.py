"""Distillation of a frozen vision-language teacher into a compact student."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from distill.augment_replay import AugmentReplay
from distill.kd_objectives import LabelCrossEntropy
from distill.modules.base import VisionLanguageTask
from distill.objectives import apply_overrides, weighted_sum
from distill.run_info import teacher_fingerprint
from distill.students import Student
from distill.teacher_cache import CacheMissError, CacheTensors, TeacherCache
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

    Teacher cache (``teacher_cache``, a folder ``distill cache`` wrote): training images become
    the cache's stored augmented views (a view id drawn per sample, carried as ``aug_id``) and
    the teacher's embeddings of them are read from the cache, by (item, view). The cache is
    checked against the teacher's fingerprint when the module is built and against the
    training split's item keys in ``setup``. An item the cache lacks is embedded by the online
    teacher, or is an error without one. Without a teacher, ``embed_dim``, ``logit_scale`` and
    the class bank come from the cache.

    Args:
        teacher: the frozen teacher (open_clip name + tag, checkpoint, local-dir or config); may be
            None with a ``teacher_cache``.
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
            Not used with ``teacher_cache``.
        teacher_cache: folder of a teacher embedding cache (``distill cache``); the datamodule's
            ``augment`` must then be ``none`` (the cache replays its own augmentations).
        teacher_cache_embeddings: read the teacher's embeddings from the cache; False takes only
            the augmentations from it and runs the online teacher on every batch (to check that
            both agree, or to time the teacher).
        optimizer: optimizer class and arguments.
        lr_scheduler: optional scheduler, stepped every optimizer step.
    """

    def __init__(
        self,
        teacher: Teacher | None,
        student: Callable[[int], Student],
        objectives: list[nn.Module] | None = None,
        align_objectives: list[nn.Module] | None = None,
        align_steps: int = 0,
        objective_overrides: dict[str, dict[str, float]] | None = None,
        templates: list[str] | None = None,
        cache_teacher: bool = True,
        teacher_cache: str | None = None,
        teacher_cache_embeddings: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(
            ignore=["teacher", "student", "objectives", "align_objectives", "optimizer", "lr_scheduler"]
        )
        if teacher is None and (teacher_cache is None or not teacher_cache_embeddings):
            raise ValueError(
                "DistillationModule needs a teacher, or a teacher_cache that supplies the embeddings "
                "(teacher_cache_embeddings: true)"
            )
        self.teacher = teacher
        self.embedding_cache = TeacherCache(teacher_cache) if teacher_cache is not None else None
        self.teacher_cache_embeddings = teacher_cache_embeddings
        #: The cache's stored augmentations; the datamodule replays them on training images.
        self.augment_replay: AugmentReplay | None = None
        if self.embedding_cache is not None:
            if teacher is not None:  # before any training: a foreign or stale cache is an error now
                self.embedding_cache.check_teacher(teacher_fingerprint(teacher))
            self.augment_replay = self.embedding_cache.replay()
            # Not a parameter and not saved: it follows the module's device.
            self.register_buffer("_cache_logit_scale", torch.tensor(self.embedding_cache.logit_scale), persistent=False)
        embed_dim = teacher.embed_dim if teacher is not None else self.embedding_cache.embed_dim
        self.student = student(embed_dim)
        if not isinstance(self.student, Student):
            raise TypeError(f"student must be a distill.students.Student, got {type(self.student).__name__}")
        if self.student.embed_dim != embed_dim:
            raise ValueError(
                f"student embeds into {self.student.embed_dim} dimensions but the teacher into {embed_dim}: "
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
        self.teacher_preprocess = teacher.preprocess if teacher is not None else None
        self.teacher_tokenizer = teacher.tokenizer if teacher is not None else None
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_rows: torch.Tensor | None = None  # training item -> cache row (-1: not cached)
        self._cache_tensors: CacheTensors | None = None

    def setup(self, stage: str) -> None:
        """Match the teacher cache to the training split's items and bind the augmentation replay.

        Raises:
            ForeignCacheError: no training item is in the cache.
            CacheMissError: items the cache lacks, and no online teacher to embed them.
        """
        if self.embedding_cache is None or stage != "fit":
            return
        cache, datamodule = self.embedding_cache, self.trainer.datamodule
        keys = datamodule.item_keys("train")
        rows = cache.rows_for(keys, f"{type(datamodule).__name__}'s training split")
        missing = torch.nonzero(rows < 0).flatten().tolist()
        if missing and self.teacher is None:
            shown = ", ".join(repr(keys[i]) for i in missing[:3])
            raise CacheMissError(
                f"{cache.folder}: {len(missing)} of {len(keys)} training items are not in the teacher cache "
                f"(item {missing[0]}: {shown}) and the module has no teacher to embed them: rebuild the cache "
                "for this data, or give the module its teacher"
            )
        if missing:
            rank_zero_warn(
                f"{cache.folder}: {len(missing)} of {len(keys)} training items are not in the teacher cache "
                f"(e.g. {keys[missing[0]]!r}); the online teacher embeds them"
            )
        self._cache_tensors = cache.load()
        self._cache_rows = rows
        online = self.teacher is not None and (bool(missing) or not self.teacher_cache_embeddings)
        self.augment_replay.bind(self._cache_tensors.params, rows, keys, needs_teacher_views=online)

    # Encoders ------------------------------------------------------------------------------
    @property
    def has_text_tower(self) -> bool:
        """Whether the student has a text tower of its own."""
        return self.student.has_text_tower

    @property
    def logit_scale(self) -> torch.Tensor:
        """The teacher's temperature (the cache's without a teacher): predictions use its text class bank."""
        return self.teacher.logit_scale if self.teacher is not None else self._cache_logit_scale

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
        """The classifier: the teacher's (C, D) text class bank (cached per class list; from the teacher cache
        when the module has no teacher)."""
        if self.teacher is not None:
            return self.teacher.class_bank(classnames, templates, descriptors)
        if descriptors is not None:
            raise CacheMissError("class descriptors need the online teacher: the teacher cache holds templates only")
        return self.embedding_cache.class_bank(list(classnames), list(templates)).to(self.device)

    def _train_bank(self) -> torch.Tensor:
        datamodule = self.trainer.datamodule
        return self.class_bank(datamodule.classnames, self.templates or datamodule.templates)

    @torch.no_grad()
    def _teacher_embeddings(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher (image, caption) embeddings of the batch, from the cache when filled.

        Caption embeddings are cached per item; image embeddings only while the images are
        not randomly augmented (an augmented image differs every epoch).
        """
        if self.embedding_cache is not None and self.training:
            return self._from_teacher_cache(batch)
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

    def _from_teacher_cache(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) image and caption embeddings of the batch's replayed views: cached rows from the teacher
        cache, the others (or all, without ``teacher_cache_embeddings``) from the online teacher."""
        if "aug_id" not in batch or self._cache_tensors is None:
            raise RuntimeError(
                "training batch without 'aug_id': with a teacher_cache the datamodule must replay the cache's "
                "augmentations (connect it to this module and let the Trainer run setup)"
            )
        index, aug_id = batch["index"].cpu(), batch["aug_id"].cpu()
        rows = self._cache_rows[index]
        hit = rows >= 0 if self.teacher_cache_embeddings else torch.zeros_like(rows, dtype=torch.bool)
        image = self._cache_tensors.image[rows[hit], aug_id[hit]].to(self.device)
        text = self._cache_tensors.text[rows[hit]].to(self.device)
        if bool(hit.all()):
            return image, text
        if self.teacher is None:
            item = int(index[~hit][0])
            raise CacheMissError(f"training item {item} is not in the teacher cache {self.embedding_cache.folder}")
        if "teacher_image" not in batch or "teacher_text" not in batch:
            raise KeyError("batch lacks 'teacher_image'/'teacher_text': the datamodule got no teacher views")
        if not bool(hit.any()):  # the whole batch online, exactly as without a cache
            return self.teacher.encode_image(batch["teacher_image"]), self.teacher.encode_text(batch["teacher_text"])
        miss = ~hit
        online_image = self.teacher.encode_image(batch["teacher_image"][miss.to(self.device)]).float()
        online_text = self.teacher.encode_text(batch["teacher_text"][miss.to(batch["teacher_text"].device)]).float()
        full_image = image.new_empty(len(rows), image.shape[1])
        full_text = text.new_empty(len(rows), text.shape[1])
        full_image[hit.to(self.device)], full_text[hit.to(self.device)] = image, text
        full_image[miss.to(self.device)], full_text[miss.to(self.device)] = online_image, online_text
        return full_image, full_text

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
            "teacher_logit_scale": self.logit_scale,
            "logit_scale": self.logit_scale,
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
