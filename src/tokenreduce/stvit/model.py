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
import math

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ..adapters.timm_vit import _grid_for, check_supported, model_info
from ..core.attention import attention
from ..measure.flops import BlockCost, FlopsReport, block_macs, built_model_report
from .pooling import POOLINGS, TokenPooling


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


class STViT(nn.Module):
    """A timm ``VisionTransformer`` turned into STViT; build it with :func:`build`.

    Parts: ``vit`` (the host's embedding, its first ``full_blocks`` blocks, ``norm``/``fc_norm``/``head``),
    ``pool``, ``generation`` (ModuleList), ``global_centres`` (1 x M x D, or None), ``semantic_blocks``.
    """

    def __init__(self, model: nn.Module, num_semantic: int = 16, full_blocks: int = 4, pooling: str = "learned",
                 global_centres: bool = True, generation_layers: int = 2) -> None:
        super().__init__()
        check_supported(model)
        depth = len(model.blocks)
        side = math.isqrt(num_semantic) if isinstance(num_semantic, int) and num_semantic > 0 else 0
        if isinstance(num_semantic, bool) or side == 0 or side * side != num_semantic:
            raise ValueError(f"num_semantic={num_semantic!r} must be a positive square (4, 9, 16, ...)")
        for name, value, low in (("full_blocks", full_blocks, 0), ("generation_layers", generation_layers, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if full_blocks + generation_layers > depth:
            raise ValueError(f"full_blocks={full_blocks} + generation_layers={generation_layers} exceeds the "
                             f"model's depth {depth}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not supported (choose one of {', '.join(POOLINGS)})")
        vit = copy.deepcopy(model)
        blocks = list(vit.blocks)
        vit.blocks = nn.Sequential(*blocks[:full_blocks])
        self.vit = vit
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
        self.num_classes = vit.num_classes

    @property
    def depth(self) -> int:
        return self.full_blocks + self.generation_layers + len(self.semantic_blocks)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The M semantic tokens after the last block (B x M x D, before the final norm)."""
        vit = self.vit
        x = vit.patch_embed(images)
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else _grid_for(vit, tuple(images.shape[-2:]))
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        x = vit.blocks(x)
        image_tokens = x[:, vit.num_prefix_tokens:]
        semantic = self.pool(image_tokens, grid)
        for i, layer in enumerate(self.generation):
            context = image_tokens if i == 0 else torch.cat([semantic, image_tokens], dim=1)
            semantic = layer(semantic, context, None if i == 0 else self.global_centres)
        return self.semantic_blocks(semantic)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.vit.fc_norm(self.vit.norm(tokens.mean(dim=1)))
        pooled = self.vit.head_drop(pooled)
        return pooled if pre_logits else self.vit.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def tokenreduce_flops(self, img_size: int | tuple[int, int] | None = None) -> FlopsReport:
        """Analytic MACs per image (see the module docstring for the conventions)."""
        info = model_info(self.vit, img_size)
        dim, hidden, m, n = info.dim, info.mlp_hidden, self.num_semantic, info.num_patches
        blocks = []
        for i in range(self.depth):
            if i < self.full_blocks:
                attn, mlp = block_macs(info.num_tokens, info.num_tokens, dim, hidden)
                tokens_in = tokens_out = info.num_tokens
            elif i < self.full_blocks + self.generation_layers:
                keys = n if i == self.full_blocks else m + n
                attn, mlp = 2 * m * dim * dim + 2 * keys * dim * dim + 2 * m * keys * dim, 2 * m * dim * hidden
                tokens_in, tokens_out = keys, m
            else:
                attn, mlp = block_macs(m, m, dim, hidden)
                tokens_in = tokens_out = m
            blocks.append(BlockCost(i, tokens_in, tokens_out, attn / 1e9, mlp / 1e9))
        # the learned scorer: 3x3 depth-wise conv (9*D per token) and the 1x1 conv to one logit (D per token)
        overhead = 10 * n * dim if self.pooling == "learned" else 0
        notes = (f"M={m} semantic tokens after {self.full_blocks} full blocks and {self.generation_layers} "
                 f"generation layers ({self.pooling} pooling)",)
        return built_model_report("stvit", info, blocks, self.depth, overhead, notes)


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
