"""One-call GPU check of the similarity engine: build, correctness at N=2048 vs fp64, GPU grid.

Meant for a machine with a CUDA device (budget: under 8 minutes on an H100), from the repo root:

    python benchmarks/gpu_similarity_check.py            # writes benchmarks/results/similarity_gpu*.json

Works without ``pip install -e .`` (it maps ``cuda_ext/`` to ``distill.cuda_ext`` itself) and
without open_clip (then the grid has no eager baselines). Exit status 1 if a check fails.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _import_engine():
    try:
        return importlib.import_module("distill.cuda_ext")
    except ImportError:
        sys.path.insert(0, str(ROOT))
        engine = importlib.import_module("cuda_ext")
        sys.modules["distill.cuda_ext"] = engine  # what benchmarks/similarity.py imports
        return engine


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double().cpu() - y.double().cpu()).norm() / y.double().cpu().norm()).item()


def check_correctness(ce, n: int = 2048, d: int = 512) -> dict:
    """Every op on the cuda backend (fp32 and bf16) against the fp64 reference on the CPU."""
    a, b, ta, tb = (_unit(n, d, i) for i in range(4))
    ops = {
        "infonce": lambda a, b, s, c, be, ta, tb: ce.infonce_loss(a, b, s, offset=0, backend=be),
        "siglip": lambda a, b, s, c, be, ta, tb: ce.siglip_loss(a, b, s, c, backend=be),
        "kd": lambda a, b, s, c, be, ta, tb: ce.kd_loss(
            a, b, ta, tb, s, 50.0, kind="ce", contrastive_weight=1.0, backend=be
        ),
    }
    out: dict = {}
    for name, fn in ops.items():
        x64 = [t.clone().requires_grad_() for t in (a, b)]
        s64, c64 = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (30.0, -10.0))
        ref = fn(*x64, s64, c64, "reference", ta, tb)
        ref_g = torch.autograd.grad(ref, [*x64, s64])
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            xd = [t.to("cuda", dtype).requires_grad_() for t in (a, b)]
            sd, cd = (torch.tensor(v, device="cuda", requires_grad=True) for v in (30.0, -10.0))
            got = fn(*xd, sd, cd, "cuda", ta.to("cuda", dtype), tb.to("cuda", dtype))
            got_g = torch.autograd.grad(got, [*xd, sd])
            errs = {
                "loss": abs(got.item() - ref.item()) / abs(ref.item()),
                **{f"grad{i}": _rel(x, y) for i, (x, y) in enumerate(zip(got_g, ref_g))},
            }
            out[f"{name}/{str(dtype).split('.')[-1]}"] = {
                "rel_err": errs,
                "tol": tol,
                "ok": all(v <= tol for v in errs.values()),
            }
    return out


def small_n_vs_eager(ce, sizes=(1024, 2048, 4096), d: int = 512) -> list[dict]:
    """``auto`` must be no slower than the eager formula below N=4096 (it may pick reference there)."""
    rows = []
    for n in sizes:
        a, b = (_unit(n, d, i).to("cuda", torch.bfloat16).requires_grad_() for i in range(2))
        s = torch.tensor(30.0, device="cuda", requires_grad=True)
        res = {"n": n, "auto_picks": ce.resolve_backend("auto", a, n, n)}
        for be in ("reference", "cuda", "auto"):
            fn = lambda: ce.infonce_loss(a, b, s, backend=be).backward()
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            res[f"{be}_ms"] = (time.perf_counter() - t0) / 10 * 1e3
        rows.append(res)
    return rows


def main() -> int:
    assert torch.cuda.is_available(), "this script needs a CUDA device"
    ce = _import_engine()
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    t0 = time.perf_counter()
    ce.build_cuda(verbose=False)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "build_s": time.perf_counter() - t0}
    print(f"built in {report['build_s']:.0f} s on {report['device']}", flush=True)
    report["correctness_n2048"] = check_correctness(ce)
    print(json.dumps(report["correctness_n2048"], indent=1), flush=True)
    report["small_n_vs_eager"] = small_n_vs_eager(ce)
    print(json.dumps(report["small_n_vs_eager"], indent=1), flush=True)
    (out_dir / "similarity_gpu_check.json").write_text(json.dumps(report, indent=1))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench = importlib.import_module("similarity")
    try:
        importlib.import_module("open_clip")
    except ImportError:  # no eager baselines available: keep the engine and roofline rows
        bench.CASES = {k: v for k, v in bench.CASES.items() if v[1] != "open_clip"}
    bench.main(device="cuda", out=str(out_dir / "similarity_gpu.json"))
    ok = all(v["ok"] for v in report["correctness_n2048"].values())
    print("correctness:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
