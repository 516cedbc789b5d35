import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import shapesworld as sw
from distill.datamodules import ShapesWorldDataModule
from distill.datamodules.shapesworld_datamodule import split_classes
from distill.shapesworld_text import SHAPE_SYNONYMS


def test_world_has_enough_classes_domains_and_colours():
    assert len(sw.class_names("shape")) >= 16
    assert len(sw.DOMAINS) >= 6
    assert len(sw.COLOURS) >= 8
    assert len(sw.class_names("shape_colour")) == len(sw.SHAPES) * len(sw.COLOURS)


def test_render_is_deterministic_and_seed_dependent():
    a, b = sw.render(5, seed=1), sw.render(5, seed=1)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(sw.render(5, seed=2).image, a.image)
    assert not np.array_equal(sw.render(5, seed=1, split="val").image, a.image)


def test_same_item_in_two_processes():
    code = (
        "import hashlib; from distill.shapesworld import render; it = render(123, seed=7, domain=3); "
        "print(hashlib.sha256(it.image.tobytes()).hexdigest(), it.caption)"
    )
    outs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert outs[0] == outs[1] and len(outs[0]) > 64


@pytest.mark.parametrize("domain", range(len(sw.DOMAINS)))
def test_every_domain_and_shape_renders(domain):
    for label in range(len(sw.SHAPES)):
        item = sw.render(label, domain=domain, label=label, image_size=48)
        assert item.image.shape == (48, 48, 3) and item.image.dtype == np.uint8
        assert item.image.std() > 5  # something was drawn
        assert item.label == label and item.domain == domain


def test_domains_look_different():
    images = [sw.render(0, domain=d, label=0).image.astype(float) for d in range(len(sw.DOMAINS))]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 3


def test_captions_vary_and_always_name_the_shape():
    captions = [sw.render(i, label=0).caption for i in range(200)]
    assert len(set(captions)) > 60
    synonyms = SHAPE_SYNONYMS["circle"]
    assert all(any(s in c.lower() for s in synonyms) for c in captions)
    assert any("circle" not in c.lower() for c in captions)  # synonyms are used


def test_shape_colour_task_labels():
    names = sw.class_names("shape_colour", num_colours=3)
    item = sw.render(0, task="shape_colour", num_colours=3, label=4)
    assert names[4] == f"{item.colour} {item.shape}"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        sw.render(0, split="training")
    with pytest.raises(ValueError, match="task"):
        sw.class_names("colour")
    with pytest.raises(ValueError, match="domain index 9"):
        sw.render(0, domain=9)


def test_base_novel_split_halves_sorted_names():
    names = ["b", "a", "d", "c", "e"]
    base, novel = split_classes(names, "base"), split_classes(names, "novel")
    assert sorted(names[i] for i in base) == ["a", "b", "c"]
    assert sorted(base + novel) == list(range(5))


def test_datamodule_batches_and_splits():
    dm = ShapesWorldDataModule(
        train_domains=["flat", "outline"],
        num_train=32,
        num_val=28,
        num_test=14,
        batch_size=8,
        train_classes="base",
        eval_classes="novel",
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"image", "caption", "label", "domain"}
    assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == torch.float32
    base = set(split_classes(dm.classnames, "base"))
    assert set(batch["label"].tolist()) <= base
    assert set(batch["domain"].tolist()) <= {0, 1}
    assert dm.ood_domains == ["texture", "shaded", "sketch", "pixel", "night"]
    val = next(iter(dm.val_dataloader()))
    assert set(val["label"].tolist()) <= set(split_classes(dm.classnames, "novel"))


def test_datamodule_uses_the_models_transform_and_tokenizer():
    class FakeModel:
        preprocess_train = staticmethod(lambda img: torch.zeros(3, 5, 5))
        preprocess_val = staticmethod(lambda img: torch.ones(3, 5, 5))
        tokenizer = staticmethod(lambda texts: torch.full((len(texts), 4), 7))

    from distill.datamodules.common import ModelIO

    dm = ShapesWorldDataModule(num_train=8, num_val=8, num_test=8, batch_size=4, cache_images=False)
    dm.io = ModelIO.from_model(FakeModel())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 5, 5) and batch["image"].sum() == 0
    assert batch["text"].shape == (4, 4)
    assert next(iter(dm.val_dataloader()))["image"].mean() == 1


def test_cached_and_uncached_items_match():
    kwargs = dict(num_train=6, num_val=7, num_test=7, batch_size=6)
    a = ShapesWorldDataModule(cache_images=True, **kwargs)
    b = ShapesWorldDataModule(cache_images=False, **kwargs)
    a.setup("fit"), b.setup("fit")
    assert torch.equal(next(iter(a.val_dataloader()))["image"], next(iter(b.val_dataloader()))["image"])


def test_unknown_domain_and_overlap_are_clear_errors():
    with pytest.raises(ValueError, match="unknown ShapesWorld domain.*'cartoon'"):
        ShapesWorldDataModule(train_domains=["flat", "cartoon"])
    with pytest.raises(ValueError, match="both in train_domains and ood_domains"):
        ShapesWorldDataModule(train_domains=["flat"], ood_domains=["flat"])


def test_write_image_folder_roundtrip(tmp_path):
    from PIL import Image

    csv_path = sw.write_image_folder(str(tmp_path), split="val", num_items=14, domains=["flat", "sketch"])
    rows = list(csv.DictReader(Path(csv_path).read_text().splitlines()))
    assert len(rows) == 14 and {r["domain"] for r in rows} == {"flat", "sketch"}
    first = rows[0]
    pixels = np.asarray(Image.open(tmp_path / first["filepath"]))
    expected = sw.render(0, split="val", domain=sw.DOMAINS.index(first["domain"]), label=int(first["label"]))
    assert np.array_equal(pixels, expected.image) and first["caption"] == expected.caption
