"""Torch-free zero-shot classifier over an edge bundle: onnxruntime, numpy and PIL only.

    python -m distill.export.runtime BUNDLE IMAGE [IMAGE ...] [--top K] [--variant NAME]
    python BUNDLE/run.py BUNDLE IMAGE          # the copy shipped inside every bundle

A bundle (written by ``distill export``) holds the image tower as ONNX (fp32 and INT8
variants), the class bank (C, D) of text embeddings, the class names and the preprocessing
spec. This file must never import torch: it is copied into the bundle and runs on devices
that have only onnxruntime, numpy and pillow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

BUNDLE_FILE = "bundle.json"
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def preprocess(image: Image.Image, spec: dict) -> np.ndarray:
    """PIL image -> (3, H, W) float32, replaying the model's eval transform.

    Same arithmetic as torchvision on PIL input: Resize (shorter side or exact size) with
    PIL's resampling, CenterCrop with rounded offsets, scaling to [0, 1], Normalize.
    """
    image = image.convert("RGB")
    resample = _RESAMPLE[spec.get("interpolation", "bilinear")]
    size = spec.get("resize")
    if size is not None:
        width, height = image.size
        if isinstance(size, int):  # shorter side -> size, aspect ratio kept (torchvision rule)
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = size, int(size * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            new_h, new_w = size
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample)
    crop = spec.get("crop")
    if crop is not None:
        crop_h, crop_w = crop
        width, height = image.size
        if crop_h > height or crop_w > width:
            raise ValueError(f"image of {width}x{height} is smaller than the crop {crop_w}x{crop_h}")
        top, left = round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)
        image = image.crop((left, top, left + crop_w, top + crop_h))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def open_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU onnxruntime session (``threads`` = 0: onnxruntime's choice)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


class EdgeClassifier:
    """Zero-shot image classification from a bundle folder.

    Args:
        bundle_dir: the folder ``distill export`` wrote.
        variant: image model variant (``fp32``, ``int8_dynamic``, ``int8_static``); the
            bundle's default (``default_image_model`` in bundle.json, with the rule that chose it) when None.
        threads: onnxruntime intra-op threads (0: onnxruntime's choice).
    """

    def __init__(self, bundle_dir: str | Path, variant: str | None = None, threads: int = 0) -> None:
        self.root = Path(bundle_dir)
        meta_path = self.root / BUNDLE_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: {self.root} is not a distill edge bundle")
        self.meta = json.loads(meta_path.read_text())
        models = self.meta["image_models"]
        self.variant = variant or self.meta["default_image_model"]
        if self.variant not in models:
            raise ValueError(f"variant {self.variant!r} is not in the bundle (has: {sorted(models)})")
        self.session = open_session(self.root / models[self.variant]["file"], threads)
        self.input_name = self.session.get_inputs()[0].name
        self.classnames: list[str] = json.loads((self.root / self.meta["classnames"]).read_text())
        self.class_bank = np.load(self.root / self.meta["class_bank"]).astype(np.float32)
        self.logit_scale = float(self.meta.get("logit_scale", 100.0))

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) preprocessed float32 -> (B, D) L2-normalised embeddings."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, np.float32)})[0]

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """PIL images -> (B, D) embeddings, preprocessed with the bundle's spec."""
        return self.embed(np.stack([preprocess(im, self.meta["preprocess"]) for im in images]))

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """PIL images -> (B, C) class probabilities."""
        return _softmax(self.logit_scale * self.embed_images(images) @ self.class_bank.T)

    def classify(self, images: list[Image.Image], top: int = 5) -> list[list[tuple[str, float]]]:
        """The ``top`` (class name, probability) pairs of each image, best first."""
        probs = self.probabilities(images)
        order = np.argsort(-probs, axis=1)[:, :top]
        return [[(self.classnames[j], float(p[j])) for j in row] for p, row in zip(probs, order)]


_USAGE = "usage: python -m distill.export.runtime BUNDLE IMAGE [IMAGE ...] [--top K] [--variant NAME]"


def main(argv: list[str] | None = None) -> int:
    """Print the top classes of each image file. Returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    options = {"--top": "5", "--variant": None}
    for flag in list(options):
        if flag in args:
            at = args.index(flag)
            if at + 1 >= len(args):
                print(f"{flag} needs a value\n{_USAGE}", file=sys.stderr)
                return 2
            options[flag] = args[at + 1]
            del args[at : at + 2]
    if len(args) < 2 or any(a.startswith("-") for a in args):
        print(_USAGE, file=sys.stderr)
        return 2
    try:
        classifier = EdgeClassifier(args[0], variant=options["--variant"])
        for path in args[1:]:
            with Image.open(path) as image:
                ranked = classifier.classify([image], top=int(options["--top"]))[0]
            print(path)
            for name, prob in ranked:
                print(f"  {prob:6.1%}  {name}")
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
