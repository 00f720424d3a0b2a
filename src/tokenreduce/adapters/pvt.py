"""The adapter for timm's ``PyramidVisionTransformerV2`` (PVTv2-b0 ... b5): the training-free methods run in
every block between its attention and its MLP, on the stage's whole token grid.

A PVTv2 block projects queries for every token but keys and values from a spatially reduced grid (a strided
``sr x sr`` convolution, M = N / sr^2 regions), and its MLP puts a 3 x 3 depth-wise convolution between its two
linear layers. Both convolutions need the full grid, so a reduction lives inside one block:

1. attention over the regions, as timm runs it; the method's statistics per *token*: ToMe's metric is the
   token's query averaged over heads (keys exist only per region; at ``sr = 1`` queries and keys are alike
   per-token projections), and the attention a token receives (Top-K, EViT, PPT's "CLS row", GTP's column
   sums) is its region's, shared among the region's tokens; GTP's diagonal is a token's attention to its own
   region;
2. the method removes its planned tokens (the image is one sequence without prefix, as in a ViT);
3. the MLP's first linear layer runs on the remaining tokens, their hidden features go back onto the grid
   (a merged token's to each of its patches, zero where a token left: the convolution sees the removed positions
   as padding), the depth-wise convolution runs on the grid, a remaining token takes the mean of its patches'
   outputs, and the second linear layer runs on the remaining tokens;
4. the MLP's update is restored to every position (as in ``adapters/swin.py``), by default with ``departure``
   (a token that left skips the MLP): a rule that follows tokens (``nearest``, ``reconstruct``, ``graph``) costs
   ``N x N' x C`` per block over the whole grid, more than the MLP saves at PVTv2 sizes (in a Swin window it is
   ``A x A'``). ``restore=...`` asks for one anyway (counted in ``tr.flops``).

The saving: the MLP's two linear layers (about 75% of a PVTv2-b0 block at stage 1, MLP ratio 8) on the remaining
tokens. The linear-attention variant (``pvt_v2_b2_li``, adaptive pooling) is refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.pvt_v2 import Attention, Block, MlpWithDepthwiseConv, PyramidVisionTransformerV2
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core import cost
from ..core.attention import attention_map, project
from ..core.cost import BlockCost, FlopsReport, pvt_block_macs
from ..core.errors import InputError
from ..core.ops import restore
from ..core.precision import at_least_float32, decide
from ..core.restore import RestoreRule, restore_macs
from ..core.state import TokenState
from . import common

FAMILY = "timm PyramidVisionTransformerV2"
#: Statistics read from the queries x regions map (made in float32 whenever a method asks for one of them).
MAP_NEEDS = frozenset({"cls_attn", "col_sum", "diag", "value_norm"})


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this adapter cannot run ``model``, or None when it can."""
    if not isinstance(model, PyramidVisionTransformerV2):
        return f"{type(model).__name__} is not a timm PyramidVisionTransformerV2"
    for s, stage in enumerate(model.stages):
        for j, blk in enumerate(stage.blocks):
            if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not MlpWithDepthwiseConv:
                return f"stage {s} block {j} is a {type(blk).__name__}; only timm's PVTv2 Block is supported"
            if blk.attn.pool is not None:
                return "the linear-attention PVTv2 (adaptive pooling of the keys, pvt_v2_b2_li) is not supported"
    return None


def block_rule(method: Any) -> RestoreRule:
    """The rule of the per-block restore: the method's when the caller chose one, else ``departure``."""
    return common.family_rule(method, "departure")


def blocks_of(model: PyramidVisionTransformerV2) -> list[Block]:
    return [blk for stage in model.stages for blk in stage.blocks]


GridPlan = common.BlockPlan  # per block: the amount removed from the stage's grid


def stage_grids(model: PyramidVisionTransformerV2, img_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The grid of every stage: the stem's 7x7 stride-4 convolution, then each stage's 3x3 stride-2 one."""
    grids = []
    height, width = img_size
    for s, stage in enumerate(model.stages):
        conv = model.patch_embed.proj if s == 0 else stage.downsample.proj
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        height, width = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        grids.append((height, width))
    return grids


def grid_plan(model: PyramidVisionTransformerV2, method: Any, img_size: tuple[int, int]) -> GridPlan:
    """The method's schedule on every block's grid (the grid restarts whole in every block)."""
    tokens = [g[0] * g[1] for g, stage in zip(stage_grids(model, img_size), model.stages, strict=True)
              for _ in stage.blocks]
    return common.block_plan(method, "PVTv2", [len(stage.blocks) for stage in model.stages], tokens)


def region_index(grid: tuple[int, int], sr: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's region of the ``sr x sr`` spatial reduction (``N``; a border the convolution skips joins
    the last region) and the tokens per region (``M``)."""
    height, width = grid
    rows = (torch.arange(height, device=device) // sr).clamp(max=max(height // sr - 1, 0))
    cols = (torch.arange(width, device=device) // sr).clamp(max=max(width // sr - 1, 0))
    index = (rows.unsqueeze(1) * max(width // sr, 1) + cols).flatten()
    return index, torch.bincount(index, minlength=max(height // sr, 1) * max(width // sr, 1))


def key_source(attn: Attention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """What the keys and values are projected from: the spatially reduced grid (timm's ``sr`` and ``norm``)."""
    if attn.sr is None:
        return x
    batch, _, dim = x.shape
    reduced = attn.sr(x.transpose(1, 2).reshape(batch, dim, *grid))
    return attn.norm(reduced.reshape(batch, dim, -1).transpose(1, 2))


def attention_with_stats(attn: Attention, x: torch.Tensor, grid: tuple[int, int], need: frozenset[str],
                         transform: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The block's attention output (projected) and the method's statistics per token (see the module doc)."""
    if transform is not None or "attn" in need:
        raise InputError("a PVTv2 attention map is queries x key regions, not tokens x tokens: a method that reads "
                         "or changes the whole map (GTP with sparsity < 1 or map='full') cannot run on it")
    batch, tokens, dim = x.shape
    q, k, v = project(attn, x, context=key_source(attn, x, grid))
    stats: dict[str, torch.Tensor] = {}
    if need & MAP_NEEDS:
        probs = attention_map(q, k, attn.scale)  # B x H x N x M, float32: N x N / sr^2 entries
        out = probs.to(v.dtype) @ v
        sr = attn.sr.stride[0] if attn.sr is not None else 1
        region, count = region_index(grid, sr, x.device)
        with decide(probs):
            per_token = count[region].to(probs.dtype)
            if "cls_attn" in need:
                stats["cls_attn"] = probs.mean(dim=2)[..., region] / per_token
            if "col_sum" in need:
                stats["col_sum"] = probs.sum(dim=2)[..., region] / per_token
            if "diag" in need:
                stats["diag"] = probs.gather(-1, region.view(1, 1, -1, 1).expand(*probs.shape[:3], 1))[..., 0]
            if "value_norm" in need:
                stats["value_norm"] = at_least_float32(v).transpose(1, 2).flatten(2).norm(dim=-1)[:, region]
    elif attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        out = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    if "metric" in need:
        with decide(q):
            stats["metric"] = at_least_float32(q).mean(dim=1)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))
    return out, stats


def patches_to_tokens(values: torch.Tensor, state: TokenState) -> torch.Tensor:
    """Per remaining token, the mean of ``values`` (``B x N x D``, one per patch) over the patches it carries
    (a patch that left counts for none)."""
    batch, _, width = values.shape
    tokens = state.x.shape[1]
    slot = torch.where(state.left, torch.full_like(state.owner, tokens), state.owner)  # left: a spare slot
    # Sums and counts by scatter_add (exported to ONNX as ScatterElements add; a "mean" reduction is not).
    sums = values.new_zeros(batch, tokens + 1, width).scatter_add(1, slot.unsqueeze(-1).expand(-1, -1, width), values)
    counts = values.new_zeros(batch, tokens + 1, 1).scatter_add(1, slot.unsqueeze(-1), values.new_ones(*slot.shape, 1))
    return sums[:, :tokens] / counts[:, :tokens].clamp(min=1)


def reduced_mlp(mlp: MlpWithDepthwiseConv, x: torch.Tensor, state: TokenState, grid: tuple[int, int]
                ) -> torch.Tensor:
    """The MLP on the remaining tokens (``x``: their normed features), its depth-wise convolution on the grid."""
    hidden = mlp.fc1(x)
    on_grid = restore(state.replace(x=hidden, left_x=hidden.new_zeros(())),
                      rule="departure")
    batch, num_patches, width = on_grid.shape
    conv = mlp.dwconv(mlp.relu(on_grid.transpose(1, 2).reshape(batch, width, *grid)))
    hidden = mlp.drop(mlp.act(patches_to_tokens(conv.flatten(2).transpose(1, 2), state)))
    return mlp.drop(mlp.fc2(hidden))


def reduced_block(blk: Block, x: torch.Tensor, grid: tuple[int, int], i: int, method: Any, plan: GridPlan
                  ) -> torch.Tensor:
    """One PVTv2 block (``B x N x C``) with the method's reduction between its attention and its MLP."""
    h, stats = attention_with_stats(blk.attn, blk.norm1(x), grid, method.needs(i, plan),
                                    method.attn_transform(i, plan))
    x = x + blk.drop_path1(h)
    state = TokenState(x=x, num_prefix=0, grid=grid).tracked(dense=True).replace(rule=block_rule(method))
    state = method.reduce(i, method.begin(state, plan), stats, plan.amounts[i])
    update = blk.drop_path2(reduced_mlp(blk.mlp, blk.norm2(state.x), state, grid))
    # The update, not the feature, is restored: a patch whose token left keeps its own feature (left_x zero, a
    # scalar that broadcasts).
    return x + restore(state.replace(x=update, left_x=update.new_zeros(())))


BlockHook = common.BlockHook


def run_stages(model: PyramidVisionTransformerV2, images: torch.Tensor, method: Any = None,
               on_block: BlockHook | None = None, on_stage: Any = None, stop_stage: int | None = None
               ) -> torch.Tensor:
    """The images through the stem and the stages (0..``stop_stage``) with ``method`` (None: unreduced); every
    stage's output (``B x C x H x W``, its norm applied, as timm returns it) goes to ``on_stage(s, x)``."""
    plan = grid_plan(model, method, tuple(images.shape[-2:])) if method is not None else None
    x = model.patch_embed(images)
    i = 0
    for s, stage in enumerate(model.stages if stop_stage is None else list(model.stages)[: stop_stage + 1]):
        if stage.downsample is not None:
            x = stage.downsample(x)
        batch, height, width, dim = x.shape
        grid = (height, width)
        x = x.reshape(batch, -1, dim)
        recompute = stage.grad_checkpointing and torch.is_grad_enabled()
        for blk in stage.blocks:
            if plan is not None and plan.reduces(i):
                run, args = reduced_block, (blk, x, grid, i, method, plan)
            else:
                run, args = blk, (x, grid)
            x = checkpoint(run, *args, use_reentrant=False) if recompute else run(*args)
            if on_block is not None:
                on_block(i, TokenState(x=x, num_prefix=0, grid=grid))
            i += 1
        x = stage.norm(x).reshape(batch, height, width, dim).permute(0, 3, 1, 2).contiguous()
        if on_stage is not None:
            on_stage(s, x)
    return x


def forward_tokens(model: PyramidVisionTransformerV2, images: torch.Tensor, method: Any = None,
                   track_owner: bool = False, dense: bool = False, on_block: BlockHook | None = None) -> TokenState:
    """The last stage's grid as a state (``B x h*w x C``, no prefix); every block restores its grid."""
    x = run_stages(model, images, method, on_block)
    return TokenState(x=x.flatten(2).transpose(1, 2), num_prefix=0, grid=tuple(x.shape[-2:]))


# --- cost ---------------------------------------------------------------------------------------------------

def _img_size(model: nn.Module, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """The size to count at: the given one, else the model's configured input size (PVTv2 takes any size)."""
    if img_size is None:
        configured = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        return tuple(configured[-2:])
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def conv_macs(conv: nn.Conv2d, out_grid: tuple[int, int]) -> int:
    return cost.conv_macs(out_grid, conv.in_channels, conv.out_channels, conv.kernel_size, conv.groups)


def flops_report(model: PyramidVisionTransformerV2, method: Any = None,
                 img_size: int | tuple[int, int] | None = None) -> FlopsReport:
    """The analytic cost of one image (PVTv2 takes any size; default 224): convolutions and matrix products as
    ``FlopCounterMode`` counts them; every reducing block's MLP linear layers on the remaining tokens, the method's
    own products as overhead and the restore of the MLP updates as restore work."""
    size = _img_size(model, img_size)
    grids = stage_grids(model, size)
    plan = grid_plan(model, method, size) if method is not None else None
    embed = conv_macs(model.patch_embed.proj, grids[0])
    other = sum(conv_macs(stage.downsample.proj, grids[s]) for s, stage in enumerate(model.stages)
                if stage.downsample is not None)
    head = model.head.in_features * model.head.out_features if isinstance(model.head, nn.Linear) else 0
    blocks: list[BlockCost] = []
    baseline = overhead = restoring = 0.0
    i = 0
    for s, stage in enumerate(model.stages):
        grid = grids[s]
        tokens = grid[0] * grid[1]
        for blk in stage.blocks:
            dim, hidden = blk.attn.dim, blk.mlp.fc1.out_features
            sr = blk.attn.sr.stride[0] if blk.attn.sr is not None else 1
            attn_macs, full_mlp = pvt_block_macs(grid, sr, dim, hidden)
            baseline += attn_macs + full_mlp
            mlp = full_mlp
            if plan is not None and plan.reduces(i):
                kept = plan.tokens_out[i]
                one = plan.block(i)
                overhead += method.overhead_macs(one, dim, blk.attn.num_heads, 0)
                restoring += restore_macs(block_rule(method), method.leaving(one), [tokens], 0, tokens, dim, kept)
                mlp = pvt_block_macs(grid, sr, dim, hidden, kept)[1]
            blocks.append(BlockCost(i, tokens, plan.tokens_out[i] if plan else tokens, attn_macs / 1e9, mlp / 1e9))
            i += 1
    fixed = embed + other + head
    return FlopsReport(method=None if method is None else method.name, img_size=size,
                       gmacs=fixed / 1e9 + sum(b.gmacs for b in blocks), overhead_gmacs=overhead / 1e9,
                       baseline_gmacs=(fixed + baseline) / 1e9, embed_gmacs=embed / 1e9, head_gmacs=head / 1e9,
                       blocks=blocks, notes=plan.notes if plan else (), restore_gmacs=restoring / 1e9,
                       dense_output=True)


def describe(model: PyramidVisionTransformerV2, method: Any = None,
             img_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """``tr.describe`` of a PVTv2: per block the grid tokens entering it and those its MLP runs on."""
    size = _img_size(model, img_size)
    report = flops_report(model, method, size)
    plan = grid_plan(model, method, size) if method is not None else None
    return {
        "method": None if method is None else method.name,
        "options": {} if method is None else dict(method.options),
        "num_prefix": 0,
        "grid": list(stage_grids(model, size)[0]),
        "schedule": list(plan.amounts) if plan else [0] * len(report.blocks),
        "tokens_in": [b.tokens_in for b in report.blocks],
        "tokens_out": [b.tokens_out for b in report.blocks],
        "notes": list(report.notes),
        "restore": None if method is None else block_rule(method).as_dict(),
    }


# --- the patched class --------------------------------------------------------------------------------------

class _TokenReduced(common.Reduced):
    """Mixed in front of the model's class while a method is patched in: ``forward``, ``forward_features`` and
    ``forward_intermediates`` run the reduced blocks and return timm's full-grid outputs."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # An empty batch: timm's attention reshapes with -1, which 0 elements cannot infer.
        return common.on_empty_batch(lambda t: run_stages(self, t, self._tokenreduce.method), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> Any:
        """timm's ``forward_intermediates`` (stage outputs, NCHW) on the reduced model."""
        from timm.models._features import feature_take_indices

        if output_fmt != "NCHW":
            raise InputError(f"output_fmt={output_fmt!r}: a timm PVTv2 returns 'NCHW' intermediates")
        if x.shape[0] == 0:
            out = self.forward_intermediates(x.new_zeros(1, *x.shape[1:]), indices, norm, stop_early, output_fmt,
                                             intermediates_only)
            return [t[:0] for t in out] if intermediates_only else (out[0][:0], [t[:0] for t in out[1]])
        take, max_index = feature_take_indices(len(self.stages), indices)
        outputs: list[torch.Tensor] = []
        stop = max_index if stop_early else None
        x = run_stages(self, x, self._tokenreduce.method,
                       on_stage=lambda s, grid: outputs.append(grid) if s in take else None, stop_stage=stop)
        return outputs if intermediates_only else (x, outputs)


def patched_class(cls: type) -> type:
    """The subclass a patched model of class ``cls`` takes."""
    return common.patched_subclass(_TokenReduced, cls)
