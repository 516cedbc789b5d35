"""bitsandbytes 8-bit and 4-bit PyTorch students, for users who stay in PyTorch.

Every ``nn.Linear`` of a copy of the model is replaced by ``bnb.nn.Linear8bitLt`` (LLM.int8()
weights, threshold 0: no fp16 outlier path on CPU) or ``bnb.nn.Linear4bit`` (NF4 weights,
fp32 compute). Convolutions stay in float: bitsandbytes quantises Linear layers only, so a
convolutional student keeps most of its weights in fp32 (the report gives the fraction).
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Literal

import torch
from open_clip.modified_resnet import AttentionPool2d
from torch import nn


def load_bitsandbytes():
    """Import bitsandbytes (the ``export`` extra) quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optional `kernels` package missing": it would use a hub
        import bitsandbytes as bnb
    return bnb


def _quantised_linear(linear: nn.Linear, bits: Literal[8, 4]) -> nn.Module:
    bnb = load_bitsandbytes()
    weight = linear.weight.detach().float().clone()
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, threshold=0.0
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.float32,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # moving to a device is what quantises the weights


def quantise_linears(model: nn.Module, bits: Literal[8, 4]) -> tuple[nn.Module, dict[str, float]]:
    """A copy of ``model`` with every ``nn.Linear`` replaced by its bitsandbytes version.

    Args:
        model: a float model (left unchanged).
        bits: 8 (LLM.int8) or 4 (NF4).

    Returns:
        The quantised copy (eval mode) and ``{"linear_layers": n, "linear_param_fraction": f}``,
        the share of parameters that bitsandbytes quantised.

    Raises:
        ValueError: for bits other than 8 or 4.
    """
    if bits not in (8, 4):
        raise ValueError(f"bitsandbytes supports 8 or 4 bits, got {bits}")
    quantised = copy.deepcopy(model).float().eval()
    total = sum(p.numel() for p in quantised.parameters())
    replaced, linear_params = 0, 0
    for parent in list(quantised.modules()):
        if isinstance(parent, AttentionPool2d):
            # open_clip's ResNet attention pool hands its projections' weights to
            # F.multi_head_attention_forward instead of calling them: they must stay float.
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                linear_params += child.weight.numel() + (child.bias.numel() if child.bias is not None else 0)
                setattr(parent, name, _quantised_linear(child, bits))
                replaced += 1
    return quantised, {"linear_layers": replaced, "linear_param_fraction": linear_params / max(total, 1)}


def serialized_bytes(model: nn.Module) -> int:
    """Size of the model's state dict as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()
