"""LightningDataModules: ShapesWorld (the embedded default) and image-text files, on one base."""

from distill.datamodules.base import ModelIO, VisionLanguageDataModule
from distill.datamodules.image_text_datamodule import ImageTextDataModule
from distill.datamodules.shapesworld_datamodule import ShapesWorldDataModule

__all__ = ["ImageTextDataModule", "ModelIO", "ShapesWorldDataModule", "VisionLanguageDataModule"]
