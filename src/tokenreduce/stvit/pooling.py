"""Spatial pooling of an image-token grid into an s x s grid of initial semantic tokens (per window for Swin).

Regions follow torch's adaptive pooling: region i along an axis of length n covers
``[floor(i * n / s), ceil((i + 1) * n / s))``, so an evenly divisible grid gives disjoint equal regions and
``avg``/``max`` equal ``F.adaptive_avg_pool2d``/``F.adaptive_max_pool2d`` exactly. Every region is gathered into
a padded row of the largest region size and the padding is masked (zero weight for avg, -inf for max and
for the learned logits), so uneven grids need no special case.

Index tables are built from shapes only (no host sync in the forward pass) and kept in one module-level cache
(:func:`cached_index`), never on a module: bounded, per device, and built outside inference mode, so a table
first made under ``torch.inference_mode()`` also serves a forward pass that trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from timm.layers import LayerNorm2d
from torch import nn

from ..core.errors import InputError

POOLINGS = ("avg", "max", "learned")
#: Index tables kept at most (one per grid, window and device in use); the cache is cleared beyond this.
MAX_CACHED_INDEX = 32
_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, ...]] = {}


def cached_index(key: tuple, device: torch.device, build: Callable[[], tuple[torch.Tensor, ...]]
                 ) -> tuple[torch.Tensor, ...]:
    """The tensors ``build()`` returns (built on the host, moved to ``device``), cached per ``(key, device)``.
    Traced by ``torch.compile`` on a cold cache, they become constants of the graph and are not cached."""
    if torch.compiler.is_compiling():
        return tuple(t.to(device) for t in build())
    full_key = (*key, torch.device(device))
    tables = _INDEX_CACHE.get(full_key)
    if tables is None:
        if len(_INDEX_CACHE) >= MAX_CACHED_INDEX:
            _INDEX_CACHE.clear()
        with torch.inference_mode(False), torch.device("cpu"):
            tables = tuple(t.to(device) for t in build())
        _INDEX_CACHE[full_key] = tables
    return tables


def check_square(value: int, name: str) -> int:
    """The side of ``value`` semantic tokens laid out as a square; a ValueError naming ``name`` otherwise."""
    side = math.isqrt(value) if isinstance(value, int) and value > 0 else 0
    if isinstance(value, bool) or side == 0 or side * side != value:
        raise InputError(f"{name}={value!r} must be a positive square (4, 9, 16, ...)")
    return side


def check_pooling(kind: str) -> None:
    if kind not in POOLINGS:
        raise InputError(f"pooling={kind!r} is not supported (choose one of {', '.join(POOLINGS)})")


def region_index(grid: tuple[int, int], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, valid): ``index[r, k]`` is the flat token index of the k-th token of region r (row-major
    regions of an ``side x side`` split of ``grid``), padded to the largest region; ``valid`` masks padding.

    >>> idx, valid = region_index((2, 2), 2)
    >>> idx.tolist(), valid.all().item()
    ([[0], [1], [2], [3]], True)
    """
    return _padded(_regions(grid, side))


def _regions(grid: tuple[int, int], side: int) -> list[list[int]]:
    height, width = grid
    if height < side or width < side:
        raise InputError(f"a {height}x{width} token grid cannot be pooled into {side}x{side} semantic tokens")

    def spans(n: int) -> list[range]:
        return [range(i * n // side, math.ceil((i + 1) * n / side)) for i in range(side)]

    return [[r * width + c for r in rows for c in cols] for rows in spans(height) for cols in spans(width)]


def _padded(regions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    size = max(len(r) for r in regions)
    index = torch.tensor([r + [0] * (size - len(r)) for r in regions], device="cpu")
    valid = torch.tensor([[True] * len(r) + [False] * (size - len(r)) for r in regions], device="cpu")
    return index, valid


def window_spans(grid: tuple[int, int], window: tuple[int, int]) -> list[tuple[range, range]]:
    """Row-major windows of ``grid``, cropped to it (the last row/column of windows may be partial)."""
    rows = [range(r, min(r + window[0], grid[0])) for r in range(0, grid[0], window[0])]
    cols = [range(c, min(c + window[1], grid[1])) for c in range(0, grid[1], window[1])]
    return [(r, c) for r in rows for c in cols]


def window_regions(grid: tuple[int, int], window: tuple[int, int], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, valid) like :func:`region_index` but per window: region ``w*side^2 + r`` is region r of an
    ``side x side`` split of window w; indices are flat positions in ``grid``, padding masked by ``valid``."""
    regions = []
    for rows, cols in window_spans(grid, window):
        if len(rows) < side or len(cols) < side:
            raise InputError(f"a {len(rows)}x{len(cols)} window of the {grid[0]}x{grid[1]} grid cannot hold "
                             f"{side}x{side} semantic tokens")
        regions += [[(rows[0] + i // len(cols)) * grid[1] + cols[0] + i % len(cols) for i in region]
                    for region in _regions((len(rows), len(cols)), side)]
    return _padded(regions)


class TokenPooling(nn.Module):
    """Pools B x N x D image tokens on an h x w grid into B x side^2 x D tokens; with a ``window``, every window
    of the grid into side^2 tokens (B x windows*side^2 x D, window-major: Swin).

    ``kind``: "avg", "max", or "learned" (the paper's soft pooling: 3x3 depth-wise conv, LayerNorm, GELU,
    1x1 conv gives one logit per token, softmax within each region, weighted sum). The learned scorer's last
    conv starts at zero, so before training it is exactly average pooling.
    """

    def __init__(self, kind: str, dim: int, side: int, window: tuple[int, int] | None = None) -> None:
        super().__init__()
        check_pooling(kind)
        self.kind = kind
        self.side = side
        self.window = None if window is None else tuple(window)
        self.scorer = None
        if kind == "learned":
            self.scorer = nn.Sequential(
                nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
                LayerNorm2d(dim),
                nn.GELU(),
                nn.Conv2d(dim, 1, 1),
            )
            nn.init.zeros_(self.scorer[-1].weight)
            nn.init.zeros_(self.scorer[-1].bias)

    def regions(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        grid, side, window = (int(grid[0]), int(grid[1])), self.side, self.window
        if window is None:
            return cached_index(("regions", grid, side), device, lambda: region_index(grid, side))
        return cached_index(("window regions", grid, window, side), device,
                            lambda: window_regions(grid, window, side))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, num_tokens, dim = x.shape
        if num_tokens != grid[0] * grid[1]:
            raise InputError(f"{num_tokens} tokens do not fill a {grid[0]}x{grid[1]} grid")
        index, valid = self.regions(grid, x.device)
        grouped = x[:, index]  # B x R x K x D
        if self.kind == "max":
            return grouped.masked_fill(~valid[None, :, :, None], float("-inf")).amax(dim=2)
        if self.kind == "avg":
            weight = valid.to(x.dtype) / valid.sum(dim=1, keepdim=True)
            return torch.einsum("brkd,rk->brd", grouped, weight)
        image = x.transpose(1, 2).reshape(batch, dim, grid[0], grid[1])
        logits = self.scorer(image).flatten(1)[:, index]  # B x R x K
        weight = logits.masked_fill(~valid[None], float("-inf")).softmax(dim=-1)
        return torch.einsum("brkd,brk->brd", grouped, weight)
