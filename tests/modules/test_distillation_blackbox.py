"""A black-box teacher end to end: a budgeted cache build, its spend ledger beside the cache, and
VL2V-ADiP distillation from that cache with no teacher in the run."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from distill.blackbox import BlackBoxTeacher, BudgetExceededError
from distill.cache_builder import SPEND_LEDGER, build_teacher_cache, cache_command
from distill.callbacks import ZeroShotEvaluation
from distill.datamodules import ShapesWorldDataModule
from distill.kd_objectives import ClassTextAlignment, FeatureDistillation, LabelCrossEntropy, LogitDistillation
from distill.modules import DistillationModule
from distill.students import TimmStudent
from distill.teacher_cache import TeacherCache

FIXTURE = Path(__file__).parents[1] / "distill" / "blackbox_fixture.py"  # the stand-in paid teacher (width 8)
BUILD = dict(num_augmentations=2, chunk_size=8, progress=False)


def _data() -> ShapesWorldDataModule:
    return ShapesWorldDataModule(num_train=12, num_val=7, num_test=7, batch_size=6, image_size=32)


def _teacher(budget: float | None) -> BlackBoxTeacher:
    return BlackBoxTeacher(embed_dim=8, name="fixture", version="1", query=f"{FIXTURE}:embed", budget=budget)


def _queries(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _full_cost(data: ShapesWorldDataModule) -> int:
    """Images (K views per item) + captions + class bank prompts: the most a build can spend."""
    items = data.num_items("train")
    return items * BUILD["num_augmentations"] + items + len(data.classnames) * len(data.templates)


@pytest.fixture
def provider_log(tmp_path, monkeypatch) -> Path:
    log = tmp_path / "provider.jsonl"
    monkeypatch.setenv("BLACKBOX_FIXTURE_LOG", str(log))
    return log


def test_a_build_over_budget_stops_before_any_query(tmp_path, provider_log):
    data = _data()
    teacher = _teacher(budget=data.num_items("train"))  # not even one view per item
    with pytest.raises(BudgetExceededError, match="budget"):
        build_teacher_cache(data, teacher, str(tmp_path / "cache"), **BUILD)
    assert _queries(provider_log) == []  # the provider received nothing
    assert teacher.spend().units == 0


def test_the_spend_is_kept_beside_the_cache_and_a_rebuild_is_free(tmp_path, provider_log):
    data, folder = _data(), tmp_path / "cache"
    teacher = _teacher(budget=_full_cost(data))
    build_teacher_cache(data, teacher, str(folder), **BUILD)
    assert Path(teacher.ledger) == folder / SPEND_LEDGER
    received = sum(q["count"] for q in _queries(provider_log))
    spend = teacher.spend()
    assert spend.units == received and spend.not_received_units == 0  # every unit the provider saw, no more
    images = sum(q["count"] for q in _queries(provider_log) if q["kind"] == "image")
    assert images == data.num_items("train") * BUILD["num_augmentations"]  # each view queried exactly once
    assert spend.items == {"image": images, "text": received - images}
    # A second build of the complete cache, by a new process-like teacher on the same ledger: nothing is queried.
    again = _teacher(budget=_full_cost(data))
    build_teacher_cache(data, again, str(folder), **BUILD)
    assert sum(q["count"] for q in _queries(provider_log)) == received
    assert again.spend().units == spend.units
    assert TeacherCache(folder).embed_dim == 8  # the cache opens: the ledger beside it is not foreign


def test_vl2v_adip_trains_from_the_black_box_cache_without_a_teacher(tmp_path, provider_log):
    data, folder = _data(), tmp_path / "cache"
    build_teacher_cache(data, _teacher(budget=None), str(folder), **BUILD)
    queried = len(_queries(provider_log))
    pl.seed_everything(0)
    module = DistillationModule(
        teacher=None,
        student=lambda d: TimmStudent(d, "resnet10t", image_size=32),
        align_objectives=[FeatureDistillation(loss="cosine"), ClassTextAlignment()],
        align_steps=2,
        objectives=[LabelCrossEntropy(), LogitDistillation(), FeatureDistillation(loss="cosine")],
        teacher_cache=str(folder),
    )
    zero_shot = ZeroShotEvaluation(retrieval=False)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, callbacks=[zero_shot],
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4  # both VL2V-ADiP stages ran
    assert 0 <= zero_shot.results["val"]["id_top1"] <= 1  # classified with the cached class bank
    assert len(_queries(provider_log)) == queried  # training queried the black box no more
    assert torch.isfinite(torch.stack([p.detach().sum() for p in module.student.parameters()])).all()


def test_the_cache_command_takes_a_black_box_teacher_and_stops_over_budget(tmp_path, provider_log, capsys):
    config = tmp_path / "cache.yaml"
    teacher = {"name": "fixture", "version": "1", "embed_dim": 8, "query": f"{FIXTURE}:embed", "budget": 10}
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "data": {"class_path": "ShapesWorldDataModule", "init_args": {"num_train": 4, "image_size": 32}},
                "teacher": {"class_path": "distill.blackbox.BlackBoxTeacher", "init_args": teacher},
                "output_dir": str(tmp_path / "cache"),
                "num_augmentations": 2,
                "progress": False,
            }
        )
    )
    with pytest.raises(SystemExit) as stop:
        cache_command(["--config", str(config)])
    assert stop.value.code == 2 and _queries(provider_log) == []
    err = capsys.readouterr().err
    assert "the budget is 10" in err and "Nothing was queried" in err
    folder = cache_command(["--config", str(config), "--teacher.init_args.budget", "1000"])
    assert (folder / SPEND_LEDGER).is_file() and TeacherCache(folder).num_augmentations == 2


def test_distill_fit_names_the_missing_items_in_one_line(tmp_path, provider_log, capsys):
    from distill.cli import main

    folder = build_teacher_cache(_data(), _teacher(budget=None), str(tmp_path / "cache"), **BUILD)
    queried = len(_queries(provider_log))
    args = [
        "fit",
        "--model=DistillationModule",
        "--model.init_args.teacher=null",
        f"--model.init_args.teacher_cache={folder}",
        "--model.init_args.student=distill.students.TimmStudent",
        "--model.init_args.student.model_name=resnet10t",
        "--model.init_args.student.image_size=32",
        "--data=ShapesWorldDataModule",
        "--data.init_args.num_train=16",  # 4 more items than the cache holds
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=4",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.max_steps=1",
        "--trainer.accelerator=cpu",
    ]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"distill: error: {folder}: 4 of 16 training items are not in the teacher cache")
    assert len(_queries(provider_log)) == queried  # a fit never queries the black box
