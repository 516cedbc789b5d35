"""Teacher-student diagnostics and the plots that need embeddings, at the end of validation and test."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from distill.callbacks.media import log_plots, log_table
from distill.data_parallel import gather_items
from distill.datamodules.base import VisionLanguageDataModule
from distill.diagnostics import agreement_metrics, geometry_metrics, per_group
from distill.files import atomic_write_json
from distill.modules.base import VisionLanguageTask
from distill.plots import plot_confusion, plot_retrieval_grid
from distill.run_files import DIAGNOSTICS_FILE, PLOTS_DIR, derived_plots, diagnostics_rows

_STAGE_SPLIT = {"val": "val", "test": "test"}


class TeacherStudentDiagnostics(pl.Callback):
    """How close the student is to its teacher, and the geometry of each model's embeddings.

    At the end of every validation and of test, on up to ``max_items`` evaluation items (evenly
    spaced over the split), per domain and over all items:

    * agreement (modules that run a teacher on the same samples, e.g. ``DistillationModule``):
      mean embedding cosine, linear CKA, top-1 agreement of the zero-shot classifiers and the KL
      of the image-to-caption affinity matrices (``distill.diagnostics``);
    * geometry of each model (the module's own, and the teacher's): modality gap, uniformity,
      image-caption alignment, image-to-image R@1 by class;
    * zero-shot top-1 of the teacher on the same items, and the student's retention (student /
      teacher top-1) of the ID and OOD means.

    Logged keys (``<stage>`` is ``val`` or ``test``): ``<stage>/diag/<metric>`` (agreement, all
    items), ``<stage>/diag/student_<metric>`` and ``<stage>/diag/teacher_<metric>`` (geometry),
    ``<stage>/teacher_id_top1``, ``<stage>/teacher_ood_top1``, ``<stage>/id_retention``,
    ``<stage>/ood_retention``. Everything, per domain, goes to ``diagnostics_<stage>.json`` in the
    log folder. At the end of fit (the last validation) and of test it writes plots to
    ``<log folder>/plots``: per-domain top-1 (teacher vs student), the diagnostics, the confusion
    matrix (class names) and a retrieval grid (query caption, top-5 images, hits marked); with a
    ``WandbLogger`` they are also logged as W&B media and the tables as W&B tables.

    The teacher embeds each kept evaluation item once; its embeddings are reused by later validations.
    Under data parallelism each rank embeds its share of the split; the kept items are gathered
    once, repeated items (the ``DistributedSampler``'s padding) dropped by ``index`` and put in
    index order (``distill.data_parallel.gather_items``), so the results equal a single process's;
    rank 0 writes the JSON and the plots.

    Args:
        max_items: evaluation items used (all when the split is smaller).
        plots: write the plots.
        retrieval_queries: query captions in the retrieval grid (distinct captions, spread over the split); a
            retrieved image is a hit when its own caption is the query (its pair, or an item with the same caption).
        top_k_images: images per query in the retrieval grid.
        max_confusion_classes: classes shown in the confusion matrix (those with the most errors).
    """

    def __init__(
        self,
        max_items: int = 5000,
        plots: bool = True,
        retrieval_queries: int = 4,
        top_k_images: int = 5,
        max_confusion_classes: int = 25,
    ) -> None:
        super().__init__()
        if max_items < 2:
            raise ValueError(f"max_items must be >= 2, got {max_items}")
        self.max_items, self.plots = max_items, plots
        self.retrieval_queries, self.top_k_images = retrieval_queries, top_k_images
        self.max_confusion_classes = max_confusion_classes
        self.results: dict[str, dict[str, Any]] = {}
        self._teacher_cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._buffer: dict[str, list] = {}
        self._stride = 1
        self._last: dict[str, dict[str, Any]] = {}
        self._folder = Path(".")

    # Set-up and collection -------------------------------------------------------------------
    @staticmethod
    def _runs_teacher(pl_module: VisionLanguageTask) -> bool:
        """A module that runs a teacher on the same samples (its own view): agreement is defined."""
        return pl_module.teacher is not None and pl_module.teacher_preprocess is not None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, VisionLanguageTask):
            raise TypeError(
                f"TeacherStudentDiagnostics needs a distill module (VisionLanguageTask), got {type(pl_module).__name__}"
            )
        if not isinstance(trainer.datamodule, VisionLanguageDataModule):
            raise TypeError(
                "TeacherStudentDiagnostics needs a distill datamodule (VisionLanguageDataModule), "
                f"got {type(trainer.datamodule).__name__}"
            )
        if self._runs_teacher(pl_module):
            trainer.datamodule.request_teacher_views_in_eval()

    def _start(self, trainer: pl.Trainer, stage: str) -> None:
        self._buffer = {k: [] for k in ("image", "text", "teacher_image", "teacher_text", "label", "domain", "index")}
        self._buffer["caption"] = []
        count = trainer.datamodule.num_items(_STAGE_SPLIT[stage])
        self._stride = max(1, math.ceil(count / self.max_items))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: VisionLanguageTask) -> None:
        self._start(trainer, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: VisionLanguageTask) -> None:
        self._start(trainer, "test")

    @torch.no_grad()
    def _collect(self, pl_module: VisionLanguageTask, outputs: Any, batch: dict[str, Any], stage: str) -> None:
        if not isinstance(outputs, dict) or "image_embeds" not in outputs:
            raise KeyError("TeacherStudentDiagnostics needs the eval step to return a dict with 'image_embeds'")
        keep = (batch["index"] % self._stride == 0).nonzero().flatten()
        if not keep.numel():
            return
        kept = keep.tolist()
        self._buffer["image"].append(outputs["image_embeds"][keep].detach().float().cpu())
        if outputs.get("text_embeds") is not None:
            self._buffer["text"].append(outputs["text_embeds"][keep].detach().float().cpu())
        for key in ("label", "domain", "index"):
            self._buffer[key].append(batch[key][keep].cpu())
        captions = batch.get("caption") or []
        if captions:
            self._buffer["caption"].extend(captions[i] for i in kept)
        if self._runs_teacher(pl_module):
            image, text = self._teacher_embeddings(pl_module, batch, keep, stage)
            self._buffer["teacher_image"].append(image)
            self._buffer["teacher_text"].append(text)

    def _teacher_embeddings(
        self, pl_module: VisionLanguageTask, batch: dict[str, Any], keep: torch.Tensor, stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, D) teacher image and caption embeddings of the kept items, each item embedded once per split."""
        if "teacher_image" not in batch or "teacher_text" not in batch:
            raise KeyError(
                "evaluation batch lacks 'teacher_image'/'teacher_text': the datamodule was connected before "
                "TeacherStudentDiagnostics asked for teacher views"
            )
        keys = [(stage, int(i)) for i in batch["index"][keep]]
        missing = [j for j, key in enumerate(keys) if key not in self._teacher_cache]
        if missing:
            rows = keep[missing]
            teacher = pl_module.teacher
            images = teacher.encode_image(batch["teacher_image"][rows]).float().cpu()
            texts = teacher.encode_text(batch["teacher_text"][rows]).float().cpu()
            for j, image, text in zip(missing, images, texts):
                self._teacher_cache[keys[j]] = (image, text)
        pairs = [self._teacher_cache[key] for key in keys]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: VisionLanguageTask, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._collect(pl_module, outputs, batch, "val")

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: VisionLanguageTask, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._collect(pl_module, outputs, batch, "test")

    # Metrics ---------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: VisionLanguageTask) -> None:
        if not trainer.sanity_checking:
            self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: VisionLanguageTask) -> None:
        self._evaluate(trainer, pl_module, "test")
        if self.plots and trainer.is_global_zero:
            self._plot(trainer, "test")

    def on_train_end(self, trainer: pl.Trainer, pl_module: VisionLanguageTask) -> None:
        if self.plots and trainer.is_global_zero and "val" in self._last:
            self._plot(trainer, "val")

    def _items(self, pl_module: VisionLanguageTask) -> tuple[dict[str, torch.Tensor | None], list[str]]:
        """The kept items of every rank, once each, on the CPU: tensors by buffer name, and the captions."""
        local = {k: torch.cat(v) if v else None for k, v in self._buffer.items() if k != "caption"}
        if pl_module.trainer.world_size == 1:
            return local, list(self._buffer["caption"])
        device = pl_module.device
        index = local.pop("index")
        index = torch.zeros(0, dtype=torch.long) if index is None else index
        moved = {k: None if t is None else t.to(device) for k, t in local.items()}
        index, items, lists = gather_items(index.to(device), moved, {"caption": self._buffer["caption"]})
        items = {k: None if t is None else t.cpu() for k, t in items.items()}
        return {**items, "index": index.cpu()}, lists["caption"] or []

    @torch.no_grad()
    def _scores(self, pl_module: VisionLanguageTask, images: torch.Tensor, teacher: bool) -> torch.Tensor:
        """(N, E) classifier scores over the evaluated classes (E = len(eval_class_indices))."""
        datamodule = pl_module.trainer.datamodule
        classnames, templates, eval_classes = datamodule.classnames, datamodule.templates, datamodule.eval_class_indices
        device = pl_module.device
        if teacher:
            bank = pl_module.teacher.class_bank(classnames, templates).float().cpu()
            return images @ bank[eval_classes].T
        if pl_module.image_conditioned:
            return (
                pl_module.image_conditioned_logits(images.to(device), classnames, templates)
                .float()
                .cpu()[:, eval_classes]
            )
        bank = pl_module.class_bank(classnames, templates).float().cpu()
        return images @ bank[eval_classes].T

    def _evaluate(self, trainer: pl.Trainer, pl_module: VisionLanguageTask, stage: str) -> None:
        datamodule = trainer.datamodule
        items, captions = self._items(pl_module)
        images = items["image"]
        if images is None:
            return
        texts, labels, domains, indices = items["text"], items["label"], items["domain"], items["index"]
        t_images, t_texts = items["teacher_image"], items["teacher_text"]
        names = list(datamodule.domain_names)
        labelled = labels >= 0
        has_classes = bool(datamodule.classnames) and bool(labelled.any())
        was_training = pl_module.training
        pl_module.eval()
        scores = self._scores(pl_module, images, teacher=False) if has_classes else None
        t_scores = self._scores(pl_module, t_images, teacher=True) if has_classes and t_images is not None else None
        pl_module.train(was_training)

        eval_position = {c: i for i, c in enumerate(datamodule.eval_class_indices)}
        targets = torch.tensor([eval_position.get(int(c), -1) for c in labels], dtype=torch.long)
        result: dict[str, Any] = {
            "stage": stage,
            "step": trainer.global_step,
            "items": int(images.shape[0]),
            "id_domains": list(datamodule.id_domains),
            "ood_domains": list(datamodule.ood_domains),
            "student": {"geometry": self._geometry(images, texts, labels, domains, names)},
        }
        if scores is not None:
            result["student"]["top1"] = _top1(scores, targets, labels, domains, names, datamodule)
        if t_images is not None:
            result["teacher"] = {"geometry": self._geometry(t_images, t_texts, labels, domains, names)}
            if t_scores is not None:
                result["teacher"]["top1"] = _top1(t_scores, targets, labels, domains, names, datamodule)
            student_keys = texts if texts is not None else t_texts  # an image-only student ranks the teacher's captions
            scales = (float(pl_module.logit_scale), float(pl_module.teacher.logit_scale))

            def agreement(s_img, t_img, s_sc, t_sc, s_keys, t_keys):
                return agreement_metrics(s_img, t_img, s_sc, t_sc, s_keys, t_keys, *scales)

            tensors = (images, t_images, scores, t_scores, student_keys, t_texts)
            result["agreement"] = {"all": agreement(*tensors), **per_group(agreement, domains, names, *tensors)}
        self._last[stage] = {
            "result": result,
            "scores": scores,
            "targets": targets,
            "images": images,
            "texts": texts if texts is not None else t_texts,
            "captions": captions,
            "indices": indices,
        }
        self.results[stage] = result
        # Every rank computed the same values from the gathered items: their mean over ranks is the value.
        pl_module.log_dict(_logged(result, stage), sync_dist=True)
        # trainer.log_dir is a collective (a broadcast from rank 0): read it on every rank, write on rank 0.
        self._folder = folder = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / DIAGNOSTICS_FILE.format(stage=stage), result)
            rank_zero_info(_summary(result))

    @staticmethod
    def _geometry(
        images: torch.Tensor, texts: torch.Tensor | None, labels: torch.Tensor, domains: torch.Tensor, names: list[str]
    ) -> dict[str, dict[str, float]]:
        return {
            "all": geometry_metrics(images, texts, labels),
            **per_group(geometry_metrics, domains, names, images, texts, labels),
        }

    # Plots -----------------------------------------------------------------------------------
    def _plot(self, trainer: pl.Trainer, stage: str) -> None:
        last = self._last[stage]
        folder = self._folder  # read at the evaluation, on every rank (this runs on rank 0 only)
        plots_dir = folder / PLOTS_DIR
        datamodule = trainer.datamodule
        paths = derived_plots(folder, stages=[stage])
        who = type(trainer.lightning_module).__name__
        if last["scores"] is not None:
            classes = [datamodule.classnames[c] for c in datamodule.eval_class_indices]
            valid = last["targets"] >= 0
            confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
            np.add.at(confusion, (last["targets"][valid].numpy(), last["scores"][valid].argmax(1).numpy()), 1)
            paths.append(
                plot_confusion(
                    plots_dir / f"confusion_{stage}.png",
                    confusion,
                    classes,
                    max_classes=self.max_confusion_classes,
                    title=f"{who}: zero-shot confusion ({stage} split, {int(valid.sum())} images)",
                )
            )
        grid = self._retrieval(datamodule, last, stage)
        if grid is not None:
            queries, images, hits = grid
            paths.append(
                plot_retrieval_grid(
                    plots_dir / f"retrieval_{stage}.png",
                    queries,
                    images,
                    hits,
                    title=f"{who}: caption -> image retrieval ({stage} split, top {self.top_k_images}; "
                    "hit: an image whose caption is the query)",
                )
            )
        log_plots(trainer, stage, paths)
        log_table(trainer, f"{stage}/diagnostics", *diagnostics_rows(last["result"]))
        rank_zero_info(f"plots: {plots_dir}")

    def _retrieval(self, datamodule: VisionLanguageDataModule, last: dict[str, Any], stage: str):
        """(queries, images, hits) of the retrieval grid, or None without captions or caption embeddings."""
        captions, texts = last["captions"], last["texts"]
        if texts is None or len(captions) != texts.shape[0] or self.retrieval_queries < 1:
            return None
        firsts: dict[str, int] = {}
        for i, caption in enumerate(captions):
            firsts.setdefault(caption, i)
        distinct = list(firsts.values())
        step = max(1, len(distinct) // self.retrieval_queries)
        chosen = distinct[::step][: self.retrieval_queries]
        k = min(self.top_k_images, last["images"].shape[0])
        top = (texts[chosen] @ last["images"].T).topk(k, dim=1).indices
        raw = datamodule.raw_samples_at(_STAGE_SPLIT[stage], [int(last["indices"][j]) for j in top.flatten()])
        pictures = [s["image"] for s in raw]
        queries, images, hits = [], [], []
        for row, q in enumerate(chosen):
            queries.append(captions[q])
            images.append(pictures[row * k : (row + 1) * k])
            hits.append([captions[int(j)] == captions[q] for j in top[row]])
        return queries, images, hits


def _top1(
    scores: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor,
    names: list[str],
    datamodule: Any,
) -> dict[str, float]:
    """Top-1 per domain (``<domain>``) and the ID / OOD means (``id_top1``, ``ood_top1``).

    Items without a class (label -1) are left out; a label outside the evaluated classes
    (target -1) is a miss, as in ``ZeroShotEvaluation``.
    """
    hit = (scores.argmax(1) == targets) & (targets >= 0)
    labelled = labels >= 0
    out: dict[str, float] = {}
    for d in domains[labelled].unique().tolist():
        out[names[d]] = hit[labelled & (domains == d)].float().mean().item()
    for group, members in (("id", datamodule.id_domains), ("ood", datamodule.ood_domains)):
        values = [out[m] for m in members if m in out]
        if values:
            out[f"{group}_top1"] = sum(values) / len(values)
    return out


def _logged(result: dict[str, Any], stage: str) -> dict[str, float]:
    logged: dict[str, float] = {}
    for key, value in result.get("agreement", {}).get("all", {}).items():
        logged[f"{stage}/diag/{key}"] = value
    for who in ("student", "teacher"):
        for key, value in result.get(who, {}).get("geometry", {}).get("all", {}).items():
            logged[f"{stage}/diag/{who}_{key}"] = value
    teacher_top1, student_top1 = result.get("teacher", {}).get("top1", {}), result["student"].get("top1", {})
    for group in ("id", "ood"):
        if f"{group}_top1" in teacher_top1:
            logged[f"{stage}/teacher_{group}_top1"] = teacher_top1[f"{group}_top1"]
            if student_top1.get(f"{group}_top1") is not None and teacher_top1[f"{group}_top1"] > 0:
                logged[f"{stage}/{group}_retention"] = student_top1[f"{group}_top1"] / teacher_top1[f"{group}_top1"]
    return {k: v for k, v in logged.items() if not math.isnan(v)}


def _summary(result: dict[str, Any]) -> str:
    columns, rows = diagnostics_rows(result)
    lines = [f"diagnostics ({result['stage']}, {result['items']} items): " + ", ".join(columns[2:])]
    for row in rows:
        if row[1] == "all":
            values = " ".join("-" if v is None else f"{v:.3f}" for v in row[2:])
            lines.append(f"  {row[0]:<20} {values}")
    return "\n".join(lines)
