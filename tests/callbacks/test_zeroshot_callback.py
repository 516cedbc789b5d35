"""Zero-shot metrics: values checked against hand-computed ones on planted embeddings."""

import json
from types import SimpleNamespace

import pytest
import torch

from distill.callbacks import ZeroShotEvaluation
from distill.callbacks.zeroshot_callback import format_domain_table


class _Module(torch.nn.Module):
    """Stand-in LightningModule: the class bank is the identity (class c = basis vector c)."""

    def __init__(self, num_classes):
        super().__init__()
        self.bank = torch.eye(num_classes)
        self.logged = {}
        self.trainer = SimpleNamespace(world_size=1)

    image_conditioned = False

    def class_bank(self, classnames, templates, descriptors=None):
        return self.bank

    def log_dict(self, values, **kwargs):
        self.logged.update(values)


def _datamodule(eval_classes=None, allows_unlabelled=False):
    return SimpleNamespace(
        classnames=["a", "b", "c", "d"],
        templates=["{}"],
        domain_names=["x", "y", "z"],
        id_domains=["x", "y"],
        ood_domains=["z"],
        eval_class_indices=eval_classes,
        allows_unlabelled=allows_unlabelled,
    )


def _run(callback, module, datamodule, image, text, label, domain, tmp_path, captions=None):
    trainer = SimpleNamespace(
        datamodule=datamodule,
        sanity_checking=False,
        is_global_zero=True,
        current_epoch=0,
        global_step=3,
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
    )
    callback.on_test_epoch_start(trainer, module)
    for i in range(0, len(label), 2):  # two batches
        callback.on_test_batch_end(
            trainer,
            module,
            {"image_embeds": image[i : i + 2], "text_embeds": text[i : i + 2]},
            {
                "label": label[i : i + 2],
                "domain": domain[i : i + 2],
                **({"caption": captions[i : i + 2]} if captions else {}),
            },
            0,
        )
    callback.on_test_epoch_end(trainer, module)
    return module.logged


def test_per_domain_id_ood_and_retrieval(tmp_path):
    # 4 samples: domain x (2 samples, 1 right), y (1 sample, right), z (1 sample, wrong).
    image = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    label = torch.tensor([0, 1, 1, 2])
    domain = torch.tensor([0, 0, 1, 2])
    text = image.clone()
    text[3] = torch.tensor([0.8, 0, 0, 0.6])  # caption 3 is closer to image 0 than to image 3
    logged = _run(ZeroShotEvaluation(top_k=(1,)), _Module(4), _datamodule(), image, text, label, domain, tmp_path)
    assert logged["test/top1_x"] == pytest.approx(0.5)
    assert logged["test/top1_y"] == pytest.approx(1.0)
    assert logged["test/top1_z"] == pytest.approx(0.0)
    assert logged["test/id_top1"] == pytest.approx(0.75)  # mean over domains, not samples
    assert logged["test/ood_top1"] == pytest.approx(0.0)
    # Every image ranks its own caption first; caption 3 ranks image 0 first, image 3 second.
    assert logged["test/i2t_r1"] == pytest.approx(1.0)
    assert logged["test/t2i_r1"] == pytest.approx(0.75)
    assert logged["test/t2i_r5"] == pytest.approx(1.0)
    report = json.loads((tmp_path / "zeroshot_test.json").read_text())
    assert report["metrics"]["id_top1"] == pytest.approx(0.75)


def test_eval_classes_restrict_the_classifier(tmp_path):
    # Sample of class 3 whose embedding is closest to class 0: wrong among all classes,
    # right when only classes {2, 3} are candidates (novel-class evaluation).
    image = torch.tensor([[0.8, 0.0, 0.0, 0.6], [0.0, 0.0, 1.0, 0.0]])
    label, domain = torch.tensor([3, 2]), torch.tensor([0, 0])
    full = _run(
        ZeroShotEvaluation(top_k=(1,), retrieval=False),
        _Module(4),
        _datamodule(),
        image,
        image,
        label,
        domain,
        tmp_path,
    )
    novel = _run(
        ZeroShotEvaluation(top_k=(1,), retrieval=False),
        _Module(4),
        _datamodule([2, 3]),
        image,
        image,
        label,
        domain,
        tmp_path,
    )
    assert full["test/top1_x"] == pytest.approx(0.5) and novel["test/top1_x"] == pytest.approx(1.0)


def test_domain_table_lists_id_then_ood():
    table = format_domain_table({"top1_x": 0.5, "top1_z": 0.25, "id_top1": 0.5, "ood_top1": 0.25}, _datamodule())
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["x", "ID", "50.0"] and "OOD mean" in table


def test_items_without_a_class_are_left_out_of_top_k_and_counted(tmp_path, caplog):
    # Six items; items 1 and 4 have no class (label -1) and look like class 3, the last class,
    # which negative indexing used to score as right (x: 2/3 instead of 1/2, z: 1/2 instead of 0).
    image = torch.eye(4)[[0, 3, 1, 2, 3, 1]]
    label = torch.tensor([0, -1, 1, 0, -1, 0])
    domain = torch.tensor([0, 0, 1, 2, 2, 0])
    keep = label >= 0
    with caplog.at_level("INFO"):
        logged = _run(
            ZeroShotEvaluation(top_k=(1,)), _Module(4), _datamodule(allows_unlabelled=True),
            image, image, label, domain, tmp_path / "mixed",
        )  # fmt: skip
    only = _run(
        ZeroShotEvaluation(top_k=(1,), retrieval=False), _Module(4), _datamodule(),
        image[keep], image[keep], label[keep], domain[keep], tmp_path / "labelled",
    )  # fmt: skip
    for key in ("test/top1_x", "test/top1_y", "test/top1_z", "test/id_top1", "test/ood_top1"):
        assert logged[key] == pytest.approx(only[key])
    assert logged["test/top1_x"] == pytest.approx(1 / 2) and logged["test/top1_z"] == pytest.approx(0.0)
    assert "test/i2t_r1" in logged  # retrieval still uses every item
    report = json.loads((tmp_path / "mixed" / "zeroshot_test.json").read_text())
    assert report["counts"]["unlabelled_items"] == 2 and report["counts"]["items"] == 6
    assert "2 of 6 items have no class: left out of top-k" in caplog.text
    # Undeclared items without a class are an error, never scored.
    with pytest.raises(ValueError, match="2 of 6 test items have label -1 .*allows_unlabelled is False"):
        _run(ZeroShotEvaluation(), _Module(4), _datamodule(), image, image, label, domain, tmp_path)


def test_repeated_captions_add_recall_per_unique_caption(tmp_path, caplog):
    # Items 0 and 1 share a caption; the pairwise caption-0 query ranks image 1 first (a miss).
    image = torch.tensor([[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    text = torch.tensor([[0.6, 0.8, 0, 0], [0.6, 0.8, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    captions = ["a red circle", "a red circle", "a blue star", "a green ring"]
    label, domain = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 1, 2])
    with caplog.at_level("INFO"):
        logged = _run(ZeroShotEvaluation(), _Module(4), _datamodule(), image, text, label, domain, tmp_path, captions)
    assert logged["test/t2i_r1"] == pytest.approx(3 / 4)  # the pairwise metric is unchanged
    assert logged["test/t2i_caption_r1"] == pytest.approx(1.0) and logged["test/i2t_caption_r1"] == pytest.approx(1.0)
    assert "retrieval over 4 items with 3 unique captions" in caplog.text
    report = json.loads((tmp_path / "zeroshot_test.json").read_text())
    assert report["counts"]["unique_captions"] == 3 and report["counts"]["retrieval_items"] == 4
    # Distinct captions: no extra keys, nothing said.
    distinct = _run(
        ZeroShotEvaluation(), _Module(4), _datamodule(), image, text, label, domain, tmp_path, ["p", "q", "r", "s"]
    )
    assert not any("caption" in key for key in distinct)
