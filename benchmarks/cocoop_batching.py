"""CoCoOp batching benchmark: one text-tower pass over B x C prompts vs the public per-image loop.

For each model (random weights: the architecture is what costs time) and class count C, a
batch of B random L2-normalised image features goes through :class:`distill.prompts.CoCoOp`:

- ``batched``: ``class_text_features(features)``, all B x C prompts in one text-tower pass;
- ``loop``: :func:`distill.prompts.cocoop_logits_per_image_loop`, C prompts per image, B passes;
- ``loop_full``: the same loop over the whole context length, as the public implementation runs
  it (the other two stop at the pooled token, exact under the causal mask).

Each case is timed under ``torch.no_grad()`` (``forward``) and with a cross-entropy backward into
the context and the meta-net (``train``). Cases run interleaved, round by round, in one process
(warm-up rounds first, then the median of ``repeats``), so ratios share the machine's state. The
image tower is left out: both paths encode images the same way. The logits of the three cases
are compared once before timing.

    python benchmarks/cocoop_batching.py --out benchmarks/results/cocoop_batching.json
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from jsonargparse import CLI
from tqdm import tqdm

from distill.clip_models import build_clip
from distill.files import atomic_write_json
from distill.prompts import CoCoOp, cocoop_logits_per_image_loop
from distill.shapesworld import class_names

CASES = ("batched", "loop", "loop_full")


def _classnames(n: int) -> list[str]:
    """ShapesWorld class names: the 16 shapes, then shape x colour ("red circle") beyond 16."""
    names = class_names("shape") if n <= 16 else class_names("shape_colour")
    if n > len(names):
        raise ValueError(f"at most {len(names)} classes, got {n}")
    return names[:n]


def _logits_fn(case: str, learner: CoCoOp, features: torch.Tensor, scale: torch.Tensor) -> Callable[[], torch.Tensor]:
    if case == "batched":
        return lambda: scale * torch.einsum("bd,bcd->bc", features, learner.class_text_features(features))
    return lambda: cocoop_logits_per_image_loop(learner, features, scale, full_context=case == "loop_full")


def _timed(fn: Callable[[], torch.Tensor], labels: torch.Tensor, train: bool, learner: CoCoOp) -> float:
    start = time.perf_counter()
    if train:
        F.cross_entropy(fn(), labels).backward()
        learner.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            fn()
    return time.perf_counter() - start


def run_model(
    model_name: str, num_classes: int, batch: int, repeats: int, warmup: int, modes: list[str], cases: list[str]
) -> list[dict]:
    """Time the cases of one model and class count; returns one row per (mode, case)."""
    torch.manual_seed(0)
    bundle = build_clip(model_name=model_name)
    model = bundle.model.eval().requires_grad_(False)
    learner = CoCoOp(model, bundle.tokenizer)
    learner.set_classnames(_classnames(num_classes))
    features = F.normalize(torch.randn(batch, learner.vis_dim), dim=-1)
    labels = torch.randint(num_classes, (batch,))
    scale = model.logit_scale.exp()
    fns = {case: _logits_fn(case, learner, features, scale) for case in cases}
    with torch.no_grad():
        logits = {case: fn() for case, fn in fns.items()}
    max_diff = {case: float((logits[case] - logits["batched"]).abs().max()) for case in cases if case != "batched"}
    times: dict[tuple[str, str], list[float]] = {(m, c): [] for m in modes for c in cases}
    for r in tqdm(range(warmup + repeats), desc=f"{model_name} C={num_classes}", leave=False):
        for mode in modes:
            for case, fn in fns.items():  # interleaved: every case sees the same load drift
                t = _timed(fn, labels, mode == "train", learner)
                if r >= warmup:
                    times[(mode, case)].append(t)
    rows = []
    for (mode, case), ts in times.items():
        rows.append(
            {
                "model": model_name,
                "classes": num_classes,
                "batch": batch,
                "prompt_tokens": learner._length,
                "context_length": learner.text_tower.context_length,
                "text_layers": learner.text_tower.layers,
                "text_width": learner.text_tower.width,
                "mode": mode,
                "case": case,
                "times_s": ts,
                "median_s": statistics.median(ts),
                "max_abs_logit_diff_vs_batched": max_diff.get(case, 0.0),
            }
        )
    return rows


def _add_ratios(rows: list[dict]) -> None:
    base = {(r["model"], r["classes"], r["mode"]): r["median_s"] for r in rows if r["case"] == "batched"}
    for r in rows:
        r["speedup_of_batched"] = r["median_s"] / base[(r["model"], r["classes"], r["mode"])]


def _print_table(rows: list[dict]) -> None:
    head = f"{'model':<18} {'C':>3} {'B':>3} {'mode':<8} {'case':<10} {'median s':>9}"
    print(f"{head} {'batched is x faster':>20} {'max |dlogit|':>13}")
    for r in rows:
        print(
            f"{r['model']:<18} {r['classes']:>3} {r['batch']:>3} {r['mode']:<8} {r['case']:<10} "
            f"{r['median_s']:>9.4f} {r['speedup_of_batched']:>20.2f} {r['max_abs_logit_diff_vs_batched']:>13.2e}"
        )


def main(
    runs: list[str] | None = None,
    batch: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 1,
    modes: list[str] | None = None,
    out: str = "benchmarks/results/cocoop_batching.json",
) -> None:
    """Time CoCoOp's batched text pass against the per-image loop and save JSON.

    Args:
        runs: ``model:classes[:cases]`` items, cases joined by ``+`` (default: all three);
            default ``shapes-rn-teacher:16``, ``shapes-rn-teacher:80``, ``ViT-B-32:4`` (few classes:
            a 12-layer, 512-wide text tower on CPU).
        batch: images per batch B.
        repeats: timed rounds per case (the median is reported).
        warmup: untimed rounds first.
        threads: torch CPU threads (1 gives steady timings on a shared machine).
        modes: ``forward`` (no_grad) and/or ``train`` (forward + backward); default both.
        out: JSON output path.
    """
    torch.set_num_threads(threads)
    runs = runs or ["shapes-rn-teacher:16", "shapes-rn-teacher:80", "ViT-B-32:4"]
    modes = modes or ["forward", "train"]
    rows: list[dict] = []
    for run in tqdm(runs, desc="runs"):
        model_name, classes, *rest = run.split(":")
        cases = rest[0].split("+") if rest else list(CASES)
        unknown = sorted(set(cases) - set(CASES))
        if unknown or "batched" not in cases:
            raise ValueError(f"run {run!r}: cases must include 'batched' and come from {CASES}, got {cases}")
        rows += run_model(model_name, int(classes), batch, repeats, warmup, modes, cases)
    _add_ratios(rows)
    _print_table(rows)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "repeats": repeats,
        "warmup": warmup,
    }
    atomic_write_json(out, {"meta": meta, "rows": rows})
    print(f"saved {out}")


if __name__ == "__main__":
    CLI(main)
