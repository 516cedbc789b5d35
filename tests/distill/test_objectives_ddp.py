"""Global objectives under data parallelism: 2 gloo processes vs one process on the concatenated batch.

Each case embeds its rows with shared (replicated) parameters: a linear projection per modality and
a learnable log logit scale (and bias), as a DDP-wrapped model would. Every rank runs the real
objective class on its rows and backpropagates; DDP would then average the parameter gradients over
the ranks. The test checks that this average, the per-rank loss (logged as is) and the embedding
gradients (divided by the world size, which the objectives multiply in) equal a single process on
the global batch, for the reference and tiled backends.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distill import data_parallel
from distill.kd_objectives import AffinityDistillation, FeatureDistillation, InteractiveContrastive
from distill.objectives import DCL, InfoNCE, SigLIP, SoftTargetContrastive, weighted_sum

WORLD = 2
UNEVEN, EVEN = (5, 7), (6, 6)  # rows per rank; local (per-sample) terms need equal local batches
BACKENDS = ("reference", "tiled")
DTYPES = (torch.float32, torch.float64)
FEATURES, WIDTH, TEACHER_WIDTH = 10, 16, 12


def _objectives(case: str, backend: str) -> list[torch.nn.Module]:
    return {
        "infonce": lambda: [InfoNCE(backend=backend)],
        "siglip": lambda: [SigLIP(backend=backend)],
        "affinity": lambda: [AffinityDistillation(backend=backend)],
        "affinity_image_only": lambda: [AffinityDistillation(backend=backend)],
        "icl": lambda: [InteractiveContrastive(backend=backend)],
        "dcl": lambda: [DCL()],
        "soft_target": lambda: [SoftTargetContrastive(target_temperature=0.5)],
        "kd_composite": lambda: [
            AffinityDistillation(weight=1.0, backend=backend),
            InteractiveContrastive(weight=0.5, backend=backend),
            FeatureDistillation(weight=20.0),
        ],
    }[case]()


CASES = ("infonce", "siglip", "affinity", "affinity_image_only", "icl", "dcl", "soft_target", "kd_composite")


def _rows(case: str) -> tuple[int, ...]:
    return EVEN if case == "kd_composite" else UNEVEN


def _inputs(case: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The global batch's features, the teacher's embeddings and the shared parameters' initial values."""
    g = torch.Generator().manual_seed(CASES.index(case))
    n = sum(_rows(case))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return {
        "x_img": randn(n, FEATURES),
        "x_txt": randn(n, FEATURES),
        "t_img": F.normalize(randn(n, TEACHER_WIDTH), dim=1),
        "t_txt": F.normalize(randn(n, TEACHER_WIDTH), dim=1),
        "w_img": randn(FEATURES, WIDTH) * 0.5,
        "w_txt": randn(FEATURES, WIDTH) * 0.5,
        "log_scale": torch.tensor(2.3, dtype=dtype),
        "bias": torch.tensor(-2.0, dtype=dtype),
    }


def _step(case: str, backend: str, x: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """Loss and gradients (parameters and embeddings) of ``case`` on the rows ``rows`` of the global batch."""
    params = {k: x[k].clone().requires_grad_(True) for k in ("w_img", "w_txt", "log_scale", "bias")}
    img = F.normalize(x["x_img"][rows] @ params["w_img"], dim=1)
    txt = F.normalize(x["x_txt"][rows] @ params["w_txt"], dim=1)
    img.retain_grad()
    txt.retain_grad()
    scale = params["log_scale"].exp()
    outputs = {"image_embeds": img, "text_embeds": txt, "logit_scale": scale, "logit_bias": params["bias"]}
    if case == "soft_target":  # what ContrastiveModule passes: these captions against the global batch's
        outputs["target_similarity"] = txt.detach() @ data_parallel.gather_rows(txt.detach()).T
    if case in ("affinity", "affinity_image_only", "icl", "kd_composite"):
        t_img = x["t_img"][rows]
        # the teacher's width differs from the student's except where the two are compared directly
        t_txt = x["t_txt"][rows]
        if case in ("icl", "kd_composite", "affinity_image_only"):
            t_img, t_txt = F.pad(t_img, (0, WIDTH - TEACHER_WIDTH)), F.pad(t_txt, (0, WIDTH - TEACHER_WIDTH))
        outputs.update(teacher_image_embeds=t_img, teacher_text_embeds=t_txt, teacher_logit_scale=20.0)
        if case == "affinity_image_only":
            del outputs["text_embeds"]
    loss, _ = weighted_sum(_objectives(case, backend), outputs)
    loss.backward()
    grads = {k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in params.items()}
    embeds = {k: torch.zeros_like(e) if e.grad is None else e.grad for k, e in (("img", img), ("txt", txt))}
    return {"loss": loss.detach(), **embeds, **grads}


def _gather_items(rank: int) -> list:
    """What evaluation callbacks gather: DistributedSampler's shards of 15 items (padded), and a rank without items."""
    mine = list(range(15))[rank::WORLD] + ([0] if rank == 1 else [])  # 8 items each: item 0 repeated as padding
    index = torch.tensor(mine)
    tensors = {"value": index[:, None] * torch.tensor([1.0, -1.0]), "label": index % 4, "absent": None}
    padded = data_parallel.gather_items(index, tensors, {"caption": [f"c{i}" for i in mine]})
    empty = data_parallel.gather_items(
        index[:0] if rank == 1 else index,
        {"value": None if rank == 1 else tensors["value"]},
        {"caption": [] if rank == 1 else [f"c{i}" for i in mine], "short": ["x"]},
    )
    return [padded, empty]


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    results = {}
    try:
        for dtype in DTYPES:
            for backend in BACKENDS:
                for case in CASES:
                    start = sum(_rows(case)[:rank])
                    rows = slice(start, start + _rows(case)[rank])
                    results[f"{case}/{backend}/{dtype}"] = _step(case, backend, _inputs(case, dtype), rows)
        results["gather_items"] = _gather_items(rank)
        # A local term that is NaN on rank 1 only: both ranks raise (none waits in the next collective).
        image = torch.ones(2, 4) * (float("nan") if rank == 1 else 1.0)
        try:
            weighted_sum([FeatureDistillation()], {"image_embeds": image, "teacher_image_embeds": torch.ones(2, 4)})
            results["nan"] = ""
        except FloatingPointError as err:
            results["nan"] = str(err)
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Every case on 2 gloo processes (this file run as a script per rank, as tests/cuda_ext/test_distributed.py)."""
    out = tmp_path_factory.mktemp("ranks")
    init = f"file://{out / 'rendezvous'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, __file__, str(rank), init, str(out)], env=env, stderr=subprocess.PIPE)
        for rank in range(WORLD)
    ]
    try:
        errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, err) in enumerate(zip(procs, errors)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_as_one_on_the_global_batch(two_ranks, case, backend, dtype):
    ranks = [r[f"{case}/{backend}/{dtype}"] for r in two_ranks]
    single = _step(case, backend, _inputs(case, dtype), slice(None))  # one process, the whole batch
    tol = _tol(dtype)
    if case == "kd_composite":  # a local term (feature MSE) is each rank's mean: their average is the global mean
        torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, single["loss"], **tol)
    else:
        for r in ranks:  # global terms: every rank logs the global loss
            torch.testing.assert_close(r["loss"], single["loss"], **tol)
    # DDP averages the parameter gradients over the ranks: that average is the single-process gradient.
    for k in ("w_img", "w_txt", "log_scale", "bias"):
        torch.testing.assert_close(sum(r[k] for r in ranks) / WORLD, single[k], **tol, msg=f"{case}: {k}")
    # Each rank's embedding gradient is W times its rows of the global gradient (the DDP scaling).
    for k in ("img", "txt"):
        torch.testing.assert_close(torch.cat([r[k] for r in ranks]) / WORLD, single[k], **tol, msg=f"{case}: {k}")


def test_evaluation_items_are_gathered_once_each_in_index_order(two_ranks):
    for ranks in two_ranks:  # every rank gets the whole result
        (index, tensors, lists), (e_index, e_tensors, e_lists) = ranks["gather_items"]
        assert index.tolist() == list(range(15))  # the padding copy of item 0 is gone
        assert torch.equal(tensors["value"], index[:, None] * torch.tensor([1.0, -1.0]))
        assert torch.equal(tensors["label"], index % 4) and tensors["absent"] is None
        assert lists["caption"] == [f"c{i}" for i in range(15)]
        assert e_index.tolist() == list(range(0, 15, 2))  # rank 1 held nothing
        assert torch.equal(e_tensors["value"], e_index[:, None] * torch.tensor([1.0, -1.0]))
        assert e_lists["caption"] == [f"c{i}" for i in range(0, 15, 2)] and e_lists["short"] is None


def test_a_non_finite_loss_on_one_rank_stops_every_rank(two_ranks):
    assert two_ranks[1]["nan"].startswith("loss term 'fd_mse' is nan")
    assert two_ranks[0]["nan"] == "a loss term is nan or inf on another process (its own error names it)"


def test_the_global_terms_scale_the_gradient_not_the_value():
    x = torch.tensor(3.0, requires_grad=True)
    y = data_parallel.scale_grad(x * 2, 4.0)
    assert y.item() == 6.0
    y.backward()
    assert x.grad.item() == 8.0
    assert data_parallel.world_size() == 1  # no process group here: every objective is the one-process formula
    t = torch.randn(3, 4)
    assert data_parallel.gather_rows(t) is t and data_parallel.global_value(t) is t


if __name__ == "__main__":  # one rank of the two_ranks fixture: rank, init method, output folder
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
