"""Cases worked out on paper: which tokens a method keeps, with what weights and sizes, and what the size bias
does to attention. Tiny inputs, exact expected values, behaviour through the public functions only (the method
hooks ``plan`` / ``begin`` / ``reduce``, ``core.attention.attend`` / ``attention``, ``core.ops``), so these stay
valid when the internals are rewritten for speed. Several of them kill mutants of ``make mutate`` that the rest of
the suite let through (reports/mutation/)."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import Attention

from tokenreduce.core.attention import attend, attention
from tokenreduce.core.state import TokenState
from tokenreduce.methods.base import create_method

# CLS + 4 image tokens with features easy to follow by eye.
X = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [4.0, 4.0]]], dtype=torch.float64)


def cls_stats(row: list[float], heads: int = 2) -> dict[str, torch.Tensor]:
    """``cls_attn`` of ``heads`` heads whose mean over heads is ``row`` (the heads differ, the mean is exact)."""
    row_t = torch.tensor(row, dtype=torch.float64)
    spread = torch.zeros_like(row_t)
    spread[0], spread[-1] = 0.25, -0.25  # head 0 +spread, head 1 -spread: the mean is ``row`` exactly
    return {"cls_attn": torch.stack([row_t + spread, row_t - spread]).unsqueeze(0)}


def reduce_once(name: str, row: list[float], state: TokenState, **options) -> TokenState:
    method = create_method(name, layers=None, **options)
    plan = method.plan(state.num_tokens, state.num_prefix, 1)
    state = method.begin(state, plan)
    return method.reduce(0, state, cls_stats(row), plan.amounts[0])


# --- Top-K: the most attended image tokens stay --------------------------------------------------------------

def test_topk_keeps_the_most_attended_image_tokens_in_raster_order():
    # Image scores .125 .5 .0625 .25: the two best are image tokens 1 and 3 (positions 2 and 4).
    state = TokenState(X.clone(), num_prefix=1, grid=(2, 2)).tracked()
    out = reduce_once("topk", [0.0625, 0.125, 0.5, 0.0625, 0.25], state, r=[2])
    assert out.x.tolist() == [[[9.0, 9.0], [0.0, 2.0], [4.0, 4.0]]]  # CLS, then image tokens 1, 3 in raster order
    assert out.owner.tolist() == [[-1, 1, -1, 2]]  # the patches of image tokens 0 and 2 left
    assert out.size is None  # pruning alone creates no sizes


def test_topk_keep_rate_rounds_up_and_ignores_the_prefix_scores():
    # keep_rate .5 of 4 image tokens keeps ceil(2) = 2; a huge CLS self-attention changes nothing.
    state = TokenState(X.clone(), num_prefix=1, grid=(2, 2))
    method = create_method("topk", keep_rate=0.5, layers=None)
    plan = method.plan(5, 1, 1)
    assert plan.tokens_out == (3,)
    out = method.reduce(0, state, cls_stats([100.0, 0.4, 0.1, 0.3, 0.2]), plan.amounts[0])
    assert out.x.tolist() == [[[9.0, 9.0], [1.0, 0.0], [3.0, 1.0]]]
    # keep_rate .6 of 4: ceil(2.4) = 3 kept.
    assert create_method("topk", keep_rate=0.6, layers=None).plan(5, 1, 1).tokens_out == (4,)


def test_topk_with_two_prefix_tokens_scores_only_image_tokens():
    x = torch.arange(12.0, dtype=torch.float64).view(1, 6, 2)  # 2 prefix + 4 image tokens
    state = TokenState(x.clone(), num_prefix=2, grid=(2, 2))
    method = create_method("topk", r=[3], layers=None)
    plan = method.plan(6, 2, 1)
    # The prefix columns (0.9, 0.8) would win if they were scored; image token 2 (0.3) is the best one.
    out = method.reduce(0, state, cls_stats([0.9, 0.8, 0.1, 0.2, 0.3, 0.05]), plan.amounts[0])
    assert out.x.tolist() == [[[0.0, 1.0], [2.0, 3.0], [8.0, 9.0]]]


# --- EViT: the least attended are fused, weighted by their attention, sizes added -----------------------------

def test_evit_fuses_the_least_attended_with_their_attention_as_weights_and_adds_their_sizes():
    # Image scores .125 .5 .0625 .25 -> keep image tokens 1, 3; fuse 0 (weight .125) and 2 (weight .0625).
    size = torch.tensor([[[1.0], [2.0], [1.0], [3.0], [1.0]]])  # image tokens 0 and 2 hold 2 and 3 patches
    state = TokenState(X.clone(), size=size, num_prefix=1, grid=(2, 2), owner=torch.tensor([[1, 2, 3, 4]]))
    out = reduce_once("evit", [0.0625, 0.125, 0.5, 0.0625, 0.25], state, r=[2])
    fused = [0.125 * 1.0 + 0.0625 * 3.0, 0.125 * 0.0 + 0.0625 * 1.0]  # not renormalised: weights sum to .1875
    assert out.x.tolist() == [[[9.0, 9.0], [0.0, 2.0], [4.0, 4.0], fused]]
    assert out.size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0 + 3.0]
    # The patches of the fused tokens now live in the fused token (position 3).
    assert out.owner.tolist() == [[3, 1, 3, 2]]


def test_evit_mean_fuse_renormalises_the_same_weights():
    state = TokenState(X.clone(), num_prefix=1, grid=(2, 2))
    out = reduce_once("evit", [0.0625, 0.125, 0.5, 0.0625, 0.25], state, r=[2], fuse="mean")
    # weights .125 / .1875 = 2/3 and .0625 / .1875 = 1/3
    expected = torch.tensor([2 / 3 * 1.0 + 1 / 3 * 3.0, 2 / 3 * 0.0 + 1 / 3 * 1.0], dtype=torch.float64)
    torch.testing.assert_close(out.x[0, 3], expected, rtol=1e-15, atol=0)
    assert out.size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0]


def test_evit_token_counts_drop_d_and_add_one():
    method = create_method("evit", keep_rate=0.5, layers=(0, 1))
    plan = method.plan(9, 1, 2)  # 8 image tokens: drop 4, add 1 -> 6 tokens; then 5 image: drop 2, add 1 -> 5
    assert plan.amounts == (4, 2) and plan.tokens_out == (6, 5)


# --- proportional attention: a token of size s is s identical copies of it ------------------------------------

def _qkv(seed: int = 0, tokens: int = 3, heads: int = 2, dim: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, tokens, dim, generator=g, dtype=torch.float64) for _ in range(3))


def _copies(t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Token j repeated counts[j] times (dim 2)."""
    return t.repeat_interleave(torch.tensor(counts), dim=2)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_sdpa", "full_map"])
def test_size_bias_equals_log_size_on_the_logits_and_equals_copies(fused):
    q, k, v = _qkv()
    sizes = [1, 3, 2]
    bias = torch.tensor(sizes, dtype=torch.float64).log().view(1, 1, 1, 3)
    scale = 0.5
    out, stats = attend(q, k, v, scale, bias, need=("cls_attn",), fused=fused)
    # By hand: softmax(q k^T * scale + log s) v.
    probs = ((q @ k.transpose(-2, -1)) * scale + bias).softmax(dim=-1)
    torch.testing.assert_close(out, probs @ v, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats["cls_attn"], probs[:, :, 0], rtol=0, atol=1e-12)
    # The same as keys and values repeated s times without a bias; the CLS attention to a token of size s is the
    # sum of the attention to its copies.
    out_copies, stats_copies = attend(q, _copies(k, sizes), _copies(v, sizes), scale, None, need=("cls_attn",),
                                      fused=fused)
    torch.testing.assert_close(out, out_copies, rtol=0, atol=1e-12)
    summed = torch.stack([c.sum(dim=-1) for c in stats_copies["cls_attn"].split(sizes, dim=-1)], dim=-1)
    torch.testing.assert_close(stats["cls_attn"], summed, rtol=0, atol=1e-12)
    # And it really changes the output (a bias of zeros would not).
    assert (out - attend(q, k, v, scale, None, fused=fused)[0]).abs().max() > 1e-3


def test_size_bias_in_the_full_map_statistic():
    q, k, v = _qkv(seed=1)
    bias = torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64).log().view(1, 1, 1, 3)
    out, stats = attend(q, k, v, 0.5, bias, need=("attn",))
    probs = ((q @ k.transpose(-2, -1)) * 0.5 + bias).softmax(dim=-1)
    torch.testing.assert_close(stats["attn"], probs, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, probs @ v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_sdpa", "full_map"])
def test_attention_of_a_module_with_sizes_equals_the_model_with_copies(fused):
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, qkv_bias=True).double().eval()
    attn.fused_attn = fused
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    state = TokenState(x, size=torch.tensor([[[1.0], [3.0], [2.0]]], dtype=torch.float64))
    out, stats = attention(attn, x, state.size_bias(), need=("cls_attn",))
    copies = x.repeat_interleave(torch.tensor([1, 3, 2]), dim=1)  # 6 tokens
    out_copies, stats_copies = attention(attn, copies, None, need=("cls_attn",))
    # Copies of a token have identical rows; token j's first copy sits at 0, 1, 4.
    torch.testing.assert_close(out, out_copies[:, [0, 1, 4]], rtol=0, atol=1e-12)
    cls_copies = stats_copies["cls_attn"]
    summed = torch.stack([cls_copies[..., 0], cls_copies[..., 1:4].sum(-1), cls_copies[..., 4:].sum(-1)], dim=-1)
    torch.testing.assert_close(stats["cls_attn"], summed, rtol=0, atol=1e-12)


def test_size_bias_is_log_size_per_key():
    state = TokenState(torch.zeros(1, 3, 2), size=torch.tensor([[[1.0], [4.0], [2.0]]]))
    bias = state.size_bias()
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.flatten(), torch.tensor([0.0, math.log(4.0), math.log(2.0)]))
    assert TokenState(torch.zeros(1, 3, 2)).size_bias() is None


def test_cls_attn_without_cls_is_the_mean_of_all_query_rows():
    q, k, v = _qkv(seed=2)
    _, stats = attend(q, k, v, 0.5, need=("cls_attn", "attn"), has_cls=False)
    probs = ((q @ k.transpose(-2, -1)) * 0.5).softmax(dim=-1)
    torch.testing.assert_close(stats["cls_attn"], probs.mean(dim=2), rtol=0, atol=1e-12)
    _, with_cls = attend(q, k, v, 0.5, need=("cls_attn",), has_cls=True)
    torch.testing.assert_close(with_cls["cls_attn"], probs[:, :, 0], rtol=0, atol=1e-12)


def test_metric_and_value_norm_by_hand():
    k = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[3.0, 0.0], [1.0, 0.0]]]])  # 1 x 2 heads x 2 tokens x 2
    v = torch.tensor([[[[3.0, 4.0], [0.0, 1.0]], [[0.0, 0.0], [2.0, 2.0]]]])
    _, stats = attend(k, k, v, 1.0, need=("metric", "value_norm"))
    assert stats["metric"].tolist() == [[[2.0, 1.0], [2.0, 2.0]]]  # keys averaged over the heads
    torch.testing.assert_close(stats["value_norm"], torch.tensor([[5.0, 3.0]]))  # |(3,4,0,0)|, |(0,1,2,2)|


# --- PPT: prune at or above the variance threshold, pool below it --------------------------------------------

# CLS + 2 image tokens. Heads' CLS rows sum to .5 on each image token, value norms 1 and 3: a = (.5, 1.5),
# s = (.25, .75), unbiased variance ((.25 - .5)^2 + (.75 - .5)^2) / 1 = .125, exact in float32.
PPT_STATS = {
    "cls_attn": torch.tensor([[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]]),
    "value_norm": torch.tensor([[7.0, 1.0, 3.0]]),
    "metric": torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]),
}
PPT_X = torch.tensor([[[5.0], [2.0], [4.0]]])


def ppt_reduce(threshold: float) -> tuple[TokenState, dict]:
    method = create_method("ppt", r=[1], threshold=threshold)
    plan = method.plan(3, 1, 1)
    assert plan.amounts == (1,)
    out = method.reduce(0, TokenState(PPT_X.clone(), num_prefix=1, owner=torch.tensor([[1, 2]])), PPT_STATS, 1)
    return out, method.diagnostics([out])


@pytest.mark.parametrize("threshold", [0.125 * (1 - 1e-6), 0.125], ids=["just_below", "at"])
def test_ppt_prunes_at_or_above_the_threshold(threshold):
    out, diagnostics = ppt_reduce(threshold)
    assert out.x.tolist() == [[[5.0], [4.0]]]  # image token 1 (s = .75) kept, token 0 pruned
    assert out.size.tolist() == [[[1.0], [1.0]]] and out.owner.tolist() == [[-1, 1]]
    assert diagnostics == {"pooled_share": {0: 0.0}}


def test_ppt_pools_just_above_the_threshold():
    out, diagnostics = ppt_reduce(0.125 * (1 + 1e-6))
    # Bipartite pooling: A = (CLS, image 1), B = (image 0); image 1 merges into image 0: (2 + 4) / 2, size 2.
    assert out.x.tolist() == [[[5.0], [3.0]]]
    assert out.size.tolist() == [[[1.0], [2.0]]] and out.owner.tolist() == [[1, 1]]
    assert diagnostics == {"pooled_share": {0: 1.0}}


def test_ppt_mixed_batch_decides_per_image():
    stats = {name: torch.cat([t, t]) for name, t in PPT_STATS.items()}
    stats["value_norm"][1] = torch.tensor([7.0, 1.0, 1.0])  # flat scores: variance 0 -> pools
    method = create_method("ppt", r=[1], threshold=0.1)
    out = method.reduce(0, TokenState(torch.cat([PPT_X, PPT_X]), num_prefix=1), stats, 1)
    assert out.x.tolist() == [[[5.0], [4.0]], [[5.0], [3.0]]]
    assert out.size.tolist() == [[[1.0], [1.0]], [[1.0], [2.0]]]
    assert method.diagnostics([out]) == {"pooled_share": {0: 0.5}}


def test_ppt_keeps_survivors_in_descending_score_order():
    # 4 image tokens, scores proportional to value norms 1, 4, 2, 3 -> keep the best 3 as 1, 3, 2.
    stats = {"cls_attn": torch.full((1, 1, 5), 0.2), "value_norm": torch.tensor([[1.0, 1.0, 4.0, 2.0, 3.0]])}
    x = torch.arange(5.0).view(1, 5, 1)
    out = create_method("ppt", r=[1], threshold=0.0).reduce(0, TokenState(x, num_prefix=1), stats, 1)
    assert out.x.flatten().tolist() == [0.0, 2.0, 4.0, 3.0]


# --- GTP: propagation weights on a 3 x 3 grid ------------------------------------------------------------------

# Raster order 0 1 2 / 3 4 5 / 6 7 8; 8-neighbourhood degrees: corners 3, edges 5, centre 8.
DEGREE = [3, 5, 3, 5, 8, 5, 3, 5, 3]
NEIGHBOURS = {0: {1, 3, 4}, 1: {0, 2, 3, 4, 5}, 2: {1, 4, 5}, 3: {0, 1, 4, 6, 7}, 4: set(range(9)) - {4},
              5: {1, 2, 4, 7, 8}, 6: {3, 4, 7}, 7: {3, 4, 5, 6, 8}, 8: {4, 5, 7}}


def gtp_grid_reduce(removed_scores: dict[int, float], r: int, alpha: float, token_scale: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 10, 3, generator=g, dtype=torch.float64)  # CLS + 9 image tokens
    scores = [0.5] * 10  # CLS column and every image token 0.5 except the chosen ones
    for token, score in removed_scores.items():
        scores[token + 1] = score
    method = create_method("gtp", r=[r], graph="spatial", selection="cls_attn", alpha=alpha,
                           token_scale=token_scale)
    plan = method.plan(10, 1, 1)
    state = method.begin(TokenState(x.clone(), num_prefix=1, grid=(3, 3)), plan)
    return x, method.reduce(0, state, cls_stats(scores), plan.amounts[0])


def test_gtp_propagates_the_centre_into_all_eight_neighbours_with_weight_alpha_over_sqrt_degrees():
    x, out = gtp_grid_reduce({4: 0.1}, r=1, alpha=0.3)
    kept = [0, 1, 2, 3, 5, 6, 7, 8]
    weight = torch.tensor([0.3 / math.sqrt(DEGREE[i] * 8) for i in kept], dtype=torch.float64)
    expected = x[0, 1:][kept] + weight.unsqueeze(-1) * x[0, 1 + 4]
    torch.testing.assert_close(out.x[0, 0], x[0, 0], rtol=0, atol=0)  # the CLS token receives nothing
    torch.testing.assert_close(out.x[0, 1:], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.size.flatten(), torch.cat([torch.ones(1), 1 + weight.float()]), rtol=1e-6, atol=0)


def test_gtp_two_removed_tokens_add_up_and_only_neighbours_receive():
    # Corner 0 and edge 7 go (lowest scores). Kept token j receives alpha * sum_{i in {0, 7}} A_ji / sqrt(d_j d_i).
    x, out = gtp_grid_reduce({0: 0.05, 7: 0.1}, r=2, alpha=0.5, token_scale=False)
    kept = [1, 2, 3, 4, 5, 6, 8]
    expected = []
    for j in kept:
        row = x[0, 1 + j].clone()
        for i in (0, 7):
            if i in NEIGHBOURS[j]:
                row += 0.5 / math.sqrt(DEGREE[j] * DEGREE[i]) * x[0, 1 + i]
        expected.append(row)
    torch.testing.assert_close(out.x[0, 1:], torch.stack(expected), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.x[0, 1 + kept.index(2)], x[0, 1 + 2], rtol=0, atol=0)  # no neighbour left
    assert out.size is None  # token_scale off: no sizes


def test_gtp_removes_the_lowest_scores_and_the_graph_shrinks_without_renormalising():
    from tokenreduce.methods.gtp import current_graph

    _, out = gtp_grid_reduce({4: 0.1}, r=1, alpha=0.1)
    graph = current_graph(out)  # G[K, K] of the 8 ring tokens
    kept = [0, 1, 2, 3, 5, 6, 7, 8]
    expected = torch.tensor([[1 / math.sqrt(DEGREE[a] * DEGREE[b]) if b in NEIGHBOURS[a] else 0.0 for b in kept]
                             for a in kept])
    torch.testing.assert_close(graph[0], expected, rtol=1e-6, atol=0)
