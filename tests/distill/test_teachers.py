import open_clip
import pytest
import torch
from PIL import Image

from distill.clip_models import build_clip, check_model_name, resolve_pretrained
from distill.teachers import Teacher


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown open_clip model name 'ViT-B-33'.*ViT-B-32"):
        check_model_name("ViT-B-33")


def test_hub_names_are_refused_offline():
    with pytest.raises(ValueError, match="local-dir"):
        check_model_name("hf-hub:timm/ViT-B-16-SigLIP")


def test_uncached_pretrained_tag_explains_how_to_pass_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not in the local cache.*pretrained: /path"):
        resolve_pretrained("RN50", "openai", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        resolve_pretrained("RN50", "no-such-tag")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        resolve_pretrained("RN50", str(tmp_path / "missing.pt"))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
        Teacher(checkpoint=str(tmp_path / "nope.ckpt"))


def test_config_without_required_keys(tmp_path):
    with pytest.raises(KeyError, match="text_cfg"):
        build_clip(model_config={"embed_dim": 8, "vision_cfg": {}})


def test_teacher_is_frozen_and_normalised(tiny_local_dir):
    teacher = Teacher(checkpoint=str(tiny_local_dir))
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    image = teacher.preprocess(Image.new("RGB", (64, 64), (200, 30, 30)))[None]
    emb = teacher.encode_image(image)
    assert emb.shape == (1, teacher.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(1))
    text = teacher.encode_text(teacher.tokenize(["a red circle", "a blue square"]))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert teacher.logit_scale.ndim == 0 and teacher.logit_scale > 1


def test_local_dir_loads_in_stock_open_clip(tiny_local_dir):
    stock = open_clip.create_model(f"local-dir:{tiny_local_dir}")
    teacher = Teacher(model_name=f"local-dir:{tiny_local_dir}")
    tokens = teacher.tokenize(["a star"])
    torch.testing.assert_close(stock.encode_text(tokens, normalize=True), teacher.encode_text(tokens))


def test_state_dict_file_needs_an_architecture(tmp_path, tiny_config):
    bundle = build_clip(model_config=tiny_config)
    path = tmp_path / "weights.pt"
    torch.save(bundle.model.state_dict(), path)
    with pytest.raises(ValueError, match="also give model_name or model_config"):
        Teacher(checkpoint=str(path))
    teacher = Teacher(checkpoint=str(path), model_config=tiny_config)
    tokens = teacher.tokenize(["a ring"])
    bundle.model.eval()
    torch.testing.assert_close(teacher.encode_text(tokens), bundle.model.encode_text(tokens, normalize=True))


def test_class_bank_is_template_mean_and_cached(tiny_local_dir):
    teacher = Teacher(checkpoint=str(tiny_local_dir))
    templates = ["a {}.", "a drawing of a {}."]
    bank = teacher.class_bank(["circle", "star"], templates)
    assert bank.shape == (2, teacher.embed_dim)
    manual = teacher.encode_text(teacher.tokenize([t.format("star") for t in templates])).mean(0)
    torch.testing.assert_close(bank[1], manual / manual.norm())
    calls = []
    encode_text = teacher.encode_text
    teacher.encode_text = lambda tokens, **kw: calls.append(len(tokens)) or encode_text(tokens, **kw)
    assert torch.equal(teacher.class_bank(["circle", "star"], templates), bank) and calls == []  # cached
    teacher.class_bank(["circle", "star", "heart"], templates)
    assert sum(calls) == 3 * len(templates)  # a new class list is embedded once


def test_class_bank_with_descriptors(tiny_local_dir):
    teacher = Teacher(checkpoint=str(tiny_local_dir))
    plain = teacher.class_bank(["circle"], ["a {}."])
    rich = teacher.class_bank(["circle"], ["a {}."], {"circle": ["is perfectly round"]})
    expected = teacher.encode_text(teacher.tokenize(["a circle.", "a circle, which is perfectly round."])).mean(0)
    torch.testing.assert_close(rich[0], expected / expected.norm())
    assert not torch.allclose(plain, rich)
    with pytest.raises(KeyError, match="no descriptors for class 'star'"):
        teacher.class_bank(["star"], ["a {}."], {"circle": ["round"]})
