"""Export of students to ONNX / INT8 for edge devices (not built yet; see the issue tracker)."""
