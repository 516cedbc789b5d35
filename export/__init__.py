"""Export of trained networks for edge devices: ONNX towers, INT8 variants, parity gates, the bundle.

``distill.export.command`` (the ``distill export`` command) imports no optional dependency at
import time; ``pipeline``, ``onnx_export``, ``quantize``, ``parity`` and ``bnb`` need the
``export`` extra, and ``runtime`` (the bundle's runner) needs only onnxruntime, numpy and PIL.
"""
