"""LoRA on open_clip models: peft adapters, quantised bases, adapter files, merge."""

import copy
import json
import subprocess
import sys

import open_clip
import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d
from safetensors.torch import save_file
from torch import nn

from distill.lora import (
    LoraSpec,
    adapters_disabled,
    apply_lora,
    count_lora_parameters,
    load_adapters,
    load_lora_state_dict,
    lora_parameter_formula,
    lora_state_dict,
    merge_lora,
    save_adapters,
    save_merged_local_dir,
)

KINDS = ["rn", "vit"]


def _randomize_adapters(model, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


# LoRA: parameters, outputs, merge ---------------------------------------------------------------
def test_clip_lora_on_a_vit_b16_has_184320_trainable_parameters():
    config = open_clip.get_model_config("ViT-B-16")
    with torch.device("meta"):  # the ViT-B/16 shapes without 150M random values
        model = open_clip.CLIP(**config)
    apply_lora(model, LoraSpec())
    assert count_lora_parameters(model) == 184_320 == lora_parameter_formula(config, LoraSpec())
    # 12 layers x (q, k, v) x r (in + out) per tower: 12 * 3 * 2 * (768 + 768) + 12 * 3 * 2 * (512 + 512)
    assert 12 * 3 * 2 * 1536 + 12 * 3 * 2 * 1024 == 184_320
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 3 * 12 * 2 and all(".lora_A." in n or ".lora_B." in n for n in trainable)


SPECS = {
    "clip_lora": LoraSpec(),
    "image_out_r3": LoraSpec(rank=3, targets=("out",), towers=("image",)),
    "text_k_out": LoraSpec(targets=("k", "out"), towers=("text",)),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_count_matches_the_formula(kind, spec, clip_kit):
    bundle = clip_kit.bundle(kind)
    apply_lora(bundle.model, spec)
    assert count_lora_parameters(bundle.model) == lora_parameter_formula(bundle.model_config, spec) > 0


def test_mlp_targets_count_on_the_text_tower(clip_kit):
    bundle = clip_kit.bundle("vit")
    spec = LoraSpec(rank=4, targets=("mlp_in", "mlp_out"), towers=("text", "image"))
    apply_lora(bundle.model, spec)
    # text: 2 layers x 4 x ((32 + 128) + (128 + 32)); image: 2 layers x 4 x ((48 + 192) + (192 + 48))
    expected = 2 * 4 * 320 + 2 * 4 * 480
    assert count_lora_parameters(bundle.model) == expected == lora_parameter_formula(bundle.model_config, spec)


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_change_outputs_and_merge_reproduces_them(kind, tmp_path, clip_kit):
    bundle = clip_kit.bundle(kind)
    model, inputs = bundle.model, clip_kit.inputs(bundle)
    stock = clip_kit.embed(model, inputs)
    stock_keys = list(model.state_dict())

    apply_lora(model, LoraSpec(targets=("q", "k", "v", "out")))
    # B starts at zero: the adapted model starts as the base
    assert clip_kit.max_diff(clip_kit.embed(model, inputs), stock) <= 1e-5
    _randomize_adapters(model)
    adapted = clip_kit.embed(model, inputs)
    assert min((a - s).abs().max() for a, s in zip(adapted, stock)) > 1e-3  # both towers change
    with adapters_disabled(model):
        assert clip_kit.max_diff(clip_kit.embed(model, inputs), stock) <= 1e-5
    assert count_lora_parameters(model) > 0  # the adapters are trainable again after the context

    merged = merge_lora(copy.deepcopy(model))
    assert clip_kit.attention_types(merged) <= {nn.MultiheadAttention, AttentionPool2d}
    assert not any("lora" in type(m).__module__ or "Split" in type(m).__name__ for m in merged.modules())
    assert list(merged.state_dict()) == stock_keys
    assert clip_kit.max_diff(clip_kit.embed(merged, inputs), adapted) <= 1e-5


def test_merged_folder_loads_with_stock_open_clip(tmp_path, clip_kit):
    """The merged folder loads in a fresh interpreter that imports open_clip but no distill."""
    expected = {}
    for kind in KINDS:
        bundle = clip_kit.bundle(kind)
        apply_lora(bundle.model, LoraSpec(targets=("q", "v", "out")))
        _randomize_adapters(bundle.model)
        inputs = clip_kit.inputs(bundle)
        expected[kind] = clip_kit.embed(bundle.model, inputs)
        save_merged_local_dir(bundle.model, bundle.model_config, bundle.preprocess_config, tmp_path / kind)
        torch.save(inputs, tmp_path / f"{kind}_inputs.pt")
        assert count_lora_parameters(bundle.model) > 0  # the adapted model itself is left as it was
    script = (
        "import sys, torch, open_clip\n"
        "for kind in sys.argv[1:]:\n"
        "    model = open_clip.create_model(f'local-dir:{kind}').eval()\n"
        "    images, tokens = torch.load(f'{kind}_inputs.pt')\n"
        "    with torch.no_grad():\n"
        "        torch.save((model.encode_image(images), model.encode_text(tokens)), f'{kind}_out.pt')\n"
        "assert not any(name.startswith('distill') for name in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, *KINDS], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    for kind in KINDS:
        assert clip_kit.max_diff(torch.load(tmp_path / f"{kind}_out.pt"), expected[kind]) <= 1e-5


# peft really applies the spec --------------------------------------------------------------------
@pytest.mark.parametrize(("rslora", "expected"), [(True, 2.0 / 2.0), (False, 2.0 / 4.0)])
def test_scaling_is_alpha_over_sqrt_rank_with_rslora(rslora, expected, clip_kit):
    bundle = clip_kit.bundle("vit")
    spec = LoraSpec(rank=4, alpha=2.0, rslora=rslora)
    apply_lora(bundle.model, spec)
    _randomize_adapters(bundle.model)
    layer = bundle.model.transformer.resblocks[0].attn.q_proj
    assert layer.scaling["default"] == pytest.approx(expected) == pytest.approx(spec.scaling)
    x = torch.randn(3, 32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        assert torch.allclose(layer(x) - layer.base_layer(x), expected * x @ a.T @ b.T, atol=1e-6)


def test_dropout_is_active_in_train_mode_only(clip_kit):
    bundle = clip_kit.bundle("vit")
    tokens = clip_kit.inputs(bundle)[1]
    apply_lora(bundle.model, LoraSpec(dropout=0.5))
    _randomize_adapters(bundle.model)
    layer = bundle.model.transformer.resblocks[0].attn.q_proj
    assert layer.lora_dropout["default"].p == 0.5
    with torch.no_grad():
        bundle.model.train()
        assert not torch.allclose(bundle.model.encode_text(tokens), bundle.model.encode_text(tokens))
        bundle.model.eval()
        assert torch.equal(bundle.model.encode_text(tokens), bundle.model.encode_text(tokens))


# Quantised base (QLoRA style) --------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_base_trains_on_cpu_and_merges_to_float(mode, kind, clip_kit):
    pytest.importorskip("bitsandbytes")
    bundle = clip_kit.bundle(kind)
    model, inputs = bundle.model, clip_kit.inputs(bundle)
    apply_lora(model, LoraSpec(quantize_base=mode))
    base = model.transformer.resblocks[0]
    quantized = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[mode]
    assert type(base.attn.q_proj.get_base_layer()).__name__ == quantized
    assert type(base.mlp.c_fc).__name__ == quantized  # frozen layers without adapters are quantised too
    assert count_lora_parameters(model) == lora_parameter_formula(bundle.model_config, LoraSpec())

    _randomize_adapters(model)
    image, text = model.encode_image(inputs[0]), model.encode_text(inputs[1])
    (image.square().mean() + text.square().mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert all(g.isfinite().all() and g.abs().sum() > 0 for g in grads.values())

    model.eval()
    adapted = clip_kit.embed(model, inputs)
    merged = merge_lora(copy.deepcopy(model))
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    assert clip_kit.attention_types(merged) <= {nn.MultiheadAttention, AttentionPool2d}
    merged_out = clip_kit.embed(merged, inputs)
    if mode == "nf4":  # NF4 weights dequantise exactly and compute in fp32
        assert clip_kit.max_diff(merged_out, adapted) <= 1e-5
    else:  # LLM.int8 also quantises the activations, the merged float model does not
        assert all((m - a).norm() <= 0.05 * a.norm() for m, a in zip(merged_out, adapted))


def test_quantized_base_without_bitsandbytes_says_what_to_install(monkeypatch, clip_kit):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModuleNotFoundError, match="quantize_base='nf4' needs bitsandbytes"):
        apply_lora(clip_kit.bundle("vit").model, LoraSpec(quantize_base="nf4"))


# Adapter files ------------------------------------------------------------------------------------
def test_adapter_file_round_trip(tmp_path, clip_kit):
    spec = LoraSpec(rank=3, alpha=2.0, targets=("q", "v", "mlp_out"), towers=("text",))
    bundle = clip_kit.bundle("vit")
    apply_lora(bundle.model, spec)
    _randomize_adapters(bundle.model)
    path = save_adapters(bundle.model, spec, tmp_path / "adapters.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["adapters.safetensors"]  # no staging file left

    loaded_spec, state = load_adapters(path)
    assert loaded_spec == spec
    own = lora_state_dict(bundle.model)
    assert state.keys() == own.keys() and all(torch.equal(state[k], v) for k, v in own.items())
    assert path.stat().st_size < 4 * sum(v.numel() for v in own.values()) + 16_384

    fresh = clip_kit.bundle("vit")  # same base weights (seed), new adapters
    apply_lora(fresh.model, loaded_spec)
    load_lora_state_dict(fresh.model, state, source=str(path))
    inputs = clip_kit.inputs(fresh)
    assert clip_kit.max_diff(clip_kit.embed(fresh.model, inputs), clip_kit.embed(bundle.model, inputs)) == 0.0


def test_load_lora_state_dict_is_strict(clip_kit):
    bundle = clip_kit.bundle("vit")
    apply_lora(bundle.model, LoraSpec())
    state = lora_state_dict(bundle.model)
    key = next(iter(state))
    with pytest.raises(ValueError, match=rf"from adapters.safetensors do not fit this CLIP: missing \['{key}'\]"):
        load_lora_state_dict(bundle.model, {k: v for k, v in state.items() if k != key}, "adapters.safetensors")
    with pytest.raises(ValueError, match=r"unexpected \['visual.extra.lora_A.default.weight'\]"):
        load_lora_state_dict(bundle.model, {**state, "visual.extra.lora_A.default.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=rf"shape mismatches \['{key} \(5, 5\) != "):
        load_lora_state_dict(bundle.model, {**state, key: torch.zeros(5, 5)})


def test_load_adapters_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_adapters(tmp_path / "nope.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="weights.safetensors is not a distill LoRA adapter file"):
        load_adapters(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="junk.safetensors is not a safetensors file"):
        load_adapters(tmp_path / "junk.safetensors")


# Spec and target errors ------------------------------------------------------------------------------
def test_spec_validates_names_and_accepts_yaml_lists():
    assert LoraSpec(targets=["q", "out"], towers=["text"]).targets == ("q", "out")
    with pytest.raises(ValueError, match=r"targets: unknown \['qkv'\]; valid: q, k, v, out, mlp_in, mlp_out"):
        LoraSpec(targets=("qkv",))
    with pytest.raises(ValueError, match=r"towers: unknown \['audio'\]; valid: image, text"):
        LoraSpec(towers=("audio",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraSpec(rank=0)
    assert json.loads(json.dumps(LoraSpec().__dict__))["targets"] == ["q", "k", "v"]


def test_a_target_matching_nothing_names_target_tower_and_what_exists(clip_kit):
    model = clip_kit.bundle("rn").model  # the ModifiedResNet image tower has an attention pool but no MLP blocks
    with pytest.raises(ValueError, match=r"'mlp_in' matches no module in the image tower of CLIP.*q, k, v, out\)"):
        apply_lora(model, LoraSpec(targets=("q", "mlp_in")))
    apply_lora(model, LoraSpec(targets=("mlp_in",), towers=("text",)))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoraSpec())
