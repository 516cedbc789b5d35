"""Frozen vision-language teachers.

A :class:`Teacher` wraps an open_clip model that never trains: it is always in eval mode, its
parameters need no gradient, and its outputs are L2-normalised embeddings. It loads from an
open_clip name + pretrained tag found in the local cache, from a local file (a distill
training checkpoint, an open_clip state dict, or a ``local-dir:`` folder), or from a config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.clip_models import ClipBundle, build_clip
from distill.zeroshot import build_class_bank

OPEN_CLIP_CKPT_KEY = "open_clip"
"""Key under which a distill training checkpoint stores its open_clip model and preprocess config."""

MODEL_PREFIX = "model."
"""Prefix of the open_clip weights inside a distill training checkpoint's ``state_dict``."""


def _read_training_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Open_clip config and weights from a distill ``.ckpt`` (loaded with ``weights_only``)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    if OPEN_CLIP_CKPT_KEY not in ckpt:
        raise ValueError(
            f"{path} holds no open_clip model config ('{OPEN_CLIP_CKPT_KEY}' key); it was not "
            "written by distill's ContrastiveModule: pass model_name or model_config with it"
        )
    state = {k[len(MODEL_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    return ckpt[OPEN_CLIP_CKPT_KEY], state


class Teacher(nn.Module):
    """A frozen open_clip model used as a teacher or zero-shot classifier.

    Exactly one source of architecture is used: ``checkpoint`` alone (a distill training
    checkpoint or a ``local-dir`` folder carries its own config), ``model_name`` (optionally with
    ``pretrained`` or ``checkpoint`` weights) or ``model_config``.

    Args:
        model_name: open_clip model name, e.g. ``ViT-B-32``, or ``local-dir:/folder``.
        pretrained: open_clip pretrained tag (must be in the local cache) or weights file.
        checkpoint: local weights: a distill ``.ckpt``, an open_clip state dict file
            (``.pt``/``.bin``/``.safetensors``, needs ``model_name`` or ``model_config``),
            or a folder holding ``open_clip_config.json``.
        model_config: open_clip model config (dict or JSON file) for a custom architecture.
        cache_dir: cache folder in which pretrained tags are looked up.
        prompts: a prompt file written by ``AdaptationModule`` (``prompts.pt``) for this model: the
            learned context replaces the templates of the class bank (and, for deep prompts, also
            prompts the image tower). Image-conditioned learners (CoCoOp) cannot be a fixed teacher.
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        model_config: dict | str | None = None,
        cache_dir: str | None = None,
        prompts: str | None = None,
    ) -> None:
        super().__init__()
        self.bundle = load_clip(model_name, pretrained, checkpoint, model_config, cache_dir)
        self.model = self.bundle.model
        self.prompt_learner = None
        if prompts is not None:
            from distill.prompt_files import load_prompt_file

            self.prompt_learner = load_prompt_file(prompts, self.model, self.bundle.tokenizer)
            if self.prompt_learner.image_conditioned:
                raise ValueError(
                    f"{prompts}: {type(self.prompt_learner).__name__} conditions its class features on each image; "
                    "a teacher needs one fixed class bank (use CoOp, deep prompts or LoRA)"
                )
        self.requires_grad_(False)
        self.eval()
        self._bank_cache: dict[tuple, torch.Tensor] = {}

    def train(self, mode: bool = True) -> Teacher:
        """Keep the teacher in eval mode whatever the caller asks (dropout/BN stay frozen)."""
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        """Width D of the shared embedding space."""
        return int(self.bundle.model_config["embed_dim"])

    @property
    def tokenizer(self):
        """The teacher's own tokenizer, ``list[str] -> (M, L)`` token ids."""
        return self.bundle.tokenizer

    @property
    def preprocess(self):
        """Evaluation transform, PIL image -> (3, H, W) tensor."""
        return self.bundle.preprocess_val

    @property
    def preprocess_train(self):
        """Training transform (with augmentation), PIL image -> (3, H, W) tensor."""
        return self.bundle.preprocess_train

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned temperature, already exponentiated (a scalar tensor)."""
        return self.model.logit_scale.exp()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Tokenize texts with the teacher's tokenizer: (M, L) ids."""
        return self.bundle.tokenizer(texts)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed (N, 3, H, W) preprocessed images into (N, D) L2-normalised vectors."""
        if self.prompt_learner is not None:
            return self.prompt_learner.encode_image(images, normalize=normalize)
        return self.model.encode_image(images, normalize=normalize)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed (M, L) token ids into (M, D) L2-normalised vectors."""
        return self.model.encode_text(tokens, normalize=normalize)

    @torch.no_grad()
    def class_bank(
        self,
        classnames: Sequence[str],
        templates: Sequence[str],
        descriptors: Mapping[str, Sequence[str]] | None = None,
    ) -> torch.Tensor:
        """Zero-shot classifier: (C, D) class embeddings, built once per class list and cached.

        Args:
            classnames: C class names in label order.
            templates: prompt templates with one ``{}``.
            descriptors: optional per-class descriptors (see ``distill.zeroshot``).
        """
        key = (
            tuple(classnames),
            tuple(templates),
            None if descriptors is None else tuple((k, tuple(v)) for k, v in sorted(descriptors.items())),
        )
        device = self.model.logit_scale.device
        if key not in self._bank_cache and self.prompt_learner is not None:
            if descriptors is not None:
                raise ValueError("class descriptors extend templates; this teacher's prompts are learned")
            self.prompt_learner.set_classnames(list(classnames))
            self._bank_cache[key] = self.prompt_learner.class_text_features().detach()
        if key not in self._bank_cache:
            self._bank_cache[key] = build_class_bank(self, self.tokenize, classnames, templates, descriptors, device)
        return self._bank_cache[key].to(device)


def load_clip(
    model_name: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    model_config: dict | str | None = None,
    cache_dir: str | None = None,
) -> ClipBundle:
    """An open_clip model from the sources a :class:`Teacher` takes (its Args say which combine)."""
    if checkpoint is None:
        return build_clip(model_name=model_name, pretrained=pretrained, model_config=model_config, cache_dir=cache_dir)
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    if pretrained is not None:
        raise ValueError("give either pretrained (tag or file) or checkpoint, not both")
    if path.is_dir():
        return build_clip(model_name=f"local-dir:{path}", cache_dir=cache_dir)
    if path.suffix == ".ckpt":
        saved, state = _read_training_checkpoint(path)
        cfg = model_config if model_config is not None else saved["model_cfg"]
        bundle = build_clip(model_name=model_name, model_config=None if model_name else cfg, cache_dir=cache_dir)
        missing, unexpected = bundle.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not fit the teacher architecture "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return bundle
    if model_name is None and model_config is None:
        raise ValueError(f"{path} is a bare state dict: also give model_name or model_config for its architecture")
    return build_clip(model_name=model_name, pretrained=str(path), model_config=model_config, cache_dir=cache_dir)
