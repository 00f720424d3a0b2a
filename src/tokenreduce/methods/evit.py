"""EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022): keep the attentive tokens and
fuse the inattentive ones into one token, their sum weighted by their CLS attention (``specs/baselines.md``)."""

from __future__ import annotations

import torch

from ..core.attention import as_dtype
from ..core.errors import InputError
from ..core.ops import gather_tokens, keep_indexed
from ..core.restore import append_weights
from ..core.state import TokenState
from .base import register
from .topk import DEFAULT_LAYERS, TopK, cls_token_scores, top_tokens

#: How the dropped tokens are fused: EViT's attention-weighted sum, or the renormalised weighted average.
FUSE_MODES = ("sum", "mean")


@register
class EViT(TopK):
    """Top-K pruning whose dropped tokens are fused into one new token appended after the kept ones.

    Args:
        keep_rate: fraction of image tokens kept at each reducing block, in (0, 1]. Default 0.7.
        r: instead of keep_rate, the number of image tokens dropped per block.
        layers: reducing blocks (default (3, 6, 9), the DeiT setting).
        prop_attn: add log(size) to the logits; the fused token's size is the sum of what it holds.
        fuse: "sum" (default, EViT's definition and public code): ``x_fused = sum_i a_i x_i`` over the dropped
            tokens, ``a_i`` their CLS attention (mean over heads), not renormalised, so the fused token is as
            small as the attention share the dropped tokens had; "mean": the weights renormalised to sum to 1
            (a weighted average; not EViT).

    In later reducing blocks the fused token is an ordinary image token: it can be kept, or dropped and fused
    again. A block drops ``d`` tokens and adds one, so it shrinks the sequence by ``d - 1``; it must drop at least
    two tokens to shrink it at all.
    """

    name = "evit"

    def __init__(self, keep_rate: float | None = None, r=None, layers=DEFAULT_LAYERS,
                 prop_attn: bool = False, fuse: str = "sum") -> None:
        if fuse not in FUSE_MODES:
            raise InputError(f"{self.name}: unknown fuse {fuse!r}; valid: {', '.join(FUSE_MODES)}")
        super().__init__(keep_rate=keep_rate, r=r, layers=layers, prop_attn=prop_attn)
        self.options["fuse"] = self.fuse = fuse

    def step(self, block: int, num_tokens: int, num_prefix: int, amount: int) -> tuple[int, int, str]:
        drop = self.dropped(block, num_tokens, num_prefix, amount)
        return drop, (num_tokens - drop + 1 if drop else num_tokens), ""

    def reduce(self, block: int, state: TokenState, stats: dict[str, torch.Tensor], amount: int) -> TokenState:
        scores = cls_token_scores(stats, state.num_prefix)
        keep, drop = top_tokens(scores, scores.shape[1] - amount)  # token indices, prefix kept first
        weight = scores.gather(1, drop).unsqueeze(-1)
        if self.fuse == "mean":
            weight = weight / weight.sum(dim=1, keepdim=True)
        fused_x = (gather_tokens(state.x, drop) * as_dtype(weight, state.x.dtype)).sum(dim=1, keepdim=True)
        sizes = state.sizes()
        fused_size = gather_tokens(sizes, drop).sum(dim=1, keepdim=True)

        kept = keep_indexed(state.replace(size=sizes), keep)
        fused_pos = kept.x.shape[1]
        owner = kept.owner
        if owner is not None:
            # Patches held by dropped tokens now live in the fused token (for pictures; for dense output they
            # keep the feature they had here, recorded by keep_tokens).
            owner = torch.where((owner < 0) & (state.owner >= 0), torch.full_like(owner, fused_pos), owner)
        return kept.replace(
            x=torch.cat([kept.x, fused_x], dim=1),
            size=torch.cat([kept.size, fused_size], dim=1),
            owner=owner,
            left_weights=append_weights(kept.left_weights),
        )
