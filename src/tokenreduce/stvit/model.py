"""STViT for plain timm ViTs (Chang et al., CVPR 2023, arXiv 2303.08685), written from the paper.

The first ``full_blocks`` blocks run unchanged on every token; generation layer 1 attends from M pooled
tokens P to the image tokens X, generation layer 2 from S1 + G to [S1 ; X] (further generation layers repeat
layer 2); the remaining blocks run on the M semantic tokens only and the head averages them::

    S1 = P  + MHA(q = LN(P),      kv = LN(X))        ; S1 = S1 + MLP(LN(S1))
    S2 = S1 + MHA(q = LN(S1 + G), kv = LN([S1 ; X])) ; S2 = S2 + MLP(LN(S2))

Prefix tokens (CLS, registers) run through the full blocks and are then dropped: a model whose head read
the CLS token must have its head fine-tuned (``tokenreduce.train``).

Cost conventions (``STViT.tokenreduce_flops``, matrix products only, like ``FlopCounterMode``): a
generation layer with Q queries over K key/value tokens costs ``2*Q*D^2`` (q and output projections)
``+ 2*K*D^2`` (k and v projections) ``+ 2*Q*K*D`` (scores and weighted sum) ``+ 2*Q*D*H`` (MLP); layer 1 has
K = N image tokens, later layers K = M + N (they really project S as keys too). Prefix tokens are not keys.
For DeiT-S at 224 with the defaults this is 1.9153 GMACs (paper: 1.91), 3 generation layers 1.9755 (1.97),
generation after 3 full blocks 1.5654 (1.56): the paper's figures are these truncated to two decimals.
(Counting layer 2's keys as the N image tokens only gives 1.9104 / 1.9657 / 1.5605, also matching to
0.01; we count what actually runs.)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ..adapters.timm_vit import check_supported, embed, grid_for, model_info
from ..core.attention import attention
from ..core.cost import (
    FlopsReport,
    ModelInfo,
    block_costs,
    block_macs,
    built_model_report,
    cross_block_macs,
    pooling_macs,
)
from ..core.errors import InputError
from .pooling import TokenPooling, check_pooling, check_square


def on_model_device(init: Callable) -> Callable:
    """Runs a builder's ``__init__(self, model, ...)`` with the model's device as the default device, so new
    layers are made where the model lives (a ``meta`` model gives a ``meta`` STViT, e.g. to count its cost)."""

    @functools.wraps(init)
    def wrapper(self: nn.Module, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        param = next(model.parameters(), None)
        with torch.device(param.device if param is not None else "cpu"):
            init(self, model, *args, **kwargs)

    return wrapper


def _copy_modules(target: nn.Module, source: nn.Module, names: tuple[str, ...]) -> None:
    """Give ``target`` its own copies of the named submodules of a pre-trained ``source``."""
    for name in names:
        setattr(target, name, copy.deepcopy(getattr(source, name)))


class CrossAttention(nn.Module):
    """Multi-head attention with separate query and key/value inputs, initialised from a timm ``Attention``
    (q from the q third of ``qkv``, k and v from the other two; qk-norm and output projection copied)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        dim, attn_dim = attn.qkv.in_features, attn.attn_dim
        bias = attn.qkv.bias is not None
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.fused_attn = attn.fused_attn
        self.q = nn.Linear(dim, attn_dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * attn_dim, bias=bias)
        with torch.no_grad():
            self.q.weight.copy_(attn.qkv.weight[:attn_dim])
            self.kv.weight.copy_(attn.qkv.weight[attn_dim:])
            if bias:
                self.q.bias.copy_(attn.qkv.bias[:attn_dim])
                self.kv.bias.copy_(attn.qkv.bias[attn_dim:])
        _copy_modules(self, attn, ("q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"))

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return attention(self, queries, context=context)[0]


class GenerationLayer(nn.Module):
    """A block whose attention runs from ``queries`` (+ an optional offset added before the norm, the
    global centres G) to ``context``; every weight comes from a pre-trained timm ``Block``."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.attn = CrossAttention(block.attn)
        _copy_modules(self, block, ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"))

    def forward(self, queries: torch.Tensor, context: torch.Tensor,
                query_offset: torch.Tensor | None = None) -> torch.Tensor:
        q_in = queries if query_offset is None else queries + query_offset
        x = queries + self.drop_path1(self.ls1(self.attn(self.norm1(q_in), self.norm1(context))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def generation_costs(m: int, n: int, dim: int, hidden: int, layers: int = 2) -> list[tuple[int, int, int, int]]:
    """(tokens in, tokens out, attention MACs, MLP MACs) of the generation layers: ``m`` semantic queries over
    the ``n`` image tokens (layer 1), then over ``m + n`` (later layers: they project S as keys too)."""
    return [(keys, m, *cross_block_macs(m, keys, dim, hidden)) for keys in [n] + [m + n] * (layers - 1)]


class ViTHosted(nn.Module):
    """What the plain-ViT builds share: a copy of the host (``vit``) and what its cost report needs."""

    vit: nn.Module

    def host(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` for the build to take apart and keep as ``vit``; keeps the host's description."""
        self.host_info = model_info(model)
        self.num_classes = model.num_classes
        return copy.deepcopy(model)

    def info(self, img_size: int | tuple[int, int] | None = None) -> ModelInfo:
        """The host's description at ``img_size`` (its depth and widths whatever blocks the build took)."""
        return dataclasses.replace(self.host_info, grid=grid_for(self.vit, img_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


class STViT(ViTHosted):
    """A timm ``VisionTransformer`` turned into STViT; build it with :func:`build`.

    Parts: ``vit`` (the host's embedding, its first ``full_blocks`` blocks, ``norm``/``fc_norm``/``head``),
    ``pool``, ``generation`` (ModuleList), ``global_centres`` (1 x M x D, or None), ``semantic_blocks``.
    """

    @on_model_device
    def __init__(self, model: nn.Module, num_semantic: int = 16, full_blocks: int = 4, pooling: str = "learned",
                 global_centres: bool = True, generation_layers: int = 2) -> None:
        super().__init__()
        check_supported(model)
        depth = len(model.blocks)
        side = check_square(num_semantic, "num_semantic")
        for name, value, low in (("full_blocks", full_blocks, 0), ("generation_layers", generation_layers, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name}={value!r} must be an integer >= {low}")
        if full_blocks + generation_layers > depth:
            raise InputError(f"full_blocks={full_blocks} + generation_layers={generation_layers} exceeds the "
                             f"model's depth {depth}")
        check_pooling(pooling)
        self.vit = vit = self.host(model)
        blocks = list(vit.blocks)
        vit.blocks = nn.Sequential(*blocks[:full_blocks])
        self.num_semantic, self.full_blocks, self.generation_layers = num_semantic, full_blocks, generation_layers
        self.pooling = pooling
        dim = vit.embed_dim
        self.pool = TokenPooling(pooling, dim, side)
        self.generation = nn.ModuleList(GenerationLayer(b) for b in blocks[full_blocks:full_blocks + generation_layers])
        self.global_centres = None
        if global_centres and generation_layers > 1:  # G enters from generation layer 2 on
            self.global_centres = nn.Parameter(torch.zeros(1, num_semantic, dim))
            trunc_normal_(self.global_centres, std=0.02)
        self.semantic_blocks = nn.Sequential(*blocks[full_blocks + generation_layers:])

    @property
    def depth(self) -> int:
        return self.full_blocks + self.generation_layers + len(self.semantic_blocks)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The M semantic tokens after the last block (B x M x D, before the final norm)."""
        state = embed(self.vit, images)
        image_tokens = self.vit.blocks(state.x)[:, state.num_prefix:]
        semantic = self.pool(image_tokens, state.grid)
        for i, layer in enumerate(self.generation):
            context = image_tokens if i == 0 else torch.cat([semantic, image_tokens], dim=1)
            semantic = layer(semantic, context, None if i == 0 else self.global_centres)
        return self.semantic_blocks(semantic)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.vit.fc_norm(self.vit.norm(tokens.mean(dim=1)))
        pooled = self.vit.head_drop(pooled)
        return pooled if pre_logits else self.vit.head(pooled)

    def tokenreduce_flops(self, img_size: int | tuple[int, int] | None = None) -> FlopsReport:
        """Analytic MACs per image (see the module docstring for the conventions)."""
        info = self.info(img_size)
        dim, hidden, m, n = info.dim, info.mlp_hidden, self.num_semantic, info.num_patches
        layers = [(info.num_tokens, info.num_tokens, *block_macs(info.num_tokens, info.num_tokens, dim, hidden))]
        layers = layers * self.full_blocks + generation_costs(m, n, dim, hidden, self.generation_layers)
        layers += [(m, m, *block_macs(m, m, dim, hidden))] * len(self.semantic_blocks)
        overhead = pooling_macs(self.pooling, n, dim)
        notes = (f"M={m} semantic tokens after {self.full_blocks} full blocks and {self.generation_layers} "
                 f"generation layers ({self.pooling} pooling)",)
        return built_model_report("stvit", info, block_costs(layers), self.depth, overhead, notes)


def build(model: nn.Module, num_semantic: int = 16, full_blocks: int = 4, pooling: str = "learned",
          global_centres: bool = True, generation_layers: int = 2) -> STViT:
    """A new STViT module from a (pre-trained) timm ``VisionTransformer``; ``model`` itself is not changed.

    >>> import timm, tokenreduce as tr
    >>> vit = timm.create_model("deit_small_patch16_224", pretrained=False)
    >>> stvit = tr.stvit.build(vit, num_semantic=16)
    >>> round(tr.flops(stvit).gmacs, 2)
    1.92
    """
    return STViT(model, num_semantic, full_blocks, pooling, global_centres, generation_layers)
