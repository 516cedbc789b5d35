"""The user-data path: image-text pairs from CSV files (ShapesWorld writes that layout)."""

import csv
import json

import pytest
from torchvision.transforms.functional import pil_to_tensor

from distill import shapesworld as sw
from distill.cli import main
from distill.datamodules import ImageTextDataModule, ModelIO
from distill.datamodules.image_text_datamodule import UnreadableImageError


def _to_float(image):
    return pil_to_tensor(image).float() / 255


@pytest.fixture
def folder(tmp_path):
    sw.write_image_folder(str(tmp_path), split="train", num_items=16, domains=["flat", "outline"])
    sw.write_image_folder(str(tmp_path), split="val", num_items=14, domains=["flat", "sketch"])
    return tmp_path


def test_batches_classes_and_domains(folder):
    dm = ImageTextDataModule(
        root=str(folder),
        train_csv=str(folder / "train.csv"),
        val_csv=str(folder / "val.csv"),
        ood_domains=["sketch"],
        batch_size=4,
    )
    dm.connect(ModelIO(train_transform=_to_float, eval_transform=_to_float))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4
    rows = list(csv.DictReader((folder / "train.csv").read_text().splitlines()))
    val_rows = list(csv.DictReader((folder / "val.csv").read_text().splitlines()))
    assert dm.classnames == sorted({r["classname"] for r in rows + val_rows})
    assert dm.id_domains == ["flat", "outline"] and dm.ood_domains == ["sketch"]
    for index, label, caption in zip(batch["index"], batch["label"], batch["caption"]):
        assert rows[index]["classname"] == dm.classnames[label] and rows[index]["caption"] == caption


def test_errors_name_the_file_and_column(folder):
    with pytest.raises(KeyError, match="no column 'text'"):
        ImageTextDataModule(root=str(folder), train_csv=str(folder / "train.csv"), caption_column="text")
    with pytest.raises(FileNotFoundError, match="CSV file not found"):
        ImageTextDataModule(root=str(folder), train_csv=str(folder / "nope.csv"))
    (folder / "train" / "flat" / "000000.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 image files not found.*000000.png"):
        ImageTextDataModule(root=str(folder), train_csv=str(folder / "train.csv"))
    with pytest.raises(ValueError, match="do not occur"):
        ImageTextDataModule(root=str(folder), val_csv=str(folder / "val.csv"), ood_domains=["night"])


def test_zero_shot_validation_on_csv_data(folder, tiny_local_dir, monkeypatch):
    monkeypatch.chdir(folder)
    cli = main(
        [
            "validate",
            "--model=ZeroShotModule",
            f"--model.init_args.model_name=local-dir:{tiny_local_dir}",
            "--data=ImageTextDataModule",
            f"--data.init_args.root={folder}",
            "--data.init_args.val_csv=val.csv",
            "--data.init_args.ood_domains=[sketch]",
            "--trainer.callbacks+=ZeroShotEvaluation",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
        ]
    )
    assert {"val/top1_flat", "val/top1_sketch", "val/ood_top1", "val/t2i_r5"} <= set(cli.trainer.callback_metrics)


def _write_csv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _edit_csv(path, edit):
    """Rewrite a CSV after ``edit(rows)`` changed its list of row dicts in place."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    edit(rows)
    _write_csv(path, rows)
    return rows


def _blank_classes(rows):
    for i in (2, 5):  # CSV lines 4 and 7 (header = line 1)
        rows[i]["classname"] = ""


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_rows_without_a_class_are_an_error_naming_file_lines_and_column(folder):
    _edit_csv(folder / "val.csv", _blank_classes)
    with pytest.raises(ValueError, match=r"val.csv: 2 rows with an empty 'classname' cell, on line\(s\) 4, 7 "):
        ImageTextDataModule(root=str(folder), val_csv=str(folder / "val.csv"))
    dm = ImageTextDataModule(root=str(folder), val_csv=str(folder / "val.csv"), unlabelled_rows="retrieval_only")
    labels = dm.split_dataset("val").labels
    assert labels[2] == labels[5] == -1 and min(labels[:2] + labels[6:]) >= 0 and dm.allows_unlabelled
    # A CSV without the class column at all holds pairs only, as before.
    _edit_csv(folder / "train.csv", lambda rows: [r.pop("classname") for r in rows])
    pairs = ImageTextDataModule(root=str(folder), train_csv=str(folder / "train.csv"))
    assert pairs.classnames == [] and set(pairs.split_dataset("train").labels) == {-1}


def _validate(folder, tiny_local_dir, csv_name, *extra):
    callback = f"{{class_path: ZeroShotEvaluation, init_args: {{report_dir: {folder / csv_name}.out}}}}"
    cli = main(
        [
            "validate",
            "--model=ZeroShotModule",
            f"--model.init_args.model_name=local-dir:{tiny_local_dir}",
            "--data=ImageTextDataModule",
            f"--data.init_args.root={folder}",
            f"--data.init_args.val_csv={folder / csv_name}",
            "--data.init_args.ood_domains=[sketch]",
            *extra,
            f"--trainer.callbacks+={callback}",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
        ]
    )
    report = json.loads((folder / f"{csv_name}.out" / "zeroshot_val.json").read_text())
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}, report["counts"]


def test_retrieval_only_rows_leave_accuracy_to_the_labelled_rows(folder, tiny_local_dir):
    rows = _edit_csv(folder / "val.csv", _blank_classes)
    _write_csv(folder / "labelled.csv", [r for i, r in enumerate(rows) if i not in (2, 5)])
    mixed, counts = _validate(folder, tiny_local_dir, "val.csv", "--data.init_args.unlabelled_rows=retrieval_only")
    labelled, _ = _validate(folder, tiny_local_dir, "labelled.csv")
    top1 = [k for k in labelled if "top" in k]
    assert top1 and {k: mixed[k] for k in top1} == pytest.approx({k: labelled[k] for k in top1})
    assert counts["items"] == counts["retrieval_items"] == 14 and counts["unlabelled_items"] == 2


def test_a_corrupt_image_is_an_error_naming_file_and_line_or_is_skipped(folder, recwarn):
    rows = list(csv.DictReader((folder / "train.csv").read_text().splitlines()))
    _truncate(folder / rows[3]["filepath"])  # CSV line 5
    with pytest.raises(
        UnreadableImageError, match=rf"train.csv: 1 image file\(s\) cannot be read: line 5: .*{rows[3]['filepath']}"
    ):
        ImageTextDataModule(root=str(folder), train_csv=str(folder / "train.csv"))
    dm = ImageTextDataModule(root=str(folder), train_csv=str(folder / "train.csv"), skip_bad_images=True)
    assert dm.num_items("train") == 15 and [line for line, _, _ in dm.tables["train"].skipped] == [5]
    assert any("skipped 1 unreadable image file(s)" in str(w.message) for w in recwarn)
    # A file broken after the check: loading it names the file and its CSV line.
    _truncate(folder / rows[0]["filepath"])
    with pytest.raises(UnreadableImageError, match=rf"train.csv line 2: cannot decode image .*{rows[0]['filepath']}"):
        dm.split_dataset("train")[0]


def test_a_json_split_file_or_an_empty_csv_says_what_is_expected(folder):
    split = folder / "split_zhou_OxfordPets.json"
    split.write_text(json.dumps({"train": [["a/1.jpg", 0, "cat"]], "val": [], "test": []}))
    expected = "a CSV file with a header row naming the columns 'path', 'caption' and optionally 'classname', 'domain'"
    with pytest.raises(ValueError) as err:
        ImageTextDataModule(root=str(folder), train_csv=str(split), image_column="path")
    assert "is a JSON file" in str(err.value) and expected in str(err.value)
    assert "Read CoOp split files with SplitFileDataModule" in str(err.value)
    indented = folder / "split.txt"
    indented.write_text(json.dumps({"train": []}, indent=2))
    with pytest.raises(ValueError, match="ImageTextDataModule reads CSV files"):
        ImageTextDataModule(root=str(folder), test_csv=str(indented))
    (folder / "empty.csv").write_text("filepath,caption\n")
    with pytest.raises(ValueError, match="empty.csv: no rows; ImageTextDataModule expects a CSV file with a header"):
        ImageTextDataModule(root=str(folder), val_csv=str(folder / "empty.csv"))


def test_an_empty_caption_is_an_error_naming_file_and_lines(folder):
    _edit_csv(folder / "train.csv", lambda rows: [rows[i].update(caption=" ") for i in (1, 6)])  # lines 3 and 8
    with pytest.raises(ValueError, match=r"train.csv: 2 rows with an empty 'caption' cell, on line\(s\) 3, 8 "):
        ImageTextDataModule(root=str(folder), train_csv=str(folder / "train.csv"))


def test_classnames_fix_the_label_order_and_refuse_other_classes(folder):
    names = sw.class_names("shape")  # ShapesWorld's label order, not sorted
    dm = ImageTextDataModule(root=str(folder), train_csv=str(folder / "train.csv"), classnames=names)
    rows = list(csv.DictReader((folder / "train.csv").read_text().splitlines()))
    assert dm.classnames == names and dm.split_dataset("train").labels == [int(r["label"]) for r in rows]
    _edit_csv(folder / "train.csv", lambda rows: rows[4].update(classname="blob"))  # CSV line 6
    with pytest.raises(ValueError, match=r"train.csv: 1 row with a class not in classnames, e.g. line 6: 'blob'"):
        ImageTextDataModule(root=str(folder), train_csv=str(folder / "train.csv"), classnames=names)
    with pytest.raises(ValueError, match="classnames must be a non-empty list of distinct names"):
        ImageTextDataModule(root=str(folder), train_csv=str(folder / "train.csv"), classnames=["a", "a"])
