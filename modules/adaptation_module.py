"""Adaptation of a frozen open_clip model to a task: prompt learning, LoRA, or both."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from distill.adapt_objectives import AdaptedCrossEntropy
from distill.clip_models import save_local_dir
from distill.lora import LoraSpec, adapters_disabled, apply_lora, merge_lora, save_adapters
from distill.modules.base import VisionLanguageTask
from distill.objectives import apply_overrides, weighted_sum
from distill.prompt_files import save_prompt_file
from distill.prompts import PromptLearner
from distill.teachers import load_clip

PromptLearnerCallable = Callable[[nn.Module, Callable[[list[str]], torch.Tensor]], PromptLearner]
"""A prompt learner class and its arguments; the module passes the model and its tokenizer."""


class LazyOutputs(Mapping):
    """The objectives' ``outputs`` dict, computing each entry on first read.

    Objectives read what they need (``distill.adapt_objectives`` lists the keys); an entry that no
    objective reads (the frozen model's image features, the zero-shot bank) is never computed.
    Iteration lists the computed entries only.
    """

    def __init__(self, providers: dict[str, Callable[[], torch.Tensor]]) -> None:
        self._providers, self._values = dict(providers), {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._values:
            if key not in self._providers:
                raise KeyError(key)
            self._values[key] = self._providers.pop(key)()
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._values or key in self._providers

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._values))

    def __len__(self) -> int:
        return len(self._values)


class AdaptationModule(VisionLanguageTask):
    """Tune a frozen open_clip model to a task with few labels and few trainable parameters.

    The method is a prompt learner (``distill.prompts``: CoOp, CoCoOp, deep multimodal prompts),
    LoRA adapters (``distill.lora``), or both. The classifier is the adapted model's class text
    features over the datamodule's training classes (``train_class_indices``: the base classes
    of a base-to-novel split); evaluation uses the same features for whatever classes the
    datamodule evaluates (seen or unseen), through the ``ZeroShotEvaluation`` callback.

    Objectives read the ``outputs`` keys of ``distill.adapt_objectives``: cross entropy alone
    (CoOp, CoCoOp, MaPLe, CLIP-LoRA), plus the knowledge-guided term (KgCoOp) or the
    self-regulating terms (PromptSRC, with the ``GaussianPromptAveraging`` callback).

    Args:
        model_name: open_clip model name or ``local-dir:/folder`` of the model to adapt.
        pretrained: pretrained tag in the local cache, or a weights file.
        checkpoint: a distill training checkpoint, an open_clip state dict or a local-dir folder.
        model_config: open_clip model config (dict or JSON path).
        prompt_learner: prompt learner class and arguments (the model and tokenizer are passed in).
        lora: LoRA adapters on the model's attention (and optionally MLP) layers.
        objectives: weighted loss terms (default: cross entropy on the adapted logits).
        objective_overrides: constructor arguments replaced in ``objectives``, keyed by the term's
            log name (``train/loss_<name>``): ``{name: {argument: value}}``. Sweeps and the command
            line set one term with ``--model.init_args.objective_overrides.kg.weight=4`` (a list
            element cannot be addressed there); see ``distill.objectives.apply_overrides``.
        templates: prompt templates of the frozen zero-shot classifier and of LoRA's class text
            (default: the datamodule's).
        export_dir: folder written at the end of fit: ``adapters.safetensors`` and the merged
            ``open_clip`` local-dir (LoRA), ``prompts.pt`` (prompt learner).
        optimizer: optimizer class and arguments.
        lr_scheduler: optional scheduler, stepped every optimizer step.
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        model_config: dict | str | None = None,
        prompt_learner: PromptLearnerCallable | None = None,
        lora: LoraSpec | None = None,
        objectives: list[nn.Module] | None = None,
        objective_overrides: dict[str, dict[str, float]] | None = None,
        templates: list[str] | None = None,
        export_dir: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        if prompt_learner is None and lora is None:
            raise ValueError("AdaptationModule needs a method: prompt_learner, lora, or both")
        self.save_hyperparameters(ignore=["prompt_learner", "objectives", "optimizer", "lr_scheduler"])
        self.bundle = load_clip(model_name, pretrained, checkpoint, model_config)
        self.model = self.bundle.model
        self.model.requires_grad_(False)
        self.lora = lora
        if lora is not None:
            apply_lora(self.model, lora)
        self.prompt_learner = prompt_learner(self.model, self.bundle.tokenizer) if prompt_learner else None
        objectives = objectives if objectives is not None else [AdaptedCrossEntropy()]
        if objective_overrides:
            objectives = apply_overrides(objectives, objective_overrides, "objective_overrides")
        self.objectives = nn.ModuleList(objectives)
        self.templates, self.export_dir = templates, export_dir
        self.preprocess_train = self.bundle.preprocess_train
        self.preprocess_val = self.bundle.preprocess_val
        self.tokenizer = self.bundle.tokenizer
        self._zero_shot_banks: dict[tuple[str, ...], torch.Tensor] = {}
        self.model.eval()

    def setup(self, stage: str) -> None:
        # A class-specific context is created for the training classes now, before the optimizer.
        if self.prompt_learner is not None and stage == "fit":
            self.prompt_learner.set_classnames(self._train_classes()[0])

    # Modes -----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> AdaptationModule:
        """The frozen model stays in eval mode (batch-norm statistics, dropout); adapter dropout trains."""
        super().train(mode)
        self.model.eval()
        for name, module in self.model.named_modules():
            if "lora_dropout" in name:
                module.train(mode)
        return self

    def _frozen(self):
        """A context in which the model computes as before adaptation (adapters off)."""
        return adapters_disabled(self.model) if self.lora is not None else nullcontext()

    # Encoders ------------------------------------------------------------------------------
    @property
    def has_text_tower(self) -> bool:
        return True

    @property
    def image_conditioned(self) -> bool:
        """Whether class text features depend on each image (CoCoOp)."""
        return self.prompt_learner is not None and self.prompt_learner.image_conditioned

    @property
    def logit_scale(self) -> torch.Tensor:
        """The model's learned temperature, exponentiated (frozen)."""
        return self.model.logit_scale.exp()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, D) adapted image features."""
        if self.prompt_learner is not None:
            return self.prompt_learner.encode_image(images, normalize=normalize)
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(M, L) token ids -> (M, D) text features of the (LoRA-adapted) text tower."""
        return self.model.encode_text(tokens, normalize=normalize)

    def class_text_features(
        self, classnames: Sequence[str], image_embeds: torch.Tensor | None = None, templates: Sequence[str] = ()
    ) -> torch.Tensor:
        """Adapted class text features: (C, D), or (B, C, D) for an image-conditioned learner.

        A prompt learner's context replaces the templates; LoRA alone averages the (adapted)
        text features of ``templates`` per class.
        """
        learner = self.prompt_learner
        if learner is None:
            return self._template_features(classnames, templates)
        if list(learner.classnames) != list(classnames):
            learner.set_classnames(classnames)
        return learner.class_text_features(image_embeds if learner.image_conditioned else None)

    def _template_features(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        if not templates:
            raise ValueError("LoRA's class text needs prompt templates (the module's or the datamodule's)")
        prompts = [t.format(c) for c in classnames for t in templates]
        tokens = self.tokenizer(prompts).to(self.device)
        per_prompt = self.encode_text(tokens).view(len(classnames), len(templates), -1)
        return nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)

    @torch.no_grad()
    def class_bank(
        self,
        classnames: Sequence[str],
        templates: Sequence[str],
        descriptors: Mapping[str, Sequence[str]] | None = None,
    ) -> torch.Tensor:
        """(C, D) adapted class features (a prompt learner's context replaces ``templates``)."""
        if self.image_conditioned:
            raise ValueError(
                f"{type(self.prompt_learner).__name__}'s class features depend on each image: "
                "use image_conditioned_logits (ZeroShotEvaluation does)"
            )
        if descriptors is not None and self.prompt_learner is not None:
            raise ValueError("class descriptors extend templates; a prompt learner has learned context instead")
        if descriptors is not None:
            return super().class_bank(classnames, templates, descriptors)
        return self.class_text_features(classnames, templates=self.templates or templates).detach()

    @torch.no_grad()
    def image_conditioned_logits(
        self, image_embeds: torch.Tensor, classnames: Sequence[str], templates: Sequence[str], chunk: int = 256
    ) -> torch.Tensor:
        """(N, C) cosine logits of an image-conditioned learner, ``chunk`` images at a time."""
        rows = []
        for start in range(0, image_embeds.shape[0], chunk):
            part = image_embeds[start : start + chunk]
            text = self.class_text_features(classnames, part)
            rows.append(torch.einsum("bd,bcd->bc", part, text.to(part.dtype)))
        return torch.cat(rows)

    # Training ----------------------------------------------------------------------------------
    def _train_classes(self) -> tuple[list[str], torch.Tensor]:
        """Training class names and the map from dataset label to their position (-1: not trained on)."""
        datamodule = self.trainer.datamodule
        indices = list(datamodule.train_class_indices)
        position = torch.full((len(datamodule.classnames),), -1, dtype=torch.long, device=self.device)
        position[torch.tensor(indices, device=self.device)] = torch.arange(len(indices), device=self.device)
        return [datamodule.classnames[i] for i in indices], position

    def _templates(self) -> list[str]:
        return list(self.templates or self.trainer.datamodule.templates)

    @torch.no_grad()
    def zero_shot_bank(self, classnames: Sequence[str]) -> torch.Tensor:
        """(C, D) the frozen model's hand-crafted classifier (templates averaged), cached per class list."""
        key = tuple(classnames)
        if key not in self._zero_shot_banks:
            with self._frozen():
                self._zero_shot_banks[key] = self._template_features(classnames, self._templates())
        return self._zero_shot_banks[key]

    @torch.no_grad()
    def _frozen_image_embeds(self, images: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
        if self.lora is None and (self.prompt_learner is None or not self.prompt_learner.prompts_image_tower):
            return adapted.detach()  # the image tower is not adapted: frozen features are the same
        with self._frozen():
            return self.model.encode_image(images, normalize=True)

    def forward(self, batch: dict[str, Any]) -> LazyOutputs:
        """The ``outputs`` the objectives read (``distill.adapt_objectives``), computed on demand."""
        classnames, position = self._train_classes()
        image_embeds = self.encode_image(batch["image"])
        text = self.class_text_features(classnames, image_embeds, self._templates())
        scale = self.logit_scale
        logits = scale * (image_embeds @ text.T if text.ndim == 2 else torch.einsum("bd,bcd->bc", image_embeds, text))
        return LazyOutputs(
            {
                "image_embeds": lambda: image_embeds,
                "class_text_embeds": lambda: text,
                "logits": lambda: logits,
                "labels": lambda: position[batch["label"].clamp(min=0)].masked_fill(batch["label"] < 0, -1),
                "logit_scale": lambda: scale,
                "zero_shot_class_bank": lambda: self.zero_shot_bank(classnames),
                "frozen_image_embeds": lambda: self._frozen_image_embeds(batch["image"], image_embeds),
            }
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, terms = weighted_sum(self.objectives, self(batch))
        size = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train/loss_{k}": v for k, v in terms.items()}, batch_size=size)
        return loss

    def trainable_parameter_count(self) -> int:
        """Number of trained values (prompts, meta-net, couplings, LoRA A and B)."""
        return sum(p.numel() for _, p in self.trainable_parameters())

    # Checkpoints: the trained parts only --------------------------------------------------------
    def _is_trained_key(self, key: str) -> bool:
        return key.startswith("prompt_learner.") or "lora_" in key

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        # The frozen model is rebuilt from its source: checkpoints hold prompts and adapters only.
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if self._is_trained_key(k)}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if self._is_trained_key(k)]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"adaptation weights do not match this module (prompt learner / LoRA settings differ?): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    # Outputs -----------------------------------------------------------------------------------
    def merged_model(self) -> nn.Module:
        """A stock open_clip model with the LoRA adapters folded in (a copy; this module is unchanged)."""
        model = copy.deepcopy(self.model)
        return merge_lora(model) if self.lora is not None else model

    def export_network(self) -> nn.Module:
        """The adapted model: merged LoRA weights, and the prompt learner's image tower when it has one."""
        if self.image_conditioned:
            raise ValueError(
                f"{type(self.prompt_learner).__name__} conditions class features on each image, which a fixed "
                "ONNX classifier cannot hold: export a CoOp, deep-prompt or LoRA model, or distil it into a student"
            )
        if self.prompt_learner is None:
            return self.merged_model()
        return _PromptedModel(self.merged_model() if self.lora is not None else self.model, self.prompt_learner)

    def output_dirs(self) -> dict[str, str]:
        return {"export_dir": self.export_dir} if self.export_dir else {}

    def save_adaptation(self, folder: str | Path) -> dict[str, str]:
        """Write the adaptation: ``adapters.safetensors`` + merged ``open_clip`` folder (LoRA) and
        ``prompts.pt`` (prompt learner). Returns the written paths by kind."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written: dict[str, str] = {}
        if self.lora is not None:
            written["adapters"] = str(save_adapters(self.model, self.lora, folder / "adapters.safetensors"))
            merged = self.merged_model().float()
            written["open_clip"] = str(
                save_local_dir(merged, self.bundle.model_config, self.bundle.preprocess_config, folder / "open_clip")
            )
        if self.prompt_learner is not None:
            written["prompts"] = str(save_prompt_file(self.prompt_learner, folder / "prompts.pt"))
        return written

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            for kind, path in self.save_adaptation(self.export_dir).items():
                rank_zero_info(f"adaptation {kind}: {path}")


class _PromptedModel(nn.Module):
    """The export view of a prompt-tuned model: the learner's image tower, the model's text tower."""

    def __init__(self, model: nn.Module, learner: PromptLearner) -> None:
        super().__init__()
        self.model, self.learner = model, learner

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.learner.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)
