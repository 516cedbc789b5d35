"""LightningDataModules: ShapesWorld (the embedded default), image-text files and CoOp split files, on one base."""

from distill.datamodules.base import ModelIO, VisionLanguageDataModule
from distill.datamodules.image_text_datamodule import ImageTextDataModule
from distill.datamodules.shapesworld_datamodule import ShapesWorldDataModule
from distill.datamodules.split_file_datamodule import SplitFileDataModule
from distill.datamodules.webdataset_datamodule import WebDatasetDataModule

__all__ = [
    "ImageTextDataModule",
    "ModelIO",
    "ShapesWorldDataModule",
    "SplitFileDataModule",
    "VisionLanguageDataModule",
    "WebDatasetDataModule",
]
