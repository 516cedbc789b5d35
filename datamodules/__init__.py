"""LightningDataModules: ShapesWorld (the embedded default) and image-text files."""

from distill.datamodules.image_text_datamodule import ImageTextDataModule
from distill.datamodules.shapesworld_datamodule import ShapesWorldDataModule

__all__ = ["ImageTextDataModule", "ShapesWorldDataModule"]
