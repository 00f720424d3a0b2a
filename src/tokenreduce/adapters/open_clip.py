"""The adapter for open_clip's image tower, ``open_clip.transformer.VisionTransformer`` (the ``visual`` of a
``CLIP`` / ``CustomTextCLIP`` model): CLS-token (``pool_type='tok'``), average (``'avg'``) and no pooling
(``'none'``), with or without ``final_ln_after_pool``, ``ln_pre``, ``ln_post``, ``proj``, LayerScale, both block
types (``ResidualAttentionBlock`` with ``nn.MultiheadAttention``, batch-first or not, and
``CustomResidualAttentionBlock`` with open_clip's own ``Attention``: qk-norm, head scale, inner / attention norms).

What is patched is the tower: ``tr.patch(clip_model.visual, "tome", r=13)``. ``clip_model.encode_image`` and
``clip_model(image, text)`` call the tower, so they run reduced and the text tower is untouched. The ``CLIP``
wrapper itself is refused with a message that says so: patching it would leave ``clip_model.visual(images)``
running unreduced.

Refused (``InputTypeError``): attention pooling (``attentional_pool``: CoCa; its queries would attend to
merged tokens without their sizes), scaled cosine attention, ``nn.MultiheadAttention`` with ``add_bias_kv`` /
``add_zero_attn`` / separate q, k, v projections, and timm or ResNet towers (a timm trunk,
``model.visual.trunk``, is patched by the timm adapter). Patch dropout in train mode raises an ``InputError``.

Loading (``tokenreduce.load("open_clip:NAME")``, :func:`load`): the image tower of the model config ``NAME`` (or of
an open_clip model-config JSON file), built without downloading, with its weights from a checkpoint, and
open_clip's eval preprocessing (:func:`preprocessing`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import (
    Attention,
    CustomResidualAttentionBlock,
    PatchDropout,
    ResidualAttentionBlock,
    VisionTransformer,
)
from timm.models._features import feature_take_indices
from torch import nn

from ..core.attention import attend
from ..core.cost import ModelInfo
from ..core.errors import InputError, require
from ..core.ops import restore
from ..core.state import TokenState
from . import common

FAMILY = "open_clip VisionTransformer"
POOLS = ("tok", "avg", "none")
NUM_PREFIX = 1  # open_clip's tower always has one class token first, whatever its pooling


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this adapter cannot run ``model``, or None when it can."""
    if not isinstance(model, VisionTransformer):
        visual = getattr(model, "visual", None)
        if isinstance(visual, VisionTransformer):
            return (f"an open_clip {type(model).__name__} is patched through its image tower: "
                    f"tr.patch(model.visual, ...) (model.encode_image then runs reduced; the text tower is untouched)")
        if visual is not None and hasattr(visual, "trunk"):
            return (f"the image tower of this open_clip {type(model).__name__} is a timm model: "
                    "tr.patch(model.visual.trunk, ...)")
        return f"{type(model).__name__} is not an open_clip VisionTransformer"
    if getattr(model, "attn_pool", None) is not None:
        return "attention pooling (attentional_pool, CoCa) is not supported"
    if model.pool_type not in POOLS:
        return f"pool_type={model.pool_type!r} is not supported (supported: {', '.join(POOLS)})"
    for i, blk in enumerate(model.transformer.resblocks):
        if type(blk) is ResidualAttentionBlock:
            attn = blk.attn
            if type(attn) is not nn.MultiheadAttention:
                return f"block {i} attention is a {type(attn).__name__}; nn.MultiheadAttention expected"
            if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
                return (f"block {i}: nn.MultiheadAttention with separate q/k/v projections, add_bias_kv or "
                        "add_zero_attn is not supported")
            if hasattr(blk, "ln_1_kv"):
                return f"block {i} is a cross-attention block"
        elif type(blk) is CustomResidualAttentionBlock:
            if type(blk.attn) is not Attention:
                return f"block {i} attention is a {type(blk.attn).__name__}; open_clip's Attention expected"
            if blk.attn.logit_scale is not None:
                return f"block {i}: scaled cosine attention is not supported"
        else:
            return (f"block {i} is a {type(blk).__name__}; only open_clip's ResidualAttentionBlock and "
                    "CustomResidualAttentionBlock are supported")
    return None


def grid_for(model: VisionTransformer, img_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """The (h, w) patch grid of an input of ``img_size`` (the model's own size when None)."""
    if img_size is None:
        return tuple(model.grid_size)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return size[0] // model.patch_size[0], size[1] // model.patch_size[1]


def model_info(model: VisionTransformer, img_size: int | tuple[int, int] | None = None) -> ModelInfo:
    blk = model.transformer.resblocks[0]
    grid = grid_for(model, img_size)
    head_macs = 0
    if model.proj is not None:
        # pooled @ proj: one row per image, or every token (restored grid and class token) with pool_type='none'
        rows = NUM_PREFIX + grid[0] * grid[1] if model.pool_type == "none" else 1
        head_macs = rows * model.proj.shape[0] * model.proj.shape[1]
    return ModelInfo(
        depth=len(model.transformer.resblocks),
        dim=model.conv1.out_channels,
        heads=blk.attn.num_heads,
        mlp_hidden=blk.mlp.c_fc.out_features,
        num_prefix=NUM_PREFIX,
        has_cls=True,
        patch_size=tuple(model.patch_size),
        in_chans=model.conv1.in_channels,
        grid=grid,
        head_macs=head_macs,
        dense_output=uses_dense_output(model),
    )


BlockHook = common.BlockHook


def embed(model: VisionTransformer, images: torch.Tensor) -> TokenState:
    """The tokens entering block 0 (the tower's own ``_embeds``: patch convolution, class token, position
    embedding, patch dropout, ``ln_pre``) as an unreduced ``TokenState``."""
    if model.training and isinstance(model.patch_dropout, PatchDropout) and model.patch_dropout.prob > 0:
        raise InputError(f"patch dropout (patch_dropout={model.patch_dropout.prob}) cannot run with token "
                         "reduction in train mode; build the tower with patch_dropout=0 or set "
                         "model.patch_dropout = torch.nn.Identity()")
    grid = grid_for(model, tuple(images.shape[-2:]))
    return TokenState(x=common.on_empty_batch(model._embeds, images), num_prefix=NUM_PREFIX, grid=grid)


def _attention(attn: nn.Module, x: torch.Tensor, size_bias: torch.Tensor | None, need: Any, has_cls: bool,
               transform: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``nn.MultiheadAttention`` or open_clip's ``Attention`` on ``x`` (``B x N x C``, batch first) through
    ``core.attention.attend``: the same projections, the log-size bias and the statistics the method needs."""
    batch, num, width = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, num, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    custom = isinstance(attn, Attention)
    if custom:
        q, k = attn.ln_q(q), attn.ln_k(k)
        p = attn.attn_drop.p
        fused = getattr(attn, "fused_attn", attn.use_fsdpa)
    else:
        p = attn.dropout
        fused = getattr(attn, "fused_attn", True)  # set False to count FLOPs (the counter cannot see SDPA)
    p = p if attn.training else 0.0
    drop = partial(F.dropout, p=p, training=True) if p > 0 else None
    out, stats = attend(q, k, v, q.shape[-1] ** -0.5, size_bias, need, has_cls, transform, fused=fused,
                        dropout=p, attn_drop=drop)
    if custom:
        if attn.head_scale is not None:
            out = out * attn.head_scale
        out = attn.ln_inner(out.transpose(1, 2).reshape(batch, num, width))
        return attn.out_drop(attn.out_proj(out)), stats
    return attn.out_proj(out.transpose(1, 2).reshape(batch, num, width)), stats


def block_step(blk: nn.Module, i: int, state: TokenState, method: Any, plan: Any, has_cls: bool) -> TokenState:
    """One block on a token state: attention (with the size bias and the statistics the method needs), the
    method's reduction where the schedule reduces, then the MLP."""
    needs = method.needs(i, plan) if method is not None else ()
    bias = state.size_bias() if method is not None and method.prop_attn(i) else None
    transform = method.attn_transform(i, plan) if method is not None else None
    h, stats = _attention(blk.attn, blk.ln_1(state.x), bias, needs, has_cls, transform)
    if isinstance(blk, CustomResidualAttentionBlock):
        h = blk.ln_attn(h)
    state = state.replace(x=state.x + blk.ls_1(h))
    if plan is not None and plan.reduces(i):
        state = method.reduce(i, state, stats, plan.amounts[i])
    return state.replace(x=state.x + blk.ls_2(blk.mlp(blk.ln_2(state.x))))


def run_blocks(model: VisionTransformer, state: TokenState, method: Any = None, on_block: BlockHook | None = None,
               stop: int | None = None) -> TokenState:
    """Run blocks 0..``stop`` (all by default) with ``method`` (None: unreduced); the state after the last one,
    before ``ln_post``. ``on_block(i, state)`` sees the state after block i; the transformer's
    ``grad_checkpointing`` recomputes each block in the backward pass."""
    step = partial(block_step, has_cls=True)
    return common.run_blocks(model.transformer.resblocks, state, method, step, on_block, stop,
                             grad_checkpointing=getattr(model.transformer, "grad_checkpointing", False))


def forward_tokens(model: VisionTransformer, images: torch.Tensor, method: Any = None, track_owner: bool = False,
                   dense: bool = False, on_block: BlockHook | None = None) -> TokenState:
    """Embed ``images`` and run every block with ``method``; the final state with ``ln_post`` on ``x``."""
    state = embed(model, images)
    if track_owner or dense:
        state = state.tracked(dense=dense)
    state = run_blocks(model, state, method, on_block)
    return state.replace(x=model.ln_post(state.x))


def uses_dense_output(model: VisionTransformer) -> bool:
    """Whether the output reads every patch token (average or no pooling, ``output_tokens``)."""
    return model.pool_type != "tok" or bool(getattr(model, "output_tokens", False))


def _head(model: VisionTransformer, x: torch.Tensor) -> Any:
    """The tower's own pooling (``_pool``: ``ln_post``, pooling, ``final_ln_after_pool``) and ``proj``."""
    pooled, tokens = model._pool(x)
    if model.proj is not None:
        pooled = pooled @ model.proj
    return (pooled, tokens) if getattr(model, "output_tokens", False) else pooled


class _TokenReduced(common.Reduced):
    """Mixed in front of the tower's class while a method is patched in: ``forward`` (hence ``CLIP.encode_image``)
    and ``forward_intermediates`` run the reduced model. Outputs that read patch tokens (average or no pooling,
    ``output_tokens``, intermediates) get the restored full grid (``core.ops.restore``), so their shapes are the
    unpatched ones."""

    def forward(self, x: torch.Tensor) -> Any:
        method = self._tokenreduce.method
        if uses_dense_output(self):
            state = run_blocks(self, embed(self, x).tracked(dense=True), method)
            return _head(self, restore(state))
        # The CLS pooling reads only the class token, which never moves: no patch bookkeeping.
        return _head(self, run_blocks(self, embed(self, x), method).x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              stop_early: bool = False, normalize_intermediates: bool = False,
                              intermediates_only: bool = False, output_fmt: str = "NCHW",
                              output_extra_tokens: bool = False) -> dict[str, Any]:
        """open_clip's ``forward_intermediates`` on the reduced model: every requested block's tokens restored
        to the full grid, with open_clip's arguments and dict output."""
        if output_fmt not in ("NCHW", "NLC"):
            raise InputError(f"output_fmt={output_fmt!r}: must be 'NCHW' or 'NLC'")
        take, max_index = feature_take_indices(len(self.transformer.resblocks), indices)
        take = set(take)
        grids: list[torch.Tensor] = []

        def collect(i: int, state: TokenState) -> None:
            if i in take:
                full = restore(state)
                grids.append(self.ln_post(full) if normalize_intermediates else full)

        state = embed(self, x).tracked(dense=True)
        state = run_blocks(self, state, self._tokenreduce.method, collect, max_index if stop_early else None)
        height, width = state.grid
        prefix = [g[:, :NUM_PREFIX] for g in grids]
        intermediates = [g[:, NUM_PREFIX:] for g in grids]
        if output_fmt == "NCHW":
            intermediates = [g.reshape(g.shape[0], height, width, g.shape[-1]).permute(0, 3, 1, 2).contiguous()
                             for g in intermediates]
        output: dict[str, Any] = {"image_intermediates": intermediates}
        if output_extra_tokens:
            output["image_intermediates_prefix"] = prefix
        if intermediates_only:
            return output
        pooled, _ = self._pool(restore(state))
        if self.proj is not None:
            pooled = pooled @ self.proj
        output["image_features"] = pooled
        return output


def patched_class(cls: type) -> type:
    """The subclass a patched tower of class ``cls`` takes."""
    return common.patched_subclass(_TokenReduced, cls)


# --- loading (``open_clip:NAME``) ---------------------------------------------------------------------------


def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The tower's image embedding (the pooled output when it also returns tokens)."""
    out = model(images)
    return out[0] if isinstance(out, tuple) else out


def num_classes(model: nn.Module) -> int:
    """An image tower has no classifier: 0."""
    return 0


def preprocessing(visual: nn.Module) -> common.Preprocessing:
    """open_clip's eval preprocessing (``visual.preprocess_cfg``: size, mean, std, interpolation, resize mode) in
    timm's terms: 'shortest' is a resize of the short side and a centre crop (``crop_pct=1``), 'squash' a resize
    to the size, 'longest' (pad to square) is approximated by 'border'."""
    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mode = cfg.get("resize_mode", "shortest")
    return common.Preprocessing(
        (3, *size), cfg.get("interpolation", "bicubic"), tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))), crop_pct=1.0,
        crop_mode={"shortest": "center", "squash": "squash", "longest": "border"}.get(mode, "center"),
        source="open_clip preprocess_cfg")


def preprocessing_of(model: nn.Module) -> common.Preprocessing:
    """:func:`preprocessing` of the tower."""
    return preprocessing(model)


def load(name: str, checkpoint: str | None = None, pretrained: bool | str | None = False,
         num_classes: int | None = None, **kwargs: Any) -> common.Loaded:
    """The image tower (``model.visual``) of the open_clip model config ``name`` (or a path to a model-config
    JSON, registered under its file name), built with ``kwargs`` for ``open_clip.create_model_and_transforms``,
    random weights unless ``checkpoint`` (a whole CLIP state dict or the tower's own) or ``pretrained`` (an
    open_clip tag such as ``"openai"``: the hub) gives them, and :func:`preprocessing`."""
    require("open_clip", "open_clip")
    import open_clip

    from ..core.checkpoint import load_checkpoint, read_state_dict

    spec = f"open_clip:{name}"
    common.refuse_sizes(spec, kwargs)
    if num_classes:
        raise InputError(f"{spec}: an open_clip image tower has no classifier to train or evaluate (it returns an "
                         f"embedding; num_classes={num_classes} asked)")
    if pretrained is True:
        raise InputError(f"{spec}: pretrained=True names no weights: give open_clip's tag (e.g. 'openai', from "
                         f"the hub) or a checkpoint file")
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise InputError(f"{spec}: no such model config file")
        open_clip.add_model_config(name)  # registered under the file's stem
        name = Path(name).stem
    if name not in open_clip.list_models():
        raise InputError(f"unknown open_clip model config {name!r} (see open_clip.list_models(), or give a "
                         f"model-config JSON path)")
    try:
        clip, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained or None, **kwargs)
    except (TypeError, RuntimeError) as err:
        raise InputError(f"{spec}: cannot build the model with {kwargs}: {err}") from err
    visual = clip.visual
    if checkpoint:
        state = read_state_dict(checkpoint)
        if any(k.startswith("visual.") for k in state):  # a whole CLIP state dict: keep the image tower's part
            load_checkpoint(clip, checkpoint)
        else:
            load_checkpoint(visual, checkpoint)
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is None:
        raise InputError(f"{spec}: the image tower is a {type(visual).__name__}, not open_clip's VisionTransformer")
    for blk in resblocks:  # what `tokenreduce flops --count` switches off (the counter cannot see SDPA)
        blk.attn.fused_attn = True
    return common.Loaded(visual.eval(), preprocessing(visual))
