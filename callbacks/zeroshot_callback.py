"""Zero-shot classification and image-text retrieval metrics, per domain, ID vs OOD."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from distill.data_parallel import gather_items
from distill.datamodules.base import VisionLanguageDataModule
from distill.files import atomic_write_json
from distill.modules.base import VisionLanguageTask
from distill.zeroshot import (
    domain_accuracies,
    labelled_items,
    load_descriptors,
    logit_hits,
    retrieval_recall,
    zero_shot_hits,
)


class ZeroShotEvaluation(pl.Callback):
    """Zero-shot top-k per domain and image<->text recall at the end of validation and test.

    Works with any distill module (``VisionLanguageTask``: its shared eval steps return
    ``image_embeds`` (B, D) and, for retrieval, ``text_embeds`` (B, D)) and datamodule
    (``VisionLanguageDataModule``: ``classnames``, ``templates``, ``domain_names``,
    ``id_domains``, ``ood_domains``, ``eval_class_indices``). The classifier is the module's
    ``class_bank(classnames, templates)``, or its ``image_conditioned_logits`` when the module's
    classifier depends on each image (``image_conditioned``, e.g. CoCoOp).

    Logged keys (``<stage>`` is ``val`` or ``test``): ``<stage>/top1_<domain>``,
    ``<stage>/top5_<domain>``, ``<stage>/id_top1``, ``<stage>/ood_top1`` (means over domains),
    ``<stage>/id_top5``, ``<stage>/ood_top5``, ``<stage>/i2t_r1``, ``<stage>/i2t_r5``,
    ``<stage>/t2i_r1``, ``<stage>/t2i_r5``. When captions repeat (e.g. one per class), recall is
    also computed per unique caption (``distill.zeroshot.retrieval_recall`` with ``captions``):
    ``<stage>/i2t_caption_r1``... (a hit is any item with the query's caption string).

    Items without a class (label -1, declared by the datamodule's ``allows_unlabelled``) are left
    out of every top-k and ID/OOD mean and kept for retrieval; undeclared ones are an error. The
    counts (items, items without a class, retrieval items, unique captions) go to the printed
    table and to ``counts`` in ``zeroshot_<stage>.json``.

    Under data parallelism each rank embeds its share of the split (Lightning's
    ``DistributedSampler``); the items are gathered once per evaluation, the sampler's padding
    duplicates dropped by their ``index`` and put back in index order
    (``distill.data_parallel.gather_items``), so the metrics equal a single process's; every rank
    computes them, rank 0 writes the JSON and prints the table.

    Args:
        top_k: the k of top-k accuracy.
        retrieval: compute image->text and text->image recall on the first pairs.
        retrieval_items: number of pairs retrieval uses (its cost grows with the square).
        templates: prompt templates overriding the datamodule's.
        descriptors: JSON file of per-class descriptors added to the prompts.
        report_dir: folder for ``zeroshot_<stage>.json`` (default: the trainer's log dir).
    """

    def __init__(
        self,
        top_k: tuple[int, ...] = (1, 5),
        retrieval: bool = True,
        retrieval_items: int = 1000,
        templates: list[str] | None = None,
        descriptors: str | None = None,
        report_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.top_k, self.retrieval, self.retrieval_items = tuple(top_k), retrieval, retrieval_items
        self.templates, self.descriptors_path, self.report_dir = templates, descriptors, report_dir
        self.results: dict[str, dict[str, float]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self._buffer: dict[str, list[torch.Tensor]] = {}
        self._captions: list[str] = []

    # Collection ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check, before any work, that the module and the datamodule are distill's."""
        if not isinstance(pl_module, VisionLanguageTask):
            raise TypeError(
                f"ZeroShotEvaluation needs a distill module (VisionLanguageTask), got {type(pl_module).__name__}"
            )
        if not isinstance(trainer.datamodule, VisionLanguageDataModule):
            raise TypeError(
                "ZeroShotEvaluation needs a distill datamodule (VisionLanguageDataModule), "
                f"got {type(trainer.datamodule).__name__}"
            )

    def _reset(self) -> None:
        self._buffer = {"image": [], "text": [], "label": [], "domain": [], "index": []}
        self._captions = []

    def _collect(self, outputs: Any, batch: dict[str, Any]) -> None:
        if not isinstance(outputs, dict) or "image_embeds" not in outputs:
            raise KeyError("ZeroShotEvaluation needs the eval step to return a dict with 'image_embeds'")
        self._buffer["image"].append(outputs["image_embeds"].detach().float())
        if outputs.get("text_embeds") is not None:
            self._buffer["text"].append(outputs["text_embeds"].detach().float())
        self._buffer["label"].append(batch["label"])
        self._buffer["domain"].append(batch["domain"])
        if "index" in batch:
            self._buffer["index"].append(batch["index"])
        self._captions.extend(batch.get("caption") or [])

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: VisionLanguageTask) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: VisionLanguageTask) -> None:
        self._reset()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: VisionLanguageTask,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(outputs, batch)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: VisionLanguageTask,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: VisionLanguageTask) -> None:
        if not trainer.sanity_checking:
            self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: VisionLanguageTask) -> None:
        self._evaluate(trainer, pl_module, "test")

    # Metrics ---------------------------------------------------------------------------------
    def _items(self, pl_module: VisionLanguageTask) -> tuple[dict[str, torch.Tensor | None], list[str] | None]:
        """The evaluated items of every rank, once each: (image, text, label, domain) tensors and the captions.

        Captions are None when the batches carried none (or not one per item).
        """
        local = {k: torch.cat(v) if v else None for k, v in self._buffer.items() if k != "index"}
        count = 0 if local["image"] is None else local["image"].shape[0]
        if pl_module.trainer.world_size == 1:
            return local, self._captions if len(self._captions) == count else None
        if len(self._buffer["index"]) != len(self._buffer["image"]):
            raise KeyError(
                "ZeroShotEvaluation needs the batches' 'index' under data parallelism (to drop the "
                "DistributedSampler's repeated items)"
            )
        index = torch.cat(self._buffer["index"]) if self._buffer["index"] else torch.zeros(0, dtype=torch.long)
        _, items, lists = gather_items(index.to(pl_module.device), local, {"caption": self._captions})
        return items, lists["caption"]

    def _class_bank(self, pl_module: VisionLanguageTask, datamodule: VisionLanguageDataModule) -> torch.Tensor:
        classnames, templates = datamodule.classnames, self.templates or datamodule.templates
        descriptors = load_descriptors(self.descriptors_path, classnames) if self.descriptors_path else None
        return pl_module.class_bank(classnames, templates, descriptors)

    @torch.no_grad()
    def _evaluate(self, trainer: pl.Trainer, pl_module: VisionLanguageTask, stage: str) -> None:
        datamodule = trainer.datamodule
        items, captions = self._items(pl_module)
        images = items["image"]
        if images is None:
            return
        labels, domains = items["label"], items["domain"]
        results: dict[str, float] = {}
        counts = {"items": images.shape[0]}
        if datamodule.classnames:  # pairs without class names get retrieval metrics only
            labelled = labelled_items(labels, datamodule.allows_unlabelled, f"{stage} items")
            counts["unlabelled_items"] = 0 if labelled is None else int((~labelled).sum())
            if labelled is not None:  # items without a class: retrieval only
                images_l, labels, domains = images[labelled], labels[labelled], domains[labelled]
            else:
                images_l = images
            if labels.numel():
                results.update(self._classification(pl_module, datamodule, images_l, labels, domains))
        texts = items["text"]
        if self.retrieval and texts is not None:
            results.update(self._retrieval(images, texts, captions, counts))

        self.results[stage], self.counts[stage] = results, counts
        # Every rank computed the same values from the gathered items: their mean over ranks is the value.
        pl_module.log_dict({f"{stage}/{k}": v for k, v in results.items()}, sync_dist=True)
        # trainer.log_dir is a collective (a broadcast from rank 0): read it on every rank, write on rank 0.
        folder = Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self._report(trainer, folder, stage, results, counts)

    def _retrieval(
        self, images: torch.Tensor, texts: torch.Tensor, captions: list[str] | None, counts: dict[str, int]
    ) -> dict[str, float]:
        """Pairwise recall on the first ``retrieval_items`` pairs, and per unique caption when captions repeat."""
        images, texts = images[: self.retrieval_items], texts[: self.retrieval_items]
        results = retrieval_recall(images, texts)
        if captions is not None:
            captions = captions[: self.retrieval_items]
            counts["retrieval_items"], counts["unique_captions"] = len(captions), len(set(captions))
            if counts["unique_captions"] < len(captions):
                by_caption = retrieval_recall(images, texts, captions=captions)
                results.update({k.replace("_r", "_caption_r"): v for k, v in by_caption.items()})
        return results

    def _classification(
        self,
        pl_module: VisionLanguageTask,
        datamodule: VisionLanguageDataModule,
        images: torch.Tensor,
        labels: torch.Tensor,
        domains: torch.Tensor,
    ) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        if pl_module.image_conditioned:  # CoCoOp: one classifier per image
            templates = self.templates or datamodule.templates
            logits = pl_module.image_conditioned_logits(images, datamodule.classnames, templates)
            hits = logit_hits(logits, labels, datamodule.eval_class_indices, self.top_k)
        else:
            bank = self._class_bank(pl_module, datamodule).float()
            hits = zero_shot_hits(images, bank, labels, datamodule.eval_class_indices, self.top_k)
        pl_module.train(was_training)
        return domain_accuracies(hits, domains, datamodule.domain_names, datamodule.id_domains, datamodule.ood_domains)

    def _report(
        self, trainer: pl.Trainer, folder: Path, stage: str, results: dict[str, float], counts: dict[str, int]
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        payload = {
            "stage": stage,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "metrics": results,
            "counts": counts,
            "id_domains": list(trainer.datamodule.id_domains),
            "ood_domains": list(trainer.datamodule.ood_domains),
        }
        atomic_write_json(folder / f"zeroshot_{stage}.json", payload)
        rank_zero_info(format_domain_table(results, trainer.datamodule, counts))


def format_domain_table(results: dict[str, float], datamodule: Any, counts: dict[str, int] | None = None) -> str:
    """A small text table: one row per domain (ID first, then OOD), the two means and recall.

    With ``counts`` (see ``ZeroShotEvaluation``) it also says how many items had no class (left
    out of top-k) and, when captions repeat, how many unique captions retrieval saw.
    """
    counts = counts or {}
    lines = [f"{'domain':<12}{'split':<6}{'top1':>8}{'top5':>8}"]
    for group, members in (("ID", datamodule.id_domains), ("OOD", datamodule.ood_domains)):
        for m in members:
            if f"top1_{m}" in results:
                lines.append(
                    f"{m:<12}{group:<6}{100 * results[f'top1_{m}']:>8.1f}"
                    f"{100 * results.get(f'top5_{m}', float('nan')):>8.1f}"
                )
        if f"{group.lower()}_top1" in results:
            lines.append(
                f"{group + ' mean':<18}{100 * results[f'{group.lower()}_top1']:>8.1f}"
                f"{100 * results.get(f'{group.lower()}_top5', float('nan')):>8.1f}"
            )
    if counts.get("unlabelled_items"):
        lines.append(
            f"{counts['unlabelled_items']} of {counts['items']} items have no class: left out of top-k, "
            "kept for retrieval"
        )
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        if key in results:
            lines.append(f"{key:<18}{100 * results[key]:>8.1f}")
    if counts.get("unique_captions", 0) < counts.get("retrieval_items", 0):
        lines.append(
            f"retrieval over {counts['retrieval_items']} items with {counts['unique_captions']} unique captions: "
            "*_r<k> count only an item's own pair (identical captions tie), *_caption_r<k> any item with its caption"
        )
        for key in sorted(k for k in results if "_caption_r" in k):
            lines.append(f"{key:<18}{100 * results[key]:>8.1f}")
    return "\n".join(lines)
