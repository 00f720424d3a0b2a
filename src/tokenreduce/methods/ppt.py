"""PPT: adaptive token Pruning and Pooling (Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision
Transformers", arXiv 2310.01812).

Written from ``specs/ppt.md``. At each reducing block every image removes exactly ``r`` tokens, either by
pruning its least important ones (when its importance scores are peaked) or by ToMe's bipartite pooling
(when they are flat). No new parameters; works off the shelf.

>>> import timm, tokenreduce as tr
>>> model = timm.create_model("deit_small_patch16_224", pretrained=False)
>>> tr.describe(tr.patch(model, "ppt", r=50, layers=(3, 6, 9)))["tokens_out"][9]
49
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import InputError
from ..core.ops import bipartite_merge, keep_indexed, max_bipartite_r
from ..core.precision import at_least_float32
from ..core.state import TokenState
from .base import Method, Plan, check_layers, register, resolve_r, validate_r

DEFAULT_LAYERS = (3, 6, 9)
#: The authors' off-the-shelf DeiT threshold on the variance of the normalised scores (6e-5 fine-tuned).
DEFAULT_THRESHOLD = 7e-5
#: ``state.extras`` key prefix of a reducing block's per-image policy (``B`` bool, True = pooled).
POLICY_KEY = "ppt.pooled."


def importance_scores(stats: dict[str, torch.Tensor], num_prefix: int) -> torch.Tensor:
    """ATS-style importance of every image token, normalised to sum to 1 per image, ``B x M`` (float32).

    ``a_j = (sum over heads of the CLS attention to j) * ||v_j||``, ``s_j = a_j / sum_i a_i``. Computed in
    float32 so that the variance test means the same under bfloat16 / float16 features.
    """
    cls_attn = at_least_float32(stats["cls_attn"][:, :, num_prefix:]).sum(dim=1)
    weighted = cls_attn * at_least_float32(stats["value_norm"][:, num_prefix:])
    return weighted / weighted.sum(dim=-1, keepdim=True)


def prune_lowest(state: TokenState, scores: torch.Tensor, amount: int) -> TokenState:
    """PPT's pruning branch: keep the image tokens with the ``M - amount`` highest ``scores`` (``B x M``), stored
    after the prefix tokens in descending score order, with their sizes."""
    num_prefix = state.num_prefix
    if num_prefix:  # prefix scores +inf in front: the order's indices are token indices, the prefix first
        scores = F.pad(scores, (num_prefix, 0), value=math.inf)
    order = scores.argsort(dim=-1, descending=True, stable=True)[:, : scores.shape[1] - amount]
    return keep_indexed(state, order)


def with_policy(state: TokenState, block: int, pooled: torch.Tensor) -> TokenState:
    """``state`` with block ``block``'s per-image policy (``B`` bool, True = pooled) in its extras."""
    return state.replace(extras={**state.extras, f"{POLICY_KEY}{block}": pooled})  # bool: never a gradient


@register
class PPT(Method):
    """Per image and per reducing block, prune (peaked importance) or pool (flat importance) ``r`` tokens.

    Args:
        r: tokens removed per reducing block: an int (at every block of ``layers``), a per-block list or a
            dict ``{block: r}`` (a per-block ``r`` names its blocks itself: give no ``layers`` with it).
            Default 50 (the DeiT-S setting, 4.6 -> 2.9 GMACs).
        layers: the reducing blocks of an int ``r``, 0-based. Default None: (3, 6, 9), the DeiT setting.
        threshold: variance threshold of the normalised importance scores. Default 7e-5 (the authors'
            off-the-shelf DeiT value; 6e-5 after fine-tuning). 0 always prunes and ``math.inf`` always pools
            (only that branch is computed).
        prop_attn: add log(size) to the key logits of every attention once sizes exist. Default True.
            Sizes are tracked (and merges size-weighted) either way.

    At a reducing block, from that block's attention (post-softmax, after the size bias), each image token j
    gets ``s_j = a_j / sum_i a_i`` with ``a_j = (sum over heads of the CLS attention to j) * ||v_j||`` (for a
    model without a CLS token, the attention averaged over all queries stands in for the CLS row). If the
    unbiased variance of an image's ``s`` is at least ``threshold`` the image PRUNES: it keeps its
    ``M - r`` highest-scoring image tokens (M image tokens entering), stored in descending score order after
    the prefix tokens, with their sizes. Otherwise it POOLS with ToMe's bipartite soft matching
    (``core.ops.bipartite_merge``). Both remove exactly ``r`` tokens, so the cost does not depend on the
    policy; a mixed batch computes both and selects per image, without host syncs. Prefix tokens (CLS,
    distillation, registers) are never removed or merged.

    ``r`` is clamped to ``floor((N - num_prefix) / 2)`` at a block entered by N tokens (the most one
    bipartite merge can remove; the paper's ``floor((N - 1) / 2)`` with the CLS token as the only prefix),
    so DeiT-S at r=50 goes 197 -> 147 -> 97 -> 49; ``describe`` notes the clamp.

    How the threshold scales: the scores of M image tokens average 1/M, so a variance threshold t is a
    threshold on the coefficient of variation ``std(s) / mean(s) >= sqrt(t) * M`` (M = N - 1 with CLS only).
    The same t therefore asks for a more peaked image at a block with more tokens: at 7e-5, DeiT-S needs a
    coefficient of variation of 1.64 at block 3 (196 image tokens) but 0.80 at block 9 (96). Re-tune the
    threshold whenever r, the layers or the input resolution change.

    Diagnostics: each reducing block puts its per-image policy (True = pooled) in the token state's
    ``extras``; ``tr.diagnostics(model, images)`` reads them as ``{"pooled_share": {block: share}}``.

    >>> import timm, torch, tokenreduce as tr
    >>> model = timm.create_model("deit_small_patch16_224", pretrained=False, depth=4, img_size=64).eval()
    >>> tr.diagnostics(tr.patch(model, "ppt", r=4, layers=(1, 3), threshold=0.0), torch.randn(2, 3, 64, 64))
    {'pooled_share': {1: 0.0, 3: 0.0}}
    """

    name = "ppt"
    clamps = True

    def __init__(self, r: Any = 50, layers: Any = None, threshold: float = DEFAULT_THRESHOLD,
                 prop_attn: bool = True) -> None:
        per_block = isinstance(r, dict | list) or (isinstance(r, tuple) and len(r) != 2)
        if per_block and layers is not None:
            raise InputError(f"{self.name}: r={r!r} names its blocks itself; give layers={layers!r} only with "
                             f"an int r")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or math.isnan(threshold) \
                or threshold < 0:
            raise InputError(f"{self.name}: threshold must be a non-negative number, got {threshold!r}")
        super().__init__(r=r, layers=layers, threshold=threshold, prop_attn=prop_attn)
        self.r, self.layers, self.threshold = r, layers, float(threshold)
        self.use_prop_attn, self.per_block = bool(prop_attn), per_block
        validate_r(self.name, r)

    # --- diagnostics: read from the traced states, never from the module ---------------------------
    def diagnostics(self, states: list[TokenState]) -> dict[str, Any]:
        """``{"pooled_share": {block: share of the images that pooled}}`` of one traced forward pass."""
        extras = states[-1].extras if states else {}
        shares = {int(key.rsplit(".", 1)[1]): float(value.float().mean())
                  for key, value in extras.items() if key.startswith(POLICY_KEY)}
        return {"pooled_share": dict(sorted(shares.items()))} if shares else {}

    # --- schedule ---------------------------------------------------------------------------------
    def amounts(self, depth: int) -> list[int]:
        layers = None if self.per_block else DEFAULT_LAYERS if self.layers is None else self.layers
        return resolve_r(self.name, self.r, depth, check_layers(self.name, layers, depth))

    def step(self, block: int, num_tokens: int, num_prefix: int, amount: int) -> tuple[int, int, str]:
        limit = max_bipartite_r(num_tokens, num_prefix)
        used = min(amount, limit)
        note = (f"block {block}: r={amount} clamped to {used} = floor(({num_tokens} tokens - {num_prefix} "
                f"prefix) / 2)") if used < amount else ""
        return used, num_tokens - used, note

    # --- forward ----------------------------------------------------------------------------------
    def needs(self, block: int, plan: Plan) -> frozenset[str]:
        if not plan.reduces(block):
            return frozenset()
        if self.threshold == math.inf:  # every image pools: the scores are not needed
            return frozenset({"metric"})
        if self.threshold == 0.0:  # every image prunes: the merge metric is not needed
            return frozenset({"cls_attn", "value_norm"})
        return frozenset({"cls_attn", "value_norm", "metric"})

    def prop_attn(self, block: int) -> bool:
        # No bias is added while sizes are None, i.e. before the first reducing block.
        return self.use_prop_attn

    def reduce(self, block: int, state: TokenState, stats: dict[str, torch.Tensor], amount: int) -> TokenState:
        num_prefix, batch = state.num_prefix, state.x.shape[0]
        # Sizes start at 1 here; both branches must carry a real size tensor to be selected per image.
        state = state.replace(size=state.sizes())
        # A threshold of 0 or inf fixes the policy without looking at the data (a variance is never negative).
        if self.threshold == math.inf:
            return with_policy(bipartite_merge(state, stats["metric"], amount), block,
                               torch.ones(batch, dtype=torch.bool, device=state.x.device))
        scores = importance_scores(stats, num_prefix)
        if self.threshold == 0.0:
            return with_policy(prune_lowest(state, scores, amount), block,
                               torch.zeros(batch, dtype=torch.bool, device=state.x.device))
        # B; unbiased variance (an empty batch has none to take: torch warns on it)
        pool = scores.var(dim=-1) < self.threshold if batch else scores.new_zeros(0, dtype=torch.bool)
        if pool.device.type == "cpu" and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            # On CPU the policy is read for free (no device to wait for): when every image of the batch agrees,
            # only its branch runs (batch 1 always). Compiled, traced or on an accelerator, both branches run for
            # the whole batch and torch.where picks per image, without a host sync.
            pooling = int(pool.sum()) if batch != 1 else int(pool)  # one op fewer for one image
            if pooling in (0, batch):
                chosen = bipartite_merge(state, stats["metric"], amount) if pooling else \
                    prune_lowest(state, scores, amount)
                return with_policy(chosen, block, pool)
        pruned = prune_lowest(state, scores, amount)
        pooled = bipartite_merge(state, stats["metric"], amount)

        def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else torch.where(pool.view(-1, *[1] * (a.ndim - 1)), a, b)

        pooled_weights, pruned_weights = pooled.left_weights, pruned.left_weights
        if (pooled_weights is None) != (pruned_weights is None):  # only the pruning branch has left patches yet
            pooled_weights = torch.zeros_like(pruned_weights) if pooled_weights is None else pooled_weights
            pruned_weights = torch.zeros_like(pooled_weights) if pruned_weights is None else pruned_weights
        chosen = state.replace(x=pick(pooled.x, pruned.x), size=pick(pooled.size, pruned.size),
                               owner=pick(pooled.owner, pruned.owner), left=pick(pooled.left, pruned.left),
                               left_x=pick(pooled.left_x, pruned.left_x),
                               left_weights=pick(pooled_weights, pruned_weights))
        return with_policy(chosen, block, pool)

    # --- cost -------------------------------------------------------------------------------------
    def leaving(self, plan: Plan) -> list[int]:
        # Images that prune let r tokens go, images that pool merge them; a mixed batch runs both branches.
        return [0] * len(plan.amounts) if self.threshold == math.inf else list(plan.amounts)

    def overhead_macs(self, plan: Plan, dim: int, heads: int, num_prefix: int) -> float:
        # Per reducing block entered by n tokens: the CLS row q_cls . K^T (n * D) for the scores and the
        # bipartite similarity (ceil(n/2) * floor(n/2) * head_dim), each unless the threshold makes it idle.
        head_dim = dim // heads
        score_row = self.threshold != math.inf
        similarity = self.threshold != 0.0
        return float(sum(
            score_row * n * dim + similarity * ((n + 1) // 2) * (n // 2) * head_dim
            for n, amount in zip(plan.tokens_in, plan.amounts, strict=True) if amount
        ))
