"""Teacher-vs-student report: which distillation recipe keeps the teacher's ID and OOD accuracy.

Trains one student per recipe and seed with ``distill fit`` (overlays on configs/distill/base.yaml,
composed by ``recipes.py``),
tests each on the ShapesWorld test split (training domains = ID, held-out domains = OOD) and
writes one table, as JSON and markdown, under ``--out``:

    python benchmarks/distill_report.py                       # 7 rows x 3 seeds
    python benchmarks/distill_report.py --recipes '[clip_kd]' --seeds '[0]' --out runs/demo/report

Columns: ID top-1, OOD top-1, their retention (student / teacher), student image-tower
parameters and inference images/s (batch 128, this CPU). Needs the demo teacher
(``runs/demo/teacher/open_clip``, made by ``make demo``).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from jsonargparse import CLI
from recipes import BASE, recipe_args, recipe_configs, run_name

from distill.callbacks import ZeroShotEvaluation
from distill.cli import main as distill
from distill.plots import plot_domain_accuracy
from distill.report import Section, image_html, markdown_html, write_html
from distill.run_files import domain_groups, read_json

RECIPES = ["labels_only", "fd", "affinity", "icl", "clip_kd", "vl2v_adip"]
LABELS = {
    "labels_only": "student, labels only (no KD)",
    "fd": "FD (labels + feature MSE)",
    "affinity": "affinity KD (TinyCLIP style)",
    "icl": "ICL (labels + interactive contrastive)",
    "clip_kd": "CLIP-KD recipe",
    "vl2v_adip": "VL2V-ADiP",
    "openclip_student": "open_clip dual-tower student",
    "augment": "consistent TrivialAugment",
}
# Lightning's progress bar stays on: each run trains for a minute or more.
QUIET = ["--trainer.enable_model_summary=false"]


def _test_metrics(cli) -> dict[str, float]:
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ZeroShotEvaluation))
    return callback.results["test"]


def _images_per_second(model: torch.nn.Module, size: int, batch: int = 128, repeats: int = 10) -> float:
    model.eval()
    images = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        for _ in range(2):  # warm-up
            model.encode_image(images)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.encode_image(images)
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def _teacher_row(out: Path, teacher: str) -> dict:
    args = [
        "test",
        "--config",
        str(BASE),
        "--model=ZeroShotModule",
        f"--model.init_args.model_name=local-dir:{teacher}",
        f"--trainer.default_root_dir={out / 'teacher'}",
        "--trainer.logger=false",
        "--trainer.callbacks=[{class_path: ZeroShotEvaluation, init_args: {retrieval: false}}]",
        *QUIET,
    ]
    cli = distill(args)
    metrics = cli.trainer.callbacks[0].results["test"]
    visual = cli.model.teacher.model.visual
    size = cli.model.teacher.bundle.preprocess_config["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {
        "recipe": "teacher",
        "label": "teacher zero-shot",
        "id_top1": [metrics["id_top1"]],
        "ood_top1": [metrics["ood_top1"]],
        "params": sum(p.numel() for p in visual.parameters()),
        "images_per_s": _images_per_second(cli.model.teacher, size),
        "train_seconds": [0.0],
    }


def _student_row(recipe: str, seeds: list[int], out: Path, teacher: str, max_steps: int, extra_args: list[str]) -> dict:
    # "a+b": the overlays a.yaml then b.yaml on the base config (e.g. vl2v_adip+augment).
    row: dict = {
        "recipe": recipe,
        "label": " + ".join(LABELS.get(p.stem, p.stem) for p in recipe_configs(recipe)[1:]),
        "id_top1": [],
        "ood_top1": [],
        "train_seconds": [],
    }
    for seed in seeds:
        print(f"training {recipe}, seed {seed} ({max_steps} steps)", flush=True)
        run_dir = out / run_name(recipe) / f"seed{seed}"  # logs in run_dir/logs, as for every run
        args = [
            "fit",
            *recipe_args(recipe),
            f"--seed_everything={seed}",
            f"--trainer.max_steps={max_steps}",
            f"--trainer.default_root_dir={run_dir}",
            f"--model.init_args.teacher.model_name=local-dir:{teacher}",
            *QUIET,
            *extra_args,
        ]
        start = time.perf_counter()
        cli = distill(args)
        row["train_seconds"].append(time.perf_counter() - start)
        # The tested weights, whatever step the periodic checkpoints stopped at (export reads it):
        # weights, hyperparameters and the distill marker only (no optimizer state, which nothing
        # resumes from here), so Lightning has no `weights_only` default to warn about.
        cli.trainer.save_checkpoint(run_dir / "final.ckpt", weights_only=True)
        metrics = _test_metrics(cli)
        row["id_top1"].append(metrics["id_top1"])
        row["ood_top1"].append(metrics["ood_top1"])
    student = cli.model.student
    row["params"] = student.image_tower_params()
    row["images_per_s"] = _images_per_second(student, student.image_size)
    return row


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _markdown(rows: list[dict], teacher: dict, max_steps: int, seeds: list[int]) -> str:
    t_id, t_ood = teacher["id_top1"][0], teacher["ood_top1"][0]
    lines = [
        f"Students: {max_steps} steps each, seeds {seeds}; mean +- std over seeds. Retention = student / teacher.",
        "",
        "| recipe | ID top-1 | OOD top-1 | ID retention | OOD retention | image params | images/s | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in [teacher, *rows]:
        (i_m, i_s), (o_m, o_s) = _mean_std(row["id_top1"]), _mean_std(row["ood_top1"])
        lines.append(
            f"| {row['label']} | {100 * i_m:.1f} +- {100 * i_s:.1f} | {100 * o_m:.1f} +- {100 * o_s:.1f} "
            f"| {100 * i_m / t_id:.1f}% | {100 * o_m / t_ood:.1f}% | {row['params'] / 1e6:.2f} M "
            f"| {row['images_per_s']:.0f} | {statistics.fmean(row['train_seconds']):.0f} |"
        )
    return "\n".join(lines)


def report(
    recipes: list[str] | None = None,
    seeds: list[int] | None = None,
    max_steps: int = 600,
    teacher: str = "runs/demo/teacher/open_clip",
    out: str = "runs/distill_report",
    extra_args: list[str] | None = None,
    keep: str | None = None,
) -> dict:
    """Train every recipe for every seed, test them, and write ``report.json`` / ``report.md``.

    Args:
        recipes: recipe names (overlays in configs/distill/ joined by "+", e.g. ``vl2v_adip+augment``
            or ``clip_kd+openclip_student``; see recipes.py); default: the six timm recipes.
        seeds: seeds; default 0, 1, 2.
        max_steps: optimizer steps per student (the training budget).
        teacher: the teacher's open_clip local-dir folder.
        out: output folder.
        extra_args: more ``distill fit`` arguments for every student run, e.g.
            ``["--model.init_args.student.init_args.model_name=lcnet_050"]``.
        keep: an earlier ``report.json`` made with the same teacher, seeds and steps: its
            student rows are kept (before the new ones) instead of being retrained.
    """
    recipes, seeds = recipes or RECIPES, seeds if seeds is not None else [0, 1, 2]
    for recipe in recipes:
        recipe_configs(recipe)  # an unknown overlay stops here, before any training
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (Path(teacher) / "open_clip_config.json").is_file():
        raise FileNotFoundError(
            f"no teacher at {teacher}: run `make demo` (or distill fit --config configs/demo/base.yaml "
            "--config configs/demo/teacher.yaml) first"
        )
    teacher_row = _teacher_row(out_dir, teacher)
    rows = []
    if keep:
        earlier = json.loads(Path(keep).read_text())
        if earlier["seeds"] != seeds or earlier["max_steps"] != max_steps:
            raise ValueError(
                f"{keep} was made with seeds {earlier['seeds']} and {earlier['max_steps']} steps, "
                f"not {seeds} and {max_steps}"
            )
        rows = [r for r in earlier["students"] if r["recipe"] not in recipes]
    rows += [_student_row(r, seeds, out_dir, teacher, max_steps, list(extra_args or [])) for r in recipes]
    result = {"teacher": teacher_row, "students": rows, "max_steps": max_steps, "seeds": seeds}
    table = _markdown(rows, teacher_row, max_steps, seeds)
    (out_dir / "report.json").write_text(json.dumps(result, indent=2))
    (out_dir / "report.md").write_text(table + "\n")
    print(table)
    print(f"report: {html_report(out_dir, table, rows, seeds)}")
    return result


def html_report(out_dir: Path, table: str, rows: list[dict], seeds: list[int]) -> Path:
    """``report.html``: the table, and per-domain top-1 of each recipe's first seed next to the teacher's."""
    teacher_file = read_json(out_dir / "teacher" / "zeroshot_test.json") or {}
    teacher = {k[len("top1_") :]: v for k, v in teacher_file.get("metrics", {}).items() if k.startswith("top1_")}
    figures = []
    for row in rows:
        found = sorted((out_dir / run_name(row["recipe"]) / f"seed{seeds[0]}").rglob("zeroshot_test.json"))
        student_file = read_json(found[-1]) if found else None
        if not student_file:
            continue
        student = {k[len("top1_") :]: v for k, v in student_file["metrics"].items() if k.startswith("top1_")}
        id_domains, ood_domains = domain_groups(student_file, teacher_file)
        path = out_dir / "plots" / f"domain_top1_{run_name(row['recipe'])}.png"
        title = f"{row['label']}: test top-1 per domain (seed {seeds[0]})"
        figures.append(plot_domain_accuracy(path, student, teacher or None, id_domains, ood_domains, title=title))
    sections = [
        Section("Teacher vs students", markdown_html(table)),
        Section("Per-domain top-1", "\n".join(image_html(f) for f in figures)),
    ]
    return write_html(out_dir / "report.html", "Distillation report", sections, f"seeds {seeds}")


if __name__ == "__main__":
    CLI(report, as_positional=False)
