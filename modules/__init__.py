"""LightningModules, one per training regime, each a short subclass of the base task."""

from distill.modules.adaptation_module import AdaptationModule
from distill.modules.base import VisionLanguageTask
from distill.modules.contrastive_module import ContrastiveModule
from distill.modules.distillation_module import DistillationModule
from distill.modules.zeroshot_module import ZeroShotModule

__all__ = ["AdaptationModule", "ContrastiveModule", "DistillationModule", "VisionLanguageTask", "ZeroShotModule"]
