"""STViT for Video Swin (torchvision's ``SwinTransformer3d``: ``swin3d_t`` / ``swin3d_s`` / ``swin3d_b``):
semantic tokens per frame window in stage 3, as STViT-Swin places them (Chang et al., CVPR 2023, Table 6: Video
Swin-T/S at -27% FLOPs). The image build (``swin.py``) with windows that gain a time extent.

Stage 3 (``features[4]``; a ``t x 14 x 14`` grid at 224 px, ``t`` = frames / 2, windows ``8 x 7 x 7``) keeps
its first ``full_blocks`` pre-trained blocks (shifted windows and all). Then, with ``wt`` the window's time extent
and ``k x k = tokens_per_window``:

- pooling: every frame's every 7 x 7 spatial window into k x k tokens (so each time step keeps its own semantic
  tokens: "per frame"); a space-time window (wt x 7 x 7 image tokens) holds ``wt * k*k`` semantic tokens;
- generation layer 1: a space-time window's ``wt*k*k`` pooled queries attend to its enlarged key window, the
  ``key_window x key_window`` spatial neighbourhood (10 x 10 for 7 x 7) over the window's ``wt`` frames;
- generation layer 2: every semantic token (+ its global centre G) attends to [all semantic ; all image tokens]
  of the clip;
- the stage's remaining blocks alternate attention within each space-time window's ``wt*k*k`` semantic tokens and
  across all semantic tokens of the clip; windows are never shifted here, semantic tokens get no
  relative-position bias.

The semantic tokens are laid out back on a ``t x (rows*k) x (cols*k)`` grid (6 x 6 per frame at 224 with k = 3),
so torchvision's patch merging and stage 4 run unchanged (its windows shrink to the 3 x 3 grid, as torchvision
does for any small input). Every new layer is made from the stage's pre-trained blocks (norms, qkv, projection,
MLP); G is one ``k*k x C`` table shared by the windows and frames.

Cost (``tokenreduce_flops``; matrix products only, as ``FlopCounterMode`` counts them): a Video Swin block on a
``t x h x w`` grid with ``A``-token windows ``4*Np*C^2 + 2*Np*A*C + 2*N*C*H`` (Np the grid padded to whole
windows), patch merging ``N_out*4*C*2C``, the tubelet embedding ``N*(3*2*4*4)*C``, the head; the generation and
semantic layers as in ``swin.py`` (layer 1 projects every window's ``wt*K`` keys). Video Swin-T at 32 frames x
224 px: 87.6 GMACs (the paper: 88 G); STViT with 4 full blocks and 9 tokens per window: see the README's Video
section (``benchmarks/video.py``).
"""

from __future__ import annotations

import copy
import math

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ..core.attention import attention
from ..core.cost import (
    BlockCost,
    FlopsReport,
    attention_macs,
    cross_block_macs,
    mlp_macs,
    pooling_macs,
)
from ..core.errors import InputError, InputTypeError
from .model import GenerationLayer, on_model_device
from .pooling import TokenPooling, cached_index, check_pooling, check_square, window_regions
from .swin import check_full_blocks, key_windows

SEMANTIC_STAGE = 4  # index of Video Swin's third stage in ``model.features`` (stage, merge, stage, merge, stage..)


def is_video_swin(model: nn.Module) -> bool:
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    return isinstance(model, SwinTransformer3d)


def _stage_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.features[SEMANTIC_STAGE])


def _mlp_hidden(block: nn.Module) -> int:
    return block.mlp[0].out_features


class SemanticBlock3d(nn.Module):
    """A pre-trained Video Swin block on semantic tokens: attention within each space-time window's semantic
    tokens (``local``; the group size comes with the clip) or across all; no relative-position bias. It holds the
    attention weights under the names :func:`tokenreduce.core.attention.attention` reads."""

    def __init__(self, block: nn.Module, local: bool) -> None:
        super().__init__()
        attn = block.attn
        self.local = local
        dim = attn.qkv.in_features
        self.num_heads, self.scale, self.fused_attn = attn.num_heads, (dim // attn.num_heads) ** -0.5, True
        self.qkv, self.proj = copy.deepcopy(attn.qkv), copy.deepcopy(attn.proj)
        self.attn_drop, self.proj_drop = nn.Dropout(attn.attention_dropout), nn.Dropout(attn.dropout)
        self.norm1, self.norm2 = copy.deepcopy(block.norm1), copy.deepcopy(block.norm2)
        self.mlp = copy.deepcopy(block.mlp)
        self.drop_path = copy.deepcopy(block.stochastic_depth)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """``x``: B x S x C, window-major; ``group``: semantic tokens per space-time window (used when local)."""
        batch, count, dim = x.shape
        h = self.norm1(x)
        if self.local:
            h = h.reshape(batch * count // group, group, dim)
        x = x + self.drop_path(attention(self, h)[0].reshape(batch, count, dim))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def vit_block_from_swin3d(block: nn.Module) -> Block:
    """A timm ViT ``Block`` carrying a torchvision Video Swin block's norms, qkv, projection and MLP (the
    relative-position table left out), from which the plain-ViT ``GenerationLayer`` is built."""
    attn = block.attn
    dim = attn.qkv.in_features
    with torch.device(attn.qkv.weight.device):
        vit_block = Block(dim, attn.num_heads, qkv_bias=attn.qkv.bias is not None, attn_drop=attn.attention_dropout,
                          proj_drop=attn.dropout)
    vit_block.norm1, vit_block.norm2 = copy.deepcopy(block.norm1), copy.deepcopy(block.norm2)
    vit_block.attn.qkv, vit_block.attn.proj = copy.deepcopy(attn.qkv), copy.deepcopy(attn.proj)
    vit_block.mlp = copy.deepcopy(block.mlp)
    vit_block.drop_path1 = copy.deepcopy(block.stochastic_depth)
    vit_block.drop_path2 = copy.deepcopy(block.stochastic_depth)
    return vit_block


class VideoWindowSemantic(nn.Module):
    """Pooling, the two generation layers and the semantic blocks of Video Swin's stage 3:
    B x t x h x w x C image tokens in, B x t x (rows*k) x (cols*k) x C semantic tokens out."""

    def __init__(self, generation_blocks: list[nn.Module], semantic_blocks: list[nn.Module], side: int,
                 pooling: str, global_centres: bool, key_window: int | None) -> None:
        super().__init__()
        first = generation_blocks[0]
        self.window = tuple(int(w) for w in first.attn.window_size)  # (wt, wh, ww)
        self.side = side
        spatial = max(self.window[1:])
        self.key_window = key_window if key_window is not None else (10 * spatial) // 7
        if isinstance(self.key_window, bool) or not isinstance(self.key_window, int) or self.key_window < spatial:
            raise InputError(f"key_window={key_window!r} must be an integer >= the window size {spatial}")
        dim = self.dim = first.attn.qkv.in_features
        self.hidden = _mlp_hidden(first)
        self.pool = TokenPooling(pooling, dim, side, self.window[1:])
        self.generation = nn.ModuleList(GenerationLayer(vit_block_from_swin3d(b)) for b in generation_blocks)
        self.global_centres = None
        if global_centres:
            self.global_centres = nn.Parameter(torch.zeros(1, side * side, dim, device=first.norm1.weight.device))
            trunc_normal_(self.global_centres, std=0.02)
        self.semantic_blocks = nn.ModuleList(SemanticBlock3d(b, local=i % 2 == 0)
                                             for i, b in enumerate(semantic_blocks))

    def time_window(self, frames: int) -> int:
        """The time extent of a window on a clip of ``frames`` time steps (torchvision shrinks the window to a
        shorter clip); a clip the windows do not tile is refused."""
        wt = min(self.window[0], frames)
        if frames % wt:
            raise InputError(f"STViT Video Swin: stage 3 has {frames} time steps, which {wt}-step windows do not "
                             f"tile; use a clip of a multiple of {2 * wt} frames")
        return wt

    def num_windows(self, grid: tuple[int, int]) -> tuple[int, int]:
        return math.ceil(grid[0] / self.window[1]), math.ceil(grid[1] / self.window[2])

    def keys(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Every spatial window's enlarged key window (flat indices in a frame), built once per grid and device."""
        window, size = self.window[1:], self.key_window
        return cached_index(("key windows", grid, window, size), device, lambda: (key_windows(grid, window, size),))[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, height, width, dim = x.shape
        wt, side2 = self.time_window(frames), self.side * self.side
        blocks_t = frames // wt
        rows, cols = self.num_windows((height, width))
        spatial = rows * cols
        tokens = x.reshape(batch * frames, height * width, dim)
        pooled = self.pool(tokens, (height, width))  # (B*t) x (spatial * k*k) x C, window-major per frame
        # Window-major order over the clip: (time block, spatial window, frame in block, k*k).
        pooled = pooled.reshape(batch, blocks_t, wt, spatial, side2, dim).transpose(2, 3)
        keys = self.keys((height, width), x.device)  # spatial windows x K
        context = tokens.reshape(batch, blocks_t, wt, height * width, dim)[:, :, :, keys]  # B, tb, wt, sp, K, C
        context = context.transpose(2, 3).reshape(batch * blocks_t * spatial, wt * keys.shape[1], dim)
        semantic = self.generation[0](pooled.reshape(batch * blocks_t * spatial, wt * side2, dim), context)
        count = blocks_t * spatial * wt * side2
        semantic = semantic.reshape(batch, count, dim)
        centres = None
        if self.global_centres is not None:
            centres = self.global_centres.repeat(1, count // side2, 1)
        semantic = self.generation[1](semantic, torch.cat([semantic, x.reshape(batch, -1, dim)], dim=1), centres)
        for block in self.semantic_blocks:
            semantic = block(semantic, wt * side2)
        # Back to a grid: (B, tb, rows, cols, wt, k, k, C) -> (B, tb, wt, rows, k, cols, k, C).
        grid = semantic.reshape(batch, blocks_t, rows, cols, wt, self.side, self.side, dim)
        grid = grid.permute(0, 1, 4, 2, 5, 3, 6, 7)
        return grid.reshape(batch, frames, rows * self.side, cols * self.side, dim)

    def macs(self, grid: tuple[int, int, int]) -> tuple[list[tuple[int, int, int, int]], int]:
        """([(tokens in, tokens out, attention MACs, MLP MACs) per layer], pooling overhead MACs) on a
        ``t x h x w`` stage-3 grid."""
        frames, height, width = grid
        dim, hidden = self.dim, self.hidden
        wt = self.time_window(frames)
        n = frames * height * width
        windows = (frames // wt) * math.prod(self.num_windows((height, width)))
        per_window = wt * self.side * self.side
        s = windows * per_window
        k1 = wt * min(self.key_window, height) * min(self.key_window, width)
        layers = [(windows * k1, s, *cross_block_macs(s, k1, dim, hidden, windows * k1)),
                  (s + n, s, *cross_block_macs(s, s + n, dim, hidden))]
        for i in range(len(self.semantic_blocks)):
            group = per_window if i % 2 == 0 else s
            layers.append((s, s, attention_macs(s, group, dim, s), mlp_macs(s, dim, hidden)))
        return layers, pooling_macs(self.pool.kind, n, dim)


def video_swin_block_macs(grid: tuple[int, int, int], window: tuple[int, int, int], dim: int, hidden: int
                          ) -> tuple[int, int]:
    """(attention, MLP) MACs of a Video Swin block on a ``t x h x w`` grid; the window shrinks to a smaller grid
    (as torchvision does) and attention runs on the grid padded to whole windows."""
    window = tuple(min(w, g) for w, g in zip(window, grid, strict=True))
    padded = math.prod(math.ceil(g / w) * w for g, w in zip(grid, window, strict=True))
    return attention_macs(padded, math.prod(window), dim, padded), mlp_macs(math.prod(grid), dim, hidden)


def video_swin_grid(model: nn.Module, clip: tuple[int, int, int]) -> tuple[int, int, int]:
    """The (t, h, w) token grid after the tubelet embedding of a ``frames x height x width`` clip."""
    patch = model.patch_embed.tuple_patch_size
    return tuple(math.ceil(c / p) for c, p in zip(clip, patch, strict=True))


def count_video_swin(model: nn.Module, clip: tuple[int, int, int], semantic: VideoWindowSemantic | None = None,
                     full_blocks: int = 0) -> tuple[list[BlockCost], int, int]:
    """(blocks, other MACs (embedding, patch merging, head), overhead MACs) of torchvision's Video Swin on a clip
    of ``(frames, height, width)``; with ``semantic``, stage 3 keeps ``full_blocks`` blocks and the semantic
    layers replace the rest."""
    grid = video_swin_grid(model, clip)
    proj = model.patch_embed.proj
    other = math.prod(grid) * proj.in_channels * math.prod(proj.kernel_size) * proj.out_channels
    other += model.head.in_features * model.head.out_features
    blocks: list[BlockCost] = []
    overhead = 0

    def add(n_in: int, n_out: int, attn: int, mlp: int) -> None:
        blocks.append(BlockCost(len(blocks), n_in, n_out, attn / 1e9, mlp / 1e9))

    for index, layer in enumerate(model.features):
        if not isinstance(layer, nn.Sequential):  # patch merging: 2 x 2 spatially
            grid = (grid[0], math.ceil(grid[1] / 2), math.ceil(grid[2] / 2))
            other += math.prod(grid) * layer.reduction.in_features * layer.reduction.out_features
            continue
        stage = list(layer)
        if semantic is not None and index == SEMANTIC_STAGE:
            stage = stage[:full_blocks]
        for block in stage:
            n = math.prod(grid)
            window = tuple(int(w) for w in block.attn.window_size)
            add(n, n, *video_swin_block_macs(grid, window, block.attn.qkv.in_features, _mlp_hidden(block)))
        if semantic is not None and index == SEMANTIC_STAGE:
            layers, overhead = semantic.macs(grid)
            for layer_macs in layers:
                add(*layer_macs)
            rows, cols = semantic.num_windows(grid[1:])
            grid = (grid[0], rows * semantic.side, cols * semantic.side)
    return blocks, other, overhead


def video_swin_flops(model: nn.Module, clip: tuple[int, int, int] = (32, 224, 224)) -> FlopsReport:
    """Analytic cost of an unreduced torchvision Video Swin on one clip of ``(frames, height, width)``."""
    blocks, other, _ = count_video_swin(model, clip)
    gmacs = other / 1e9 + sum(b.gmacs for b in blocks)
    return FlopsReport(method=None, img_size=clip[1:], gmacs=gmacs, overhead_gmacs=0.0, baseline_gmacs=gmacs,
                       embed_gmacs=0.0, head_gmacs=0.0, blocks=blocks, notes=(f"{clip[0]} frames",))


class STViTVideoSwin(nn.Module):
    """A torchvision ``SwinTransformer3d`` with STViT semantic tokens in stage 3; build it with
    :func:`build_video_swin`. Parts: ``swin`` (a copy of the host; stage 3 keeps its first ``full_blocks``
    blocks) and ``semantic`` (:class:`VideoWindowSemantic`). Input: ``B x 3 x T x H x W`` clips, as the host."""

    @on_model_device
    def __init__(self, model: nn.Module, tokens_per_window: int = 9, full_blocks: int | None = None,
                 pooling: str = "learned", global_centres: bool = True, key_window: int | None = None) -> None:
        super().__init__()
        if not is_video_swin(model):
            raise InputTypeError(f"expected a torchvision SwinTransformer3d (swin3d_t/s/b), got "
                                 f"{type(model).__name__}")
        side = check_square(tokens_per_window, "tokens_per_window")
        check_pooling(pooling)
        depth = len(_stage_blocks(model))
        full_blocks = check_full_blocks(full_blocks, depth)
        swin = copy.deepcopy(model)
        blocks = _stage_blocks(swin)
        self.semantic = VideoWindowSemantic(blocks[full_blocks:full_blocks + 2], blocks[full_blocks + 2:], side,
                                            pooling, global_centres, key_window)
        window_regions(self.semantic.window[1:], self.semantic.window[1:], side)  # a window must hold k x k
        swin.features[SEMANTIC_STAGE] = nn.Sequential(*blocks[:full_blocks])
        self.swin = swin
        self.num_classes = model.num_classes
        self.tokens_per_window, self.side, self.full_blocks, self.pooling = tokens_per_window, side, full_blocks, \
            pooling

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        """The final normed token grid, ``B x t x h x w x C`` (``t x 3 x 3`` at 224 px with k = 3)."""
        if clips.ndim != 5:
            raise InputTypeError(f"expected clips B x C x T x H x W, got shape {tuple(clips.shape)}")
        swin = self.swin
        x = swin.pos_drop(swin.patch_embed(clips))
        x = swin.features[:SEMANTIC_STAGE + 1](x)
        x = self.semantic(x)
        return swin.norm(swin.features[SEMANTIC_STAGE + 1:](x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        swin = self.swin
        return swin.head(torch.flatten(swin.avgpool(x.permute(0, 4, 1, 2, 3)), 1))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(clips))

    def tokenreduce_flops(self, img_size: int | tuple[int, int] | None = None, frames: int = 32) -> FlopsReport:
        """Analytic MACs per clip of ``frames`` frames (default 32, Video Swin's own reporting) at ``img_size``
        (default 224), with the unreduced host as baseline."""
        size = 224 if img_size is None else img_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        clip = (frames, *size)
        blocks, other, overhead = count_video_swin(self.swin, clip, self.semantic, self.full_blocks)
        baseline = _baseline_gmacs(self, clip)
        gmacs = other / 1e9 + sum(b.gmacs for b in blocks)
        notes = (f"{frames} frames; stage 3: {self.full_blocks} full blocks, 2 generation layers, "
                 f"{len(self.semantic.semantic_blocks)} semantic blocks; {self.tokens_per_window} tokens per frame "
                 f"window ({self.pooling} pooling)",)
        return FlopsReport(method="stvit-video-swin", img_size=size, gmacs=gmacs, overhead_gmacs=overhead / 1e9,
                           baseline_gmacs=baseline, embed_gmacs=0.0, head_gmacs=0.0, blocks=blocks, notes=notes)


def _baseline_gmacs(model: STViTVideoSwin, clip: tuple[int, int, int]) -> float:
    """The unreduced host's GMACs: the built model's blocks with stage 3 at full depth (every semantic-stage
    block of the host is a Video Swin block on the full grid, the same shape as the kept ones)."""
    blocks, other, _ = count_video_swin(model.swin, clip)
    grid = video_swin_grid(model.swin, clip)
    for layer in list(model.swin.features)[:SEMANTIC_STAGE]:
        if not isinstance(layer, nn.Sequential):
            grid = (grid[0], math.ceil(grid[1] / 2), math.ceil(grid[2] / 2))
    # The host's stage 3 had ``2 + len(semantic blocks)`` more blocks on this grid and its stage 4 ran on the
    # full grid, which ``count_video_swin(model.swin)`` already counts (stage 4's blocks adapt to their input).
    extra = 2 + len(model.semantic.semantic_blocks)
    per_block = sum(video_swin_block_macs(grid, model.semantic.window, model.semantic.dim, model.semantic.hidden))
    return other / 1e9 + sum(b.gmacs for b in blocks) + extra * per_block / 1e9


def build_video_swin(model: nn.Module, tokens_per_window: int = 9, full_blocks: int | None = None,
                     pooling: str = "learned", global_centres: bool = True,
                     key_window: int | None = None) -> STViTVideoSwin:
    """STViT from a torchvision Video Swin (``swin3d_t``/``swin3d_s``/``swin3d_b``); ``model`` is not changed.

    ``full_blocks`` (default two thirds of stage 3: 4 for -T, 12 for -S/-B) unchanged blocks, then 2 generation
    layers and the semantic blocks; ``key_window`` defaults to 10 for 7 x 7 windows.
    """
    return STViTVideoSwin(model, tokens_per_window, full_blocks, pooling, global_centres, key_window)


__all__ = ["STViTVideoSwin", "build_video_swin", "count_video_swin", "is_video_swin", "video_swin_flops"]
