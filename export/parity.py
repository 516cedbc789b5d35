"""Parity between PyTorch and onnxruntime on real task images, and latency timing.

The PyTorch side preprocesses with the model's own torchvision transform; the onnxruntime side
with the bundle's spec replayed by the torch-free runner (:func:`distill.export.runtime.preprocess`).
A wrong mean/std or size in the bundle therefore shows up as an embedding difference here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from distill.export.runtime import preprocess
from distill.zeroshot import domain_accuracies, zero_shot_hits


class ParityError(RuntimeError):
    """An exported model missed a parity gate."""


@dataclass
class EvalSet:
    """Task images with labels and domains, and the class bank they are scored against.

    Attributes:
        images: PIL images.
        labels: (N,) class indices into the class bank's rows.
        domains: (N,) domain indices into ``domain_names``.
        domain_names: name of each domain index.
        id_domains: in-distribution domain names.
        ood_domains: out-of-distribution domain names.
        class_bank: (C, D) float32 L2-normalised class text embeddings.
        classnames: the C class names, row by row of the class bank.
        eval_classes: rows of the class bank the images are classified among.
    """

    images: list[Image.Image]
    labels: np.ndarray
    domains: np.ndarray
    domain_names: Sequence[str]
    id_domains: Sequence[str]
    ood_domains: Sequence[str]
    class_bank: np.ndarray
    classnames: Sequence[str]
    eval_classes: Sequence[int]

    def top1(self, embeddings: np.ndarray) -> dict[str, float]:
        """Zero-shot top-1 (in %) per domain and its mean over ID and OOD domains, computed as
        the evaluation callback computes it."""
        hits = zero_shot_hits(
            torch.from_numpy(embeddings),
            torch.from_numpy(self.class_bank),
            torch.from_numpy(self.labels),
            self.eval_classes,
            ks=(1,),
        )
        accuracies = domain_accuracies(
            hits, torch.from_numpy(self.domains), self.domain_names, self.id_domains, self.ood_domains
        )
        return {key: 100.0 * value for key, value in accuracies.items()}


def ort_embeddings(sess: ort.InferenceSession, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, ...) inputs -> (N, D) outputs of a one-input ONNX session, batch by batch."""
    name = sess.get_inputs()[0].name
    return np.concatenate(
        [sess.run(None, {name: inputs[i : i + batch_size]})[0] for i in range(0, len(inputs), batch_size)]
    )


@torch.no_grad()
def torch_embeddings(
    encoder: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch_size: int = 64
) -> np.ndarray:
    """(N, ...) inputs -> (N, D) float32 numpy outputs of a PyTorch encoder."""
    return torch.cat([encoder(inputs[i : i + batch_size]).float() for i in range(0, len(inputs), batch_size)]).numpy()


def runner_inputs(images: Sequence[Image.Image], spec: dict[str, Any]) -> np.ndarray:
    """(N, 3, H, W) float32: the images as the edge runner preprocesses them."""
    return np.stack([preprocess(image, spec) for image in images])


def torch_inputs(images: Sequence[Image.Image], transform: Callable) -> torch.Tensor:
    """(N, 3, H, W): the images as PyTorch evaluation preprocesses them."""
    return torch.stack([transform(image) for image in images])


def embedding_parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max abs difference and min / mean cosine between two (N, D) embedding sets."""
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    cosine = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-12)
    return {
        "max_abs_diff": float(np.abs(ref - cand).max()),
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
    }


def median_latency_ms(run: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``run()`` in milliseconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)
