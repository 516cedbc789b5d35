"""Reference backend: the plain formulas on the full (N, M) logit matrix.

This is what the tests compare the other backends against. Memory O(N M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _positives(n: int, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(n, device=device)
    return rows, rows + offset


def infonce(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int = 0, w_row: float = 0.5, w_col: float = 0.5
) -> torch.Tensor:
    """Symmetric InfoNCE on logits ``scale * a @ b.T`` (N, M); positives at (i, i + offset).

    The row (a -> b) term is the mean over the N rows of cross entropy; the column (b -> a)
    term is the mean over the N columns that hold a positive, with the softmax over the N rows.
    """
    logits = scale * a @ b.T
    rows, cols = _positives(a.shape[0], offset, a.device)
    row_ce = F.cross_entropy(logits, cols)
    col_ce = F.cross_entropy(logits[:, cols].T, rows)
    return w_row * row_ce + w_col * col_ce


def siglip(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Sigmoid loss: ``-sum(logsigmoid(y * (scale a b^T + bias))) / N``, y = +1 at positives."""
    logits = scale * a @ b.T + bias
    rows, cols = _positives(a.shape[0], offset, a.device)
    labels = -torch.ones_like(logits)
    labels[rows, cols] = 1.0
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]


def kd(
    a: torch.Tensor,
    b: torch.Tensor,
    ta: torch.Tensor,
    tb: torch.Tensor,
    scale: torch.Tensor,
    teacher_scale: torch.Tensor,
    w_row: float = 0.5,
    w_col: float = 0.5,
    contrastive_weight: float = 0.0,
    kind: str = "kl",
) -> torch.Tensor:
    """Teacher-student distillation over rows and columns of the similarity matrices.

    Student logits ``S = scale a b^T``, teacher ``T = teacher_scale ta tb^T`` (detached). Row term:
    mean over rows of KL(softmax(T_i) || softmax(S_i)) (``kind="ce"``: the soft cross entropy,
    i.e. KL plus the teacher's entropy, as open_clip's ``DistillClipLoss``); column term the same
    on columns. ``contrastive_weight`` adds that multiple of the student's symmetric InfoNCE
    (diagonal positives, weights ``w_row``/``w_col``).
    """
    s = scale * a @ b.T
    t = (teacher_scale * ta @ tb.T).detach()

    def one_way(t_: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        t_logp = t_.log_softmax(dim=1)
        cross = -(t_logp.exp() * s_.log_softmax(dim=1)).sum(dim=1)
        if kind == "kl":
            cross = cross + (t_logp.exp() * t_logp).sum(dim=1)
        return cross.mean()

    loss = w_row * one_way(t, s) + w_col * one_way(t.T, s.T)
    if contrastive_weight:
        loss = loss + contrastive_weight * infonce(a, b, scale, 0, w_row, w_col)
    return loss


def topk(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``queries @ keys.T`` per row: (N, k) scores and (N, k) int64 indices."""
    return (queries @ keys.T).topk(k, dim=1)
