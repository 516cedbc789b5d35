"""One-call GPU check of the similarity engine: build, fp64 correctness of every CUDA backend, bf16 grid.

Meant for a machine with a CUDA device (budget: under 8 minutes on one H100/H200), from the repo root:

    python benchmarks/gpu_similarity_check.py      # writes benchmarks/results/similarity_gpu_check.json

Steps: (1) build the ``cuda`` and ``cuda_fused`` extensions; (2) correctness: every op on both CUDA
backends in fp64, fp32 and bf16 (InfoNCE also on ragged shapes with an offset and on trained-like
inputs at scale 100), loss and gradients against the fp64 reference on the CPU computed from the same
rounded inputs, plus gradcheck/opcheck of the fused InfoNCE ops; (3) ``auto`` vs eager below N=4096;
(4) the bf16 forward+backward grid N = 4,096..65,536, D = 512/768: open_clip ClipLoss, ``cuda``
(blocked, cuBLAS), ``cuda_fused``, and the cuBLAS GEMM floor (the GEMMs alone: S = A B^T, dS B,
dS^T A; ``gemm4`` adds the second S sweep that O(N + M) memory needs), time and peak memory.

The fused kernels run here although ``cuda_ext._build.FUSED_VERIFIED`` is False: this run is their
verification. When it reports ``correctness: OK``, set ``FUSED_VERIFIED = True`` in cuda_ext/_build.py.
Works without ``pip install -e .`` and without open_clip (no eager column then). Exit status: 0 all
checks passed, 1 a check failed, 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CUDA_BACKENDS = ("cuda", "cuda_fused")
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _import_engine():
    try:
        return importlib.import_module("distill.cuda_ext")
    except ImportError:
        sys.path.insert(0, str(ROOT))
        engine = importlib.import_module("cuda_ext")
        sys.modules["distill.cuda_ext"] = engine
        return engine


def _unit(n: int, d: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64, device=device), dim=1)


def _trained_pair(n: int, d: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) image/text rows whose first half are positives at cosine 0.9 (a trained model's), rest random."""
    a, noise, other = _unit(n, d, seed, device), _unit(n, d, seed + 1, device), _unit(n, d, seed + 2, device)
    noise = F.normalize(noise - (noise * a).sum(1, keepdim=True) * a, dim=1)  # orthogonal to a
    b = other.clone()
    half = n // 2
    b[:half] = 0.9 * a[:half] + math.sqrt(1 - 0.81) * noise[:half]
    return a, b


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    return ((x - y).norm() / y.norm().clamp_min(1e-300)).item()


def _correctness_cases(ce) -> dict:
    """name -> (fn(a, b, s, c, ta, tb, backend), number of differentiated inputs, inputs a, b, scale)."""
    a, b = _unit(2048, 512, 0), _unit(2048, 512, 1)
    ta, tb = _unit(2048, 384, 2), _unit(2048, 384, 3)
    ra, rb = _unit(1000, 200, 4), _unit(1100, 200, 5)
    tra, trb = _trained_pair(2048, 512, 6)
    infonce = lambda a, b, s, c, ta, tb, be: ce.infonce_loss(a, b, s, backend=be)
    return {
        "infonce": (infonce, 3, (a, b, 30.0, None, None)),
        "infonce_ragged_offset": (
            lambda a, b, s, c, ta, tb, be: ce.infonce_loss(
                a, b, s, offset=37, row_weight=0.3, col_weight=0.9, backend=be
            ),
            3,
            (ra, rb, 30.0, None, None),
        ),
        "infonce_trained_scale100": (infonce, 3, (tra, trb, 100.0, None, None)),
        "siglip": (lambda a, b, s, c, ta, tb, be: ce.siglip_loss(a, b, s, c, backend=be), 4, (a, b, 30.0, ta, tb)),
        "kd": (
            lambda a, b, s, c, ta, tb, be: ce.kd_loss(
                a, b, ta, tb, s, 50.0, kind="ce", contrastive_weight=1.0, backend=be
            ),
            3,
            (a, b, 30.0, ta, tb),
        ),
    }


def check_correctness(ce) -> dict:
    """Every op x CUDA backend x dtype: relative error of loss and gradients vs the fp64 CPU reference."""
    out: dict = {}
    for name, (fn, k, (a, b, scale, ta, tb)) in _correctness_cases(ce).items():
        for dtype, tol in TOL.items():
            # The reference sees the same rounded inputs, so only the backend's arithmetic is measured.
            xs = [t.to(dtype).double().requires_grad_() for t in (a, b)]
            tref = [None if t is None else t.to(dtype).double() for t in (ta, tb)]
            s64, c64 = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (scale, -10.0))
            ref = fn(*xs, s64, c64, *tref, "reference")
            ref_g = torch.autograd.grad(ref, [*xs, s64, c64][:k])
            for be in CUDA_BACKENDS:
                key = f"{name}/{be}/{str(dtype).split('.')[-1]}"
                try:
                    xd = [t.detach().to("cuda", dtype).requires_grad_() for t in (a, b)]
                    sdt = torch.float64 if dtype == torch.float64 else torch.float32
                    sd, cd = (torch.tensor(v, device="cuda", dtype=sdt, requires_grad=True) for v in (scale, -10.0))
                    tdev = [None if t is None else t.to("cuda", dtype) for t in (ta, tb)]
                    got = fn(*xd, sd, cd, *tdev, be)
                    got_g = torch.autograd.grad(got, [*xd, sd, cd][:k])
                    errs = {"loss": abs(got.item() - ref.item()) / abs(ref.item())}
                    errs.update({f"grad{i}": _rel(x, y) for i, (x, y) in enumerate(zip(got_g, ref_g))})
                    out[key] = {"rel_err": errs, "tol": tol, "ok": all(v <= tol for v in errs.values())}
                except Exception as err:
                    out[key] = {"error": f"{type(err).__name__}: {err}"[:500], "ok": False}
                mark = "ok" if out[key]["ok"] else "FAILED"
                print(f"  {key:48s} {mark:6s} {out[key].get('rel_err', out[key].get('error'))}", flush=True)
    return out


def check_fused_ops(ce) -> dict:
    """gradcheck (fp64, ragged, offset) and opcheck of distill_cuda_fused::infonce_fwd."""
    out: dict = {}
    a, b = (_unit(n, 4, i, "cpu").cuda().requires_grad_() for i, n in enumerate((70, 139)))
    s = torch.tensor(7.0, dtype=torch.float64, device="cuda", requires_grad=True)
    checks = {
        "gradcheck": lambda: torch.autograd.gradcheck(
            lambda a, b, s: ce.infonce_loss(a, b, s, offset=2, backend="cuda_fused"), (a, b, s)
        ),
        "opcheck_fwd": lambda: torch.library.opcheck(
            torch.ops.distill_cuda_fused.infonce_fwd, (a, b, s, 2, 0.5, 0.5, 0)
        ),
    }
    for name, fn in checks.items():
        try:
            res = fn()
            out[name] = {"ok": True, "result": str(res)[:300]}
        except Exception as err:
            out[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
        print(f"  fused {name:42s} {'ok' if out[name]['ok'] else 'FAILED ' + out[name]['error']}", flush=True)
    return out


def _time(fn, budget_s: float) -> tuple[float, object]:
    """Median ms of fn after one warm-up (up to 10 reps within about budget_s / 4) and fn's last result."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    reps = int(min(10, budget_s / 4 / max(first, 1e-6)))
    if reps < 2:
        return first * 1e3, result
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], result


def bf16_grid(ce, sizes: list[int], dims: list[int], deadline: float, cell_s: float) -> list[dict]:
    """Forward + backward time (ms) and peak memory (GiB) per method on trained-like bf16 inputs at scale 100."""
    try:
        from open_clip.loss import ClipLoss
    except ImportError:
        ClipLoss = None
    rows, too_slow = [], set()
    for d in dims:
        for n in sizes:
            a64, b64 = _trained_pair(n, d, 0, "cuda")
            a, b = (t.to(torch.bfloat16).requires_grad_() for t in (a64, b64))
            del a64, b64
            s = torch.tensor(100.0, device="cuda", requires_grad=True)
            methods = {
                "open_clip": None if ClipLoss is None else (lambda: ClipLoss()(a, b, s)),
                "cuda": lambda: ce.infonce_loss(a, b, s, backend="cuda", check_finite=False),
                "cuda_fused": lambda: ce.infonce_loss(a, b, s, backend="cuda_fused", check_finite=False),
            }
            row: dict = {"n": n, "d": d}
            for name, loss_fn in methods.items():
                if loss_fn is None:
                    continue
                if time.perf_counter() > deadline or name in too_slow:
                    row[f"{name}_ms"] = "skipped (time budget)" if name not in too_slow else "skipped (too slow)"
                    continue

                def step(loss_fn=loss_fn):
                    for t in (a, b, s):
                        t.grad = None
                    loss = loss_fn()
                    loss.backward()
                    return loss

                row.update(_measure(name, step, cell_s))
                if isinstance(row[f"{name}_ms"], float) and row[f"{name}_ms"] > 1e3 * cell_s / 2:
                    too_slow.add(name)  # larger N would take too long for this method
                for t in (a, b, s):
                    t.grad = None
            if time.perf_counter() < deadline:
                x, y = a.detach(), b.detach()

                def gemm1():
                    return x @ y.T

                def gemm3():
                    g = x @ y.T
                    return g @ y, g.T @ x

                row.update(_measure("gemm1", gemm1, cell_s, loss=False))
                row.update(_measure("gemm3", gemm3, cell_s, loss=False))
                if isinstance(row.get("gemm1_ms"), float) and isinstance(row.get("gemm3_ms"), float):
                    row["gemm4_ms"] = row["gemm1_ms"] + row["gemm3_ms"]
            rows.append(row)
            print("  " + _fmt_row(row), flush=True)
            del a, b, s
            torch.cuda.empty_cache()
    return rows


def _measure(name: str, fn, cell_s: float, loss: bool = True) -> dict:
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        ms, result = _time(fn, cell_s)
        res = {f"{name}_ms": ms, f"{name}_peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
        if loss:
            res[f"{name}_loss"] = float(result.item())
        return res
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {f"{name}_ms": "oom"}
    except Exception as err:
        torch.cuda.empty_cache()
        return {f"{name}_ms": f"error: {type(err).__name__}: {err}"[:300]}


def _fmt(v) -> str:
    return f"{v:9.2f}" if isinstance(v, float) else f"{str(v)[:9]:>9s}"


COLUMNS = ("open_clip_ms", "cuda_ms", "cuda_fused_ms", "gemm3_ms", "gemm4_ms")


def _fmt_row(row: dict) -> str:
    cells = " ".join(_fmt(row.get(c, "-")) for c in COLUMNS)
    mem = " ".join(_fmt(row.get(c.replace("_ms", "_peak_gib"), "-")) for c in COLUMNS[:3])
    return f"{row['n']:6d} {row['d']:4d} {cells} | {mem}"


def small_n_vs_eager(ce, sizes=(1024, 2048, 4096), d: int = 512) -> list[dict]:
    """``auto`` must be no slower than the eager formula below N=4096 (it may pick reference there)."""
    rows = []
    for n in sizes:
        a, b = (_unit(n, d, i, "cuda").to(torch.bfloat16).requires_grad_() for i in range(2))
        s = torch.tensor(30.0, device="cuda", requires_grad=True)
        res = {"n": n, "auto_picks": ce.resolve_backend("auto", a, n, n)}
        for be in ("reference", "cuda", "auto"):
            res[f"{be}_ms"] = _time(lambda be=be: ce.infonce_loss(a, b, s, backend=be).backward(), 1.0)[0]
        rows.append(res)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "similarity_gpu_check.json"))
    parser.add_argument("--sizes", default="4096,8192,16384,32768,65536", help="grid N values (comma-separated)")
    parser.add_argument("--dims", default="512,768", help="grid D values")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip grid cells after this many seconds")
    parser.add_argument("--cell-s", type=float, default=8.0, help="timing budget per method and grid cell")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_similarity_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine")
        return 2
    start = time.perf_counter()
    ce = _import_engine()
    build = importlib.import_module(ce.__name__ + "._build")
    build.FUSED_VERIFIED = True  # this run is the verification of the fused kernels
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for label, fn in (("build_cuda_s", build.build_cuda), ("build_cuda_fused_s", build.build_cuda_fused)):
        t0 = time.perf_counter()
        try:
            fn()
            report[label] = time.perf_counter() - t0
        except Exception as err:
            report[label] = f"failed: {err}"[:2000]
    print(
        f"{report['device']}: built cuda {_fmt(report['build_cuda_s'])} s, fused {_fmt(report['build_cuda_fused_s'])} s"
    )
    if not (build.cuda_is_loaded() and build.fused_cuda_is_loaded()):
        print(json.dumps(report, indent=1))
        _write(args.out, report)
        return 1
    print("correctness vs the fp64 reference (relative errors):", flush=True)
    report["correctness"] = check_correctness(ce)
    report["fused_ops"] = check_fused_ops(ce)
    report["small_n_vs_eager"] = small_n_vs_eager(ce)
    print(json.dumps(report["small_n_vs_eager"]), flush=True)
    _write(args.out, report)
    print("bf16 forward+backward, trained-like inputs at scale 100 (ms | peak GiB):")
    print(f"{'N':>6s} {'D':>4s} " + " ".join(f"{c[:-3][:9]:>9s}" for c in COLUMNS) + " | open_clip cuda fused")
    sizes, dims = ([int(v) for v in s.split(",")] for s in (args.sizes, args.dims))
    report["bf16_grid"] = bf16_grid(ce, sizes, dims, start + args.budget_s, args.cell_s)
    ok = all(v["ok"] for part in ("correctness", "fused_ops") for v in report[part].values())
    report["ok"] = ok
    report["total_s"] = time.perf_counter() - start
    _write(args.out, report)
    print(f"wrote {args.out} in {report['total_s']:.0f} s")
    print("correctness:", "OK (set FUSED_VERIFIED = True in cuda_ext/_build.py)" if ok else "FAILED")
    return 0 if ok else 1


def _write(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
