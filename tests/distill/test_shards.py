"""distill.shards: the shard writer (samples, pairs CSV, ShapesWorld), dataset.json, the reader, the command."""

import csv
import json
import subprocess
import sys

import pytest
import webdataset as wds

from distill import shapesworld as sw
from distill.shard_reader import BadSampleError, ShardReader
from distill.shards import (
    METADATA,
    csv_to_shards,
    load_metadata,
    shapesworld_to_shards,
    write_shards,
)

SMALL = dict(num_train=12, num_val=9, num_test=7, image_size=32, max_samples_per_shard=5)


def _rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_shapesworld_shards_hold_the_image_folders_items_byte_for_byte(tmp_path):
    written = shapesworld_to_shards(str(tmp_path / "shards"), train_domains=["flat", "sketch"], **SMALL)
    assert [(w["split"], w["samples"], len(w["shards"])) for w in written] == [
        ("train", 12, 3),
        ("val", 9, 2),
        ("test", 7, 2),
    ]
    meta = load_metadata(tmp_path / "shards")
    assert meta.classnames == sw.class_names("shape") and meta.domain_names == list(sw.DOMAINS)
    assert meta.ood_domains == [d for d in sw.DOMAINS if d not in ("flat", "sketch")]
    assert meta.templates == list(sw.ZERO_SHOT_TEMPLATES)
    assert meta.splits["train"].counts == [5, 5, 2] and meta.splits["train"].keys[7] == "train_00000007"
    assert not [p for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")]  # no temporary files left

    sw.write_image_folder(str(tmp_path / "folder"), "val", 9, ["flat", "sketch", *meta.ood_domains], image_size=32)
    reader = ShardReader(tmp_path / "shards", meta)
    for index, row in enumerate(_rows(tmp_path / "folder" / "val.csv")):
        sample = reader.read("val", index)
        assert sample["caption"] == row["caption"] and sample["index"] == index
        assert meta.classnames[sample["label"]] == row["classname"]
        assert meta.domain_names[sample["domain"]] == row["domain"]
    # webdataset's own reader reads the shards: the same keys, PNG bytes as write_image_folder wrote them.
    urls = [str(tmp_path / "shards" / name) for name in meta.splits["val"].shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == meta.splits["val"].keys
    rows = _rows(tmp_path / "folder" / "val.csv")
    assert [s["png"] for s in samples] == [(tmp_path / "folder" / r["filepath"]).read_bytes() for r in rows]
    assert [json.loads(s["json"]) for s in samples][:2] == [
        {"class": r["classname"], "domain": r["domain"]} for r in rows[:2]
    ]


@pytest.fixture
def folder(tmp_path):
    sw.write_image_folder(str(tmp_path), split="train", num_items=8, domains=["flat", "outline"], image_size=32)
    return tmp_path


def test_csv_to_shards_and_rewriting_a_split(folder):
    out = folder / "shards"
    written = csv_to_shards(str(folder / "train.csv"), str(folder), str(out), "train", max_samples_per_shard=3)
    assert written["samples"] == 8 and written["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    meta = load_metadata(out)
    rows = _rows(folder / "train.csv")
    assert meta.classnames == sorted({r["classname"] for r in rows}) and meta.domain_names == ["flat", "outline"]
    assert ShardReader(out, meta).read("train", 4)["caption"] == rows[4]["caption"]
    # A second split grows the (sorted) class list; rewriting the first with bigger shards drops its old shards.
    sw.write_image_folder(str(folder), split="val", num_items=20, domains=["night"], image_size=32)
    csv_to_shards(str(folder / "val.csv"), str(folder), str(out), "val", ood_domains=["night"])
    csv_to_shards(str(folder / "train.csv"), str(folder), str(out), "train", max_samples_per_shard=100)
    meta = load_metadata(out)
    assert meta.classnames == sorted({r["classname"] for r in rows + _rows(folder / "val.csv")})
    assert meta.ood_domains == ["night"] and list(meta.splits) == ["val", "train"]
    assert sorted(p.name for p in out.glob("train-*")) == ["train-000000.tar"]


def _edit(path, edit):
    rows = _rows(path)
    edit(rows)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_csv_errors_name_the_line_before_anything_is_written(folder):
    out = folder / "shards"
    _edit(folder / "train.csv", lambda rows: rows[2].update(caption="  "))  # CSV line 4
    with pytest.raises(ValueError, match=r"train.csv line 4: empty 'caption' cell"):
        csv_to_shards(str(folder / "train.csv"), str(folder), str(out))
    _edit(folder / "train.csv", lambda rows: rows[2].update(caption="a shape", classname="blob"))
    with pytest.raises(ValueError, match=r"train.csv line 4: class 'blob' is not in classnames"):
        csv_to_shards(str(folder / "train.csv"), str(folder), str(out), classnames=sw.class_names("shape"))
    (folder / "train" / "flat" / "000000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"train.csv line 2: image file not found.*000000.png"):
        csv_to_shards(str(folder / "train.csv"), str(folder), str(out))
    with pytest.raises(KeyError, match="no column 'text'"):
        csv_to_shards(str(folder / "train.csv"), str(folder), str(out), caption_column="text")
    assert not out.exists()


def _sample(key, caption="a red circle", **extra):
    return {"key": key, "image": b"\x89PNG...", "ext": "png", "caption": caption, **extra}


@pytest.mark.parametrize(
    "samples, message",
    [
        ([_sample("a"), _sample("a")], "key 'a' must be unique"),
        ([_sample("a.b")], "key 'a.b' must be unique and made of letters"),
        ([_sample("a", caption=" ")], r"train sample 0 \(a\): empty caption"),
        ([_sample("a", **{"class": "blob"})], r"class 'blob' is not in the given class list"),
        ([{**_sample("a"), "ext": "tiff"}], "needs image bytes and an ext in"),
        ([], "no samples to write for split 'train'"),
    ],
)
def test_write_shards_refuses_bad_samples(tmp_path, samples, message):
    with pytest.raises(ValueError, match=message):
        write_shards(samples, tmp_path, "train", classnames=["circle"])
    assert not list(tmp_path.glob("*.tar")) and not (tmp_path / METADATA).exists()


def test_item_keys_follow_the_content_of_each_shard(tmp_path):
    samples = [_sample(f"s{i}", caption=f"caption {i}") for i in range(5)]
    write_shards(samples, tmp_path, "train", max_samples_per_shard=2)
    keys = load_metadata(tmp_path).splits["train"].item_keys()
    assert len(set(keys)) == 5 and keys[3].endswith("/s3")
    write_shards(samples, tmp_path, "train", max_samples_per_shard=2)  # same data, same bytes: same keys
    assert load_metadata(tmp_path).splits["train"].item_keys() == keys
    samples[2]["caption"] = "another caption"  # shard 1 holds samples 2 and 3
    write_shards(samples, tmp_path, "train", max_samples_per_shard=2)
    changed = load_metadata(tmp_path).splits["train"].item_keys()
    assert [a == b for a, b in zip(keys, changed)] == [True, True, False, False, True]


def test_metadata_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / METADATA} not found"):
        load_metadata(tmp_path)
    (tmp_path / METADATA).write_text('{"format": "distill-webdataset", "splits": {')
    with pytest.raises(ValueError, match=rf"{tmp_path / METADATA} is not valid JSON"):
        load_metadata(tmp_path)
    (tmp_path / METADATA).write_text('{"splits": {}}')
    with pytest.raises(ValueError, match="is not a distill shard index"):
        load_metadata(tmp_path)
    with pytest.raises(ValueError, match="is not a distill shard index"):  # the writer leaves a foreign file alone
        write_shards([_sample("a")], tmp_path, "train")
    (tmp_path / METADATA).unlink()
    write_shards([_sample("a"), _sample("b")], tmp_path, "train")
    data = json.loads((tmp_path / METADATA).read_text())
    data["splits"]["train"]["keys"].pop()
    (tmp_path / METADATA).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"split 'train' lists 1 shards, 1 digests, 1 counts summing to 2 and 1 keys"):
        load_metadata(tmp_path)


def test_reader_names_shard_and_key_of_a_bad_sample(tmp_path):
    write_shards([_sample("ok_1"), _sample("bad_2")], tmp_path, "train")
    reader = ShardReader(tmp_path, load_metadata(tmp_path))
    with pytest.raises(BadSampleError, match=r"train-000000.tar: sample 'ok_1': its .png image cannot be read") as err:
        reader.read("train", 0)
    assert err.value.key == "ok_1" and err.value.shard == tmp_path / "train-000000.tar"


def test_the_command_line_writes_and_reports(folder):
    run = [sys.executable, "-m", "distill.shards"]
    csv_run = subprocess.run(
        [*run, "csv", f"--csv={folder / 'train.csv'}", f"--root={folder}", f"--output_dir={folder / 'out'}"],
        capture_output=True,
        text=True,
    )
    assert csv_run.returncode == 0, csv_run.stderr
    assert csv_run.stdout.strip() == f"train: 8 samples in 1 shard(s); {folder / 'out' / METADATA}"
    world = subprocess.run(
        [*run, "shapesworld", f"--output_dir={folder / 'sw'}", "--num_train=3", "--num_val=2", "--num_test=2"],
        capture_output=True,
        text=True,
    )
    assert world.returncode == 0, world.stderr
    assert world.stdout.splitlines()[2] == f"test: 2 samples in 1 shard(s); {folder / 'sw' / METADATA}"
