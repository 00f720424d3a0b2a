"""The adapter for timm's ``VisionTransformer`` family (DeiT, DeiT-3, ViT/AugReg, DINO/DINOv2, CLIP towers,
register and average-pooled models, qk-norm, LayerScale, distilled DeiT).

It knows how such a model embeds, runs and pools tokens; it knows nothing of the method it runs. Patching
swaps the model's class for a subclass whose ``forward`` carries a ``TokenState`` through the blocks, so
``unpatch`` restores the exact original class and nothing in the blocks is touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..core.attention import attention
from ..core.state import TokenState
from ..methods.base import Method, Plan

POOLS = ("token", "avg", "max", "avgmax")


@dataclass(frozen=True)
class ModelInfo:
    """What the FLOPs count and the schedule need to know about a model at one image size."""

    depth: int
    dim: int
    heads: int
    mlp_hidden: int
    num_prefix: int
    has_cls: bool
    patch_size: tuple[int, int]
    in_chans: int
    grid: tuple[int, int]
    head_macs: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches


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
        raise TypeError(f"tokenreduce cannot patch this model: {reason}")


def _grid_for(model: VisionTransformer, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
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
        grid=_grid_for(model, img_size),
        head_macs=head_macs,
    )


BlockHook = Callable[[int, TokenState], None]


def forward_tokens(model: VisionTransformer, images: torch.Tensor, method: Method | None,
                   track_owner: bool = False, on_block: BlockHook | None = None) -> TokenState:
    """Embed ``images`` and run every block with ``method``; returns the final (normed) token state.

    ``on_block(i, state)`` sees the state after block i's reduction (for pictures and tests).
    """
    x = model.patch_embed(images)
    grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(_grid_for(model, tuple(images.shape[-2:])))
    x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
    batch, num_tokens = x.shape[:2]
    num_prefix = model.num_prefix_tokens
    owner = None
    if track_owner:
        owner = torch.arange(num_prefix, num_tokens, device=x.device).expand(batch, -1).clone()
    state = TokenState(x=x, owner=owner, num_prefix=num_prefix, grid=grid)
    has_cls = model.cls_token is not None

    plan: Plan | None = None
    if method is not None:
        plan = method.plan(num_tokens, num_prefix, len(model.blocks))
        state = method.begin(state, plan)
    for i, blk in enumerate(model.blocks):
        needs = method.needs(i, plan) if method is not None else ()
        bias = state.size_bias() if method is not None and method.prop_attn(i) else None
        transform = method.attn_transform(i, plan) if method is not None else None
        h, stats = attention(blk.attn, blk.norm1(state.x), bias, needs, has_cls, transform)
        state = state.replace(x=state.x + blk.drop_path1(blk.ls1(h)))
        if plan is not None and plan.reduces(i):
            state = method.reduce(i, state, stats, plan.amounts[i])
        state = state.replace(x=state.x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(state.x)))))
        if on_block is not None:
            on_block(i, state)
    return state.replace(x=model.norm(state.x))


def pool_head(model: VisionTransformer, state: TokenState, pre_logits: bool = False) -> torch.Tensor:
    """The model's head on a reduced state; average pooling weighs every token by its size."""
    if model.global_pool not in ("avg", "avgmax") or state.size is None:
        return model.forward_head(state.x, pre_logits=pre_logits)
    start = 0 if model.pool_include_prefix else state.num_prefix
    tokens, size = state.x[:, start:], state.sizes()[:, start:].to(state.x.dtype)
    pooled = (tokens * size).sum(dim=1) / size.sum(dim=1)
    if model.global_pool == "avgmax":
        pooled = 0.5 * (pooled + tokens.amax(dim=1))
    pooled = model.head_drop(model.fc_norm(pooled))
    return pooled if pre_logits else model.head(pooled)


class _TokenReduced:
    """Mixed in front of the model's own class while a method is patched in."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return forward_tokens(self, x, self._tokenreduce.method).x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = forward_tokens(self, x, self._tokenreduce.method)
        return pool_head(self, state)


_PATCHED_CLASSES: dict[type, type] = {}


def patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"TokenReduced{cls.__name__}", (_TokenReduced, cls), {})
    return _PATCHED_CLASSES[cls]
