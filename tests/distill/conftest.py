"""Shared fixtures for the LoRA and split-attention tests: tiny open_clip bundles, fixed inputs, embeddings."""

from __future__ import annotations

from typing import ClassVar

import open_clip
import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d
from torch import nn

from distill.clip_models import ClipBundle, build_clip
from distill.split_attention import SplitMultiheadAttention


class ClipKit:
    """Tiny random CLIPs and fixed inputs, for tests that compare embeddings before and after a change.

    ``"rn"`` is ``tiny-rn-test`` (ModifiedResNet, 1-layer text); ``"vit"`` is ``tiny-vit-test`` (patch 8 at
    32 px, 2 heads and 2 layers in each tower, context 16). Both are registered by ``distill.clip_models``.
    """

    MODELS: ClassVar[dict[str, str]] = {"rn": "tiny-rn-test", "vit": "tiny-vit-test"}
    CAPTIONS: ClassVar[list[str]] = ["a small red circle", "two blue squares near the top", "a star"]

    @classmethod
    def bundle(cls, kind: str, seed: int = 0, custom_text: bool = False) -> ClipBundle:
        """A random model in eval mode: same ``kind`` and ``seed`` give the same weights.

        Args:
            kind: ``"rn"`` or ``"vit"``.
            seed: torch seed set before the weights are drawn.
            custom_text: build open_clip's ``CustomTextCLIP`` (text tower in ``model.text``) instead of ``CLIP``.
        """
        name = cls.MODELS[kind]
        torch.manual_seed(seed)
        if custom_text:
            bundle = build_clip(model_config={**open_clip.get_model_config(name), "custom_text": True})
        else:
            bundle = build_clip(model_name=name)
        bundle.model.eval()
        return bundle

    @classmethod
    def inputs(cls, bundle: ClipBundle) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed images (2, 3, 32, 32) and the tokenised ``CAPTIONS`` (3, context_length)."""
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        return images, bundle.tokenizer(cls.CAPTIONS)

    @staticmethod
    def embed(model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (2, embed) and text (3, embed) embeddings of ``inputs``, without gradients."""
        with torch.no_grad():
            return model.encode_image(inputs[0]), model.encode_text(inputs[1])

    @staticmethod
    def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
        """Largest absolute difference over pairs of tensors (image and text embeddings)."""
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    @staticmethod
    def attention_types(model: nn.Module) -> set[type]:
        """The attention module classes in ``model``: stock, split or ModifiedResNet's attention pool."""
        kinds = (nn.MultiheadAttention, SplitMultiheadAttention, AttentionPool2d)
        return {type(m) for m in model.modules() if isinstance(m, kinds)}


@pytest.fixture(scope="session")
def clip_kit() -> type[ClipKit]:
    """The ``ClipKit`` helpers (test modules import with importlib, so they share helpers as fixtures)."""
    return ClipKit
