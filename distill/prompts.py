"""Prompt learners over open_clip models: CoOp, CoCoOp and deep multimodal prompts (MaPLe-style).

A prompt learner holds only the learned prompt parameters; the CLIP model it prompts is a plain
reference, never a submodule, so ``learner.state_dict()`` is a few KB: the parameters plus an
extra state with the learner's settings and class list (strings and numbers, loadable with
``torch.load(weights_only=True)``). The caller freezes the model and keeps it in eval mode.

Class prompts are tokenised once per class list (:meth:`PromptLearner.set_classnames`); each call
embeds them with the model's token embedding, writes the learned context into the context
positions and re-runs the text tower on the embeddings with the model's own positional
embedding, mask, pooling and projection (``distill.prompt_towers``). A shared context trained on
some classes applies to any other class list (base-to-novel transfer); a class-specific one only
to its own classes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.prompt_towers import ClassTokenPosition, PromptLayout, TextTower, VisionTower

__all__ = ["CoCoOp", "CoOp", "MultimodalPrompts", "PromptLearner", "cocoop_logits_per_image_loop"]


def _class_mismatch(trained: Sequence[str], given: Sequence[str], what: str = "prompt checkpoint") -> str:
    """One line naming both class counts and the names from the first difference on."""
    common = min(len(trained), len(given))
    first = next((i for i, (a, b) in enumerate(zip(trained, given)) if a != b), common)
    start = first if first < common else 0  # one list extends the other: show both from the start

    def preview(names: Sequence[str]) -> str:
        return (
            "[" + ", ".join(repr(n) for n in names[start : start + 3]) + (", ...]" if len(names) > start + 3 else "]")
        )

    where = f"; first difference at position {first}" if first < common else ""
    return f"{what} was trained for {len(trained)} classes {preview(trained)}, got {len(given)} {preview(given)}{where}"


class PromptLearner(nn.Module):
    """Base of the prompt learners: class prompts, the text tower pass, checkpoint state.

    Subclasses create their parameters, list their constructor settings in ``_settings`` and
    give the context to place in the prompts (``_context``).

    Args:
        clip_model: an ``open_clip.CLIP``, or a ``CustomTextCLIP`` whose ``model.text`` is a
            ``TextTransformer`` (kept as a reference, not registered).
        tokenizer: the model's tokenizer, ``list[str] -> (N, context_length)`` token ids.
    """

    image_conditioned: bool = False
    """Whether class features depend on each image (CoCoOp): ``class_text_features`` then needs them."""
    prompts_image_tower: bool = False
    """Whether ``encode_image`` differs from the frozen model's (deep vision prompts)."""
    class_specific: bool = False
    """Whether the context is one per class (it then serves its own class list only)."""

    def __init__(self, clip_model: nn.Module, tokenizer: Callable[[list[str]], Tensor]) -> None:
        super().__init__()
        self._clip = (clip_model,)  # a tuple hides the model from nn.Module registration and state_dict
        self._tokenizer = tokenizer
        self.text_tower = TextTower(clip_model)
        self.layout = PromptLayout.of(tokenizer)
        if self.layout.context_length != self.text_tower.context_length:
            raise ValueError(
                f"tokenizer context length {self.layout.context_length} differs from the model's "
                f"{self.text_tower.context_length}"
            )
        self._classnames: list[str] = []
        self._length = 0  # tokens the text tower runs (see TextTower.usable_length)
        self._ctx_start = 0
        self.register_buffer("token_ids", None, persistent=False)  # (C, L) class prompt ids
        self.register_buffer("ctx_positions", None, persistent=False)  # (C, M) where the context goes
        self.register_buffer("pool_index", None, persistent=False)  # (C,) pooled position
        self.register_load_state_dict_pre_hook(_apply_saved_state)

    # Settings and parameters, given by subclasses ------------------------------------------------
    def _configure(self, **settings: Any) -> None:
        """Keep the constructor settings (saved in the state dict) and expose them as attributes."""
        self._config = settings
        for key, value in settings.items():
            setattr(self, key, value)

    def _settings(self) -> dict[str, Any]:
        return dict(self._config)

    def _shared_setup(self, n_ctx: int, ctx_init: str | None, class_token_position: str) -> int:
        """Check the class token position; the context length M (``ctx_init``'s token count when given)."""
        if class_token_position not in ("end", "middle", "front"):
            raise ValueError(f"class_token_position must be end, middle or front, got {class_token_position!r}")
        return len(self.layout.words(self._tokenizer, ctx_init)) if ctx_init else n_ctx

    def _context(self) -> Tensor:
        """The (M, W) shared or (C, M, W) class-specific context placed in the prompts."""
        return self.ctx

    @property
    def clip_model(self) -> nn.Module:
        return self._clip[0]

    def _init_context(self, n_ctx: int, ctx_init: str | None, init_std: float, rows: int | None = None) -> Tensor:
        """(M, W) (or (rows, M, W)) initial context: ``ctx_init``'s first M token embeddings, or N(0, std)."""
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        shape = (n_ctx, self.text_tower.width) if rows is None else (rows, n_ctx, self.text_tower.width)
        if not ctx_init:
            return torch.randn(shape, device=self.text_tower.device) * init_std
        ids = self.layout.words(self._tokenizer, ctx_init)
        if len(ids) < n_ctx:
            raise ValueError(f"ctx_init {ctx_init!r} has {len(ids)} tokens, fewer than n_ctx={n_ctx}")
        with torch.no_grad():
            vectors = self.text_tower.token_embedding(torch.tensor(ids[:n_ctx], device=self.text_tower.device))
        return vectors.float().expand(shape).clone()

    # Classes -------------------------------------------------------------------------------------
    @property
    def classnames(self) -> list[str]:
        """The current class list, in label order."""
        return list(self._classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Tokenise the prompts of a new class list (the learned context is kept).

        Raises:
            ValueError: an empty list, a class name too long for the context, or another class
                list for a class-specific context.
        """
        names = [str(n) for n in classnames]
        if not names:
            raise ValueError("set_classnames: the class list is empty")
        n_ctx, ctx_init, position = self._prompt_shape()
        ids, positions = self.layout.build(self._tokenizer, names, n_ctx, ctx_init, position)
        pool = self.text_tower.pool_index(ids)
        self._on_classnames(names)
        device = self.text_tower.device
        self.token_ids, self.ctx_positions, self.pool_index = ids.to(device), positions.to(device), pool.to(device)
        self._length = self.text_tower.usable_length(pool, positions)
        self._ctx_start = int(positions[0, 0])
        self._classnames = names

    def _prompt_shape(self) -> tuple[int, str | None, ClassTokenPosition]:
        """(learned context tokens, ctx_init, class token position) of the prompts."""
        s = self._settings()
        return s["n_ctx"], s.get("ctx_init"), s.get("class_token_position", "end")

    def _on_classnames(self, names: list[str]) -> None:
        """Hook for class-specific parameters, before the new class list is taken."""

    def _require_classes(self) -> None:
        if not self._classnames:
            raise ValueError(f"{type(self).__name__}: call set_classnames(classnames) before computing class features")

    # Computation ---------------------------------------------------------------------------------
    def _prompt_embeddings(self, ctx: Tensor, length: int | None = None) -> Tensor:
        """Class prompt embeddings with ``ctx`` written in.

        Args:
            ctx: (M, W) shared, (C, M, W) per class, or (B, 1, M, W) per image.
            length: tokens to keep (default: up to the last pooled token when attention is causal).

        Returns:
            (C, T, W), or (B, C, T, W) for a per-image context; T = tokens the tower runs.
        """
        base = self.text_tower.embed(self.token_ids[:, : length or self._length])  # (C, T, W)
        if ctx.ndim == 2:
            ctx = ctx[None]
        lead = ctx.shape[:-3]
        c, m, w = base.shape[0], ctx.shape[-2], base.shape[-1]
        index = self.ctx_positions[..., None].expand(*lead, c, m, w)
        base = base.expand(*lead, *base.shape)
        return base.scatter(-2, index, ctx.to(base.dtype).expand(*lead, c, m, w))

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) images -> (B, D) image features of the frozen image tower."""
        return self.clip_model.encode_image(images, normalize=normalize)

    def class_text_features(self, image_features: Tensor | None = None, normalize: bool = True) -> Tensor:
        """(C, D) text features of the class prompts (``image_features`` is unused here)."""
        self._require_classes()
        x = self.text_tower.encode(self._prompt_embeddings(self._context()), self.pool_index, **self._deep_text())
        return F.normalize(x, dim=-1) if normalize else x

    def _deep_text(self) -> dict[str, Any]:
        return {}

    # Checkpoints ---------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        """Learner name, settings and class list (strings and numbers only)."""
        return {"learner": type(self).__name__, "settings": self._settings(), "classnames": list(self._classnames)}

    def set_extra_state(self, state: Any) -> None:
        """Check a checkpoint's settings and classes against this learner, and take its classes if unset.

        Raises:
            ValueError: another learner or settings, or a class-specific context for other classes.
        """
        if not isinstance(state, Mapping) or not {"learner", "settings", "classnames"} <= set(state):
            raise ValueError("prompt checkpoint has no learner state (learner, settings, classnames)")
        if state["learner"] != type(self).__name__:
            raise ValueError(f"prompt checkpoint is for {state['learner']}, this learner is {type(self).__name__}")
        mine = self._settings()
        for key, value in state["settings"].items():
            if key != "init_std" and mine.get(key) != value:
                raise ValueError(
                    f"prompt checkpoint was trained with {key}={value!r}, this learner has {mine.get(key)!r}"
                )
        names = list(state["classnames"])
        if self.class_specific and self._classnames and names != self._classnames:
            raise ValueError(_class_mismatch(names, self._classnames))
        if names and not self._classnames:
            self.set_classnames(names)

    @classmethod
    def from_state_dict(
        cls, clip_model: nn.Module, tokenizer: Callable[[list[str]], Tensor], state_dict: Mapping[str, Any]
    ) -> PromptLearner:
        """Rebuild a learner from its ``state_dict()`` (settings and classes come from its extra state)."""
        state = state_dict.get("_extra_state")
        if not isinstance(state, Mapping) or "settings" not in state:
            raise ValueError(f"{cls.__name__}.from_state_dict: no '_extra_state' with the learner's settings")
        learner = cls(clip_model, tokenizer, **state["settings"])
        learner.load_state_dict(state_dict)
        return learner


def _apply_saved_state(module: PromptLearner, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    # Before parameters load: a class-specific context must exist with the checkpoint's class
    # count, and a class mismatch must be reported as such, not as a tensor shape error.
    key = prefix + "_extra_state"
    if key in state_dict:
        module.set_extra_state(state_dict[key])


class CoOp(PromptLearner):
    """CoOp: M learned context vectors in front of (or around) each class name.

    Prompts read ``<SOS> ctx_1 ... ctx_M <class name> . <EOS>`` in the tokenizer's format.

    Args:
        clip_model: the frozen open_clip model (passed by the adaptation module).
        tokenizer: its tokenizer (passed by the adaptation module).
        n_ctx: number of context vectors M (ignored when ``ctx_init`` is given).
        ctx_init: words initialising the context, e.g. ``"a photo of a"``; M = its token count.
        class_specific: one context per class (then it serves its own classes only) instead of one shared.
        class_token_position: class name after (``end``), inside (``middle``) or before (``front``) the context.
        init_std: standard deviation of the random initial context (no ``ctx_init``).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_token_position: Literal["end", "middle", "front"] = "end",
        init_std: float = 0.02,
    ) -> None:
        super().__init__(clip_model, tokenizer)
        n_ctx = self._shared_setup(n_ctx, ctx_init, class_token_position)
        self._configure(
            n_ctx=n_ctx,
            ctx_init=ctx_init or None,
            class_specific=class_specific,
            class_token_position=class_token_position,
            init_std=init_std,
        )
        # A class-specific context is created by set_classnames, when the class count is known.
        ctx = None if class_specific else nn.Parameter(self._init_context(n_ctx, ctx_init, init_std))
        self.register_parameter("ctx", ctx)

    def _on_classnames(self, names: list[str]) -> None:
        if not self.class_specific:
            return
        if self.ctx is None:
            self.ctx = nn.Parameter(self._init_context(self.n_ctx, self.ctx_init, self.init_std, rows=len(names)))
        elif names != self._classnames:
            raise ValueError(
                f"{_class_mismatch(self._classnames, names, 'class-specific context')}: it serves its own classes "
                "only (class_specific=False transfers to other classes)"
            )


class CoCoOp(PromptLearner):
    """CoCoOp: a shared context plus an image-conditioned bias from a small meta-network.

    ``meta_net`` = Linear(D, D // 16) -> ReLU -> Linear(D // 16, W), with D the image feature
    width and W the text width; its output is added to every context vector. All B x C prompts of
    a batch go through the text tower in one pass (``cocoop_logits_per_image_loop`` is the
    per-image reference).

    Args:
        clip_model: the frozen open_clip model (passed by the adaptation module).
        tokenizer: its tokenizer (passed by the adaptation module).
        n_ctx: number of context vectors M (ignored when ``ctx_init`` is given).
        ctx_init: words initialising the context; M = its token count.
        class_token_position: class name after (``end``), inside (``middle``) or before (``front``) the context.
        init_std: standard deviation of the random initial context (no ``ctx_init``).
    """

    image_conditioned = True

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        class_token_position: Literal["end", "middle", "front"] = "end",
        init_std: float = 0.02,
    ) -> None:
        super().__init__(clip_model, tokenizer)
        n_ctx = self._shared_setup(n_ctx, ctx_init, class_token_position)
        self._configure(
            n_ctx=n_ctx, ctx_init=ctx_init or None, class_token_position=class_token_position, init_std=init_std
        )
        self.ctx = nn.Parameter(self._init_context(n_ctx, ctx_init, init_std))
        self.vis_dim = getattr(clip_model.visual, "output_dim", None) or self.text_tower.embed_dim
        hidden = max(1, self.vis_dim // 16)
        self.meta_net = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(self.vis_dim, hidden),
                relu=nn.ReLU(inplace=True),
                linear2=nn.Linear(hidden, self.text_tower.width),
            )
        ).to(self.text_tower.device)

    def image_context(self, image_features: Tensor) -> Tensor:
        """(B, D) image features -> (B, M, W) per-image context (shared context + meta-net bias)."""
        if image_features is None or image_features.ndim != 2 or image_features.shape[1] != self.vis_dim:
            got = None if image_features is None else tuple(image_features.shape)
            raise ValueError(f"CoCoOp needs image_features of shape (B, {self.vis_dim}), got {got}")
        bias = self.meta_net(image_features.to(self.ctx.dtype))
        return self.ctx[None] + bias[:, None]

    def class_text_features(self, image_features: Tensor | None = None, normalize: bool = True) -> Tensor:
        """(B, D) image features -> (B, C, D) class text features, one text tower pass over B x C prompts."""
        self._require_classes()
        ctx = self.image_context(image_features)
        prompts = self._prompt_embeddings(ctx[:, None])  # (B, C, T, W)
        b, c = prompts.shape[:2]
        x = self.text_tower.encode(prompts.flatten(0, 1), self.pool_index.repeat(b)).view(b, c, -1)
        return F.normalize(x, dim=-1) if normalize else x


def cocoop_logits_per_image_loop(
    learner: CoCoOp, image_features: Tensor, logit_scale: Tensor | float, full_context: bool = False
) -> Tensor:
    """Reference CoCoOp logits, one image at a time (the public implementation's shape; tests and benchmarks).

    Args:
        learner: a CoCoOp learner with its classes set.
        image_features: (B, D) L2-normalised image features.
        logit_scale: the (exponentiated) logit scale.
        full_context: run the whole context length, as the public code does, instead of
            stopping at the pooled token.

    Returns:
        (B, C) logits.
    """
    learner._require_classes()
    tower, rows = learner.text_tower, []
    length = tower.context_length if full_context else learner._length
    for feature in image_features:
        prompts = learner._prompt_embeddings(learner.image_context(feature[None])[0], length)  # (C, T, W)
        text = F.normalize(tower.encode(prompts, learner.pool_index), dim=-1)
        rows.append(logit_scale * (feature @ text.T))
    return torch.stack(rows)


class MultimodalPrompts(PromptLearner):
    """Deep multimodal prompts (MaPLe-style) in the first ``depth`` layers of both towers.

    Text: layer 0 holds the CoOp-style context (class name at the end); at the input of layers
    1 .. depth-1 learned prompts replace those token positions. Vision: each layer's prompt is a
    learned Linear coupling (text width -> vision width, read from the model) of that layer's text
    prompt. A ViT gets ``n_ctx`` prompt tokens after its patch tokens, replaced at each of the
    first ``depth`` layers and dropped before pooling. A ModifiedResNet has no transformer
    layers: the coupled prompt of layer 0 (at the attention pool's width) adds ``n_ctx`` extra
    key/value tokens to its attention pool, and deeper prompts act on the text tower only.

    Args:
        clip_model: the frozen open_clip model (passed by the adaptation module).
        tokenizer: its tokenizer (passed by the adaptation module).
        n_ctx: prompt tokens per layer and tower.
        depth: layers with prompts J (at most the text tower's layers, and the ViT's).
        ctx_init: words starting the prompt, e.g. ``"a photo of a"``: its first ``n_ctx`` tokens
            initialise the layer-0 context, the remaining ones stay fixed words of the prompt.
        init_std: standard deviation of random prompts (deeper layers, or no ``ctx_init``).
    """

    prompts_image_tower = True

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        n_ctx: int = 2,
        depth: int = 9,
        ctx_init: str | None = "a photo of a",
        init_std: float = 0.02,
    ) -> None:
        super().__init__(clip_model, tokenizer)
        self.vision_tower = VisionTower(clip_model)
        text_layers = self.text_tower.layers
        max_depth = text_layers if self.vision_tower.kind == "resnet" else min(text_layers, self.vision_tower.layers)
        if not 1 <= depth <= max_depth:
            raise ValueError(
                f"depth={depth} is out of range: at most {max_depth} (text tower {text_layers} layers"
                + (f", vision tower {self.vision_tower.layers})" if self.vision_tower.kind == "vit" else ")")
            )
        self._configure(n_ctx=n_ctx, depth=depth, ctx_init=ctx_init or None, init_std=init_std)
        device, width = self.text_tower.device, self.text_tower.width
        self.ctx = nn.Parameter(self._init_context(n_ctx, ctx_init, init_std))
        deep = torch.randn(depth - 1, n_ctx, width, device=device) * init_std if depth > 1 else None
        self.register_parameter("deep_text", nn.Parameter(deep) if deep is not None else None)
        couplings = depth if self.vision_tower.kind == "vit" else 1
        self.couplings = nn.ModuleList(nn.Linear(width, self.vision_tower.width) for _ in range(couplings)).to(device)

    def text_prompts(self) -> list[Tensor]:
        """The J per-layer (n_ctx, W) text prompts: the context, then the deep prompts."""
        return [self.ctx, *(self.deep_text if self.deep_text is not None else [])]

    def vision_prompts(self) -> list[Tensor]:
        """Per-layer (n_ctx, vision width) prompts coupled from the text prompts (one for a ResNet)."""
        return [coupling(p) for coupling, p in zip(self.couplings, self.text_prompts())]

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) images -> (B, D) features of the prompted image tower."""
        x = self.vision_tower.encode(images, self.vision_prompts())
        return F.normalize(x, dim=-1) if normalize else x

    def _deep_text(self) -> dict[str, Any]:
        return {"deep_prompts": self.text_prompts()[1:], "prompt_start": self._ctx_start}
