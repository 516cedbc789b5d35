"""The preprocessing spec of an edge bundle, read off the model's own eval transform.

The spec is what the torch-free runner (``distill.export.runtime``) replays with PIL and numpy:

    {"resize": 64 | [H, W], "resize_mode": "shortest" | "exact", "interpolation": "bicubic",
     "crop": [H, W] | null, "mean": [r, g, b], "std": [r, g, b]}

It is derived from the transform object that PyTorch evaluation really uses (timm's or
open_clip's torchvision ``Compose``), never typed by hand, so the two cannot drift apart. A
step the runner cannot replay is an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torchvision import transforms as T

_INTERPOLATIONS = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "lanczos",
    "box": "box",
    "hamming": "hamming",
}
# Steps that change nothing the runner does not already do (RGB conversion, to-tensor scaling).
_PASS_THROUGH = (
    "ToTensor",
    "MaybeToTensor",
    "PILToTensor",
    "_convert_to_rgb",
    "convert_to_rgb",
    "ToImage",
    "ToDtype",
    "ConvertImageDtype",
)


def _steps(transform: Callable) -> list[Callable]:
    return list(transform.transforms) if hasattr(transform, "transforms") else [transform]


def _name(step: Callable) -> str:
    return getattr(step, "__name__", None) or type(step).__name__


def _size(value: Any) -> int | list[int]:
    if isinstance(value, int):
        return value
    value = list(value)
    return value[0] if len(value) == 1 else [int(v) for v in value]


def preprocess_spec(transform: Callable) -> dict[str, Any]:
    """Describe a torchvision eval transform as the runner's JSON spec.

    Args:
        transform: the model's eval transform (``Compose`` of Resize, CenterCrop, ToTensor,
            Normalize, RGB conversion; open_clip's ``ResizeKeepRatio`` is not replayable).

    Returns:
        The spec dict (see the module docstring).

    Raises:
        ValueError: a step the runner cannot replay, or no ``Normalize``.
    """
    spec: dict[str, Any] = {
        "resize": None,
        "resize_mode": "shortest",
        "interpolation": "bilinear",
        "crop": None,
        "mean": None,
        "std": None,
    }
    for step in _steps(transform):
        name = _name(step)
        if isinstance(step, T.Resize):
            size = _size(step.size)
            mode = getattr(step.interpolation, "value", str(step.interpolation)).lower()
            if mode not in _INTERPOLATIONS:
                raise ValueError(f"resize interpolation {mode!r} is not supported by the edge runner")
            if getattr(step, "max_size", None) is not None:
                raise ValueError("Resize(max_size=...) is not supported by the edge runner")
            spec.update(
                resize=size,
                resize_mode="shortest" if isinstance(size, int) else "exact",
                interpolation=_INTERPOLATIONS[mode],
            )
        elif isinstance(step, T.CenterCrop):
            size = _size(step.size)
            spec["crop"] = [size, size] if isinstance(size, int) else size
        elif isinstance(step, T.Normalize):
            spec.update(mean=[float(v) for v in step.mean], std=[float(v) for v in step.std])
        elif name in _PASS_THROUGH or (name == "MaybeConvertMode" and getattr(step, "mode", "RGB") == "RGB"):
            continue
        else:
            raise ValueError(
                f"preprocessing step {name} cannot be replayed by the edge runner "
                "(supported: Resize, CenterCrop, ToTensor, Normalize, RGB conversion)"
            )
    if spec["mean"] is None:
        raise ValueError("the eval transform has no Normalize step: the bundle needs mean/std")
    return spec
