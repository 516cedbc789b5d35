"""``distill export``: ONNX towers, INT8 variants, parity gates, latency, and the edge bundle.

The bundle is built in a temporary folder beside ``output_dir`` and moved into place only when
every gate passed, so a failed or interrupted export never leaves a half-written bundle. A
missed gate raises :class:`ParityError`; its report is kept as ``<output_dir>.failed.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from distill.export import runtime
from distill.export.bnb import quantise_linears, serialized_bytes
from distill.export.onnx_export import ImageEncoder, TextEncoder, export_onnx, exported_model
from distill.export.parity import (
    EvalSet,
    ParityError,
    embedding_parity,
    median_latency_ms,
    ort_embeddings,
    runner_inputs,
    torch_embeddings,
    torch_inputs,
)
from distill.export.preprocess_spec import preprocess_spec
from distill.export.quantize import op_report, quantize_int8_dynamic, quantize_int8_static
from distill.export.report import markdown_report
from distill.export.runtime import open_session as session
from distill.files import atomic_write_json

Quantisation = Literal["dynamic", "static"]
DEFAULT_QUANTIZE: tuple[Quantisation, ...] = ("dynamic", "static")


@dataclass
class Gates:
    """Parity gate thresholds.

    Attributes:
        fp32_max_abs_diff: max abs difference of ONNX fp32 vs PyTorch embeddings.
        int8_max_top1_drop: max drop of INT8 top-1 (points) vs ONNX fp32, on ID and on OOD.
        allow_failed_int8: drop an INT8 variant that misses its gate from the bundle (and say
            so in the report) instead of failing the export.
    """

    fp32_max_abs_diff: float = 1e-4
    int8_max_top1_drop: float = 1.0
    allow_failed_int8: bool = False


def check_output_dir(output_dir: str | Path) -> Path:
    """Fail early when ``output_dir``'s parent cannot be created or written to."""
    out = Path(output_dir).resolve()
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the export folder's parent {parent}: {err.strerror}") from err
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"export folder {out} is not writable")
    if out.exists() and not out.is_dir():
        raise ValueError(f"export folder {out} exists and is not a folder")
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Replace ``out`` with ``tmp`` (a rename on the same file system)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _mib(path: Path | int) -> float:
    return (path if isinstance(path, int) else path.stat().st_size) / 2**20


def _latencies(run_batch, images: np.ndarray, repeats: int) -> dict[str, float]:
    one, many = images[:1], np.concatenate([images] * (32 // len(images) + 1))[:32]
    return {
        "latency_ms_b1": median_latency_ms(lambda: run_batch(one), repeats),
        "latency_ms_b32": median_latency_ms(lambda: run_batch(many), max(3, repeats // 4)),
    }


def export_bundle(
    model: nn.Module,
    eval_set: EvalSet,
    calibration: list,
    output_dir: str | Path,
    opset: int = 20,
    quantize: list[Quantisation] | None = None,
    bitsandbytes: list[int] | None = None,
    gates: Gates | None = None,
    logit_scale: float = 100.0,
    latency_repeats: int = 20,
) -> dict[str, Any]:
    """Export ``model``'s student, gate every variant on ``eval_set`` and write the bundle.

    Args:
        model: a trained LightningModule (or any module) with a ``student`` or ``model`` that has
            ``encode_image`` (and ``encode_text`` for dual towers) and ``preprocess_val``.
        eval_set: task images (ID and OOD) and the class bank for the gates and the report.
        calibration: PIL images for static INT8 calibration.
        output_dir: the bundle folder (replaced atomically when the export succeeds).
        opset: ONNX opset, asserted on the result.
        quantize: INT8 variants to make (default: dynamic and static).
        bitsandbytes: bit widths of PyTorch bitsandbytes students to report (default 8 and 4).
        gates: parity thresholds.
        logit_scale: softmax temperature the runner uses for probabilities.
        latency_repeats: timed repeats at batch 1 (a quarter of them at batch 32).

    Returns:
        The report dict (also written as ``report.json`` and ``report.md`` in the bundle).

    Raises:
        ParityError: a gate was missed (the bundle is not written).
    """
    gates = gates or Gates()
    quantize = list(DEFAULT_QUANTIZE if quantize is None else quantize)
    bitsandbytes = [8, 4] if bitsandbytes is None else list(bitsandbytes)
    out = check_output_dir(output_dir)
    network = exported_model(model).eval()
    transform = getattr(model, "preprocess_val", None) or network.preprocess_val
    spec = preprocess_spec(transform)
    image_encoder = ImageEncoder(network).eval()
    torch_in = torch_inputs(eval_set.images, transform)
    runner_in = runner_inputs(eval_set.images, spec)
    reference = torch_embeddings(image_encoder, torch_in)
    report: dict[str, Any] = {
        "opset": opset,
        "num_eval_images": len(eval_set.images),
        "gates": asdict(gates),
        "preprocess": spec,
        "variants": {},
        "failures": [],
    }
    variants = report["variants"]
    variants["pytorch_fp32"] = {
        "kind": "pytorch",
        "size_mib": _mib(serialized_bytes(network)),
        **eval_set.top1(reference),
        **_latencies(lambda x: image_encoder(torch.from_numpy(x)), runner_in, latency_repeats),
    }
    for bits in bitsandbytes:
        quantised, info = quantise_linears(network, bits)
        encoder = ImageEncoder(quantised)
        emb = torch_embeddings(encoder, torch_in)
        variants[f"pytorch_bnb{bits}"] = {
            "kind": "pytorch",
            "size_mib": _mib(serialized_bytes(quantised)),
            **info,
            **eval_set.top1(emb),
            **embedding_parity(reference, emb),
            **_latencies(lambda x, e=encoder: e(torch.from_numpy(x)), runner_in, latency_repeats),
        }

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        image_models = _export_images(
            image_encoder,
            torch_in,
            tmp,
            opset,
            quantize,
            calibration,
            spec,
            eval_set,
            runner_in,
            reference,
            gates,
            report,
            latency_repeats,
        )
        text_file = _export_text(network, eval_set, tmp, opset, gates, report)
        if report["failures"]:
            raise ParityError("; ".join(report["failures"]))
        fastest = min(image_models, key=lambda name: variants[f"onnx_{name}"]["latency_ms_b1"])
        report["default_image_model"] = fastest
        np.save(tmp / "class_bank.npy", eval_set.class_bank.astype(np.float32))
        (tmp / "classnames.json").write_text(json.dumps(list(eval_set.classnames)))
        meta = {
            "format": "distill-edge-bundle",
            "version": 1,
            "default_image_model": fastest,
            "image_models": {name: {"file": f"image_{name}.onnx"} for name in image_models},
            "text_model": text_file,
            "embed_dim": int(reference.shape[1]),
            "logit_scale": float(logit_scale),
            "class_bank": "class_bank.npy",
            "classnames": "classnames.json",
            "preprocess": spec,
            "opset": opset,
        }
        (tmp / runtime.BUNDLE_FILE).write_text(json.dumps(meta, indent=2))
        shutil.copyfile(runtime.__file__, tmp / "run.py")
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(markdown_report(report))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if report["failures"]:
            atomic_write_json(out.with_name(out.name + ".failed.json"), report)
        raise
    return report


def _export_images(
    encoder,
    torch_in,
    tmp,
    opset,
    quantize,
    calibration,
    spec,
    eval_set,
    runner_in,
    reference,
    gates: Gates,
    report,
    latency_repeats,
) -> list[str]:
    """Export, quantise, gate and time the image tower. Returns the variants that passed."""
    variants = report["variants"]
    fp32_path = tmp / "image_fp32.onnx"
    export_onnx(encoder, torch_in[:2], fp32_path, opset=opset, input_name="images")
    paths = {"fp32": fp32_path}
    if "dynamic" in quantize:
        paths["int8_dynamic"] = quantize_int8_dynamic(fp32_path, tmp / "image_int8_dynamic.onnx")
    if "static" in quantize:
        calib = runner_inputs(calibration, spec)
        paths["int8_static"] = quantize_int8_static(fp32_path, tmp / "image_int8_static.onnx", calib)
    unknown = set(quantize) - {"dynamic", "static"}
    if unknown:
        raise ValueError(f"unknown quantize option(s) {sorted(unknown)}; choose from dynamic, static")
    passed = []
    for name, path in paths.items():
        sess = session(str(path))
        emb = ort_embeddings(sess, runner_in)
        row = {
            "kind": "onnxruntime",
            "file": path.name,
            "size_mib": _mib(path),
            **eval_set.top1(emb),
            **embedding_parity(reference, emb),
            **_latencies(lambda x, s=sess: s.run(None, {"images": x}), runner_in, latency_repeats),
        }
        if name != "fp32":
            row["size_ratio_vs_fp32"] = path.stat().st_size / fp32_path.stat().st_size
            row["ops"] = op_report(path)
        variants[f"onnx_{name}"] = row
        failure = _gate(name, row, variants.get("onnx_fp32"), gates)
        row["gate"] = "passed" if failure is None else f"failed: {failure}"
        if failure is None:
            passed.append(name)
        elif name == "fp32" or not gates.allow_failed_int8:
            report["failures"].append(f"image {name}: {failure}")
        else:
            path.unlink()  # dropped from the bundle; the report keeps its row
    return passed


def _gate(name: str, row: dict, fp32_row: dict | None, gates: Gates) -> str | None:
    """None when ``row`` passes its gate, else why it does not."""
    if name == "fp32":
        if row["max_abs_diff"] > gates.fp32_max_abs_diff:
            return (
                f"max abs diff {row['max_abs_diff']:.2e} vs PyTorch exceeds {gates.fp32_max_abs_diff:.0e} "
                "(check the bundle's preprocessing and the exported graph)"
            )
        return None
    drops = {g: fp32_row[f"{g}_top1"] - row[f"{g}_top1"] for g in ("id", "ood") if f"{g}_top1" in row}
    worst = max(drops, key=drops.get)
    if drops[worst] > gates.int8_max_top1_drop:
        return f"{worst.upper()} top-1 drops {drops[worst]:.1f} points vs fp32 (limit {gates.int8_max_top1_drop:g})"
    return None


def _export_text(network, eval_set: EvalSet, tmp: Path, opset: int, gates: Gates, report) -> str | None:
    """Export and gate the text tower of a dual-tower student. Returns its file name."""
    tokenizer = getattr(network, "tokenizer", None)
    if not hasattr(network, "encode_text") or tokenizer is None:
        return None
    prompts = [f"a photo of a {name}." for name in eval_set.classnames]
    tokens = tokenizer(prompts if len(prompts) >= 2 else prompts * 2)
    encoder = TextEncoder(network).eval()
    path = tmp / "text_fp32.onnx"
    export_onnx(encoder, tokens[:2], path, opset=opset, input_name="tokens")
    parity = embedding_parity(torch_embeddings(encoder, tokens), ort_embeddings(session(str(path)), tokens.numpy()))
    ok = parity["max_abs_diff"] <= gates.fp32_max_abs_diff
    report["variants"]["onnx_text_fp32"] = {
        "kind": "onnxruntime",
        "file": path.name,
        "size_mib": _mib(path),
        **parity,
        "gate": "passed" if ok else "failed",
    }
    if not ok:
        report["failures"].append(
            f"text fp32: max abs diff {parity['max_abs_diff']:.2e} exceeds {gates.fp32_max_abs_diff:.0e}"
        )
    return path.name


def eval_set_from_datamodule(
    datamodule: Any, class_bank: torch.Tensor, split: str = "test", limit: int | None = None
) -> EvalSet:
    """Task images of a distill datamodule's split, with its domains and class list.

    Args:
        datamodule: a distill datamodule (``raw_samples``, ``classnames``, ``domain_names``,
            ``id_domains``, ``ood_domains``, optionally ``eval_class_indices``).
        class_bank: (C, D) class text embeddings for ``datamodule.classnames``.
        split: ``train``, ``val`` or ``test``.
        limit: at most this many images, evenly spaced over the split (all when None).
    """
    samples = datamodule.raw_samples(split, limit)
    if not samples:
        raise ValueError(f"the datamodule's {split} split has no images to check the export on")
    classnames = list(datamodule.classnames)
    if class_bank.shape[0] != len(classnames):
        raise ValueError(f"class bank has {class_bank.shape[0]} rows for {len(classnames)} class names")
    return EvalSet(
        images=[s["image"] for s in samples],
        labels=np.array([s["label"] for s in samples]),
        domains=np.array([s["domain"] for s in samples]),
        domain_names=list(datamodule.domain_names),
        id_domains=list(datamodule.id_domains),
        ood_domains=list(datamodule.ood_domains),
        class_bank=class_bank.detach().float().cpu().numpy(),
        classnames=classnames,
        eval_classes=getattr(datamodule, "eval_class_indices", None) or list(range(len(classnames))),
    )


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a distill training checkpoint's weights into ``model``, or fail clearly.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a distill checkpoint of this model (unreadable with
            ``weights_only=True``, no ``state_dict``, written by another module, or weights that
            do not match).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and format errors all mean "not ours"
        raise ValueError(
            f"{path} is not a distill checkpoint (unreadable as a weights-only torch file: {type(err).__name__})"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path} is not a distill checkpoint: it has no 'state_dict'")
    written_by = (checkpoint.get("distill") or {}).get("module")
    if written_by is not None and written_by != type(model).__name__:
        raise ValueError(f"{path} was written by {written_by}, not {type(model).__name__}: use its config")
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path} does not match {type(model).__name__}: {str(err).splitlines()[0]}") from err
