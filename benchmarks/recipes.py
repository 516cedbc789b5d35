"""Distillation recipes as ``distill`` config files: the one place a recipe name becomes a command.

A recipe names overlays on ``configs/distill/base.yaml``, joined by "+" and applied in that order:
``labels_only``, ``vl2v_adip``, ``vl2v_adip+augment`` (consistent teaching on VL2V-ADiP),
``clip_kd+openclip_student`` (the CLIP-KD recipe with the open_clip dual-tower student). Every
benchmark that trains, tests or exports a student builds its ``--config`` arguments here:

    >>> [p.name for p in recipe_configs("vl2v_adip+augment")]
    ['base.yaml', 'vl2v_adip.yaml', 'augment.yaml']
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "distill"
BASE = CONFIG_DIR / "base.yaml"


def overlays() -> list[str]:
    """The overlay names a recipe can join (the files of configs/distill/ but the base)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p != BASE)


def recipe_configs(recipe: str) -> list[Path]:
    """``"a+b"`` -> ``[configs/distill/base.yaml, configs/distill/a.yaml, configs/distill/b.yaml]``.

    Raises:
        ValueError: a part that is not an overlay in configs/distill/, named with the known ones.
    """
    parts = [part.strip() for part in recipe.split("+")]
    unknown = [part for part in parts if part not in overlays()]
    if unknown:
        raise ValueError(f"recipe {recipe!r}: unknown overlay(s) {unknown}; configs/distill/ has {overlays()}")
    return [BASE, *(CONFIG_DIR / f"{part}.yaml" for part in parts)]


def config_args(configs: list[Path]) -> list[str]:
    """``--config`` arguments for ``distill``, one pair per file, in order."""
    return [arg for config in configs for arg in ("--config", str(config))]


def recipe_args(recipe: str) -> list[str]:
    """The ``--config`` arguments of a recipe (see :func:`recipe_configs`)."""
    return config_args(recipe_configs(recipe))


def run_name(recipe: str) -> str:
    """A recipe's run folder name: ``vl2v_adip+augment`` -> ``vl2v_adip_augment``."""
    return recipe.replace("+", "_")
