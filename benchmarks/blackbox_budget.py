"""Distillation from a black-box teacher under a query budget: accuracy at 25 / 50 / 100 % of the data.

    python benchmarks/blackbox_budget.py          # needs the demo teacher (`make demo`); ~10 minutes on 2 cores

The "remote" teacher is the trained ShapesWorld teacher (``runs/demo/teacher/open_clip``) reached
only through :func:`query_demo_teacher` (raw PIL images or caption strings in, embeddings out), as
a paid embedding API would be: ``distill.blackbox.BlackBoxTeacher`` counts every image and text
it sends in a spend ledger beside the cache and refuses a build that would exceed the budget.

For each budget fraction f the budget pays for f x N training items: K augmented views and the
caption of each, plus the class bank prompts. The teacher cache is built for those items
(``distill.cache_builder.build_teacher_cache``; the spend read back from the ledger is reported: a
little under the budget, since repeated captions are answered from memory for free; a second
build of the same cache must cost nothing), then a student is distilled from the cache
alone (``DistillationModule(teacher=None, teacher_cache=...)``) for the same number of steps at
every budget, with VL2V-ADiP (feature and class-text alignment first, then labels + logit KD +
features) and, at 100 %, plain distillation without the alignment stage. ID and OOD top-1 on the
validation split use the class bank the cache holds (the teacher's text embeddings).

Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from jsonargparse import CLI

from distill.augment_replay import ReplayPolicy
from distill.blackbox import BlackBoxTeacher
from distill.cache_builder import build_teacher_cache
from distill.callbacks import ZeroShotEvaluation
from distill.datamodules import ShapesWorldDataModule
from distill.kd_objectives import ClassTextAlignment, FeatureDistillation, LabelCrossEntropy, LogitDistillation
from distill.modules import DistillationModule
from distill.students import TimmStudent
from distill.teachers import Teacher

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "runs" / "demo" / "teacher" / "open_clip"
#: Crops keep 80-100 % of the area at the image's aspect ratio (a circle stays a circle).
SHAPES_POLICY = ReplayPolicy(crop_scale=(0.8, 1.0), crop_ratio=(1.0, 1.0))
TRAIN_DOMAINS = ["flat", "outline", "texture", "shaded"]
OOD_DOMAINS = ["sketch", "pixel", "night"]

_remote: Teacher | None = None


@torch.no_grad()
def query_demo_teacher(kind: str, items: list) -> torch.Tensor:
    """The stand-in remote API: ``kind`` ``image`` (PIL images) or ``text`` (strings) -> (N, D) embeddings."""
    global _remote
    if _remote is None:
        _remote = Teacher(model_name=f"local-dir:{DEMO_TEACHER}")
    if kind == "image":
        return _remote.encode_image(torch.stack([_remote.preprocess(image) for image in items]))
    return _remote.encode_text(_remote.tokenize(list(items)))


def _data(num_train: int, num_val: int, batch_size: int) -> ShapesWorldDataModule:
    return ShapesWorldDataModule(
        train_domains=TRAIN_DOMAINS,
        ood_domains=OOD_DOMAINS,
        num_train=num_train,
        num_val=num_val,
        batch_size=batch_size,
    )


def _train(cache: Path, data: ShapesWorldDataModule, steps: int, align_steps: int) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    module = DistillationModule(
        teacher=None,
        student=lambda d: TimmStudent(d, "test_resnet", image_size=64),
        objectives=[LabelCrossEntropy(), LogitDistillation(temperature=2.0), FeatureDistillation(loss="cosine")],
        align_objectives=[FeatureDistillation(loss="cosine"), ClassTextAlignment()] if align_steps else None,
        align_steps=align_steps,
        teacher_cache=str(cache),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05),
    )
    zero_shot = ZeroShotEvaluation(retrieval=False)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        default_root_dir=str(cache.parent),  # where ZeroShotEvaluation writes zeroshot_val.json
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[zero_shot],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_s = time.perf_counter() - start
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=data, verbose=False)
    val = zero_shot.results["val"]
    return {
        "train_s": round(train_s, 1),
        "val_id_top1": round(val["id_top1"], 4),
        "val_ood_top1": round(val["ood_top1"], 4),
    }


def main(
    fractions: list[float] | None = None,
    num_train: int = 2048,
    num_val: int = 350,
    num_augmentations: int = 2,
    steps: int = 150,
    align_steps: int = 50,
    batch_size: int = 64,
    work_dir: str = "runs/bench/blackbox_budget",
    out: str = "benchmarks/results/blackbox_budget.json",
) -> dict:
    """Build a budgeted black-box teacher cache per data fraction and distil a student from each.

    Args:
        fractions: budget fractions of the training data (default 0.25, 0.5, 1.0).
        num_train: training items at 100 %.
        num_val: validation items (ID and OOD domains).
        num_augmentations: K views per item in the cache (each view is one paid image query).
        steps: training steps of every run (the same at every budget).
        align_steps: VL2V-ADiP alignment steps (out of ``steps``).
        batch_size: training batch size.
        work_dir: where the caches and their spend ledgers are written (rebuilt every run).
        out: the JSON result file.
    """
    if not (DEMO_TEACHER / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{DEMO_TEACHER} not found: run `make demo` first")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    embed_dim = Teacher(model_name=f"local-dir:{DEMO_TEACHER}").embed_dim
    rows = []
    for fraction in fractions or [0.25, 0.5, 1.0]:
        items = max(1, round(fraction * num_train))
        data = _data(items, num_val, batch_size)
        prompts = len(data.classnames) * len(data.templates)
        budget = items * num_augmentations + items + prompts
        cache = work / f"cache_{round(fraction * 100)}"
        shutil.rmtree(cache, ignore_errors=True)
        teacher = BlackBoxTeacher(
            embed_dim=embed_dim, name="shapesworld-demo-teacher", version="demo",
            query=f"{Path(__file__).resolve()}:query_demo_teacher", budget=budget, max_batch=256,
        )  # fmt: skip
        start = time.perf_counter()
        build_teacher_cache(data, teacher, str(cache), num_augmentations=num_augmentations, policy=SHAPES_POLICY)
        build_s = time.perf_counter() - start
        spent = teacher.spend().units
        build_teacher_cache(data, teacher, str(cache), num_augmentations=num_augmentations, policy=SHAPES_POLICY)
        repeat_cost = teacher.spend().units - spent
        row = {
            "fraction": fraction,
            "items": items,
            "budget_units": budget,
            "spent_units": spent,
            "rebuild_cost_units": repeat_cost,
            "cache_build_s": round(build_s, 1),
            "vl2v_adip": _train(cache, data, steps, align_steps),
        }
        if fraction == 1.0:
            row["distillation"] = _train(cache, data, steps, 0)
        rows.append(row)
        print(json.dumps(row))
    result = {
        "setup": {
            "teacher": "the demo ShapesWorld teacher behind a query function (BlackBoxTeacher)",
            "data": f"ShapesWorld 64 px, {num_train} train items at 100 % (4 ID domains), {num_val} val items (+3 OOD)",
            "student": "TimmStudent test_resnet, 64 px",
            "cost": "1 unit per image view and per text (captions and class bank prompts)",
            "num_augmentations": num_augmentations,
            "steps": steps,
            "align_steps": align_steps,
            "batch_size": batch_size,
        },
        "rows": rows,
    }
    print(f"\n{'data':>6}{'items':>7}{'spent':>8}{'rebuild':>9}{'method':>14}{'ID top1':>9}{'OOD top1':>10}")
    for row in rows:
        for method in ("vl2v_adip", "distillation"):
            if method in row:
                r = row[method]
                print(
                    f"{row['fraction']:>6.0%}{row['items']:>7}{row['spent_units']:>8.0f}{row['rebuild_cost_units']:>9.0f}"
                    f"{method:>14}{r['val_id_top1']:>9.3f}{r['val_ood_top1']:>10.3f}"
                )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    CLI(main, as_positional=False)
