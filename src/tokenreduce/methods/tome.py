"""ToMe: bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

Written from the description in ``specs/baselines.md``.

>>> import timm, tokenreduce as tr
>>> model = timm.create_model("deit_small_patch16_224", pretrained=False)
>>> tr.describe(tr.patch(model, "tome", r=13))["tokens_in"][:3]
[197, 184, 171]
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.ops import bipartite_merge, max_bipartite_r
from ..core.state import TokenState
from .base import Method, Plan, check_layers, register, resolve_r, validate_r


@register
class ToMe(Method):
    """Merge ``r`` tokens per block by bipartite soft matching of the attention keys.

    Args:
        r: tokens merged per block: an int, a per-block list, or (r, inflection).
        layers: blocks that merge (default: all).
        prop_attn: add log(size) to the attention logits (proportional attention). Default True.

    r is clamped to floor((N - num_prefix) / 2) per block, as ToMe defines it; ``describe`` lists where.
    """

    name = "tome"
    clamps = True
    #: Nothing leaves (every patch keeps its merged token's feature): the rules have nothing to do.
    default_restore = "departure"

    def __init__(self, r: Any = 8, layers: Any = None, prop_attn: bool = True) -> None:
        super().__init__(r=r, layers=layers, prop_attn=prop_attn)
        self.r, self.layers, self.use_prop_attn = r, layers, bool(prop_attn)
        validate_r(self.name, r)

    def amounts(self, depth: int) -> list[int]:
        return resolve_r(self.name, self.r, depth, check_layers(self.name, self.layers, depth))

    def step(self, block: int, num_tokens: int, num_prefix: int, amount: int) -> tuple[int, int, str]:
        limit = max_bipartite_r(num_tokens, num_prefix)
        used = min(amount, limit)
        note = f"block {block}: r={amount} clamped to {used} ({num_tokens} tokens)" if used < amount else ""
        return used, num_tokens - used, note

    def needs(self, block: int, plan: Plan) -> frozenset[str]:
        return frozenset({"metric"}) if plan.reduces(block) else frozenset()

    def prop_attn(self, block: int) -> bool:
        return self.use_prop_attn

    def reduce(self, block: int, state: TokenState, stats: dict[str, torch.Tensor], amount: int) -> TokenState:
        return bipartite_merge(state, stats["metric"], amount)

    def leaving(self, plan: Plan) -> list[int]:
        return [0] * len(plan.amounts)  # merged patches keep their merged token's feature

    def overhead_macs(self, plan: Plan, dim: int, heads: int, num_prefix: int) -> float:
        head_dim = dim // heads
        return float(sum(
            ((n + 1) // 2) * (n // 2) * head_dim
            for n, amount in zip(plan.tokens_in, plan.amounts, strict=True) if amount
        ))
