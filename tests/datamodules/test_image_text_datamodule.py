"""The user-data path: image-text pairs from CSV files (ShapesWorld writes that layout)."""

import csv

import pytest
from torchvision.transforms.functional import pil_to_tensor

from distill import shapesworld as sw
from distill.cli import main
from distill.datamodules import ImageTextDataModule, ModelIO


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
