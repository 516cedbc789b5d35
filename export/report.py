"""The export report as markdown: one row per variant, the gates, and what runs quantised."""

from __future__ import annotations

from typing import Any

_LABELS = {
    "pytorch_fp32": "PyTorch fp32",
    "pytorch_bnb8": "PyTorch bitsandbytes 8-bit (Linear)",
    "pytorch_bnb4": "PyTorch bitsandbytes 4-bit NF4 (Linear)",
    "onnx_fp32": "ORT fp32",
    "onnx_int8_dynamic": "ORT INT8 dynamic",
    "onnx_int8_static": "ORT INT8 static QDQ (per-channel)",
    "onnx_text_fp32": "ORT text tower fp32",
}


def variant_label(name: str) -> str:
    """A readable name of an export variant key (``onnx_int8_static`` -> ``ORT INT8 static QDQ (per-channel)``)."""
    return _LABELS.get(name, name)


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


def markdown_report(report: dict[str, Any]) -> str:
    """Render :func:`distill.export.pipeline.export_bundle`'s report as markdown."""
    towers = report.get("towers", ["image"])
    exported = " and ".join(towers) + (" towers" if len(towers) > 1 else " tower")
    lines = [
        f"Export report: {report.get('module', 'model')} ({exported}), "
        f"opset {report['opset']}, {report['num_eval_images']} task images, latency = median on this CPU "
        "(ONNX variants timed interleaved).",
        "",
    ]
    if "default_image_model" in report:
        lines += [
            f"Default image model: `{report['default_image_model']}` ({report['default_image_model_reason']}). "
            f"Rule: {report['default_image_model_rule']}.",
            "",
        ]
    lines += [
        "| variant | size MiB | ms @ b1 | ms @ b32 | ID top-1 | OOD top-1 | max abs diff | min cosine | gate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in report["variants"].items():
        lines.append(
            f"| {variant_label(name)} | {_cell(row, 'size_mib', '.3f')} | "
            f"{_cell(row, 'latency_ms_b1', '.3f')} | {_cell(row, 'latency_ms_b32', '.2f')} | "
            f"{_cell(row, 'id_top1', '.1f')} | {_cell(row, 'ood_top1', '.1f')} | "
            f"{_cell(row, 'max_abs_diff', '.1e')} | {_cell(row, 'min_cosine', '.5f')} | "
            f"{row.get('gate', '-')} |"
        )
    notes = []
    for name, row in report["variants"].items():
        if "ops" in row:
            ops = row["ops"]
            notes.append(
                f"- {variant_label(name)}: {row['size_ratio_vs_fp32']:.0%} of fp32; onnxruntime runs "
                f"integer ops {ops['integer_ops'] or 'none'}, float compute ops "
                f"{ops['float_compute_ops'] or 'none'}, conversions {ops['conversions'] or 'none'}."
            )
        if "linear_param_fraction" in row:
            notes.append(
                f"- {variant_label(name)}: {row['linear_layers']} Linear layers quantised, "
                f"{row['linear_param_fraction']:.0%} of the parameters (convolutions stay fp32)."
            )
    if notes:
        lines += ["", "What runs quantised (onnxruntime's optimised graph):", *notes]
    if report.get("failures"):
        lines += ["", "Gates missed:", *[f"- {f}" for f in report["failures"]]]
    return "\n".join(lines) + "\n"
