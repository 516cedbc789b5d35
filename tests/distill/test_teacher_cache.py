"""The teacher cache format: round trip against the teacher, and foreign / stale / corrupt detection."""

import json
import shutil

import pytest
import torch

from distill.augment_replay import apply_params, replay_params
from distill.cache_builder import OnlineTeacher, build_teacher_cache
from distill.datamodules import ShapesWorldDataModule
from distill.run_info import teacher_fingerprint
from distill.teacher_cache import (
    CacheMissError,
    CorruptCacheError,
    ForeignCacheError,
    StaleCacheError,
    TeacherCache,
    check_fingerprint,
)
from distill.teachers import Teacher


def _data(num_train=10):
    return ShapesWorldDataModule(num_train=num_train, num_val=7, num_test=7, image_size=32)


@pytest.fixture
def teacher(tiny_local_dir):
    return Teacher(model_name=f"local-dir:{tiny_local_dir}")


@pytest.fixture
def cache_dir(tmp_path, teacher):
    return build_teacher_cache(
        _data(), teacher, str(tmp_path / "cache"), num_augmentations=3, chunk_size=4, batch_size=6, progress=False
    )


def test_round_trip_holds_the_teachers_embeddings_of_the_replayed_views(cache_dir, teacher):
    data, cache = _data(), TeacherCache(cache_dir)
    tensors = cache.load()
    assert tensors.image.shape == (10, 3, 32) and tensors.text.shape == (10, 32) and tensors.params.shape == (10, 3, 7)
    assert cache.keys == data.item_keys("train") and cache.embed_dim == 32 and cache.num_augmentations == 3
    assert cache.logit_scale == pytest.approx(float(teacher.logit_scale))
    online = OnlineTeacher(teacher, batch_size=1)  # one image per call: another batching than the build's
    samples = data.raw_samples_at("train", range(10))
    for row in (0, 5, 9):
        for view in range(3):
            params = replay_params(cache.policy, 0, cache.keys[row], view)
            assert torch.equal(tensors.params[row, view], torch.from_numpy(params))
            expected = online.encode_images([apply_params(samples[row]["image"], params, cache.policy)])[0]
            torch.testing.assert_close(tensors.image[row, view], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            tensors.text[row], online.encode_texts([samples[row]["caption"]])[0], rtol=0, atol=1e-6
        )
    assert not torch.equal(tensors.image[0, 0], tensors.image[0, 1])  # the views differ
    bank = cache.class_bank(data.classnames, data.templates)
    torch.testing.assert_close(bank, teacher.class_bank(data.classnames, data.templates), rtol=0, atol=1e-6)
    some = cache.class_bank(data.classnames[3:5], data.templates[:1])
    torch.testing.assert_close(some, teacher.class_bank(data.classnames[3:5], data.templates[:1]), rtol=0, atol=1e-6)
    with pytest.raises(CacheMissError, match=r"lacks class names \['unicorn'\]"):
        cache.class_bank(["unicorn"], data.templates)


def test_the_same_build_gives_the_same_bytes(tmp_path, cache_dir, teacher):
    again = build_teacher_cache(
        _data(), teacher, str(tmp_path / "again"), num_augmentations=3, chunk_size=4, batch_size=6, progress=False
    )
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert names == [f"chunk-0000{i}.safetensors" for i in range(3)] + [
        "classbank.safetensors",
        "items.json",
        "manifest.json",
    ]
    assert all((cache_dir / n).read_bytes() == (again / n).read_bytes() for n in names)


def test_changed_preprocessing_is_stale(cache_dir, tiny_local_dir, tmp_path):
    moved = tmp_path / "teacher_bilinear"
    shutil.copytree(tiny_local_dir, moved)
    config = json.loads((moved / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["interpolation"] = "bilinear"  # same weights, another resize
    (moved / "open_clip_config.json").write_text(json.dumps(config))
    changed = Teacher(model_name=f"local-dir:{moved}")
    with pytest.raises(
        StaleCacheError,
        match=r"stale teacher cache: the teacher's preprocess changed.*"
        r"preprocess.interpolation: \"bicubic\" -> \"bilinear\"",
    ) as err:
        TeacherCache(cache_dir).check_teacher(teacher_fingerprint(changed))
    assert str(cache_dir) in str(err.value)


def test_other_weights_are_foreign_and_a_dtype_change_is_stale(cache_dir, teacher):
    cache = TeacherCache(cache_dir)
    cache.check_teacher(teacher_fingerprint(teacher))  # its own teacher passes
    with torch.no_grad():
        teacher.model.text_projection.add_(0.01)
    with pytest.raises(
        ForeignCacheError, match=r"foreign teacher cache: it was built for another teacher \(weights_sha256"
    ):
        cache.check_teacher(teacher_fingerprint(teacher))
    with pytest.raises(
        StaleCacheError, match=r"teacher's dtype, weights_sha256 changed.*dtype: \"float32\" -> \"float16\""
    ):
        cache.check_teacher(teacher_fingerprint(teacher.half()))
    stored = {"name": "ViT-L-14", "tag": "openai", "preprocess": {"size": 224}, "tokenizer": "clip"}
    with pytest.raises(ForeignCacheError, match=r"name, tag differ"):
        check_fingerprint("c", stored, {**stored, "name": "ViT-B-32", "tag": "laion2b"})
    with pytest.raises(StaleCacheError, match=r"tokenizer changed .*tokenizer: \"clip\" -> \"siglip\""):
        check_fingerprint("c", stored, {**stored, "tokenizer": "siglip"})


def test_items_of_another_data_set_are_foreign_and_new_items_are_misses(cache_dir):
    cache = TeacherCache(cache_dir)
    rows = cache.rows_for(_data(num_train=12).item_keys("train"))
    assert rows.tolist() == [*range(10), -1, -1]  # ShapesWorld item i does not depend on the split size
    other = ShapesWorldDataModule(num_train=4, num_val=7, num_test=7, image_size=32, seed=1)
    with pytest.raises(ForeignCacheError, match=r"none of the 4 items of the training split is in it"):
        cache.rows_for(other.item_keys("train"), "the training split")


def test_a_flipped_byte_is_corrupt(cache_dir):
    path = cache_dir / "chunk-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    cache = TeacherCache(cache_dir)  # the manifest and items still open
    with pytest.raises(CorruptCacheError, match=r"cache.*chunk-00001.safetensors does not match its SHA-256"):
        cache.load()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "chunk-00002.safetensors").unlink(), "chunk-00002.safetensors is missing"),
        (lambda d: (d / "items.json").write_text('["x"]'), "items.json does not match its SHA-256"),
        (lambda d: (d / "manifest.json").write_text("{"), "manifest.json is not valid JSON"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    ],
)
def test_missing_or_changed_files_are_corrupt(cache_dir, damage, message):
    damage(cache_dir)
    with pytest.raises(CorruptCacheError, match=message):
        TeacherCache(cache_dir).load()


def test_an_unfinished_build_and_another_format_are_refused(cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    (cache_dir / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(CorruptCacheError, match=r"incomplete \(3 of 3 chunks\).*rerun `distill cache`"):
        TeacherCache(cache_dir)
    (cache_dir / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(StaleCacheError, match="format version 99"):
        TeacherCache(cache_dir)
    with pytest.raises(FileNotFoundError, match="teacher cache folder not found"):
        TeacherCache(cache_dir / "nowhere")
