"""Similarity engine benchmark: forward+backward time, peak extra memory and fp32 error vs open_clip.

For each N and input kind: open_clip's ``ClipLoss``, ``SigLipLoss``, ``DistillClipLoss`` and the
engine's ``infonce_loss``, ``siglip_loss``, ``kd_loss`` (``kind="ce", contrastive_weight=1``: the
same value as ``sum(DistillClipLoss(...))``) on each backend, at D=512, fp32, L2-normalised inputs.

Input kinds (:data:`INPUT_KINDS`; student and teacher drawn alike, independently):
``random`` (independent directions, scale 30, teacher scale 50: the original benchmark),
``clip_init`` (independent, scale 14.3 = 1/0.07, CLIP's initial value), ``trained`` (scale 100,
half the pairs, chosen at random, at cosine 0.9 exactly: text = 0.9 image + sqrt(0.19) u with u a
unit vector orthogonal to the image), ``hard_negatives`` (``trained`` plus clusters of 8
near-duplicates: every embedding at cosine sqrt(0.95) to its cluster centre, so members sit at
~0.95 to each other and the unpaired texts of a cluster are closer to its images than the paired
ones). SigLIP's bias is -10 throughout.

Precision (CPU): each case's loss and gradients (embeddings and scale; SigLIP also bias) in fp32
against an fp64 run on the same (fp32-valued) inputs: ``loss_rel_err`` = |l32 - l64| / |l64|,
``grad_rel_err`` = the largest ||g32 - g64|| / ||g64|| over the gradients. The fp64 value comes
from the ``reference`` backend up to N = ``fp64_reference_max_n`` and from ``tiled`` above it
(O(N) memory; at fp64 its rounding is ~1e-13 relative, far below the fp32 errors measured).

CPU method. Time: all cases of one N run interleaved, round by round, in ONE fresh process
(median of ``repeats``), so the ratios to open_clip share the machine's state. Memory: each
case runs once more in its own fresh process; peak extra = peak resident set (VmHWM, reset
through /proc/self/clear_refs just before the call) minus the resident set after the inputs
exist. It counts everything the call touches: logits, buffers, autograd state and gradients.
A case whose predicted peak (scaled as N^2 from the previous N) exceeds 60% of MemAvailable
is skipped and marked so rather than risk the OOM killer (45% of MemAvailable). One extra run at ``big_n`` (tiled
InfoNCE only) shows that N=65,536 fits.

GPU method (``device="cuda"``): bf16, N in {8k, 16k, 32k, 65k} x D in {512, 768}, CUDA events,
``torch.cuda.max_memory_allocated`` above the inputs; roofline = the cuBLAS time of one
(N, D) x (D, N) bf16 GEMM times the op's GEMM passes (InfoNCE 4, SigLIP 3, KD 6).

    python benchmarks/similarity.py --sizes '[1024]' --kinds '[trained]' --out /tmp/s.json  # a quick look
    python benchmarks/similarity.py --sizes '[1024,4096,8192,16384]' --big_n 65536 \
        --out benchmarks/results/similarity_cpu.json  # the full CPU grid
    python benchmarks/similarity.py --device cuda --out benchmarks/results/similarity_gpu.json
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from jsonargparse import CLI
from tqdm import tqdm

#: case name -> (op, implementation); the open_clip case is the baseline of its op.
CASES = {
    "ClipLoss": ("infonce", "open_clip"),
    "infonce/reference": ("infonce", "reference"),
    "infonce/tiled": ("infonce", "tiled"),
    "infonce/cuda": ("infonce", "cuda"),
    "SigLipLoss": ("siglip", "open_clip"),
    "siglip/reference": ("siglip", "reference"),
    "siglip/tiled": ("siglip", "tiled"),
    "siglip/cuda": ("siglip", "cuda"),
    "DistillClipLoss": ("kd", "open_clip"),
    "kd/reference": ("kd", "reference"),
    "kd/tiled": ("kd", "tiled"),
    "kd/cuda": ("kd", "cuda"),
}
GEMM_PASSES = {"infonce": 4, "siglip": 3, "kd": 6}


@dataclass(frozen=True)
class InputKind:
    """How the benchmark's embeddings are drawn.

    Attributes:
        scale: student (and SigLIP) logit scale.
        teacher_scale: teacher logit scale (KD).
        paired: fraction of the pairs (i, i) at cosine ``pair_cos``; the rest independent.
        cluster: 0, or the size of the near-duplicate clusters (hard negatives).
    """

    scale: float
    teacher_scale: float
    paired: float = 0.0
    cluster: int = 0


INPUT_KINDS = {
    "random": InputKind(30.0, 50.0),
    "clip_init": InputKind(1 / 0.07, 1 / 0.07),
    "trained": InputKind(100.0, 100.0, paired=0.5),
    "hard_negatives": InputKind(100.0, 100.0, paired=0.5, cluster=8),
}
PAIR_COS = 0.9
CLUSTER_COS = 0.95  # squared cosine to the centre: members sit at ~this cosine to each other
_CHUNK = 1024  # rows drawn at a time: no N x D temporaries that would raise the peak before the call


def _normalize_(x: torch.Tensor) -> torch.Tensor:
    return x.div_(x.norm(dim=1, keepdim=True))


def _pair(n: int, d: int, kind: InputKind, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text rows (n, d), unit norm, drawn as ``kind`` says (see the module docstring)."""
    image, text = torch.empty(n, d), torch.empty(n, d)
    paired = torch.zeros(n, dtype=torch.bool)
    paired[torch.randperm(n, generator=g)[: round(kind.paired * n)]] = True
    for start in range(0, n, _CHUNK):
        rows = slice(start, min(start + _CHUNK, n))
        k = rows.stop - rows.start
        img, txt = _normalize_(torch.randn(k, d, generator=g)), _normalize_(torch.randn(k, d, generator=g))
        if kind.cluster:
            centre = _normalize_(torch.randn(math.ceil(k / kind.cluster), d, generator=g))
            centre = centre.repeat_interleave(kind.cluster, dim=0)[:k].mul_(CLUSTER_COS**0.5)
            w = (1 - CLUSTER_COS) ** 0.5
            img, txt = _normalize_(img.mul_(w).add_(centre)), _normalize_(txt.mul_(w).add_(centre))
        u = torch.randn(k, d, generator=g)
        u = _normalize_(u.sub_((u * img).sum(1, keepdim=True) * img))  # orthogonal to the image row
        near = u.mul_((1 - PAIR_COS**2) ** 0.5).add_(img, alpha=PAIR_COS)  # unit, cosine PAIR_COS to img
        image[rows], text[rows] = img, torch.where(paired[rows, None], near, txt)
    return image, text


def _inputs(n: int, d: int, device: str, dtype: torch.dtype, kind: str = "random") -> dict[str, torch.Tensor]:
    """Student (a, b), teacher (ta, tb) embeddings and the scalars for one input kind."""
    spec = INPUT_KINDS[kind]
    g = torch.Generator().manual_seed(0)
    a, b = _pair(n, d, spec, g)
    ta, tb = _pair(n, d, spec, g)

    def put(x: torch.Tensor, grad: bool) -> torch.Tensor:
        return x.to(device=device, dtype=dtype).requires_grad_(grad)

    return {
        "a": put(a, True),
        "b": put(b, True),
        "ta": put(ta, False),
        "tb": put(tb, False),
        "scale": torch.tensor(spec.scale, device=device, requires_grad=True),
        "bias": torch.tensor(-10.0, device=device, requires_grad=True),
        "tscale": torch.tensor(spec.teacher_scale, device=device),
    }


def _loss_fn(case: str, x: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    from distill import cuda_ext

    op, impl = CASES[case]
    a, b, ta, tb, s, c, ts = x["a"], x["b"], x["ta"], x["tb"], x["scale"], x["bias"], x["tscale"]
    if impl == "open_clip":
        from open_clip.loss import ClipLoss, DistillClipLoss, SigLipLoss

        return {
            "infonce": lambda: ClipLoss()(a, b, s),
            "siglip": lambda: SigLipLoss()(a, b, s, c),
            "kd": lambda: sum(DistillClipLoss()(a, b, s, ta, tb, ts)),
        }[op]
    return {
        "infonce": lambda: cuda_ext.infonce_loss(a, b, s, backend=impl),
        "siglip": lambda: cuda_ext.siglip_loss(a, b, s, c, backend=impl),
        "kd": lambda: cuda_ext.kd_loss(a, b, ta, tb, s, ts, kind="ce", contrastive_weight=1.0, backend=impl),
    }[op]


def _step(fn: Callable[[], torch.Tensor], x: dict[str, torch.Tensor]) -> None:
    fn().backward()
    for t in x.values():
        t.grad = None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")


def _loss_and_grads(fn: Callable[[], torch.Tensor], x: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    leaves = [t for t in x.values() if t.requires_grad]
    loss = fn()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.item(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def _errors(n: int, cases: list[str], x: dict[str, torch.Tensor], fp64_reference_max_n: int) -> dict[str, dict]:
    """fp32 loss and gradient relative errors of each case against one fp64 run per op."""
    x64 = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in x.items()}
    ref_impl = "reference" if n <= fp64_reference_max_n else "tiled"
    out: dict[str, dict] = {}
    for op in dict.fromkeys(CASES[c][0] for c in cases):
        ref_loss, ref_grads = _loss_and_grads(_loss_fn(f"{op}/{ref_impl}", x64), x64)
        for case in (c for c in cases if CASES[c][0] == op):
            loss, grads = _loss_and_grads(_loss_fn(case, x), x)
            grad_err = max(
                ((g.double() - r).norm() / r.norm().clamp_min(1e-300)).item()
                for g, r in zip(grads, ref_grads)
                if r.any()  # gradients the op does not produce (SigLIP's bias for the others) are skipped
            )
            out[case] = {
                "loss": loss,
                "loss_fp64": ref_loss,
                "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
                "grad_rel_err": grad_err,
                "fp64_reference": ref_impl,
            }
        del ref_grads
    return out


def _child_time(
    n: int, d: int, kind: str, cases: list[str], repeats: int, warmup: int, fp64_reference_max_n: int
) -> tuple[dict[str, list[float]], dict[str, dict]]:
    x = _inputs(n, d, "cpu", torch.float32, kind)
    fns = {case: _loss_fn(case, x) for case in cases}
    times: dict[str, list[float]] = {case: [] for case in cases}
    for r in range(warmup + repeats):
        for case, fn in fns.items():  # interleaved: every case sees the same load drift
            gc.collect()
            t0 = time.perf_counter()
            _step(fn, x)
            if r >= warmup:
                times[case].append(time.perf_counter() - t0)
    return times, _errors(n, cases, x, fp64_reference_max_n)


def _child_memory(n: int, d: int, case: str, kind: str = "random") -> dict[str, float]:
    # One tiny call first so one-off library set-up (thread pools, kernels) is not counted.
    small = _inputs(64, d, "cpu", torch.float32, kind)
    _step(_loss_fn(case, small), small)
    del small
    x = _inputs(n, d, "cpu", torch.float32, kind)
    fn = _loss_fn(case, x)
    gc.collect()
    base = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    t0 = time.perf_counter()
    _step(fn, x)
    return {"peak_extra_mb": (_hwm_bytes() - base) / 2**20, "single_run_s": time.perf_counter() - t0}


def _fresh(fn: Callable, *args):
    """Run fn(*args) in a fresh spawned interpreter and return its result."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        return pool.submit(fn, *args).result()


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_cpu(
    sizes: list[int],
    dim: int,
    repeats: int,
    big_n: int,
    backends: list[str],
    max_reference_n: int,
    only: list[str] | None = None,
    kinds: list[str] | None = None,
    fp64_reference_max_n: int = 4096,
) -> list[dict]:
    cases = [
        c for c, (_, impl) in CASES.items() if (impl == "open_clip" or impl in backends) and (not only or c in only)
    ]
    rows: list[dict] = []
    last_peak: dict[tuple[str, str], tuple[int, float]] = {}
    for n in tqdm(sizes, desc="CPU sizes"):
        for kind in kinds or ["random"]:
            head = {"n": n, "d": dim, "input": kind, "logit_scale": INPUT_KINDS[kind].scale}
            # Generous margin: the machine is shared and a case's peak adds to what others use.
            mem_cap = 0.45 * _mem_available()
            runnable = []
            for case in cases:
                if CASES[case][1] == "reference" and n > max_reference_n:
                    continue  # the plain formula costs what open_clip costs (see smaller N); saves minutes
                prev = last_peak.get((kind, case))
                predicted = prev[1] * (n / prev[0]) ** 2 * 2**20 if prev else 0.0
                if predicted > mem_cap:
                    skipped = f"predicted peak {predicted / 2**30:.1f} GiB > 45% of MemAvailable "
                    rows.append({**head, "case": case, "skipped": skipped + f"{mem_cap / 0.45 / 2**30:.1f} GiB"})
                else:
                    runnable.append(case)
            times, errors = _fresh(
                _child_time, n, dim, kind, runnable, repeats, 1 if n <= 4096 else 0, fp64_reference_max_n
            )
            for case in tqdm(runnable, desc=f"memory N={n} {kind}", leave=False):
                mem = _fresh(_child_memory, n, dim, case, kind)
                last_peak[(kind, case)] = (n, mem["peak_extra_mb"])
                op, impl = CASES[case]
                rows.append(
                    {
                        **head,
                        "case": case,
                        "op": op,
                        "impl": impl,
                        "times_s": times[case],
                        "median_s": statistics.median(times[case]),
                        **mem,
                        **errors[case],
                    }
                )
    if big_n:
        mem = _fresh(_child_memory, big_n, dim, "infonce/tiled")
        rows.append(
            {
                "n": big_n,
                "d": dim,
                "input": "random",
                "logit_scale": INPUT_KINDS["random"].scale,
                "case": "infonce/tiled",
                "op": "infonce",
                "impl": "tiled",
                "median_s": mem["single_run_s"],
                "times_s": [mem["single_run_s"]],
                **mem,
            }
        )
    return rows


def _cuda_time(fn: Callable[[], None], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def run_cuda(sizes: list[int], dims: list[int], repeats: int, kinds: list[str]) -> list[dict]:
    from distill import cuda_ext

    cuda_ext.load_cuda()
    rows = []
    cases = [c for c, (_, impl) in CASES.items() if impl in ("open_clip", "cuda")]
    for d in dims:
        for n, kind in tqdm([(n, k) for n in sizes for k in kinds], desc=f"CUDA D={d}"):
            head = {"n": n, "d": d, "input": kind, "logit_scale": INPUT_KINDS[kind].scale}
            x = _inputs(n, d, "cuda", torch.bfloat16, kind)
            gemm = _cuda_time(lambda: torch.mm(x["a"].detach(), x["b"].detach().T), repeats)
            for case in cases:
                op, impl = CASES[case]
                fn = _loss_fn(case, x)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                try:
                    t = _cuda_time(lambda: _step(fn, x), repeats)
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                except torch.OutOfMemoryError:
                    rows.append({**head, "case": case, "skipped": "CUDA out of memory"})
                    torch.cuda.empty_cache()
                    continue
                rows.append(
                    {
                        **head,
                        "case": case,
                        "op": op,
                        "impl": impl,
                        "median_s": t,
                        "peak_extra_mb": peak,
                        "roofline_s": GEMM_PASSES[op] * gemm,
                        "gemm_s": gemm,
                    }
                )
            del x
            torch.cuda.empty_cache()
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """Per row: time and memory over its op's open_clip case (same N, D, input) and open_clip's fp32 errors."""
    base = {(r["n"], r["d"], r["input"], r["op"]): r for r in rows if r.get("impl") == "open_clip"}
    for r in rows:
        ref = base.get((r["n"], r["d"], r["input"], r.get("op")))
        if ref is not None and "median_s" in r:
            r["time_ratio_vs_open_clip"] = r["median_s"] / ref["median_s"]
            r["memory_ratio_vs_open_clip"] = r["peak_extra_mb"] / max(ref["peak_extra_mb"], 1e-9)
            for key in ("loss_rel_err", "grad_rel_err"):
                if key in ref:
                    r[f"open_clip_{key}"] = ref[key]


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _print_table(rows: list[dict]) -> None:
    print(
        f"{'N':>6} {'D':>4} {'input':<14} {'case':<18} {'median s':>9} {'x oc':>6} {'peak MiB':>9} {'x oc':>6} "
        f"{'loss err':>9} {'grad err':>9}"
    )
    for r in rows:
        start = f"{r['n']:>6} {r['d']:>4} {r.get('input', ''):<14} {r['case']:<18}"
        if "skipped" in r:
            print(f"{start} skipped: {r['skipped']}")
            continue
        print(
            f"{start} {r['median_s']:>9.3f} {_fmt(r.get('time_ratio_vs_open_clip'), '.2f'):>6} "
            f"{r['peak_extra_mb']:>9.0f} {_fmt(r.get('memory_ratio_vs_open_clip'), '.3f'):>6} "
            f"{_fmt(r.get('loss_rel_err'), '.1e'):>9} {_fmt(r.get('grad_rel_err'), '.1e'):>9}"
        )


def _summary(rows: list[dict]) -> list[dict]:
    """One line per (N, input, op) with an engine backend: ratios to open_clip and both fp32 errors."""
    keep = ("time_ratio_vs_open_clip", "memory_ratio_vs_open_clip", "loss_rel_err", "open_clip_loss_rel_err")
    keep += ("grad_rel_err", "open_clip_grad_rel_err")
    return [
        {"n": r["n"], "input": r["input"], "case": r["case"], **{k: r[k] for k in keep if k in r}}
        for r in rows
        if r.get("impl") in ("tiled", "cuda") and "time_ratio_vs_open_clip" in r
    ]


def _print_summary(summary: list[dict]) -> None:
    print(f"\n{'N':>6} {'input':<14} {'engine case':<14} {'time x oc':>9} {'mem x oc':>8} {'loss err / oc':>19}")
    for s in summary:
        errs = f"{_fmt(s.get('loss_rel_err'), '.1e')} / {_fmt(s.get('open_clip_loss_rel_err'), '.1e')}"
        print(
            f"{s['n']:>6} {s['input']:<14} {s['case']:<14} {s['time_ratio_vs_open_clip']:>9.2f} "
            f"{s['memory_ratio_vs_open_clip']:>8.3f} {errs:>19}"
        )


def main(
    device: str = "cpu",
    sizes: list[int] | None = None,
    dim: int = 512,
    dims: list[int] | None = None,
    repeats: int = 3,
    big_n: int = 0,
    backends: list[str] | None = None,
    max_reference_n: int = 8192,
    cases: list[str] | None = None,
    kinds: list[str] | None = None,
    fp64_reference_max_n: int = 4096,
    out: str = "benchmarks/results/similarity_cpu.json",
) -> None:
    """Benchmark the similarity ops against open_clip's losses and save JSON.

    Args:
        device: ``cpu`` (fp32 grid) or ``cuda`` (bf16 grid with the cuBLAS roofline).
        sizes: batch sizes N (default CPU 4k, 8k; CUDA 8k, 16k, 32k, 65k).
        dim: embedding width D on CPU.
        dims: widths on CUDA (default 512 and 768).
        repeats: timed repeats per case (the median is reported).
        big_n: CPU only: one tiled InfoNCE run at this N (random inputs) to show it fits (0: none).
        backends: CPU engine backends to run (default reference and tiled).
        max_reference_n: CPU only: largest N for the reference backend (its cost tracks open_clip's).
        cases: CPU only: run just these case names (keys of ``CASES``); default all.
        kinds: input kinds (keys of ``INPUT_KINDS``: random, clip_init, trained, hard_negatives);
            default all on CPU, random and trained on CUDA.
        fp64_reference_max_n: CPU only: largest N whose fp64 reference is the plain formula (tiled above).
        out: JSON output path.
    """
    for name, values, valid in (("kinds", kinds, INPUT_KINDS), ("cases", cases, CASES)):
        unknown = [v for v in values or () if v not in valid]
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; valid: {list(valid)}")
    if device == "cuda":
        rows = run_cuda(
            sizes or [8192, 16384, 32768, 65536], dims or [512, 768], repeats, kinds or ["random", "trained"]
        )
    else:
        rows = run_cpu(
            sizes or [4096, 8192],
            dim,
            repeats,
            big_n,
            backends or ["reference", "tiled"],
            max_reference_n,
            cases,
            kinds or list(INPUT_KINDS),
            fp64_reference_max_n,
        )
    _add_ratios(rows)
    _print_table(rows)
    summary = _summary(rows)
    _print_summary(summary)
    meta = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_avg_at_end": os.getloadavg(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "input_kinds": {k: vars(v) for k, v in INPUT_KINDS.items()},
        "pair_cos": PAIR_COS,
        "cluster_cos": CLUSTER_COS,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    tmp.replace(out)  # atomic: a crash never leaves half a results file
    print(f"saved {out}")


if __name__ == "__main__":
    CLI(main)
