"""Replayable augmentation: explicit parameters, deterministic application, replay from stored values."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from distill.augment_replay import (
    IDENTITY,
    OPS,
    PARAM_NAMES,
    AugmentReplay,
    ReplayPolicy,
    apply_params,
    replay_params,
)


def _image(size=(24, 16), seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_parameters_depend_only_on_seed_key_and_view():
    policy = ReplayPolicy()
    a = replay_params(policy, 0, "item-1", 3)
    assert a.dtype == np.float32 and a.shape == (len(PARAM_NAMES),)
    assert np.array_equal(a, replay_params(policy, 0, "item-1", 3))
    others = [
        replay_params(policy, 1, "item-1", 3),
        replay_params(policy, 0, "item-2", 3),
        replay_params(policy, 0, "item-1", 4),
    ]
    assert not any(np.array_equal(a, b) for b in others)
    assert np.array_equal(replay_params(policy, 0, "item-1", 0), IDENTITY)  # view 0: the plain image


def test_parameters_respect_the_policy():
    policy = ReplayPolicy(crop_scale=(0.4, 0.9), crop_ratio=(0.5, 2.0), flip_prob=0.5)
    draws = np.stack([replay_params(policy, 7, f"k{i}", 1 + i % 5) for i in range(400)])
    x0, y0, x1, y1, flip, op, magnitude = draws.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1 + 1e-6).all() and (y1 <= 1 + 1e-6).all()
    area = (x1 - x0) * (y1 - y0)
    assert area.max() <= 0.9 + 1e-5 and area.min() > 0.2  # clipped to the image: at most the drawn scale
    assert set(np.unique(flip)) == {0.0, 1.0} and 0.35 < flip.mean() < 0.65
    assert set(np.unique(op).astype(int)) == set(range(len(OPS)))
    assert (np.abs(magnitude) <= 1).all() and (magnitude < 0).any() and (magnitude > 0).any()


def test_same_parameters_same_pixels_for_every_op():
    image, policy = _image(), ReplayPolicy()
    for op in range(len(OPS)):
        params = np.array([0.1, 0.05, 0.8, 0.9, 1.0, op, -0.6], dtype=np.float32)
        first, second = apply_params(image, params, policy), apply_params(image.copy(), params.copy(), policy)
        assert first.size == image.size and first.mode == "RGB"
        assert first.tobytes() == second.tobytes(), OPS[op]


def test_stored_float32_values_replay_the_drawn_view():
    # A view drawn now and the same view replayed from the cache's float32 tensor are the same image.
    image, policy = _image(), ReplayPolicy()
    drawn = replay_params(policy, 3, "key", 2)
    stored = torch.from_numpy(drawn.copy()).to(torch.float32)
    assert apply_params(image, drawn, policy).tobytes() == apply_params(image, stored.numpy(), policy).tobytes()


def test_known_answers():
    image, policy = _image(), ReplayPolicy()
    assert apply_params(image, IDENTITY, policy) is image
    flip_only = np.array([0, 0, 1, 1, 1, 0, 0], dtype=np.float32)
    assert apply_params(image, flip_only, policy).tobytes() == ImageOps.mirror(image).tobytes()
    crop = np.array([0, 0, 0.5, 0.5, 0, 0, 0], dtype=np.float32)
    expected = image.resize(image.size, Image.BILINEAR, box=(0, 0, 12, 8))
    assert apply_params(image, crop, policy).tobytes() == expected.tobytes()
    solarize = np.array([0, 0, 1, 1, 0, OPS.index("solarize"), 1.0], dtype=np.float32)
    assert apply_params(image, solarize, policy).tobytes() == ImageOps.invert(image).tobytes()  # threshold 0


def test_bad_policy_and_parameters_are_named():
    with pytest.raises(ValueError, match="crop_scale"):
        ReplayPolicy(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="ops must start with 'identity'"):
        ReplayPolicy(ops=("rotate",))
    with pytest.raises(ValueError, match=r"unknown augmentation policy keys \['zoom'\]"):
        ReplayPolicy.from_dict({"zoom": 2})
    policy = ReplayPolicy(ops=["identity", "rotate"], crop_scale=[0.5, 1.0])
    assert ReplayPolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(ValueError, match="must have shape"):
        apply_params(_image(), [0.0, 1.0], policy)
    with pytest.raises(ValueError, match="op index 5 outside the policy's 2 ops"):
        apply_params(_image(), np.array([0, 0, 1, 1, 0, 5, 0.5], dtype=np.float32), policy)


def test_replay_uses_stored_parameters_and_draws_for_missing_items():
    policy, seed = ReplayPolicy(), 5
    stored = torch.from_numpy(np.stack([[replay_params(policy, 9, f"row{r}", k) for k in range(3)] for r in range(2)]))
    replay = AugmentReplay(policy, num_augmentations=3, seed=seed)
    with pytest.raises(RuntimeError, match="not bound"):
        replay.params_of(0, 1)
    # Dataset item 0 is cache row 1, item 1 is row 0, item 2 is not cached.
    replay.bind(stored, torch.tensor([1, 0, -1]), ["row1", "row0", "new"], needs_teacher_views=True)
    assert np.array_equal(replay.params_of(0, 2), stored[1, 2].numpy())
    assert np.array_equal(replay.params_of(1, 1), stored[0, 1].numpy())
    assert np.array_equal(replay.params_of(2, 1), replay_params(policy, seed, "new", 1))
    with pytest.raises(IndexError, match="augmentation id 3 outside the cache's 3 views"):
        replay.params_of(0, 3)
    image = _image()
    assert replay(image, 0, 2).tobytes() == apply_params(image, stored[1, 2].numpy(), policy).tobytes()
    torch.manual_seed(0)
    ids = [replay.draw() for _ in range(30)]
    torch.manual_seed(0)
    assert ids == [replay.draw() for _ in range(30)] and set(ids) == {0, 1, 2}
