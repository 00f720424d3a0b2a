"""The adapter for timm's ``VisionTransformer`` family (DeiT, DeiT-3, ViT/AugReg, DINO/DINOv2, CLIP towers,
register and average-pooled models, qk-norm, LayerScale, distilled DeiT).

It knows how such a model embeds, runs and pools tokens; it knows nothing of the method it runs. Patching
swaps the model's class for a subclass whose ``forward`` carries a ``TokenState`` through the blocks, so
``unpatch`` restores the exact original class and nothing in the blocks is touched.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from ..core.attention import attention
from ..core.cost import ModelInfo
from ..core.errors import InputError, InputTypeError
from ..core.ops import restore
from ..core.state import TokenState
from . import common

FAMILY = "timm VisionTransformer"
POOLS = ("token", "avg", "max", "avgmax")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this adapter cannot run ``model``, or None when it can."""
    if not isinstance(model, VisionTransformer):
        return f"{type(model).__name__} is not a timm VisionTransformer"
    if getattr(model, "attn_pool", None) is not None:
        return "global_pool='map' (attention pooling) is not supported"
    if model.global_pool not in POOLS:
        return f"global_pool={model.global_pool!r} is not supported (supported: {', '.join(POOLS)})"
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            return f"block {i} is a {type(blk).__name__}; only timm's Block is supported"
        if type(blk.attn) is not Attention:
            return f"block {i} attention is a {type(blk.attn).__name__}; only timm's Attention is supported"
    return None


def check_supported(model: nn.Module) -> None:
    reason = unsupported_reason(model)
    if reason is not None:
        raise InputTypeError(f"tokenreduce cannot patch this model: {reason}")


def grid_for(model: VisionTransformer, img_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """The (h, w) patch grid of an input of ``img_size`` (the model's own size when None)."""
    patch = model.patch_embed
    if img_size is None:
        return tuple(patch.grid_size)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if hasattr(patch, "dynamic_feat_size"):
        return tuple(patch.dynamic_feat_size(size))
    return size[0] // patch.patch_size[0], size[1] // patch.patch_size[1]


def model_info(model: VisionTransformer, img_size: int | tuple[int, int] | None = None) -> ModelInfo:
    blk = model.blocks[0]
    head_macs = sum(m.in_features * m.out_features for m in (model.head, getattr(model, "head_dist", None))
                    if isinstance(m, nn.Linear))
    return ModelInfo(
        depth=len(model.blocks),
        dim=model.embed_dim,
        heads=blk.attn.num_heads,
        mlp_hidden=blk.mlp.fc1.out_features,
        num_prefix=model.num_prefix_tokens,
        has_cls=model.cls_token is not None,
        patch_size=tuple(model.patch_embed.patch_size),
        in_chans=model.patch_embed.proj.in_channels,
        grid=grid_for(model, img_size),
        head_macs=head_macs,
        dense_output=uses_dense_head(model),
    )


BlockHook = common.BlockHook


def embed(model: VisionTransformer, images: torch.Tensor) -> TokenState:
    """The tokens entering block 0 (patch embedding, position embedding with the prefix tokens, patch
    dropout, pre-norm) as an unreduced ``TokenState`` with the patch grid and the prefix count.

    >>> import timm, torch
    >>> state = embed(timm.create_model("deit_tiny_patch16_224"), torch.zeros(1, 3, 224, 224))
    >>> tuple(state.x.shape), state.grid, state.num_prefix
    ((1, 197, 192), (14, 14), 1)
    """
    if model.training and getattr(model.patch_drop, "prob", 0.0) > 0:
        # Patch dropout removes random patches before block 0: the grid, the owners and the schedule would no
        # longer describe the tokens. Refuse rather than train on a silently different model.
        raise InputError(f"patch dropout (patch_drop_rate={model.patch_drop.prob}) cannot run with token "
                         "reduction in train mode; build the model with patch_drop_rate=0 or set "
                         "model.patch_drop = torch.nn.Identity()")
    x = model.patch_embed(images)
    grid = tuple(x.shape[1:3]) if x.ndim == 4 else grid_for(model, tuple(images.shape[-2:]))
    x = model.norm_pre(model.patch_drop(common.on_empty_batch(model._pos_embed, x)))
    return TokenState(x=x, num_prefix=model.num_prefix_tokens, grid=grid)


def run_blocks(model: VisionTransformer, state: TokenState, method: Any = None, on_block: BlockHook | None = None,
               stop: int | None = None) -> TokenState:
    """Run blocks 0..``stop`` (all by default) on ``state`` with ``method`` (None: unreduced); returns the state
    after the last one, before the final norm. ``on_block(i, state)`` sees the state after block i. As timm
    does, ``set_grad_checkpointing(True)`` recomputes each block in the backward pass.

    The method is used only through its hooks (``plan``, ``begin``, ``needs``, ``prop_attn``,
    ``attn_transform``, ``reduce``): this adapter knows no method.
    """
    step = functools.partial(block_step, has_cls=model.cls_token is not None)
    return common.run_blocks(model.blocks, state, method, step, on_block, stop,
                             grad_checkpointing=getattr(model, "grad_checkpointing", False))


def block_step(blk: Block, i: int, state: TokenState, method: Any, plan: Any, has_cls: bool = True) -> TokenState:
    """One block on a token state: attention (with the size bias and the statistics the method needs), the
    method's reduction where the schedule reduces, then the MLP."""
    needs = method.needs(i, plan) if method is not None else ()
    bias = state.size_bias() if method is not None and method.prop_attn(i) else None
    transform = method.attn_transform(i, plan) if method is not None else None
    h, stats = attention(blk.attn, blk.norm1(state.x), bias, needs, has_cls, transform)
    state = state.replace(x=state.x + blk.drop_path1(blk.ls1(h)))
    if plan is not None and plan.reduces(i):
        state = method.reduce(i, state, stats, plan.amounts[i])
    return state.replace(x=state.x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(state.x)))))


def forward_tokens(model: VisionTransformer, images: torch.Tensor, method: Any = None, track_owner: bool = False,
                   dense: bool = False, on_block: BlockHook | None = None) -> TokenState:
    """Embed ``images`` and run every block with ``method``; returns the final state with the final norm on
    ``x``. ``track_owner`` tracks which token carries every patch; ``dense`` also what :func:`restore` needs."""
    state = embed(model, images)
    if track_owner or dense:
        state = state.tracked(dense=dense)
    state = run_blocks(model, state, method, on_block)
    return state.replace(x=model.norm(state.x))


def dense_features(model: VisionTransformer, images: torch.Tensor, method: Any) -> torch.Tensor:
    """The full token grid after the final norm, ``B x (num_prefix + h*w) x C``: the reduced model's tokens
    restored to every patch (``core.ops.restore``), so any head that reads the unreduced tokens runs on it."""
    state = run_blocks(model, embed(model, images).tracked(dense=True), method)
    return model.norm(restore(state))


def uses_dense_head(model: VisionTransformer) -> bool:
    """Whether the head pools over every token (avg/max) rather than reading the prefix tokens."""
    return model.global_pool != "token"


class _TokenReduced(common.Reduced):
    """Mixed in front of the model's own class while a method is patched in. Every forward entry point runs the
    reduced model: ``forward_features`` and ``forward_intermediates`` (hence ``get_intermediate_layers``) return
    the restored full token grid, so heads written for the unreduced model run unchanged."""

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        common.refuse_masks("forward_features", attn_mask, is_causal)
        return dense_features(self, x, self._tokenreduce.method)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        common.refuse_masks("forward", attn_mask, is_causal)
        if uses_dense_head(self):
            return self.forward_head(dense_features(self, x, self._tokenreduce.method))
        # The head reads only the prefix tokens, which never move: skip the patch bookkeeping.
        return self.forward_head(forward_tokens(self, x, self._tokenreduce.method).x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> Any:
        """timm's ``forward_intermediates`` on the reduced model: every requested block's tokens restored to
        the full grid (``core.ops.restore``), with timm's arguments and return types."""
        common.refuse_masks("forward_intermediates", attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise InputError(f"output_fmt={output_fmt!r}: must be 'NCHW' or 'NLC'")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        take = set(take)
        grids: list[torch.Tensor] = []

        def collect(i: int, state: TokenState) -> None:
            if i in take:
                full = restore(state)
                grids.append(self.norm(full) if norm else full)

        state = embed(self, x).tracked(dense=True)
        state = run_blocks(self, state, self._tokenreduce.method, collect, max_index if stop_early else None)
        num_prefix, (height, width) = state.num_prefix, state.grid
        prefix = [g[:, :num_prefix] for g in grids] if num_prefix else None
        intermediates = [g[:, num_prefix:] for g in grids]
        if output_fmt == "NCHW":
            intermediates = [g.reshape(g.shape[0], height, width, g.shape[-1]).permute(0, 3, 1, 2).contiguous()
                             for g in intermediates]
        if output_dict:
            out: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(restore(state))
            return out
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(restore(state)), intermediates


def patched_class(cls: type) -> type:
    """The subclass a patched model of class ``cls`` takes."""
    return common.patched_subclass(_TokenReduced, cls)


# --- loading (``timm:NAME``, or a bare timm name): any timm model, Swin and PVTv2 included --------------------


def preprocessing(model: nn.Module, source: str = "") -> common.Preprocessing:
    """The timm model's preprocessing: its ``pretrained_cfg`` at the input size it was built for
    (``patch_embed.img_size``, e.g. after ``img_size=64``)."""
    from timm.data import resolve_data_config

    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    config = resolve_data_config({"input_size": (3, *size)} if size is not None else {}, model=model)
    return common.Preprocessing.from_data_config(config, source or "timm pretrained_cfg")


def preprocessing_of(model: nn.Module) -> common.Preprocessing:
    """:func:`preprocessing` (the same for timm's Swin and PVTv2: ``adapters.preprocessing_of`` asks the first
    timm family)."""
    return preprocessing(model)


def load(name: str, checkpoint: str | None = None, pretrained: bool = False, **kwargs: Any) -> common.Loaded:
    """``timm.create_model(name, pretrained=pretrained, **kwargs)`` in eval mode, with the weights of
    ``checkpoint`` (a state dict file; the hub weights are then not fetched), and its timm preprocessing."""
    import timm

    from ..core.checkpoint import load_checkpoint

    if not timm.is_model(name):
        raise InputError(f"unknown timm model {name!r} (see timm.list_models())")
    try:
        model = timm.create_model(name, pretrained=bool(pretrained) and not checkpoint, **kwargs)
    except TypeError as err:
        raise InputError(f"options {kwargs} not accepted by timm model {name!r}: {err}") from err
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return common.Loaded(model.eval(), preprocessing(model, f"timm pretrained_cfg of {name}"))
