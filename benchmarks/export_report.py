"""Export report: size, latency and accuracy of a distilled student in every deployment form.

Runs ``distill export`` on a trained student (by default the demo's VL2V-ADiP student from
``make demo``), which exports ONNX fp32, INT8 dynamic and INT8 static, measures them next to
PyTorch fp32 and bitsandbytes 8/4-bit, gates them on parity, and writes the edge bundle. This
script then copies the report next to the bundle, prints it, and classifies one OOD test image
with the bundle's torch-free runner in a fresh interpreter:

    python benchmarks/export_report.py                                  # the demo student
    python benchmarks/export_report.py --ckpt runs/distill/vl2v_adip/.../last.ckpt --out runs/export

Latency is the median on this CPU at batch 1 and 32 (all of onnxruntime's and torch's threads).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from jsonargparse import CLI
from recipes import recipe_args, run_name

from distill.cli import main as distill
from distill.report import Section, image_html, markdown_html, write_html
from distill.run_files import export_plot


def newest_checkpoint(folder: Path) -> Path:
    """``final.ckpt`` (the trained student distill_report.py tested) under ``folder``, else the newest."""
    if (folder / "final.ckpt").is_file():
        return folder / "final.ckpt"
    found = sorted(folder.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {folder}: run `make demo` or distill a student first")
    return found[-1]


def report(
    recipe: str = "vl2v_adip",
    ckpt: str | None = None,
    runs: str = "runs/demo/report",
    teacher: str = "runs/demo/teacher/open_clip",
    out: str = "runs/demo/export",
    extra_args: list[str] | None = None,
) -> dict:
    """Export a student, write ``export_report.json``/``.md`` under ``out``, run the edge runner.

    Args:
        recipe: the student's recipe (overlays in configs/distill/ joined by "+", laid over
            base.yaml; see recipes.py).
        ckpt: the student's checkpoint; default: ``runs/<recipe>/seed0/final.ckpt``.
        runs: where distill_report.py trained the students.
        teacher: the teacher's open_clip local-dir folder (for the class bank).
        out: output folder; the edge bundle goes to ``out/bundle``.
        extra_args: more ``distill export`` arguments, e.g. ``["--quantize=[static]"]``.
    """
    configs = recipe_args(recipe)  # the same configs distill_report.py trained the student with
    checkpoint = Path(ckpt) if ckpt else newest_checkpoint(Path(runs) / run_name(recipe) / "seed0")
    out_dir = Path(out)
    bundle = out_dir / "bundle"
    args = [
        "export",
        *configs,
        f"--ckpt_path={checkpoint}",
        f"--output_dir={bundle}",
        f"--model.init_args.teacher.model_name=local-dir:{teacher}",
        "--trainer.logger=false",
        *(extra_args or []),
    ]
    cli = distill(args)
    for suffix in ("json", "md"):
        shutil.copyfile(bundle / f"report.{suffix}", out_dir / f"export_report.{suffix}")
    sample = out_dir / "sample_ood.png"
    datamodule = cli.datamodule
    ood = [
        s for s in datamodule.raw_samples("test", 64) if datamodule.domain_names[s["domain"]] in datamodule.ood_domains
    ]
    ood[0]["image"].save(sample)
    print(
        f"\nedge runner (onnxruntime + numpy + PIL, no torch) on an OOD test image, true class "
        f"{datamodule.classnames[ood[0]['label']]!r}:"
    )
    subprocess.run([sys.executable, str(bundle / "run.py"), str(bundle), str(sample), "--top", "3"], check=True)
    print(f"report: {html_report(out_dir)}")
    return json.loads((bundle / "report.json").read_text())


def html_report(out_dir: Path) -> Path:
    """``export_report.html``: the variant table and accuracy vs latency and size per variant."""
    plot = export_plot(out_dir / "export_report.json", out_dir / "plots" / "export_tradeoff.png")
    sections = [Section("Variants", markdown_html((out_dir / "export_report.md").read_text()))]
    if plot is not None:
        sections.append(Section("Size, latency and accuracy", image_html(plot)))
    return write_html(out_dir / "export_report.html", "Export report", sections)


if __name__ == "__main__":
    CLI(report, as_positional=False)
