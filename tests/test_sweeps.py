"""Every W&B sweep file (sweeps/*.yaml) as W&B runs it: the sweep engine accepts it and suggests a run,
the agent's command for that suggestion (built with wandb's own helpers) starts ``distill fit`` here
on tiny data, and the sweep's metric is a key that run logs.

W&B's sweep engine is the open-source ``sweeps`` package, so this needs no account and no network;
the runs keep the W&B logger of configs/wandb.yaml with ``WANDB_MODE=disabled`` (built, writes nothing).
"""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
import yaml

from distill.callbacks.checkpoint import last_checkpoint
from distill.cli import main

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(ROOT.glob("sweeps/*.yaml"))
# Tiny data, two optimizer steps with one validation at step 2, every step logged.
SMALL_RUN = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
SMALL_DATA = {
    "ShapesWorldDataModule": [
        "--data.init_args.num_train=16",
        "--data.init_args.num_val=14",
        "--data.init_args.batch_size=7",
    ],
    "SplitFileDataModule": ["--data.init_args.shots=1", "--data.init_args.batch_size=8"],
}


@pytest.fixture(scope="module")
def sweeps_engine():
    """The ``sweeps`` package; its import warns about pydantic v1-style config (its business, not ours)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PydanticDeprecatedSince20 is a DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        import sweeps
    return sweeps


def _agent_command(sweep: dict[str, Any], suggestion: dict[str, Any]) -> list[str]:
    """The command ``wandb agent`` runs for a suggested run: wandb's helpers and the agent's macro
    expansion (``wandb/wandb_agent.py``, ``Agent._command_run``, non-Windows)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep["command"]))
    sweep_vars = sweep_utils.create_sweep_command_args({"args": suggestion})
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [sweep.get("program")]
    sweep_vars["args_json_file"] = ["args.json"]
    sweep_vars["env"] = ["/usr/bin/env"]
    expanded: list[str] = []
    for chunk in map(str, command):
        expanded += (sweep_vars.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return expanded


def _merged_configs(command: list[str]) -> dict[str, Any]:
    """The command's --config files merged as LightningCLI merges them (later keys win, lists whole)."""

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merged: dict[str, Any] = {}
    for path in [command[i + 1] for i, arg in enumerate(command) if arg == "--config"]:
        merge(merged, yaml.safe_load((ROOT / path).read_text()))
    return merged


def _leaves(node: Any, key: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a parsed YAML tree."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{key}.{k}" if key else str(k))]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, f"{key}.{i}")]
    return [(key, node)]


def _prepare_inputs(config: dict[str, Any]) -> None:
    """A tiny random teacher at the model folder the recipe names and, for split-file data, tiny
    split files where the recipe reads them (relative paths: the test runs in its tmp folder)."""
    from distill.clip_models import build_clip, save_local_dir

    init = config["model"]["init_args"]
    source = (init.get("teacher") or init)["model_name"]
    bundle = build_clip(model_name="tiny-rn-test")
    save_local_dir(bundle.model, bundle.model_config, bundle.preprocess_config, source.removeprefix("local-dir:"))
    data = config["data"]["init_args"]
    if config["data"]["class_path"] == "SplitFileDataModule":
        from distill.shapesworld_splits import write_split_files

        name = re.fullmatch(r"split_zhou_(.+)\.json", Path(data["split_file"]).name).group(1)
        write_split_files(
            data["root"],
            name=name,
            train_domains=["flat"],
            ood_domains=list(data.get("ood_split_files") or {}),
            num_train=80,
            num_val=80,
            num_test=80,
            image_size=32,
        )


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_wandb_agent_runs_the_sweep_unchanged(path, sweeps_engine, tmp_path, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    header = path.read_text()
    assert f"wandb sweep sweeps/{path.name}" in header and "wandb agent " in header, f"{path}: usage comment"

    # (a) W&B's engine, offline: the schema holds, a run is suggested, hyperband accepts the metric.
    assert sweeps_engine.schema_violations_from_proposed_config(sweep) == []
    suggestion = sweeps_engine.next_run(sweep, runs=[], validate=True)
    assert suggestion is not None and set(suggestion.config) == set(sweep["parameters"])
    logged = sweeps_engine.SweepRun(
        name="a", state=sweeps_engine.RunState.running, history=[{sweep["metric"]["name"]: 0.5}] * 4
    )
    assert sweeps_engine.stop_runs(sweep, [logged], validate=True) == []
    assert "None" not in {str(v["value"]) for v in suggestion.config.values()}, "use the string null for None"

    # (c) The agent's exact command, run here on tiny data with W&B built but disabled.
    command = _agent_command(sweep, suggestion.config)
    assert command[:3] == ["/usr/bin/env", "distill", "fit"], command
    assert command[-len(suggestion.config) :] == [f"--{k}={v['value']}" for k, v in suggestion.config.items()]
    config = _merged_configs(command)
    assert config["trainer"]["logger"]["class_path"].endswith("WandbLogger"), "sweeps log with configs/wandb.yaml"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    _prepare_inputs(config)
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    small = SMALL_DATA[config["data"]["class_path"]] + SMALL_RUN
    cli = main(command[2:] + small)  # command[2:]: "fit", its configs and flags

    # Every swept value is in the run's resolved config (config.yaml), but for the flags shrinking the run.
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    shrunk = {flag[2:].split("=")[0] for flag in small}
    for key, value in suggestion.config.items():
        node = saved
        for part in key.split("."):
            node = node[part]
        expected = None if value["value"] == "null" else value["value"]
        assert key in shrunk or node == expected or node == pytest.approx(expected), (
            f"{key}: {node} in config.yaml, swept {expected}"
        )
    # jsonargparse reads "null" as None for a module's own arguments but as the string "None" in nested
    # init_args (a prompt learner's): a sweep must not depend on that difference.
    strings = [v for _, v in _leaves(saved) if isinstance(v, str)]
    assert "None" not in strings, f"{path.name}: a value became the string 'None'"
    # ... and reached the module (a typo in a dotted key fails the parse above).
    for key, value in suggestion.config.items():
        if key.startswith("model.init_args.objective_overrides."):
            name, argument = key.split(".")[-2:]
            objectives = [*cli.model.objectives, *getattr(cli.model, "align_objectives", [])]
            assert all(getattr(o, argument) == pytest.approx(value["value"]) for o in objectives if o.name == name)
            assert any(o.name == name for o in objectives), f"{key}: no objective '{name}'"
        if key == "model.init_args.prompt_learner.init_args.n_ctx":  # not overruled by initialising words
            assert cli.model.prompt_learner.n_ctx == value["value"]
    assert (
        Path(cli.trainer.default_root_dir).resolve()
        == (tmp_path / sweep["parameters"]["trainer.default_root_dir"]["value"]).resolve()
    )

    # The W&B run ended with the command; the checkpoint keeps the swept loss terms (its hyperparameters).
    assert wandb.run is None
    overrides = torch.load(last_checkpoint(cli.trainer.default_root_dir), weights_only=True)["hyper_parameters"]
    for key, value in suggestion.config.items():
        if key.startswith("model.init_args.objective_overrides."):
            name, argument = key.split(".")[-2:]
            assert overrides["objective_overrides"][name][argument] == pytest.approx(value["value"])

    # (b) The metric the sweep optimises is a key the run logs (the CSV logger's columns = W&B's keys).
    with open(Path(cli.trainer.log_dir) / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert sweep["metric"]["name"] in columns, f"{path.name}: metric not logged; logged: {sorted(columns)}"


def test_a_misspelt_loss_term_fails_in_one_line(tmp_path, monkeypatch, capsys):
    """A sweep (or command line) naming no loss term stops before training, naming the valid terms."""
    sweep = yaml.safe_load((ROOT / "sweeps/distill.yaml").read_text())
    command = _agent_command(sweep, {"model.init_args.objective_overrides.logit_kd.weight": {"value": 2.0}})
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    _prepare_inputs(_merged_configs(command))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(SystemExit) as exit_info:
        main([*command[2:], "--model.init_args.objective_overrides.logit.temperature", "4"])  # "--flag value" form
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("distill: error: objective_overrides: 'logit' names no objective; valid names and")
    assert "logit_kd (weight, temperature, backend)" in err
