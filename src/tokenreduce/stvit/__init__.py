"""STViT: a learned module summarises the image tokens into a few semantic tokens (see ``model.py``)."""

from .model import STViT, build
from .pooling import POOLINGS, TokenPooling

__all__ = ["POOLINGS", "STViT", "TokenPooling", "build"]
