import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill import shapesworld as sw
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


def test_write_image_folder_roundtrip(tmp_path):
    from PIL import Image

    csv_path = sw.write_image_folder(str(tmp_path), split="val", num_items=14, domains=["flat", "sketch"])
    rows = list(csv.DictReader(Path(csv_path).read_text().splitlines()))
    assert len(rows) == 14 and {r["domain"] for r in rows} == {"flat", "sketch"}
    first = rows[0]
    pixels = np.asarray(Image.open(tmp_path / first["filepath"]))
    expected = sw.render(0, split="val", domain=sw.DOMAINS.index(first["domain"]), label=int(first["label"]))
    assert np.array_equal(pixels, expected.image) and first["caption"] == expected.caption


def test_domain_and_label_is_balanced():
    domains, labels = ["a", "b", "c"], [5, 7]
    pairs = [sw.domain_and_label(i, domains, labels) for i in range(12)]
    assert pairs[:4] == [("a", 5), ("b", 5), ("c", 5), ("a", 7)]
    assert sorted(pairs[:6]) == sorted((d, lab) for d in domains for lab in labels) and pairs[6:] == pairs[:6]


def test_image_folder_and_dataset_share_the_item_rule(tmp_path):
    from distill.datamodules.shapesworld_datamodule import ShapesWorldDataset

    names = ["outline", "night", "flat"]
    csv_path = sw.write_image_folder(str(tmp_path), split="test", num_items=20, domains=names, image_size=16)
    rows = list(csv.DictReader(Path(csv_path).read_text().splitlines()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test", "test.csv"]  # no temporary CSV left
    dataset = ShapesWorldDataset(
        "test",
        20,
        [sw.DOMAINS.index(n) for n in names],
        range(len(sw.SHAPES)),
        image_size=16,
        task="shape",
        num_colours=len(sw.COLOURS),
        second_object_prob=0.0,
        seed=0,
        cache=False,
    )
    for i, row in enumerate(rows):
        domain, label = sw.DOMAINS.index(row["domain"]), int(row["label"])
        assert dataset.domain_and_label(i) == (domain, label) == sw.domain_and_label(i, dataset.domains, dataset.labels)
        item, example = dataset.item(i), dataset[i]
        assert (item.domain, item.label, example["domain"], example["label"]) == (domain, label, domain, label)
        assert item.caption == row["caption"] == example["caption"]
