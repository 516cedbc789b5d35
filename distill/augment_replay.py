"""Replayable image augmentation: parameters drawn explicitly, then applied deterministically.

A teacher embedding cache stores the teacher's embeddings of K augmented views of every item
(MobileCLIP's "dataset reinforcement"). For the student to see exactly the image a cached
embedding describes, the augmentation is split in two:

* :func:`replay_params`: the parameters of view ``aug_id`` of an item, a float32 vector of
  ``len(PARAM_NAMES)`` values (random resized crop box, horizontal flip, one TrivialAugment-style
  op and its signed magnitude). They come from SHA-256 of ``(seed, item key, aug id)``, so they
  are the same on every machine and in every library version without being stored; the cache
  stores them anyway and replays the stored values.
* :func:`apply_params`: PIL image + parameters -> PIL image, with no randomness: the same
  parameters give byte-identical pixels.

Augmentation id 0 is always the plain image (identity parameters): a cache with K = 1 holds the
unaugmented teacher embeddings, and every cache holds them as its view 0.

:class:`AugmentReplay` is what a training loader carries: the stored parameters, the map from
dataset index to cache row, and a random draw of the view id per sample (global torch RNG, so a
resumed run draws the same ids).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

PARAM_NAMES = ("crop_x0", "crop_y0", "crop_x1", "crop_y1", "flip", "op", "magnitude")
"""Layout of a parameter vector: the crop box as fractions of width/height, flip (0/1), the index
of the op in ``ReplayPolicy.ops``, and its signed magnitude in [-1, 1]."""

IDENTITY = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=np.float32)
"""Parameters of the plain image (augmentation id 0); op 0 of every policy is ``identity``."""

OPS = (
    "identity",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
"""Ops a policy may use (TrivialAugment's set; one of them, uniformly, per augmented view)."""


@dataclass(frozen=True)
class ReplayPolicy:
    """How augmented views are drawn (stored in the cache manifest, so replay uses the same policy).

    Args:
        crop_scale: (min, max) fraction of the image area a random resized crop keeps; (1, 1): no crop.
        crop_ratio: (min, max) aspect ratio of the crop box, in image-relative units (1 keeps the image's).
        flip_prob: probability of a horizontal flip.
        ops: ops drawn uniformly, one per view; the first must be ``identity`` (see ``OPS``).
        max_rotate: rotation in degrees at magnitude 1.
        max_shear: shear factor at magnitude 1.
        max_translate: translation as a fraction of the side at magnitude 1.
        max_enhance: brightness/colour/contrast/sharpness factor ``1 + magnitude * max_enhance``.
    """

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    flip_prob: float = 0.5
    ops: tuple[str, ...] = OPS
    max_rotate: float = 30.0
    max_shear: float = 0.3
    max_translate: float = 0.25
    max_enhance: float = 0.9

    def __post_init__(self) -> None:
        # Lists (from JSON or a YAML config) become tuples, so equal policies compare equal.
        for name in ("crop_scale", "crop_ratio", "ops"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        unknown = [op for op in self.ops if op not in OPS]
        if unknown or not self.ops or self.ops[0] != "identity":
            raise ValueError(f"ops must start with 'identity' and name known ops {list(OPS)}; got {list(self.ops)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ReplayPolicy:
        """The policy :meth:`to_dict` wrote (unknown keys are an error naming them)."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown augmentation policy keys {unknown}")
        return cls(**values)


def _uniforms(seed: int, key: str, aug_id: int) -> list[float]:
    """Eight uniforms in [0, 1) from SHA-256 of (seed, key, aug id): stable across machines and versions."""
    digest = hashlib.sha256(f"{seed}\x1f{key}\x1f{aug_id}".encode()).digest()
    return [int.from_bytes(digest[4 * i : 4 * i + 4], "little") / 2**32 for i in range(8)]


def replay_params(policy: ReplayPolicy, seed: int, key: str, aug_id: int) -> np.ndarray:
    """The float32 parameters (``len(PARAM_NAMES)``,) of view ``aug_id`` of the item ``key`` (0: identity)."""
    if aug_id == 0:
        return IDENTITY.copy()
    u = _uniforms(seed, key, aug_id)
    scale = policy.crop_scale[0] + u[0] * (policy.crop_scale[1] - policy.crop_scale[0])
    log_lo, log_hi = math.log(policy.crop_ratio[0]), math.log(policy.crop_ratio[1])
    ratio = math.exp(log_lo + u[1] * (log_hi - log_lo))
    width, height = min(1.0, math.sqrt(scale * ratio)), min(1.0, math.sqrt(scale / ratio))
    x0, y0 = u[2] * (1 - width), u[3] * (1 - height)
    flip = 1.0 if u[4] < policy.flip_prob else 0.0
    op = min(int(u[5] * len(policy.ops)), len(policy.ops) - 1)
    magnitude = u[6] * (-1.0 if u[7] < 0.5 else 1.0)
    return np.array([x0, y0, x0 + width, y0 + height, flip, op, magnitude], dtype=np.float32)


def _fill(image: Image.Image) -> int | tuple[int, ...]:
    return 0 if len(image.getbands()) == 1 else (0,) * len(image.getbands())


def _apply_op(image: Image.Image, op: str, magnitude: float, policy: ReplayPolicy) -> Image.Image:
    width, height = image.size
    enhancers = {
        "brightness": ImageEnhance.Brightness,
        "color": ImageEnhance.Color,
        "contrast": ImageEnhance.Contrast,
        "sharpness": ImageEnhance.Sharpness,
    }
    if op == "identity":
        return image
    if op in enhancers:
        return enhancers[op](image).enhance(1.0 + magnitude * policy.max_enhance)
    if op in ("posterize", "solarize", "autocontrast", "equalize") and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # ImageOps' histogram ops take 8-bit RGB or greyscale only
    if op == "posterize":
        return ImageOps.posterize(image, 8 - round(abs(magnitude) * 4))
    if op == "solarize":
        return ImageOps.solarize(image, 256 - round(abs(magnitude) * 256))
    if op == "autocontrast":
        return ImageOps.autocontrast(image)
    if op == "equalize":
        return ImageOps.equalize(image)
    if op == "rotate":
        return image.rotate(magnitude * policy.max_rotate, resample=Image.BILINEAR, fillcolor=_fill(image))
    # Affine ops: PIL maps each output pixel (x, y) to the input (a x + b y + c, d x + e y + f).
    shear, shift = magnitude * policy.max_shear, magnitude * policy.max_translate
    matrices = {
        "shear_x": (1, shear, -shear * height / 2, 0, 1, 0),  # about the centre row
        "shear_y": (1, 0, 0, shear, 1, -shear * width / 2),
        "translate_x": (1, 0, -shift * width, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, -shift * height),
    }
    return image.transform(image.size, Image.AFFINE, matrices[op], Image.BILINEAR, fillcolor=_fill(image))


def apply_params(image: Image.Image, params: Sequence[float] | np.ndarray, policy: ReplayPolicy) -> Image.Image:
    """Apply one parameter vector (see ``PARAM_NAMES``) to a PIL image: deterministic, same size out.

    Identity parameters return ``image`` itself (the plain view is the raw image, untouched).
    """
    values = np.asarray(params, dtype=np.float32)
    if values.shape != IDENTITY.shape:
        raise ValueError(
            f"augmentation parameters must have shape {IDENTITY.shape} ({PARAM_NAMES}), got {values.shape}"
        )
    if np.array_equal(values, IDENTITY):
        return image
    # Computed from the float32 values, so drawn and stored parameters give the same pixels.
    x0, y0, x1, y1, flip, op, magnitude = (float(v) for v in values)
    if not 0 <= int(op) < len(policy.ops):
        raise ValueError(f"augmentation op index {int(op)} outside the policy's {len(policy.ops)} ops")
    width, height = image.size
    if (x0, y0, x1, y1) != (0.0, 0.0, 1.0, 1.0):
        box = (x0 * width, y0 * height, x1 * width, y1 * height)
        image = image.resize((width, height), Image.BILINEAR, box=box)
    if flip >= 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return _apply_op(image, policy.ops[int(op)], magnitude, policy)


class AugmentReplay:
    """The stored augmentations of a teacher cache, replayed on a training split's images.

    Made unbound from a cache's manifest (``distill.teacher_cache.TeacherCache.replay``); :meth:`bind`
    then gives it the stored parameters and maps the datamodule's items to cache rows. A training
    sample draws its view id uniformly from ``range(num_augmentations)`` with the global torch
    generator and gets the stored parameters of (its cache row, that id); an item the cache lacks
    gets the parameters :func:`replay_params` draws for its key, the ones a build would have stored.

    Args:
        policy: the cache's augmentation policy.
        num_augmentations: the cache's K views per item.
        seed: the cache's parameter seed.
    """

    def __init__(self, policy: ReplayPolicy, num_augmentations: int, seed: int) -> None:
        self.policy, self.num_augmentations, self.seed = policy, num_augmentations, seed
        self.params: torch.Tensor | None = None  # (N, K, P) stored parameters of the cache rows
        self.rows: torch.Tensor | None = None  # dataset index -> cache row, -1 where the cache lacks the item
        self.missing_keys: dict[int, str] = {}  # dataset index -> item key, for items without a row
        #: Whether training batches also need the teacher's own views (an online teacher runs on some items).
        self.needs_teacher_views = True

    def bind(self, params: torch.Tensor, rows: torch.Tensor, keys: Sequence[str], needs_teacher_views: bool) -> None:
        """Take the stored parameters and map dataset indices to cache rows.

        Args:
            params: (N, K, P) float32 stored parameters of the cache's N rows.
            rows: (M,) cache row of each dataset item, -1 where the cache lacks it.
            keys: the M item keys (kept only for the missing items).
            needs_teacher_views: whether batches must carry the teacher's views.
        """
        expected = (self.num_augmentations, len(PARAM_NAMES))
        if params.ndim != 3 or tuple(params.shape[1:]) != expected:
            raise ValueError(f"stored augmentation parameters must be (N, *{expected}), got {tuple(params.shape)}")
        self.params = params.to(torch.float32).cpu()
        self.rows = rows.to(torch.long).cpu()
        self.missing_keys = {int(i): keys[int(i)] for i in torch.nonzero(self.rows < 0).flatten()}
        self.needs_teacher_views = needs_teacher_views

    def draw(self) -> int:
        """A view id, uniform over the cache's K views (global torch RNG: a resumed run replays it)."""
        return int(torch.randint(self.num_augmentations, ()).item())

    def params_of(self, index: int, aug_id: int) -> np.ndarray:
        """Parameters of view ``aug_id`` of dataset item ``index`` (stored, or drawn for a missing item)."""
        if self.rows is None or self.params is None:
            raise RuntimeError("augmentation replay is not bound to a datamodule: the module's setup() binds it")
        if not 0 <= aug_id < self.num_augmentations:
            raise IndexError(f"augmentation id {aug_id} outside the cache's {self.num_augmentations} views")
        row = int(self.rows[index])
        if row < 0:
            return replay_params(self.policy, self.seed, self.missing_keys[index], aug_id)
        return self.params[row, aug_id].numpy()

    def __call__(self, image: Image.Image, index: int, aug_id: int) -> Image.Image:
        """View ``aug_id`` of dataset item ``index``'s raw image."""
        return apply_params(image, self.params_of(index, aug_id), self.policy)
