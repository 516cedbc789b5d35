"""Teacher cache vs online teacher: distillation epoch time and accuracy on ShapesWorld.

    python benchmarks/teacher_cache.py                    # ~5 minutes on 2 CPU cores
    python benchmarks/teacher_cache.py --teachers '[large]' --epochs '{large: 1}' --num_train 1024

For each teacher a cache of K augmented views per item is built (``distill.cache_builder``), then
the same student (``test_resnet`` at 64 px, the recipe's) trains for its ``epochs`` twice in
this process, from the same seed and on the same replayed views: once reading the teacher's
embeddings from the cache, once running the online teacher on every batch
(``teacher_cache_embeddings=False``). Reported per mode: every epoch's time (training batches,
data loading included, validation excluded), their minimum and median, and ID and OOD top-1 on
the validation split; per teacher: the cache build time, the teacher's forward pass per batch
over the student's training step (fastest of 5, measured here), and online / cache epoch time
from the fastest epochs (the least disturbed by other work on the machine) and from the medians.
The views: a crop keeping 80-100 % of the area at the image's aspect ratio (a circle stays a
circle: ``ellipse`` is another class), a flip, one TrivialAugment-style op.

Teachers:

* ``demo``: the trained ShapesWorld teacher (``runs/demo/teacher/open_clip``, ``make demo``):
  accuracies are meaningful (6 epochs: far from the 600-step recipes' 97 %, enough to compare
  the modes), but it is cheaper than its student (32 px, 1 block per stage), so the cache saves
  little time with it.
* ``large``: a ViT of realistic size next to the student (patch 8 at 64 px, width 192, 12 layers:
  5.4 M image parameters, 14x the student's; its forward pass costs ~5x the student's training
  step, as ViT-B/16 teaching ViT-T/16 at 224 px does). No trained one exists offline, so its
  weights are random: its accuracies only show that both modes agree (2 epochs, timing only).

Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import open_clip
import torch
from jsonargparse import CLI

from distill.augment_replay import ReplayPolicy
from distill.cache_builder import build_teacher_cache
from distill.callbacks import ZeroShotEvaluation
from distill.clip_models import build_clip, save_local_dir
from distill.datamodules import ShapesWorldDataModule
from distill.kd_objectives import FeatureDistillation, LabelCrossEntropy, LogitDistillation
from distill.modules import DistillationModule
from distill.students import TimmStudent
from distill.teachers import Teacher

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "runs" / "demo" / "teacher" / "open_clip"
SHAPES_POLICY = ReplayPolicy(crop_scale=(0.8, 1.0), crop_ratio=(1.0, 1.0))
LARGE_VISION = {"image_size": 64, "patch_size": 8, "width": 192, "layers": 12, "head_width": 64}


class EpochTimer(pl.Callback):
    """Seconds from each training epoch's start to its last batch's end (validation left out)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(self._last - self._start)


def _teacher(name: str, work: Path) -> Teacher:
    if name == "demo":
        if not (DEMO_TEACHER / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{DEMO_TEACHER} not found: run `make demo` first, or pass --teachers '[large]'")
        return Teacher(model_name=f"local-dir:{DEMO_TEACHER}")
    config = open_clip.get_model_config("shapes-rn-teacher")
    config = {**config, "vision_cfg": LARGE_VISION}
    torch.manual_seed(0)
    bundle = build_clip(model_config=config)
    folder = save_local_dir(bundle.model, bundle.model_config, bundle.preprocess_config, work / "large_teacher")
    return Teacher(model_name=f"local-dir:{folder}")


def _data(num_train: int, num_val: int, batch_size: int) -> ShapesWorldDataModule:
    return ShapesWorldDataModule(
        train_domains=["flat", "outline", "texture", "shaded"],
        ood_domains=["sketch", "pixel", "night"],
        num_train=num_train,
        num_val=num_val,
        batch_size=batch_size,
    )


def _step_costs(teacher: Teacher, batch_size: int, repeats: int = 5) -> dict[str, float]:
    """Fastest seconds of the teacher's forward pass and of the student's training step on one batch."""
    student = TimmStudent(teacher.embed_dim, "test_resnet", image_size=64)
    size = teacher.bundle.preprocess_config["size"]
    size = size if isinstance(size, int) else size[0]
    teacher_in, student_in = torch.rand(batch_size, 3, size, size), torch.rand(batch_size, 3, 64, 64)

    def student_step() -> None:
        student.zero_grad()
        student.encode_image(student_in).sum().backward()

    times = {}
    for name, step in (
        ("teacher_forward_s", lambda: teacher.encode_image(teacher_in)),
        ("student_step_s", student_step),
    ):
        step()  # warm-up
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            samples.append(time.perf_counter() - start)
        times[name] = min(samples)
    return times


def _train(teacher: Teacher, cache: Path, data: ShapesWorldDataModule, epochs: int, from_cache: bool) -> dict:
    """Fit ``epochs`` epochs reading the cache (or the online teacher on the cache's views), then validate."""
    pl.seed_everything(0, verbose=False)
    module = DistillationModule(
        teacher=teacher,
        student=lambda d: TimmStudent(d, "test_resnet", image_size=64),
        objectives=[LabelCrossEntropy(), LogitDistillation(temperature=2.0), FeatureDistillation(loss="cosine")],
        teacher_cache=str(cache),
        teacher_cache_embeddings=from_cache,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05),
    )
    timer, zero_shot = EpochTimer(), ZeroShotEvaluation(retrieval=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=str(cache.parent),  # where ZeroShotEvaluation writes zeroshot_val.json
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer, zero_shot],
    )
    trainer.fit(module, datamodule=data)
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=data, verbose=False)
    return {
        "epoch_times_s": [round(t, 2) for t in timer.times],
        "epoch_time_min_s": round(min(timer.times), 2),
        "epoch_time_median_s": round(statistics.median(timer.times), 2),
        "val_id_top1": round(zero_shot.results["val"]["id_top1"], 4),
        "val_ood_top1": round(zero_shot.results["val"]["ood_top1"], 4),
    }


def _ratio(modes: dict[str, dict], key: str) -> float:
    return round(modes["online"][key] / modes["cache"][key], 2)


def main(
    teachers: list[str] | None = None,
    num_train: int = 2048,
    num_val: int = 350,
    epochs: dict[str, int] | None = None,
    num_augmentations: int = 4,
    batch_size: int = 128,
    work_dir: str = "runs/bench/teacher_cache",
    out: str = "benchmarks/results/teacher_cache.json",
) -> dict:
    """Time distillation epochs with the teacher cache and with the online teacher.

    Args:
        teachers: ``demo`` (the trained ShapesWorld teacher) and/or ``large`` (realistic size, random).
        num_train: training items (each cached with ``num_augmentations`` views).
        num_val: validation items (ID and OOD domains).
        epochs: training epochs per mode, by teacher (default ``{demo: 6, large: 2}``).
        num_augmentations: K views per item in the cache.
        batch_size: training batch size.
        work_dir: where caches (rebuilt every run) and the large teacher are written.
        out: the JSON result file.
    """
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows, epochs = [], {"demo": 6, "large": 2, **(epochs or {})}
    for name in teachers or ["demo", "large"]:
        teacher, data = _teacher(name, work), _data(num_train, num_val, batch_size)
        cache = work / f"cache_{name}"
        shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        build_teacher_cache(
            data, teacher, str(cache), num_augmentations=num_augmentations, policy=SHAPES_POLICY, batch_size=256
        )
        build_s = time.perf_counter() - start
        costs = _step_costs(teacher, batch_size)
        modes = {mode: _train(teacher, cache, data, epochs[name], mode == "cache") for mode in ("cache", "online")}
        row = {
            "teacher": name,
            "epochs": epochs[name],
            "teacher_image_params_m": round(sum(p.numel() for p in teacher.model.visual.parameters()) / 1e6, 2),
            "teacher_forward_over_student_step": round(costs["teacher_forward_s"] / costs["student_step_s"], 2),
            **{k: round(v, 3) for k, v in costs.items()},
            "cache_build_s": round(build_s, 1),
            "cache": modes["cache"],
            "online": modes["online"],
            "online_over_cache_epoch_time": _ratio(modes, "epoch_time_min_s"),
            "online_over_cache_epoch_time_median": _ratio(modes, "epoch_time_median_s"),
        }
        rows.append(row)
        print(json.dumps(row))
    result = {
        "setup": {
            "data": f"ShapesWorld, 64 px: {num_train} train items (4 ID domains), {num_val} val items (ID + 3 OOD)",
            "student": "TimmStudent test_resnet, 64 px (0.39 M params)",
            "objectives": "labels + logit KD (T=2) + cosine feature distillation",
            "num_augmentations": num_augmentations,
            "policy": SHAPES_POLICY.to_dict(),
            "batch_size": batch_size,
            "threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    print(f"\n{'teacher':<8}{'mode':<8}{'epoch s (min)':>14}{'(median)':>10}{'ID top1':>9}{'OOD top1':>9}")
    for row in rows:
        for mode in ("cache", "online"):
            r = row[mode]
            times = f"{r['epoch_time_min_s']:>14.2f}{r['epoch_time_median_s']:>10.2f}"
            print(f"{row['teacher']:<8}{mode:<8}{times}{r['val_id_top1']:>9.3f}{r['val_ood_top1']:>9.3f}")
        print(
            f"{row['teacher']}: online / cache epoch time {row['online_over_cache_epoch_time']}x (fastest epochs), "
            f"{row['online_over_cache_epoch_time_median']}x (medians); cache built in "
            f"{row['cache_build_s']} s; teacher forward = {row['teacher_forward_over_student_step']}x student step"
        )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    CLI(main)
