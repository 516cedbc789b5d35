"""Compact students that map images (and, for dual towers, text) into a teacher's space.

Two kinds, both with ``encode_image(images) -> (N, D_teacher)``:

* :class:`TimmStudent`: any timm image model (by name, random init by default or local
  weights) plus a projection into the teacher's embedding width; its preprocessing comes from
  timm's data config at the chosen resolution.
* :class:`OpenClipStudent`: a small open_clip dual tower built from an open_clip config; it
  also has ``encode_text`` and its own tokenizer.

The embedding width ``embed_dim`` is the teacher's: the distillation module passes it, so it is
never typed twice in a config.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import open_clip
import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from torch import nn

from distill.clip_models import build_clip, check_model_name, load_model_config
from distill.lora import LoraSpec, apply_lora


def check_timm_name(model_name: str) -> str:
    """Return ``model_name`` if timm knows it, else raise with the closest names."""
    if model_name in timm.list_models():
        return model_name
    close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ValueError(f"unknown timm model name {model_name!r}{hint}")


class Student(nn.Module):
    """What every student offers the distillation module (subclass it for a student of your own).

    Attributes set in ``__init__``: ``embed_dim`` (the teacher's width D), ``preprocess_train``
    and ``preprocess_val`` (PIL image -> (3, H, W) tensor), ``tokenizer`` (None for an
    image-only student). A dual-tower student sets ``has_text_tower`` and implements
    ``encode_text``.

    Args:
        embed_dim: output width D; set from the teacher by the distillation module.
    """

    #: Whether the student embeds captions with a text tower of its own.
    has_text_tower: bool = False

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.preprocess_train: Callable | None = None
        self.preprocess_val: Callable | None = None
        self.tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, 3, H, W) -> (N, embed_dim) embeddings in the teacher's space."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode_image")

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(M, L) token ids -> (M, embed_dim); dual-tower students only."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    @property
    def logit_scale(self) -> torch.Tensor:
        """A dual-tower student's own temperature (exponentiated)."""
        raise NotImplementedError(f"{type(self).__name__} has no temperature of its own")

    @property
    def image_size(self) -> int:
        """Input resolution (square side) of the image tower."""
        raise NotImplementedError(f"{type(self).__name__} must define image_size")

    def image_tower_params(self) -> int:
        """Parameters of the image tower."""
        return sum(p.numel() for p in self.parameters())


class TimmStudent(Student):
    """A timm image tower with a projection into the teacher's embedding space.

    Args:
        embed_dim: output width D; set from the teacher by the distillation module.
        model_name: timm model name, e.g. ``mobilenetv3_small_050`` or ``resnet10t``.
        pretrained: local weights file for the timm model (nothing is downloaded); random
            initialisation when None.
        image_size: input resolution; the timm default when None.
        projection: ``linear`` or ``mlp`` (Linear-GELU-Linear) head into the teacher's space.
        drop_rate: dropout before the projection.
    """

    def __init__(
        self,
        embed_dim: int,
        model_name: str = "mobilenetv3_small_050",
        pretrained: str | None = None,
        image_size: int | None = None,
        projection: Literal["linear", "mlp"] = "linear",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(embed_dim)
        check_timm_name(model_name)
        if pretrained is not None and not os.path.isfile(pretrained):
            raise FileNotFoundError(f"timm weights file not found: {pretrained}")
        self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0, drop_rate=drop_rate)
        if pretrained is not None:
            timm.models.load_checkpoint(self.trunk, pretrained, strict=False)
        # Pooled output width: models with a pre-logits head (MobileNetV3...) report it as
        # head_hidden_size, others as num_features.
        width = getattr(self.trunk, "head_hidden_size", None) or self.trunk.num_features
        if projection == "linear":
            self.proj = nn.Linear(width, embed_dim)
        elif projection == "mlp":
            self.proj = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))
        else:
            raise ValueError(f"projection must be 'linear' or 'mlp', got {projection!r}")
        data_cfg = resolve_data_config({}, model=self.trunk)
        if image_size is not None:
            data_cfg["input_size"] = (3, image_size, image_size)
            data_cfg["crop_pct"] = 1.0
        self.data_config: dict[str, Any] = data_cfg
        self.preprocess_val = create_transform(**data_cfg, is_training=False)
        # Distillation compares the student with the teacher on the same image: no random
        # crop or flip, which would make the two views disagree.
        self.preprocess_train = self.preprocess_val

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_features) pooled trunk features."""
        return self.trunk(images)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, 3, H, W) -> (N, embed_dim) embeddings in the teacher's space."""
        out = self.proj(self.forward_features(images))
        return F.normalize(out, dim=-1) if normalize else out

    @property
    def image_size(self) -> int:
        """Input resolution of the trunk."""
        return int(self.data_config["input_size"][-1])


class OpenClipStudent(Student):
    """A small open_clip dual tower (image and text) distilled from a bigger one.

    Args:
        embed_dim: output width D; set from the teacher by the distillation module. The
            config's ``embed_dim`` is overridden with it.
        model_config: open_clip model config (dict or JSON path); its ``embed_dim`` may be omitted.
        aug_cfg: open_clip training augmentation (None: no augmentation, see ``TimmStudent``).
        model_name: an open_clip architecture name instead of ``model_config``, e.g. the
            registered ``shapes-rn-student``; its config is used, the weights start random.
        init_from: a pretrained open_clip ``local-dir`` folder to start from instead of random
            weights (its architecture; its ``embed_dim`` must be the teacher's).
        lora: LoRA adapters (``distill.lora.LoraSpec``): train only adapters on a frozen
            pretrained student (PromptKD-style parameter-efficient distillation); needs ``init_from``.
    """

    def __init__(
        self,
        embed_dim: int,
        model_config: dict | str | None = None,
        aug_cfg: dict | None = None,
        model_name: str | None = None,
        init_from: str | None = None,
        lora: LoraSpec | None = None,
    ) -> None:
        super().__init__(embed_dim)
        if init_from is not None:
            self._init_pretrained(init_from, aug_cfg, lora, model_name, model_config)
            return
        if lora is not None:
            raise ValueError("OpenClipStudent: LoRA adapts pretrained weights; give init_from (a local-dir folder)")
        if model_name is None and model_config is None:
            raise ValueError("OpenClipStudent needs model_name (an open_clip name) or model_config")
        if model_name is not None and model_config is not None:
            raise ValueError(
                f"OpenClipStudent got both model_name {model_name!r} and model_config: give one (a config that "
                "switches the student class keeps the earlier student's model_name unless it sets its own)"
            )
        if model_name is not None:
            if ":" in model_name:
                raise ValueError(
                    f"OpenClipStudent model_name {model_name!r}: give an architecture name (a student starts "
                    "from random weights), not a local-dir or hub folder"
                )
            model_config = open_clip.get_model_config(check_model_name(model_name))
        cfg = copy.deepcopy(model_config) if isinstance(model_config, dict) else load_model_config(model_config)
        cfg = dict(cfg.get("model_cfg", cfg))
        cfg["embed_dim"] = embed_dim
        bundle = build_clip(model_config=cfg, aug_cfg=aug_cfg)
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        self.preprocess_val = bundle.preprocess_val
        self.preprocess_train = bundle.preprocess_train if aug_cfg is not None else bundle.preprocess_val
        self.model_config, self.preprocess_config = bundle.model_config, bundle.preprocess_config

    def _init_pretrained(self, folder: str, aug_cfg: dict | None, lora: LoraSpec | None, model_name, model_config):
        if model_name is not None or model_config is not None:
            raise ValueError("OpenClipStudent: init_from carries its own architecture; drop model_name/model_config")
        if not Path(folder, "open_clip_config.json").is_file():
            raise FileNotFoundError(f"OpenClipStudent init_from: {folder} is not an open_clip local-dir folder")
        bundle = build_clip(model_name=f"local-dir:{folder}", aug_cfg=aug_cfg)
        width = int(bundle.model_config["embed_dim"])
        if width != self.embed_dim:
            raise ValueError(
                f"OpenClipStudent init_from {folder} embeds into {width} dimensions but the teacher into "
                f"{self.embed_dim}: a pretrained student must share the teacher's width"
            )
        self.model = bundle.model
        if lora is not None:
            self.model.requires_grad_(False)
            apply_lora(self.model, lora)
        self.tokenizer = bundle.tokenizer
        self.preprocess_val = bundle.preprocess_val
        self.preprocess_train = bundle.preprocess_train if aug_cfg is not None else bundle.preprocess_val
        self.model_config, self.preprocess_config = bundle.model_config, bundle.preprocess_config

    has_text_tower = True

    @property
    def image_size(self) -> int:
        """Input resolution of the image tower."""
        size = self.preprocess_config["size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The student's own learnable temperature, exponentiated."""
        return self.model.logit_scale.exp()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, 3, H, W) -> (N, embed_dim)."""
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(M, L) token ids -> (M, embed_dim)."""
        return self.model.encode_text(tokens, normalize=normalize)

    def image_tower_params(self) -> int:
        """Parameters of the image tower."""
        return sum(p.numel() for p in self.model.visual.parameters())
