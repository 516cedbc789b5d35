"""Students, the distillation module and the frozen-teacher guard."""

import pytest
import torch

from distill.callbacks import TeacherFrozenCheck
from distill.datamodules import ShapesWorldDataModule
from distill.kd_objectives import AffinityDistillation, ClassTextAlignment, FeatureDistillation, LabelCrossEntropy
from distill.modules import DistillationModule
from distill.students import OpenClipStudent, Student, TimmStudent, check_timm_name
from distill.teachers import Teacher

STUDENT_TEXT = {
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_unknown_timm_name_suggests():
    with pytest.raises(ValueError, match="unknown timm model name 'resnet19'; did you mean"):
        check_timm_name("resnet19")


def test_timm_student_projects_into_the_teachers_width():
    student = TimmStudent(embed_dim=24, model_name="mobilenetv3_small_050", image_size=48)
    out = student.encode_image(torch.rand(3, 3, 48, 48))
    assert out.shape == (3, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert student.data_config["input_size"] == (3, 48, 48)
    with pytest.raises(FileNotFoundError, match="timm weights file not found"):
        TimmStudent(embed_dim=8, model_name="resnet10t", pretrained="missing.pth")


def test_open_clip_student_is_dual_tower():
    student = OpenClipStudent(embed_dim=16, model_config=STUDENT_TEXT)
    assert student.encode_text(student.tokenizer(["a star"])).shape == (1, 16)
    assert student.encode_image(torch.rand(2, 3, 32, 32)).shape == (2, 16)


def _module(tiny_local_dir, **kwargs):
    teacher = Teacher(model_name=f"local-dir:{tiny_local_dir}")
    student = kwargs.pop("student", lambda d: TimmStudent(d, "resnet10t", image_size=32))
    return DistillationModule(teacher=teacher, student=student, **kwargs)


def test_dimension_mismatch_without_projection(tiny_local_dir):
    class NoProjection(Student):
        def __init__(self) -> None:
            super().__init__(embed_dim=7)

    with pytest.raises(ValueError, match="needs a projection to the teacher's width"):
        _module(tiny_local_dir, student=lambda d: NoProjection())
    with pytest.raises(TypeError, match=r"student must be a distill.students.Student, got Linear"):
        _module(tiny_local_dir, student=lambda d: torch.nn.Linear(3, d))


def _batch(module, n=8):
    dm = ShapesWorldDataModule(num_train=n, num_val=7, num_test=7, batch_size=n)
    dm.connect(module)
    dm.setup("fit")
    return dm, next(iter(dm.train_dataloader()))


def test_teacher_and_student_get_their_own_views(tiny_local_dir):
    module = _module(tiny_local_dir, student=lambda d: TimmStudent(d, "resnet10t", image_size=48))
    _, batch = _batch(module)
    assert batch["image"].shape[-1] == 48 and batch["teacher_image"].shape[-1] == 32
    assert batch["teacher_text"].shape[1] == 32 and "text" not in batch  # image-only student


def test_training_logs_every_term_of_both_stages_and_caches_the_teacher(tiny_local_dir):
    import lightning.pytorch as pl

    module = _module(
        tiny_local_dir,
        objectives=[LabelCrossEntropy(), AffinityDistillation()],
        align_objectives=[FeatureDistillation(loss="cosine"), ClassTextAlignment()],
        align_steps=2,
    )
    dm = ShapesWorldDataModule(num_train=16, num_val=7, num_test=7, batch_size=8)
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=[TeacherFrozenCheck(every_n_steps=1)],
    )
    calls = []
    encode = module.teacher.encode_image
    module.teacher.encode_image = lambda images: calls.append(len(images)) or encode(images)
    trainer.fit(module, datamodule=dm)
    assert calls == [8, 8]  # epoch 1 only: epoch 2 reads the cached teacher embeddings
    logged = set(trainer.callback_metrics)
    assert {"train/loss_fd_cosine", "train/loss_class_text_align"} <= logged  # stage 1 (steps 0-1)
    assert {"train/loss_label_ce", "train/loss_affinity"} <= logged  # stage 2 (steps 2-3)


def _teacher_calls(module, dm, steps=4):
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    calls, text_calls = [], []
    encode, encode_text = module.teacher.encode_image, module.teacher.encode_text
    module.teacher.encode_image = lambda images: calls.append(len(images)) or encode(images)
    module.teacher.encode_text = lambda tokens, **kw: text_calls.append(len(tokens)) or encode_text(tokens, **kw)
    trainer.fit(module, datamodule=dm)
    module.text_calls = text_calls
    return calls


def test_consistent_augmentation_feeds_both_views_and_bypasses_the_teacher_cache(tiny_local_dir):
    module = _module(tiny_local_dir, objectives=[LabelCrossEntropy(), FeatureDistillation()])
    dm = ShapesWorldDataModule(num_train=16, num_val=7, num_test=7, batch_size=8, augment="trivialaugment")
    assert _teacher_calls(module, dm) == [8, 8, 8, 8]  # augmented images change every epoch: no image cache
    # Captions do not change: the teacher embeds each of the 16 once (epoch 1), then reads its cache.
    assert [n for n in module.text_calls if n == 8] == [8, 8]
    batch = next(iter(dm.train_dataloader()))
    assert batch["augmented"] and batch["teacher_image"].shape[-1] == 32
    val_batch = next(iter(dm.val_dataloader()))
    assert not val_batch["augmented"]
    with pytest.raises(ValueError, match="augment must be one of"):
        ShapesWorldDataModule(augment="autoaugment")
    labels_only = _module(tiny_local_dir)  # reads only the class bank: the teacher never runs per batch
    assert _teacher_calls(labels_only, ShapesWorldDataModule(num_train=16, num_val=7, num_test=7, batch_size=8)) == []


def test_checkpoint_holds_the_student_only(tiny_local_dir):
    module = _module(tiny_local_dir)
    keys = module.state_dict().keys()
    assert keys and all(k.startswith("student.") for k in keys)
    module.load_state_dict(module.state_dict())


def test_guard_fails_a_trainable_teacher(tiny_local_dir):
    module = _module(tiny_local_dir)
    guard = TeacherFrozenCheck(every_n_steps=1)
    guard.on_fit_start(None, module)
    module.teacher.model.text_projection.requires_grad_(True)
    with pytest.raises(RuntimeError, match="teacher parameters require gradients"):
        guard.on_train_batch_end(type("T", (), {"global_step": 1})(), module, None, None, 0)


def test_guard_fails_changed_teacher_weights(tiny_local_dir):
    module = _module(tiny_local_dir)
    guard = TeacherFrozenCheck(every_n_steps=1)
    guard.on_fit_start(None, module)
    with torch.no_grad():
        module.teacher.model.text_projection.add_(1.0)
    with pytest.raises(RuntimeError, match="teacher weights changed"):
        guard.on_train_end(None, module)


def test_teacher_stays_in_eval_mode_when_module_trains(tiny_local_dir):
    module = _module(tiny_local_dir)
    module.train()
    assert module.student.training and not any(m.training for m in module.teacher.modules())


def test_a_lora_student_trains_only_its_adapters_on_a_pretrained_open_clip(tiny_local_dir):
    """PromptKD-style parameter-efficient distillation: a pretrained small open_clip model, LoRA only."""
    import lightning.pytorch as pl

    from distill.lora import LoraSpec

    student = lambda d: OpenClipStudent(d, init_from=str(tiny_local_dir), lora=LoraSpec(rank=2))  # noqa: E731
    module = _module(tiny_local_dir, student=student, objectives=[LabelCrossEntropy(), AffinityDistillation()])
    trained = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    before = {n: p.detach().clone() for n, p in module.student.named_parameters()}
    dm = ShapesWorldDataModule(num_train=16, num_val=7, num_test=7, batch_size=8)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    changed = {n for n, p in module.student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trained
    with pytest.raises(ValueError, match="LoRA adapts pretrained weights; give init_from"):
        OpenClipStudent(16, model_name="tiny-rn-test", lora=LoraSpec())
    with pytest.raises(ValueError, match="must share the teacher's width"):
        OpenClipStudent(16, init_from=str(tiny_local_dir))
