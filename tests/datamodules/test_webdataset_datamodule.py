"""WebDatasetDataModule: the CSV datamodule's samples from shards, split over ranks and workers, bad samples."""

import io
import shutil
import tarfile

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import distill.datamodules.webdataset_datamodule as wdm
from distill import shapesworld as sw
from distill.cli import main
from distill.datamodules import ImageTextDataModule, ModelIO, WebDatasetDataModule
from distill.datamodules.image_text_datamodule import DEFAULT_TEMPLATES
from distill.modules import ContrastiveModule
from distill.shard_reader import BadSampleError
from distill.shards import METADATA, shapesworld_to_shards, write_shards


def _to_float(image):
    return pil_to_tensor(image).float() / 255


PLAIN = ModelIO(train_transform=_to_float, eval_transform=_to_float)
DOMAINS = ["flat", "outline"]
WORLD = dict(image_size=32, max_samples_per_shard=5)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """ShapesWorld as shards (26 train items in 6 shards, 14 val, 7 test) and the val split as a CSV folder."""
    root = tmp_path_factory.mktemp("shards")
    shapesworld_to_shards(str(root / "shards"), train_domains=DOMAINS, num_train=26, num_val=14, num_test=7, **WORLD)
    sw.write_image_folder(str(root / "csv"), "val", 14, DOMAINS + [d for d in sw.DOMAINS if d not in DOMAINS], 0, 32)
    return root


@pytest.fixture
def shards(written, tmp_path):
    """A private copy of the shard folder (tests edit it)."""
    return shutil.copytree(written / "shards", tmp_path / "shards")


def _dm(root, **kwargs):
    dm = WebDatasetDataModule(str(root), **{"batch_size": 4, "shuffle_buffer": 6, **kwargs})
    dm.connect(PLAIN)
    return dm


def test_same_samples_and_evaluation_batches_as_the_csv_datamodule(written):
    dm = _dm(written / "shards")
    csv_dm = ImageTextDataModule(
        root=str(written / "csv"), val_csv=str(written / "csv" / "val.csv"), classnames=dm.classnames, batch_size=4
    )
    csv_dm.connect(PLAIN)
    assert dm.id_domains == DOMAINS and dm.ood_domains == [d for d in sw.DOMAINS if d not in DOMAINS]
    assert dm.num_items("val") == 14 and dm.item_keys("val")[3].endswith("/val_00000003")
    for ours, theirs in zip(dm.val_dataloader(), csv_dm.val_dataloader(), strict=True):
        assert torch.equal(ours["image"], theirs["image"]) and ours["caption"] == theirs["caption"]
        assert torch.equal(ours["label"], theirs["label"]) and torch.equal(ours["index"], theirs["index"])
        names = [dm.domain_names[d] for d in ours["domain"]]
        assert names == [csv_dm.domain_names[d] for d in theirs["domain"]]


def _zero_shot(tiny_local_dir, *data):
    run = ["validate", "--model=ZeroShotModule", f"--model.init_args.model_name=local-dir:{tiny_local_dir}", *data]
    run += ["--trainer.callbacks+=ZeroShotEvaluation", "--trainer.accelerator=cpu", "--trainer.logger=false"]
    cli = main([*run, "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=4"])
    return {key: float(value) for key, value in cli.trainer.callback_metrics.items()}


def test_zero_shot_evaluation_equals_the_csv_datamodules(written, tiny_local_dir):
    names = ",".join(sw.class_names("shape"))
    shards = _zero_shot(tiny_local_dir, "--data=WebDatasetDataModule", f"--data.init_args.root={written / 'shards'}")
    pairs = _zero_shot(
        tiny_local_dir, "--data=ImageTextDataModule", f"--data.init_args.root={written / 'csv'}",
        f"--data.init_args.val_csv={written / 'csv' / 'val.csv'}", f"--data.init_args.classnames=[{names}]",
        f"--data.init_args.ood_domains=[{','.join(d for d in sw.DOMAINS if d not in DOMAINS)}]",
    )  # fmt: skip
    assert {"val/top1_flat", "val/ood_top1", "val/t2i_r5"} <= set(shards)
    assert shards == pytest.approx(pairs)


def _indices(loader):
    return [batch["index"].tolist() for batch in loader]


def _flat(batches):
    return [i for batch in batches for i in batch]


def test_training_splits_over_two_ranks_and_two_workers_without_duplicates(written, monkeypatch):
    per_rank = {}
    for rank in (0, 1):
        monkeypatch.setattr(wdm, "_rank_and_world_size", lambda rank=rank: (rank, 2))
        per_rank[rank] = _indices(_dm(written / "shards", num_workers=2).train_dataloader())
        # The workers take the rank's batches in turn: the same batches, in the same order, as without workers.
        assert per_rank[rank] == _indices(_dm(written / "shards").train_dataloader())
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 26 items: 13 per rank, 3 whole batches of 4 each
    seen = _flat(per_rank[0] + per_rank[1])
    assert len(seen) == len(set(seen)) == 24 and set(seen) <= set(range(26))


def test_evaluation_splits_over_ranks_and_workers_in_order_with_every_item_once(written, monkeypatch):
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(wdm, "_rank_and_world_size", lambda rank=rank: (rank, 2))
        seen += _flat(_indices(_dm(written / "shards", num_workers=2).val_dataloader()))
    assert seen == list(range(14))


def test_shuffle_is_new_every_epoch_and_fixed_by_the_seed(written):
    loader = _dm(written / "shards").train_dataloader()
    first, second = _indices(loader), _indices(loader)
    assert first != second and len(set(_flat(first))) == len(set(_flat(second))) == 24
    again = _dm(written / "shards").train_dataloader()
    assert _indices(again) == first and _indices(again) == second
    assert _indices(_dm(written / "shards", seed=1).train_dataloader()) != first


def test_a_resumed_loader_continues_mid_epoch_with_the_same_batches(written):
    loader = _dm(written / "shards", augment="trivialaugment").train_dataloader()
    _indices(loader)  # epoch 0
    batches = iter(loader)  # epoch 1
    next(batches), next(batches)
    state = loader.state_dict()
    rest = list(batches)
    resumed = _dm(written / "shards", augment="trivialaugment").train_dataloader()
    resumed.load_state_dict(state)
    again = list(resumed)
    assert [b["index"].tolist() for b in again] == [b["index"].tolist() for b in rest] and len(rest) == 4
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, rest))  # the augmentations replay
    assert _indices(resumed) == _indices(loader)  # and epoch 2 follows on both
    other = _dm(written / "shards", batch_size=3).train_dataloader()
    with pytest.warns(UserWarning, match="the epoch restarts from its first batch"):
        other.load_state_dict(state)


def test_raw_samples_at_opens_only_the_shards_that_hold_them(written):
    dm = _dm(written / "shards")
    samples = dm.raw_samples_at("train", [12, 3, 25])
    assert [s["key"] for s in samples] == ["train_00000012", "train_00000003", "train_00000025"]
    assert [s["index"] for s in samples] == [12, 3, 25] and samples[0]["image"].size == (32, 32)
    assert sorted(p.name for p in dm.reader._open) == ["train-000000.tar", "train-000002.tar", "train-000005.tar"]


def _edit_shard(path, key, edit):
    """Rewrite a shard with ``edit(files)`` applied to the files (extension -> bytes) of sample ``key``."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    samples = {}
    for name, data in members:
        sample, ext = name.split(".", 1)
        samples.setdefault(sample, {})[ext] = data
    edit(samples[key])
    with tarfile.open(path, "w") as tar:
        for sample, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{sample}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


BAD = {
    "no image": (lambda f: f.pop("png"), "no image file"),
    "corrupt image": (lambda f: f.update(png=f["png"][:60]), "its .png image cannot be read or does not decode"),
    "no caption": (lambda f: f.pop("txt"), r"no caption \(missing or empty .txt\)"),
    "empty caption": (lambda f: f.update(txt=b"  "), r"no caption \(missing or empty .txt\)"),
    "unknown class": (lambda f: f.update(json=b'{"class": "blob"}'), "class 'blob' is not in the class list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_sample_is_an_error_naming_shard_and_key_or_a_counted_skip(shards, case):
    edit, reason = BAD[case]
    _edit_shard(shards / "train-000001.tar", "train_00000007", edit)
    message = rf"train-000001.tar: sample 'train_00000007': {reason}"
    with pytest.raises(BadSampleError, match=message):
        _dm(shards).raw_samples_at("train", [7])
    with pytest.raises(BadSampleError, match=message):
        _indices(_dm(shards, shuffle_buffer=100).train_dataloader())
    dm = _dm(shards, skip_bad_samples=True)
    with pytest.warns(UserWarning, match=f"skipped a bad sample.*{message}"):
        batches = _indices(dm.train_dataloader())
    assert len(batches) == 6 and sorted(len(b) for b in batches) == [3, 4, 4, 4, 4, 4] and 7 not in _flat(batches)
    assert list(dm.skipped_samples) == ["train/train_00000007"]
    assert len(dm.raw_samples_at("train", [6, 7, 8])) == 2


def test_a_bad_sample_read_by_a_worker_names_shard_and_key(shards):
    _edit_shard(shards / "val-000000.tar", "val_00000002", BAD["corrupt image"][0])
    with pytest.raises(BadSampleError, match=r"val-000000.tar: sample 'val_00000002'"):
        _indices(_dm(shards, num_workers=1).val_dataloader())
    dm = _dm(shards, num_workers=2, skip_bad_samples=True)  # a worker's skips reach the main process
    with pytest.warns(UserWarning, match="val-000000.tar: sample 'val_00000002'"):
        assert _flat(_indices(dm.val_dataloader())) == [i for i in range(14) if i != 2]
    assert list(dm.skipped_samples) == ["val/val_00000002"]


def test_folder_errors_name_the_file(shards):
    (shards / "val-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard file .*val-000001.tar not found \(split 'val'"):
        WebDatasetDataModule(str(shards))
    WebDatasetDataModule(str(shards), splits=["train"])  # the other splits are not read
    with pytest.raises(ValueError, match=r"has splits \['train', 'val', 'test'\]; cannot read \['tune'\]"):
        WebDatasetDataModule(str(shards), splits=["tune"])
    with pytest.raises(ValueError, match=r"ood_domains \['mars'\] are not domains of"):
        WebDatasetDataModule(str(shards), splits=["train"], ood_domains=["mars"])
    (shards / METADATA).write_text((shards / METADATA).read_text()[:100])
    with pytest.raises(ValueError, match=rf"{shards / METADATA} is not valid JSON"):
        WebDatasetDataModule(str(shards))
    (shards / METADATA).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shards / METADATA} not found"):
        WebDatasetDataModule(str(shards))


def _png():
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG")
    return out.getvalue()


def test_samples_without_a_class_are_an_error_or_kept_for_retrieval(tmp_path):
    samples = [{"key": f"k{i}", "image": _png(), "ext": "png", "caption": f"item {i}"} for i in range(4)]
    write_shards([{**s, "class": "circle"} if i != 2 else s for i, s in enumerate(samples)], tmp_path, "val")
    with pytest.raises(ValueError, match=r"samples without a class \({'val': 1}\) while it lists classes"):
        WebDatasetDataModule(str(tmp_path))
    dm = WebDatasetDataModule(str(tmp_path), unlabelled_samples="retrieval_only")
    assert [s["label"] for s in dm.raw_samples("val")] == [0, 0, -1, 0] and dm.allows_unlabelled
    write_shards(samples, tmp_path / "pairs", "train")  # pairs only: no classes at all
    pairs = WebDatasetDataModule(str(tmp_path / "pairs"))
    assert pairs.classnames == [] and pairs.allows_unlabelled and pairs.raw_samples("train", 1)[0]["label"] == -1
    assert pairs.domain_names == ["default"] and pairs.templates == DEFAULT_TEMPLATES


class _Seen(pl.Callback):
    def __init__(self) -> None:
        self.indices = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(batch["index"].tolist())


def _fit(root, tiny_config, max_steps, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    seen = _Seen()
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1, val_check_interval=3, callbacks=[seen, *callbacks], default_root_dir=root,
    )  # fmt: skip
    module = ContrastiveModule(model_config=tiny_config)
    trainer.fit(module, datamodule=WebDatasetDataModule(str(root / "shards"), batch_size=8), ckpt_path=ckpt_path)
    return seen.indices, module


def test_fit_on_shards_and_resume_mid_epoch(written, tiny_config, tmp_path):
    shutil.copytree(written / "shards", tmp_path / "shards")
    whole, module = _fit(tmp_path, tiny_config, max_steps=5)  # 3 batches of 8 per epoch: steps 0-2, then 3-4
    assert len(whole) == 5 and whole[:3] != whole[3:] and all(len(b) == 8 for b in whole)
    assert torch.isfinite(torch.stack([p.sum() for p in module.parameters()])).all()
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first, _ = _fit(tmp_path, tiny_config, max_steps=4, callbacks=[saver])
    rest, _ = _fit(tmp_path, tiny_config, max_steps=5, ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=4.ckpt"))
    assert first + rest == whole


def _ddp_worker(rank, root, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dm = _dm(root, num_workers=1)
        torch.save({"train": _indices(dm.train_dataloader()), "val": _indices(dm.val_dataloader())}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes that each import Lightning: about a minute on 2 busy cores
def test_two_gloo_processes_read_disjoint_parts(written, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.spawn(_ddp_worker, args=(str(written / "shards"), port, str(tmp_path / "seen")), nprocs=2)
    seen = [torch.load(tmp_path / f"seen.{rank}", weights_only=True) for rank in (0, 1)]
    assert len(seen[0]["train"]) == len(seen[1]["train"]) == 3
    assert len(set(_flat(seen[0]["train"] + seen[1]["train"]))) == 24
    assert _flat(seen[0]["val"] + seen[1]["val"]) == list(range(14))
