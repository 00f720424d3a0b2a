"""The adapter for Hugging Face ``transformers`` vision transformers: ViT, DeiT (with the distillation token),
DINOv2 (LayerScale, SwiGLU), DINOv2 with registers, the CLIP and SigLIP vision towers, with eager or SDPA attention.

It runs the model's own modules (embeddings, layer norms, the q/k/v and output projections, MLPs, LayerScale,
heads) around :func:`tokenreduce.core.attention.attend`; it knows nothing of the method it runs. Patching swaps
the model's class for a subclass whose ``forward`` carries a ``TokenState`` through the layers, so ``unpatch``
restores the exact original class.

What a patched model returns (the model's own output dataclass, same fields and shapes):

- ``last_hidden_state``: the **restored full token grid** (``core.ops.restore``), ``B x (prefix + h*w) x C``, with
  the model's final norm where the model applies one (CLIP: none, as in ``transformers``), so code written for
  the unreduced model reads it unchanged. A merged patch gets its merged token's feature, a pruned patch the
  feature it had when it left.
- ``hidden_states`` (``output_hidden_states=True``): the input of layer 0 and every layer's output, each restored
  to the full grid the same way (as ``transformers`` returns them: before the final norm).
- ``pooler_output`` / ``logits`` / ``image_embeds``: the model's own head on the reduced model. Heads that read
  the prefix tokens read them from the reduced state (they never move); DINOv2's classifier averages the
  restored patch grid (for merges: the size-weighted mean of the merged tokens). SigLIP's attention-pooling head
  is a cross-attention from its probe to the final tokens: it runs over the **reduced** tokens with ``log(size)``
  added to the key logits, which for merged tokens is exactly the attention over the restored grid (a token of
  size s stands for s identical keys); pruned tokens are not attended, as the blocks no longer attend them.
- ``output_attentions=True`` and ``attention_mask`` are refused (``InputError``): the maps and masks would be over
  tokens that are merged or gone. ``bool_masked_pos`` and ``interpolate_pos_encoding`` are honoured (they act
  on the embedding, before any reduction); ``labels`` gives the model's own loss.

Loading (``tokenreduce.load("hf:DIR")``, :func:`load`): a ``save_pretrained`` directory, offline, with the class its
config names (``architectures``; ``AutoModel`` otherwise), preprocessed as its ``preprocessor_config.json`` says
(:func:`preprocessing`). :func:`predict` reads one tensor from any transformers model's output (the commands'
"images -> logits or embedding"), :func:`num_classes` its labels (0 for a model without a classifier).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import attend
from ..core.cost import ModelInfo, analytic_flops
from ..core.errors import InputError, InputTypeError, require
from ..core.ops import restore
from ..core.state import TokenState
from . import common

FAMILY = "Hugging Face transformers ViT/DeiT/DINOv2/CLIP/SigLIP"
TESTED_TRANSFORMERS = ">=5.0,<6 (tested: 5.18.0)"

BlockHook = common.BlockHook


# --- what the adapter knows of each architecture -------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """Names of a layer's parts: ``x += drop1(ls1(attn(norm1(x))))``, ``x += drop2(ls2(mlp(norm2(x))))``."""

    norm1: str
    attn: str
    norm2: str
    ls1: str | None = None
    ls2: str | None = None
    drop1: str | None = None
    drop2: str | None = None


VIT_LAYOUT = _Layout("layernorm_before", "attention", "layernorm_after", drop1="dropout", drop2="dropout")
DINO_LAYOUT = _Layout("norm1", "attention", "norm2", "layer_scale1", "layer_scale2", "drop_path", "drop_path")
CLIP_LAYOUT = _Layout("layer_norm1", "self_attn", "layer_norm2")


@dataclass(frozen=True)
class _Arch:
    """A base (headless) model class: where its layers are, its layout, prefix tokens and final norm."""

    kind: str          # "vit" | "deit" | "dinov2" | "dinov2_reg" | "clip" | "siglip"
    layer_class: str
    attn_class: str
    layout: _Layout
    has_cls: bool = True


def _imports() -> dict[str, type]:
    from transformers.models.clip import modeling_clip as clip
    from transformers.models.deit import modeling_deit as deit
    from transformers.models.dinov2 import modeling_dinov2 as dinov2
    from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as dinov2_reg
    from transformers.models.siglip import modeling_siglip as siglip
    from transformers.models.vit import modeling_vit as vit

    return {name: getattr(mod, name) for mod, names in [
        (vit, ("ViTModel", "ViTForImageClassification", "ViTLayer", "ViTAttention")),
        (deit, ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher", "DeiTLayer",
                "DeiTAttention", "DeiTForImageClassificationWithTeacherOutput")),
        (dinov2, ("Dinov2Model", "Dinov2ForImageClassification", "Dinov2Layer", "Dinov2Attention")),
        (dinov2_reg, ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification",
                      "Dinov2WithRegistersLayer", "Dinov2WithRegistersAttention")),
        (clip, ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPEncoderLayer", "CLIPAttention",
                "CLIPVisionModelOutput")),
        (siglip, ("SiglipVisionModel", "SiglipEncoderLayer", "SiglipAttention")),
    ] for name in names}


ARCHS = {
    "ViTModel": _Arch("vit", "ViTLayer", "ViTAttention", VIT_LAYOUT),
    "DeiTModel": _Arch("deit", "DeiTLayer", "DeiTAttention", VIT_LAYOUT),
    "Dinov2Model": _Arch("dinov2", "Dinov2Layer", "Dinov2Attention", DINO_LAYOUT),
    "Dinov2WithRegistersModel": _Arch("dinov2_reg", "Dinov2WithRegistersLayer", "Dinov2WithRegistersAttention",
                                      DINO_LAYOUT),
    "CLIPVisionModel": _Arch("clip", "CLIPEncoderLayer", "CLIPAttention", CLIP_LAYOUT),
    "SiglipVisionModel": _Arch("siglip", "SiglipEncoderLayer", "SiglipAttention", CLIP_LAYOUT, has_cls=False),
}
# Top-level classes: the attribute holding the base model (None: the model is the base).
TOPS = {
    "ViTModel": None, "DeiTModel": None, "Dinov2Model": None, "Dinov2WithRegistersModel": None,
    "CLIPVisionModel": None, "SiglipVisionModel": None,
    "ViTForImageClassification": "vit", "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit", "Dinov2ForImageClassification": "dinov2",
    "Dinov2WithRegistersForImageClassification": "dinov2_with_registers",
    "CLIPVisionModelWithProjection": "vision_model",
}
# Classifiers whose head reads only prefix tokens: no patch bookkeeping unless hidden states are asked for.
PREFIX_HEADS = {"ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"}


def _original_class(model: nn.Module) -> type:
    patch = model.__dict__.get("_tokenreduce")
    return patch.original_class if patch is not None else type(model)


def _top_name(model: nn.Module) -> str | None:
    cls = _original_class(model)
    classes = _imports()
    for name in TOPS:
        if cls is classes[name]:
            return name
    return None


def _base(model: nn.Module) -> nn.Module:
    attr = TOPS[_top_name(model)]
    return model if attr is None else getattr(model, attr)


def _arch(base: nn.Module) -> _Arch:
    return ARCHS[type(base).__name__]


def _layers(base: nn.Module, arch: _Arch) -> nn.ModuleList:
    return base.encoder.layer if arch.kind.startswith("dinov2") else (
        base.layers if arch.kind in ("vit", "deit") else base.encoder.layers)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this adapter cannot run ``model``, or None when it can."""
    name = _top_name(model)
    if name is None:
        return (f"{_original_class(model).__name__} is not a supported transformers model (supported: "
                f"{', '.join(TOPS)})")
    base = _base(model)
    classes = _imports()
    base_cls = _original_class(base)
    if base_cls.__name__ not in ARCHS or base_cls is not classes[base_cls.__name__]:
        return f"{name}'s base model is a {base_cls.__name__}, not a supported transformers class"
    arch = _arch(base)
    for i, layer in enumerate(_layers(base, arch)):
        if type(layer) is not classes[arch.layer_class]:
            return f"layer {i} is a {type(layer).__name__}; only {arch.layer_class} is supported"
        attn = getattr(layer, arch.layout.attn)
        if type(attn) is not classes[arch.attn_class]:
            return f"layer {i} attention is a {type(attn).__name__}; only {arch.attn_class} is supported"
    return None


# --- model info and cost -------------------------------------------------------------------------------------


def _num_prefix(base: nn.Module, arch: _Arch) -> int:
    return {"vit": 1, "deit": 2, "dinov2": 1, "clip": 1, "siglip": 0}.get(
        arch.kind, 1 + getattr(base.config, "num_register_tokens", 0))


def _patch_size(base: nn.Module) -> tuple[int, int]:
    p = base.config.patch_size
    return (p, p) if isinstance(p, int) else tuple(p)


def _grid(base: nn.Module, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
    size = base.config.image_size if img_size is None else img_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    p = _patch_size(base)
    return size[0] // p[0], size[1] // p[1]


def _mlp_macs_per_token(mlp: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in mlp.modules() if isinstance(m, nn.Linear))


def _linear_macs(*modules: nn.Module | None) -> int:
    return sum(m.in_features * m.out_features for m in modules if isinstance(m, nn.Linear))


def siglip_head_macs(base: nn.Module, tokens: int) -> int:
    """MACs of SigLIP's attention-pooling head over ``tokens`` keys: q (1 token), k and v (``tokens``), scores and
    weighted sum, output projection, MLP."""
    if not getattr(base, "use_head", False):
        return 0
    dim = base.config.hidden_size
    return 2 * dim * dim + 2 * tokens * dim * dim + 2 * tokens * dim + _mlp_macs_per_token(base.head.mlp)


def model_info(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> ModelInfo:
    """What the schedule and the cost table need. SigLIP's pooling head is counted at the unreduced token count
    here; a patched SigLIP reports it at the reduced count through ``tokenreduce_flops``."""
    name, base = _top_name(model), _base(model)
    arch = _arch(base)
    layer = _layers(base, arch)[0]
    grid = _grid(base, img_size)
    num_prefix = _num_prefix(base, arch)
    dim = base.config.hidden_size
    head = 0
    if name in ("ViTModel", "DeiTModel") and base.pooler is not None:
        head = _linear_macs(base.pooler.dense)
    elif name in ("ViTForImageClassification", "DeiTForImageClassification", "Dinov2ForImageClassification",
                  "Dinov2WithRegistersForImageClassification"):
        head = _linear_macs(model.classifier)
    elif name == "DeiTForImageClassificationWithTeacher":
        head = _linear_macs(model.cls_classifier, model.distillation_classifier)
    elif name == "CLIPVisionModelWithProjection":
        head = _linear_macs(model.visual_projection)
    elif name == "SiglipVisionModel":
        head = siglip_head_macs(base, num_prefix + grid[0] * grid[1])
    # The cost table counts an MLP as 2 * N * dim * mlp_hidden; SwiGLU (three Linears) is expressed the same way.
    mlp_hidden = _mlp_macs_per_token(layer.mlp) // (2 * dim)
    return ModelInfo(
        depth=len(_layers(base, arch)),
        dim=dim,
        heads=base.config.num_attention_heads,
        mlp_hidden=mlp_hidden,
        num_prefix=num_prefix,
        has_cls=arch.has_cls,
        patch_size=_patch_size(base),
        in_chans=base.config.num_channels,
        grid=grid,
        head_macs=head,
        dense_output=name not in PREFIX_HEADS,  # every other output has a restored last_hidden_state
    )


# --- running the layers --------------------------------------------------------------------------------------


def _fused(base: nn.Module) -> bool:
    """Eager attention computes the map (unfused, what FlopCounterMode counts); every other implementation
    (sdpa, flash, flex) runs as ``F.scaled_dot_product_attention``: the same arithmetic."""
    return getattr(base.config, "_attn_implementation", "eager") != "eager"


def hf_attention(attn: nn.Module, x: torch.Tensor, size_bias: torch.Tensor | None, need, has_cls: bool,
                 transform, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A transformers self-attention (separate q/k/v projections, then the output projection) through
    :func:`attend`, with the log-size bias and the statistics a method asks for."""
    batch, num, _ = x.shape
    heads = getattr(attn, "num_attention_heads", None) or attn.num_heads
    # Explicit head size, not -1: an empty batch (0 elements) cannot infer it.
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = (t.view(batch, num, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    scale = getattr(attn, "scaling", None) or attn.scale
    p = getattr(attn, "attention_dropout", None)
    p = (attn.dropout if p is None else p) if attn.training else 0.0
    out, stats = attend(q, k, v, scale, size_bias, need, has_cls, transform, fused=fused, dropout=p,
                        attn_drop=(lambda t: F.dropout(t, p, training=True)) if p else None)
    out = out.transpose(1, 2).flatten(2)
    proj = getattr(attn, "o_proj", None) or attn.out_proj
    return proj(out), stats


def _apply(layer: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
    return x if name is None else getattr(layer, name)(x)


def block_step(layer: nn.Module, layout: _Layout, i: int, state: TokenState, method: Any, plan: Any, has_cls: bool,
               fused: bool) -> TokenState:
    """One transformers layer on a token state: attention (with the size bias and the statistics the method
    needs), the method's reduction where the schedule reduces, then the MLP."""
    needs = method.needs(i, plan) if method is not None else ()
    bias = state.size_bias() if method is not None and method.prop_attn(i) else None
    transform = method.attn_transform(i, plan) if method is not None else None
    attn = getattr(layer, layout.attn)
    h, stats = hf_attention(attn, getattr(layer, layout.norm1)(state.x), bias, needs, has_cls, transform, fused)
    state = state.replace(x=_apply(layer, layout.drop1, _apply(layer, layout.ls1, h)) + state.x)
    if plan is not None and plan.reduces(i):
        state = method.reduce(i, state, stats, plan.amounts[i])
    h = _apply(layer, layout.ls2, layer.mlp(getattr(layer, layout.norm2)(state.x)))
    return state.replace(x=_apply(layer, layout.drop2, h) + state.x)


def embed(base: nn.Module, images: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
          interpolate_pos_encoding: bool | None = None) -> TokenState:
    """The tokens entering layer 0 (the model's own embeddings; CLIP's pre-layernorm) as an unreduced state."""
    arch = _arch(base)
    if not torch.is_tensor(images) or images.ndim != 4:
        raise InputTypeError(f"pixel_values must be a B x C x H x W tensor, got "
                             f"{type(images).__name__ if not torch.is_tensor(images) else tuple(images.shape)}")
    kwargs: dict[str, Any] = {}
    if arch.kind in ("vit", "deit", "dinov2", "dinov2_reg"):
        kwargs["bool_masked_pos"] = bool_masked_pos
    elif bool_masked_pos is not None:
        raise InputError(f"bool_masked_pos is not an argument of {type(base).__name__}")
    if arch.kind in ("vit", "deit", "clip", "siglip"):
        kwargs["interpolate_pos_encoding"] = bool(interpolate_pos_encoding)
    elif interpolate_pos_encoding:
        pass  # DINOv2 always interpolates its position embedding
    if arch.kind in ("vit", "deit"):
        dtype = base.embeddings.patch_embeddings.projection.weight.dtype
        images = images.to(dtype)  # as ViTModel.forward does
    x = base.embeddings(images, **kwargs)
    if arch.kind == "clip":
        x = base.pre_layrnorm(x)
    p = _patch_size(base)
    grid = (images.shape[-2] // p[0], images.shape[-1] // p[1])
    return TokenState(x=x, num_prefix=_num_prefix(base, arch), grid=grid)


def run_layers(base: nn.Module, state: TokenState, method: Any = None, on_block: BlockHook | None = None
               ) -> TokenState:
    """Run every layer on ``state`` with ``method`` (None: unreduced); the state after the last layer, before
    the final norm. Layers with gradient checkpointing on are recomputed in the backward pass, as in transformers."""
    arch = _arch(base)
    fused = _fused(base)

    def step(layer: nn.Module, i: int, state: TokenState, method: Any, plan: Any) -> TokenState:
        return block_step(layer, arch.layout, i, state, method, plan, arch.has_cls, fused)

    return common.run_blocks(_layers(base, arch), state, method, step, on_block,
                             grad_checkpointing=lambda layer: getattr(layer, "gradient_checkpointing", False)
                             and layer.training)


def final_norm(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm the model applies to ``last_hidden_state`` (CLIP applies none: only its pooled CLS is normed)."""
    kind = _arch(base).kind
    if kind == "clip":
        return x
    return base.post_layernorm(x) if kind == "siglip" else base.layernorm(x)


def forward_tokens(model: nn.Module, images: torch.Tensor, method: Any = None, track_owner: bool = False,
                   dense: bool = False, on_block: BlockHook | None = None) -> TokenState:
    """Embed ``images`` and run every layer with ``method``; the final state with the final norm on ``x``."""
    base = _base(model)
    state = embed(base, images)
    if track_owner or dense:
        state = state.tracked(dense=dense)
    state = run_layers(base, state, method, on_block)
    return state.replace(x=final_norm(base, state.x))


def siglip_pool(base: nn.Module, x: torch.Tensor, size: torch.Tensor | None, fused: bool) -> torch.Tensor:
    """SigLIP's attention-pooling head over the (reduced) final tokens ``x`` with ``log(size)`` on the key logits:
    the ``nn.MultiheadAttention`` of the head, its projections read by name, through :func:`attend`."""
    head = base.head
    mha = head.attention
    batch, num, dim = x.shape
    heads = mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
    probe = head.probe.repeat(batch, 1, 1)
    q = F.linear(probe, w[:dim], bq).view(batch, 1, heads, dim // heads).transpose(1, 2)
    k = F.linear(x, w[dim:2 * dim], bk).view(batch, num, heads, dim // heads).transpose(1, 2)
    v = F.linear(x, w[2 * dim:], bv).view(batch, num, heads, dim // heads).transpose(1, 2)
    bias = None if size is None else size.log().transpose(1, 2).unsqueeze(1)
    p = mha.dropout if mha.training else 0.0
    out, _ = attend(q, k, v, (dim // heads) ** -0.5, bias, (), False, None, fused=fused, dropout=p,
                    attn_drop=(lambda t: F.dropout(t, p, training=True)) if p else None)
    h = mha.out_proj(out.transpose(1, 2).reshape(batch, 1, dim))
    h = h + head.mlp(head.layernorm(h))
    return h[:, 0]


def _refuse(model: nn.Module, kwargs: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    """The options of a forward call: refuse what a reduced model cannot honour, name anything unknown."""
    config = model.config
    if kwargs.pop("output_attentions", None) or getattr(config, "output_attentions", False):
        raise InputError("output_attentions=True is not supported on a token-reduced model: the attention maps "
                         "are over tokens that are merged or removed; tr.unpatch(model) first")
    if kwargs.pop("attention_mask", None) is not None:
        raise InputError("attention_mask is not supported on a token-reduced model (the tokens it would mask are "
                         "merged or removed); tr.unpatch(model) first")
    for key in ("head_mask",):
        if kwargs.get(key) is not None:
            raise InputError(f"{key} is not supported on a token-reduced model; tr.unpatch(model) first")
        kwargs.pop(key, None)
    options = {"output_hidden_states": kwargs.pop("output_hidden_states", None),
               "return_dict": kwargs.pop("return_dict", None)}
    for key in allowed:
        options[key] = kwargs.pop(key, None)
    if kwargs:
        raise InputError(f"{type(model).__name__}: argument(s) {sorted(kwargs)} are not supported on a "
                         "token-reduced model; tr.unpatch(model) first")
    if options["output_hidden_states"] is None:
        options["output_hidden_states"] = getattr(config, "output_hidden_states", False)
    if options["return_dict"] is None:
        options["return_dict"] = getattr(config, "return_dict", True)
    return options


def _hidden_selection(wanted: Any, count: int) -> Callable[[int], bool] | None:
    """Which of the ``count`` hidden states to return (None: none). A list of layer indices selects, as in
    transformers, among the layer outputs only (the other entries are None)."""
    if isinstance(wanted, (list, tuple, set)):
        chosen = set(wanted)
        return lambda i: i in chosen
    return (lambda i: True) if wanted else None


def base_outputs(base: nn.Module, pixel_values: torch.Tensor, method: Any, *, need_grid: bool,
                 output_hidden_states: Any = False, bool_masked_pos: torch.Tensor | None = None,
                 interpolate_pos_encoding: bool | None = None
                 ) -> tuple[TokenState, torch.Tensor | None, tuple | None]:
    """Run the base model reduced: the final state (final norm applied, reduced tokens), the restored full grid
    with the final norm (when ``need_grid``) and the restored hidden states (when asked for)."""
    state = embed(base, pixel_values, bool_masked_pos, interpolate_pos_encoding)
    hidden: list[torch.Tensor | None] | None = None
    select = _hidden_selection(output_hidden_states, 0)
    if need_grid or select is not None:
        state = state.tracked(dense=True)
    on_block = None
    if select is not None:
        by_list = isinstance(output_hidden_states, (list, tuple, set))
        hidden = [] if by_list else [state.x]

        def on_block(i: int, s: TokenState) -> None:
            hidden.append(restore(s) if select(len(hidden)) else None)

    state = run_layers(base, state, method, on_block)
    grid = final_norm(base, restore(state)) if need_grid else None
    return state.replace(x=final_norm(base, state.x)), grid, None if hidden is None else tuple(hidden)


def _reduced_forward(model: nn.Module, pixel_values: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

    if pixel_values is None:
        raise InputError("pixel_values is required")
    name = _top_name(model)
    base = _base(model)
    arch = _arch(base)
    method = model._tokenreduce.method
    allowed = ["labels"] if "For" in name else []
    if arch.kind in ("vit", "deit", "clip", "siglip"):
        allowed.append("interpolate_pos_encoding")
    if arch.kind in ("vit", "deit", "dinov2", "dinov2_reg") and "For" not in name:
        allowed.append("bool_masked_pos")
    opts = _refuse(model, dict(kwargs), tuple(allowed))
    labels = opts.get("labels")
    need_grid = name not in PREFIX_HEADS
    state, grid, hidden = base_outputs(
        base, pixel_values, method, need_grid=need_grid, output_hidden_states=opts["output_hidden_states"],
        bool_masked_pos=opts.get("bool_masked_pos"), interpolate_pos_encoding=opts.get("interpolate_pos_encoding"))
    x = state.x
    classes = _imports()

    def loss(logits: torch.Tensor) -> torch.Tensor | None:
        return None if labels is None else model.loss_function(labels, logits, model.config)

    if name in ("ViTModel", "DeiTModel"):
        pooled = base.pooler(grid) if base.pooler is not None else None
        out = BaseModelOutputWithPooling(last_hidden_state=grid, pooler_output=pooled, hidden_states=hidden)
    elif name in ("Dinov2Model", "Dinov2WithRegistersModel"):
        out = BaseModelOutputWithPooling(last_hidden_state=grid, pooler_output=grid[:, 0], hidden_states=hidden)
    elif name in ("ViTForImageClassification", "DeiTForImageClassification"):
        logits = model.classifier(x[:, 0, :])
        out = ImageClassifierOutput(loss=loss(logits), logits=logits, hidden_states=hidden)
    elif name == "DeiTForImageClassificationWithTeacher":
        cls_logits = model.cls_classifier(x[:, 0, :])
        distillation_logits = model.distillation_classifier(x[:, 1, :])
        out = classes["DeiTForImageClassificationWithTeacherOutput"](
            logits=(cls_logits + distillation_logits) / 2, cls_logits=cls_logits,
            distillation_logits=distillation_logits, hidden_states=hidden)
    elif name in ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"):
        patch_tokens = grid[:, state.num_prefix:]
        logits = model.classifier(torch.cat([grid[:, 0], patch_tokens.mean(dim=1)], dim=1))
        out = ImageClassifierOutput(loss=loss(logits), logits=logits, hidden_states=hidden)
    elif name == "CLIPVisionModel":
        out = BaseModelOutputWithPooling(last_hidden_state=grid, pooler_output=base.post_layernorm(x[:, 0, :]),
                                         hidden_states=hidden)
    elif name == "CLIPVisionModelWithProjection":
        image_embeds = model.visual_projection(base.post_layernorm(x[:, 0, :]))
        out = classes["CLIPVisionModelOutput"](image_embeds=image_embeds, last_hidden_state=grid,
                                               hidden_states=hidden)
    elif name == "SiglipVisionModel":
        pooled = siglip_pool(base, x, state.size, _fused(base)) if base.use_head else None
        out = BaseModelOutputWithPooling(last_hidden_state=grid, pooler_output=pooled, hidden_states=hidden)
    else:  # pragma: no cover - unsupported_reason refuses it first
        raise InputTypeError(f"{name} is not supported")
    return out if opts["return_dict"] else out.to_tuple()


def dense_features(model: nn.Module, images: torch.Tensor, method: Any) -> torch.Tensor:
    """The full token grid after the final norm, ``B x (num_prefix + h*w) x C`` (``core.ops.restore``)."""
    base = _base(model)
    _, grid, _ = base_outputs(base, images, method, need_grid=True)
    return grid


class _TokenReduced(common.Reduced):
    """Mixed in front of the model's own class while a method is patched in: ``forward`` runs the reduced model
    and returns the model's own output dataclass (see the module doc). The patched class keeps the original
    class name, so ``save_pretrained`` writes it as the config's architecture and a saved patched model loads as
    the original class."""

    keep_class_name = True

    def forward(self, pixel_values: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise InputError("pass the options of a token-reduced transformers model by keyword")
        return _reduced_forward(self, pixel_values, kwargs)

    def tokenreduce_flops(self, img_size: int | tuple[int, int] | None = None) -> Any:
        """``tr.flops``: the cost table, with SigLIP's attention-pooling head at the reduced token count."""
        info = model_info(self, img_size)
        method = self._tokenreduce.method
        report = analytic_flops(info, method)
        base = _base(self)
        if _arch(base).kind != "siglip" or not getattr(base, "use_head", False):
            return report
        final = method.plan(info.num_tokens, info.num_prefix, info.depth).tokens_out[-1]
        delta = (siglip_head_macs(base, final) - info.head_macs) / 1e9
        return replace(report, gmacs=report.gmacs + delta, head_gmacs=report.head_gmacs + delta)


def patched_class(cls: type) -> type:
    """The patched subclass (it keeps the original class name; see ``_TokenReduced``)."""
    return common.patched_subclass(_TokenReduced, cls)


__all__ = ["FAMILY", "dense_features", "forward_tokens", "model_info", "patched_class", "unsupported_reason"]


# --- loading (``hf:DIR``), preprocessing, and one tensor out of any transformers model -------------------------

#: Output fields that hold the one tensor the commands read, in order (else ``last_hidden_state[:, 0]``).
PREDICTION_FIELDS = ("logits", "image_embeds", "pooler_output")
#: Class-name endings of the models whose output is class logits.
CLASSIFIER_SUFFIXES = ("ForImageClassification", "ForImageClassificationWithTeacher", "ForVideoClassification")


def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(pixel_values=images)`` as one tensor: the logits of a classifier, else the image embedding
    (``image_embeds``, ``pooler_output``, or the first token of ``last_hidden_state``)."""
    out = model(pixel_values=images)
    for name in PREDICTION_FIELDS:
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out.last_hidden_state[:, 0]


def num_classes(model: nn.Module) -> int:
    """The labels of a classifier (``config.num_labels``); 0 for a model that returns an embedding."""
    classifier = _original_class(model).__name__.endswith(CLASSIFIER_SUFFIXES)
    return int(getattr(model.config, "num_labels", 0)) if classifier else 0


_num_labels = num_classes  # for load, whose argument has the name


_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}  # PIL codes;
# PIL's LANCZOS (1), BOX (4) and HAMMING (5) have no timm transform: the nearest kind is used.


def _size_dict(size: Any) -> Any:
    """A processor's size setting (an int, a dict, or transformers' ``SizeDict``) as an int or a plain dict."""
    if size is None or isinstance(size, int | dict):
        return size
    keys = ("height", "width", "shortest_edge", "longest_edge")
    return {k: getattr(size, k) for k in keys if getattr(size, k, None) is not None}


def _size_pair(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return None


def preprocessing(path: str | Path | None, config: Any) -> common.Preprocessing:
    """The preprocessing of an HF model directory, from its image processor (``preprocessor_config.json``): mean,
    std, resample -> interpolation, and ``size`` / ``crop_size``: ``{height, width}`` is a squash resize to that
    size (``crop_mode='squash'``); ``{shortest_edge}`` with a centre crop is timm's centre crop with
    ``crop_pct = crop / shortest_edge``. Without the file: the model's ``image_size``, bicubic, ImageNet mean and
    std."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    image_size = _size_pair(getattr(config, "image_size", 224)) or (224, 224)
    frames = getattr(config, "num_frames", None)
    out: dict[str, Any] = {"input_size": (3, *image_size), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
                           "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0, "crop_mode": "squash"}
    file = Path(path) / "preprocessor_config.json" if path else None
    if file is None or not file.is_file():
        return common.Preprocessing.from_data_config(out, "defaults (no preprocessor_config.json)", frames)
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(str(path))
        settings = {k: getattr(proc, k, None) for k in ("image_mean", "image_std", "size", "crop_size", "resample",
                                                          "do_center_crop", "do_normalize")}
    except Exception:  # an image processor transformers cannot build here: read the JSON itself
        settings = json.loads(file.read_text())
    if settings.get("do_normalize", True) and settings.get("image_mean") is not None:
        out["mean"], out["std"] = tuple(settings["image_mean"]), tuple(settings["image_std"])
    resample = settings.get("resample")
    if resample is not None:
        out["interpolation"] = _RESAMPLE.get(int(resample), "bicubic")
    size, crop = _size_dict(settings.get("size")), _size_dict(settings.get("crop_size"))
    pair = _size_pair(size)
    if pair is not None:
        out["input_size"] = (3, *pair)
    elif isinstance(size, dict) and "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        crop_pair = _size_pair(crop) if settings.get("do_center_crop", True) else None
        out["input_size"] = (3, *(crop_pair or (edge, edge)))
        out["crop_mode"], out["crop_pct"] = "center", (crop_pair[0] / edge if crop_pair else 1.0)
    if settings.get("do_center_crop") and pair is not None and _size_pair(crop) is not None:
        crop_pair = _size_pair(crop)
        out["input_size"] = (3, *crop_pair)
        out["crop_mode"], out["crop_pct"] = "center", crop_pair[0] / pair[0]
    return common.Preprocessing.from_data_config(out, str(file), frames)


def preprocessing_of(model: nn.Module) -> common.Preprocessing:
    """:func:`preprocessing` of the directory the model was loaded from (``name_or_path``; defaults without one)."""
    path = getattr(model, "name_or_path", None)
    return preprocessing(path if path and Path(path).is_dir() else None, model.config)


def load(path: str, checkpoint: str | None = None, pretrained: bool = False, num_classes: int | None = None,
         **kwargs: Any) -> common.Loaded:
    """The model saved in the directory ``path`` (offline; the hub is never asked), with the class its config
    names (``architectures``; ``AutoModel`` otherwise) and ``kwargs`` for ``from_pretrained`` (e.g.
    ``attn_implementation="eager"``), the weights of ``checkpoint`` if given, and :func:`preprocessing`. Its
    weights are the directory's (``pretrained`` changes nothing); ``num_classes``, if given, must be its number
    of labels."""
    spec = f"hf:{path}"
    common.refuse_sizes(spec, kwargs)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(path).is_dir():
        raise InputError(f"{spec}: not a directory (give a local save_pretrained directory; the hub is not used)")
    require("transformers", "hf")
    import transformers

    from ..core.checkpoint import load_checkpoint

    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        names = list(getattr(config, "architectures", None) or [])
        cls = getattr(transformers, names[0], None) if names else None
        cls = cls or transformers.AutoModel
        model = cls.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise InputError(f"{spec}: cannot load the model: {err}") from err
    if checkpoint:
        load_checkpoint(model, checkpoint)
    labels = _num_labels(model)
    if num_classes is not None and num_classes != labels:
        raise InputError(f"{spec} has {labels} labels (a classifier's head is the directory's), not {num_classes}")
    return common.Loaded(model.eval(), preprocessing(path, config))
