"""Build, load and save open_clip models offline.

One place turns a user's model choice into an open_clip model with its tokenizer and
preprocessing: an open_clip model name (plus an optional pretrained tag or weights file), a
``local-dir:`` folder, or a model config (a dict or a JSON file, in open_clip's own format).
Nothing here reaches a hub: a pretrained tag must already be in the local cache, otherwise the
error says how to pass a local file instead.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from torch import nn

from distill.files import atomic_dir

PathLike = str | os.PathLike

# The small architectures this project trains and tests (the ShapesWorld demo teacher, the
# open_clip dual-tower student, the tests' tiny model) are open_clip model configs shipped in
# the package; registering the folder makes their names work wherever an open_clip name does.
MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class ClipBundle:
    """An open_clip model with everything needed to feed it.

    Attributes:
        model: the ``open_clip.CLIP`` (or ``CustomTextCLIP``) module.
        tokenizer: callable ``list[str] -> (M, context_length)`` token ids.
        preprocess_train: PIL image -> (3, H, W) tensor, with training augmentation.
        preprocess_val: PIL image -> (3, H, W) tensor, deterministic.
        model_config: open_clip ``model_cfg`` dict (``embed_dim``, ``vision_cfg``, ``text_cfg``).
        preprocess_config: open_clip ``preprocess_cfg`` dict (size, mean, std, ...).
    """

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess_train: Callable
    preprocess_val: Callable
    model_config: dict[str, Any]
    preprocess_config: dict[str, Any]


def check_model_name(model_name: str) -> str:
    """Return ``model_name`` if open_clip knows it, else raise with the closest names."""
    if model_name.startswith("local-dir:"):
        folder = Path(model_name.removeprefix("local-dir:"))
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{model_name!r}: no open_clip_config.json in folder {folder}")
        return model_name
    if model_name.startswith("hf-hub:"):
        raise ValueError(
            f"{model_name!r}: hub models cannot be fetched here; download the repository and pass "
            "'local-dir:/path/to/it' instead"
        )
    known = open_clip.list_models()
    if model_name.replace("/", "-") not in known:
        close = difflib.get_close_matches(model_name, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise ValueError(f"unknown open_clip model name {model_name!r}{hint}")
    return model_name


def resolve_pretrained(model_name: str, pretrained: str | None, cache_dir: str | None = None) -> str | None:
    """Turn a pretrained tag or file into a local weights file, without any download.

    Args:
        model_name: a known open_clip model name.
        pretrained: None (random init), a weights file path, or an open_clip pretrained tag.
        cache_dir: open_clip / Hugging Face cache folder to look in.

    Returns:
        The local file path, or None for random initialisation.
    """
    if pretrained is None:
        return None
    if os.path.isfile(pretrained):
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
            raise FileNotFoundError(f"pretrained weights file not found: {pretrained}")
        raise ValueError(
            f"{pretrained!r} is neither a file nor a pretrained tag of {model_name!r} "
            f"(tags: {', '.join(tags) or 'none'})"
        )
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    local = _cached_file(cfg, cache_dir)
    if local is None:
        raise FileNotFoundError(
            f"weights for {model_name!r} / {pretrained!r} are not in the local cache and nothing is "
            f"downloaded at run time; fetch them on a machine with network access and pass the file "
            f"as `pretrained: /path/to/open_clip_model.safetensors` (or a `local-dir:` folder)"
        )
    return local


def _cached_file(cfg: dict, cache_dir: str | None) -> str | None:
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(cfg["hf_hub"])
        for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    if cfg.get("url"):
        folder = Path(cache_dir or Path.home() / ".cache" / "clip")
        candidate = folder / os.path.basename(cfg["url"].split("?")[0])
        if candidate.is_file():
            return str(candidate)
    return None


def load_model_config(model_config: dict | PathLike) -> dict[str, Any]:
    """Read an open_clip model config from a dict or a JSON file.

    Accepts a bare ``model_cfg`` (keys ``embed_dim``, ``vision_cfg``, ``text_cfg``) or an
    ``open_clip_config.json`` holding one under ``model_cfg``.
    """
    if isinstance(model_config, (str, os.PathLike)):
        path = Path(model_config)
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {path}")
        model_config = json.loads(path.read_text())
    cfg = copy.deepcopy(dict(model_config.get("model_cfg", model_config)))
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise KeyError(
            f"model config lacks {sorted(missing)}; an open_clip model_cfg needs embed_dim, vision_cfg and text_cfg"
        )
    return cfg


def _tokenizer_for(text_cfg: dict[str, Any]) -> Callable:
    context_length = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.tokenizer.HFTokenizer(
            text_cfg["hf_tokenizer_name"], context_length=context_length, **text_cfg.get("tokenizer_kwargs", {})
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def build_clip(
    model_name: str | None = None,
    pretrained: str | None = None,
    model_config: dict | PathLike | None = None,
    cache_dir: str | None = None,
    aug_cfg: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> ClipBundle:
    """Build an open_clip model, its tokenizer and its preprocessing.

    Args:
        model_name: open_clip model name (``ViT-B-32``, ``RN50``...) or ``local-dir:/folder``.
        pretrained: pretrained tag available in the local cache, or a weights file.
        model_config: open_clip model config (dict or JSON path) instead of a name.
        cache_dir: cache folder in which pretrained tags are looked up.
        aug_cfg: training augmentation, open_clip ``AugmentationCfg`` fields (``scale``,
            ``ratio``, ``color_jitter``...); open_clip's defaults when None.
        **model_kwargs: extra ``CLIP`` arguments (``init_logit_scale``, ``init_logit_bias``).
    """
    if (model_name is None) == (model_config is None):
        raise ValueError("give exactly one of model_name (an open_clip name) or model_config")
    if model_name is not None:
        check_model_name(model_name)
        weights = None if model_name.startswith("local-dir:") else resolve_pretrained(model_name, pretrained, cache_dir)
        model = open_clip.create_model(model_name, pretrained=weights, cache_dir=cache_dir, **model_kwargs)
        tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        if model_name.startswith("local-dir:"):
            folder = Path(model_name.removeprefix("local-dir:"))
            cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
        else:
            cfg = open_clip.get_model_config(model_name)
    else:
        cfg = load_model_config(model_config)
        build_cfg = {k: v for k, v in cfg.items() if k != "custom_text"}
        is_hf_text = "hf_model_name" in cfg["text_cfg"]
        model_class = open_clip.CustomTextCLIP if cfg.get("custom_text") or is_hf_text else open_clip.CLIP
        model = model_class(**build_cfg, **model_kwargs)
        if pretrained is not None:
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained weights file not found: {pretrained}")
            open_clip.load_checkpoint(model, pretrained)
        tokenizer = _tokenizer_for(cfg["text_cfg"])
        open_clip.set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=cfg["vision_cfg"].get("image_size", 224))))
    preprocess_cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    return ClipBundle(
        model=model,
        tokenizer=tokenizer,
        preprocess_train=image_transform_v2(preprocess_cfg, is_train=True, aug_cfg=_aug_cfg(aug_cfg)),
        preprocess_val=image_transform_v2(preprocess_cfg, is_train=False),
        model_config=cfg,
        preprocess_config=asdict(preprocess_cfg),
    )


def _aug_cfg(aug_cfg: dict[str, Any] | None) -> AugmentationCfg | None:
    if aug_cfg is None:
        return None
    known = set(AugmentationCfg.__dataclass_fields__)
    unknown = sorted(set(aug_cfg) - known)
    if unknown:
        raise KeyError(f"aug_cfg: unknown keys {unknown}; open_clip AugmentationCfg has {sorted(known)}")
    return AugmentationCfg(**{k: tuple(v) if isinstance(v, list) else v for k, v in aug_cfg.items()})


def save_local_dir(model: nn.Module, model_config: dict, preprocess_config: dict, folder: PathLike) -> Path:
    """Write a model as an open_clip ``local-dir:`` folder, atomically.

    The folder holds ``open_clip_config.json`` and ``open_clip_model.safetensors``; stock
    open_clip loads it with ``open_clip.create_model("local-dir:<folder>")``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_dir(folder) as staging:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(staging / "open_clip_model.safetensors"))
        config = {"model_cfg": model_config, "preprocess_cfg": preprocess_config}
        (staging / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return folder
