"""Contrastive pretraining / fine-tuning of an open_clip model on image-text pairs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from distill.clip_models import build_clip, save_local_dir
from distill.data_parallel import gather_rows
from distill.modules.base import VisionLanguageTask
from distill.objectives import InfoNCE, SigLIP, SoftTargetContrastive, weighted_sum
from distill.teachers import OPEN_CLIP_CKPT_KEY


class ContrastiveModule(VisionLanguageTask):
    """Train an open_clip model (image and text towers) with contrastive objectives.

    The model comes from an open_clip name (any architecture open_clip knows, random or with
    local pretrained weights) or from an open_clip model config (a dict in the YAML or a JSON
    file). Checkpoints carry the open_clip config, so ``Teacher(checkpoint=...)`` loads them;
    ``export_dir`` also receives a plain open_clip ``local-dir`` folder at the end of fit.

    Under data parallelism (``--trainer.strategy=ddp``) the contrastive objectives see the global
    batch (``distill.data_parallel``): W processes with batch B train as one with batch W x B.

    Args:
        model_name: open_clip model name, e.g. ``ViT-B-32`` or ``RN50``.
        pretrained: pretrained tag in the local cache or a weights file, to fine-tune from.
        model_config: open_clip model config (dict or JSON path), instead of ``model_name``.
        aug_cfg: training augmentation as open_clip ``AugmentationCfg`` fields, e.g.
            ``{scale: [0.9, 1.0], ratio: [1.0, 1.0]}`` (open_clip's defaults when None).
        objectives: weighted loss terms (default: symmetric InfoNCE). ``SoftTargetContrastive``
            takes its targets from the caption-caption similarity of the text tower.
        init_logit_scale: initial log of the logit scale (open_clip default: log(1/0.07)).
        init_logit_bias: initial logit bias; needed by SigLIP (e.g. -10).
        max_logit_scale: the exponentiated logit scale is clamped to this after each step.
        optimizer: optimizer class and arguments (weight decay applies to matrices only).
        lr_scheduler: optional scheduler, stepped every optimizer step.
        export_dir: folder to write the trained model to as an open_clip ``local-dir``.
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        model_config: dict | str | None = None,
        aug_cfg: dict[str, Any] | None = None,
        objectives: list[nn.Module] | None = None,
        init_logit_scale: float | None = None,
        init_logit_bias: float | None = None,
        max_logit_scale: float = 100.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["objectives", "optimizer", "lr_scheduler"])
        self.objectives = nn.ModuleList(objectives if objectives is not None else [InfoNCE()])
        if not len(self.objectives):
            raise ValueError("objectives is empty: give at least one loss term")
        if any(isinstance(o, SigLIP) for o in self.objectives) and init_logit_bias is None:
            raise ValueError(
                "the SigLIP objective needs a logit bias: set init_logit_bias (e.g. -10.0) "
                "and init_logit_scale (e.g. 2.3026 = log 10)"
            )
        self._needs_target_similarity = any(isinstance(o, SoftTargetContrastive) for o in self.objectives)
        extra: dict[str, Any] = {}
        if init_logit_scale is not None:
            extra["init_logit_scale"] = init_logit_scale
        if init_logit_bias is not None:
            extra["init_logit_bias"] = init_logit_bias
        bundle = build_clip(
            model_name=model_name, pretrained=pretrained, model_config=model_config, aug_cfg=aug_cfg, **extra
        )
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        self.preprocess_train = bundle.preprocess_train
        self.preprocess_val = bundle.preprocess_val
        self.open_clip_config = {"model_cfg": bundle.model_config, "preprocess_cfg": bundle.preprocess_config}
        self.max_log_scale = math.log(max_logit_scale)
        self.export_dir = export_dir

    # The base task's surface --------------------------------------------------------------
    @property
    def has_text_tower(self) -> bool:
        return True

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned temperature, exponentiated (a scalar tensor)."""
        return self.model.logit_scale.exp()

    def export_network(self) -> nn.Module:
        """The open_clip model (both towers)."""
        return self.model

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, D) embeddings."""
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(M, L) token ids -> (M, D) embeddings."""
        return self.model.encode_text(tokens, normalize=normalize)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embed a batch of pairs into the ``outputs`` dict the objectives read."""
        outputs = {
            "image_embeds": self.encode_image(images),
            "text_embeds": self.encode_text(tokens),
            "logit_scale": self.logit_scale,
        }
        if getattr(self.model, "logit_bias", None) is not None:
            outputs["logit_bias"] = self.model.logit_bias
        if self._needs_target_similarity:
            # CWCL-style soft targets: how alike the captions are, by the text tower itself; this
            # process's captions against the global batch's, (N_r, N) (N_r = N on one process).
            texts = outputs["text_embeds"].detach()
            outputs["target_similarity"] = texts @ gather_rows(texts).T
        return outputs

    # Steps -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if "text" not in batch:
            raise KeyError("batch has no 'text' tokens: the datamodule got no tokenizer from this module")
        outputs = self(batch["image"], batch["text"])
        loss, terms = weighted_sum(self.objectives, outputs)
        batch_size = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/loss_{k}": v for k, v in terms.items()}, batch_size=batch_size)
        self.log("train/logit_scale", outputs["logit_scale"].detach(), batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # CLIP's clamp of the learnable temperature, applied to the parameter itself.
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.max_log_scale)

    def eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor | None]:
        """Embeddings for evaluation, and the contrastive loss of the batch's pairs logged as ``<stage>/loss``."""
        if "text" not in batch:
            return self.eval_outputs(batch)
        outputs = self(batch["image"], batch["text"])
        loss, _ = weighted_sum(self.objectives, outputs)
        self.log(f"{stage}/loss", loss, batch_size=batch["image"].shape[0])
        return {"image_embeds": outputs["image_embeds"], "text_embeds": outputs["text_embeds"]}

    # Optimisation ----------------------------------------------------------------------------
    def trainable_parameters(self):
        """The open_clip model's parameters (the objectives hold none)."""
        return self.model.named_parameters()

    # Checkpoints and export ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[OPEN_CLIP_CKPT_KEY] = self.open_clip_config

    def output_dirs(self) -> dict[str, str]:
        return {"export_dir": self.export_dir} if self.export_dir else {}

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            self.export_open_clip(self.export_dir)

    def export_open_clip(self, folder: str | Path) -> Path:
        """Write the model as an open_clip ``local-dir`` folder (config + safetensors)."""
        return save_local_dir(
            self.model, self.open_clip_config["model_cfg"], self.open_clip_config["preprocess_cfg"], folder
        )
