"""The adapter for Hugging Face ``transformers`` video transformers: VideoMAE (``VideoMAEModel``,
``VideoMAEForVideoClassification``; no CLS token, mean pooling) and ViViT (``VivitModel``,
``VivitForVideoClassification``; a CLS token), with eager or SDPA attention.

A clip ``B x T x C x H x W`` becomes ``t*h*w`` tubelet tokens (``t = T / tubelet``) in raster order over the
space-time grid ``(t, h, w)`` (time slowest), which the token state carries as its ``grid``: ``owner``, the dense
restore and the pictures work per frame, and GTP's spatial graph becomes a space-time neighbourhood. Every method
runs unchanged: a method never sees whether its tokens come from an image or a clip.

What a patched model returns (the model's own output dataclass, same fields and shapes), as in ``adapters.hf``:

- ``last_hidden_state`` and ``hidden_states``: the **restored full token grid** (``core.ops.restore``),
  ``B x (prefix + t*h*w) x C``, with the final norm where the model has one.
- VideoMAE's classifier averages the restored grid (``fc_norm(mean)``; for merged tokens that is the size-weighted
  mean of the reduced tokens, a tubelet that left counts with the feature the restore rule gives it: under
  ``restore="departure"`` the one it had when it left, under the Top-K / EViT / GTP / PPT default ``ridge`` a
  regression counted in ``tr.flops``), so ``forward`` is exactly ``head(pool(features))`` of the features a user
  reads; without mean pooling it reads the restored token 0, as transformers does. ViViT's classifier and pooler
  read the CLS token, which never moves.
- ``output_attentions``, ``attention_mask``, ``head_mask`` and VideoMAE's ``bool_masked_pos`` are refused
  (``InputError``): they address tokens that are merged or gone. ``labels`` gives the model's own loss.

A clip must have the frame count the model was built for (``config.num_frames``: the position embedding is fixed
over time); any other count is an ``InputError`` naming both counts.

TimeSformer is refused: its divided space-time attention attends over time at each spatial position and over
space within each frame, which needs the same spatial tokens in every frame. The methods here remove or merge
tokens anywhere in the clip, so the frames would no longer align (see ``REFUSED``).

Loading (``tokenreduce.load("hf:DIR")``), the one tensor a command reads (``predict``) and the class count are
``adapters.hf``'s, which serve every transformers model (its ``preprocessing`` records ``config.num_frames``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import attend
from ..core.cost import ModelInfo
from ..core.errors import InputError, InputTypeError
from ..core.ops import restore
from ..core.state import TokenState
from . import common, hf

FAMILY = "Hugging Face transformers VideoMAE/ViViT"

BlockHook = common.BlockHook

# Top-level classes: the attribute holding the base model (None: the model is the base).
TOPS = {"VideoMAEModel": None, "VideoMAEForVideoClassification": "videomae", "VivitModel": None,
        "VivitForVideoClassification": "vivit"}
# Classes of the family that are refused, and why.
REFUSED = {
    "TimesformerModel": "TimeSformer's divided space-time attention runs temporal attention at every spatial "
                        "position and spatial attention within every frame, so it needs the same spatial tokens in "
                        "every frame; the token-reduction methods remove or merge tokens anywhere in the clip and "
                        "would break that frame alignment",
    "VideoMAEForPreTraining": "VideoMAEForPreTraining runs on the visible tokens of a random tube mask and its "
                              "decoder needs them all; patch VideoMAEModel or VideoMAEForVideoClassification",
}
REFUSED["TimesformerForVideoClassification"] = REFUSED["TimesformerModel"]


def _imports() -> dict[str, type]:
    from transformers.models.videomae import modeling_videomae as videomae
    from transformers.models.vivit import modeling_vivit as vivit

    return {name: getattr(mod, name) for mod, names in [
        (videomae, ("VideoMAEModel", "VideoMAEForVideoClassification", "VideoMAELayer", "VideoMAEAttention",
                    "VideoMAESelfAttention")),
        (vivit, ("VivitModel", "VivitForVideoClassification", "VivitLayer", "VivitAttention")),
    ] for name in names}


def _original_class(model: nn.Module) -> type:
    patch = model.__dict__.get("_tokenreduce")
    return patch.original_class if patch is not None else type(model)


def _top_name(model: nn.Module) -> str | None:
    cls = _original_class(model)
    classes = _imports()
    return next((name for name in TOPS if cls is classes[name]), None)


def _base(model: nn.Module) -> nn.Module:
    attr = TOPS[_top_name(model)]
    return model if attr is None else getattr(model, attr)


def _is_videomae(base: nn.Module) -> bool:
    return type(base).__name__ == "VideoMAEModel"


def _layers(base: nn.Module) -> nn.ModuleList:
    return base.encoder.layer if _is_videomae(base) else base.layers


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this adapter cannot run ``model``, or None when it can."""
    cls = _original_class(model)
    if cls.__name__ in REFUSED:
        return REFUSED[cls.__name__]
    name = _top_name(model)
    if name is None:
        return f"{cls.__name__} is not a supported transformers video model (supported: {', '.join(TOPS)})"
    base = _base(model)
    classes = _imports()
    layer_cls, attn_name, attn_cls = (("VideoMAELayer", "attention", "VideoMAEAttention") if _is_videomae(base)
                                      else ("VivitLayer", "attention", "VivitAttention"))
    for i, layer in enumerate(_layers(base)):
        if type(layer) is not classes[layer_cls]:
            return f"layer {i} is a {type(layer).__name__}; only {layer_cls} is supported"
        if type(getattr(layer, attn_name)) is not classes[attn_cls]:
            return f"layer {i} attention is a {type(getattr(layer, attn_name)).__name__}; only {attn_cls} is supported"
    return None


# --- the space-time grid and the cost ------------------------------------------------------------------------


def _tubelet(base: nn.Module) -> tuple[int, int, int]:
    """(frames, height, width) of one tubelet."""
    config = base.config
    if _is_videomae(base):
        p = config.patch_size
        p = (p, p) if isinstance(p, int) else tuple(p)
        return int(config.tubelet_size), p[0], p[1]
    return tuple(int(v) for v in config.tubelet_size)


def _num_prefix(base: nn.Module) -> int:
    return 0 if _is_videomae(base) else 1


def video_grid(base: nn.Module, img_size: int | tuple[int, int] | None = None,
               num_frames: int | None = None) -> tuple[int, int, int]:
    """The (t, h, w) tubelet grid of a clip of ``num_frames`` frames of ``img_size`` (the model's own when None)."""
    config = base.config
    size = config.image_size if img_size is None else img_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    frames = config.num_frames if num_frames is None else num_frames
    tt, th, tw = _tubelet(base)
    return frames // tt, size[0] // th, size[1] // tw


def model_info(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> ModelInfo:
    """What the schedule and the cost table need, for a clip of ``config.num_frames`` frames of ``img_size``
    (``patch_size`` is the tubelet, ``grid`` the (t, h, w) tubelet grid)."""
    name, base = _top_name(model), _base(model)
    layer = _layers(base)[0]
    dim = base.config.hidden_size
    if name == "VivitModel" and base.pooler is not None:
        head = hf._linear_macs(base.pooler.dense)
    elif name in ("VideoMAEForVideoClassification", "VivitForVideoClassification"):
        head = hf._linear_macs(model.classifier)
    else:
        head = 0
    mlp = (layer.intermediate.dense, layer.output.dense) if _is_videomae(base) else (layer.mlp.fc1, layer.mlp.fc2)
    return ModelInfo(
        depth=len(_layers(base)),
        dim=dim,
        heads=base.config.num_attention_heads,
        mlp_hidden=hf._linear_macs(*mlp) // (2 * dim),
        num_prefix=_num_prefix(base),
        has_cls=not _is_videomae(base),
        patch_size=_tubelet(base),
        in_chans=base.config.num_channels,
        grid=video_grid(base, img_size),
        head_macs=head,
        dense_output=name != "VivitForVideoClassification",  # the others return a restored last_hidden_state
    )


# --- running the layers --------------------------------------------------------------------------------------


def videomae_attention(attn: nn.Module, x: torch.Tensor, size_bias: torch.Tensor | None, need, transform,
                       fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A ``VideoMAEAttention`` (``attention.query/key/value``, then ``output.dense`` and its dropout) through
    :func:`attend`, with the log-size bias and the statistics a method asks for (no CLS token)."""
    self_attn = attn.attention
    batch, num, _ = x.shape
    heads = self_attn.num_attention_heads
    # Explicit head size, not -1: an empty batch (0 elements) cannot infer it.
    q, k, v = self_attn.query(x), self_attn.key(x), self_attn.value(x)
    q, k, v = (t.view(batch, num, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    p = self_attn.dropout_prob if self_attn.training else 0.0
    out, stats = attend(q, k, v, self_attn.scaling, size_bias, need, False, transform, fused=fused, dropout=p,
                        attn_drop=(lambda t: F.dropout(t, p, training=True)) if p else None)
    out = out.transpose(1, 2).flatten(2)
    return attn.output.dropout(attn.output.dense(out)), stats


def videomae_step(layer: nn.Module, i: int, state: TokenState, method: Any, plan: Any, fused: bool) -> TokenState:
    """One ``VideoMAELayer`` on a token state: attention, the method's reduction where the schedule reduces, MLP."""
    needs = method.needs(i, plan) if method is not None else ()
    bias = state.size_bias() if method is not None and method.prop_attn(i) else None
    transform = method.attn_transform(i, plan) if method is not None else None
    h, stats = videomae_attention(layer.attention, layer.layernorm_before(state.x), bias, needs, transform, fused)
    state = state.replace(x=h + state.x)
    if plan is not None and plan.reduces(i):
        state = method.reduce(i, state, stats, plan.amounts[i])
    h = layer.output.dropout(layer.output.dense(layer.intermediate(layer.layernorm_after(state.x))))
    return state.replace(x=h + state.x)


def check_clip(base: nn.Module, clip: Any) -> tuple[int, int, int]:
    """The (t, h, w) grid of ``clip`` (``B x T x C x H x W``), or a clear error naming what the model cannot take."""
    name = type(base).__name__
    if not torch.is_tensor(clip) or clip.ndim != 5:
        got = type(clip).__name__ if not torch.is_tensor(clip) else f"a tensor of shape {tuple(clip.shape)}"
        raise InputTypeError(f"{name}: pixel_values must be a clip B x T x C x H x W (5 dimensions), got {got}")
    frames, tubelet = base.config.num_frames, _tubelet(base)
    if clip.shape[1] != frames:
        raise InputError(f"{name} takes clips of {frames} frames ({frames // tubelet[0]} time steps of "
                         f"{tubelet[0]}-frame tubelets; its position embedding is fixed over time), got a clip of "
                         f"{clip.shape[1]} frames")
    size = tuple(clip.shape[-2:])
    image = base.config.image_size
    image = (image, image) if isinstance(image, int) else tuple(image)
    if size != image:
        raise InputError(f"{name} takes frames of {image[0]} x {image[1]} pixels, got {size[0]} x {size[1]}")
    return video_grid(base, size, frames)


def embed(base: nn.Module, clip: torch.Tensor) -> TokenState:
    """The tokens entering layer 0 (the model's own embeddings) as an unreduced state on the (t, h, w) grid."""
    grid = check_clip(base, clip)
    x = base.embeddings(clip, None) if _is_videomae(base) else base.embeddings(clip)
    return TokenState(x=x, num_prefix=_num_prefix(base), grid=grid)


def run_layers(base: nn.Module, state: TokenState, method: Any = None, on_block: BlockHook | None = None
               ) -> TokenState:
    """Run every layer on ``state`` with ``method`` (None: unreduced); the state after the last layer, before the
    final norm. Layers with gradient checkpointing on are recomputed in the backward pass, as in transformers."""
    fused = hf._fused(base)
    if _is_videomae(base):
        def step(layer: nn.Module, i: int, state: TokenState, method: Any, plan: Any) -> TokenState:
            return videomae_step(layer, i, state, method, plan, fused)
    else:
        def step(layer: nn.Module, i: int, state: TokenState, method: Any, plan: Any) -> TokenState:
            return hf.block_step(layer, hf.VIT_LAYOUT, i, state, method, plan, True, fused)
    return common.run_blocks(_layers(base), state, method, step, on_block,
                             grad_checkpointing=lambda layer: getattr(layer, "gradient_checkpointing", False)
                             and layer.training)


def final_norm(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm the base model applies to ``last_hidden_state`` (VideoMAE with mean pooling: none)."""
    return x if base.layernorm is None else base.layernorm(x)


def forward_tokens(model: nn.Module, clip: torch.Tensor, method: Any = None, track_owner: bool = False,
                   dense: bool = False, on_block: BlockHook | None = None) -> TokenState:
    """Embed ``clip`` and run every layer with ``method``; the final state with the final norm on ``x``."""
    base = _base(model)
    state = embed(base, clip)
    if track_owner or dense:
        state = state.tracked(dense=dense)
    state = run_layers(base, state, method, on_block)
    return state.replace(x=final_norm(base, state.x))


def base_outputs(base: nn.Module, clip: torch.Tensor, method: Any, *, need_grid: bool,
                 output_hidden_states: Any = False) -> tuple[TokenState, torch.Tensor | None, tuple | None]:
    """Run the base model reduced: the final state (final norm applied, reduced tokens), the restored full grid
    with the final norm (when ``need_grid``) and the restored hidden states (when asked for)."""
    state = embed(base, clip)
    select = hf._hidden_selection(output_hidden_states, 0)
    hidden: list[torch.Tensor | None] | None = None
    if need_grid or select is not None:
        state = state.tracked(dense=True)
    on_block = None
    if select is not None:
        hidden = [] if isinstance(output_hidden_states, (list, tuple, set)) else [state.x]

        def on_block(i: int, s: TokenState) -> None:
            hidden.append(restore(s) if select(len(hidden)) else None)

    state = run_layers(base, state, method, on_block)
    grid = final_norm(base, restore(state)) if need_grid else None
    return state.replace(x=final_norm(base, state.x)), grid, None if hidden is None else tuple(hidden)


def video_head(model: nn.Module, grid: torch.Tensor) -> torch.Tensor:
    """VideoMAE's classifier input from the full token grid: ``fc_norm`` of the mean over all tubelets, or token 0
    without mean pooling (as transformers does)."""
    return model.fc_norm(grid.mean(dim=1)) if model.fc_norm is not None else grid[:, 0]


def _reduced_forward(model: nn.Module, pixel_values: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
    from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput

    if pixel_values is None:
        raise InputError("pixel_values is required")
    if kwargs.get("bool_masked_pos") is not None:
        raise InputError("bool_masked_pos is not supported on a token-reduced model (the masked tubelets would "
                         "leave the space-time grid the reduction tracks); tr.unpatch(model) first")
    kwargs.pop("bool_masked_pos", None)
    name = _top_name(model)
    base = _base(model)
    opts = hf._refuse(model, dict(kwargs), ("labels",) if "For" in name else ())
    labels = opts.get("labels")
    need_grid = name != "VivitForVideoClassification"
    state, grid, hidden = base_outputs(base, pixel_values, model._tokenreduce.method, need_grid=need_grid,
                                       output_hidden_states=opts["output_hidden_states"])

    def loss(logits: torch.Tensor) -> torch.Tensor | None:
        return None if labels is None else model.loss_function(labels, logits, model.config)

    if name == "VideoMAEModel":
        out = BaseModelOutput(last_hidden_state=grid, hidden_states=hidden)
    elif name == "VivitModel":
        pooled = base.pooler(grid) if base.pooler is not None else None
        out = BaseModelOutputWithPooling(last_hidden_state=grid, pooler_output=pooled, hidden_states=hidden)
    elif name == "VideoMAEForVideoClassification":
        logits = model.classifier(video_head(model, grid))
        out = ImageClassifierOutput(loss=loss(logits), logits=logits, hidden_states=hidden)
    else:  # VivitForVideoClassification: the CLS token, which never moves
        logits = model.classifier(state.x[:, 0])
        out = ImageClassifierOutput(loss=loss(logits), logits=logits, hidden_states=hidden)
    return out if opts["return_dict"] else out.to_tuple()


def dense_features(model: nn.Module, clip: torch.Tensor, method: Any) -> torch.Tensor:
    """The full token grid after the final norm, ``B x (num_prefix + t*h*w) x C`` (``core.ops.restore``)."""
    _, grid, _ = base_outputs(_base(model), clip, method, need_grid=True)
    return grid


class _TokenReduced(common.Reduced):
    """Mixed in front of the model's own class while a method is patched in: ``forward`` runs the reduced model
    and returns the model's own output dataclass (see the module doc). Keeps the original class name, so
    ``save_pretrained`` writes it as the architecture."""

    keep_class_name = True

    def forward(self, pixel_values: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise InputError("pass the options of a token-reduced transformers model by keyword")
        return _reduced_forward(self, pixel_values, kwargs)


def patched_class(cls: type) -> type:
    """The patched subclass (it keeps the original class name; see ``_TokenReduced``)."""
    return common.patched_subclass(_TokenReduced, cls)


__all__ = ["FAMILY", "REFUSED", "dense_features", "forward_tokens", "model_info", "patched_class",
           "unsupported_reason", "video_grid"]
