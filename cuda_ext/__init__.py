"""Similarity engine: contrastive and distillation losses at O(N + M) memory.

Ops (each on (N, D) x (M, D) embeddings, scalar loss with autograd): :func:`infonce_loss`,
:func:`siglip_loss`, :func:`kd_loss`, plus :func:`similarity_topk` for evaluation. Each takes
``backend="auto" | "reference" | "tiled" | "cuda"``; the CUDA extension is compiled on first
use (:func:`load_cuda`), never at import or install. Imports only torch.

Data-parallel training: :func:`distributed_infonce_loss`, :func:`distributed_siglip_loss` and
:func:`distributed_kd_loss` give every rank the loss over the global batch and the exact gradients
through its own rows, from all-reduced column statistics (no N x M matrix is gathered).
"""

from ._build import build_cuda, cuda_is_loaded, load_cuda
from .distributed import ScalarGrads, distributed_infonce_loss, distributed_kd_loss, distributed_siglip_loss
from .ops import (
    AUTO_TILED_MIN_ELEMENTS,
    BACKENDS,
    check_backend,
    infonce_loss,
    kd_loss,
    resolve_backend,
    siglip_loss,
    similarity_topk,
)

__all__ = [
    "AUTO_TILED_MIN_ELEMENTS",
    "BACKENDS",
    "ScalarGrads",
    "build_cuda",
    "check_backend",
    "cuda_is_loaded",
    "distributed_infonce_loss",
    "distributed_kd_loss",
    "distributed_siglip_loss",
    "infonce_loss",
    "kd_loss",
    "load_cuda",
    "resolve_backend",
    "siglip_loss",
    "similarity_topk",
]
