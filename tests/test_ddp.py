"""Multi-process training: the sampler's global batches, and `distill fit` on 2 CPU processes (DDP, gloo).

A 2-process run with batch B must train as a 1-process run with batch 2B: same items in the same
order, global loss terms over the 2B rows, the same weights. The runs use plain SGD and a LayerNorm
student (no BatchNorm: its statistics are per process unless ``sync_batchnorm``, which gloo on CPU
lacks), so the only difference left is float rounding: DDP sums two half-batch gradients where one
process reduces the whole batch at once (about 1e-7 relative per step in fp32). After 8 SGD steps
the weights agree to 1e-5 (measured: 2.9e-6, weights up to 4.9); an uninterrupted and a resumed 2-process run take
identical steps, so they agree exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.data import _is_dataloader_shuffled, _update_dataloader
from torch.utils.data.distributed import DistributedSampler

from distill.datamodules.sampling import ResumableBatchSampler, ResumableLoader

# Sampler --------------------------------------------------------------------------------------------------------


def _epoch(sampler: ResumableBatchSampler) -> list[list[int]]:
    return [list(b) for b in sampler]


@pytest.mark.parametrize(("size", "drop_last"), [(40, True), (43, True), (43, False), (6, True)])
def test_each_rank_takes_its_slice_of_every_global_batch(size, drop_last):
    one = ResumableBatchSampler(size, 8, drop_last=drop_last, num_replicas=1, rank=0, seed=7)
    ranks = [ResumableBatchSampler(size, 4, drop_last=drop_last, num_replicas=2, rank=r, seed=7) for r in range(2)]
    for _ in range(2):  # two epochs: a new order each, the same on every rank
        expected, got = _epoch(one), [_epoch(s) for s in ranks]
        assert len(got[0]) == len(got[1]) == len(expected) == len(ranks[0])
        assert [a + b for a, b in zip(*got)] == expected
    assert _epoch(one) != expected  # the third epoch is reshuffled too
    # drop_last keeps the only (short) batch; an incomplete last batch that is kept is split evenly.
    last = {(40, True): (4, 4), (43, True): (4, 4), (43, False): (1, 2), (6, True): (3, 3)}[size, drop_last]
    assert (len(got[0][-1]), len(got[1][-1])) == last


def test_the_order_depends_on_the_seed_and_epoch_only():
    a, b = ResumableBatchSampler(30, 5, seed=3), ResumableBatchSampler(30, 5, seed=3)
    torch.rand(100)  # a process that drew other random numbers first (DDP re-seeds, one process does not)
    assert _epoch(a) == _epoch(b)
    # The seed comes from Lightning's seed_everything when not given.
    os.environ["PL_GLOBAL_SEED"] = "3"
    try:
        assert _epoch(ResumableBatchSampler(30, 5)) == _epoch(ResumableBatchSampler(30, 5, seed=3))
    finally:
        del os.environ["PL_GLOBAL_SEED"]


def test_lightning_keeps_the_sampler_and_hands_it_the_process_layout():
    dataset = list(range(20))
    loader = ResumableLoader(dataset, batch_sampler=ResumableBatchSampler(20, 4, seed=1, drop_last=True))
    assert _is_dataloader_shuffled(loader)  # read from the sampler's `sampler`: a RandomSampler
    injected = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True)
    rebuilt = _update_dataloader(loader, injected)  # what Lightning does under DDP
    sampler = rebuilt.batch_sampler
    assert type(rebuilt) is ResumableLoader and type(sampler) is ResumableBatchSampler
    assert (sampler.num_replicas, sampler.rank, sampler.shuffle, sampler.drop_last) == (2, 1, True, True)
    sampler.seed = 1  # in a run it comes from PL_GLOBAL_SEED, as the original's would
    expected = _epoch(ResumableBatchSampler(20, 8, seed=1, drop_last=True))
    assert [b.tolist() for b in rebuilt] == [b[4:] for b in expected]


def test_a_saved_position_resumes_on_every_rank_and_under_another_layout():
    ranks = [ResumableBatchSampler(48, 4, num_replicas=2, rank=r, seed=5) for r in range(2)]
    iters = [iter(s) for s in ranks]
    for _ in range(3):
        for it in iters:
            next(it)
    state = ranks[0].state_dict()  # rank 0 writes the checkpoint; every rank loads it
    assert state == {**ranks[1].state_dict(), "rng": state["rng"]}
    rest = [[list(b) for b in it] for it in iters]
    for rank in range(2):
        fresh = ResumableBatchSampler(48, 4, num_replicas=2, rank=rank, seed=99)
        fresh.load_state_dict(state)
        assert _epoch(fresh) == rest[rank]
        assert _epoch(fresh)[0] != rest[rank][0]  # then a new epoch
    one = ResumableBatchSampler(48, 8, num_replicas=1, rank=0)  # the same global batch on one process
    one.load_state_dict(state)
    assert _epoch(one) == [a + b for a, b in zip(*rest)]
    with pytest.raises(ValueError, match="not a whole number of global batches of 16"):
        ResumableBatchSampler(48, 8, num_replicas=2, rank=0).load_state_dict(state)


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match="the last global batch holds 1 of 9 items, fewer than the 2 processes"):
        ResumableBatchSampler(9, 4, drop_last=False, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="0 <= rank < num_replicas"):
        ResumableBatchSampler(9, 4, num_replicas=2, rank=2)


# distill fit on 2 processes ---------------------------------------------------------------------------------------

STEPS, STOP = 8, 4  # 48 items in global batches of 8: 6 steps per epoch, so both runs cross an epoch boundary


def _args(teacher: Path, root: str, batch_size: int, steps: int) -> list[str]:
    return [
        "--seed_everything=3",
        "--model=DistillationModule",
        f"--model.init_args.teacher.model_name=local-dir:{teacher}",
        "--model.init_args.student=distill.students.OpenClipStudent",
        "--model.init_args.student.init_args.model_name=tiny-vit-test",
        "--model.init_args.objectives=["
        "{class_path: distill.kd_objectives.AffinityDistillation}, "  # global terms
        "{class_path: distill.kd_objectives.InteractiveContrastive}, "
        "{class_path: distill.kd_objectives.FeatureDistillation, init_args: {weight: 100}}, "  # local terms
        "{class_path: distill.kd_objectives.LabelCrossEntropy}]",
        "--model.init_args.optimizer=torch.optim.SGD",
        "--model.init_args.optimizer.lr=0.5",
        "--data=ShapesWorldDataModule",
        "--data.init_args.image_size=32",
        "--data.init_args.num_train=48",
        "--data.init_args.num_val=15",  # odd: DistributedSampler repeats an item to even the ranks
        f"--data.init_args.batch_size={batch_size}",
        "--trainer.callbacks+=ZeroShotEvaluation",
        "--trainer.callbacks+=TeacherStudentDiagnostics",
        "--trainer.callbacks.init_args.plots=false",
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=4",
        "--trainer.check_val_every_n_epoch=null",  # every 4 steps across epochs: at steps 4 and 8
        "--trainer.num_sanity_val_steps=0",
        "--trainer.deterministic=true",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
    ]


def _fit(args: list[str], cwd: Path, processes: int) -> None:
    """``python -m distill fit ...``; with 2 processes Lightning's launcher starts rank 1 with the same command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "MASTER_", "LOCAL_RANK", "NODE_RANK"))}
    env["OMP_NUM_THREADS"] = "1"  # one core per process
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2"] if processes == 2 else []
    done = subprocess.run(
        [sys.executable, "-m", "distill", "fit", *args, *ddp], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _json(root: Path, name: str) -> dict:
    return json.loads(next((root / "logs").glob(f"version_*/{name}")).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """1 process with batch 8, and 2 processes with batch 4, for STEPS steps (validation at steps 4 and 8)."""
    from distill.clip_models import build_clip, save_local_dir

    folder = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    bundle = build_clip(model_name="tiny-rn-test")
    teacher = save_local_dir(bundle.model, bundle.model_config, bundle.preprocess_config, folder / "teacher")
    _fit(_args(teacher, "one", 8, STEPS), folder, 1)
    _fit(_args(teacher, "two", 4, STEPS), folder, 2)
    return folder


def test_two_processes_train_and_evaluate_as_one_with_the_global_batch(runs):
    one, two = _weights(runs / "one"), _weights(runs / "two")
    assert one.keys() == two.keys()
    diff = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert diff <= 1e-5, diff
    # Evaluation: the 15 validation items once each (not 16), and the metrics of the single process.
    for name in ("zeroshot_val.json", "diagnostics_val.json"):
        a, b = _json(runs / "one", name), _json(runs / "two", name)
        assert a["step"] == b["step"] == STEPS
        if name.startswith("zeroshot"):
            assert a["counts"] == b["counts"] and a["counts"]["items"] == 15
            for key, value in a["metrics"].items():
                assert b["metrics"][key] == pytest.approx(value, abs=1e-6), key
        else:
            assert a["items"] == b["items"] == 15
            assert json.dumps(a["student"]["top1"]) == json.dumps(b["student"]["top1"])
            agree_a, agree_b = a["agreement"]["all"], b["agreement"]["all"]
            for key, value in agree_a.items():
                assert agree_b[key] == pytest.approx(value, abs=1e-4), key


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(runs):
    teacher = runs / "teacher"
    _fit(_args(teacher, "resumed", 4, STOP), runs, 2)  # stops mid-epoch 1 and writes last.ckpt (rank 0)
    assert torch.load(runs / "resumed/checkpoints/last.ckpt", weights_only=True)["global_step"] == STOP
    _fit([*_args(teacher, "resumed", 4, STEPS), "--ckpt_path=last"], runs, 2)
    whole, resumed = _weights(runs / "two"), _weights(runs / "resumed")
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
