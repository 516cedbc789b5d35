"""Distillation from a teacher cache: the same losses as the online teacher on the same augmentations,
no teacher needed, misses embedded online or named, and the cache checked before training."""

import json
import shutil

import lightning.pytorch as pl
import pytest
import torch

from distill.augment_replay import apply_params
from distill.cache_builder import build_teacher_cache
from distill.callbacks import ZeroShotEvaluation
from distill.datamodules import ShapesWorldDataModule
from distill.kd_objectives import AffinityDistillation, FeatureDistillation, LabelCrossEntropy, LogitDistillation
from distill.modules import DistillationModule
from distill.students import TimmStudent
from distill.teacher_cache import CacheMissError, StaleCacheError
from distill.teachers import Teacher


def _data(num_train=16, **kwargs):
    return ShapesWorldDataModule(num_train=num_train, num_val=7, num_test=7, batch_size=8, image_size=32, **kwargs)


@pytest.fixture
def cache(tmp_path, tiny_local_dir):
    teacher = Teacher(model_name=f"local-dir:{tiny_local_dir}")
    return build_teacher_cache(
        _data(), teacher, str(tmp_path / "cache"), num_augmentations=3, chunk_size=8, progress=False
    )


def _module(tiny_local_dir, cache, teacher=True, **kwargs):
    pl.seed_everything(0)
    return DistillationModule(
        teacher=Teacher(model_name=f"local-dir:{tiny_local_dir}") if teacher else None,
        student=lambda d: TimmStudent(d, "resnet10t", image_size=32),
        objectives=[LabelCrossEntropy(), FeatureDistillation(), AffinityDistillation(), LogitDistillation()],
        teacher_cache=str(cache),
        **kwargs,
    )


class Record(pl.Callback):
    """Loss and view ids of every training step."""

    def __init__(self) -> None:
        self.losses, self.aug_ids = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.aug_ids.append(batch["aug_id"].tolist())


def _fit(module, data, steps=4, callbacks=(), val_batches=0):
    pl.seed_everything(1)  # the view ids are drawn from the global RNG
    record = Record()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=val_batches, num_sanity_val_steps=0,
        callbacks=[record, *callbacks],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return record


def _count_teacher_images(module):
    calls, encode = [], module.teacher.encode_image
    module.teacher.encode_image = lambda images: calls.append(len(images)) or encode(images)
    return calls


def test_cached_and_online_distillation_give_the_same_losses(tiny_local_dir, cache):
    cached = _module(tiny_local_dir, cache)
    online = _module(tiny_local_dir, cache, teacher_cache_embeddings=False)  # the cache's augmentations only
    cached_calls, online_calls = _count_teacher_images(cached), _count_teacher_images(online)
    a, b = _fit(cached, _data()), _fit(online, _data())
    assert cached_calls == [] and online_calls == [8, 8, 8, 8]  # the cache replaces every teacher forward pass
    assert a.aug_ids == b.aug_ids and {i for ids in a.aug_ids for i in ids} == {0, 1, 2}
    # Tolerance: the cache was embedded in batches of other sizes, so teacher embeddings differ by ~1e-7.
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=0, atol=1e-5)
    for p, q in zip(cached.student.parameters(), online.student.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)  # and the same student after 4 steps


def test_the_student_sees_the_view_the_cached_embedding_describes(tiny_local_dir, cache):
    module, data = _module(tiny_local_dir, cache), _data()
    _fit(module, data, steps=1)
    batch = next(iter(data.train_dataloader()))
    assert "teacher_image" not in batch and "teacher_text" not in batch  # every embedding comes from the cache
    raw = data.raw_samples_at("train", batch["index"].tolist())
    params = module.embedding_cache.load().params
    for j, (sample, view) in enumerate(zip(raw, batch["aug_id"].tolist())):
        replayed = apply_params(sample["image"], params[int(batch["index"][j]), view], module.embedding_cache.policy)
        assert torch.equal(batch["image"][j], module.preprocess_train(replayed))


def test_a_run_without_teacher_reads_everything_from_the_cache(tiny_local_dir, cache):
    module, data = _module(tiny_local_dir, cache, teacher=False), _data()
    assert module.teacher is None and module.student.embed_dim == 32 and module.teacher_preprocess is None
    zero_shot = ZeroShotEvaluation(retrieval=False)
    record = _fit(module, data, steps=2, callbacks=[zero_shot], val_batches=1)
    assert len(record.losses) == 2 and all(torch.isfinite(torch.tensor(record.losses)))
    assert 0 <= zero_shot.results["val"]["id_top1"] <= 1  # evaluation classifies with the cached class bank
    teacher = Teacher(model_name=f"local-dir:{tiny_local_dir}")
    assert float(module.logit_scale) == pytest.approx(float(teacher.logit_scale))
    bank = module.class_bank(data.classnames, data.templates)
    torch.testing.assert_close(bank, teacher.class_bank(data.classnames, data.templates), rtol=0, atol=1e-6)
    with pytest.raises(CacheMissError, match="descriptors need the online teacher"):
        module.class_bank(data.classnames, data.templates, {"circle": ["is round"]})


def test_a_miss_without_teacher_names_the_item(tiny_local_dir, cache):
    module = _module(tiny_local_dir, cache, teacher=False)
    with pytest.raises(
        CacheMissError, match=r"2 of 18 training items are not in the teacher cache \(item 16: 'sha256:"
    ):
        _fit(module, _data(num_train=18), steps=1)


def test_a_miss_with_teacher_falls_back_to_the_online_teacher(tiny_local_dir, cache):
    module, data = _module(tiny_local_dir, cache), _data(num_train=18)
    with pytest.warns(UserWarning, match="2 of 18 training items are not in the teacher cache"):
        _fit(module, data, steps=1)
    calls = _count_teacher_images(module)
    module.train()
    for batch in data.train_dataloader():  # the two new items land in some batches: only they run the teacher
        image, text = module._teacher_embeddings(batch)
        online = module.teacher.encode_image(batch["teacher_image"]), module.teacher.encode_text(batch["teacher_text"])
        torch.testing.assert_close(image, online[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(text, online[1], rtol=0, atol=1e-5)
    assert sum(n for n in calls[::2]) == 2  # the fallback calls (every other call is the check's)


def test_the_cache_is_checked_before_training(tiny_local_dir, cache, tmp_path):
    moved = tmp_path / "teacher_mean"
    shutil.copytree(tiny_local_dir, moved)
    config = json.loads((moved / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["mean"] = [0.5, 0.5, 0.5]
    (moved / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(
        StaleCacheError, match=r"cache: stale teacher cache: the teacher's preprocess changed .*preprocess.mean"
    ):
        _module(moved, cache)
    with pytest.raises(ValueError, match="augment policy cannot be used with a teacher cache"):
        _fit(_module(tiny_local_dir, cache), _data(augment="trivialaugment"), steps=1)
    with pytest.raises(ValueError, match="needs a teacher, or a teacher_cache that supplies the embeddings"):
        _module(tiny_local_dir, cache, teacher=False, teacher_cache_embeddings=False)
