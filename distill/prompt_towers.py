"""The open_clip towers run block by block on embeddings, for the prompt learners of ``distill.prompts``.

Prompt learners feed the text tower token *embeddings* (with learned context vectors in place of
some tokens) instead of token ids, and deep prompts replace or append tokens between blocks. This
file holds what that needs, read from the model on every use (widths, depth, pooling, projection,
masks), so ``.to()``, LoRA adapters and any open_clip size keep working:

- :class:`PromptLayout`: where the context tokens sit in each class's tokenised prompt.
- :class:`TextTower`: ``open_clip.CLIP`` text attributes or a ``CustomTextCLIP``'s
  ``TextTransformer``, re-run on embeddings with the model's own pooling and projection.
- :class:`VisionTower`: a ``VisionTransformer`` (prompt tokens after the patch tokens) or a
  ``ModifiedResNet`` (prompt tokens as extra keys/values of the attention pool).

With no prompts, :meth:`TextTower.encode` and :meth:`VisionTower.encode` equal the model's
``encode_text`` / ``encode_image`` (tested to 1e-5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Tokenizer = Callable[[list[str]], Tensor]
ClassTokenPosition = Literal["end", "middle", "front"]
PLACEHOLDER = "X"  # the word whose token stands for a learned context vector in the token ids


def _run_block(block: nn.Module, x: Tensor, attn_mask: Tensor | None, batch_first: bool, ckpt: bool) -> Tensor:
    """One residual attention block on (N, L, W) tokens, as open_clip's ``Transformer.forward`` calls it."""
    if not batch_first:
        x = x.transpose(0, 1)
    if ckpt and torch.is_grad_enabled():
        x = checkpoint(functools.partial(block, attn_mask=attn_mask), x, use_reentrant=False)
    else:
        x = block(x, attn_mask=attn_mask)
    return x if batch_first else x.transpose(0, 1)


def _replace_tail_or_span(x: Tensor, prompt: Tensor, start: int) -> Tensor:
    """(N, L, W) tokens with positions ``start .. start + n`` replaced by the (n, W) prompt."""
    n = prompt.shape[0]
    return torch.cat([x[:, :start], prompt.to(x.dtype).expand(x.shape[0], -1, -1), x[:, start + n :]], dim=1)


@dataclass(frozen=True)
class PromptLayout:
    """How a tokenizer lays out a prompt: special tokens around the words, padding after.

    Attributes:
        pad_id: id filling the context after the prompt.
        lead: special tokens before the first word (1 for CLIP's SOS, 0 for tokenizers without).
        trail: special tokens after the last word (1 for CLIP's EOS).
        context_length: length of every tokenised row.
    """

    pad_id: int
    lead: int
    trail: int
    context_length: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> PromptLayout:
        empty, one = tokenizer([""])[0], tokenizer([PLACEHOLDER])[0]
        length = int(empty.shape[0])
        pad = int(empty[-1])
        n_special = _used_length(empty, pad)
        differs = (empty != one).nonzero()
        if n_special >= length or differs.numel() == 0:
            raise ValueError(f"tokenizer {type(tokenizer).__name__}: cannot find its padding and special tokens")
        lead = int(differs[0, 0])
        return cls(pad_id=pad, lead=lead, trail=n_special - lead, context_length=length)

    def words(self, tokenizer: Tokenizer, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens and padding."""
        ids = tokenizer([text])[0]
        return ids[self.lead : _used_length(ids, self.pad_id) - self.trail].tolist()

    def build(
        self,
        tokenizer: Tokenizer,
        classnames: Sequence[str],
        n_ctx: int,
        ctx_init: str | None,
        position: ClassTokenPosition,
    ) -> tuple[Tensor, Tensor]:
        """Token ids of every class prompt and the positions of its ``n_ctx`` learned tokens.

        The prompt reads ``<ctx> <class>.`` (end), ``<class> <ctx>.`` (front) or ``<ctx half>
        <class> <ctx half>.`` (middle), with ``<ctx>`` = ``ctx_init`` when given (its first
        ``n_ctx`` tokens are learned, the rest stay words of the prompt) or ``n_ctx`` placeholders.

        Returns:
            ids (C, context_length) long, positions (C, n_ctx) long.

        Raises:
            ValueError: a prompt longer than the context (naming the class), or a tokenizer that
                does not split prompts word by word.
        """
        placeholder = self.words(tokenizer, PLACEHOLDER)
        if len(placeholder) != 1:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} splits {PLACEHOLDER!r} into {len(placeholder)} tokens"
            )
        ctx_words = ctx_init if ctx_init else " ".join([PLACEHOLDER] * n_ctx)
        ctx_ids = self.words(tokenizer, ctx_init) if ctx_init else placeholder * n_ctx
        if ctx_init and self.lead + len(ctx_ids) + self.trail >= self.context_length:
            raise ValueError(f"ctx_init {ctx_init!r} fills the model's context length {self.context_length}")
        if position == "middle":
            if len(ctx_ids) != n_ctx:
                raise ValueError("class_token_position='middle' needs every context token learned (n_ctx = ctx_init's)")
            ctx_ids = placeholder * n_ctx  # the ids only mark positions; the learned vectors replace them
        half = n_ctx // 2
        period = len(self.words(tokenizer, "."))
        if self.lead + len(ctx_ids) + 1 + period + self.trail > self.context_length:
            raise ValueError(
                f"{len(ctx_ids)} context tokens leave no room for a class name in the model's context "
                f"length {self.context_length}: lower n_ctx or shorten ctx_init"
            )
        name_lengths = [_used_length(row, self.pad_id) - self.lead - self.trail for row in tokenizer(list(classnames))]
        texts, spots = [], []
        for name, n_name in zip(classnames, name_lengths):
            needed = self.lead + len(ctx_ids) + n_name + period + self.trail
            if needed > self.context_length:
                raise ValueError(
                    f"class name {name!r} is too long: its prompt needs {needed} tokens "
                    f"({len(ctx_ids)} context + {n_name} name), the model's context length is {self.context_length}"
                )
            if position == "end":
                texts.append(f"{ctx_words} {name}.")
                spot = list(range(n_ctx))
            elif position == "front":
                texts.append(f"{name} {ctx_words}.")
                spot = [n_name + j for j in range(n_ctx)]
            else:
                texts.append(" ".join([PLACEHOLDER] * half + [name] + [PLACEHOLDER] * (n_ctx - half)) + ".")
                spot = list(range(half)) + [half + n_name + j for j in range(n_ctx - half)]
            spots.append([self.lead + j for j in spot])
        ids, spots = tokenizer(texts).long(), torch.tensor(spots, dtype=torch.long)
        wrong = (ids.gather(1, spots) != torch.tensor(ctx_ids[:n_ctx])).any(dim=1).nonzero()
        if wrong.numel():
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} splits the prompt {texts[int(wrong[0, 0])]!r} differently "
                "from its words; prompt learners need a word-level tokenizer such as open_clip's SimpleTokenizer"
            )
        return ids, spots


def _used_length(ids: Tensor, pad_id: int) -> int:
    """Index after the last non-padding token (padding only trails, a pad id inside a prompt counts)."""
    used = (ids != pad_id).nonzero()
    return int(used[-1, 0]) + 1 if used.numel() else 0


class TextTower:
    """An open_clip text transformer, run on token embeddings.

    Reads ``open_clip.CLIP``'s text attributes (``token_embedding``, ``positional_embedding``,
    ``transformer``, ``ln_final``, ``text_projection``, ``attn_mask``, ``text_pool_type``,
    ``text_eos_id``) or a ``CustomTextCLIP``'s ``model.text`` when it is a ``TextTransformer``.
    Everything is read on use, never copied, so moving or adapting the model is seen.

    Raises:
        ValueError: Hugging Face text towers, CoCa-style class tokens, padding masks or the
            ``none`` pooling, naming the model part.
    """

    _CLIP_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        text = getattr(model, "text", None)
        if text is not None:
            if not isinstance(text, TextTransformer):
                raise ValueError(
                    f"model.text is {type(text).__name__}: prompt learners run open_clip's TextTransformer only "
                    "(Hugging Face text towers are not supported)"
                )
            if text.cls_emb is not None:
                raise ValueError("model.text appends a class token (embed_cls=True, CoCa-style): not supported")
            if getattr(text, "use_pad_mask", False):
                raise ValueError("model.text masks padding tokens (use_pad_mask=True): not supported")
            self._owner, self._pool_attr, self._eos_attr, self._where = text, "pool_type", "eos_id", "model.text"
        else:
            missing = [p for p in self._CLIP_PARTS if not hasattr(model, p)]
            if missing:
                raise ValueError(
                    f"{type(model).__name__} has no open_clip text transformer: no model.text and no "
                    f"{', '.join('model.' + p for p in missing)}"
                )
            self._owner, self._pool_attr, self._eos_attr, self._where = model, "text_pool_type", "text_eos_id", "model"
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise ValueError(
                f"{self._where} pools text with {self.pool_type!r}: prompt learners support argmax, eos, first, last"
            )
        if not hasattr(self.transformer, "resblocks"):
            raise ValueError(f"{self._where}.transformer ({type(self.transformer).__name__}) has no resblocks")

    # Parts, read from the model on every use ---------------------------------------------------
    @property
    def token_embedding(self) -> nn.Embedding:
        return self._owner.token_embedding

    @property
    def transformer(self) -> nn.Module:
        return self._owner.transformer

    @property
    def attn_mask(self) -> Tensor | None:
        return getattr(self._owner, "attn_mask", None)

    @property
    def pool_type(self) -> str:
        return getattr(self._owner, self._pool_attr)

    @property
    def eos_id(self) -> int | None:
        return getattr(self._owner, self._eos_attr, None)

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    @property
    def layers(self) -> int:
        return len(self.transformer.resblocks)

    @property
    def context_length(self) -> int:
        return self._owner.positional_embedding.shape[0]

    @property
    def embed_dim(self) -> int:
        """Width of the projected text features (the width of the pooled token without projection)."""
        proj = self._owner.text_projection
        if proj is None:
            return self.width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def cast_dtype(self) -> torch.dtype:
        get = getattr(self.transformer, "get_cast_dtype", None)
        return get() if get is not None else self.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    # Computation ------------------------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        """(..., L) token ids -> (..., L, W) token embeddings in the tower's compute dtype."""
        return self.token_embedding(ids).to(self.cast_dtype)

    def pool_index(self, ids: Tensor) -> Tensor:
        """(N, L) token ids -> (N,) the position each prompt is pooled at (open_clip's ``text_global_pool``)."""
        n, length = ids.shape
        if self.pool_type == "first":
            return torch.zeros(n, dtype=torch.long)
        if self.pool_type == "last":
            return torch.full((n,), length - 1, dtype=torch.long)
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        found = ids == self.eos_id
        if not bool(found.any(dim=-1).all()):
            raise ValueError(f"{self._where} pools at eos id {self.eos_id}, which the tokenizer's prompts lack")
        return found.int().argmax(dim=-1)

    def usable_length(self, pool_index: Tensor, ctx_positions: Tensor) -> int:
        """Tokens the tower must run: up to the pooled token when attention is causal.

        Under a causal mask a token sees only earlier ones, so the pooled feature does not
        depend on the padding after it: running ``max(pool_index) + 1`` tokens instead of the
        whole context gives the same features (to float rounding) for a fraction of the work.
        """
        mask = self.attn_mask
        if mask is None or self.pool_type == "last":
            return self.context_length
        n = mask.shape[0]
        causal = torch.full((n, n), float("-inf"), device=mask.device).triu(1)
        if not torch.equal(mask.float(), causal):
            return self.context_length
        return int(max(int(pool_index.max()), int(ctx_positions.max())) + 1)

    def encode(
        self, x: Tensor, pool_index: Tensor, deep_prompts: Sequence[Tensor] = (), prompt_start: int = 0
    ) -> Tensor:
        """Run the tower on embeddings.

        Args:
            x: (N, T, W) token embeddings, T <= context length (positions after T are dropped).
            pool_index: (N,) position pooled in each row.
            deep_prompts: (n, W) prompts replacing positions ``prompt_start .. prompt_start + n``
                at the input of blocks 1, 2, ... (block 0 sees ``x`` as given).
            prompt_start: first position of the deep prompts.

        Returns:
            (N, D) text features, not normalised.
        """
        owner, dtype = self._owner, self.cast_dtype
        length = x.shape[1]
        x = x.to(dtype) + owner.positional_embedding[:length].to(dtype)
        mask = self.attn_mask
        mask = mask[:length, :length] if mask is not None else None
        transformer = self.transformer
        batch_first = getattr(transformer, "batch_first", True)
        ckpt = getattr(transformer, "grad_checkpointing", False)
        if len(deep_prompts) >= self.layers:
            raise ValueError(f"{len(deep_prompts)} deep text prompts for a {self.layers}-layer text tower")
        for i, block in enumerate(transformer.resblocks):
            if 1 <= i <= len(deep_prompts):
                x = _replace_tail_or_span(x, deep_prompts[i - 1], prompt_start)
            x = _run_block(block, x, mask, batch_first, ckpt)
        # LayerNorm is per token: pooling first and normalising the pooled rows is the same as open_clip's order.
        pooled = owner.ln_final(x[torch.arange(x.shape[0], device=x.device), pool_index.to(x.device)])
        proj = owner.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


class VisionTower:
    """An open_clip image tower with deep prompt tokens.

    - ``VisionTransformer``: prompts[0] (n, W) is appended after the patch tokens (after
      ``ln_pre``); prompts[i] replaces those n tokens at the input of block i; they are dropped
      before pooling, so the model's own pooling (class token, average, attentional pool) and
      projection follow.
    - ``ModifiedResNet``: it has no transformer layers, so only prompts[0], of the attention
      pool's width, is used: its tokens are extra keys/values of the attention pool (the pooled
      query, the mean token, attends to the image and to them). Further prompts are ignored.

    Raises:
        ValueError: any other image tower (timm, ...), naming ``model.visual``.
    """

    def __init__(self, model: nn.Module) -> None:
        visual = getattr(model, "visual", None)
        if isinstance(visual, VisionTransformer):
            if not (hasattr(visual, "_embeds") and hasattr(visual, "_pool")):
                raise ValueError("model.visual (VisionTransformer) lacks _embeds/_pool: needs open_clip >= 3.0")
            self.kind = "vit"
        elif isinstance(visual, ModifiedResNet):
            self.kind = "resnet"
        else:
            raise ValueError(
                f"model.visual is {type(visual).__name__}: deep vision prompts need open_clip's VisionTransformer "
                "or ModifiedResNet"
            )
        self._model = model

    @property
    def visual(self) -> nn.Module:
        return self._model.visual

    @property
    def width(self) -> int:
        """Width of the prompt tokens: the ViT width, or the ResNet attention pool's input width."""
        if self.kind == "vit":
            return self.visual.transformer.width
        return self.visual.attnpool.k_proj.in_features

    @property
    def layers(self) -> int:
        """Transformer layers that take prompts (1 for a ResNet: its attention pool)."""
        return len(self.visual.transformer.resblocks) if self.kind == "vit" else 1

    def encode(self, images: Tensor, prompts: Sequence[Tensor] = ()) -> Tensor:
        """(B, 3, H, W) images and per-layer (n, W) prompts -> (B, D) image features, not normalised."""
        if self.kind == "resnet":
            visual = self.visual
            x = visual.stem(images)
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
            return attention_pool(visual.attnpool, x, prompts[0] if prompts else None)
        return self._encode_vit(images, prompts)

    def _encode_vit(self, images: Tensor, prompts: Sequence[Tensor]) -> Tensor:
        visual = self.visual
        x = visual._embeds(images)  # (B, 1 + patches, W): class token, patches, positions, ln_pre
        n = prompts[0].shape[0] if prompts else 0
        if len(prompts) > self.layers:
            raise ValueError(f"{len(prompts)} vision prompts for a {self.layers}-layer vision transformer")
        if n:
            x = torch.cat([x, prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        transformer = visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        ckpt = getattr(transformer, "grad_checkpointing", False)
        for i, block in enumerate(transformer.resblocks):
            if n and 1 <= i < len(prompts):
                x = _replace_tail_or_span(x, prompts[i], x.shape[1] - n)
            x = _run_block(block, x, None, batch_first, ckpt)
        if n:
            x = x[:, :-n]
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled


def attention_pool(pool: nn.Module, x: Tensor, extra: Tensor | None = None) -> Tensor:
    """open_clip's ``AttentionPool2d`` on a (B, C, H, W) map, with optional (n, C) extra key/value tokens.

    Only the first query (the mean token) is computed: it is all the pool returns. The pool's
    Linear layers are called (not their weights read), so adapters wrapped around them apply.
    """
    x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding.to(x.dtype)
    kv = x if extra is None else torch.cat([x, extra.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
    b, heads = x.shape[0], pool.num_heads
    q = pool.q_proj(x[:, :1]).view(b, 1, heads, -1).transpose(1, 2)
    k = pool.k_proj(kv).view(b, kv.shape[1], heads, -1).transpose(1, 2)
    v = pool.v_proj(kv).view(b, kv.shape[1], heads, -1).transpose(1, 2)
    return pool.c_proj(F.scaled_dot_product_attention(q, k, v).reshape(b, -1))
