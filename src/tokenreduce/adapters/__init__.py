"""Model-family adapters. An adapter knows how a family embeds, runs and pools tokens, never which method runs.

An adapter is a module with:

- ``FAMILY``: a short name for messages (e.g. "timm VisionTransformer");
- ``unsupported_reason(model) -> str | None``: why it cannot run a model of its family (None: it can);
- ``model_info(model, img_size=None) -> ModelInfo``: what the schedule and the cost table need;
- ``forward_tokens(model, images, method, track_owner=False, dense=False, on_block=None) -> TokenState``: the
  final state (final norm applied), calling ``on_block(i, state)`` after every block;
- ``patched_class(cls) -> type``: the subclass a patched model takes (its forward entry points run reduced).

A hierarchical family whose blocks do not pass one token sequence along (Swin: the methods run inside every
window of every block) has no ``ModelInfo``; instead it gives ``flops_report(model, method, img_size)`` (the
cost report, raising on a schedule it cannot run) and ``describe(model, method, img_size)``, which the API
calls in place of the plain-ViT cost table.

:func:`adapter_for` picks the adapter by the library that defines the model's class (or one of its bases), and
imports it only then, so an optional library (transformers, open_clip) is imported only for its own models.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from torch import nn

from ..core.errors import InputTypeError


@dataclass(frozen=True)
class Family:
    """A model family: the adapter module that runs it and the top-level packages its model classes come from."""

    name: str
    adapter: str
    packages: tuple[str, ...]


FAMILIES: list[Family] = [
    Family("timm VisionTransformer", "tokenreduce.adapters.timm_vit", ("timm",)),
    Family("timm SwinTransformer", "tokenreduce.adapters.swin", ("timm",)),
    Family("timm PyramidVisionTransformerV2", "tokenreduce.adapters.pvt", ("timm",)),
    Family("Hugging Face transformers ViT/DeiT/DINOv2/CLIP/SigLIP", "tokenreduce.adapters.hf", ("transformers",)),
    Family("open_clip VisionTransformer", "tokenreduce.adapters.open_clip", ("open_clip",)),
    Family("Hugging Face transformers VideoMAE/ViViT", "tokenreduce.adapters.hf_video", ("transformers",)),
]


def register_family(family: Family) -> Family:
    """Add a family (a new adapter module) to those :func:`adapter_for` considers."""
    FAMILIES.append(family)
    return family


def _model_class(model: nn.Module) -> type:
    patch = model.__dict__.get("_tokenreduce")
    return patch.original_class if patch is not None else type(model)


def adapter_for(model: nn.Module) -> ModuleType:
    """The adapter that runs ``model``; an ``InputTypeError`` naming what is unsupported otherwise.

    >>> import timm
    >>> adapter_for(timm.create_model("deit_tiny_patch16_224")).FAMILY
    'timm VisionTransformer'
    """
    roots = {cls.__module__.split(".")[0] for cls in _model_class(model).__mro__}
    reasons = []
    for family in FAMILIES:
        if roots.isdisjoint(family.packages):
            continue
        adapter = importlib.import_module(family.adapter)
        reason = adapter.unsupported_reason(model)
        if reason is None:
            return adapter
        reasons.append(reason)
    supported = ", ".join(f.name for f in FAMILIES)
    why = "; ".join(reasons) if reasons else f"{type(model).__name__} is not a model of a supported family"
    raise InputTypeError(f"tokenreduce cannot patch this model: {why} (supported: {supported})")


__all__ = ["FAMILIES", "Family", "adapter_for", "register_family"]
