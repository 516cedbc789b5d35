"""Zero-shot classification: class names + templates (+ descriptors) -> class embedding bank.

The bank is what a CLIP-like model uses as a classifier: one L2-normalised text embedding per
class, the mean over prompt templates (open_clip's ``build_zero_shot_classifier``), optionally
enriched with per-class descriptors ("a heart, which has two rounded lobes"). This file also
holds the plain-tensor metric helpers the evaluation callback uses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import open_clip
import torch

from distill.cuda_ext import similarity_topk

#: Prompts (classes x templates) from which building a class bank shows a progress bar.
PROGRESS_PROMPTS = 4096


def load_descriptors(path: str | os.PathLike, classnames: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Read a descriptor JSON file: ``{"classname": ["descriptor", ...], ...}``.

    Args:
        path: JSON file.
        classnames: when given, every class must have at least one descriptor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"descriptor file not found: {path}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()
    ):
        raise ValueError(f"{path}: descriptors must be a JSON object mapping class name -> list of strings")
    if classnames is not None:
        missing = [c for c in classnames if not data.get(c)]
        if missing:
            raise KeyError(f"{path}: no descriptors for classes {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return data


@torch.no_grad()
def build_class_bank(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    descriptors: Mapping[str, Sequence[str]] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Build the zero-shot classifier of a model: one embedding per class.

    Args:
        model: anything with ``encode_text(tokens, normalize=True) -> (M, D)``.
        tokenizer: ``list[str] -> (M, L)`` token ids.
        classnames: C class names, in label order.
        templates: prompt templates with one ``{}`` for the class name.
        descriptors: optional per-class descriptor lists; each adds the prompt
            ``"<template(class)>, which <descriptor>"`` to that class's average.
        device: device for the token tensors.

    Returns:
        (C, D) L2-normalised class embeddings.
    """
    if not classnames:
        raise ValueError("class bank needs at least one class name")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every zero-shot template needs one '{}' placeholder for the class name")
    if descriptors is None:
        # A bar when the bank takes a while (e.g. 1,000 classes x 80 templates through a large text tower).
        bank = open_clip.build_zero_shot_classifier(
            model,
            tokenizer,
            list(classnames),
            list(templates),
            num_classes_per_batch=32,
            device=device,
            use_tqdm=len(classnames) * len(templates) >= PROGRESS_PROMPTS,
        )
        return bank.T.contiguous()
    rows = []
    for name in classnames:
        extra = descriptors.get(name)
        if not extra:
            raise KeyError(f"no descriptors for class {name!r}")
        # Per-class prompt lists go through the same builder, one class at a time.
        prompts = list(templates) + [lambda c, d=d: f"{templates[0].format(c).rstrip('.')}, which {d}." for d in extra]
        rows.append(
            open_clip.build_zero_shot_classifier(
                model, tokenizer, [name], _as_callables(prompts), num_classes_per_batch=None, device=device
            ).T
        )
    return torch.cat(rows).contiguous()


def _as_callables(prompts: list) -> list[Callable[[str], str]]:
    return [p if callable(p) else (lambda c, t=p: t.format(c)) for p in prompts]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per-sample hit indicators for top-k accuracy.

    Args:
        logits: (N, C) class scores.
        labels: (N,) integer labels.
        ks: the k values; k larger than C counts as C.

    Returns:
        ``{k: (N,) bool}``: whether the label is among the k best classes.
    """
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top == labels[:, None]
    return {k: hits[:, : min(k, k_max)].any(dim=1) for k in ks}


def topk_correct_embeds(
    image_embeds: torch.Tensor,
    class_bank: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    backend: str = "auto",
) -> dict[int, torch.Tensor]:
    """``topk_correct`` of ``image_embeds @ class_bank.T`` without building the (N, C) logits.

    Uses the similarity engine's fused top-k (``distill.cuda_ext.similarity_topk``); a logit
    scale does not change the ranking, so none is needed.

    Args:
        image_embeds: (N, D) image embeddings.
        class_bank: (C, D) class embeddings.
        labels: (N,) integer labels.
        ks: the k values; k larger than C counts as C.
        backend: similarity engine backend (``auto``, ``reference``, ``tiled``, ``cuda``).

    Returns:
        ``{k: (N,) bool}``: whether the label is among the k best classes.
    """
    k_max = min(max(ks), class_bank.shape[0])
    _, top = similarity_topk(image_embeds, class_bank.to(image_embeds.dtype), k_max, backend=backend)
    hits = top == labels[:, None]
    return {k: hits[:, : min(k, k_max)].any(dim=1) for k in ks}


def zero_shot_hits(
    image_embeds: torch.Tensor,
    class_bank: torch.Tensor,
    labels: torch.Tensor,
    eval_classes: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[int, torch.Tensor]:
    """Top-k hits of zero-shot classification among the evaluated classes only.

    Args:
        image_embeds: (N, D) image embeddings.
        class_bank: (C, D) class text embeddings; ``labels`` index its rows.
        labels: (N,) class indices in ``[0, C)``. Items without a class (label -1) must be left
            out by the caller (see ``labelled_items``): they have no right answer to score.
        eval_classes: rows of the bank the images are classified among (e.g. the novel classes
            of a base-to-novel split); all rows when None.
        ks: the k values.

    Returns:
        ``{k: (N,) bool}``.

    Raises:
        ValueError: a label is negative or not a row of the bank (never scored as another class).
    """
    positions, eval_classes = _eval_positions(labels, class_bank.shape[0], eval_classes, "zero_shot_hits")
    return topk_correct_embeds(image_embeds.float(), class_bank.float()[eval_classes], positions, ks)


def logit_hits(
    logits: torch.Tensor, labels: torch.Tensor, eval_classes: Sequence[int] | None = None, ks: Sequence[int] = (1, 5)
) -> dict[int, torch.Tensor]:
    """``zero_shot_hits`` from (N, C) class scores (an image-conditioned classifier's)."""
    positions, eval_classes = _eval_positions(labels, logits.shape[1], eval_classes, "logit_hits")
    return topk_correct(logits.float()[:, eval_classes], positions, ks)


def _eval_positions(
    labels: torch.Tensor, num_classes: int, eval_classes: Sequence[int] | None, caller: str
) -> tuple[torch.Tensor, list[int]]:
    """Each label's position among ``eval_classes`` (-1 when outside), after checking the labels."""
    if labels.numel():
        negative = int((labels < 0).sum())
        if negative:
            raise ValueError(
                f"{caller}: {negative} of {labels.numel()} labels are negative (items without a class); "
                "leave them out before scoring, they have no class to be right about"
            )
        if int(labels.max()) >= num_classes:
            raise ValueError(f"{caller}: label {int(labels.max())} is not a row of the {num_classes}-class bank")
    eval_classes = list(range(num_classes)) if eval_classes is None else list(eval_classes)
    position = torch.full((num_classes,), -1, dtype=torch.long, device=labels.device)
    position[torch.tensor(eval_classes, device=labels.device)] = torch.arange(len(eval_classes), device=labels.device)
    # A label outside ``eval_classes`` maps to -1, which matches no top-k index: a miss, never a hit.
    return position[labels], eval_classes


def labelled_items(labels: torch.Tensor, allowed: bool, what: str = "items") -> torch.Tensor | None:
    """The (N,) mask of items that have a class (label >= 0), or None when every item has one.

    Args:
        labels: (N,) class indices; -1 marks an item without a class.
        allowed: whether the data declared such items (``allows_unlabelled`` of the datamodule).
        what: how the error names the items (e.g. ``"test items"``).

    Raises:
        ValueError: items without a class that the data did not declare.
    """
    mask = labels >= 0
    missing = labels.numel() - int(mask.sum())
    if not missing:
        return None
    if not allowed:
        raise ValueError(
            f"{missing} of {labels.numel()} {what} have label -1 (no class) but the datamodule does not declare "
            "items without a class (allows_unlabelled is False); they would be scored against a wrong class"
        )
    return mask


def domain_accuracies(
    hits: Mapping[int, torch.Tensor],
    domains: torch.Tensor,
    domain_names: Sequence[str],
    id_domains: Sequence[str],
    ood_domains: Sequence[str],
) -> dict[str, float]:
    """``top{k}_<domain>`` accuracy per domain present, and ``id_top{k}`` / ``ood_top{k}``: the
    mean over the ID and the OOD domains (each domain weighs the same)."""
    results: dict[str, float] = {}
    for d in domains.unique().tolist():
        for k, hit in hits.items():
            results[f"top{k}_{domain_names[d]}"] = hit[domains == d].float().mean().item()
    for group, members in (("id", id_domains), ("ood", ood_domains)):
        for k in hits:
            values = [results[f"top{k}_{m}"] for m in members if f"top{k}_{m}" in results]
            if values:
                results[f"{group}_top{k}"] = sum(values) / len(values)
    return results


def retrieval_recall(
    images: torch.Tensor, texts: torch.Tensor, ks: Sequence[int] = (1, 5), captions: Sequence[str] | None = None
) -> dict[str, float]:
    """Image->text and text->image Recall@k of paired embeddings (row i of each is a pair).

    Ranks with the similarity engine's fused top-k, so no (N, N) matrix is formed.

    Without ``captions`` a hit is the query's own pair. With ``captions`` (the caption string of
    each pair) recall is computed per unique caption, which stays well defined when captions
    repeat (e.g. one caption per class, whose identical embeddings tie): the text gallery holds
    each distinct caption once, an image->text hit is a retrieved caption equal to the query
    image's own caption; the text queries are the distinct captions, a text->image hit is a
    retrieved image whose caption equals the query. When all captions differ this is exactly
    the pairwise metric.

    Args:
        images: (N, D) L2-normalised image embeddings.
        texts: (N, D) L2-normalised caption embeddings, ``texts[i]`` describing ``images[i]``.
        ks: the k values.
        captions: the N caption strings, or None.

    Returns:
        ``{"i2t_r<k>": ..., "t2i_r<k>": ...}`` as fractions in [0, 1].
    """
    n = images.shape[0]
    device = images.device
    if captions is None:
        caption_id, first = torch.arange(n, device=device), torch.arange(n, device=device)
    else:
        if len(captions) != n:
            raise ValueError(f"retrieval_recall: {len(captions)} captions for {n} image-text pairs")
        index_of: dict[str, int] = {}
        firsts: list[int] = []  # the first pair of each distinct caption
        for i, caption in enumerate(captions):
            if caption not in index_of:
                index_of[caption] = len(firsts)
                firsts.append(i)
        caption_id = torch.tensor([index_of[c] for c in captions], dtype=torch.long, device=device)
        first = torch.tensor(firsts, dtype=torch.long, device=device)
    unique_texts = texts if first.numel() == n else texts[first]
    out = {}
    for name, queries, keys, target in (
        ("i2t", images, unique_texts, caption_id[:, None]),  # hit: the query image's own caption
        ("t2i", unique_texts, images, None),  # hit: an image of the query caption
    ):
        k_max = min(max(ks), keys.shape[0])
        _, top = similarity_topk(queries.float(), keys.float(), k_max)
        if target is None:
            hits = caption_id[top] == torch.arange(queries.shape[0], device=device)[:, None]
        else:
            hits = top == target
        for k in ks:
            out[f"{name}_r{k}"] = hits[:, : min(k, k_max)].any(dim=1).float().mean().item()
    return out
