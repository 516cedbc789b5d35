"""ShapesWorld written as CoOp split files: layout, balance, pixels, atomicity and the command line."""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from distill import shapesworld as sw
from distill.shapesworld_splits import write_split_files

SMALL = dict(task="shape", train_domains=["flat", "outline"], ood_domains=["sketch"], num_train=64, num_val=32)


def _domain(entry):
    return entry[0].split("/")[1]  # images/<domain>/<split>_<index>.png


def test_layout_balance_and_pixels(tmp_path):
    paths = write_split_files(str(tmp_path), name="Shapes", num_test=32, seed=3, **SMALL)
    assert paths == {
        "main": str(tmp_path / "split_zhou_Shapes.json"),
        "sketch": str(tmp_path / "split_zhou_Shapes_sketch.json"),
    }
    names = sw.class_names("shape")
    assert (tmp_path / "classnames.txt").read_text().splitlines() == names
    main = json.loads((tmp_path / "split_zhou_Shapes.json").read_text())
    assert {k: len(v) for k, v in main.items()} == {"train": 64, "val": 32, "test": 32}
    # 64 train items = 2 domains x 16 classes x 2: every (domain, class) pair twice.
    assert Counter((_domain(e), e[1]) for e in main["train"]) == {
        (d, c): 2 for d in ("flat", "outline") for c in range(16)
    }
    assert all(names[label] == classname for _, label, classname in main["train"] + main["val"] + main["test"])
    ood = json.loads((tmp_path / "split_zhou_Shapes_sketch.json").read_text())
    assert ood["train"] == ood["val"] == [] and len(ood["test"]) == 32
    assert {_domain(e) for e in ood["test"]} == {"sketch"}
    assert Counter(e[1] for e in ood["test"]) == dict.fromkeys(range(16), 2)
    # A PNG holds exactly the rendered item (train item 5: outline domain, label 2).
    path, label, _ = main["train"][5]
    assert path == "images/outline/train_000005.png" and label == 2
    item = sw.render(5, seed=3, split="train", domain=sw.DOMAINS.index("outline"), label=2, task="shape")
    assert np.array_equal(np.asarray(Image.open(tmp_path / path)), item.image)
    # OOD items are new items (indices after the main test split's), not main test items restyled.
    assert ood["test"][0][0] == "images/sketch/test_000032.png"


def test_bad_arguments_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"train_domains: unknown ShapesWorld domain\(s\) \['cartoon'\]"):
        write_split_files(str(tmp_path / "a"), train_domains=["cartoon"])
    with pytest.raises(ValueError, match=r"domains \['sketch'\] are both in train_domains and ood_domains"):
        write_split_files(str(tmp_path / "a"), train_domains=["flat", "sketch"])
    with pytest.raises(ValueError, match=r"num_val=100 is too small: 80 shape_position classes x 4 domain\(s\)"):
        write_split_files(str(tmp_path / "a"), num_val=100)
    with pytest.raises(ValueError, match="name must be letters"):
        write_split_files(str(tmp_path / "a"), name="my data")
    assert not (tmp_path / "a").exists()


def test_split_files_are_written_last(tmp_path, monkeypatch):
    calls = []
    real = sw.render

    def failing(index, **kwargs):
        calls.append(index)
        if len(calls) == 100:
            raise RuntimeError("disk full")
        return real(index, **kwargs)

    monkeypatch.setattr(sw, "render", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_split_files(str(tmp_path), num_test=32, **SMALL)
    assert not list(tmp_path.glob("*.json")) and not (tmp_path / "classnames.txt").exists()


def test_command_line(tmp_path):
    args = ["--root", str(tmp_path), "--task", "shape", "--train_domains", "[flat]", "--ood_domains", "[night]"]
    args += ["--num_train", "16", "--num_val", "16", "--num_test", "16"]
    done = subprocess.run(
        [sys.executable, "-m", "distill.shapesworld_splits", *args], capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == {
        "main": str(tmp_path / "split_zhou_ShapesWorld.json"),
        "night": str(tmp_path / "split_zhou_ShapesWorld_night.json"),
    }
    assert len(list((tmp_path / "images" / "night").glob("*.png"))) == 16
