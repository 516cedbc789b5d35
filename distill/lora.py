"""LoRA for open_clip models, CLIP-LoRA style, with peft.

peft would put one rank on open_clip's fused q/k/v attention matrix (or be bypassed by the
ModifiedResNet attention pool), so :func:`apply_lora` first splits the attention into separate
``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` Linear layers (``distill.split_attention``);
ordinary peft LoRA then goes on exactly the chosen ones. :func:`merge_lora` folds the adapters
back and re-fuses, giving a stock open_clip model.

Typical use::

    apply_lora(model, LoraSpec())          # CLIP-LoRA: r=2 on q, k, v of both towers
    ...train the LoRA A/B matrices...
    save_adapters(model, spec, "adapters.safetensors")
    save_merged_local_dir(model, model_config, preprocess_config, "merged")  # stock open_clip folder
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from open_clip.modified_resnet import AttentionPool2d
from torch import nn

from distill.files import atomic_write
from distill.split_attention import (
    SplitMultiheadAttention,
    assign_linear,
    fuse_attention,
    replace_module,
    split_attention,
)

TARGETS = ("q", "k", "v", "out", "mlp_in", "mlp_out")
TOWERS = ("image", "text")
_SPEC_KEY = "distill_lora_spec"  # safetensors metadata key holding the LoraSpec as JSON


# The LoRA spec and where it goes -------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSpec:
    """Where and how LoRA adapters go on an open_clip model (defaults: CLIP-LoRA).

    Attributes:
        rank: rank r of each adapter (A is r x in, B is out x r).
        alpha: LoRA alpha; the update B A is scaled by alpha / sqrt(r) (rsLoRA) or alpha / r.
        dropout: dropout on the adapter's input in training mode.
        targets: Linear layers to adapt: q, k, v, out (attention projections; for the
            ModifiedResNet attention pool, out is its c_proj), mlp_in, mlp_out (c_fc / c_proj of
            the transformer MLPs).
        towers: towers to adapt: image, text.
        rslora: scale by alpha / sqrt(r) (rsLoRA, CLIP-LoRA) instead of alpha / r.
        quantize_base: keep the frozen attention and MLP Linear layers of the adapted towers in
            bitsandbytes 8-bit (int8, LLM.int8) or 4-bit NF4 (nf4, QLoRA); needs bitsandbytes.
    """

    rank: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    targets: tuple[str, ...] = ("q", "k", "v")
    towers: tuple[str, ...] = ("image", "text")
    rslora: bool = True
    quantize_base: Literal["none", "int8", "nf4"] = "none"

    def __post_init__(self) -> None:
        for field, valid in (("targets", TARGETS), ("towers", TOWERS)):
            names = (getattr(self, field),) if isinstance(getattr(self, field), str) else getattr(self, field)
            object.__setattr__(self, field, tuple(names))  # a YAML list arrives as a list
            unknown = [n for n in names if n not in valid]
            if unknown or not names or len(set(names)) != len(names):
                what = f"unknown {unknown}" if unknown else "empty or repeated names"
                raise ValueError(f"LoraSpec.{field}: {what}; valid: {', '.join(valid)}")
        if self.rank < 1:
            raise ValueError(f"LoraSpec.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoraSpec.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout}")
        if self.quantize_base not in ("none", "int8", "nf4"):
            raise ValueError(f"LoraSpec.quantize_base must be none, int8 or nf4, got {self.quantize_base!r}")

    @property
    def scaling(self) -> float:
        """The factor on B A: alpha / sqrt(rank) (rsLoRA) or alpha / rank."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _tower_prefixes(model: nn.Module) -> dict[str, str]:
    """Module-name prefix of each tower: ``visual``; ``transformer`` (CLIP) or ``text`` (CustomTextCLIP)."""
    if not isinstance(getattr(model, "visual", None), nn.Module):
        raise ValueError(f"{type(model).__name__} is not an open_clip CLIP model (no .visual image tower)")
    return {"image": "visual", "text": "text" if isinstance(getattr(model, "text", None), nn.Module) else "transformer"}


def _targets_in(model: nn.Module, prefix: str) -> dict[str, list[str]]:
    """Full names of the Linear layers of each target kind inside the tower ``prefix``.

    The names are those after :func:`split_attention` (which keeps module names), so they can be
    found, and checked, before the model is changed.
    """
    found: dict[str, list[str]] = {t: [] for t in TARGETS}
    for name, module in model.named_modules():
        if not name.startswith(prefix + "."):
            continue
        if isinstance(module, (nn.MultiheadAttention, SplitMultiheadAttention)):
            parts = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
        elif isinstance(module, AttentionPool2d):
            parts = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "c_proj"}
        elif all(isinstance(getattr(module, child, None), nn.Linear) for child in ("c_fc", "c_proj")):
            parts = {"mlp_in": "c_fc", "mlp_out": "c_proj"}  # a transformer block's MLP
        else:
            continue
        for target, child in parts.items():
            found[target].append(f"{name}.{child}")
    return found


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, peft LoRA layer) pairs of ``model``."""
    from peft.tuners.lora import LoraLayer  # peft (and bitsandbytes) take ~2 s to import: only when LoRA is used

    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Freeze ``model`` and add trainable LoRA adapters where ``spec`` says (in place).

    Splits the attention (:func:`split_attention`), optionally quantises the frozen attention and
    MLP Linear layers of the chosen towers with bitsandbytes, then injects peft LoRA layers on
    the exact Linear layers of ``spec.targets`` in ``spec.towers``. Afterwards only the LoRA A/B
    matrices require grad.

    Returns:
        ``model``.

    Raises:
        ValueError: the model already has adapters, or a target matches no module in a tower.
        ModuleNotFoundError: ``quantize_base`` is set and bitsandbytes is not installed.
    """
    import peft

    if any(True for _ in _lora_layers(model)):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters (apply_lora was called twice?)")
    prefixes = _tower_prefixes(model)
    bnb = _bitsandbytes(spec.quantize_base) if spec.quantize_base != "none" else None
    names, quantizable = [], []
    for tower in spec.towers:
        found = _targets_in(model, prefixes[tower])
        for target in spec.targets:
            if not found[target]:
                has = ", ".join(t for t in TARGETS if found[t]) or "nothing LoRA can adapt"
                raise ValueError(
                    f"LoRA target {target!r} matches no module in the {tower} tower of {type(model).__name__} "
                    f"(module {prefixes[tower]!r}; its targets: {has})"
                )
            names += found[target]
        quantizable += [n for t in TARGETS for n in found[t]]
    split_attention(model)
    model.requires_grad_(False)
    flag = {"int8": "is_loaded_in_8bit", "nf4": "is_loaded_in_4bit"}.get(spec.quantize_base)
    if bnb is not None:
        for name in quantizable:
            replace_module(model, name, _quantized_linear(bnb, model.get_submodule(name), spec.quantize_base))
        setattr(model, flag, True)  # peft picks its bitsandbytes LoRA layers when the model says so
    config = peft.LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        # A regex is matched against whole names; a list would also match every name ending in an entry
        # (``transformer.resblocks.0.attn.q_proj`` would catch ``visual.transformer.resblocks.0.attn.q_proj``).
        target_modules="|".join(re.escape(name) for name in names),
        use_rslora=spec.rslora,
        bias="none",
    )
    try:
        peft.inject_adapter_in_model(config, model)
    finally:
        if flag:
            delattr(model, flag)
    for _, layer in _lora_layers(model):
        base = layer.get_base_layer()
        layer.train(base.training)  # peft's new modules start in train mode, even in an eval model
        if hasattr(base, "int8_original_dtype"):  # open_clip reads the text cast dtype from mlp.c_fc
            layer.int8_original_dtype = base.int8_original_dtype
    return model


def _bitsandbytes(mode: str) -> Any:
    try:
        import bitsandbytes
    except ImportError as error:
        raise ModuleNotFoundError(
            f"LoraSpec.quantize_base={mode!r} needs bitsandbytes: pip install 'distill[export]'"
        ) from error
    return bitsandbytes


def _quantized_linear(bnb: Any, linear: nn.Linear, mode: str) -> nn.Module:
    """A frozen bitsandbytes copy of ``linear`` (int8: LLM.int8 without outlier path; nf4: fp compute)."""
    weight, dtype = linear.weight.detach(), linear.weight.dtype
    sizes, has_bias = (linear.in_features, linear.out_features), linear.bias is not None
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(*sizes, has_bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.float().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(*sizes, has_bias, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer = layer.to(weight.device).train(linear.training)  # moving to a device is what quantises the weights
    layer.int8_original_dtype = dtype  # open_clip's attribute for the compute dtype of a quantised layer
    return layer


def _is_bitsandbytes(layer: nn.Module) -> bool:
    return type(layer).__module__.startswith("bitsandbytes")


def _float_linear(layer: nn.Module) -> nn.Linear:
    """``layer`` as a plain ``nn.Linear``; bitsandbytes layers are dequantised."""
    if not _is_bitsandbytes(layer):
        return layer
    from peft.utils.integrations import dequantize_bnb_weight

    dtype = getattr(layer, "int8_original_dtype", torch.float32)
    weight = dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).to(dtype)
    linear = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta", dtype=dtype)
    assign_linear(linear, weight, None if layer.bias is None else layer.bias.detach().to(dtype))
    return linear.requires_grad_(False)


def lora_parameter_formula(model_config: dict[str, Any], spec: LoraSpec) -> int:
    """Adapter parameters ``spec`` adds to the open_clip model of ``model_config``, from its widths.

    Each adapted Linear (in -> out) adds r * (in + out) values. Covers ViT and ModifiedResNet
    image towers and the built-in text transformer (no attentional pooler, no HF / timm towers).
    """
    vision, text = model_config["vision_cfg"], model_config["text_cfg"]
    if vision.get("attentional_pool") or vision.get("timm_model_name") or text.get("hf_model_name"):
        raise ValueError("lora_parameter_formula covers open_clip's own ViT / ModifiedResNet / text transformer")
    towers = {}
    if isinstance(vision["layers"], int):
        towers["image"] = (vision["layers"], vision["width"], vision["width"], vision.get("mlp_ratio", 4.0))
    else:  # ModifiedResNet: one attention pool of width 32 * width whose c_proj maps to embed_dim
        towers["image"] = (1, vision["width"] * 32, model_config["embed_dim"], None)
    towers["text"] = (text["layers"], text["width"], text["width"], text.get("mlp_ratio", 4.0))
    total = 0
    for tower in spec.towers:
        layers, width, out_width, mlp_ratio = towers[tower]
        hidden = int(width * mlp_ratio) if mlp_ratio else 0
        shapes = {"q": (width, width), "k": (width, width), "v": (width, width), "out": (width, out_width)}
        shapes.update({"mlp_in": (width, hidden), "mlp_out": (hidden, width)} if hidden else {})
        total += layers * sum(spec.rank * sum(shapes[t]) for t in spec.targets if t in shapes)
    return total


# Adapters: count, toggle, save, load --------------------------------------------------------------
def _is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def count_lora_parameters(model: nn.Module) -> int:
    """Number of trainable LoRA values (A and B matrices) in ``model``."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and _is_adapter_key(n))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """A context in which ``model`` computes without its LoRA updates (the frozen base model)."""
    layers = [layer for _, layer in _lora_layers(model)]
    grads = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, requires_grad in grads.items():  # enable_adapters(True) would mark all adapters trainable
            param.requires_grad_(requires_grad)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of ``model`` only: ``{"<layer>.lora_A.default.weight": (r, in), ...}``."""
    return {k: v.detach() for k, v in model.state_dict().items() if _is_adapter_key(k)}


def save_adapters(model: nn.Module, spec: LoraSpec, path: str | os.PathLike) -> Path:
    """Write the adapters of ``model`` and ``spec`` (as JSON metadata) to a safetensors file, atomically."""
    from safetensors.torch import save

    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    if not state:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to save to {path}")
    with atomic_write(path, "wb") as handle:
        handle.write(save(state, metadata={_SPEC_KEY: json.dumps(asdict(spec))}))
    return Path(path)


def load_adapters(path: str | os.PathLike) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """Read an adapter file written by :func:`save_adapters`: its ``LoraSpec`` and its tensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a safetensors file: {error}") from error
    if _SPEC_KEY not in metadata:
        raise ValueError(f"{path} is not a distill LoRA adapter file (no {_SPEC_KEY!r} metadata)")
    values = json.loads(metadata[_SPEC_KEY])
    unknown = sorted(set(values) - {f.name for f in fields(LoraSpec)})
    if unknown:
        raise ValueError(f"{path}: unknown LoraSpec fields {unknown} (written by a newer distill?)")
    return LoraSpec(**values), state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the state dict") -> None:
    """Copy adapter weights into ``model`` (built with :func:`apply_lora` and the same spec).

    Strict: every adapter of ``model`` must be in ``state`` with its shape, and nothing else.

    Raises:
        ValueError: naming the missing, unexpected or mis-shaped keys, ``source`` and the model.
    """
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in bad]
    if missing or unexpected or shapes:
        raise ValueError(
            f"LoRA adapters from {source} do not fit this {type(model).__name__}: missing {missing[:4]} "
            f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)}), shape mismatches {shapes[:4]}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)


# Merge ------------------------------------------------------------------------------------------
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return a stock open_clip model (in place).

    Quantised base layers are dequantised first (every bitsandbytes layer becomes a float
    ``nn.Linear``), peft wrappers are removed and the attention is re-fused.
    """
    for name, layer in list(_lora_layers(model)):
        if layer.merged:
            layer.unmerge()
        base = _float_linear(layer.get_base_layer())
        with torch.no_grad():
            for adapter in layer.lora_A:
                base.weight += layer.get_delta_weight(adapter).to(base.weight.dtype)
        replace_module(model, name, base)
    for name, module in list(model.named_modules()):
        if _is_bitsandbytes(module):
            replace_module(model, name, _float_linear(module))
    if hasattr(model, "peft_config"):
        del model.peft_config
    return fuse_attention(model)


def save_merged_local_dir(
    model: nn.Module, model_config: dict[str, Any], preprocess_config: dict[str, Any], folder: str | os.PathLike
) -> Path:
    """Write ``model`` with its adapters merged as a stock open_clip ``local-dir:`` folder.

    ``model`` is left unchanged (a merged copy is written); ``open_clip.create_model(
    "local-dir:<folder>")`` loads the result without distill.
    """
    from distill.clip_models import save_local_dir

    return save_local_dir(merge_lora(copy.deepcopy(model)), model_config, preprocess_config, folder)
