"""Data-parallel losses (distill.cuda_ext.distributed): 2 gloo processes vs one process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distill.cuda_ext import reference
from distill.cuda_ext.distributed import distributed_infonce_loss, distributed_kd_loss, distributed_siglip_loss

ROWS = (5, 7)  # image rows per rank (uneven on purpose)
UNPAIRED_COLS = (6, 4)  # text rows per rank in the KD case with N != M
DTYPES = (torch.float32, torch.float64)
# case -> (text rows per rank, keyword arguments); every case runs with block_rows=3 (several blocks per rank).
CASES = {
    "infonce": (ROWS, {"row_weight": 0.3, "col_weight": 0.7}),
    "infonce_global": (ROWS, {"scalar_grads": "global"}),
    "infonce_scale100": (ROWS, {}),
    "siglip": (ROWS, {}),
    "kd_kl_contrastive": (ROWS, {"contrastive_weight": 0.5, "row_weight": 0.4, "col_weight": 0.6}),
    "kd_ce_unpaired": (UNPAIRED_COLS, {"kind": "ce"}),
}


def _batch(case: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The global batch of a case: a (N, 16), b (M, 16), teacher ta (N, 12), tb (M, 12), scales, bias."""
    g = torch.Generator().manual_seed(sorted(CASES).index(case))
    n, m = sum(ROWS), sum(CASES[case][0])

    def unit(rows: int, d: int) -> torch.Tensor:
        return F.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64), dim=1).to(dtype)

    scale = 100.0 if case == "infonce_scale100" else 10.0
    return {
        "a": unit(n, 16),
        "b": unit(m, 16),
        "ta": unit(n, 12),
        "tb": unit(m, 12),
        "scale": torch.tensor(scale, dtype=dtype),
        "bias": torch.tensor(-3.0, dtype=dtype),
        "t_scale": torch.tensor(20.0, dtype=dtype),
    }


def _run(case: str, x: dict[str, torch.Tensor], distributed: bool) -> dict[str, torch.Tensor]:
    """Loss and gradients (a, b, scale[, bias]) of ``case`` on ``x``, by the distributed op or the reference."""
    x = {k: v.clone().requires_grad_(k in ("a", "b", "scale", "bias")) for k, v in x.items()}
    kw = dict(CASES[case][1])
    kind = case.split("_")[0]
    if kind == "infonce":
        if distributed:
            loss = distributed_infonce_loss(x["a"], x["b"], x["scale"], block_rows=3, **kw)
        else:
            loss = reference.infonce(
                x["a"], x["b"], x["scale"], 0, kw.get("row_weight", 0.5), kw.get("col_weight", 0.5)
            )
    elif kind == "siglip":
        if distributed:
            loss = distributed_siglip_loss(x["a"], x["b"], x["scale"], x["bias"], block_rows=3, **kw)
        else:
            loss = reference.siglip(x["a"], x["b"], x["scale"], x["bias"])
    else:
        args = (x["a"], x["b"], x["ta"], x["tb"], x["scale"], x["t_scale"])
        if distributed:
            loss = distributed_kd_loss(*args, block_rows=3, **kw)
        else:
            w = (kw.get("row_weight", 0.5), kw.get("col_weight", 0.5), kw.get("contrastive_weight", 0.0))
            loss = reference.kd(*args, *w, kw.get("kind", "kl"))
    names = ["a", "b", "scale"] + (["bias"] if kind == "siglip" else [])
    grads = torch.autograd.grad(loss, [x[k] for k in names])
    return {"loss": loss.detach(), **{k: gr for k, gr in zip(names, grads)}}


def _local(case: str, x: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """This rank's rows of the global batch."""
    cols = CASES[case][0]
    r0, c0 = sum(ROWS[:rank]), sum(cols[:rank])
    out = dict(x)
    for k in ("a", "ta"):
        out[k] = x[k][r0 : r0 + ROWS[rank]]
    for k in ("b", "tb"):
        out[k] = x[k][c0 : c0 + cols[rank]]
    return out


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    results: dict[str, object] = {}
    try:
        for dtype in DTYPES:
            for case in CASES:
                results[f"{case}/{dtype}"] = _run(case, _local(case, _batch(case, dtype), rank), distributed=True)
        # Bad input on one rank must raise on every rank (no rank left waiting in a collective).
        a = torch.randn(4, 16 if rank == 0 else 8)
        bad_nan = torch.randn(4, 16)
        bad_nan[0, 0] = float("nan") if rank == 1 else 0.0
        for name, args in (("width", (a, a)), ("nan", (bad_nan, torch.randn(4, 16)))):
            try:
                distributed_infonce_loss(*args, 10.0)
                results[f"error/{name}"] = ""
            except ValueError as err:
                results[f"error/{name}"] = str(err)
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, object]]:
    """Run every case once on 2 gloo processes; each rank's losses and gradients.

    The ranks run this file as a script: under pytest's importlib import mode a spawned child
    could not import the test module by name (``torch.multiprocessing.spawn`` pickles by name).
    """
    out = tmp_path_factory.mktemp("ranks")
    init = f"file://{out / 'rendezvous'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, __file__, str(rank), init, str(out)], env=env, stderr=subprocess.PIPE)
        for rank in range(2)
    ]
    try:
        errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, err) in enumerate(zip(procs, errors)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks, case, dtype):
    ref = _run(case, _batch(case, torch.float64), distributed=False)
    r0, r1 = (ranks[f"{case}/{dtype}"] for ranks in two_ranks)
    tol = _tol(dtype)
    assert r0["loss"].dtype == dtype
    assert torch.equal(r0["loss"], r1["loss"])  # every rank returns the same global loss
    torch.testing.assert_close(r0["loss"].double(), ref["loss"], **tol)
    # Each rank holds the gradient of its own rows: together they are the single-process gradient.
    for k in ("a", "b"):
        torch.testing.assert_close(torch.cat([r0[k], r1[k]]).double(), ref[k], **tol)
    for k in [k for k in ("scale", "bias") if k in ref]:
        if case == "infonce_global":
            for r in (r0, r1):
                torch.testing.assert_close(r[k].double(), ref[k], **tol)
        else:  # partial: shares that sum to the whole, as DDP's averaged parameter gradients expect
            torch.testing.assert_close((r0[k] + r1[k]).double(), ref[k], **tol)


def test_bad_input_on_one_rank_raises_on_every_rank(two_ranks):
    for ranks in two_ranks:
        assert "width D differs across ranks: [16, 8]" in ranks["error/width"]
        assert "image contains non-finite values (NaN or inf) on rank 1" in ranks["error/nan"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_single_process_equals_reference(case, dtype):
    assert not dist.is_initialized()
    ours, ref = _run(case, _batch(case, dtype), distributed=True), _run(case, _batch(case, torch.float64), False)
    tol = _tol(dtype) if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for k in ref:
        assert ours[k].dtype == dtype
        torch.testing.assert_close(ours[k].double(), ref[k], **tol)


def test_block_size_does_not_change_the_result():
    x = _batch("kd_kl_contrastive", torch.float64)
    args = (x["a"], x["b"], x["ta"], x["tb"], 10.0, 20.0)
    losses = [distributed_kd_loss(*args, contrastive_weight=1.0, block_rows=r) for r in (0, 1, 5, 100)]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=1e-14, atol=1e-14)


def test_errors_name_the_bad_input():
    a = torch.randn(5, 16)
    with pytest.raises(ValueError, match="image has 5 rows but text has 4: each rank must hold them row for row"):
        distributed_infonce_loss(a, torch.randn(4, 16), 10.0)
    with pytest.raises(ValueError, match="scalar_grads must be 'partial' or 'global'"):
        distributed_siglip_loss(a, a, 10.0, -3.0, scalar_grads="sum")
    with pytest.raises(ValueError, match="student_image has 5 rows but student_text has 4"):
        distributed_kd_loss(a, a[:4], a, a[:4], 10.0, 10.0, contrastive_weight=1.0)


if __name__ == "__main__":  # one rank of the two_ranks fixture: rank, init method, output folder
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])


def test_a_second_backward_is_an_error_not_a_wrong_derivative():
    from distill.cuda_ext import distributed_infonce_loss

    image = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    text = torch.randn(6, 8, dtype=torch.float64)
    loss = distributed_infonce_loss(image, text, torch.tensor(10.0, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="do not support double backward"):
        torch.autograd.grad(loss, image, create_graph=True)
    (grad,) = torch.autograd.grad(loss, image)  # first order is unaffected
    assert grad.shape == image.shape
