"""Teacher-student agreement and embedding-geometry diagnostics (plain torch, one float each).

What each number tells you:

* :func:`mean_cosine`: how closely the student copies the teacher's embeddings, row by row (1 = same direction).
  Only defined when both have the same width.
* :func:`linear_cka`: whether student and teacher features hold the same information up to a rotation and scale,
  even with different widths (1 = same geometry, near 0 = unrelated). High CKA with low cosine means the student
  learnt the teacher's geometry in a rotated frame.
* :func:`affinity_kl`: how differently the two models rank keys (captions, class prompts) for the same query; the
  relational distillation losses minimise it. 0 = identical softmax affinities.
* :func:`top1_agreement`: how often the student picks the teacher's class, right or wrong.
* :func:`modality_gap`: distance between the image and text centroids on the unit sphere (Liang et al. 2022).
  A large gap means images and captions live in separate cones: cross-modal scores then depend on the
  temperature more than on content.
* :func:`uniformity`: how evenly the embeddings spread over the sphere (Wang & Isola 2020). Lower (more negative)
  is more uniform; a value near 0 means collapse (all rows nearly the same point).
* :func:`alignment`: how close paired embeddings are (Wang & Isola 2020); 0 = each pair coincides.
* :func:`intra_modal_recall_at_1`: whether each image's nearest other image shares its class, a label-free view of
  how well the embedding clusters classes.

Every function works without gradients, accumulates in float64 and processes rows in chunks of ``_CHUNK``, so N
up to ~20k never materialises more than N x ``_CHUNK`` values at once. Where a metric is defined on the unit
sphere, the rows are L2-normalised inside (the docstring says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "affinity_kl",
    "agreement_metrics",
    "alignment",
    "geometry_metrics",
    "intra_modal_recall_at_1",
    "linear_cka",
    "mean_cosine",
    "modality_gap",
    "per_group",
    "top1_agreement",
    "uniformity",
]

# Rows per chunk; the tests shrink it to check that chunking does not change results.
_CHUNK = 2048


def _matrix(name: str, x: Tensor) -> Tensor:
    """``x`` as a (N, D) tensor, or a ValueError naming the argument."""
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D (N, D) tensor, got {shape}")
    return x


def _same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    _matrix(name_a, a)
    _matrix(name_b, b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")


def _unit(x: Tensor) -> Tensor:
    """Rows of ``x`` in float64, L2-normalised."""
    return F.normalize(x.double(), dim=-1)


def _chunks(n: int) -> range:
    return range(0, n, _CHUNK)


@torch.no_grad()
def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity of paired rows: mean_i <a_i, b_i> / (||a_i|| ||b_i||).

    Args:
        a: (N, D) embeddings, e.g. the student's.
        b: (N, D) embeddings, e.g. the teacher's (same shape).
    """
    _same_shape("a", a, "b", b)
    total = sum(float((_unit(a[i : i + _CHUNK]) * _unit(b[i : i + _CHUNK])).sum()) for i in _chunks(len(a)))
    return total / len(a) if len(a) else float("nan")


@torch.no_grad()
def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019, "Similarity of Neural Network Representations
    Revisited").

    With column-centred X and Y: CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), the D1 x D2 cross-covariance
    form of HSIC(XX^T, YY^T) / sqrt(HSIC(XX^T, XX^T) HSIC(YY^T, YY^T)); O(N D^2), never N x N. CKA(X, X) = 1 and
    it is invariant to orthogonal transforms and isotropic scaling of either side. Features are not normalised.

    Args:
        x: (N, D1) features.
        y: (N, D2) features of the same N items.

    Returns:
        CKA in [0, 1]; NaN when either side is constant over the rows.
    """
    _matrix("x", x)
    _matrix("y", y)
    if len(x) != len(y):
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same number of rows")
    mx = sum(x[i : i + _CHUNK].double().sum(0) for i in _chunks(len(x))) / len(x)
    my = sum(y[i : i + _CHUNK].double().sum(0) for i in _chunks(len(y))) / len(y)
    xx = x.new_zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    yy = y.new_zeros(y.shape[1], y.shape[1], dtype=torch.float64)
    yx = x.new_zeros(y.shape[1], x.shape[1], dtype=torch.float64)
    for i in _chunks(len(x)):
        xc, yc = x[i : i + _CHUNK].double() - mx, y[i : i + _CHUNK].double() - my
        xx += xc.T @ xc
        yy += yc.T @ yc
        yx += yc.T @ xc
    denom = float(torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy))
    return float(torch.linalg.matrix_norm(yx) ** 2) / denom if denom > 0 else float("nan")


@torch.no_grad()
def affinity_kl(
    student_queries: Tensor,
    student_keys: Tensor,
    teacher_queries: Tensor,
    teacher_keys: Tensor,
    student_scale: float,
    teacher_scale: float,
) -> float:
    """Mean over queries of KL(p_teacher || p_student) between the two models' softmax affinities.

    p_i = softmax_j(scale * <q_i / ||q_i||, k_j / ||k_j||>) for each model; KL(p||q) = sum_j p_j (log p_j - log q_j)
    in nats. This is what relational / affinity distillation (TinyCLIP, CLIP-KD) minimises. Queries and keys are
    L2-normalised inside; queries are processed in chunks, so at most ``_CHUNK`` x M scores exist at once.

    Args:
        student_queries: (N, Ds) student query embeddings (e.g. images).
        student_keys: (M, Ds) student key embeddings (e.g. captions or the class bank).
        teacher_queries: (N, Dt) the teacher's embeddings of the same queries.
        teacher_keys: (M, Dt) the teacher's embeddings of the same keys.
        student_scale: the student's logit scale (exponentiated temperature).
        teacher_scale: the teacher's logit scale.
    """
    _matrix("student_queries", student_queries)
    _matrix("student_keys", student_keys)
    _matrix("teacher_queries", teacher_queries)
    _matrix("teacher_keys", teacher_keys)
    if student_queries.shape[1] != student_keys.shape[1] or teacher_queries.shape[1] != teacher_keys.shape[1]:
        raise ValueError(
            f"queries and keys must share their width: student {tuple(student_queries.shape)} vs "
            f"{tuple(student_keys.shape)}, teacher {tuple(teacher_queries.shape)} vs {tuple(teacher_keys.shape)}"
        )
    if len(student_queries) != len(teacher_queries) or len(student_keys) != len(teacher_keys):
        raise ValueError(
            f"student and teacher must see the same items: queries {tuple(student_queries.shape)} vs "
            f"{tuple(teacher_queries.shape)}, keys {tuple(student_keys.shape)} vs {tuple(teacher_keys.shape)}"
        )
    sk, tk = _unit(student_keys), _unit(teacher_keys)
    total = 0.0
    for i in _chunks(len(student_queries)):
        log_ps = F.log_softmax(student_scale * _unit(student_queries[i : i + _CHUNK]) @ sk.T, dim=-1)
        log_pt = F.log_softmax(teacher_scale * _unit(teacher_queries[i : i + _CHUNK]) @ tk.T, dim=-1)
        total += float((log_pt.exp() * (log_pt - log_ps)).sum())
    return total / len(student_queries) if len(student_queries) else float("nan")


@torch.no_grad()
def top1_agreement(student_scores: Tensor, teacher_scores: Tensor) -> float:
    """Fraction of rows where argmax_c student_scores == argmax_c teacher_scores.

    Args:
        student_scores: (N, C) logits or similarities of the student.
        teacher_scores: (N, C) those of the teacher.
    """
    _same_shape("student_scores", student_scores, "teacher_scores", teacher_scores)
    same = (student_scores.argmax(-1) == teacher_scores.argmax(-1)).double()
    return float(same.mean()) if len(same) else float("nan")


@torch.no_grad()
def modality_gap(image: Tensor, text: Tensor) -> float:
    """Euclidean distance between the centroids of the L2-normalised image and text embeddings.

    gap = || mean_i x_i/||x_i|| - mean_j y_j/||y_j|| ||_2 (Liang et al. 2022, "Mind the Gap"); 0 for identical
    sets, at most 2. The sets need not be paired.

    Args:
        image: (N, D) image embeddings.
        text: (M, D) text embeddings (same D).
    """
    _matrix("image", image)
    _matrix("text", text)
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must have the same width D")
    ci = sum(_unit(image[i : i + _CHUNK]).sum(0) for i in _chunks(len(image))) / len(image)
    ct = sum(_unit(text[i : i + _CHUNK]).sum(0) for i in _chunks(len(text))) / len(text)
    return float(torch.linalg.vector_norm(ci - ct))


@torch.no_grad()
def uniformity(x: Tensor, t: float = 2.0) -> float:
    """Uniformity loss of Wang & Isola 2020 ("Understanding Contrastive Representation Learning through Alignment
    and Uniformity on the Hypersphere").

    log( 2 / (N (N-1)) * sum_{i<j} exp(-t ||x_i - x_j||^2) ) over L2-normalised rows, computed with logsumexp
    in row chunks. Ranges from -4t (antipodal pairs) to 0 (collapse); lower is more uniform.

    Args:
        x: (N, D) embeddings.
        t: the kernel's inverse width.

    Returns:
        The value in nats; NaN for fewer than 2 rows.
    """
    _matrix("x", x)
    n = len(x)
    if n < 2:
        return float("nan")
    u = _unit(x)
    col = torch.arange(n, device=x.device)
    parts = []
    for i in _chunks(n):
        block = u[i : i + _CHUNK]
        # -t ||x_i - x_j||^2 = 2t cos - 2t on unit rows, computed in place to keep one chunk x N buffer.
        logits = (block @ u.T).mul_(2.0 * t).sub_(2.0 * t).clamp_max_(0.0)
        logits.masked_fill_(col[None, :] <= torch.arange(i, i + len(block), device=x.device)[:, None], -math.inf)
        parts.append(torch.logsumexp(logits.flatten(), dim=0))
    return float(torch.logsumexp(torch.stack(parts), dim=0)) - math.log(n * (n - 1) / 2)


@torch.no_grad()
def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> float:
    """Alignment loss of Wang & Isola 2020: mean_i ||x_i - y_i||_2^alpha over L2-normalised paired rows.

    Args:
        x: (N, D) embeddings, e.g. images.
        y: (N, D) their partners, e.g. captions.
        alpha: the distance exponent.
    """
    _same_shape("x", x, "y", y)
    total = sum(
        float(torch.linalg.vector_norm(_unit(x[i : i + _CHUNK]) - _unit(y[i : i + _CHUNK]), dim=-1).pow(alpha).sum())
        for i in _chunks(len(x))
    )
    return total / len(x) if len(x) else float("nan")


@torch.no_grad()
def intra_modal_recall_at_1(x: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose nearest other row (cosine, itself excluded) has the same label.

    Rows with a label < 0 are neither queries nor gallery. Ties go to the lowest row index.

    Args:
        x: (N, D) embeddings.
        labels: (N,) integer class labels, -1 for unlabelled rows.

    Returns:
        Recall@1 in [0, 1]; NaN when fewer than 2 rows are labelled.
    """
    _matrix("x", x)
    if labels.ndim != 1 or len(labels) != len(x):
        raise ValueError(f"labels {tuple(labels.shape)} must be (N,) for x {tuple(x.shape)}")
    keep = labels >= 0
    u, lab = _unit(x[keep]), labels[keep]
    n = len(u)
    if n < 2:
        return float("nan")
    hits = 0
    for i in _chunks(n):
        sims = u[i : i + _CHUNK] @ u.T
        rows = torch.arange(len(sims), device=x.device)
        sims[rows, rows + i] = -math.inf
        hits += int((lab[sims.argmax(-1)] == lab[i : i + _CHUNK]).sum())
    return hits / n


def geometry_metrics(image: Tensor, text: Tensor | None = None, labels: Tensor | None = None) -> dict[str, float]:
    """Embedding-geometry summary of one model.

    Args:
        image: (N, D) image embeddings.
        text: optional (N, D) embeddings of the captions paired with ``image``.
        labels: optional (N,) class labels of the images (-1 = unlabelled).

    Returns:
        ``uniformity_image``; with ``text`` also ``modality_gap``, ``alignment`` and ``uniformity_text``; with
        ``labels`` also ``image_r1`` (:func:`intra_modal_recall_at_1` of the images).
    """
    out = {"uniformity_image": uniformity(image)}
    if text is not None:
        _same_shape("image", image, "text", text)
        out.update(modality_gap=modality_gap(image, text), alignment=alignment(image, text))
        out["uniformity_text"] = uniformity(text)
    if labels is not None:
        out["image_r1"] = intra_modal_recall_at_1(image, labels)
    return out


def agreement_metrics(
    student_image: Tensor,
    teacher_image: Tensor,
    student_scores: Tensor | None = None,
    teacher_scores: Tensor | None = None,
    student_keys: Tensor | None = None,
    teacher_keys: Tensor | None = None,
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
) -> dict[str, float]:
    """Teacher-student agreement summary on the same N images.

    Args:
        student_image: (N, Ds) student image embeddings.
        teacher_image: (N, Dt) teacher image embeddings.
        student_scores: optional (N, C) student class scores; give with ``teacher_scores``.
        teacher_scores: optional (N, C) teacher class scores.
        student_keys: optional (M, Ds) student keys (captions, class bank) for :func:`affinity_kl`; give with
            ``teacher_keys``. The images are the queries.
        teacher_keys: optional (M, Dt) teacher keys.
        student_scale: the student's logit scale for :func:`affinity_kl`.
        teacher_scale: the teacher's logit scale for :func:`affinity_kl`.

    Returns:
        ``cka``; ``cosine`` when Ds == Dt; ``top1_agreement`` with scores; ``affinity_kl`` with keys.
    """
    for pair in (("student_scores", student_scores, teacher_scores), ("student_keys", student_keys, teacher_keys)):
        if (pair[1] is None) != (pair[2] is None):
            raise ValueError(f"give both {pair[0]} and {pair[0].replace('student', 'teacher')}, or neither")
    out = {}
    if student_image.ndim == 2 and teacher_image.ndim == 2 and student_image.shape[1] == teacher_image.shape[1]:
        out["cosine"] = mean_cosine(student_image, teacher_image)
    out["cka"] = linear_cka(student_image, teacher_image)
    if student_scores is not None:
        out["top1_agreement"] = top1_agreement(student_scores, teacher_scores)
    if student_keys is not None:
        out["affinity_kl"] = affinity_kl(
            student_image, student_keys, teacher_image, teacher_keys, student_scale, teacher_scale
        )
    return out


def per_group(
    metric_fn: Callable[..., float], groups: Tensor, names: Sequence[str], *tensors: Tensor | None
) -> dict[str, float]:
    """Evaluate ``metric_fn`` separately on the rows of each group, e.g. per domain.

    Calls ``metric_fn(*[t[groups == g] for t in tensors])`` for each group id g present in ``groups`` (ascending;
    negative ids are skipped, as for labels), passing None tensors through as None.

    Args:
        metric_fn: a function of row-aligned tensors, e.g. :func:`mean_cosine` or :func:`geometry_metrics`.
        groups: (N,) integer group id of each row.
        names: name of each group id, ``names[g]``.
        *tensors: tensors with N rows (or None).

    Returns:
        ``{names[g]: metric_fn(...)}``.
    """
    if groups.ndim != 1:
        raise ValueError(f"groups must be (N,), got {tuple(groups.shape)}")
    for k, t in enumerate(tensors):
        if t is not None and len(t) != len(groups):
            raise ValueError(f"tensor {k} has {len(t)} rows but groups has {len(groups)}")
    out = {}
    for g in sorted(int(g) for g in torch.unique(groups) if g >= 0):
        if g >= len(names):
            raise ValueError(f"group id {g} has no name (names has {len(names)} entries)")
        mask = groups == g
        out[names[g]] = metric_fn(*[None if t is None else t[mask] for t in tensors])
    return out
