"""ONNX export of a student's towers with the dynamo exporter.

Each tower becomes its own ONNX file with a dynamic batch dimension and L2-normalised output
embeddings, so a zero-shot classifier is one matrix product with the class bank:

* image tower: ``images`` (B, 3, H, W) float32 -> ``embeddings`` (B, D)
* text tower (dual-tower students only): ``tokens`` (B, L) int64 -> ``embeddings`` (B, D)

Loss modules, training-only heads and the teacher are not part of either graph: only the
student's ``encode_image`` / ``encode_text`` path is traced.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn


class ImageEncoder(nn.Module):
    """The image path of a model: ``(B, 3, H, W) -> (B, D)`` L2-normalised embeddings."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)


class TextEncoder(nn.Module):
    """The text path of a dual-tower model: ``(B, L)`` token ids -> ``(B, D)`` embeddings."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset an ONNX model was written with."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def strip_debug_info(path: str | Path) -> None:
    """Drop what only debugging needs from an ONNX file, in place.

    The dynamo exporter attaches each node's Python stack, module path and rewrite rules as
    metadata, and shape annotations onnxruntime infers again anyway: tens of KB that would
    ship to every device (and, on a small student, push an INT8 file past 30 % of fp32).
    """
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    onnx.save(model, str(path))


def export_onnx(
    encoder: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 20, input_name: str = "images"
) -> onnx.ModelProto:
    """Export ``encoder`` to ``path`` with a dynamic batch axis, then check the file.

    Args:
        encoder: ``ImageEncoder`` or ``TextEncoder`` (eval mode is set here).
        example: an example input with batch >= 2 (batch 1 would be specialised away).
        path: the ``.onnx`` file to write.
        opset: the ONNX opset to produce; the result is asserted, since the exporter may
            silently give another one.
        input_name: the graph's input name.

    Returns:
        The checked ONNX model.

    Raises:
        ValueError: for an example batch < 2 or an opset the exporter cannot give.
    """
    if example.shape[0] < 2:
        raise ValueError(f"the example batch must have >= 2 items for a dynamic batch axis, got {example.shape[0]}")
    encoder = encoder.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation/info chatter
        try:
            torch.onnx.export(
                encoder,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=[input_name],
                output_names=["embeddings"],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
                optimize=True,
            )
        except Exception as err:  # the exporter raises many types; name the request
            raise ValueError(
                f"the ONNX exporter failed for {type(encoder.model).__name__} at opset {opset}: "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from err
    model = onnx.load(str(path))
    produced = opset_of(model)
    if produced != opset:
        raise ValueError(
            f"asked for ONNX opset {opset} but the exporter produced opset {produced}; "
            f"use opset={produced} or a torch/onnxscript that supports {opset}"
        )
    onnx.checker.check_model(model, full_check=True)
    strip_debug_info(path)
    return onnx.load(str(path))
