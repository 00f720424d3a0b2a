"""STViT: a learned module summarises the image tokens into a few semantic tokens (see ``model.py``;
``swin.py`` for Swin, ``recovery.py`` for STViT-R)."""

from torch import nn

from ..core.errors import InputTypeError
from .model import STViT
from .model import build as build_vit
from .pooling import POOLINGS, TokenPooling
from .recovery import STViTR, STViTRSwin, build_recovery
from .swin import STViTSwin, build_swin, is_swin
from .video_swin import STViTVideoSwin, build_video_swin, is_video_swin


def build(model: nn.Module, *args, recover: bool = False, **options) -> nn.Module:
    """STViT from a timm model: ``recover=True`` gives STViT-R (``recovery.build_recovery``), a Swin model
    ``swin.build_swin`` (``tokens_per_window=9``), a torchvision Video Swin (``swin3d_t``/``_s``/``_b``)
    ``video_swin.build_video_swin``, any other ViT ``model.build`` (``num_semantic=16``)."""
    if recover:
        return build_recovery(model, *args, **options)
    if is_swin(model):
        return build_swin(model, *args, **options)
    if is_video_swin(model):
        return build_video_swin(model, *args, **options)
    if "tokens_per_window" in options:
        raise InputTypeError(f"tokens_per_window is a Swin option; {type(model).__name__} takes num_semantic")
    return build_vit(model, *args, **options)


__all__ = ["POOLINGS", "STViT", "STViTR", "STViTRSwin", "STViTSwin", "STViTVideoSwin", "TokenPooling", "build",
           "build_recovery", "build_swin", "build_video_swin", "build_vit"]
