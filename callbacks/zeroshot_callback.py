"""Zero-shot classification and image-text retrieval metrics, per domain, ID vs OOD."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from distill.cuda_ext import similarity_topk
from distill.files import atomic_write_json
from distill.zeroshot import build_class_bank, domain_accuracies, load_descriptors, zero_shot_hits


class ZeroShotEvaluation(pl.Callback):
    """Zero-shot top-k per domain and image<->text recall at the end of validation and test.

    The module's ``validation_step`` / ``test_step`` must return a dict with ``image_embeds``
    (B, D) and, for retrieval, ``text_embeds`` (B, D). The datamodule provides ``classnames``,
    ``templates``, ``domain_names``, ``id_domains``, ``ood_domains`` and optionally
    ``eval_class_indices``. The classifier is the module's text tower applied to the templates:
    ``pl_module.class_bank(...)`` when the module has one (frozen teachers cache it), else built
    once per evaluation from ``encode_text`` and ``tokenizer``.

    Logged keys (``<stage>`` is ``val`` or ``test``): ``<stage>/top1_<domain>``,
    ``<stage>/top5_<domain>``, ``<stage>/id_top1``, ``<stage>/ood_top1`` (means over domains),
    ``<stage>/id_top5``, ``<stage>/ood_top5``, ``<stage>/i2t_r1``, ``<stage>/i2t_r5``,
    ``<stage>/t2i_r1``, ``<stage>/t2i_r5``.

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
        self._buffer: dict[str, list[torch.Tensor]] = {}

    # Collection ------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._buffer = {"image": [], "text": [], "label": [], "domain": []}

    def _collect(self, outputs: Any, batch: dict[str, Any]) -> None:
        if not isinstance(outputs, dict) or "image_embeds" not in outputs:
            raise KeyError("ZeroShotEvaluation needs the eval step to return a dict with 'image_embeds'")
        self._buffer["image"].append(outputs["image_embeds"].detach().float())
        if outputs.get("text_embeds") is not None:
            self._buffer["text"].append(outputs["text_embeds"].detach().float())
        self._buffer["label"].append(batch["label"])
        self._buffer["domain"].append(batch["domain"])

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module, "test")

    # Metrics ---------------------------------------------------------------------------------
    def _gathered(self, pl_module, key: str) -> torch.Tensor | None:
        if not self._buffer[key]:
            return None
        local = torch.cat(self._buffer[key])
        if pl_module.trainer.world_size > 1:
            local = pl_module.all_gather(local).flatten(0, 1)
        return local

    def _class_bank(self, pl_module, datamodule) -> torch.Tensor:
        classnames, templates = datamodule.classnames, self.templates or datamodule.templates
        descriptors = load_descriptors(self.descriptors_path, classnames) if self.descriptors_path else None
        if hasattr(pl_module, "class_bank"):
            return pl_module.class_bank(classnames, templates, descriptors)
        return build_class_bank(pl_module, pl_module.tokenizer, classnames, templates, descriptors, pl_module.device)

    @torch.no_grad()
    def _evaluate(self, trainer, pl_module, stage: str) -> None:
        datamodule = trainer.datamodule
        images = self._gathered(pl_module, "image")
        if images is None:
            return
        labels, domains = self._gathered(pl_module, "label"), self._gathered(pl_module, "domain")
        results: dict[str, float] = {}
        if datamodule.classnames:  # pairs without class names get retrieval metrics only
            results.update(self._classification(pl_module, datamodule, images, labels, domains))
        texts = self._gathered(pl_module, "text")
        if self.retrieval and texts is not None:
            results.update(self._retrieval(images[: self.retrieval_items], texts[: self.retrieval_items]))

        self.results[stage] = results
        pl_module.log_dict({f"{stage}/{k}": v for k, v in results.items()}, sync_dist=False)
        if trainer.is_global_zero:
            self._report(trainer, stage, results)

    def _classification(self, pl_module, datamodule, images, labels, domains) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        bank = self._class_bank(pl_module, datamodule).float()
        pl_module.train(was_training)
        hits = zero_shot_hits(images, bank, labels, getattr(datamodule, "eval_class_indices", None), self.top_k)
        return domain_accuracies(hits, domains, datamodule.domain_names, datamodule.id_domains, datamodule.ood_domains)

    def _retrieval(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, float]:
        # Recall@k of the paired item, from the similarity engine's fused top-k: no (N, N) matrix.
        n = images.shape[0]
        k_max = min(5, n)
        paired = torch.arange(n, device=images.device)[:, None]
        out = {}
        for name, queries, keys in (("i2t", images, texts), ("t2i", texts, images)):
            _, top = similarity_topk(queries.float(), keys.float(), k_max)
            hits = top == paired
            for k in (1, 5):
                out[f"{name}_r{k}"] = hits[:, : min(k, k_max)].any(dim=1).float().mean().item()
        return out

    def _report(self, trainer, stage: str, results: dict[str, float]) -> None:
        folder = Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"stage": stage, "epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": results}
        atomic_write_json(folder / f"zeroshot_{stage}.json", payload)
        rank_zero_info(format_domain_table(results, trainer.datamodule))


def format_domain_table(results: dict[str, float], datamodule: Any) -> str:
    """A small text table: one row per domain (ID first, then OOD) and the two means."""
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
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        if key in results:
            lines.append(f"{key:<18}{100 * results[key]:>8.1f}")
    return "\n".join(lines)
