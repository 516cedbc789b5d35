"""Every shipped config: its header gives the command that runs it, and that command, on tiny data
and a two-step budget, builds what the configs name and writes what they say, where they say.

The configs are read here as LightningCLI reads them (later files deep-merged over earlier ones,
a list replaced whole), and each check compares the run with that merged config.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distill.cli import main
from distill.modules import AdaptationModule, DistillationModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/**/*.yaml"))
HEADER = re.compile(r"^#\s+distill (\w+)((?: --config \S+)+)$", re.M)
# Tiny data, two optimizer steps, one validation at step 2 and every step logged.
SMALL_DATA = [
    "--data.init_args.num_train=16",
    "--data.init_args.num_val=14",
    "--data.init_args.num_test=14",
    "--data.init_args.batch_size=7",
]
# A SplitFileDataModule reads the tiny split files _prepare_inputs writes: one shot of each class.
SMALL_SPLIT_DATA = ["--data.init_args.shots=1", "--data.init_args.batch_size=8"]
SMALL_RUN = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _commands(config: Path) -> list[tuple[str, ...]]:
    """The commands of a config's header lines: (subcommand, config paths relative to the repo)."""
    return [(m.group(1), *m.group(2).split()[1::2]) for m in HEADER.finditer(config.read_text())]


# Every header line's command, once (a base and its overlays share theirs).
COMMANDS = sorted({command for config in CONFIGS for command in _commands(config)})


def _merge(into: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def _merged(configs: tuple[str, ...]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for config in configs:
        _merge(merged, yaml.safe_load((ROOT / config).read_text()))
    return merged


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _values(node: Any, key: str = "") -> list[tuple[str, Any]]:
    """(key, value) of every leaf of a parsed YAML tree."""
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _values(v, k)]
    if isinstance(node, list):
        return [kv for v in node for kv in _values(v, key)]
    return [(key, node)]


def _prepare_inputs(config: dict[str, Any]) -> None:
    """Create, at the relative paths the config names, the teacher folders and split files it expects to exist."""
    from distill.clip_models import build_clip, save_local_dir

    for _, value in _values(config):
        if isinstance(value, str) and value.startswith("local-dir:"):
            bundle = build_clip(model_name="tiny-rn-test")
            save_local_dir(
                bundle.model, bundle.model_config, bundle.preprocess_config, value.removeprefix("local-dir:")
            )
    if _short(config["data"]["class_path"]) == "SplitFileDataModule":
        _write_tiny_split_files(config["data"]["init_args"])


def _write_tiny_split_files(data: dict[str, Any]) -> None:
    """Tiny ShapesWorld split files (32 px) at the paths a SplitFileDataModule config names: each of
    the 80 shape_position classes once per split, in one training domain and in each held-out one."""
    from distill.shapesworld_splits import write_split_files

    main_file = Path(data["split_file"])
    name = re.fullmatch(r"split_zhou_(.+)\.json", main_file.name).group(1)
    ood = dict(data.get("ood_split_files") or {})
    written = write_split_files(
        str(main_file.parent),
        name=name,
        task="shape_position",
        train_domains=["flat"],
        ood_domains=list(ood),
        num_train=80,
        num_val=80,
        num_test=80,
        image_size=32,
    )
    assert Path(data["root"]).resolve() == main_file.parent.resolve(), "split files list paths relative to root"
    assert {k: Path(v).resolve() for k, v in written.items()} == {
        k: Path(v).resolve() for k, v in {"main": main_file, **ood}.items()
    }, f"the config names split files other than write_split_files writes: {data}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_names_the_command_that_runs_it(config):
    commands = _commands(config)
    assert commands, f"{config} lacks a header line '#   distill <subcommand> --config {config.name}'"
    for command in commands:
        assert str(config.relative_to(ROOT)) in command[1:], f"{config}'s header command {command} does not use it"
        for path in command[1:]:
            assert (ROOT / path).is_file(), f"{config}'s header names a missing config {path}"
    values = _values(yaml.safe_load(config.read_text()))
    assert ("accelerator", "cpu") not in values, f"{config}: use accelerator: auto, so it runs on a GPU too"
    # The run folder is typed once: logs, checkpoints and reports derive from it (only the exported
    # model, an artifact other configs read, is named in full).
    for root in [v for k, v in values if k == "default_root_dir"]:
        again = [
            k for k, v in values if isinstance(v, str) and root in v and k not in ("default_root_dir", "export_dir")
        ]
        assert not again, f"{config} types its run folder {root} again in {again}"


@pytest.mark.parametrize(
    "command", COMMANDS, ids=lambda c: f"{Path(c[1]).parent.name}:" + "+".join(Path(p).stem for p in c[1:])
)
def test_every_config_runs_and_writes_what_it_says(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs write to relative run folders
    subcommand, configs = command[0], command[1:]
    config = _merged(configs)
    _prepare_inputs(config)
    init = config["model"].get("init_args", {})
    split_files = _short(config["data"]["class_path"]) == "SplitFileDataModule"
    # Two steps: a staged recipe (VL2V-ADiP) switches stage after the first, so both are run.
    staged = ["--model.init_args.align_steps=1"] if init.get("align_steps") else []
    # Deep prompts fit the tiny teacher's 1-layer text tower.
    if "depth" in init.get("prompt_learner", {}).get("init_args", {}):
        staged.append("--model.init_args.prompt_learner.init_args.depth=1")
    small = [*(SMALL_SPLIT_DATA if split_files else SMALL_DATA), *SMALL_RUN, *staged]
    cli = main([subcommand, *[a for c in configs for a in ("--config", str(ROOT / c))], *small])

    # What the configs name is what was built.
    assert type(cli.model).__name__ == _short(config["model"]["class_path"])
    assert type(cli.datamodule).__name__ == _short(config["data"]["class_path"])
    data = config["data"].get("init_args", {})
    if "train_domains" in data:
        assert list(cli.datamodule.id_domains) == data["train_domains"]
        assert list(cli.datamodule.ood_domains) == data["ood_domains"]
    if "student" in init:
        assert type(cli.model.student).__name__ == _short(init["student"]["class_path"])
    for key in ("objectives", "align_objectives"):
        if key in init:
            assert [type(o).__name__ for o in getattr(cli.model, key)] == [_short(o["class_path"]) for o in init[key]]
    if "model_name" in init and not init["model_name"].startswith("local-dir:"):
        from open_clip import get_model_config

        assert cli.model.open_clip_config["model_cfg"] == get_model_config(init["model_name"])

    # Everything the run writes lands under its one run folder.
    trainer = config["trainer"]
    root = tmp_path / trainer["default_root_dir"]
    assert Path(cli.trainer.default_root_dir).resolve() == root.resolve()
    if trainer.get("logger") is False:
        assert cli.trainer.logger is None and not (root / "logs").exists()
    else:
        log_dir = root / "logs" / "version_0"
        assert Path(cli.trainer.log_dir).resolve() == log_dir.resolve()
        with open(log_dir / "metrics.csv") as f:
            columns = set(next(csv.reader(f)))
        if subcommand == "fit":
            assert {"train/loss", "val/id_top1"} <= columns
            # Split files' held-out domains are test-only: validation stays in-distribution.
            assert ("val/ood_top1" in columns) == bool(cli.datamodule.ood_domains and not split_files)
            align_steps = cli.model.align_steps if isinstance(cli.model, DistillationModule) else 0
            for step in range(cli.trainer.global_step):  # every objective of each step's stage is logged
                stage = cli.model.align_objectives if step < align_steps else cli.model.objectives
                assert {f"train/loss_{o.name}" for o in stage} <= columns
            assert json.loads((log_dir / "zeroshot_val.json").read_text())["stage"] == "val"
            # Every fit keeps one resumable checkpoint at a fixed place (RunCheckpoint, added by the CLI).
            checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
            assert checkpoint["global_step"] == cli.trainer.global_step
            assert checkpoint["distill"]["module"] == type(cli.model).__name__
    if subcommand == "test":
        report = json.loads((root / "zeroshot_test.json").read_text())
        assert {"id_top1", "ood_top1", "i2t_r1", "t2i_r1"} <= set(report["metrics"])

    # A one-cycle schedule spans the run (its length is trainer.max_steps, not typed again).
    if init.get("lr_scheduler", {}).get("class_path", "").endswith("OneCycleLR"):
        assert cli.trainer.lr_scheduler_configs[0].scheduler.total_steps == cli.trainer.max_steps
    if init.get("export_dir") and isinstance(cli.model, AdaptationModule):
        _check_adaptation_export(cli.model, init, cli.datamodule.classnames[:5])
    # The teacher is exported as an open_clip local-dir that loads back as a teacher.
    elif init.get("export_dir"):
        from distill.teachers import Teacher

        exported = Path(init["export_dir"])
        saved = json.loads((exported / "open_clip_config.json").read_text())
        assert saved["model_cfg"] == cli.model.open_clip_config["model_cfg"]
        assert Teacher(model_name=f"local-dir:{exported}").embed_dim == saved["model_cfg"]["embed_dim"]


def _check_adaptation_export(module: AdaptationModule, init: dict[str, Any], classnames: list[str]) -> None:
    """An adaptation's export_dir: LoRA's adapters and merged open_clip folder (a teacher that
    encodes images as the adapted module does), a prompt learner's prompts.pt (the trained context;
    a fixed one makes a teacher whose class bank is the module's)."""
    from distill.prompt_files import load_prompt_file
    from distill.teachers import Teacher

    module.eval()  # compare outputs without dropout
    exported = Path(init["export_dir"])
    lora, learner = init.get("lora"), init.get("prompt_learner")
    written = {p.name for p in exported.iterdir()}
    expected = ({"adapters.safetensors", "open_clip"} if lora else set()) | ({"prompts.pt"} if learner else set())
    assert written == expected, f"{exported} holds {sorted(written)}, not {sorted(expected)}"
    if lora:
        base = Path(init["model_name"].removeprefix("local-dir:"))
        merged = Teacher(checkpoint=str(exported / "open_clip"))
        saved = json.loads((exported / "open_clip" / "open_clip_config.json").read_text())
        assert saved["model_cfg"] == json.loads((base / "open_clip_config.json").read_text())["model_cfg"]
        if not lora.get("quantize_base"):  # int8 matmuls round: only the float base matches exactly
            images = torch.rand(2, 3, 32, 32)
            with torch.no_grad():
                torch.testing.assert_close(merged.encode_image(images), module.encode_image(images))
    if learner:
        model = Teacher(model_name=init["model_name"]).model
        loaded = load_prompt_file(exported / "prompts.pt", model, module.tokenizer)
        assert type(loaded).__name__ == _short(learner["class_path"])
        trained = {k: v for k, v in module.prompt_learner.state_dict().items() if isinstance(v, torch.Tensor)}
        assert trained and all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())
        if not loaded.image_conditioned and not lora:
            prompted = Teacher(model_name=init["model_name"], prompts=str(exported / "prompts.pt"))
            templates = ["a {}."]
            torch.testing.assert_close(
                prompted.class_bank(classnames, templates), module.class_bank(classnames, templates)
            )


def _square_size(preprocess: dict) -> dict:
    """``size`` as (h, w): open_clip reads a ViT's from the model as a tuple, a config dict's int is the same square."""
    size = preprocess["size"]
    return {**preprocess, "size": tuple(size) if isinstance(size, (list, tuple)) else (size, size)}


@pytest.mark.parametrize("name", ["shapes-rn-teacher", "shapes-rn-student", "tiny-rn-test", "tiny-vit-test"])
def test_registered_model_configs_build_as_their_config_dicts(name, tmp_path):
    """A shipped model config by name = the same config given as a dict: weights, preprocessing,
    tokenizer; and its exported local-dir loads back in stock open_clip with the same weights."""
    import open_clip
    import torch

    from distill.clip_models import MODEL_CONFIG_DIR, build_clip, save_local_dir

    assert name in open_clip.list_models()
    config = json.loads((MODEL_CONFIG_DIR / f"{name}.json").read_text())
    torch.manual_seed(0)
    by_name = build_clip(model_name=name)
    torch.manual_seed(0)
    by_dict = build_clip(model_config=config)
    assert by_name.model_config == by_dict.model_config == config
    assert _square_size(by_name.preprocess_config) == _square_size(by_dict.preprocess_config)
    texts = ["a small red circle near the top", "drawing of a crimson disc"]
    assert torch.equal(by_name.tokenizer(texts), by_dict.tokenizer(texts))
    reference = by_dict.model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in by_name.model.state_dict().items())
    folder = save_local_dir(by_name.model, by_name.model_config, by_name.preprocess_config, tmp_path / name)
    reloaded = open_clip.create_model(f"local-dir:{folder}").state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in reloaded.items())


def test_open_clip_student_by_name_is_its_config_at_the_teacher_width():
    import open_clip
    import torch

    from distill.students import OpenClipStudent

    torch.manual_seed(0)
    by_name = OpenClipStudent(embed_dim=48, model_name="shapes-rn-student")
    torch.manual_seed(0)
    by_config = OpenClipStudent(embed_dim=48, model_config=open_clip.get_model_config("shapes-rn-student"))
    reference = by_config.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in by_name.state_dict().items())
    assert by_name.model_config["embed_dim"] == 48 and by_name.encode_image(torch.rand(2, 3, 32, 32)).shape == (2, 48)
    with pytest.raises(ValueError, match="got both model_name 'test_resnet' and model_config"):
        OpenClipStudent(embed_dim=48, model_name="test_resnet", model_config={})


def test_the_readme_own_data_overlay_runs_every_recipe_step(tmp_path, monkeypatch, tiny_local_dir):
    """The README's "Your own data" overlay, with its paths pointed at small local files, trains,
    tests and resumes a recipe: one overlay is all a user adds."""
    from distill import shapesworld as sw

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(# my_data\.yaml: (distill fit[^\n]+)\n.*?)```", readme, re.S)
    assert block, "README lost its own-data overlay"
    overlay = yaml.safe_load(block.group(1))
    monkeypatch.chdir(tmp_path)
    for split, domains in (("train", ["flat", "outline"]), ("val", ["flat", "sketch"]), ("test", ["flat", "sketch"])):
        sw.write_image_folder("data/shapes", split=split, num_items=14, domains=domains)
    overlay["model"]["init_args"]["teacher"] = {"model_name": f"local-dir:{tiny_local_dir}"}
    overlay["data"]["init_args"]["batch_size"] = 7
    (tmp_path / "my_data.yaml").write_text(yaml.safe_dump(overlay))
    configs = [arg for c in block.group(2).split()[3::2] for arg in ("--config", str(ROOT / c) if "/" in c else c)]
    small = ["--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--model.init_args.align_steps=1"]
    cli = main(["fit", *configs, *small])
    assert type(cli.datamodule).__name__ == "ImageTextDataModule" and cli.datamodule.ood_domains == ["sketch"]
    assert (tmp_path / "runs/my_student/checkpoints/last.ckpt").is_file()
    main(["test", *configs, "--ckpt_path=runs/my_student/checkpoints/last.ckpt", "--trainer.enable_progress_bar=false"])
    report = json.loads(next((tmp_path / "runs/my_student").rglob("zeroshot_test.json")).read_text())
    assert {"top1_flat", "top1_sketch", "ood_top1"} <= set(report["metrics"])
    resumed = main(["fit", *configs, *small[1:], "--trainer.max_steps=3", "--ckpt_path=last"])
    assert resumed.trainer.global_step == 3
