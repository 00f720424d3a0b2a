"""Spatial pooling of an image-token grid into an s x s grid of initial semantic tokens.

Regions follow torch's adaptive pooling: region i along an axis of length n covers
``[floor(i * n / s), ceil((i + 1) * n / s))``, so an evenly divisible grid gives disjoint equal regions and
``avg``/``max`` equal ``F.adaptive_avg_pool2d``/``F.adaptive_max_pool2d`` exactly. Every region is gathered into
a padded row of the largest region size and the padding is masked (zero weight for avg, -inf for max and
for the learned logits), so uneven grids need no special case.
"""

from __future__ import annotations

import math

import torch
from timm.layers import LayerNorm2d
from torch import nn

POOLINGS = ("avg", "max", "learned")


def region_index(grid: tuple[int, int], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, valid): ``index[r, k]`` is the flat token index of the k-th token of region r (row-major
    regions of an ``side x side`` split of ``grid``), padded to the largest region; ``valid`` masks padding.

    >>> idx, valid = region_index((2, 2), 2)
    >>> idx.tolist(), valid.all().item()
    ([[0], [1], [2], [3]], True)
    """
    height, width = grid
    if height < side or width < side:
        raise ValueError(f"a {height}x{width} token grid cannot be pooled into {side}x{side} semantic tokens")

    def spans(n: int) -> list[range]:
        return [range(i * n // side, math.ceil((i + 1) * n / side)) for i in range(side)]

    regions = [[r * width + c for r in rows for c in cols] for rows in spans(height) for cols in spans(width)]
    size = max(len(r) for r in regions)
    index = torch.tensor([r + [0] * (size - len(r)) for r in regions])
    valid = torch.tensor([[True] * len(r) + [False] * (size - len(r)) for r in regions])
    return index, valid


class TokenPooling(nn.Module):
    """Pools B x N x D image tokens on an h x w grid into B x side^2 x D tokens.

    ``kind``: "avg", "max", or "learned" (the paper's soft pooling: 3x3 depth-wise conv, LayerNorm, GELU,
    1x1 conv gives one logit per token, softmax within each region, weighted sum). The learned scorer's last
    conv starts at zero, so before training it is exactly average pooling.
    """

    def __init__(self, kind: str, dim: int, side: int) -> None:
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"pooling={kind!r} is not supported (choose one of {', '.join(POOLINGS)})")
        self.kind = kind
        self.side = side
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
        self._regions: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def regions(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Cached per grid: built from shapes only, so no host sync in the forward pass.
        key = (grid[0], grid[1])
        if key not in self._regions or self._regions[key][0].device != device:
            index, valid = region_index(key, self.side)
            self._regions[key] = (index.to(device), valid.to(device))
        return self._regions[key]

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, num_tokens, dim = x.shape
        if num_tokens != grid[0] * grid[1]:
            raise ValueError(f"{num_tokens} tokens do not fill a {grid[0]}x{grid[1]} grid")
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
