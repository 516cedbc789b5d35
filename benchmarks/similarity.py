"""Similarity engine benchmark: forward+backward time and peak extra memory vs open_clip.

For each N: open_clip's ``ClipLoss``, ``SigLipLoss``, ``DistillClipLoss`` and the engine's
``infonce_loss``, ``siglip_loss``, ``kd_loss`` (``kind="ce", contrastive_weight=1``: the same
value as ``sum(DistillClipLoss(...))``) on each backend, at D=512, fp32, L2-normalised inputs.

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

    python benchmarks/similarity.py --out benchmarks/results/similarity_cpu.json
    python benchmarks/similarity.py --device cuda --out benchmarks/results/similarity_gpu.json
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
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


def _inputs(n: int, d: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def unit(grad: bool) -> torch.Tensor:
        # Normalise in place: no N x D temporaries that would raise the peak before the call.
        x = torch.randn(n, d, generator=g)
        x.div_(x.norm(dim=1, keepdim=True))
        return x.to(device=device, dtype=dtype).requires_grad_(grad)

    return {
        "a": unit(True),
        "b": unit(True),
        "ta": unit(False),
        "tb": unit(False),
        "scale": torch.tensor(30.0, device=device, requires_grad=True),
        "bias": torch.tensor(-10.0, device=device, requires_grad=True),
        "tscale": torch.tensor(50.0, device=device),
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


def _child_time(n: int, d: int, cases: list[str], repeats: int, warmup: int) -> dict[str, list[float]]:
    x = _inputs(n, d, "cpu", torch.float32)
    fns = {case: _loss_fn(case, x) for case in cases}
    times: dict[str, list[float]] = {case: [] for case in cases}
    for r in range(warmup + repeats):
        for case, fn in fns.items():  # interleaved: every case sees the same load drift
            gc.collect()
            t0 = time.perf_counter()
            _step(fn, x)
            if r >= warmup:
                times[case].append(time.perf_counter() - t0)
    return times


def _child_memory(n: int, d: int, case: str) -> dict[str, float]:
    # One tiny call first so one-off library set-up (thread pools, kernels) is not counted.
    small = _inputs(64, d, "cpu", torch.float32)
    _step(_loss_fn(case, small), small)
    del small
    x = _inputs(n, d, "cpu", torch.float32)
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
) -> list[dict]:
    cases = [
        c for c, (_, impl) in CASES.items() if (impl == "open_clip" or impl in backends) and (not only or c in only)
    ]
    rows: list[dict] = []
    last_peak: dict[str, tuple[int, float]] = {}
    for n in tqdm(sizes, desc="CPU sizes"):
        # Generous margin: the machine is shared and a case's peak adds to what others use.
        mem_cap = 0.45 * _mem_available()
        runnable = []
        for case in cases:
            if CASES[case][1] == "reference" and n > max_reference_n:
                continue  # the plain formula costs what open_clip costs (see smaller N); saves minutes
            prev = last_peak.get(case)
            predicted = prev[1] * (n / prev[0]) ** 2 * 2**20 if prev else 0.0
            if predicted > mem_cap:
                rows.append(
                    {
                        "n": n,
                        "d": dim,
                        "case": case,
                        "skipped": f"predicted peak {predicted / 2**30:.1f} GiB "
                        f"> 45% of MemAvailable {mem_cap / 0.45 / 2**30:.1f} GiB",
                    }
                )
            else:
                runnable.append(case)
        times = _fresh(_child_time, n, dim, runnable, repeats, 1 if n <= 4096 else 0)
        for case in tqdm(runnable, desc=f"memory N={n}", leave=False):
            mem = _fresh(_child_memory, n, dim, case)
            last_peak[case] = (n, mem["peak_extra_mb"])
            op, impl = CASES[case]
            rows.append(
                {
                    "n": n,
                    "d": dim,
                    "case": case,
                    "op": op,
                    "impl": impl,
                    "times_s": times[case],
                    "median_s": statistics.median(times[case]),
                    **mem,
                }
            )
    if big_n:
        mem = _fresh(_child_memory, big_n, dim, "infonce/tiled")
        rows.append(
            {
                "n": big_n,
                "d": dim,
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


def run_cuda(sizes: list[int], dims: list[int], repeats: int) -> list[dict]:
    from distill import cuda_ext

    cuda_ext.load_cuda()
    rows = []
    cases = [c for c, (_, impl) in CASES.items() if impl in ("open_clip", "cuda")]
    for d in dims:
        for n in tqdm(sizes, desc=f"CUDA D={d}"):
            x = _inputs(n, d, "cuda", torch.bfloat16)
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
                    rows.append({"n": n, "d": d, "case": case, "skipped": "CUDA out of memory"})
                    torch.cuda.empty_cache()
                    continue
                rows.append(
                    {
                        "n": n,
                        "d": d,
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
    base = {(r["n"], r["d"], r["op"]): r for r in rows if r.get("impl") == "open_clip"}
    for r in rows:
        ref = base.get((r["n"], r["d"], r.get("op")))
        if ref is not None and "median_s" in r:
            r["time_ratio_vs_open_clip"] = r["median_s"] / ref["median_s"]
            r["memory_ratio_vs_open_clip"] = r["peak_extra_mb"] / max(ref["peak_extra_mb"], 1e-9)


def _print_table(rows: list[dict]) -> None:
    print(f"{'N':>6} {'D':>4} {'case':<18} {'median s':>9} {'x open_clip':>11} {'peak MiB':>9} {'x open_clip':>11}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['n']:>6} {r['d']:>4} {r['case']:<18} skipped: {r['skipped']}")
            continue
        tr, mr = r.get("time_ratio_vs_open_clip"), r.get("memory_ratio_vs_open_clip")
        print(
            f"{r['n']:>6} {r['d']:>4} {r['case']:<18} {r['median_s']:>9.3f} "
            f"{'' if tr is None else f'{tr:.2f}':>11} {r['peak_extra_mb']:>9.0f} "
            f"{'' if mr is None else f'{mr:.3f}':>11}"
        )


def main(
    device: str = "cpu",
    sizes: list[int] | None = None,
    dim: int = 512,
    dims: list[int] | None = None,
    repeats: int = 3,
    big_n: int = 65536,
    backends: list[str] | None = None,
    max_reference_n: int = 8192,
    cases: list[str] | None = None,
    out: str = "benchmarks/results/similarity_cpu.json",
) -> None:
    """Benchmark the similarity ops against open_clip's losses and save JSON.

    Args:
        device: ``cpu`` (fp32 grid) or ``cuda`` (bf16 grid with the cuBLAS roofline).
        sizes: batch sizes N (default CPU 1k, 4k, 8k, 16k; CUDA 8k, 16k, 32k, 65k).
        dim: embedding width D on CPU.
        dims: widths on CUDA (default 512 and 768).
        repeats: timed repeats per case (the median is reported).
        big_n: CPU only: one tiled InfoNCE run at this N to show it fits (0 to skip).
        backends: CPU engine backends to run (default reference and tiled).
        max_reference_n: CPU only: largest N for the reference backend (its cost tracks open_clip's).
        cases: CPU only: run just these case names (keys of ``CASES``); default all.
        out: JSON output path.
    """
    if device == "cuda":
        rows = run_cuda(sizes or [8192, 16384, 32768, 65536], dims or [512, 768], repeats)
    else:
        rows = run_cpu(
            sizes or [1024, 4096, 8192, 16384],
            dim,
            repeats,
            big_n,
            backends or ["reference", "tiled"],
            max_reference_n,
            cases,
        )
    _add_ratios(rows)
    _print_table(rows)
    meta = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_avg_at_end": os.getloadavg(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(out)  # atomic: a crash never leaves half a results file
    print(f"saved {out}")


if __name__ == "__main__":
    CLI(main)
