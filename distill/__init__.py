"""distill: adapt, distil and export CLIP-like vision-language models."""

__version__ = "0.1.0"

#: Key of the marker every distill checkpoint carries: ``{"module": class name, "version": ...}``.
CHECKPOINT_MARKER = "distill"
