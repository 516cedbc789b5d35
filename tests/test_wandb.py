"""``distill fit`` with configs/wandb.yaml, offline: the W&B run holds what the CSV logs hold (the same
metric keys), the resolved config and run_info, and nothing tries the network.

The run is a subprocess (its exit tears the wandb service down) against a closed port as W&B's
server, so any network attempt would fail and be logged. The ``.wandb`` file is read record by
record with wandb's protobuf ``Record``; its container is the LevelDB log format (W&B header, 32 KiB
blocks of CRC-checked chunks), which wandb 0.31 no longer reads from Python.
"""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# W&B's own bookkeeping in every history row (the CSV logger's counterpart is its "step" column).
WANDB_ONLY_KEYS = {"_step", "_runtime", "_timestamp", "trainer/global_step"}
NETWORK_FAILURE = re.compile(r"connection refused|dial tcp|retrying error|failed to connect|127\.0\.0\.1:9\b", re.I)


def _tiny_config(teacher: Path) -> dict[str, Any]:
    """Distil the tiny random teacher into a tiny timm student: 3 steps, one zero-shot validation."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 3,
            "val_check_interval": 3,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "run",
            "callbacks": [
                {"class_path": "ZeroShotEvaluation", "init_args": {"retrieval": False}},
                {"class_path": "TeacherStudentDiagnostics"},
                {"class_path": "RunReport"},
            ],
        },
        "model": {
            "class_path": "DistillationModule",
            "init_args": {
                "teacher": {"model_name": f"local-dir:{teacher}"},
                "student": {
                    "class_path": "distill.students.TimmStudent",
                    "init_args": {"model_name": "test_resnet", "image_size": 32},
                },
                "objectives": [
                    {"class_path": "distill.kd_objectives.LabelCrossEntropy"},
                    {"class_path": "distill.kd_objectives.LogitDistillation"},
                ],
                "objective_overrides": {"logit_kd": {"temperature": 4.0}},
            },
        },
        "data": {
            "class_path": "ShapesWorldDataModule",
            "init_args": {
                "train_domains": ["flat", "outline"],
                "ood_domains": ["sketch"],
                "num_train": 14,
                "num_val": 12,
                "batch_size": 7,
                "image_size": 32,
            },
        },
    }


def _records(path: Path) -> list[Any]:
    """Every record of a ``.wandb`` file, as ``wandb_internal_pb2.Record`` (checksums verified)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), f"{path} is not a W&B data file"
    block, header = 32768, 7
    records, pending, pos = [], b"", header
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        chunk = data[pos + header : pos + header + length]
        pos += header + length
        if kind == 0 and length == 0:  # zero padding
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: corrupt chunk before byte {pos}"
        pending += chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _history_keys(records: list[Any]) -> set[str]:
    return {item.key or "/".join(item.nested_key) for r in records if r.HasField("history") for item in r.history.item}


def _config(records: list[Any]) -> dict[str, Any]:
    """The run's config: every config update in order (the last value of a key wins)."""
    config: dict[str, Any] = {}
    for record in records:
        updates = record.config.update if record.HasField("config") else []
        updates = record.run.config.update if record.HasField("run") else updates
        for item in updates:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


def _media_and_files(records: list[Any]) -> tuple[dict[str, str], set[str]]:
    """What the run logged besides numbers: {history key: W&B media type (image-file, table-file...)}
    and the paths of its file records (relative to the run's ``files`` folder)."""
    media = {}
    for record in records:
        for item in record.history.item if record.HasField("history") else []:
            value = json.loads(item.value_json)
            if list(item.nested_key[-1:]) == ["_type"]:  # a media value, flattened: <key>/_type, <key>/path...
                media["/".join(item.nested_key[:-1])] = value
            elif isinstance(value, dict) and "_type" in value:
                media[item.key or "/".join(item.nested_key)] = value["_type"]
    files = {f.path for r in records if r.HasField("files") for f in r.files.files}
    return media, files


def test_offline_wandb_run_logs_what_the_csv_logs(tmp_path, tiny_local_dir):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(_tiny_config(tiny_local_dir)))
    home = tmp_path / "wandb_home"
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # a closed port: any network attempt fails (and is logged)
        "WANDB_DIR": str(home),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_SILENT": "true",
    }
    env.pop("WANDB_API_KEY", None)
    command = [
        sys.executable,
        "-m",
        "distill",
        "fit",
        "--config",
        "tiny.yaml",
        "--config",
        str(ROOT / "configs/wandb.yaml"),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    # The CSV logger stays first: the log dir, metrics.csv and run_info.json are where they always were.
    log_dir = tmp_path / "run/logs/version_0"
    with open(log_dir / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    run_info = json.loads((log_dir / "run_info.json").read_text())
    assert (log_dir / "config.yaml").is_file()

    # The offline run sits in the run folder; its metrics are the CSV's, under the same keys.
    (run_dir,) = (tmp_path / "run/wandb").glob("offline-run-*")
    (data_file,) = run_dir.glob("*.wandb")
    records = _records(data_file)
    media, files = _media_and_files(records)
    numbers = {k for k in _history_keys(records) if not any(k == m or k.startswith(f"{m}/") for m in media)}
    assert numbers - WANDB_ONLY_KEYS == columns - {"step"}
    assert {"train/loss", "train/loss_logit_kd", "val/id_top1", "val/ood_top1"} <= columns

    # The resolved config (what --print_config shows) and run_info are in the run's config.
    config = _config(records)
    assert {"model", "trainer", "data", "run_info"} <= set(config)
    model = config["model"]
    assert model["class_path"] == "distill.modules.DistillationModule"
    assert model["init_args"]["objective_overrides"] == {"logit_kd": {"temperature": 4.0}}
    assert config["trainer"]["max_steps"] == 3 and config["data"]["init_args"]["num_train"] == 14
    logged_info = config["run_info"]
    assert logged_info["git_commit"] == run_info["git_commit"]
    assert logged_info["teacher"]["weights_sha256"] == run_info["teacher"]["weights_sha256"]
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", run_info["git_commit"])

    # ---- W&B media and files: plots and tables that callbacks log as W&B media are asserted here ----
    # The plots of the last validation, the diagnostics table and the run's HTML page.
    names = ("domain_top1", "diagnostics", "confusion", "retrieval")
    plots = {f"val/plots/{name}": "images/separated" for name in names}
    assert plots.items() <= media.items(), media
    assert media.get("val/plots/retention", "images/separated") == "images/separated"  # when the teacher scores > 0
    assert media["val/diagnostics"] == "table-file" and media["report/fit"] == "html-file"
    assert all(key.split("/", 1)[0] in ("val", "report") for key in media), media
    assert all((run_dir / "files" / path).is_file() for path in files), files
    images = [path for path in files if path.endswith(".png")]
    assert len(images) >= len(plots)

    # Nothing tried the network.
    logs = [done.stdout, done.stderr] + [p.read_text(errors="replace") for p in tmp_path.rglob("*.log")]
    failures = [line for text in logs for line in text.splitlines() if NETWORK_FAILURE.search(line)]
    assert not failures, failures[:5]


def test_the_csv_logger_stays_first_beside_configured_loggers(tmp_path, tiny_local_dir, monkeypatch):
    """One W&B logger or a list: the run's CSV logger comes first (the log dir stays), unless the list has one;
    W&B writes under the run folder; ``--trainer.logger=false`` still means no logger."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from distill.cli import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(_tiny_config(tiny_local_dir)))
    base = ["--config", "tiny.yaml", "--config", str(ROOT / "configs/wandb.yaml")]

    cli = main(base, run=False)
    csv_logger, wandb_logger = cli.trainer.loggers
    assert type(csv_logger) is CSVLogger and type(wandb_logger) is WandbLogger
    assert Path(cli.trainer.log_dir) == Path("run/logs/version_0") and wandb_logger.save_dir == "run"

    assert main([*base, "--trainer.logger=false"], run=False).trainer.loggers == []

    both = yaml.safe_dump(
        [
            {"class_path": "CSVLogger", "init_args": {"save_dir": "elsewhere", "name": "csv"}},
            {"class_path": "WandbLogger", "init_args": {"save_dir": "w"}},
        ]
    )
    loggers = main(["--config", "tiny.yaml", f"--trainer.logger={both}"], run=False).trainer.loggers
    assert [(type(x).__name__, x.save_dir) for x in loggers] == [("CSVLogger", "elsewhere"), ("WandbLogger", "w")]
