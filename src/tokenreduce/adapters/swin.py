"""The adapter for timm's ``SwinTransformer`` (hierarchical, windowed attention): the training-free methods run
inside each attention window, between the window's attention and its MLP.

Where tokens can be removed. A Swin block attends within fixed windows of A tokens (A = 49 for Swin-T, 16 for
the CIFAR test bed); the next block shifts the windows and the next stage merges 2 x 2 neighbours, and both need
every position of the grid. So a reduction lives inside one block: after the window attention (whose map gives
the method its statistics, with no CLS token: the attention a token receives, averaged over the window's
queries), each window is a sequence of A tokens without prefix, and the method removes its planned amount from
every window alike (fixed shapes: all windows of all images are one batch). The MLP runs on the remaining
tokens; then the window is restored to its A positions (``core.ops.restore``) and merged back into the grid.
Because the features of the removed tokens are still there, what is restored is the MLP's *update*, not the
feature: a merged patch gets its token's update, a patch whose token left gets its restore rule's update
(``departure``: none, it skips the MLP; ``nearest`` / ``reconstruct``: the updates of the remaining tokens most
similar to it; ``ridge``: their regression's prediction). Unless the caller chose a rule, windows use
``reconstruct`` (``departure`` for ToMe), the rule measured here (``benchmarks/hierarchical.py``), whatever a
method's default for a plain ViT's dense output is (:func:`window_rule`). So the saving is the MLP's share of a
block (about 60% at Swin widths) times the share of tokens removed, and what the reduction and the restore cost
is counted as overhead and restore work.

Schedules: blocks are numbered across the stages as ``model.layers[s].blocks[j]`` in order (Swin-T: 2 + 2 + 6
+ 2 = 12); ``r`` / ``keep_rate`` / ``layers`` act per window (``r=4`` removes 4 of every window's A tokens at
every named block). A block whose grid its windows do not divide (timm pads it) cannot reduce: a schedule that
asks it to is refused, naming the block. Every other block, and every block of an unpatched or ``r=0`` model,
runs timm's own block.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.attention import attention
from ..core.cost import FlopsReport, SwinCounter, mlp_macs, swin_block_macs
from ..core.errors import InputError
from ..core.ops import restore
from ..core.restore import RestoreRule, restore_macs
from ..core.state import TokenState
from . import common

FAMILY = "timm SwinTransformer"


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this adapter cannot run ``model``, or None when it can."""
    if type(model).__name__ == "SwinTransformerV2":
        return ("SwinTransformerV2 attends with scaled cosine similarity and a continuous position bias, which "
                "the library's attention kernel (scaled dot product) does not compute; SwinTransformer (v1) is "
                "supported")
    if not isinstance(model, SwinTransformer):
        return f"{type(model).__name__} is not a timm SwinTransformer"
    for s, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, PatchMerging | nn.Identity):
            return f"stage {s} downsamples with a {type(stage.downsample).__name__}; only PatchMerging is supported"
        for j, blk in enumerate(stage.blocks):
            if type(blk) is not SwinTransformerBlock or type(blk.attn) is not WindowAttention:
                return f"stage {s} block {j} is a {type(blk).__name__}; only timm's SwinTransformerBlock is supported"
    return None


def blocks_of(model: SwinTransformer) -> list[SwinTransformerBlock]:
    """Every block, numbered across the stages."""
    return [blk for stage in model.layers for blk in stage.blocks]


WindowPlan = common.BlockPlan  # per block: the amount removed from every window, A tokens before


def window_plan(model: SwinTransformer, method: Any, grids: list[tuple[int, int]] | None = None) -> WindowPlan:
    """The method's schedule per window of every block; refuses a reduction in a block its windows do not tile
    (``grids``: each block's grid, checked when given)."""
    blocks = blocks_of(model)
    windows = [tuple(blk.window_size) for blk in blocks]

    def tiled(i: int) -> None:
        if grids is not None:
            check_tiled(method.name, i, grids[i], windows[i])

    return common.block_plan(method, "Swin", [len(stage.blocks) for stage in model.layers],
                             [h * w for h, w in windows], tiled, " (per window)")


def check_tiled(name: str, block: int, grid: tuple[int, int], window: tuple[int, int]) -> None:
    if grid[0] % window[0] or grid[1] % window[1]:
        raise InputError(f"{name}: block {block} runs on a {grid[0]}x{grid[1]} grid that its {window[0]}x"
                         f"{window[1]} windows do not tile (timm pads it); tokens can be removed only in blocks "
                         "whose grid is whole windows: leave this block out of the schedule")


def block_grids(model: SwinTransformer) -> list[tuple[int, int]]:
    """The grid of every block at the model's input size (patch merging halves it, rounding up)."""
    grid = tuple(model.patch_embed.grid_size)
    grids = []
    for stage in model.layers:
        if isinstance(stage.downsample, PatchMerging):
            grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
        grids.extend([grid] * len(stage.blocks))
    return grids


def window_rule(method: Any) -> RestoreRule:
    """The rule that restores the MLP's update in every window: the caller's, else ``reconstruct``."""
    return common.family_rule(method, "reconstruct")


def window_bias(attn: WindowAttention, mask: torch.Tensor | None, windows: int) -> torch.Tensor:
    """The additive logits of every window (``windows x heads x A x A``): the relative-position bias plus, in a
    shifted block, the mask that keeps wrapped-around regions apart, as timm's fused path adds them."""
    bias = attn._get_rel_pos_bias()
    heads, area = bias.shape[1], bias.shape[-1]
    if mask is not None:
        count = mask.shape[0]
        mask = mask.view(1, count, 1, area, area).expand(windows // count, -1, heads, -1, -1)
        return bias + mask.reshape(-1, heads, area, area)
    return bias.expand(windows, -1, -1, -1)


def reduced_block(blk: SwinTransformerBlock, x: torch.Tensor, i: int, method: Any, plan: WindowPlan
                  ) -> torch.Tensor:
    """One Swin block (``B x H x W x C``) with the method's reduction inside every window between the attention
    and the MLP; the MLP's update is restored to every position by the method's restore rule."""
    batch, height, width, dim = x.shape
    window, shift = tuple(blk.window_size), tuple(blk.shift_size)
    check_tiled(method.name, i, (height, width), window)
    shifted = torch.roll(x, (-shift[0], -shift[1]), (1, 2)) if any(shift) else x
    windows = window_partition(shifted, window).reshape(-1, window[0] * window[1], dim)
    mask = blk.get_attn_mask(shifted) if getattr(blk, "dynamic_mask", False) else blk.attn_mask
    bias = window_bias(blk.attn, mask, windows.shape[0])
    h, stats = attention(blk.attn, blk.norm1(windows), bias, method.needs(i, plan), has_cls=False,
                         transform=method.attn_transform(i, plan))
    windows = windows + blk.drop_path1(h)
    state = TokenState(x=windows, num_prefix=0, grid=window).tracked(dense=True).replace(rule=window_rule(method))
    state = method.reduce(i, method.begin(state, plan), stats, plan.amounts[i])
    update = blk.drop_path2(blk.mlp(blk.norm2(state.x)))
    # The update, not the feature, is restored: a patch whose token left keeps its own feature (left_x zero, a
    # scalar that broadcasts).
    windows = windows + restore(state.replace(x=update, left_x=update.new_zeros(())))
    merged = window_reverse(windows.reshape(-1, window[0], window[1], dim), window, height, width)
    return torch.roll(merged, shift, (1, 2)) if any(shift) else merged


BlockHook = common.BlockHook


def run_stages(model: SwinTransformer, x: torch.Tensor, method: Any = None, on_block: BlockHook | None = None,
               on_stage: Any = None, stop_stage: int | None = None) -> torch.Tensor:
    """The patch-embedded grid ``x`` (``B x H x W x C``) through the stages (0..``stop_stage``) with ``method``
    (None: unreduced); ``on_block(i, state)`` sees every block's grid as a state, ``on_stage(s, x)`` every
    stage's output. As timm does, a stage with grad checkpointing recomputes its blocks in the backward pass."""
    plan = window_plan(model, method) if method is not None else None
    i = 0
    for s, stage in enumerate(model.layers if stop_stage is None else list(model.layers)[: stop_stage + 1]):
        x = stage.downsample(x)
        recompute = getattr(stage, "grad_checkpointing", False) and torch.is_grad_enabled()
        for blk in stage.blocks:
            if plan is not None and plan.reduces(i):
                run = reduced_block
                args = (blk, x, i, method, plan)
            else:
                run, args = blk, (x,)
            x = checkpoint(run, *args, use_reentrant=False) if recompute else run(*args)
            if on_block is not None:
                on_block(i, TokenState(x=x.flatten(1, 2), num_prefix=0, grid=tuple(x.shape[1:3])))
            i += 1
        if on_stage is not None:
            on_stage(s, x)
    return x


def forward_tokens(model: SwinTransformer, images: torch.Tensor, method: Any = None, track_owner: bool = False,
                   dense: bool = False, on_block: BlockHook | None = None) -> TokenState:
    """Embed ``images`` and run every stage with ``method``; the final grid (final norm applied) as a state
    (``B x h*w x C``, no prefix). Every block restores its grid, so the states are always full: ``track_owner``
    and ``dense`` change nothing here."""
    x = model.norm(run_stages(model, model.patch_embed(images), method, on_block))
    return TokenState(x=x.flatten(1, 2), num_prefix=0, grid=tuple(x.shape[1:3]))


# --- cost ---------------------------------------------------------------------------------------------------

def check_img_size(model: SwinTransformer, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
    own = tuple(model.patch_embed.img_size)
    if img_size is None:
        return own
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if size != own:
        raise InputError(f"img_size={img_size!r}: a timm Swin's windows and masks are built for {own[0]}x{own[1]}; "
                         "rebuild the model (or model.set_input_size) for another size")
    return size


def flops_report(model: SwinTransformer, method: Any = None, img_size: int | tuple[int, int] | None = None
                 ) -> FlopsReport:
    """The analytic cost of one image: timm's Swin with every reducing block's MLP on the remaining tokens of
    each window; the method's own products per window as overhead and the restore of the MLP updates as
    restore work (always part of the forward: every block restores its grid)."""
    size = check_img_size(model, img_size)
    baseline = SwinCounter(model).stages().gmacs
    if method is None:
        counter = SwinCounter(model).stages()
        return counter.report(None, size, baseline, 0.0, ())
    grids = block_grids(model)
    plan = window_plan(model, method, grids)
    blocks = blocks_of(model)
    overhead = restoring = 0.0

    def block_cost(i: int, blk: SwinTransformerBlock, grid: tuple[int, int]) -> tuple[int, int, int, int]:
        nonlocal overhead, restoring
        tokens = grid[0] * grid[1]
        window = tuple(blk.window_size)
        attn, mlp = swin_block_macs(grid, window, blk.dim, blk.mlp.fc1.out_features)
        if not plan.reduces(i):
            return tokens, tokens, attn, mlp
        count = tokens // plan.tokens_in[i]
        one = plan.block(i)
        overhead += count * method.overhead_macs(one, blk.dim, blk.attn.num_heads, 0)
        left = method.leaving(one)
        restoring += count * restore_macs(window_rule(method), left, [plan.tokens_in[i]], 0, plan.tokens_in[i],
                                          blk.dim, plan.tokens_out[i])
        kept = count * plan.tokens_out[i]
        return tokens, kept, attn, mlp_macs(kept, blk.dim, blk.mlp.fc1.out_features)

    counter = SwinCounter(model)
    index = iter(range(len(blocks)))
    counter.stages(block_cost=lambda blk, grid: block_cost(next(index), blk, grid))
    return FlopsReport(method=method.name, img_size=size, gmacs=counter.gmacs, overhead_gmacs=overhead / 1e9,
                       baseline_gmacs=baseline, embed_gmacs=counter.embed / 1e9, head_gmacs=counter.head / 1e9,
                       blocks=counter.blocks, notes=plan.notes, restore_gmacs=restoring / 1e9, dense_output=True)


def describe(model: SwinTransformer, method: Any = None, img_size: int | tuple[int, int] | None = None
             ) -> dict[str, Any]:
    """``tr.describe`` of a Swin: per block the grid tokens entering it and those its MLP runs on."""
    report = flops_report(model, method, img_size)
    plan = window_plan(model, method) if method is not None else None
    return {
        "method": None if method is None else method.name,
        "options": {} if method is None else dict(method.options),
        "num_prefix": 0,
        "grid": list(model.patch_embed.grid_size),
        "schedule": list(plan.amounts) if plan else [0] * len(report.blocks),
        "tokens_in": [b.tokens_in for b in report.blocks],
        "tokens_out": [b.tokens_out for b in report.blocks],
        "window_tokens_out": list(plan.tokens_out) if plan else [],
        "notes": list(report.notes),
        "restore": None if method is None else window_rule(method).as_dict(),
    }


# --- the patched class --------------------------------------------------------------------------------------

class _TokenReduced(common.Reduced):
    """Mixed in front of the model's class while a method is patched in: ``forward``, ``forward_features`` and
    ``forward_intermediates`` run the reduced blocks; the grid they return is always full (restored in every
    block), so heads and necks written for the unreduced model run unchanged."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # An empty batch: timm's window attention reshapes with -1, which 0 elements cannot infer.
        return common.on_empty_batch(
            lambda t: self.norm(run_stages(self, self.patch_embed(t), self._tokenreduce.method)), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> Any:
        """timm's ``forward_intermediates`` (stage outputs, NCHW) on the reduced model."""
        from timm.models._features import feature_take_indices

        if x.shape[0] == 0:  # one zero image, every output emptied (see forward_features)
            out = self.forward_intermediates(x.new_zeros(1, *x.shape[1:]), indices, norm, stop_early, output_fmt,
                                             intermediates_only)
            if intermediates_only:
                return [t[:0] for t in out]
            return out[0][:0], [t[:0] for t in out[1]]

        if output_fmt != "NCHW":
            raise InputError(f"output_fmt={output_fmt!r}: a timm Swin returns 'NCHW' intermediates")
        num_stages = len(self.layers)
        take, max_index = feature_take_indices(num_stages, indices)
        outputs: list[torch.Tensor] = []

        def collect(s: int, grid: torch.Tensor) -> None:
            if s in take:
                out = self.norm(grid) if norm and s == num_stages - 1 else grid
                outputs.append(out.permute(0, 3, 1, 2).contiguous())

        stop = max_index if stop_early else None
        x = run_stages(self, self.patch_embed(x), self._tokenreduce.method, on_stage=collect, stop_stage=stop)
        if intermediates_only:
            return outputs
        last = stop is None or stop == num_stages - 1
        return (self.norm(x) if last else x), outputs


def patched_class(cls: type) -> type:
    """The subclass a patched model of class ``cls`` takes."""
    return common.patched_subclass(_TokenReduced, cls)
