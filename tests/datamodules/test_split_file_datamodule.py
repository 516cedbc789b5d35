"""CoOp split files: classes, few-shot and base-to-novel protocols, OOD domains, and the errors."""

import json
import math
from collections import Counter

import pytest
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from distill import shapesworld as sw
from distill.datamodules import ModelIO, SplitFileDataModule
from distill.datamodules.image_text_datamodule import UnreadableImageError
from distill.datamodules.split_files import class_subset, read_classnames_file
from distill.shapesworld_splits import write_split_files

NAMES = sw.class_names("shape")  # 16 classes


def _to_float(image):
    return pil_to_tensor(image).float() / 255


@pytest.fixture
def data(tmp_path):
    """ShapesWorld "shape" split files: 3 train, 2 val, 2 test items per class; a sketch OOD file."""
    paths = write_split_files(
        str(tmp_path / "data"), task="shape", train_domains=["flat"], ood_domains=["sketch"],
        num_train=48, num_val=32, num_test=32,
    )  # fmt: skip
    return tmp_path / "data", paths


def _dm(data, **kwargs):
    root, paths = data
    return SplitFileDataModule(root=str(root), split_file=paths["main"], **kwargs)


def _per_class(dataset):
    return Counter(dataset.labels)


def _edit(path, edit):
    splits = json.loads(path.read_text())
    edit(splits)
    path.write_text(json.dumps(splits))


def test_classes_labels_domains_and_a_batch(data):
    root, paths = data
    dm = _dm(data, ood_split_files={"sketch": paths["sketch"]}, batch_size=8)
    assert dm.classnames == NAMES and dm.templates == ["a photo of a {}."]
    assert dm.domain_names == ["ShapesWorld", "sketch"] and dm.id_domains == ["ShapesWorld"]
    assert dm.ood_domains == ["sketch"] and not dm.allows_unlabelled
    assert dm.eval_class_indices == dm.train_class_indices == list(range(16))
    assert (dm.num_items("train"), dm.num_items("val"), dm.num_items("test")) == (48, 32, 64)
    dm.connect(ModelIO(train_transform=_to_float, eval_transform=_to_float))
    batch = next(iter(dm.test_dataloader()))
    entries = json.loads((root / "split_zhou_ShapesWorld.json").read_text())["test"]
    assert batch["image"].shape == (8, 3, 64, 64) and batch["domain"].tolist() == [0] * 8
    for index, label, caption in zip(batch["index"], batch["label"], batch["caption"]):
        assert entries[index][1] == label and caption == f"a photo of a {entries[index][2]}."
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (8, 3, 64, 64) and train["label"].max() < 16
    raw = dm.raw_samples("test", limit=3)
    assert isinstance(raw[0]["image"], Image.Image) and raw[-1]["domain"] == 1  # last item: the OOD domain


def test_ood_domains_are_in_test_only(data):
    _, paths = data
    dm = _dm(data, ood_split_files={"sketch": paths["sketch"]}, domain_name="flat")
    test = dm.split_dataset("test")
    assert Counter(test.domains) == {0: 32, 1: 32} and set(dm.split_dataset("val").domains) == {0}
    assert all(e.path.startswith("images/sketch/") for e, d in zip(test.entries, test.domains) if d == 1)
    assert dm.domain_names == ["flat", "sketch"]


@pytest.mark.parametrize("shots", [1, 2])
def test_few_shot_takes_k_per_class_and_min_k_4_for_val(data, shots):
    dm = _dm(data, shots=shots, seed=1)
    assert _per_class(dm.split_dataset("train")) == dict.fromkeys(range(16), shots)
    assert _per_class(dm.split_dataset("val")) == dict.fromkeys(range(16), min(shots, 4))
    assert dm.num_items("test") == 32  # the full test split
    same = _dm(data, shots=shots, seed=1)
    assert same.split_dataset("train").entries == dm.split_dataset("train").entries
    other = _dm(data, shots=shots, seed=2)
    assert other.split_dataset("train").entries != dm.split_dataset("train").entries


def test_few_shot_selection_ignores_entry_order_and_other_classes(data):
    root, _ = data
    before = [e.path for e in _dm(data, shots=2, seed=3).split_dataset("train").entries]
    _edit(root / "split_zhou_ShapesWorld.json", lambda s: s["train"].reverse())
    after = _dm(data, shots=2, seed=3)
    assert sorted(e.path for e in after.split_dataset("train").entries) == sorted(before)
    base = _dm(data, shots=2, seed=3, train_classes="base")
    assert {e.path for e in base.split_dataset("train").entries} == {
        e.path for e in after.split_dataset("train").entries if e.label < 8
    }


def test_base_to_novel_splits_by_sorted_label(data):
    assert class_subset(16, "base") == list(range(8)) and class_subset(5, "base") == [0, 1, 2]
    assert class_subset(5, "novel") == [3, 4] and class_subset(5, "all") == list(range(5))
    # By label, not by name: sorted names would start with "arrow" (label 11).
    dm = _dm(data, shots=2, train_classes="base")
    assert dm.train_class_indices == dm.eval_class_indices == list(range(8))
    assert set(dm.split_dataset("val").labels) == set(dm.split_dataset("test").labels) == set(range(8))
    novel = _dm(data, train_classes="base", eval_classes="novel")
    assert novel.eval_class_indices == list(range(8, 16)) and novel.train_class_indices == list(range(8))
    assert set(novel.split_dataset("test").labels) == set(range(8, 16)) and novel.num_items("test") == 16
    assert novel.classnames == NAMES  # labels keep indexing the full class list


def test_odd_class_count_puts_the_middle_class_in_base(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    entries = [["a.png", i, f"class{i}"] for i in range(5)]
    split = tmp_path / "split_zhou_Tiny.json"
    split.write_text(json.dumps({"train": entries, "val": entries, "test": entries}))
    dm = SplitFileDataModule(root=str(tmp_path), split_file=str(split), train_classes="base", eval_classes="novel")
    assert dm.train_class_indices == list(range(math.ceil(5 / 2))) and dm.eval_class_indices == [3, 4]
    assert dm.domain_names == ["Tiny"]


def test_classnames_file_variants(data, tmp_path):
    names = [f"my_class_{i}" for i in range(16)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n\n")
    dm = _dm(data, classnames_file=str(tmp_path / "names.txt"))
    assert dm.classnames == [n.replace("_", " ") for n in names]
    assert _dm(data, classnames_file=str(tmp_path / "names.txt"), underscores_to_spaces=False).classnames == names
    (tmp_path / "imagenet.txt").write_text("".join(f"n{i:08d} great white {i}\n" for i in range(16)))
    assert read_classnames_file(tmp_path / "imagenet.txt") == [f"great white {i}" for i in range(16)]
    (tmp_path / "list.json").write_text(json.dumps(names))
    assert read_classnames_file(tmp_path / "list.json") == names
    (tmp_path / "dict.json").write_text(json.dumps({str(i): names[i] for i in reversed(range(16))}))
    assert _dm(data, classnames_file=str(tmp_path / "dict.json"), underscores_to_spaces=False).classnames == names
    assert _dm(data).split_dataset("train")[0]["caption"] == "a photo of a circle."
    (tmp_path / "short.txt").write_text("\n".join(names[:15]))
    with pytest.raises(ValueError, match=r"short.txt lists 15 class names but .*split_zhou_ShapesWorld.json has 16"):
        _dm(data, classnames_file=str(tmp_path / "short.txt"))
    (tmp_path / "gap.json").write_text(json.dumps({"0": "a", "2": "b"}))
    with pytest.raises(ValueError, match="gap.json: labels must be 0..1"):
        read_classnames_file(tmp_path / "gap.json")


def test_split_file_errors_name_the_file_and_entry(data, tmp_path):
    root, _ = data
    main = root / "split_zhou_ShapesWorld.json"
    with pytest.raises(FileNotFoundError, match="split file not found: .*nope.json"):
        SplitFileDataModule(root=str(root), split_file=str(root / "nope.json"))
    (tmp_path / "bad.json").write_text('{"train": [')
    with pytest.raises(ValueError, match=r"bad.json is not a JSON split file"):
        SplitFileDataModule(root=str(root), split_file=str(tmp_path / "bad.json"))
    (tmp_path / "nokey.json").write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(KeyError, match=r'nokey.json: no "val" list \(keys: \["train", "test"\]\)'):
        SplitFileDataModule(root=str(root), split_file=str(tmp_path / "nokey.json"))
    _edit(main, lambda s: s["val"][5].__setitem__(1, "5"))
    with pytest.raises(ValueError, match=r'split_zhou_ShapesWorld.json val entry 5 is \["images/.*", "5", "heart"\]'):
        _dm(data)


def test_label_name_mismatch_and_gaps_are_errors(data):
    root, _ = data
    main = root / "split_zhou_ShapesWorld.json"
    _edit(main, lambda s: s["test"][3].__setitem__(2, "box"))
    with pytest.raises(ValueError, match=r"label 3 has two class names: 'star' \(.*train entry 3\) and 'box' \(.*test"):
        _dm(data)
    _edit(main, lambda s: s["test"][3].__setitem__(2, "star"))
    _edit(main, lambda s: s.update({k: [e for e in v if e[1] != 7] for k, v in s.items()}))
    with pytest.raises(ValueError, match=r"labels must be 0..C-1 with none missing; .* label\(s\) \[7\]"):
        _dm(data)


def test_ood_file_with_labels_outside_the_class_list_is_an_error(data):
    root, paths = data
    _edit(root / "split_zhou_ShapesWorld_sketch.json", lambda s: s["test"][2].__setitem__(1, 16))
    with pytest.raises(
        ValueError, match=r"OOD domain 'sketch': 1 entry with labels .*_sketch.json test entry 2 \(label 16\)"
    ):
        _dm(data, ood_split_files={"sketch": paths["sketch"]})


def test_too_many_shots_name_the_class_and_its_count(data):
    with pytest.raises(ValueError, match=r"class 'circle' \(label 0\) has 3 train item\(s\), fewer than the 4"):
        _dm(data, shots=4)
    # 3 train items per class pass K=3, but validation wants min(3, 4) = 3 of the 2 per class.
    with pytest.raises(ValueError, match=r"class 'circle' \(label 0\) has 2 val item\(s\), fewer than the 3 val shots"):
        _dm(data, shots=3)


def test_missing_image_names_file_split_and_entry_or_is_skipped(data, recwarn):
    root, _ = data
    entries = json.loads((root / "split_zhou_ShapesWorld.json").read_text())["train"]
    (root / entries[4][0]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 image file\(s\) not found .*json train entry 4: {entries[4][0]}"):
        _dm(data)
    dm = _dm(data, skip_bad_images=True)
    assert dm.num_items("train") == 47 and [e.position for e in dm.skipped] == [4]
    assert any("skipped 1 entry whose image file is missing" in str(w.message) for w in recwarn)


def test_an_undecodable_image_is_an_error_at_load_time_naming_it(data):
    root, _ = data
    dm = _dm(data)
    path = root / dm.split_dataset("val").entries[0].path
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UnreadableImageError, match=rf"json val entry 0: cannot read image .*{path.name}"):
        dm.split_dataset("val")[0]


def test_zero_shot_test_on_novel_classes_through_the_cli(data, tiny_local_dir):
    from distill.cli import main

    root, paths = data
    cli = main(
        [
            "test",
            "--model=ZeroShotModule",
            f"--model.init_args.model_name=local-dir:{tiny_local_dir}",
            "--data=SplitFileDataModule",
            f"--data.init_args.root={root}",
            f"--data.init_args.split_file={paths['main']}",
            f"--data.init_args.ood_split_files={{sketch: {paths['sketch']}}}",
            "--data.init_args.eval_classes=novel",
            "--trainer.callbacks+=ZeroShotEvaluation",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
        ]
    )
    assert cli.datamodule.num_items("test") == 32  # 8 novel classes x (2 ID + 2 OOD items)
    assert {"test/top1_ShapesWorld", "test/top1_sketch", "test/ood_top1"} <= set(cli.trainer.callback_metrics)
