"""The cost table: analytic MACs (the papers' "FLOPs") of every layer the library runs, and the reports built
from them, with the reduction's own work kept apart. Every FLOPs report (``tr.flops``, STViT, STViT-R, Swin)
comes from here.

Only matrix products are counted, as ``torch.utils.flop_counter.FlopCounterMode`` counts them (D width, H the
MLP hidden width):

- attention with Q queries over K keys each: ``2*Q*D^2`` (q and output projections) ``+ 2*P*D^2`` (k and v
  projections of the P key tokens that are projected, usually K) ``+ 2*Q*K*D`` (scores and weighted sum);
  a ViT block with N tokens is ``4*N*D^2 + 2*N^2*D``;
- MLP on N tokens: ``2*N*D*H`` (a reducing block runs it on the N' tokens that leave the reduction);
- a cross-attention block (STViT's generation layers, STViT-R's recovery layer): the attention above from its
  queries to its keys, and the MLP on its queries;
- a Swin block on an h x w grid with A-token windows: ``4*Np*D^2 + 2*Np*A*D`` (Np the grid padded to whole
  windows, which timm really projects) ``+ 2*h*w*D*H``; patch merging ``N_out*4*C_in*C_out``;
- a PVTv2 block (:func:`pvt_block_macs`): queries and projection on N tokens, keys and values on the M regions
  of its spatial reduction (a convolution), ``2*N*M*D``; MLP linear layers and a 3x3 depth-wise convolution;
- STViT's learned pooling (3x3 depth-wise conv and 1x1 conv to one logit): ``10*N*D``, reported as overhead;
- the patch embedding ``n0 * (C * p^2) * D`` and the head.

This module knows no method and no model family: ``analytic_flops`` takes any object with the method hooks
``plan``, ``overhead_macs`` and ``name``, and :class:`SwinCounter` reads a timm Swin by attribute name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from .restore import restore_macs


@dataclass(frozen=True)
class ModelInfo:
    """What the FLOPs count and the schedule need to know about a model at one image size."""

    depth: int
    dim: int
    heads: int
    mlp_hidden: int
    num_prefix: int
    has_cls: bool
    patch_size: tuple[int, ...]  # (h, w), or (t, h, w) for a video model's tubelets
    in_chans: int
    grid: tuple[int, ...]  # the (h, w) patch grid, or (t, h, w) for a video model
    head_macs: int
    #: Whether the model's own forward returns or pools the restored full grid (average pooling, a
    #: ``last_hidden_state``): then its cost includes the restore rule's work.
    dense_output: bool = False

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches


class PlanLike(Protocol):
    """What the cost table reads of a method's schedule (``tokenreduce.methods.base.Plan``)."""

    tokens_in: Sequence[int]
    tokens_out: Sequence[int]
    notes: tuple[str, ...]


class MethodLike(Protocol):
    """What the cost table calls on a method (``tokenreduce.methods.base.Method``)."""

    name: str

    def plan(self, num_tokens: int, num_prefix: int, depth: int) -> Any: ...

    def overhead_macs(self, plan: Any, dim: int, heads: int, num_prefix: int) -> float: ...


@dataclass(frozen=True)
class BlockCost:
    index: int
    tokens_in: int
    tokens_out: int
    attn_gmacs: float
    mlp_gmacs: float

    @property
    def gmacs(self) -> float:
        return self.attn_gmacs + self.mlp_gmacs


@dataclass(frozen=True)
class FlopsReport:
    """The cost of one image through a (possibly patched) model.

    ``gmacs`` counts the network itself (embedding, blocks at their reduced token counts, head);
    ``overhead_gmacs`` the reduction's own products (similarities, graph, score rows);
    ``total_gmacs`` the cost of the model's own forward; ``baseline_gmacs`` the same model unreduced.
    ``restore_gmacs`` is the extra work of the restore rule (``core.restore``) whenever a dense output is made
    (``forward_features``, intermediates, ``last_hidden_state``): in ``total_gmacs`` only when the model's own
    forward makes one (``dense_output``: an average-pooled head, a ``last_hidden_state``), never for a head that
    reads the CLS token; ``dense_gmacs`` is the cost of a dense output in any case.
    """

    method: str | None
    img_size: tuple[int, int]
    gmacs: float
    overhead_gmacs: float
    baseline_gmacs: float
    embed_gmacs: float
    head_gmacs: float
    blocks: list[BlockCost] = field(default_factory=list)
    notes: tuple[str, ...] = ()
    restore_gmacs: float = 0.0
    dense_output: bool = False

    @property
    def total_gmacs(self) -> float:
        return self.gmacs + self.overhead_gmacs + (self.restore_gmacs if self.dense_output else 0.0)

    @property
    def dense_gmacs(self) -> float:
        """The cost of a forward pass that makes a dense output: the network, the overhead, the restore rule."""
        return self.gmacs + self.overhead_gmacs + self.restore_gmacs

    @property
    def ratio(self) -> float:
        """Unreduced cost over reduced cost: the ceiling of the speed-up."""
        return self.baseline_gmacs / self.total_gmacs

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "img_size": list(self.img_size),
            "gmacs": self.gmacs,
            "overhead_gmacs": self.overhead_gmacs,
            "total_gmacs": self.total_gmacs,
            "restore_gmacs": self.restore_gmacs,
            "dense_output": self.dense_output,
            "dense_gmacs": self.dense_gmacs,
            "baseline_gmacs": self.baseline_gmacs,
            "ratio": self.ratio,
            "embed_gmacs": self.embed_gmacs,
            "head_gmacs": self.head_gmacs,
            "tokens_in": [b.tokens_in for b in self.blocks],
            "tokens_out": [b.tokens_out for b in self.blocks],
            "block_gmacs": [b.gmacs for b in self.blocks],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [f"{'block':>5} {'tokens in':>9} {'tokens out':>10} {'GMACs':>8}"]
        lines += [f"{b.index:>5} {b.tokens_in:>9} {b.tokens_out:>10} {b.gmacs:>8.4f}" for b in self.blocks]
        lines.append(f"method {self.method}: {self.gmacs:.3f} GMACs + {self.overhead_gmacs:.4f} overhead "
                     f"(unreduced {self.baseline_gmacs:.3f}, ratio {self.ratio:.2f}x)")
        if self.restore_gmacs:
            lines.append(f"dense output: + {self.restore_gmacs:.4f} GMACs of the restore rule")
        return "\n".join(lines)


# --- the formulas ------------------------------------------------------------------------------------------


def attention_macs(queries: int, keys: int, dim: int, projected: int | None = None) -> int:
    """MACs of multi-head attention: ``queries`` tokens each attending to ``keys`` tokens; ``projected`` key
    tokens go through the k and v projections (default ``keys``; windowed attention projects the queries' own
    tokens, STViT-Swin's first generation layer every window's keys).

    >>> attention_macs(197, 197, 384) == 4 * 197 * 384**2 + 2 * 197**2 * 384
    True
    """
    projected = keys if projected is None else projected
    return 2 * queries * dim * dim + 2 * projected * dim * dim + 2 * queries * keys * dim


def mlp_macs(tokens: int, dim: int, hidden: int) -> int:
    """MACs of a two-layer MLP on ``tokens`` tokens."""
    return 2 * tokens * dim * hidden


def block_macs(tokens_in: int, tokens_out: int, dim: int, mlp_hidden: int) -> tuple[int, int]:
    """(attention, MLP) MACs of a ViT block: attention on ``tokens_in``, MLP on ``tokens_out`` (after the
    block's reduction)."""
    return attention_macs(tokens_in, tokens_in, dim), mlp_macs(tokens_out, dim, mlp_hidden)


def cross_block_macs(queries: int, keys: int, dim: int, mlp_hidden: int,
                     projected: int | None = None) -> tuple[int, int]:
    """(attention, MLP) MACs of a block whose queries attend to another token set (STViT's generation layers:
    semantic queries over image keys; STViT-R's recovery layer: image queries over semantic keys); the MLP runs
    on the queries."""
    return attention_macs(queries, keys, dim, projected), mlp_macs(queries, dim, mlp_hidden)


def swin_block_macs(grid: tuple[int, int], window: tuple[int, int], dim: int, hidden: int) -> tuple[int, int]:
    """(attention, MLP) MACs of a Swin block on ``grid`` (attention runs on the grid padded to windows)."""
    padded = math.ceil(grid[0] / window[0]) * window[0] * math.ceil(grid[1] / window[1]) * window[1]
    return attention_macs(padded, window[0] * window[1], dim, padded), mlp_macs(grid[0] * grid[1], dim, hidden)


def conv_macs(out_grid: tuple[int, int], in_channels: int, out_channels: int, kernel: tuple[int, int],
              groups: int = 1) -> int:
    """MACs of a 2-d convolution producing ``out_grid``."""
    return out_grid[0] * out_grid[1] * out_channels * (in_channels // groups) * kernel[0] * kernel[1]


def pvt_block_macs(grid: tuple[int, int], sr: int, dim: int, hidden: int, mlp_tokens: int | None = None
                   ) -> tuple[int, int]:
    """(attention, MLP) MACs of a PVTv2 block on ``grid``: queries and output projection on the N tokens, keys
    and values on the M = (h // sr) * (w // sr) regions of the ``sr x sr`` reduction (a convolution, counted when
    ``sr > 1``), scores and weighted sum ``2*N*M*D``; the MLP's linear layers on ``mlp_tokens`` (default N; fewer
    in a reducing block) and its 3x3 depth-wise convolution on the whole grid.

    >>> pvt_block_macs((8, 8), 1, 32, 256) == (4 * 64 * 32**2 + 2 * 64 * 64 * 32, 2 * 64 * 32 * 256 + 64 * 256 * 9)
    True
    """
    tokens = grid[0] * grid[1]
    regions = (grid[0] // sr) * (grid[1] // sr) if sr > 1 else tokens
    attn = 2 * tokens * dim * dim + 2 * regions * dim * dim + 2 * tokens * regions * dim
    if sr > 1:
        attn += conv_macs((grid[0] // sr, grid[1] // sr), dim, dim, (sr, sr))
    kept = tokens if mlp_tokens is None else mlp_tokens
    return attn, mlp_macs(kept, dim, hidden) + conv_macs(grid, hidden, hidden, (3, 3), groups=hidden)


def pooling_macs(kind: str, tokens: int, dim: int) -> int:
    """STViT's pooling of ``tokens`` image tokens: the learned scorer's 3x3 depth-wise conv (9*D per token) and
    1x1 conv to one logit (D per token); average and max pooling count nothing."""
    return 10 * tokens * dim if kind == "learned" else 0


def _img_size(info: ModelInfo) -> tuple[int, int]:
    """The (height, width) of the input (of every frame, for a video model)."""
    return info.grid[-2] * info.patch_size[-2], info.grid[-1] * info.patch_size[-1]


def embed_macs(info: ModelInfo) -> int:
    """The patch embedding: one ``C*p*p -> D`` projection per patch (``C*t*p*p -> D`` per video tubelet)."""
    return info.num_patches * info.in_chans * math.prod(info.patch_size) * info.dim


# --- reports -----------------------------------------------------------------------------------------------


def plan_macs(info: ModelInfo, plan: PlanLike) -> tuple[float, list[BlockCost], float, float]:
    """(total MACs, per-block costs, embed MACs, head MACs) of ``plan`` on ``info``."""
    embed = embed_macs(info)
    blocks = []
    for i, (n_in, n_out) in enumerate(zip(plan.tokens_in, plan.tokens_out, strict=True)):
        attn, mlp = block_macs(n_in, n_out, info.dim, info.mlp_hidden)
        blocks.append(BlockCost(i, n_in, n_out, attn / 1e9, mlp / 1e9))
    total = embed + info.head_macs + sum(b.gmacs for b in blocks) * 1e9
    return total, blocks, embed, info.head_macs


@dataclass(frozen=True)
class _Unreduced:
    tokens_in: tuple[int, ...]
    tokens_out: tuple[int, ...]
    notes: tuple[str, ...] = ()


def _unreduced(info: ModelInfo) -> _Unreduced:
    n = (info.num_tokens,) * info.depth
    return _Unreduced(n, n)


def analytic_flops(info: ModelInfo, method: MethodLike | None) -> FlopsReport:
    """The analytic cost report of ``method`` (None: unreduced) on a model described by ``info``."""
    baseline, *_ = plan_macs(info, _unreduced(info))
    plan = _unreduced(info) if method is None else method.plan(info.num_tokens, info.num_prefix, info.depth)
    total, blocks, embed, head = plan_macs(info, plan)
    overhead = 0.0 if method is None else method.overhead_macs(plan, info.dim, info.heads, info.num_prefix)
    rule = getattr(method, "restore_rule", None)
    restore = 0 if rule is None else restore_macs(rule, method.leaving(plan), list(plan.tokens_in),
                                                  info.num_prefix, info.num_patches, info.dim, plan.tokens_out[-1])
    return FlopsReport(
        method=None if method is None else method.name,
        img_size=_img_size(info),
        gmacs=total / 1e9,
        overhead_gmacs=overhead / 1e9,
        baseline_gmacs=baseline / 1e9,
        embed_gmacs=embed / 1e9,
        head_gmacs=head / 1e9,
        blocks=blocks,
        notes=plan.notes,
        restore_gmacs=restore / 1e9,
        dense_output=info.dense_output,
    )


def built_model_report(method: str, info: ModelInfo, blocks: list[BlockCost], baseline_depth: int,
                       overhead_macs: float, notes: tuple[str, ...] = ()) -> FlopsReport:
    """The report of a model built on a plain ViT (STViT, STViT-R): the host's embedding and head, the given
    blocks, and as baseline the host unreduced with ``baseline_depth`` full blocks."""
    embed = embed_macs(info)
    full_block = sum(block_macs(info.num_tokens, info.num_tokens, info.dim, info.mlp_hidden))
    baseline = embed + info.head_macs + baseline_depth * full_block
    return FlopsReport(
        method=method,
        img_size=_img_size(info),
        gmacs=(embed + info.head_macs) / 1e9 + sum(b.gmacs for b in blocks),
        overhead_gmacs=overhead_macs / 1e9,
        baseline_gmacs=baseline / 1e9,
        embed_gmacs=embed / 1e9,
        head_gmacs=info.head_macs / 1e9,
        blocks=blocks,
        notes=notes,
    )


def block_costs(layers: Sequence[tuple[int, int, int, int]]) -> list[BlockCost]:
    """Per-block costs from ``(tokens in, tokens out, attention MACs, MLP MACs)`` rows, numbered in order."""
    return [BlockCost(i, a, b, attn / 1e9, mlp / 1e9) for i, (a, b, attn, mlp) in enumerate(layers)]


class SwinCounter:
    """Accumulates the per-block MACs of a timm ``SwinTransformer`` (read by attribute name: ``patch_embed``,
    ``layers[i].downsample`` / ``.blocks``, ``head.fc``) and of what a build adds to it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks: list[BlockCost] = []
        grid = model.patch_embed.grid_size
        proj = model.patch_embed.proj
        self.embed = grid[0] * grid[1] * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * \
            proj.out_channels
        fc = getattr(model.head, "fc", None)
        self.head = fc.in_features * fc.out_features if isinstance(fc, nn.Linear) else 0
        self.other = 0  # patch merging

    def add(self, tokens_in: int, tokens_out: int, attn: int, mlp: int) -> None:
        self.blocks.append(BlockCost(len(self.blocks), tokens_in, tokens_out, attn / 1e9, mlp / 1e9))

    def swin_block(self, block: nn.Module, grid: tuple[int, int]) -> None:
        n = grid[0] * grid[1]
        self.add(n, n, *swin_block_macs(grid, tuple(block.window_size), block.dim, block.mlp.fc1.out_features))

    def stages(self, after_blocks: Callable[[int, tuple[int, int]], tuple[int, int] | None] | None = None,
               block_cost: Callable[[nn.Module, tuple[int, int]], tuple[int, int, int, int]] | None = None
               ) -> SwinCounter:
        """Count every stage: its patch merging (which halves the grid, rounding up) and its blocks; then
        ``after_blocks(stage index, grid)`` may count what a build adds after that stage's blocks and return
        the grid the next stage starts from (None: unchanged). ``block_cost(block, grid)`` may count a block
        itself: ``(tokens in, tokens out, attention MACs, MLP MACs)`` (a reduced block)."""
        grid = tuple(self.model.patch_embed.grid_size)
        for index, stage in enumerate(self.model.layers):
            reduction = getattr(stage.downsample, "reduction", None)
            if isinstance(reduction, nn.Linear):  # timm's PatchMerging
                grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
                self.other += grid[0] * grid[1] * reduction.in_features * reduction.out_features
            for block in stage.blocks:
                if block_cost is None:
                    self.swin_block(block, grid)
                else:
                    self.add(*block_cost(block, grid))
            if after_blocks is not None:
                grid = after_blocks(index, grid) or grid
        return self

    @property
    def gmacs(self) -> float:
        return (self.embed + self.head + self.other) / 1e9 + sum(b.gmacs for b in self.blocks)

    def report(self, method: str, img_size: tuple[int, int], baseline_gmacs: float, overhead_macs: float,
               notes: tuple[str, ...]) -> FlopsReport:
        """The cost report of the blocks counted so far."""
        return FlopsReport(method=method, img_size=img_size, gmacs=self.gmacs, overhead_gmacs=overhead_macs / 1e9,
                           baseline_gmacs=baseline_gmacs, embed_gmacs=self.embed / 1e9,
                           head_gmacs=self.head / 1e9, blocks=self.blocks, notes=notes)


def count_gmacs(model: Callable[..., Any], *inputs: Any, **kwargs: Any) -> float:
    """GMACs of ``model(*inputs, **kwargs)`` as torch's ``FlopCounterMode`` counts them (FLOPs / 2), under the
    math attention kernel, without gradients: the cross-check of :func:`tokenreduce.flops`.

    A bare ``FlopCounterMode`` on CPU misses the attention products: it has formulas for the fused kernels of
    CUDA (flash, memory-efficient, cuDNN) but none for CPU's fused ``scaled_dot_product_attention``, so it
    counts 6-8% less than the model does. Under ``sdpa_kernel(SDPBackend.MATH)`` the attention is two batched
    matrix products it sees. The same two lines work for any model:

        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)

    >>> import timm, torch, tokenreduce as tr
    >>> model = timm.create_model("deit_tiny_patch16_224", depth=2).eval()
    >>> abs(tr.count_gmacs(model, torch.randn(1, 3, 224, 224)) / tr.flops(model).gmacs - 1) < 0.01
    True
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs, **kwargs)
    return counter.get_total_flops() / 2 / 1e9
