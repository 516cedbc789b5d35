"""Public similarity ops: losses on (N, D) x (M, D) embeddings with backend dispatch.

Backends: ``reference`` (plain formula, O(N M) memory), ``tiled`` (row blocks, O(N + M) memory,
torch custom ops ``distill_tiled::*``), ``cuda`` (C++/CUDA custom ops ``distill_cuda::*``,
built on first use), ``cuda_fused`` (``distill_cuda_fused::*``: InfoNCE with the logit tiles kept
on chip; refused until verified on a GPU, see ``_build.FUSED_VERIFIED``; ``DISTILL_FUSED_CUDA=1``
opts in and also routes ``cuda`` to it). ``auto`` takes ``reference`` below
``AUTO_TILED_MIN_ELEMENTS`` logits, else ``cuda`` for CUDA tensors when the extension builds,
else ``tiled``.

Every op checks its inputs (shapes, dtypes, devices, and by default NaN/inf, naming the
tensor). The NaN/inf check costs one host sync per call; ``check_finite=False`` skips it for
callers that check the loss itself: ``distill.objectives.weighted_sum`` does, once per training
step, so the objectives pass False and a step syncs once for non-finite values, not per op.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

# _tiled_ops registers the tiled custom ops (torch.ops.distill_tiled) when imported.
from . import _build, _tiled_ops, reference  # noqa: F401
from ._validate import as_scalar, check_embeddings, check_offset, check_weights

Backend = Literal["auto", "reference", "tiled", "cuda", "cuda_fused"]
BACKENDS: tuple[str, ...] = get_args(Backend)
#: From this many logits (N * M) on, ``auto`` leaves the plain formula: measured on CPU, tiled
#: is slower at N = 1,024 (fewer, smaller GEMMs) and faster from N = 4,096 on.
AUTO_TILED_MIN_ELEMENTS = 2048 * 2048


def check_backend(backend: str) -> str:
    """Return ``backend`` when it is one of :data:`BACKENDS`.

    The one check of backend names: the ops run it on every call (in :func:`resolve_backend`)
    and the objectives at construction, so a typo in a config fails before training starts.

    Raises:
        ValueError: unknown backend name (the message lists the valid ones).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, x: torch.Tensor, n: int, m: int) -> str:
    """Pick the concrete backend for inputs like ``x`` with an (n, m) logit matrix.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``cuda``/``cuda_fused`` requested for CPU tensors or the extension cannot be
            built; ``cuda_fused`` before it was verified on a GPU (without the opt-in).
    """
    if check_backend(backend) in ("cuda", "cuda_fused"):
        fused = backend == "cuda_fused" or _build.FUSED_OPT_IN
        if fused:
            _build.check_fused_allowed()
        if x.device.type != "cuda":
            raise RuntimeError(
                f"backend={backend!r} needs CUDA tensors, but the embeddings are on {x.device}; "
                "use backend='tiled' or 'auto' on CPU"
            )
        if fused:
            _build.load_fused()
            return "cuda_fused"
        _build.load()
        return "cuda"
    if backend != "auto":
        return backend
    if n * m < AUTO_TILED_MIN_ELEMENTS:
        return "reference"  # small batches: the plain formula is as fast, so never trigger a build for them
    if x.device.type == "cuda" and _build.try_load():
        return "cuda"
    return "tiled"


def _ops(name: str):
    if name == "cuda":
        return torch.ops.distill_cuda
    if name == "cuda_fused":
        return torch.ops.distill_cuda_fused
    return torch.ops.distill_tiled


def infonce_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    offset: int = 0,
    row_weight: float = 0.5,
    col_weight: float = 0.5,
    backend: Backend = "auto",
    block_rows: int = 0,
    check_finite: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP loss) on ``logit_scale * image @ text.T``.

    Positives sit at (i, i + offset): offset 0 is the usual diagonal; a rank holding rows
    [r N, (r+1) N) of a gathered text batch passes offset = r N. The image->text term is the
    mean cross entropy over the N rows, the text->image term over the N columns that hold a
    positive (softmax over the given rows). Equals open_clip's ``ClipLoss`` with weights 0.5.

    Args:
        image: (N, D) embeddings (rows).
        text: (M, D) embeddings (columns), M >= N + offset.
        logit_scale: exponentiated temperature, a float or a 0-d tensor (gets a gradient).
        offset: column of row 0's positive.
        row_weight: weight of the image->text term.
        col_weight: weight of the text->image term.
        backend: ``auto``, ``reference``, ``tiled``, ``cuda`` or ``cuda_fused``.
        block_rows: rows per block for tiled/cuda (0: the backend picks, 16-24 Mi logits per block on tiled).
        check_finite: reject NaN/inf embeddings (one host sync; see the module docstring).

    Returns:
        Scalar loss in the embeddings' dtype.
    """
    check_embeddings({"image": image, "text": text}, same_width=(("image", "text"),), check_finite=check_finite)
    check_offset(offset, image.shape[0], text.shape[0])
    check_weights(row_weight=row_weight, col_weight=col_weight)
    scale = as_scalar(logit_scale, "logit_scale", image)
    name = resolve_backend(backend, image, image.shape[0], text.shape[0])
    if name == "reference":
        return reference.infonce(image, text, scale, offset, row_weight, col_weight)
    return _ops(name).infonce_fwd(image, text, scale, offset, float(row_weight), float(col_weight), block_rows)[0]


def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    *,
    offset: int = 0,
    backend: Backend = "auto",
    block_rows: int = 0,
    check_finite: bool = True,
) -> torch.Tensor:
    """Sigmoid loss (SigLIP): ``-sum(logsigmoid(y * (scale * image @ text.T + bias))) / N``.

    y is +1 at the positives (i, i + offset) and -1 elsewhere; equals open_clip's ``SigLipLoss``
    on one device. The tiled/cuda backends compute the gradients in the forward sweep when
    autograd needs them (3 GEMM passes in all) and keep them until the backward.

    Args:
        image: (N, D) embeddings.
        text: (M, D) embeddings, M >= N + offset.
        logit_scale: exponentiated temperature (float or 0-d tensor).
        logit_bias: additive bias (float or 0-d tensor).
        offset: column of row 0's positive.
        backend: ``auto``, ``reference``, ``tiled``, ``cuda`` or ``cuda_fused``.
        block_rows: rows per block (0: automatic).
        check_finite: reject NaN/inf embeddings (one host sync; see the module docstring).

    Returns:
        Scalar loss.
    """
    check_embeddings({"image": image, "text": text}, same_width=(("image", "text"),), check_finite=check_finite)
    check_offset(offset, image.shape[0], text.shape[0])
    scale = as_scalar(logit_scale, "logit_scale", image)
    bias = as_scalar(logit_bias, "logit_bias", image)
    name = resolve_backend(backend, image, image.shape[0], text.shape[0])
    if name == "reference":
        return reference.siglip(image, text, scale, bias, offset)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (image, text, scale, bias))
    return _ops(name).siglip(image, text, scale, bias, offset, block_rows, needs_grad)[0]


def kd_loss(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    teacher_logit_scale: float | torch.Tensor,
    *,
    row_weight: float = 0.5,
    col_weight: float = 0.5,
    contrastive_weight: float = 0.0,
    kind: Literal["kl", "ce"] = "kl",
    backend: Backend = "auto",
    block_rows: int = 0,
    check_finite: bool = True,
) -> torch.Tensor:
    """Relational distillation: the student's row and column similarity distributions follow the teacher's.

    Student logits ``logit_scale * student_image @ student_text.T``, teacher logits
    ``teacher_logit_scale * teacher_image @ teacher_text.T`` (constants: no gradient reaches the
    teacher). Row term: mean over the N rows of KL(softmax(teacher) || softmax(student)); column
    term: the same over the M columns. ``kind="ce"`` gives the soft cross entropy (KL + teacher
    entropy), the value of open_clip's ``DistillClipLoss`` distill term (same gradient);
    ``contrastive_weight=1`` adds its contrastive term (the student's InfoNCE), so one call gives
    ``sum(DistillClipLoss(...))``. For a temperature tau pass ``1 / tau`` as both scales.

    Args:
        student_image: (N, D) student embeddings.
        student_text: (M, D) student (or, for image-only students, teacher) text embeddings.
        teacher_image: (N, D_t) teacher embeddings.
        teacher_text: (M, D_t) teacher embeddings.
        logit_scale: the student's exponentiated temperature (float or 0-d tensor).
        teacher_logit_scale: the teacher's.
        row_weight: weight of the image->text (row) term.
        col_weight: weight of the text->image (column) term.
        contrastive_weight: weight of the added student InfoNCE (needs N == M).
        kind: ``kl`` or ``ce``.
        backend: ``auto``, ``reference``, ``tiled``, ``cuda`` or ``cuda_fused``.
        block_rows: rows per block (0: automatic).
        check_finite: reject NaN/inf embeddings (one host sync; see the module docstring).

    Returns:
        Scalar loss.
    """
    check_embeddings(
        {
            "student_image": student_image,
            "student_text": student_text,
            "teacher_image": teacher_image,
            "teacher_text": teacher_text,
        },
        same_width=(("student_image", "student_text"), ("teacher_image", "teacher_text")),
        check_finite=check_finite,
    )
    for s_name, s, t_name, t in (
        ("student_image", student_image, "teacher_image", teacher_image),
        ("student_text", student_text, "teacher_text", teacher_text),
    ):
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"{s_name} has {s.shape[0]} rows but {t_name} has {t.shape[0]}")
    if kind not in ("kl", "ce"):
        raise ValueError(f"kind must be 'kl' or 'ce', got {kind!r}")
    check_weights(row_weight=row_weight, col_weight=col_weight, contrastive_weight=contrastive_weight)
    n, m = student_image.shape[0], student_text.shape[0]
    if contrastive_weight and n != m:
        raise ValueError(f"contrastive_weight needs paired batches (N == M), got N={n}, M={m}")
    scale = as_scalar(logit_scale, "logit_scale", student_image)
    t_scale = as_scalar(teacher_logit_scale, "teacher_logit_scale", student_image).detach()
    teacher_image, teacher_text = teacher_image.detach(), teacher_text.detach()
    name = resolve_backend(backend, student_image, n, m)
    tensors = (student_image, student_text, teacher_image, teacher_text, scale, t_scale)
    if name == "reference":
        return reference.kd(*tensors, row_weight, col_weight, contrastive_weight, kind)
    weights = (float(row_weight), float(col_weight), float(contrastive_weight))
    return _ops(name).kd_fwd(*tensors, *weights, kind, block_rows)[0]


@torch.no_grad()
def similarity_topk(
    queries: torch.Tensor, keys: torch.Tensor, k: int, *, backend: Backend = "auto", block_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys per query by dot product, without the (N, M) matrix (zero-shot / retrieval).

    Args:
        queries: (N, D), e.g. image embeddings.
        keys: (M, D), e.g. a class bank or caption embeddings.
        k: how many per row, 1 <= k <= M.
        backend: ``auto``, ``reference``, ``tiled``, ``cuda`` or ``cuda_fused``.
        block_rows: rows per block (0: automatic).

    Returns:
        scores (N, k) and indices (N, k) int64, best first.
    """
    check_embeddings({"queries": queries, "keys": keys}, same_width=(("queries", "keys"),))
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k must be in [1, {keys.shape[0]}] (the number of keys), got {k}")
    name = resolve_backend(backend, queries, queries.shape[0], keys.shape[0])
    if name == "reference":
        return reference.topk(queries, keys, k)
    return _ops(name).topk(queries, keys, k, block_rows)
