"""Split attention: open_clip's fused attention as separate q / k / v / out Linear layers.

open_clip computes attention with ``nn.MultiheadAttention`` (one fused (3E, E) ``in_proj_weight``
for q, k and v) and, in the ModifiedResNet, with ``F.multi_head_attention_forward`` on the weights
of its attention pool's Linear layers. LoRA wants its own rank on each of q, k and v (CLIP-LoRA),
and a LoRA wrapper around a Linear whose weight is read directly would be bypassed. So
:func:`split_attention` swaps each attention for a numerically identical module that calls
separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` (``c_proj`` in the pool) Linear
layers, keeping module names; :func:`fuse_attention` is its inverse and gives back stock open_clip
modules and state-dict keys. ``distill.lora`` puts peft LoRA layers on the split Linears.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d
from torch import nn


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with q, k, v and out projections as separate ``nn.Linear`` layers.

    Same call as the stock module: ``forward(query, key, value, key_padding_mask, need_weights,
    attn_mask, average_attn_weights, is_causal) -> (output, weights or None)``; inputs are
    (N, L, E) when ``batch_first`` else (L, N, E), or unbatched (L, E); bool masks mark the
    positions that may NOT be attended to, float masks are added to the attention logits;
    ``attn_mask`` is (L, S) or (N * num_heads, L, S), ``key_padding_mask`` (N, S).

    Args:
        embed_dim: model width E (query input and output).
        num_heads: attention heads (E must divide by it).
        kdim: key input width (default E).
        vdim: value input width (default E).
        bias: whether the projections have biases.
        dropout: dropout on the attention weights in training mode.
        batch_first: whether inputs are (N, L, E) rather than (L, N, E).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
        """The split twin of ``mha`` (weights copied; same device and dtype)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot be split")
        bias = mha.in_proj_bias is not None
        with torch.device("meta"):  # no throw-away random init: the weights are assigned below
            split = cls(mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, bias, mha.dropout, mha.batch_first)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if bias else (None, None, None)
        out_bias = mha.out_proj.bias.detach() if bias else None
        for linear, w, b in zip(
            (split.q_proj, split.k_proj, split.v_proj, split.out_proj),
            (*weights, mha.out_proj.weight.detach()),
            (*biases, out_bias),
        ):
            assign_linear(linear, w, b)
        return split.requires_grad_(mha.out_proj.weight.requires_grad)

    def to_mha(self) -> nn.MultiheadAttention:
        """The stock ``nn.MultiheadAttention`` computing the same function (weights copied)."""
        _check_plain(self, (self.q_proj, self.k_proj, self.v_proj, self.out_proj))
        w = self.q_proj.weight
        bias = self.q_proj.bias is not None
        kdim, vdim = self.k_proj.in_features, self.v_proj.in_features
        with torch.device("meta"):  # no throw-away random init: the weights are assigned below
            mha = nn.MultiheadAttention(
                self.embed_dim, self.num_heads, self.dropout, bias, kdim=kdim, vdim=vdim, batch_first=self.batch_first
            )
        weights = [lin.weight.detach() for lin in (self.q_proj, self.k_proj, self.v_proj)]
        state = {"out_proj.weight": self.out_proj.weight.detach().clone()}
        if mha._qkv_same_embed_dim:
            state["in_proj_weight"] = torch.cat(weights)
        else:
            state.update({f"{n}_proj_weight": t.clone() for n, t in zip("qkv", weights)})
        if bias:
            state["in_proj_bias"] = torch.cat([lin.bias.detach() for lin in (self.q_proj, self.k_proj, self.v_proj)])
            state["out_proj.bias"] = self.out_proj.bias.detach().clone()
        mha.load_state_dict(state, assign=True)
        return mha.requires_grad_(w.requires_grad)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, E) -> (N, num_heads, L, head_dim)."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, (n, self.num_heads, length, source), q)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # explicit softmax: the fused kernel does not return the weights
            weights = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            weights = (weights if mask is None else weights + mask).softmax(dim=-1)
            x = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        x = self.out_proj(x.transpose(1, 2).reshape(n, length, self.embed_dim))
        if unbatched:
            return x.squeeze(0), None if weights is None else weights.squeeze(0)
        return (x if self.batch_first else x.transpose(0, 1)), weights


class SplitAttentionPool2d(AttentionPool2d):
    """open_clip's ModifiedResNet attention pool, computed by calling its Linear layers.

    The stock pool passes the weights of ``q_proj`` / ``k_proj`` / ``v_proj`` / ``c_proj`` to
    ``F.multi_head_attention_forward``, which would bypass LoRA wrappers on them. Same parameters,
    same output (N, C, H, W) -> (N, output_dim); only the mean token's query is computed, as the
    stock pool returns only that row.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        n, heads = x.shape[0], self.num_heads
        q = self.q_proj(x[:, :1]).view(n, 1, heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(n, x.shape[1], heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(n, x.shape[1], heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, 1, head_dim)
        return self.c_proj(out.reshape(n, -1))


def assign_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give ``linear`` copies of ``weight`` (out, in) and ``bias`` (out,) as new Parameters (bias None: kept)."""
    linear.weight = nn.Parameter(weight.clone())  # a copy: no storage shared with the fused tensor
    if bias is not None:
        linear.bias = nn.Parameter(bias.clone())


def _check_plain(module: nn.Module, linears: tuple[nn.Module, ...]) -> None:
    if any(type(lin) is not nn.Linear for lin in linears):
        raise ValueError(f"{type(module).__name__} still holds LoRA or quantised layers: call merge_lora first")


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    shape: tuple[int, int, int, int],
    like: torch.Tensor,
) -> torch.Tensor | None:
    """One float mask broadcastable to (N, heads, L, S), or None; bool True becomes -inf."""
    n, heads, length, source = shape

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(mask, float("-inf"))
        return mask.to(like.dtype)

    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=like.device).triu(1)
    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(n, heads, length, source) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(n, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` (dotted, as in ``named_modules``) of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _rebuild_pool(pool: AttentionPool2d, cls: type[AttentionPool2d]) -> AttentionPool2d:
    """``pool`` as an instance of ``cls`` holding the same tensors."""
    spacial = round(math.sqrt(pool.positional_embedding.shape[0] - 1))
    with torch.device("meta"):
        new = cls(spacial, pool.q_proj.in_features, pool.num_heads, pool.c_proj.out_features)
    new.load_state_dict(pool.state_dict(), assign=True)
    return new.requires_grad_(pool.q_proj.weight.requires_grad).train(pool.training)


def split_attention(model: nn.Module) -> nn.Module:
    """Swap every ``nn.MultiheadAttention`` and ModifiedResNet ``AttentionPool2d`` for its split twin.

    In place; outputs are unchanged (to float rounding). Returns ``model``.
    """
    for name, module in list(model.named_modules()):
        if type(module) is nn.MultiheadAttention:
            replace_module(model, name, SplitMultiheadAttention.from_mha(module).train(module.training))
        elif type(module) is AttentionPool2d:
            replace_module(model, name, _rebuild_pool(module, SplitAttentionPool2d))
    return model


def fuse_attention(model: nn.Module) -> nn.Module:
    """The inverse of :func:`split_attention`: stock attention modules and state-dict keys again.

    In place; returns ``model``. Merge LoRA first (:func:`merge_lora` does both).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, SplitMultiheadAttention):
            replace_module(model, name, module.to_mha().train(module.training))
        elif isinstance(module, SplitAttentionPool2d):
            _check_plain(module, (module.q_proj, module.k_proj, module.v_proj, module.c_proj))
            replace_module(model, name, _rebuild_pool(module, AttentionPool2d))
    return model
