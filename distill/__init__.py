"""distill: adapt, distil and export CLIP-like vision-language models."""

__version__ = "0.1.0"
