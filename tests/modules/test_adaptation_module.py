"""The adaptation module: every method of configs/adapt trains through ``distill fit`` on a ResNet and
a ViT open_clip model with config only; checkpoints hold the adaptation; its outputs feed a teacher."""

from pathlib import Path

import open_clip
import pytest
import torch

from distill.adapt_objectives import AdaptedCrossEntropy
from distill.cli import main
from distill.clip_models import build_clip, save_local_dir
from distill.modules.adaptation_module import LazyOutputs
from distill.shapesworld_splits import write_split_files
from distill.teachers import Teacher

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "adapt"
METHODS = ["coop", "cocoop", "deep_prompts", "kgcoop", "promptsrc", "lora", "lora+lora_int8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ShapesWorld "shape" task in split-file format: 16 classes, a sketch OOD file."""
    root = tmp_path_factory.mktemp("adapt_data")
    paths = write_split_files(
        str(root), task="shape", train_domains=["flat"], ood_domains=["sketch"], num_train=64, num_val=32, num_test=32
    )
    return root, paths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Random tiny ResNet and ViT (patch 8 at 32 px, 2 layers a tower) open_clip models saved as local-dir folders."""
    folder = tmp_path_factory.mktemp("adapt_models")
    torch.manual_seed(0)
    rn = build_clip(model_name="tiny-rn-test")
    vit = build_clip(model_name="tiny-vit-test")
    return {
        "rn": save_local_dir(rn.model, rn.model_config, rn.preprocess_config, folder / "rn"),
        "vit": save_local_dir(vit.model, vit.model_config, vit.preprocess_config, folder / "vit"),
    }


def _args(method: str, model_dir: Path, data, root: Path, steps: int = 2) -> list[str]:
    data_root, paths = data
    configs = [f"--config={CONFIGS / 'base.yaml'}"] + [f"--config={CONFIGS / m}.yaml" for m in method.split("+")]
    return [
        *configs,
        f"--model.init_args.model_name=local-dir:{model_dir}",
        f"--model.init_args.export_dir={root / 'adapted'}",
        f"--data.init_args.root={data_root}",
        f"--data.init_args.split_file={paths['main']}",
        f"--data.init_args.ood_split_files={{sketch: {paths['sketch']}}}",
        "--data.init_args.shots=2",
        "--data.init_args.batch_size=8",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.mark.parametrize("arch", ["rn", "vit"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_both_architectures_by_config(method, arch, data, models, tmp_path):
    args = _args(method, models[arch], data, tmp_path / "run")
    if "deep_prompts" in method or "promptsrc" in method:
        depth = 1 if arch == "rn" else 2  # capped by the text tower's layers (tiny ResNet model: 1)
        args.append(f"--model.init_args.prompt_learner.init_args.depth={depth}")
    cli = main(["fit", *args])
    module = cli.model
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert {"val/top1_ShapesWorld", "train/loss"} <= set(metrics)
    # Only the adaptation trains, and only it is checkpointed.
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("prompt_learner.") or "lora_" in n for n in trained)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(k.startswith("prompt_learner.") or "lora_" in k for k in state)
    written = {p.name for p in (tmp_path / "run" / "adapted").iterdir()}
    assert ("adapters.safetensors" in written) == ("lora" in method)
    assert ("prompts.pt" in written) == ("lora" not in method)


def test_lora_merged_folder_is_a_stock_model_and_a_teacher(data, models, tmp_path):
    cli = main(["fit", *_args("lora", models["vit"], data, tmp_path / "run", steps=3)])
    module = cli.model.eval()
    with torch.no_grad():  # adapters that have trained a little: B is no longer zero
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    module.save_adaptation(tmp_path / "out")
    stock = open_clip.create_model(f"local-dir:{tmp_path / 'out' / 'open_clip'}").eval()
    images, tokens = torch.rand(3, 3, 32, 32), module.tokenizer(["a circle", "a star"])
    with torch.no_grad():
        torch.testing.assert_close(stock.encode_image(images), module.model.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(stock.encode_text(tokens), module.model.encode_text(tokens), atol=1e-5, rtol=0)
    teacher = Teacher(checkpoint=str(tmp_path / "out" / "open_clip"))
    # lora.yaml names the module's own template, which its class bank uses whatever it is passed.
    names, templates = ["circle", "star"], module.templates
    assert templates == ["a picture of a {}."]
    torch.testing.assert_close(
        teacher.class_bank(names, templates), module.class_bank(names, ["a {}."]), atol=1e-5, rtol=0
    )


def test_a_prompt_file_makes_the_teachers_class_bank(data, models, tmp_path):
    cli = main(["fit", *_args("coop", models["rn"], data, tmp_path / "run")])
    module = cli.model.eval()
    teacher = Teacher(model_name=f"local-dir:{models['rn']}", prompts=str(tmp_path / "run" / "adapted" / "prompts.pt"))
    names = ["circle", "hexagon", "a class never trained on"]
    torch.testing.assert_close(teacher.class_bank(names, ["a {}."]), module.class_bank(names, ["a {}."]))
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(teacher.encode_image(images), module.encode_image(images))


def test_an_image_conditioned_learner_cannot_be_a_teacher(data, models, tmp_path):
    main(["fit", *_args("cocoop", models["rn"], data, tmp_path / "run")])
    with pytest.raises(ValueError, match="conditions its class features on each image"):
        Teacher(model_name=f"local-dir:{models['rn']}", prompts=str(tmp_path / "run" / "adapted" / "prompts.pt"))


def test_resume_and_test_from_the_adapter_only_checkpoint(data, models, tmp_path):
    args = _args("lora", models["rn"], data, tmp_path / "run")
    main(["fit", *args])
    cli = main(["test", *args, "--ckpt_path=last", "--data.init_args.eval_classes=novel"])
    assert "test/top1_sketch" in cli.trainer.callback_metrics


def test_a_lora_target_that_matches_nothing_is_one_line(data, models, tmp_path, capsys):
    args = _args("lora", models["rn"], data, tmp_path / "run")
    with pytest.raises(SystemExit):
        main(["fit", *args, "--model.init_args.lora.targets=[mlp_in]", "--model.init_args.lora.towers=[image]"])
    assert "mlp_in" in capsys.readouterr().err


def test_lazy_outputs_compute_only_what_objectives_read():
    calls = []
    outputs = LazyOutputs(
        {
            "logits": lambda: calls.append("logits") or torch.tensor([[2.0, 0.0]]),
            "labels": lambda: calls.append("labels") or torch.tensor([0]),
            "frozen_image_embeds": lambda: calls.append("frozen") or torch.zeros(1, 2),
        }
    )
    loss = AdaptedCrossEntropy()(outputs)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([0])))
    assert (
        calls == ["logits", "labels"] and "frozen_image_embeds" in outputs and sorted(outputs) == ["labels", "logits"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_vit_b_32_and_the_demo_teacher_architecture(method, data, tmp_path):
    """The issue's two architectures at full size (random weights): ViT-B/32 and shapes-rn-teacher."""
    for name in ("ViT-B-32", "shapes-rn-teacher"):
        torch.manual_seed(0)
        bundle = build_clip(model_name=name)
        folder = save_local_dir(bundle.model, bundle.model_config, bundle.preprocess_config, tmp_path / name)
        args = _args(method, folder, data, tmp_path / f"run_{name}", steps=1)
        cli = main(["fit", *args])
        assert cli.trainer.global_step == 1 and cli.model.trainable_parameter_count() > 0
