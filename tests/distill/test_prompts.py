"""Prompt learners: embedding-level tower passes equal open_clip's, checkpoints, CoCoOp batching, MaPLe."""

from __future__ import annotations

import io

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from distill.clip_models import build_clip
from distill.prompt_towers import TextTower, VisionTower
from distill.prompts import CoCoOp, CoOp, MultimodalPrompts, cocoop_logits_per_image_loop

NAMES = ["dog", "red circle", "x-ray machine"]


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def _rn() -> tuple[nn.Module, SimpleTokenizer]:
    torch.manual_seed(0)
    bundle = build_clip(model_name="tiny-rn-test")
    return _frozen(bundle.model), bundle.tokenizer


def _vit(model_class: type = open_clip.CLIP, **text_cfg) -> tuple[nn.Module, SimpleTokenizer]:
    torch.manual_seed(0)
    cfg = open_clip.get_model_config("tiny-vit-test")  # a copy: the overrides stay in this test
    cfg["text_cfg"].update(text_cfg)
    return _frozen(model_class(**cfg)), SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])


def _rn_two_text_layers() -> tuple[nn.Module, SimpleTokenizer]:
    torch.manual_seed(0)
    cfg = open_clip.get_model_config("tiny-rn-test")
    cfg["text_cfg"]["layers"] = 2
    return _frozen(open_clip.CLIP(**cfg)), SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])


MODELS = {"rn": _rn, "vit": _vit}


@pytest.fixture(params=sorted(MODELS))
def model_and_tokenizer(request):
    return MODELS[request.param]()


def _templated(names, position):
    form = {"end": "a photo of a {}.", "front": "{} a photo of a.", "middle": "a photo {} of a."}[position]
    return [form.format(n) for n in names]


# Tower passes on embeddings ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "builder",
    [
        _rn,
        _vit,
        lambda: _vit(open_clip.CustomTextCLIP),
        lambda: _vit(open_clip.CustomTextCLIP, pool_type="eos", eos_id=49407),
        lambda: _vit(open_clip.CustomTextCLIP, pool_type="last", no_causal_mask=True),
        lambda: _vit(open_clip.CustomTextCLIP, proj_bias=True),
        lambda: _vit(open_clip.CustomTextCLIP, proj_type="none"),
    ],
    ids=["rn", "vit", "custom-text", "eos-pool", "last-pool-bidirectional", "linear-proj", "no-proj"],
)
def test_text_tower_on_embeddings_equals_encode_text(builder):
    model, tokenizer = builder()
    tower = TextTower(model)
    ids = tokenizer(_templated(NAMES, "end"))
    expected = model.encode_text(ids)
    pool = tower.pool_index(ids)
    torch.testing.assert_close(tower.encode(tower.embed(ids), pool), expected, atol=1e-5, rtol=1e-5)
    # Truncating after the pooled token is exact under a causal mask (the full context otherwise).
    length = tower.usable_length(pool, torch.zeros(1, dtype=torch.long))
    assert length == (tower.context_length if tower.attn_mask is None else int(pool.max()) + 1)
    torch.testing.assert_close(tower.encode(tower.embed(ids[:, :length]), pool), expected, atol=1e-5, rtol=1e-5)


def test_vision_tower_without_prompts_equals_encode_image(model_and_tokenizer):
    model, _ = model_and_tokenizer
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(VisionTower(model).encode(images), model.encode_image(images), atol=1e-5, rtol=1e-5)


def test_unsupported_towers_are_named():
    model, tokenizer = _vit()
    model.text = nn.Linear(2, 2)  # e.g. a Hugging Face text tower
    with pytest.raises(ValueError, match="model.text is Linear"):
        CoOp(model, tokenizer)
    coca_like, tokenizer = _vit(open_clip.CustomTextCLIP, embed_cls=True)
    with pytest.raises(ValueError, match="embed_cls"):
        CoOp(coca_like, tokenizer)
    with pytest.raises(ValueError, match="model.visual is Linear"):
        VisionTower(_with_visual(nn.Linear(2, 2)))


def _with_visual(visual: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.visual = visual
    return holder


# CoOp ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["end", "front", "middle"])
def test_coop_with_template_context_equals_encode_text(model_and_tokenizer, position):
    model, tokenizer = model_and_tokenizer
    learner = CoOp(model, tokenizer, ctx_init="a photo of a", class_token_position=position)
    learner.set_classnames(NAMES)
    expected = model.encode_text(tokenizer(_templated(NAMES, position)), normalize=True)
    torch.testing.assert_close(learner.class_text_features(), expected, atol=1e-5, rtol=1e-5)
    assert learner.class_text_features(normalize=False).shape == (3, model.text_projection.shape[1])


@pytest.mark.parametrize("position", ["end", "front", "middle"])
def test_class_token_positions(position):
    model, tokenizer = _vit()
    learner = CoOp(model, tokenizer, n_ctx=4, class_token_position=position)
    learner.set_classnames(["dog", "red circle"])
    ids, spots = learner.token_ids, learner.ctx_positions
    x, dog = tokenizer(["X"])[0, 1], tokenizer(["dog"])[0, 1]
    assert (ids.gather(1, spots) == x).all()
    expected = {"end": [1, 2, 3, 4], "front": [2, 3, 4, 5], "middle": [1, 2, 4, 5]}[position]
    assert spots[0].tolist() == expected
    assert int(ids[0, {"end": 5, "front": 1, "middle": 3}[position]]) == int(dog)


def test_coop_parameter_count_at_text_width_512():
    cfg = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 1},
    }
    model = _frozen(open_clip.CLIP(**cfg))
    learner = CoOp(model, SimpleTokenizer(context_length=32), n_ctx=16)
    assert sum(p.numel() for p in learner.parameters()) == 8192
    learner = CoOp(model, SimpleTokenizer(context_length=32), n_ctx=16, class_specific=True)
    learner.set_classnames(NAMES)
    assert sum(p.numel() for p in learner.parameters()) == 3 * 8192


def test_shared_context_transfers_to_unseen_classes():
    model, tokenizer = _vit()
    trained = CoOp(model, tokenizer, n_ctx=4)
    trained.set_classnames(["dog", "cat"])
    with torch.no_grad():
        trained.ctx.add_(torch.randn_like(trained.ctx))
    loaded = CoOp(model, tokenizer, n_ctx=4)
    loaded.load_state_dict(trained.state_dict())
    assert loaded.classnames == ["dog", "cat"]  # taken from the checkpoint when unset
    loaded.set_classnames(NAMES)
    trained.set_classnames(NAMES)
    torch.testing.assert_close(loaded.class_text_features(), trained.class_text_features())
    assert loaded.classnames == NAMES


@pytest.mark.parametrize("learner_class", [CoOp, CoCoOp, MultimodalPrompts])
def test_checkpoint_round_trip_holds_prompts_only(learner_class):
    model, tokenizer = _vit()
    kwargs = {"depth": 2} if learner_class is MultimodalPrompts else {"n_ctx": 4} if learner_class is CoOp else {}
    learner = learner_class(model, tokenizer, **kwargs)
    learner.set_classnames(NAMES)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p))
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert not any(k.startswith(("visual", "transformer", "token_embedding", "text")) for k in state)
    assert "token_ids" not in state and state["_extra_state"]["classnames"] == NAMES
    restored = learner_class.from_state_dict(model, tokenizer, state)
    assert restored.classnames == NAMES
    for (name, a), (_, b) in zip(learner.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
    images = torch.randn(2, 3, 32, 32)
    features = learner.encode_image(images)
    torch.testing.assert_close(restored.encode_image(images), features)
    args = (features,) if learner.image_conditioned else ()
    torch.testing.assert_close(restored.class_text_features(*args), learner.class_text_features(*args))


def test_class_specific_context_refuses_other_classes():
    model, tokenizer = _vit()
    trained = CoOp(model, tokenizer, n_ctx=2, class_specific=True)
    trained.set_classnames(["dog", "cat", "bird"])
    state = trained.state_dict()
    assert state["ctx"].shape == (3, 2, 32)
    other = CoOp(model, tokenizer, n_ctx=2, class_specific=True)
    other.set_classnames(["dog", "cow", "bird", "fish"])
    with pytest.raises(ValueError, match=r"trained for 3 classes \['cat', 'bird'\], got 4 \['cow', 'bird', 'fish'\]"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"class-specific context was trained for 3 .*serves its own classes only"):
        trained.set_classnames(["dog", "cat"])
    fresh = CoOp(model, tokenizer, n_ctx=2, class_specific=True)
    fresh.load_state_dict(state)  # builds its context for the checkpoint's classes
    torch.testing.assert_close(fresh.class_text_features(), trained.class_text_features())


def test_settings_and_learner_mismatch_errors():
    model, tokenizer = _vit()
    state = CoOp(model, tokenizer, n_ctx=4).state_dict()
    with pytest.raises(ValueError, match="trained with n_ctx=4, this learner has 8"):
        CoOp(model, tokenizer, n_ctx=8).load_state_dict(state)
    with pytest.raises(ValueError, match="is for CoOp, this learner is CoCoOp"):
        CoCoOp(model, tokenizer).load_state_dict(state)


def test_input_errors():
    model, tokenizer = _vit()
    learner = CoOp(model, tokenizer, n_ctx=4)
    with pytest.raises(ValueError, match="call set_classnames"):
        learner.class_text_features()
    with pytest.raises(ValueError, match="empty"):
        learner.set_classnames([])
    long_name = "very " * 10 + "long"
    with pytest.raises(ValueError, match=f"class name '{long_name}' is too long.*context length is 16"):
        learner.set_classnames(["dog", long_name])
    with pytest.raises(ValueError, match="16 context tokens leave no room for a class name"):
        CoOp(model, tokenizer, n_ctx=16).set_classnames(["dog"])
    with pytest.raises(ValueError, match="class_token_position"):
        CoOp(model, tokenizer, class_token_position="start")
    cocoop = CoCoOp(model, tokenizer)
    cocoop.set_classnames(NAMES)
    with pytest.raises(ValueError, match=r"image_features of shape \(B, 24\), got None"):
        cocoop.class_text_features()


# CoCoOp --------------------------------------------------------------------------------------------
def test_cocoop_batched_equals_per_image_loop(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(1)
    learner = CoCoOp(model, tokenizer)
    learner.set_classnames([*NAMES, "blue star", "green heart"])
    features = learner.encode_image(torch.randn(32, 3, 32, 32))
    scale = model.logit_scale.exp()
    text = learner.class_text_features(features)
    assert text.shape == (32, 5, features.shape[1])
    logits = scale * torch.einsum("bd,bcd->bc", features, text)
    torch.testing.assert_close(logits, cocoop_logits_per_image_loop(learner, features, scale), atol=1e-5, rtol=1e-5)
    full = cocoop_logits_per_image_loop(learner, features, scale, full_context=True)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_cocoop_parameter_count():
    model, tokenizer = _rn()  # embed 32, text width 32
    learner = CoCoOp(model, tokenizer)
    assert learner.meta_net.linear1.out_features == 2
    assert sum(p.numel() for p in learner.parameters()) == 4 * 32 + (32 * 2 + 2) + (2 * 32 + 32)


# MaPLe ---------------------------------------------------------------------------------------------
def test_maple_depth_one_text_equals_template(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    learner = MultimodalPrompts(model, tokenizer, n_ctx=2, depth=1)
    learner.set_classnames(NAMES)
    expected = model.encode_text(tokenizer(_templated(NAMES, "end")), normalize=True)
    torch.testing.assert_close(learner.class_text_features(), expected, atol=1e-5, rtol=1e-5)
    assert learner.token_ids[0, 1:5].tolist() == tokenizer(["a photo of a"])[0, 1:5].tolist()


@pytest.mark.parametrize("builder", [_rn_two_text_layers, _vit], ids=["rn", "vit"])
def test_maple_prompts_act_on_both_towers(builder):
    model, tokenizer = builder()
    learner = MultimodalPrompts(model, tokenizer, n_ctx=2, depth=2)
    learner.set_classnames(NAMES)
    images = torch.randn(2, 3, 32, 32)
    text, image = learner.class_text_features(), learner.encode_image(images)
    with torch.no_grad():
        learner.deep_text.add_(1.0)  # deeper text prompts, and through the couplings the vision prompts
    assert not torch.allclose(learner.class_text_features(), text)
    vit = VisionTower(model).kind == "vit"
    assert torch.allclose(learner.encode_image(images), image) != vit  # a ResNet takes the layer-0 prompt only
    with torch.no_grad():
        learner.couplings[0].bias.add_(1.0)
    assert not torch.allclose(learner.encode_image(images), image)


def test_maple_parameter_count_and_depth_limit():
    model, tokenizer = _vit()  # text width 32, 2 layers; vision width 48, 2 layers
    learner = MultimodalPrompts(model, tokenizer, n_ctx=2, depth=2)
    assert sum(p.numel() for p in learner.parameters()) == 2 * 32 + 1 * 2 * 32 + 2 * (32 * 48 + 48)
    with pytest.raises(ValueError, match=r"depth=3 is out of range: at most 2 \(text tower 2 layers, vision tower 2"):
        MultimodalPrompts(model, tokenizer, depth=3)
    with pytest.raises(ValueError, match="fewer than n_ctx=6"):
        MultimodalPrompts(model, tokenizer, n_ctx=6, depth=1)
    rn, rn_tokenizer = _rn()  # 1 text layer; a ResNet's prompts go to its attention pool (width 8 * 32)
    learner = MultimodalPrompts(rn, rn_tokenizer, depth=1)
    assert [tuple(c.weight.shape) for c in learner.couplings] == [(256, 32)]
    with pytest.raises(ValueError, match=r"at most 1 \(text tower 1 layers\)"):
        MultimodalPrompts(rn, rn_tokenizer, depth=2)


def _loss(learner, images, labels):
    features = learner.encode_image(images)
    text = learner.class_text_features(features)
    logits = torch.einsum("bd,bcd->bc", features, text) if text.ndim == 3 else features @ text.T
    return F.cross_entropy(20 * logits, labels)


@pytest.mark.parametrize(
    ("learner_class", "kwargs"),
    [
        (CoOp, {"n_ctx": 4}),
        (CoOp, {"n_ctx": 4, "class_specific": True}),
        (CoCoOp, {}),
        (MultimodalPrompts, {"depth": 2}),
    ],
    ids=["coop", "coop-class-specific", "cocoop", "maple"],
)
def test_training_reaches_prompt_parameters_only(learner_class, kwargs):
    model, tokenizer = _vit()
    torch.manual_seed(0)
    learner = learner_class(model, tokenizer, **kwargs)
    learner.set_classnames(NAMES)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = _loss(learner, images, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(p.grad is not None for p in learner.parameters())  # (a tiny meta-net's ReLU may be dead)
    assert learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_features_and_gradients():
    model, tokenizer = _vit()
    learner = MultimodalPrompts(model, tokenizer, depth=2)
    learner.set_classnames(NAMES)
    images = torch.randn(2, 3, 32, 32)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        learner.zero_grad()
        loss = _loss(learner, images, torch.tensor([0, 2]))
        loss.backward()
        results.append((loss.detach(), learner.ctx.grad.clone()))
    torch.testing.assert_close(results[0], results[1])
