"""ShapesWorldDataModule: splits, class and domain split rules, and the model's transforms."""

import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from distill.datamodules import ModelIO, ShapesWorldDataModule
from distill.datamodules.shapesworld_datamodule import split_classes
from distill.modules import VisionLanguageTask


def _to_float(image):
    return pil_to_tensor(image).float() / 255


PLAIN = ModelIO(train_transform=_to_float, eval_transform=_to_float)


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
    dm.connect(PLAIN)
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
    class Model(VisionLanguageTask):
        def __init__(self) -> None:
            super().__init__()
            self.preprocess_train = lambda img: torch.zeros(3, 5, 5)
            self.preprocess_val = lambda img: torch.ones(3, 5, 5)
            self.tokenizer = lambda texts: torch.full((len(texts), 4), 7)

    dm = ShapesWorldDataModule(num_train=8, num_val=8, num_test=8, batch_size=4, cache_images=False)
    dm.connect(Model())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 5, 5) and batch["image"].sum() == 0
    assert batch["text"].shape == (4, 4)
    assert next(iter(dm.val_dataloader()))["image"].mean() == 1


def test_cached_and_uncached_items_match():
    kwargs = dict(num_train=6, num_val=7, num_test=7, batch_size=6)
    a = ShapesWorldDataModule(cache_images=True, **kwargs)
    b = ShapesWorldDataModule(cache_images=False, **kwargs)
    a.connect(PLAIN), b.connect(PLAIN)
    a.setup("fit"), b.setup("fit")
    assert torch.equal(next(iter(a.val_dataloader()))["image"], next(iter(b.val_dataloader()))["image"])


def test_unknown_domain_and_overlap_are_clear_errors():
    with pytest.raises(ValueError, match="unknown ShapesWorld domain.*'cartoon'"):
        ShapesWorldDataModule(train_domains=["flat", "cartoon"])
    with pytest.raises(ValueError, match="both in train_domains and ood_domains"):
        ShapesWorldDataModule(train_domains=["flat"], ood_domains=["flat"])
