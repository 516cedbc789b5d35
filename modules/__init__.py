"""LightningModules, one per training regime, each a short subclass of the base task."""

from distill.modules.base import VisionLanguageTask
from distill.modules.contrastive_module import ContrastiveModule
from distill.modules.distillation_module import DistillationModule
from distill.modules.zeroshot_module import ZeroShotModule

__all__ = ["ContrastiveModule", "DistillationModule", "VisionLanguageTask", "ZeroShotModule"]
