"""LightningModules, one per training regime, composed from distill core parts."""

from distill.modules.contrastive_module import ContrastiveModule
from distill.modules.distillation_module import DistillationModule
from distill.modules.zeroshot_module import ZeroShotModule

__all__ = ["ContrastiveModule", "DistillationModule", "ZeroShotModule"]
