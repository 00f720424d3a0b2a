"""Model-family adapters. An adapter knows how a family embeds, runs and pools tokens, never which method runs.

An adapter is a module with:

- ``FAMILY``: a short name for messages (e.g. "timm VisionTransformer");
- ``unsupported_reason(model) -> str | None``: why it cannot run a model of its family (None: it can);
- ``model_info(model, img_size=None) -> ModelInfo``: what the schedule and the cost table need;
- ``forward_tokens(model, images, method, track_owner=False, dense=False, on_block=None) -> TokenState``: the
  final state (final norm applied), calling ``on_block(i, state)`` after every block;
- ``patched_class(cls) -> type``: the subclass a patched model takes (its forward entry points run reduced).

An adapter that loads its family's models from a spec (``Family.prefix``: ``tokenreduce.load("hf:DIR")``) has
``load(name, checkpoint=None, pretrained=False, num_classes=None, **kwargs) -> common.Loaded``: the model in
eval mode and its ``common.Preprocessing``. An adapter whose models do not return one tensor has
``predict(model, images) -> Tensor`` (a classifier's logits, else the embedding) and ``num_classes(model)``;
:func:`predictor` and :func:`num_classes` give them for any model (``model(images)`` and ``model.num_classes``
otherwise); ``preprocessing_of(model)`` reads the preprocessing a model carries (:func:`preprocessing_of`).

A hierarchical family whose blocks do not pass one token sequence along (Swin: the methods run inside every
window of every block) has no ``ModelInfo``; instead it gives ``flops_report(model, method, img_size)`` (the
cost report, raising on a schedule it cannot run) and ``describe(model, method, img_size)``, which the API
calls in place of the plain-ViT cost table.

:func:`adapter_for` picks the adapter by the library that defines the model's class (or one of its bases), and
imports it only then, so an optional library (transformers, open_clip) is imported only for its own models.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from ..core.errors import InputError, InputTypeError, MissingExtraError
from .common import Preprocessing


@dataclass(frozen=True)
class Family:
    """A model family: the adapter module that runs it, the top-level packages its model classes come from, and
    the specs its ``load`` takes: ``prefix:NAME``, and the bare ``names`` it claims."""

    name: str
    adapter: str
    packages: tuple[str, ...]
    prefix: str | None = None
    names: tuple[str, ...] = ()
    #: What to install for it (named when its package is missing).
    extra: str | None = None


FAMILIES: list[Family] = [
    Family("timm VisionTransformer", "tokenreduce.adapters.timm_vit", ("timm",), prefix="timm"),
    Family("timm SwinTransformer", "tokenreduce.adapters.swin", ("timm",)),
    Family("timm PyramidVisionTransformerV2", "tokenreduce.adapters.pvt", ("timm",)),
    Family("Hugging Face transformers ViT/DeiT/DINOv2/CLIP/SigLIP", "tokenreduce.adapters.hf", ("transformers",),
           prefix="hf", extra="hf"),
    Family("open_clip VisionTransformer", "tokenreduce.adapters.open_clip", ("open_clip",), prefix="open_clip",
           extra="open_clip"),
    Family("Hugging Face transformers VideoMAE/ViViT", "tokenreduce.adapters.hf_video", ("transformers",)),
    Family("torchvision Video Swin (STViT only)", "tokenreduce.adapters.torchvision_video", ("torchvision",),
           prefix="video", names=("swin3d_t", "swin3d_s", "swin3d_b")),
]
#: The family of a spec without a known prefix or claimed name (a timm model name).
DEFAULT_PREFIX = "timm"


def register_family(family: Family) -> Family:
    """Add a family (a new adapter module) to those :func:`adapter_for` considers."""
    FAMILIES.append(family)
    return family


def _model_class(model: nn.Module) -> type:
    patch = model.__dict__.get("_tokenreduce")
    return patch.original_class if patch is not None else type(model)


def _families_of(model: nn.Module) -> list[Family]:
    """The families whose packages define the model's class or one of its bases."""
    roots = {cls.__module__.split(".")[0] for cls in _model_class(model).__mro__}
    return [family for family in FAMILIES if not roots.isdisjoint(family.packages)]


def adapter_for(model: nn.Module) -> ModuleType:
    """The adapter that runs ``model``; an ``InputTypeError`` naming what is unsupported otherwise.

    >>> import timm
    >>> adapter_for(timm.create_model("deit_tiny_patch16_224")).FAMILY
    'timm VisionTransformer'
    """
    reasons = []
    for family in _families_of(model):
        adapter = importlib.import_module(family.adapter)
        reason = adapter.unsupported_reason(model)
        if reason is None:
            return adapter
        reasons.append(reason)
    supported = ", ".join(f.name for f in FAMILIES)
    why = "; ".join(reasons) if reasons else f"{type(model).__name__} is not a model of a supported family"
    raise InputTypeError(f"tokenreduce cannot patch this model: {why} (supported: {supported})")


def _own(model: nn.Module, name: str) -> Callable | None:
    """The first function ``name`` among the adapters of the model's families (whether or not they can patch it:
    a transformers model's logits are read the same way for every class)."""
    for family in _families_of(model):
        found = getattr(importlib.import_module(family.adapter), name, None)
        if found is not None:
            return found
    return None


def call(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images)``: the :func:`predictor` of families whose models return one tensor (timm's)."""
    return model(images)


def predictor(model: nn.Module) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``predict(module, images) -> Tensor`` for ``model``'s family: a classifier's logits, else the image
    embedding (``model(images)`` for families whose models return one tensor, timm's). Look it up on the bare
    model (not a ``torch.compile``/DDP wrapper); the function also takes the model patched, wrapped or deep-copied.

    >>> import timm, torch
    >>> model = timm.create_model("deit_tiny_patch16_224", depth=1, img_size=32, num_classes=3).eval()
    >>> predictor(model)(model, torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 3])
    """
    return _own(model, "predict") or call


def num_classes(model: nn.Module) -> int:
    """How many classes ``model`` predicts: 0 for a model that returns an embedding.

    >>> import timm
    >>> num_classes(timm.create_model("deit_tiny_patch16_224", depth=1, num_classes=0))
    0
    """
    own = _own(model, "num_classes")
    return int(own(model)) if own is not None else int(getattr(model, "num_classes", 0) or 0)


def preprocessing_of(model: nn.Module) -> Preprocessing:
    """The preprocessing ``model`` expects, read from the model itself (``tokenreduce.load`` returns it beside the
    model): a timm model's ``pretrained_cfg`` at its built size, an open_clip tower's ``preprocess_cfg``, a
    Hugging Face model's ``preprocessor_config.json`` in the directory it was loaded from.

    >>> import timm
    >>> preprocessing_of(timm.create_model("deit_tiny_patch16_224", depth=1, img_size=32)).img_size
    (32, 32)
    """
    own = _own(model, "preprocessing_of")
    if own is None:
        raise InputTypeError(f"{type(model).__name__} is not a model of a family that knows its preprocessing "
                             f"({', '.join(f.name for f in FAMILIES if f.prefix)})")
    return own(model)


def family_for_spec(spec: str) -> tuple[Family, str]:
    """(the family whose ``load`` takes ``spec``, the spec without its prefix): ``prefix:NAME`` by prefix, a bare
    name claimed by a family (``swin3d_t``) by that family, any other bare name by timm's.

    >>> family, name = family_for_spec("hf:/models/vit")
    >>> family.adapter, name
    ('tokenreduce.adapters.hf', '/models/vit')
    >>> family_for_spec("deit_small_patch16_224")[0].prefix
    'timm'
    """
    if not isinstance(spec, str) or not spec:
        raise InputError(f"a model spec is a non-empty string (e.g. 'timm:deit_small_patch16_224', 'hf:DIR'), "
                         f"got {spec!r}")
    head, sep, rest = spec.partition(":")
    for family in FAMILIES:
        if sep and family.prefix == head:
            return family, rest
        if spec in family.names:
            return family, spec
    default = next(f for f in FAMILIES if f.prefix == DEFAULT_PREFIX)
    return default, spec


def loader(family: Family) -> Callable[..., object]:
    """The family's ``load``; a ``MissingExtraError`` naming what to install when its library is missing."""
    try:
        adapter = importlib.import_module(family.adapter)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] not in family.packages:
            raise
        extra = f"pip install \"tokenreduce[{family.extra}]\"" if family.extra else f"pip install {err.name}"
        raise MissingExtraError(f"{family.prefix}: models need the {err.name} package: {extra}") from err
    return adapter.load


__all__ = ["DEFAULT_PREFIX", "FAMILIES", "Family", "adapter_for", "call", "family_for_spec", "loader", "num_classes",
           "predictor", "preprocessing_of", "register_family"]
