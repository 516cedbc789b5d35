"""INT8 variants of an exported image tower with onnxruntime quantisation.

* dynamic: weights INT8 ahead of time, activations quantised on the fly per batch
  (``quantize_dynamic``); no calibration data.
* static: weights INT8 per output channel and activations INT8 with ranges calibrated on task
  images (``quantize_static``, QDQ format, after ``quant_pre_process``).

Whether INT8 is faster depends on which nodes onnxruntime actually runs as integer kernels
after its graph fusions: :func:`runtime_op_counts` reads the optimised graph onnxruntime
executes, so the report can say which ops run quantised and which fall back to float.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from tqdm.auto import tqdm

from distill.export.onnx_export import strip_debug_info

# Node types that compute in integer arithmetic in onnxruntime's CPU provider.
INTEGER_OPS = {
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearConcat",
    "QLinearSoftmax",
}
FLOAT_COMPUTE_OPS = {"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "NhwcFusedConv"}
CONVERSION_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed task images to onnxruntime's calibrator, batch by batch.

    Args:
        images: (N, 3, H, W) float32 preprocessed images.
        input_name: the graph input's name.
        batch_size: images per calibration batch.
    """

    def __init__(self, images: np.ndarray, input_name: str = "images", batch_size: int = 32) -> None:
        self.images, self.input_name, self.batch_size = images.astype(np.float32), input_name, batch_size
        self._batches: Iterator[dict[str, np.ndarray]] | None = None

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        starts = range(0, len(self.images), self.batch_size)
        for start in tqdm(starts, desc="calibrating INT8", leave=False):
            yield {self.input_name: self.images[start : start + self.batch_size]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            self._batches = self._iterate()
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = None


def _prepared(fp32_path: str | Path, folder: str) -> str:
    """The fp32 graph after onnxruntime's pre-quantisation pass (shape inference, folding)."""
    prepared = os.path.join(folder, "prepared.onnx")
    # Dynamo-exported graphs carry shapes that onnxruntime's symbolic shape inference cannot
    # handle, so only its ONNX shape inference and folding run (skip_symbolic_shape).
    quant_pre_process(str(fp32_path), prepared, skip_symbolic_shape=True)
    return prepared


def quantize_int8_dynamic(fp32_path: str | Path, out_path: str | Path, per_channel: bool = False) -> Path:
    """Dynamic INT8: weights quantised now, activations at run time. Returns ``out_path``.

    On convolutional students this is slow on CPU: every Conv becomes ``ConvInteger`` fed by
    its own ``DynamicQuantizeLinear`` (a min/max pass over the activation), and onnxruntime
    has no fused x86 kernel for that pair; static QDQ fuses to ``QLinearConv`` instead.
    """
    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(_prepared(fp32_path, tmp), str(out_path), weight_type=QuantType.QInt8, per_channel=per_channel)
    strip_debug_info(out_path)
    return Path(out_path)


def quantize_int8_static(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    per_channel: bool = True,
    input_name: str = "images",
    method: str = "minmax",
) -> Path:
    """Static INT8 in QDQ format, calibrated on task images. Returns ``out_path``.

    Args:
        fp32_path: the fp32 ONNX file.
        out_path: where to write the INT8 file.
        calibration: (N, 3, H, W) float32 preprocessed task images.
        per_channel: one weight scale per output channel (keeps depthwise convs usable).
        input_name: the graph input's name.
        method: activation range estimator, ``minmax``, ``entropy`` or ``percentile``.
    """
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ValueError(f"calibration method must be one of {sorted(methods)}, got {method!r}")
    if len(calibration) == 0:
        raise ValueError("static INT8 needs calibration images, got none")
    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(
            _prepared(fp32_path, tmp),
            str(out_path),
            ImageCalibrationReader(calibration, input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    strip_debug_info(out_path)
    return Path(out_path)


def graph_op_counts(path: str | Path) -> Counter:
    """Node types of an ONNX file as written."""
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def runtime_op_counts(path: str | Path) -> Counter:
    """Node types of the graph onnxruntime executes after its QDQ and operator fusions, on CPU.

    Read at the EXTENDED level (all fusions; the ALL level only adds layout changes that
    onnxruntime will not serialise portably).
    """
    with tempfile.TemporaryDirectory() as tmp:
        optimised = os.path.join(tmp, "optimised.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.log_severity_level = 3
        options.optimized_model_filepath = optimised
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return graph_op_counts(optimised)


def op_report(path: str | Path) -> dict[str, object]:
    """What runs quantised in ``path``: integer ops, float compute ops left, conversions."""
    counts = runtime_op_counts(path)
    return {
        "integer_ops": {k: v for k, v in sorted(counts.items()) if k in INTEGER_OPS},
        "float_compute_ops": {k: v for k, v in sorted(counts.items()) if k in FLOAT_COMPUTE_OPS},
        "conversions": {k: v for k, v in sorted(counts.items()) if k in CONVERSION_OPS},
        "all_ops": dict(sorted(counts.items())),
    }
