"""STViT-R: semantic tokens for dense outputs; a recovery layer restores the image tokens.

A "dumbbell" unit takes ``unit_depth`` consecutive pre-trained blocks (default 6) and adds one new layer::

    X = full block(X)                                   (pre-trained block 1 of the unit, all tokens)
    S = generation layers 1 and 2 (X)                   (pre-trained blocks 2-3, as in plain STViT)
    S = semantic blocks(S)                              (pre-trained blocks 4..unit_depth)
    X = X + MHA(q = LN(X), kv = LN(S)); X = X + MLP(LN(X))   (the new recovery layer)

The recovery layer starts from a copy of the unit's last pre-trained block (q from the q third of qkv, k/v
from the rest) and uses LayerScale initialised at 1e-5 on both branches, so a fresh unit returns nearly the
tokens its full block produced. Units repeat; the blocks before them stay unchanged. The model returns the
full token grid, so ``forward_features`` has the original model's shape and any per-token head runs on it.

- Plain ViT (:class:`STViTR`): the units take the last ``units * unit_depth`` blocks. The prefix tokens
  (CLS, registers) run through the full block, then travel with the semantic tokens through the semantic
  blocks (the pre-trained blocks expect them) and are put back in front after recovery. The generation
  layers and the recovery layer see image and semantic tokens only.
- Swin (:class:`STViTRSwin`): the units take the last ``units * unit_depth`` blocks of stage 3 (default:
  all of it, 1 unit for Swin-T, 3 for Swin-S/B); semantic tokens per window as in ``swin.py``; recovery is
  global (every image token attends to every semantic token); stages 1, 2 and 4 are unchanged.

Cost (``tokenreduce_flops``, matrix products only): the recovery layer with N image and S semantic tokens
costs ``2*N*D^2 + 2*S*D^2 + 2*N*S*D + 2*N*D*H``; other layers as in ``model.py`` / ``swin.py``. STViT-R-Swin-S
at 224 (3 units, 9 tokens per window): 5.83 GMACs vs 8.74 unreduced (-33%; the paper: 5.8 vs 8.8).
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import Block, LayerScale
from torch import nn

from ..adapters.timm_vit import check_supported, embed
from ..core.cost import (
    FlopsReport,
    SwinCounter,
    block_costs,
    block_macs,
    built_model_report,
    cross_block_macs,
    pooling_macs,
)
from ..core.errors import InputError, InputTypeError
from .model import GenerationLayer, ViTHosted, generation_costs, on_model_device
from .pooling import TokenPooling, check_pooling, check_square, window_regions
from .swin import SEMANTIC_STAGE, SwinHosted, WindowSemantic, check_swin, vit_block_from_swin

LAYER_SCALE_INIT = 1e-5


class RecoveryLayer(GenerationLayer):
    """``X = X + ls1(MHA(q = LN(X), kv = LN(S))); X = X + ls2(MLP(LN(X)))``: image tokens query the semantic
    tokens. Weights from a pre-trained ``Block``; LayerScale ``init_values`` (1e-5) on both branches."""

    def __init__(self, block: Block, init_values: float = LAYER_SCALE_INIT) -> None:
        super().__init__(block)
        dim = block.norm1.weight.shape[0]
        with torch.device(block.norm1.weight.device):
            self.ls1, self.ls2 = LayerScale(dim, init_values), LayerScale(dim, init_values)

    def forward(self, image_tokens: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(image_tokens, semantic)


def _check_units(units: int | None, unit_depth: int, depth: int, where: str) -> int:
    if isinstance(unit_depth, bool) or not isinstance(unit_depth, int) or unit_depth < 3:
        raise InputError(f"unit_depth={unit_depth!r} must be an integer >= 3 (full block + 2 generation layers)")
    if units is None:
        units = depth // unit_depth
    if isinstance(units, bool) or not isinstance(units, int) or units < 1 or units * unit_depth > depth:
        raise InputError(f"units={units!r} of {unit_depth} blocks do not fit in the {depth} blocks of {where}")
    return units


class DumbbellUnit(nn.Module):
    """One STViT-R unit of a plain ViT: full block, 2 generation layers, semantic blocks, recovery."""

    def __init__(self, blocks: list[Block], num_semantic: int, pooling: str, global_centres: bool) -> None:
        super().__init__()
        side = check_square(num_semantic, "num_semantic")
        dim = blocks[0].norm1.weight.shape[0]
        self.full = blocks[0]
        self.pool = TokenPooling(pooling, dim, side)
        self.generation = nn.ModuleList(GenerationLayer(b) for b in blocks[1:3])
        self.global_centres = None
        if global_centres:
            self.global_centres = nn.Parameter(torch.zeros(1, num_semantic, dim, device=blocks[0].norm1.weight.device))
            trunc_normal_(self.global_centres, std=0.02)
        self.semantic_blocks = nn.Sequential(*blocks[3:])
        self.recovery = RecoveryLayer(blocks[-1])

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        x = self.full(x)
        prefix, image = x[:, :num_prefix], x[:, num_prefix:]
        semantic = self.pool(image, grid)
        semantic = self.generation[0](semantic, image)
        semantic = self.generation[1](semantic, torch.cat([semantic, image], dim=1), self.global_centres)
        semantic = self.semantic_blocks(torch.cat([prefix, semantic], dim=1))
        prefix, semantic = semantic[:, :num_prefix], semantic[:, num_prefix:]
        return torch.cat([prefix, self.recovery(image, semantic)], dim=1)


class STViTR(ViTHosted):
    """A timm ``VisionTransformer`` with STViT-R units; ``forward_features`` has the original shape (prefix
    tokens first, then the full patch grid, final norm applied), so ``forward_head`` is the host's own."""

    @on_model_device
    def __init__(self, model: nn.Module, num_semantic: int = 16, units: int = 1, unit_depth: int = 6,
                 pooling: str = "learned", global_centres: bool = True) -> None:
        super().__init__()
        check_supported(model)
        check_square(num_semantic, "num_semantic")
        check_pooling(pooling)
        depth = len(model.blocks)
        units = _check_units(units, unit_depth, depth, "the model")
        vit = self.host(model)
        blocks = list(vit.blocks)
        lead = depth - units * unit_depth
        vit.blocks = nn.Sequential(*blocks[:lead])
        self.units = nn.ModuleList(
            DumbbellUnit(blocks[lead + u * unit_depth: lead + (u + 1) * unit_depth], num_semantic, pooling,
                         global_centres) for u in range(units))
        self.vit = vit
        self.num_semantic, self.unit_depth, self.pooling = num_semantic, unit_depth, pooling

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        state = embed(self.vit, images)
        x = self.vit.blocks(state.x)
        for unit in self.units:
            x = unit(x, state.grid, state.num_prefix)
        return self.vit.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.vit.forward_head(x, pre_logits=pre_logits)

    def tokenreduce_flops(self, img_size: int | tuple[int, int] | None = None) -> FlopsReport:
        """Analytic MACs per image (module docstring; other layers as ``STViT.tokenreduce_flops``)."""
        info = self.info(img_size)
        dim, hidden, m, n, p = info.dim, info.mlp_hidden, self.num_semantic, info.num_patches, info.num_prefix
        full = [(info.num_tokens, info.num_tokens, *block_macs(info.num_tokens, info.num_tokens, dim, hidden))]
        costs = full * len(self.vit.blocks)
        for unit in self.units:
            costs += full + generation_costs(m, n, dim, hidden)
            costs += [(m + p, m + p, *block_macs(m + p, m + p, dim, hidden))] * len(unit.semantic_blocks)
            costs.append((n + m, n, *cross_block_macs(n, m, dim, hidden)))
        blocks = block_costs(costs)
        depth = len(self.vit.blocks) + len(self.units) * self.unit_depth
        overhead = pooling_macs(self.pooling, n, dim) * len(self.units)
        notes = (f"{len(self.units)} STViT-R unit(s) of {self.unit_depth} blocks + recovery, M={m} "
                 f"({self.pooling} pooling), after {len(self.vit.blocks)} unchanged blocks",)
        return built_model_report("stvit-r", info, blocks, depth, overhead, notes)


class SwinUnit(nn.Module):
    """One STViT-R unit in a Swin stage: full Swin block, per-window semantic tokens, recovery."""

    def __init__(self, blocks: list, side: int, pooling: str, global_centres: bool, key_window: int | None) -> None:
        super().__init__()
        self.full = blocks[0]
        self.semantic = WindowSemantic(blocks[1:3], blocks[3:], side, pooling, global_centres, key_window)
        self.recovery = RecoveryLayer(vit_block_from_swin(blocks[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.full(x)
        batch, height, width, dim = x.shape
        image = self.recovery(x.reshape(batch, height * width, dim), self.semantic(x))
        return image.reshape(batch, height, width, dim)


class STViTRSwin(SwinHosted):
    """A timm ``SwinTransformer`` with STViT-R units in stage 3; same ``forward_features`` shape as the host."""

    @on_model_device
    def __init__(self, model: SwinTransformer, tokens_per_window: int = 9, units: int | None = None,
                 unit_depth: int = 6, pooling: str = "learned", global_centres: bool = True,
                 key_window: int | None = None) -> None:
        super().__init__()
        side, depth = check_swin(model, tokens_per_window, pooling)
        units = _check_units(units, unit_depth, depth, "Swin stage 3")
        swin = self.host(model)
        blocks = list(swin.layers[SEMANTIC_STAGE].blocks)
        window_regions(tuple(blocks[0].input_resolution), tuple(blocks[0].window_size), side)  # early error
        lead = depth - units * unit_depth
        swin.layers[SEMANTIC_STAGE].blocks = nn.Sequential(*blocks[:lead])
        self.units = nn.ModuleList(
            SwinUnit(blocks[lead + u * unit_depth: lead + (u + 1) * unit_depth], side, pooling, global_centres,
                     key_window) for u in range(units))
        self.swin = swin
        self.tokens_per_window, self.unit_depth, self.pooling = tokens_per_window, unit_depth, pooling

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.swin.layers[SEMANTIC_STAGE].blocks(self.semantic_stage_input(images))
        for unit in self.units:
            x = unit(x)
        return self.finish(x)

    def tokenreduce_flops(self, img_size: int | tuple[int, int] | None = None) -> FlopsReport:
        """Analytic MACs per image at the model's own image size (conventions in ``swin.py``)."""

        def units(counter: SwinCounter, grid: tuple[int, int]) -> tuple[None, int]:
            n, overhead = grid[0] * grid[1], 0
            for unit in self.units:
                counter.swin_block(unit.full, grid)
                layers, pool = unit.semantic.macs(grid)
                for layer in layers:
                    counter.add(*layer)
                s = layers[-1][1]
                counter.add(n + s, n, *cross_block_macs(n, s, unit.semantic.dim, unit.semantic.hidden))
                overhead += pool
            return None, overhead

        counter, img, overhead = self.count(img_size, units)
        notes = (f"stage 3: {len(self.swin.layers[SEMANTIC_STAGE].blocks)} unchanged blocks, {len(self.units)} unit(s) "
                 f"of {self.unit_depth} blocks + recovery; {self.tokens_per_window} tokens per window "
                 f"({self.pooling} pooling)",)
        return counter.report("stvit-r-swin", img, self.baseline_gmacs, overhead, notes)


def build_recovery(model: nn.Module, *args, **options) -> STViTR | STViTRSwin:
    """STViT-R from a timm ``VisionTransformer`` (options of :class:`STViTR`: ``num_semantic=16``, ``units=1``,
    ``unit_depth=6``, ``pooling``, ``global_centres``) or ``SwinTransformer`` (:class:`STViTRSwin`:
    ``tokens_per_window=9``, ``units`` = all of stage 3, ``unit_depth=6``, ``pooling``, ``global_centres``,
    ``key_window``). ``model`` is not changed.

    >>> import timm, torch, tokenreduce as tr
    >>> from tokenreduce import stvit
    >>> with torch.device("meta"):
    ...     swin = timm.create_model("swin_small_patch4_window7_224", pretrained=False)
    ...     report = tr.flops(stvit.build(swin, recover=True))
    >>> round(report.gmacs, 2), round(report.baseline_gmacs, 2)
    (5.83, 8.74)
    """
    if isinstance(model, SwinTransformer):
        return STViTRSwin(model, *args, **options)
    if "tokens_per_window" in options:
        raise InputTypeError(f"tokens_per_window is a Swin option; {type(model).__name__} takes num_semantic")
    return STViTR(model, *args, **options)
