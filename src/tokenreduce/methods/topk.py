"""Top-K pruning: keep the image tokens the CLS token attends to most (Haurum et al., 2023)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import InputError
from ..core.ops import keep_indexed
from ..core.state import TokenState
from .base import Method, Plan, check_keep_rate, check_layers, keep_count, register, resolve_r, validate_r

DEFAULT_LAYERS = (3, 6, 9)


def cls_scores(stats: dict[str, torch.Tensor], num_prefix: int) -> torch.Tensor:
    """CLS attention to each image token, mean over heads, ``B x (N - num_prefix)``."""
    return stats["cls_attn"][:, :, num_prefix:].mean(dim=1)


def cls_token_scores(stats: dict[str, torch.Tensor], num_prefix: int) -> torch.Tensor:
    """:func:`cls_scores` over all tokens, ``B x N``, the prefix tokens' +inf (always among the highest)."""
    # The image tokens' scores exactly as cls_scores (the mean over a slice; a mean over the whole row may differ
    # in the last bit), padded in front by one op.
    return F.pad(cls_scores(stats, num_prefix), (num_prefix, 0), value=math.inf)


def top_tokens(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of the ``keep`` highest ``scores`` (``B x N``, prefix +inf: :func:`cls_token_scores`) in
    their order, prefix tokens first, and of the rest in descending score order: the same tokens as
    :func:`top_image_tokens` on the image tokens, offset by the prefix, with no index arithmetic."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return order[:, :keep].sort(dim=-1).values, order[:, keep:]


def top_image_tokens(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into the image tokens) of the ``keep`` best scores in raster order, and of the rest."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return order[:, :keep].sort(dim=-1).values, order[:, keep:]


@register
class TopK(Method):
    """At the named blocks keep the ``keep_rate`` fraction (or N - r) of image tokens with the highest
    CLS attention and drop the rest; prefix tokens always stay, kept tokens stay in raster order.

    Args:
        keep_rate: fraction of image tokens kept at each reducing block, in (0, 1]. Default 0.7.
        r: instead of keep_rate, the number of image tokens dropped (int, per-block list, dict).
        layers: reducing blocks (default (3, 6, 9)).
        prop_attn: add log(size) to the logits (sizes of pruned tokens are not passed on). Default False.
    """

    name = "topk"
    search_knob = "keep_rate"

    def __init__(self, keep_rate: float | None = None, r: Any = None, layers: Any = DEFAULT_LAYERS,
                 prop_attn: bool = False) -> None:
        if keep_rate is not None and r is not None:
            raise InputError(f"{self.name}: give keep_rate or r, not both (keep_rate={keep_rate!r}, r={r!r})")
        if keep_rate is None and r is None:
            keep_rate = 0.7
        super().__init__(keep_rate=keep_rate, r=r, layers=layers, prop_attn=prop_attn)
        self.keep_rate = check_keep_rate(self.name, keep_rate) if keep_rate is not None else None
        self.r, self.layers, self.use_prop_attn = r, layers, bool(prop_attn)
        if r is not None:
            validate_r(self.name, r)

    def amounts(self, depth: int) -> list[int]:
        layers = check_layers(self.name, self.layers, depth)
        if self.r is not None:
            return resolve_r(self.name, self.r, depth, layers)
        # With a keep rate the count depends on the tokens entering the block: mark the block with -1.
        return [-1 if i in (layers or range(depth)) else 0 for i in range(depth)]

    def dropped(self, block: int, num_tokens: int, num_prefix: int, amount: int) -> int:
        image_tokens = num_tokens - num_prefix
        drop = image_tokens - keep_count(self.keep_rate, image_tokens) if amount < 0 else amount
        if drop >= image_tokens:
            raise InputError(
                f"{self.name}: block {block} would remove {drop} of its {image_tokens} image tokens "
                f"({num_tokens} tokens with {num_prefix} prefix); at least one must stay"
            )
        return drop

    def step(self, block: int, num_tokens: int, num_prefix: int, amount: int) -> tuple[int, int, str]:
        drop = self.dropped(block, num_tokens, num_prefix, amount)
        return drop, num_tokens - drop, ""

    def needs(self, block: int, plan: Plan) -> frozenset[str]:
        return frozenset({"cls_attn"}) if plan.reduces(block) else frozenset()

    def prop_attn(self, block: int) -> bool:
        return self.use_prop_attn

    def reduce(self, block: int, state: TokenState, stats: dict[str, torch.Tensor], amount: int) -> TokenState:
        scores = cls_token_scores(stats, state.num_prefix)
        keep, _ = top_tokens(scores, scores.shape[1] - amount)
        return keep_indexed(state, keep)

    def overhead_macs(self, plan: Plan, dim: int, heads: int, num_prefix: int) -> float:
        # The CLS row q_cls . K^T, computed beside the fused attention.
        return float(sum(n * dim for n, a in zip(plan.tokens_in, plan.amounts, strict=True) if a))
