"""The family of torchvision's Video Swin (``swin3d_t`` / ``swin3d_s`` / ``swin3d_b``: ``SwinTransformer3d``):
loaded here (``tokenreduce.load("video:swin3d_t")``, or the bare name), run by STViT
(``tokenreduce.stvit.build``, ``stvit/video_swin.py``). The training-free methods of ``tr.patch`` do not run it,
and :func:`unsupported_reason` says so.

A Video Swin takes ``B x C x T x H x W`` clips. Its preprocessing is torchvision's for the Kinetics-400 weights
(resize the short side to 256, centre crop 224, bilinear, ImageNet mean and std), with ``frames`` the 32-frame
clips Video Swin was trained on.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.errors import InputError
from . import common

FAMILY = "torchvision Video Swin (STViT only)"
#: The models, and the names of their weights enums in ``torchvision.models.video``.
WEIGHTS = {"swin3d_t": "Swin3D_T_Weights", "swin3d_s": "Swin3D_S_Weights", "swin3d_b": "Swin3D_B_Weights"}
MODELS = tuple(WEIGHTS)
#: Video Swin's clip length (Liu et al., CVPR 2022: 32 frames at temporal stride 2).
FRAMES = 32


def unsupported_reason(model: nn.Module) -> str:
    """Always a reason: ``tr.patch`` runs no torchvision model; a Video Swin takes STViT."""
    return (f"{type(model).__name__}: tr.patch runs no torchvision model; torchvision's Video Swin "
            f"({', '.join(MODELS)}) takes STViT: tokenreduce.stvit.build(model)")


def num_classes(model: nn.Module) -> int:
    """The outputs of the classifier head (``head``), 0 without one."""
    head = getattr(model, "head", None)
    return int(head.out_features) if isinstance(head, nn.Linear) else 0


def preprocessing(name: str) -> common.Preprocessing:
    """torchvision's inference transform of the model's Kinetics-400 weights, in timm's terms."""
    from torchvision.models import video

    weights = getattr(video, WEIGHTS[name]).KINETICS400_V1
    t = weights.transforms()
    crop, resize = list(t.crop_size), list(t.resize_size)
    return common.Preprocessing((3, *crop), t.interpolation.value, tuple(t.mean), tuple(t.std),
                                crop_pct=crop[0] / resize[0], crop_mode="center", frames=FRAMES,
                                source=f"torchvision {weights}")


def load(name: str, checkpoint: str | None = None, pretrained: bool = False, num_classes: int | None = None,
         **kwargs: Any) -> common.Loaded:
    """torchvision's ``name`` (``swin3d_t`` ...) with ``kwargs`` for its constructor, a head of ``num_classes``
    outputs if given, random weights unless ``checkpoint`` (its state dict) or ``pretrained`` (torchvision's
    Kinetics-400 weights, from the internet) gives them."""
    from torchvision.models import video

    from ..core.checkpoint import load_checkpoint

    if name not in MODELS:
        raise InputError(f"unknown torchvision video model {name!r} (supported: {', '.join(MODELS)})")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if pretrained and not checkpoint:
        kwargs["weights"] = "DEFAULT"
    model = getattr(video, name)(**kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return common.Loaded(model.eval(), preprocessing(name))
