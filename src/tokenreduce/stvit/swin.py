"""STViT for timm's Swin Transformer: per-window semantic tokens in stage 3 (Chang et al., CVPR 2023).

Only the third stage (14 x 14 tokens at 224, 7 x 7 windows) changes. Its first ``full_blocks`` pre-trained
blocks run unchanged (with their shifted windows); then, in every window, the window's tokens are pooled into
k x k tokens (``tokens_per_window = k*k``, default 9) and

- generation layer 1: each window's k*k pooled queries attend to an enlarged key window around it
  (``key_window`` x ``key_window`` tokens, 10 x 10 for 7 x 7 windows, clamped inside the grid);
- generation layer 2: every semantic token (+ its global centre G) attends to [all semantic ; all image tokens];
- the stage's remaining blocks alternate attention within each window's group of k*k semantic tokens and
  across all semantic tokens. Windows are never shifted here.

All of these are the stage's pre-trained blocks (norms, qkv, projection, MLP). Semantic tokens have no
position, so they get no relative-position bias: the 7 x 7 bias tables are used only by the full blocks.
G is one k*k x C table shared by the windows (so any number of windows works).

Stage 4 needs a token grid: the semantic tokens are laid out window by window as a (rows*k) x (cols*k) grid
(6 x 6 at 224 with k = 3: window (i, j)'s k x k tokens sit at rows i*k.., columns j*k..), so Swin's patch merging
runs unchanged and stage 4 sees a 3 x 3 grid; its windows shrink to that grid (the relative-position bias is
read from the pre-trained 7 x 7 table at the offsets that exist, no interpolation). The classifier (global
average pool, norm, linear) runs unchanged.

A grid that windows do not divide (e.g. 12 x 12) is handled as Swin does: partial windows; pooling regions
cover only real tokens (the padded region slots are masked), the key windows lie inside the grid.

Cost conventions (``tokenreduce_flops``; matrix products only, like ``FlopCounterMode``): a Swin block costs
``4*Np*C^2 + 2*Np*A*C`` (qkv, projection, scores and weighted sum over its A-token window; Np counts the
padded grid, which timm really projects) ``+ 2*N*C*H`` (MLP); patch merging ``N_out*4*C_in*C_out``; patch
embedding and head as timm runs them. Generation layer 1 projects every enlarged key window separately
(``2*W*K*C^2`` for W windows of K keys: overlapping keys are projected once per window, as it runs), layer 2
projects S + N keys. The learned pooling's convolutions (``10*N*C``) are reported as overhead. Unreduced
Swin-T at 224 is 4.491 GMACs (timm quotes 4.5). With the default ``full_blocks`` (two thirds of stage 3:
4 for Swin-T, 12 for Swin-S/B) and 9 tokens per window: Swin-T 3.46 (-23%), Swin-S 6.55 (-25%),
Swin-B 11.56 (-25%): the paper's -24% / -25% / -25%.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from ..core.attention import attention
from ..core.cost import FlopsReport, SwinCounter, attention_macs, cross_block_macs, mlp_macs, pooling_macs
from ..core.errors import InputError, InputTypeError
from .model import GenerationLayer, on_model_device
from .pooling import TokenPooling, cached_index, check_pooling, check_square, window_regions

SEMANTIC_STAGE = 2  # 0-based index of Swin's third stage in ``model.layers``


def is_swin(model: nn.Module) -> bool:
    return isinstance(model, SwinTransformer)


def check_swin(model: nn.Module, tokens_per_window: int, pooling: str) -> tuple[int, int]:
    """(side of the semantic tokens in a window, blocks of the semantic stage); raises on what cannot be built."""
    if not is_swin(model):
        raise InputTypeError(f"expected a timm SwinTransformer, got {type(model).__name__}")
    if len(model.layers) <= SEMANTIC_STAGE:
        raise InputError(f"the Swin model has {len(model.layers)} stages; STViT needs a third stage")
    side = check_square(tokens_per_window, "tokens_per_window")
    check_pooling(pooling)
    return side, len(model.layers[SEMANTIC_STAGE].blocks)


def vit_block_from_swin(block: SwinTransformerBlock, init_values: float | None = None) -> Block:
    """A timm ViT ``Block`` carrying a Swin block's norms, qkv, projection and MLP (the relative-position
    table is left out), so the plain-ViT ``GenerationLayer`` can be built from it."""
    attn = block.attn
    with torch.device(block.norm1.weight.device):
        vit_block = Block(block.dim, attn.num_heads, qkv_bias=attn.qkv.bias is not None, init_values=init_values)
    if attn.qkv.out_features != 3 * block.dim:
        raise InputError(f"Swin attention width {attn.qkv.out_features // 3} != block width {block.dim}")
    vit_block.norm1, vit_block.norm2 = copy.deepcopy(block.norm1), copy.deepcopy(block.norm2)
    vit_block.attn.qkv, vit_block.attn.proj = copy.deepcopy(attn.qkv), copy.deepcopy(attn.proj)
    vit_block.attn.attn_drop, vit_block.attn.proj_drop = copy.deepcopy(attn.attn_drop), copy.deepcopy(attn.proj_drop)
    vit_block.attn.scale = attn.scale
    vit_block.mlp = copy.deepcopy(block.mlp)
    vit_block.drop_path1, vit_block.drop_path2 = copy.deepcopy(block.drop_path1), copy.deepcopy(block.drop_path2)
    return vit_block


def key_windows(grid: tuple[int, int], window: tuple[int, int], key_window: int) -> torch.Tensor:
    """(windows x K) flat indices of each window's enlarged key window: ``key_window`` rows/columns centred on
    the window, shifted to lie inside the grid (clamped to the grid when it is smaller)."""

    def starts(n: int, w: int, k: int) -> list[range]:
        k = min(k, n)
        out = []
        for lo in range(0, n, w):
            hi = min(lo + w, n)
            start = min(max(lo - (k - (hi - lo)) // 2, 0), n - k)
            out.append(range(start, start + k))
        return out

    rows_list, cols_list = starts(grid[0], window[0], key_window), starts(grid[1], window[1], key_window)
    return torch.tensor([[r * grid[1] + c for r in rows for c in cols] for rows in rows_list for cols in cols_list],
                        device="cpu")


class SemanticBlock(nn.Module):
    """A pre-trained Swin block on semantic tokens: attention within groups of ``group`` consecutive tokens
    (one window's k*k tokens) or, with ``group=None``, across all; no relative-position bias."""

    def __init__(self, block: SwinTransformerBlock, group: int | None) -> None:
        super().__init__()
        attn = block.attn
        self.group = group
        self.num_heads, self.scale, self.fused_attn = attn.num_heads, attn.scale, attn.fused_attn
        self.qkv, self.proj = copy.deepcopy(attn.qkv), copy.deepcopy(attn.proj)
        self.attn_drop, self.proj_drop = copy.deepcopy(attn.attn_drop), copy.deepcopy(attn.proj_drop)
        self.norm1, self.norm2 = copy.deepcopy(block.norm1), copy.deepcopy(block.norm2)
        self.mlp = copy.deepcopy(block.mlp)
        self.drop_path1, self.drop_path2 = copy.deepcopy(block.drop_path1), copy.deepcopy(block.drop_path2)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        if self.group is not None:
            x = x.reshape(batch * count // self.group, self.group, dim)
        return attention(self, x)[0].reshape(batch, count, x.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attend(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class WindowSemantic(nn.Module):
    """Pooling, the two generation layers and the semantic blocks of one Swin stage: B x H x W x C image
    tokens in, B x (windows * k*k) x C semantic tokens out (window-major, row-major inside a window)."""

    def __init__(self, generation_blocks: list[SwinTransformerBlock], semantic_blocks: list[SwinTransformerBlock],
                 side: int, pooling: str, global_centres: bool, key_window: int | None) -> None:
        super().__init__()
        first = generation_blocks[0]
        self.window = tuple(first.window_size)
        self.side = side
        self.key_window = key_window if key_window is not None else (10 * max(self.window)) // 7
        if isinstance(self.key_window, bool) or not isinstance(self.key_window, int) \
                or self.key_window < max(self.window):
            raise InputError(f"key_window={key_window!r} must be an integer >= the window size {max(self.window)}")
        dim = self.dim = first.dim
        self.hidden = first.mlp.fc1.out_features
        self.pool = TokenPooling(pooling, dim, side, self.window)
        self.generation = nn.ModuleList(GenerationLayer(vit_block_from_swin(b)) for b in generation_blocks)
        self.global_centres = None
        if global_centres:
            self.global_centres = nn.Parameter(torch.zeros(1, side * side, dim, device=first.norm1.weight.device))
            trunc_normal_(self.global_centres, std=0.02)
        self.semantic_blocks = nn.Sequential(*(SemanticBlock(b, side * side if i % 2 == 0 else None)
                                               for i, b in enumerate(semantic_blocks)))

    def keys(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        window, size = self.window, self.key_window
        return cached_index(("key windows", grid, window, size), device, lambda: (key_windows(grid, window, size),))[0]

    def num_windows(self, grid: tuple[int, int]) -> tuple[int, int]:
        return math.ceil(grid[0] / self.window[0]), math.ceil(grid[1] / self.window[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        tokens = x.reshape(batch, height * width, dim)
        semantic = self.pool(tokens, (height, width))
        keys = self.keys((height, width), x.device)
        windows, per_window = keys.shape[0], self.side * self.side
        context = tokens[:, keys].reshape(batch * windows, keys.shape[1], dim)
        semantic = self.generation[0](semantic.reshape(batch * windows, per_window, dim), context)
        semantic = semantic.reshape(batch, windows * per_window, dim)
        centres = None if self.global_centres is None else self.global_centres.repeat(1, windows, 1)
        semantic = self.generation[1](semantic, torch.cat([semantic, tokens], dim=1), centres)
        return self.semantic_blocks(semantic)

    def macs(self, grid: tuple[int, int]) -> tuple[list[tuple[int, int, int, int]], int]:
        """([(tokens in, tokens out, attention MACs, MLP MACs) per layer], pooling overhead MACs)."""
        dim, hidden = self.dim, self.hidden
        n = grid[0] * grid[1]
        windows = math.prod(self.num_windows(grid))
        per_window = self.side * self.side
        s = windows * per_window
        k1 = min(self.key_window, grid[0]) * min(self.key_window, grid[1])
        layers = [(windows * k1, s, *cross_block_macs(s, k1, dim, hidden, windows * k1)),
                  (s + n, s, *cross_block_macs(s, s + n, dim, hidden))]
        for block in self.semantic_blocks:
            group = s if block.group is None else block.group
            layers.append((s, s, attention_macs(s, group, dim, s), mlp_macs(s, dim, hidden)))
        return layers, pooling_macs(self.pool.kind, n, dim)


def fit_block(block: SwinTransformerBlock, feat: tuple[int, int]) -> None:
    """Set a Swin block (in place) to a new input grid. A grid smaller than the window shrinks the window to
    the grid (no shift; bias read from the pre-trained table at the existing offsets, not interpolated)."""
    window = tuple(block.window_size)
    if feat[0] >= window[0] and feat[1] >= window[1]:
        block.set_input_size(feat, window)
        return
    attn = block.attn
    old_h, old_w = attn.window_size
    new = (min(feat[0], window[0]), min(feat[1], window[1]))
    rows = torch.arange(new[0], device=attn.relative_position_index.device)
    cols = torch.arange(new[1], device=attn.relative_position_index.device)
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    index = (rel[0] + old_h - 1) * (2 * old_w - 1) + rel[1] + old_w - 1
    block.input_resolution = tuple(feat)
    block.window_size, block.shift_size = new, (0, 0)
    block.window_area = attn.window_area = new[0] * new[1]
    attn.window_size = new
    attn.relative_position_index = index
    block._init_buffers()


def swin_baseline_gmacs(model: SwinTransformer) -> float:
    """Unreduced analytic GMACs of a timm Swin at its own image size (conventions in the module docstring)."""
    return SwinCounter(model).stages().gmacs


def check_full_blocks(full_blocks: int | None, depth: int) -> int:
    """The full blocks kept before the semantic tokens in a stage of ``depth`` blocks (None: two thirds), checked:
    two blocks must remain for the generation layers."""
    if full_blocks is None:
        return 2 * depth // 3
    if isinstance(full_blocks, bool) or not isinstance(full_blocks, int) or not 0 <= full_blocks <= depth - 2:
        raise InputError(f"full_blocks={full_blocks!r} must be an integer in [0, {depth - 2}] (stage 3 has "
                         f"{depth} blocks, 2 of them become generation layers)")
    return full_blocks


def check_img_size(model: SwinTransformer, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
    own = tuple(model.patch_embed.img_size)
    if img_size is not None and tuple(img_size if isinstance(img_size, tuple | list) else (img_size,) * 2) != own:
        raise InputError(f"img_size={img_size!r}: this Swin model was built for {own[0]}x{own[1]} images")
    return own


class SwinHosted(nn.Module):
    """What the Swin builds share: a copy of the host (``swin``) and its unreduced cost, the host's stages up to
    the semantic stage, its later stages and its head."""

    swin: nn.Module

    def host(self, model: SwinTransformer) -> SwinTransformer:
        """A copy of ``model`` for the build to take apart and keep as ``swin``; keeps the host's unreduced cost."""
        self.baseline_gmacs = swin_baseline_gmacs(model)
        self.num_classes = model.num_classes
        return copy.deepcopy(model)

    def semantic_stage_input(self, images: torch.Tensor) -> torch.Tensor:
        """The tokens entering the semantic stage's blocks, after its patch merging (B x h x w x C)."""
        swin = self.swin
        x = swin.layers[:SEMANTIC_STAGE](swin.patch_embed(images))
        return swin.layers[SEMANTIC_STAGE].downsample(x)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The host's later stages and final norm."""
        return self.swin.norm(self.swin.layers[SEMANTIC_STAGE + 1:](x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.swin.forward_head(x, pre_logits=pre_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def count(self, img_size: int | tuple[int, int] | None,
              after_semantic_blocks: Callable[[SwinCounter, tuple[int, int]], tuple[tuple[int, int] | None, int]]
              ) -> tuple[SwinCounter, tuple[int, int], int]:
        """(counter, image size, overhead MACs): every stage counted; ``after_semantic_blocks(counter, grid)``
        counts what the build adds after the semantic stage's remaining blocks and returns (the grid the next
        stage starts from or None, its overhead MACs)."""
        img = check_img_size(self.swin, img_size)
        counter, overhead = SwinCounter(self.swin), 0

        def at_stage(index: int, grid: tuple[int, int]) -> tuple[int, int] | None:
            nonlocal overhead
            if index != SEMANTIC_STAGE:
                return None
            grid, overhead = after_semantic_blocks(counter, grid)
            return grid

        return counter.stages(at_stage), img, overhead


class STViTSwin(SwinHosted):
    """A timm ``SwinTransformer`` with STViT semantic tokens in stage 3; build it with :func:`build_swin`.

    Parts: ``swin`` (a copy of the host; stage 3 keeps its first ``full_blocks`` blocks, later stages are
    fitted to the semantic grid) and ``semantic`` (:class:`WindowSemantic`).
    """

    @on_model_device
    def __init__(self, model: SwinTransformer, tokens_per_window: int = 9, full_blocks: int | None = None,
                 pooling: str = "learned", global_centres: bool = True, key_window: int | None = None) -> None:
        super().__init__()
        side, depth = check_swin(model, tokens_per_window, pooling)
        full_blocks = check_full_blocks(full_blocks, depth)
        swin = self.host(model)
        blocks = list(swin.layers[SEMANTIC_STAGE].blocks)
        grid = tuple(blocks[0].input_resolution)
        self.semantic = WindowSemantic(blocks[full_blocks:full_blocks + 2], blocks[full_blocks + 2:], side, pooling,
                                       global_centres, key_window)
        window_regions(grid, self.semantic.window, side)  # raises early if a window cannot hold k x k tokens
        swin.layers[SEMANTIC_STAGE].blocks = nn.Sequential(*blocks[:full_blocks])
        rows, cols = self.semantic.num_windows(grid)
        feat = (rows * side, cols * side)
        for later in swin.layers[SEMANTIC_STAGE + 1:]:
            if isinstance(later.downsample, PatchMerging):
                feat = (math.ceil(feat[0] / 2), math.ceil(feat[1] / 2))
            for block in later.blocks:
                fit_block(block, feat)
        self.swin = swin
        self.tokens_per_window, self.side = tokens_per_window, side
        self.full_blocks, self.pooling = full_blocks, pooling
        self.semantic_grid = (rows * side, cols * side)

    def to_grid(self, semantic: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """B x (windows*k*k) x C -> B x (rows*k) x (cols*k) x C, each window's k x k block in its place."""
        rows, cols = self.semantic.num_windows(grid)
        batch, _, dim = semantic.shape
        x = semantic.reshape(batch, rows, cols, self.side, self.side, dim).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(batch, rows * self.side, cols * self.side, dim)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The final normed token grid, B x h x w x C (3 x 3 at 224 with k = 3)."""
        x = self.swin.layers[SEMANTIC_STAGE].blocks(self.semantic_stage_input(images))
        return self.finish(self.to_grid(self.semantic(x), tuple(x.shape[1:3])))

    def tokenreduce_flops(self, img_size: int | tuple[int, int] | None = None) -> FlopsReport:
        """Analytic MACs per image at the model's own image size (conventions in the module docstring)."""

        def semantic(counter: SwinCounter, grid: tuple[int, int]) -> tuple[tuple[int, int], int]:
            layers, overhead = self.semantic.macs(grid)
            for layer in layers:
                counter.add(*layer)
            return self.semantic_grid, overhead  # later stages run on the semantic grid

        counter, img, overhead = self.count(img_size, semantic)
        notes = (f"stage 3: {self.full_blocks} full blocks, 2 generation layers, "
                 f"{len(self.semantic.semantic_blocks)} semantic blocks; {self.tokens_per_window} tokens per "
                 f"window ({self.pooling} pooling); stage 4 on a {self.semantic_grid[0]}x{self.semantic_grid[1]} "
                 "semantic grid",)
        return counter.report("stvit-swin", img, self.baseline_gmacs, overhead, notes)


def build_swin(model: SwinTransformer, tokens_per_window: int = 9, full_blocks: int | None = None,
               pooling: str = "learned", global_centres: bool = True, key_window: int | None = None) -> STViTSwin:
    """STViT from a (pre-trained) timm ``SwinTransformer``; ``model`` itself is not changed.

    ``full_blocks`` (default two thirds of stage 3) unchanged blocks, then 2 generation layers and the
    semantic blocks; ``key_window`` defaults to 10 for 7 x 7 windows.

    >>> import timm, torch, tokenreduce as tr
    >>> from tokenreduce import stvit
    >>> with torch.device("meta"):
    ...     swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    ...     report = tr.flops(stvit.build(swin, tokens_per_window=9))
    >>> round(report.gmacs, 2), round(report.baseline_gmacs, 2)
    (3.46, 4.49)
    """
    return STViTSwin(model, tokens_per_window, full_blocks, pooling, global_centres, key_window)
