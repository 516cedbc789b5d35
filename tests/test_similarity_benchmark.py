"""benchmarks/similarity.py: the trained-like inputs, the fp32-vs-fp64 errors and the ratio bookkeeping."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "similarity.py"
_spec = importlib.util.spec_from_file_location("similarity_benchmark", _PATH)
bench = sys.modules.setdefault("similarity_benchmark", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bench)  # registered first: the dataclass looks its module up


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(1)


@pytest.mark.parametrize("kind", list(bench.INPUT_KINDS))
def test_inputs_unit_norm_and_scales(kind):
    x = bench._inputs(300, 32, "cpu", torch.float32, kind)
    spec = bench.INPUT_KINDS[kind]
    for key in ("a", "b", "ta", "tb"):
        torch.testing.assert_close(x[key].detach().norm(dim=1), torch.ones(300), rtol=0, atol=1e-5)
    assert x["scale"].item() == pytest.approx(spec.scale) and x["tscale"].item() == pytest.approx(spec.teacher_scale)
    assert x["a"].requires_grad and not x["ta"].requires_grad


def test_trained_pairs_half_at_cosine_09():
    # n spans two draw chunks so the chunking is exercised.
    x = bench._inputs(bench._CHUNK + 100, 64, "cpu", torch.float32, "trained")
    cos = _cos(x["a"].detach(), x["b"].detach())
    paired = cos > 0.6  # independent pairs at D = 64 sit at |cos| < ~0.5
    assert paired.sum().item() == round(0.5 * cos.numel())
    torch.testing.assert_close(cos[paired], torch.full_like(cos[paired], bench.PAIR_COS), rtol=0, atol=1e-5)
    assert cos[~paired].abs().max() < 0.6


def test_hard_negatives_cluster_near_duplicates():
    x = bench._inputs(64, 256, "cpu", torch.float32, "hard_negatives")
    a, b = x["a"].detach(), x["b"].detach()
    sim = a @ a.T
    same = torch.block_diag(*[torch.ones(8, 8)] * 8).bool() & ~torch.eye(64, dtype=torch.bool)
    assert abs(sim[same].mean().item() - bench.CLUSTER_COS) < 0.01  # members near-duplicates of each other
    assert sim[~same & ~torch.eye(64, dtype=torch.bool)].abs().max() < 0.35  # other clusters: independent
    # Row 0's hardest negative (a text in its cluster) is as close as its positive.
    logits = a @ b.T
    assert logits[0, 1:8].max() > 0.9 * logits[0, 0]


def test_errors_against_fp64():
    x = bench._inputs(64, 16, "cpu", torch.float32, "trained")
    errs = bench._errors(64, ["ClipLoss", "infonce/reference", "SigLipLoss", "kd/reference"], x, 4096)
    assert set(errs) == {"ClipLoss", "infonce/reference", "SigLipLoss", "kd/reference"}
    for e in errs.values():
        assert e["fp64_reference"] == "reference"
        assert e["loss_rel_err"] == pytest.approx(abs(e["loss"] - e["loss_fp64"]) / abs(e["loss_fp64"]))
        assert 0 <= e["loss_rel_err"] < 1e-4 and 0 < e["grad_rel_err"] < 1e-3  # fp32 rounding, not zero
    assert bench._errors(64, ["ClipLoss"], x, 32)["ClipLoss"]["fp64_reference"] == "tiled"


def test_ratios_and_summary():
    def row(case, impl, t, mb, err):
        op = bench.CASES[case][0]
        return {"n": 8, "d": 4, "input": "trained", "case": case, "op": op, "impl": impl, "median_s": t}, {
            "peak_extra_mb": mb,
            "loss_rel_err": err,
            "grad_rel_err": 2 * err,
        }

    rows = [
        {**r, **m}
        for r, m in (row("ClipLoss", "open_clip", 2.0, 100.0, 1e-4), row("infonce/tiled", "tiled", 1.5, 10.0, 5e-5))
    ]
    rows.append({**rows[0], "input": "random", "median_s": 1.0})  # another input kind: its own baseline
    bench._add_ratios(rows)
    tiled = rows[1]
    assert tiled["time_ratio_vs_open_clip"] == pytest.approx(0.75)
    assert tiled["memory_ratio_vs_open_clip"] == pytest.approx(0.1)
    assert tiled["open_clip_loss_rel_err"] == 1e-4 and tiled["open_clip_grad_rel_err"] == 2e-4
    (summary,) = bench._summary(rows)
    assert summary["input"] == "trained" and summary["time_ratio_vs_open_clip"] == pytest.approx(0.75)


def test_main_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown kinds \['trianed'\]"):
        bench.main(kinds=["trianed"], out="x.json")
