"""Adaptation report: base-to-novel and few-shot accuracy of each method against zero-shot.

Runs the recipes of ``configs/adapt/`` on the ShapesWorld ``shape_position`` split files (written by
``python -m distill.shapesworld_splits --root runs/data/shapesworld``) with the demo teacher:

* base-to-novel (16 shots of each base class; test on base, then on novel): one row per method with
  base, novel, HM = 2BN/(B+N) of the seed-averaged B and N, in-domain and out-of-domain top-1 (base
  classes), trainable parameters, fit seconds and training images/s; mean +- std over seeds;
* few-shot LoRA (all 80 classes, K shots): top-1 at each K against zero-shot;
* with ``--distil``: a timm student distilled (VL2V-ADiP) from the LoRA-adapted teacher vs from
  the unadapted one, on the adaptation task (one seed).

Model selection is the last step (never the test split). The zero-shot row is the LoRA module
before training (its adapters start at B = 0, so it computes exactly the frozen model) with the
datamodule's ten templates. Writes JSON and markdown under ``--out``:

    python benchmarks/adapt_report.py                                    # full grid, 3 seeds
    python benchmarks/adapt_report.py --methods '[lora]' --seeds '[1]' --shots '[]'
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from jsonargparse import CLI

from distill.callbacks import ZeroShotEvaluation
from distill.cli import main as distill
from distill.files import atomic_write_json, atomic_write_text
from distill.plots import plot_adaptation, plot_shots
from distill.report import Section, image_html, markdown_html, write_html

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "adapt"
METHODS = ["coop", "cocoop", "deep_prompts", "kgcoop", "promptsrc", "lora", "lora+lora_int8"]
LABELS = {
    "zero_shot": "zero-shot (10 hand-crafted templates)",
    "coop": "CoOp (4 context vectors)",
    "cocoop": "CoCoOp (meta-net, batched)",
    "deep_prompts": "deep multimodal prompts (MaPLe style)",
    "kgcoop": "KgCoOp (CoOp + 8 x text regulariser)",
    "promptsrc": "PromptSRC (deep prompts + SCL + GPA)",
    "lora": "LoRA r=2 q,k,v (CLIP-LoRA)",
    "lora+lora_int8": "LoRA r=2 on an 8-bit base",
}
# Lightning's progress bar stays on: a run trains for up to a few minutes.
QUIET = ["--trainer.enable_model_summary=false", "--trainer.logger=false"]


def _args(method: str, run_dir: Path, seed: int, extra: list[str]) -> list[str]:
    names = ["base", "lora"] if method == "zero_shot" else ["base", *method.split("+")]
    configs = [f"--config={CONFIGS / name}.yaml" for name in names]
    common = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}", f"--trainer.default_root_dir={run_dir}"]
    if method == "zero_shot":
        common.append("--model.init_args.templates=null")  # the datamodule's ten templates
    return [*configs, *QUIET, *common, *extra]


def _test(args: list[str], eval_classes: str, ckpt: bool) -> dict[str, float]:
    cli = distill(["test", *args, f"--data.init_args.eval_classes={eval_classes}", *(["--ckpt_path=last"] * ckpt)])
    return next(c for c in cli.trainer.callbacks if isinstance(c, ZeroShotEvaluation)).results["test"]


def run_method(
    method: str, seed: int, out: Path, data_args: list[str], split: str = "base_to_novel", run: bool = True
) -> dict | None:
    """Fit one method (nothing for zero-shot) and test it; returns a result row (None: not run, ``run=False``)."""
    run_dir = out / "runs" / f"{split}_{method}_seed{seed}"
    row_file = run_dir / "row.json"
    if row_file.is_file():  # a finished run of an earlier, interrupted report
        return json.loads(row_file.read_text())
    if not run:
        return None
    print(f"adaptation run: {method}, seed {seed}, {split}", flush=True)
    args = _args(method, run_dir, seed, data_args)
    row: dict = {"method": method, "seed": seed, "trainable": 0, "fit_s": 0.0, "images_per_s": 0.0}
    trained = method != "zero_shot"
    if trained:
        cli = distill([*args, "--model.init_args.export_dir=" + str(run_dir / "adapted")], run=False)
        if _finished(run_dir, cli.trainer.max_steps):  # trained to the end before (no timing kept): test it again
            row["fit_s"] = row["images_per_s"] = float("nan")
        else:
            start = time.perf_counter()
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            row["fit_s"] = time.perf_counter() - start
            row["images_per_s"] = cli.trainer.global_step * cli.datamodule.batch_size / row["fit_s"]
        row["trainable"] = cli.model.trainable_parameter_count()
    if split == "base_to_novel":
        base, novel = _test(args, "base", trained), _test(args, "novel", trained)
        row.update(base=base["id_top1"], novel=novel["id_top1"], id=base["id_top1"], ood=base["ood_top1"])
    else:
        result = _test(args, "all", trained)
        row.update(id=result["id_top1"], ood=result["ood_top1"])
    atomic_write_json(row_file, row)
    return row


def _finished(run_dir: Path, max_steps: int) -> bool:
    """Whether the run's last checkpoint is at the end of its step budget."""
    import torch

    path = run_dir / "checkpoints" / "last.ckpt"
    return path.is_file() and torch.load(path, map_location="cpu", weights_only=True)["global_step"] >= max_steps


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _summary(rows: list[dict], keys: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    return {k: _mean_std([100 * r[k] for r in rows]) for k in keys}


def _hm(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel else 0.0


def _pm(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.1f} ± {pair[1]:.1f}"


def base_to_novel_table(rows: list[dict], methods: list[str]) -> tuple[list[dict], str]:
    """Per-method summary and its markdown table."""
    lines = [
        "| method | seeds | base | novel | HM | ID top-1 (base) | OOD top-1 (base) | trainable | fit s | img/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for method in ["zero_shot", *methods]:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        s = _summary(mine, ("base", "novel", "id", "ood"))
        hm = _hm(s["base"][0], s["novel"][0])
        timed = [r for r in mine if r["fit_s"] == r["fit_s"]] or mine  # NaN: a run resumed without timing
        fit_s, ips = statistics.fmean(r["fit_s"] for r in timed), statistics.fmean(r["images_per_s"] for r in timed)
        summary.append(
            {"method": method, **{k: list(v) for k, v in s.items()}, "hm": hm, "trainable": mine[0]["trainable"]}
        )
        lines.append(
            f"| {LABELS.get(method, method)} | {len(mine)} | {_pm(s['base'])} | {_pm(s['novel'])} | {hm:.1f} | "
            f"{_pm(s['id'])} | {_pm(s['ood'])} | {mine[0]['trainable']:,} | {fit_s:.0f} | {ips:.0f} |"
        )
    return summary, "\n".join(lines)


def few_shot_table(rows: list[dict], shots: list[int]) -> str:
    lines = [
        "| K (shots per class) | seeds | LoRA ID top-1 | LoRA OOD top-1 | zero-shot ID | zero-shot OOD |",
        "|---|---|---|---|---|---|",
    ]
    zero_rows = [r for r in rows if r["method"] == "zero_shot"]
    zero = _summary(zero_rows, ("id", "ood")) if zero_rows else None
    for k in shots:
        mine = [r for r in rows if r["method"] == "lora" and r["shots"] == k]
        if not mine or zero is None:
            continue
        s = _summary(mine, ("id", "ood"))
        lines.append(
            f"| {k} | {len(mine)} | {_pm(s['id'])} | {_pm(s['ood'])} | {_pm(zero['id'])} | {_pm(zero['ood'])} |"
        )
    return "\n".join(lines)


def distil_rows(out: Path, adapted_teacher: Path, max_steps: int) -> list[dict]:
    """VL2V-ADiP students of the unadapted and the LoRA-adapted teacher on shape_position."""
    distill_configs = ROOT / "configs" / "distill"
    rows = []
    for name, teacher in (
        ("unadapted teacher", ROOT / "runs/demo/teacher/open_clip"),
        ("LoRA-adapted teacher", adapted_teacher),
    ):
        run_dir = out / "runs" / f"distil_{name.split()[0]}"
        cli = distill(
            [
                "fit",
                f"--config={distill_configs / 'base.yaml'}",
                f"--config={distill_configs / 'vl2v_adip.yaml'}",
                *QUIET,
                f"--model.init_args.teacher.model_name=local-dir:{teacher}",
                "--data.init_args.task=shape_position",
                f"--trainer.max_steps={max_steps}",
                f"--trainer.val_check_interval={max_steps}",
                f"--model.init_args.align_steps={max_steps // 2}",
                f"--trainer.default_root_dir={run_dir}",
            ]
        )
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        result = next(c for c in cli.trainer.callbacks if isinstance(c, ZeroShotEvaluation)).results["test"]
        rows.append({"teacher": name, "id": result["id_top1"], "ood": result["ood_top1"]})
    return rows


def report(
    methods: list[str] = METHODS,
    seeds: list[int] = [1, 2, 3],  # noqa: B006 (jsonargparse reads the default)
    shots: list[int] = [1, 4, 16],  # noqa: B006
    distil: bool = True,
    distil_steps: int = 300,
    data_args: list[str] = [],  # noqa: B006
    out: str = "runs/adapt_report",
    run: bool = True,
) -> dict:
    """Run the grid and write ``adapt_report.json`` and ``adapt_report.md`` under ``out``.

    Args:
        methods: overlays of configs/adapt (``a+b`` composes two).
        seeds: few-shot sampling and training seeds.
        shots: K values of the few-shot LoRA rows (empty: skip them).
        distil: add the LoRA-teacher vs unadapted-teacher distillation rows.
        distil_steps: training steps of each distilled student.
        data_args: extra ``--data...`` arguments for every run (e.g. another split file).
        out: output folder; each finished run keeps its row there (``runs/*/row.json``), so an
            interrupted report resumes where it stopped.
        run: run what is missing; False writes the report from the finished runs only.
    """
    out_dir = Path(out)
    rows = [run_method(m, s, out_dir, data_args, run=run) for s in seeds for m in ["zero_shot", *methods]]
    rows = [r for r in rows if r is not None]
    summary, b2n_md = base_to_novel_table(rows, methods)
    result: dict = {"base_to_novel": {"rows": rows, "summary": summary}}
    markdown = [f"## Base-to-novel, shape_position, 16 shots, seeds {seeds}\n", b2n_md]
    if shots:
        few = []
        for seed in seeds:
            for k in shots:
                for method in ["zero_shot", "lora"] if k == shots[0] else ["lora"]:
                    extra = [*data_args, "--data.init_args.train_classes=all", f"--data.init_args.shots={k}"]
                    row = run_method(method, seed, out_dir, extra, split=f"fewshot{k}", run=run)
                    if row is not None:
                        few.append({**row, "shots": k})
        result["few_shot"] = few
        markdown += [f"\n## Few-shot LoRA, all 80 classes, seeds {seeds}\n", few_shot_table(few, shots)]
    if distil:
        adapted = out_dir / "runs" / f"fewshot{max(shots or [16])}_lora_seed{seeds[0]}" / "adapted" / "open_clip"
        if not adapted.is_dir() and run:
            run_method("lora", seeds[0], out_dir, [*data_args, "--data.init_args.train_classes=all"], split="fewshot16")
            adapted = out_dir / "runs" / f"fewshot16_lora_seed{seeds[0]}" / "adapted" / "open_clip"
        distil_file = out_dir / "distil_rows.json"
        if distil_file.is_file():
            result["distil"] = json.loads(distil_file.read_text())
        elif run:
            result["distil"] = distil_rows(out_dir, adapted, distil_steps)
            atomic_write_json(distil_file, result["distil"])
        else:
            result["distil"] = []
        lines = ["| student's teacher | student ID top-1 | student OOD top-1 |", "|---|---|---|"]
        lines += [f"| {r['teacher']} | {100 * r['id']:.1f} | {100 * r['ood']:.1f} |" for r in result["distil"]]
        markdown += [
            f"\n## Distilling the adapted teacher (VL2V-ADiP, {distil_steps} steps, seed {seeds[0]})\n",
            *lines,
        ]
    atomic_write_json(out_dir / "adapt_report.json", result)
    atomic_write_text(out_dir / "adapt_report.md", "\n".join(markdown) + "\n")
    print("\n".join(markdown))
    print(f"report: {html_report(result, markdown, out_dir, seeds, shots)}")
    return result


def html_report(result: dict, markdown: list[str], out_dir: Path, seeds: list[int], shots: list[int]) -> Path:
    """``adapt_report.html``: the tables, base/novel/HM bars per method and top-1 vs shots (PNGs in ``plots/``)."""
    plots = out_dir / "plots"
    figures = []
    summary = result["base_to_novel"]["summary"]
    if summary:
        rows = [
            {
                "method": LABELS.get(s["method"], s["method"]),
                "base": s["base"][0] / 100,
                "novel": s["novel"][0] / 100,
                "hm": s["hm"] / 100,
                "base_std": s["base"][1] / 100,
                "novel_std": s["novel"][1] / 100,
            }
            for s in summary
        ]
        title = f"Base-to-novel top-1 (shape_position, 16 shots, mean of {len(seeds)} seed(s))"
        figures.append(plot_adaptation(plots / "base_to_novel.png", rows, title=title))
    few = result.get("few_shot") or []
    lora = [r for r in few if r["method"] == "lora"]
    if lora:
        series = {}
        for key, name in (("id", "LoRA, ID domains"), ("ood", "LoRA, OOD domains")):
            series[name] = [(k, statistics.fmean(r[key] for r in lora if r["shots"] == k)) for k in shots]
        zero = [r["id"] for r in few if r["method"] == "zero_shot"]
        baseline = statistics.fmean(zero) if zero else None
        title = "Few-shot LoRA: top-1 vs shots per class (all classes; dashed: zero-shot, ID)"
        figures.append(plot_shots(plots / "few_shot.png", series, baseline=baseline, title=title))
    sections = [
        Section("Tables", markdown_html("\n".join(markdown))),
        Section("Plots", "\n".join(image_html(f) for f in figures)),
    ]
    return write_html(out_dir / "adapt_report.html", "Adaptation report", sections, f"seeds {seeds}")


if __name__ == "__main__":
    CLI(report, as_positional=False)
