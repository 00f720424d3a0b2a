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


# --- the cost table: formulas and reports by hand ---------------------------------------------------------------

def test_cost_formulas_by_hand():
    from tokenreduce.core import cost

    assert cost.attention_macs(3, 5, 4) == 2 * 3 * 16 + 2 * 5 * 16 + 2 * 3 * 5 * 4  # q/out, k/v, scores/sum
    assert cost.attention_macs(3, 5, 4, projected=7) == 2 * 3 * 16 + 2 * 7 * 16 + 2 * 3 * 5 * 4
    assert cost.mlp_macs(3, 4, 10) == 2 * 3 * 4 * 10
    assert cost.block_macs(5, 3, 4, 10) == (cost.attention_macs(5, 5, 4), 2 * 3 * 4 * 10)  # MLP after reduction
    assert cost.cross_block_macs(3, 5, 4, 10) == (cost.attention_macs(3, 5, 4), 2 * 3 * 4 * 10)
    assert cost.cross_block_macs(3, 5, 4, 10, projected=2) == (2 * 3 * 16 + 2 * 2 * 16 + 2 * 3 * 5 * 4, 240)
    # A 7 x 5 grid in 4 x 4 windows is padded to 8 x 8 = 64 tokens for the attention; the MLP runs on 35.
    assert cost.swin_block_macs((7, 5), (4, 4), 4, 10) == (2 * 64 * 16 + 2 * 64 * 16 + 2 * 64 * 16 * 4,
                                                          2 * 35 * 4 * 10)
    assert cost.swin_block_macs((3, 6), (3, 2), 4, 10)[0] == cost.attention_macs(18, 6, 4, 18)  # no padding
    assert cost.pooling_macs("learned", 6, 4) == 10 * 6 * 4
    assert cost.pooling_macs("average", 6, 4) == cost.pooling_macs("max", 6, 4) == 0


INFO_KW = dict(depth=2, dim=4, heads=2, mlp_hidden=8, num_prefix=1, has_cls=True, patch_size=(2, 3), in_chans=3,
               grid=(2, 3), head_macs=40)


def test_model_info_and_unreduced_report_by_hand():
    from tokenreduce.core.cost import ModelInfo, analytic_flops

    info = ModelInfo(**INFO_KW)
    assert (info.num_patches, info.num_tokens) == (6, 7)
    report = analytic_flops(info, None)
    embed = 6 * 3 * 2 * 3 * 4  # patches * (C p_h p_w) * D
    block = (2 * 7 * 16 * 2 + 2 * 7 * 7 * 4) + 2 * 7 * 4 * 8
    assert report.method is None and report.img_size == (4, 9) and report.notes == ()
    assert report.embed_gmacs * 1e9 == pytest.approx(embed) and report.head_gmacs * 1e9 == pytest.approx(40)
    assert report.gmacs * 1e9 == pytest.approx(embed + 40 + 2 * block)
    assert report.baseline_gmacs == report.gmacs and report.overhead_gmacs == 0 and report.ratio == 1
    assert [(b.index, b.tokens_in, b.tokens_out) for b in report.blocks] == [(0, 7, 7), (1, 7, 7)]
    assert report.blocks[1].gmacs * 1e9 == pytest.approx(block)


def test_reduced_report_and_its_dict_and_text():
    from tokenreduce.core.cost import ModelInfo, analytic_flops

    info = ModelInfo(**INFO_KW)
    method = create_method("topk", r=[0, 2], layers=None)  # block 1 keeps 4 of 6 image tokens
    report = analytic_flops(info, method)
    embed, head = 6 * 3 * 2 * 3 * 4, 40
    full = (2 * 7 * 16 * 2 + 2 * 7 * 7 * 4) + 2 * 7 * 4 * 8
    reduced = (2 * 7 * 16 * 2 + 2 * 7 * 7 * 4) + 2 * 5 * 4 * 8  # attention on 7 tokens, MLP on 5
    assert report.method == "topk"
    assert report.gmacs * 1e9 == pytest.approx(embed + head + full + reduced)
    assert report.overhead_gmacs * 1e9 == pytest.approx(7 * 4)  # the CLS row of block 1
    assert report.total_gmacs == pytest.approx(report.gmacs + report.overhead_gmacs)
    # GMACs are MACs / 1e9, to the last digit (rel 1e-12)
    exact = dict(rel=1e-12, abs=0)
    assert report.gmacs == pytest.approx((embed + head + full + reduced) / 1e9, **exact)
    assert report.embed_gmacs == pytest.approx(embed / 1e9, **exact)
    assert report.head_gmacs == pytest.approx(head / 1e9, **exact)
    assert report.overhead_gmacs == pytest.approx(28 / 1e9, **exact)
    assert report.blocks[1].attn_gmacs == pytest.approx((2 * 7 * 16 * 2 + 2 * 7 * 7 * 4) / 1e9, **exact)
    assert report.blocks[1].mlp_gmacs == pytest.approx(2 * 5 * 4 * 8 / 1e9, **exact)
    assert report.ratio == pytest.approx(report.baseline_gmacs / report.total_gmacs)
    assert report.baseline_gmacs * 1e9 == pytest.approx(embed + head + 2 * full)
    d = report.as_dict()
    assert d["tokens_in"] == [7, 7] and d["tokens_out"] == [7, 5] and d["img_size"] == [4, 9]
    assert d["method"] == "topk" and d["notes"] == [] and d["ratio"] == report.ratio
    assert d["total_gmacs"] == report.total_gmacs and d["gmacs"] == report.gmacs
    assert d["overhead_gmacs"] == report.overhead_gmacs and d["baseline_gmacs"] == report.baseline_gmacs
    assert d["embed_gmacs"] == report.embed_gmacs and d["head_gmacs"] == report.head_gmacs
    assert d["block_gmacs"] == [b.gmacs for b in report.blocks]
    text = str(report).splitlines()
    assert text[0].split() == ["block", "tokens", "in", "tokens", "out", "GMACs"]
    assert text[2].split()[:3] == ["1", "7", "5"] and float(text[2].split()[3]) == pytest.approx(reduced / 1e9,
                                                                                                 abs=1e-4)
    assert text[-2].startswith(f"method topk: {report.gmacs:.3f} GMACs + {report.overhead_gmacs:.4f} overhead")
    assert text[-2].endswith(f"(unreduced {report.baseline_gmacs:.3f}, ratio {report.ratio:.2f}x)")
    # The default restore rule (ridge) of a dense output: products of the 2 leaving tokens with the 4 remaining
    # image tokens (2*4*4), their Gram (4*4*4), 24 Chebyshev products (24*4*4*2), passing the 6 patches' weights
    # on (6*2*5), the final product (6 patches x 5 tokens x 4).
    assert report.restore_gmacs * 1e9 == pytest.approx(2 * 4 * 4 + 4 * 4 * 4 + 24 * 4 * 4 * 2 + 6 * 2 * 5 + 6 * 5 * 4,
                                                       **exact)
    assert d["restore_gmacs"] == report.restore_gmacs
    assert report.dense_gmacs == pytest.approx(report.total_gmacs + report.restore_gmacs, **exact)
    assert text[-1] == f"dense output: + {report.restore_gmacs:.4f} GMACs of the restore rule"
    departure = analytic_flops(info, create_method("topk", r=[0, 2], layers=None, restore="departure"))
    assert departure.restore_gmacs == 0 and str(departure).splitlines()[-1].startswith("method topk")


def test_built_model_report_and_block_costs_by_hand():
    from tokenreduce.core.cost import ModelInfo, block_costs, built_model_report

    info = ModelInfo(**INFO_KW)
    blocks = block_costs([(7, 5, 1000, 2000), (5, 5, 300, 400)])
    assert [(b.index, b.tokens_in, b.tokens_out) for b in blocks] == [(0, 7, 5), (1, 5, 5)]
    assert blocks[0].attn_gmacs * 1e9 == pytest.approx(1000) and blocks[0].mlp_gmacs * 1e9 == pytest.approx(2000)
    report = built_model_report("stvit", info, blocks, baseline_depth=3, overhead_macs=50, notes=("n",))
    embed, head = 6 * 3 * 2 * 3 * 4, 40
    full = (2 * 7 * 16 * 2 + 2 * 7 * 7 * 4) + 2 * 7 * 4 * 8
    assert report.method == "stvit" and report.notes == ("n",) and report.img_size == (4, 9)
    assert report.blocks == blocks
    # exact: GMACs are MACs / 1e9
    assert blocks[1].attn_gmacs == 300 / 1e9 and blocks[1].mlp_gmacs == 400 / 1e9
    assert report.gmacs == (embed + head) / 1e9 + (1000 / 1e9 + 2000 / 1e9) + (300 / 1e9 + 400 / 1e9)
    assert report.overhead_gmacs == 50 / 1e9 and report.baseline_gmacs == (embed + head + 3 * full) / 1e9
    assert report.embed_gmacs == embed / 1e9 and report.head_gmacs == head / 1e9
    assert report.gmacs * 1e9 == pytest.approx(embed + head + 3700)
    assert report.baseline_gmacs * 1e9 == pytest.approx(embed + head + 3 * full)
    assert report.overhead_gmacs * 1e9 == pytest.approx(50)
    assert report.embed_gmacs * 1e9 == pytest.approx(embed) and report.head_gmacs * 1e9 == pytest.approx(head)


def tiny_swin() -> torch.nn.Module:
    import timm

    # 32 px, patch 4: an 8 x 8 grid of width 8 in 2 x 2 windows; stage 1 merges to 4 x 4 of width 16.
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, embed_dim=8,
                             depths=(1, 1), num_heads=(1, 1), window_size=2, num_classes=5)


def test_swin_counter_by_hand():
    from tokenreduce.core.cost import SwinCounter

    counter = SwinCounter(tiny_swin()).stages()
    assert counter.embed == 64 * 3 * 4 * 4 * 8 and counter.head == 16 * 5
    assert counter.other == 16 * 32 * 16  # patch merging: 4 x 4 outputs, 4 * 8 -> 16
    stage0 = (2 * 64 * 64 + 2 * 64 * 64 + 2 * 64 * 4 * 8, 2 * 64 * 8 * 32)
    stage1 = (2 * 16 * 256 + 2 * 16 * 256 + 2 * 16 * 4 * 16, 2 * 16 * 16 * 64)
    assert [(b.index, b.tokens_in, b.tokens_out) for b in counter.blocks] == [(0, 64, 64), (1, 16, 16)]
    assert counter.blocks[0].attn_gmacs * 1e9 == pytest.approx(stage0[0])
    assert counter.blocks[0].mlp_gmacs * 1e9 == pytest.approx(stage0[1])
    assert counter.blocks[1].gmacs * 1e9 == pytest.approx(sum(stage1))
    total = counter.embed + counter.head + counter.other + sum(stage0) + sum(stage1)
    assert counter.gmacs * 1e9 == pytest.approx(total)
    assert counter.blocks[0].attn_gmacs == stage0[0] / 1e9 and counter.blocks[0].mlp_gmacs == stage0[1] / 1e9
    report = counter.report("x", (32, 32), baseline_gmacs=1.0, overhead_macs=30, notes=("a",))
    assert report.overhead_gmacs == 30 / 1e9 and report.embed_gmacs == counter.embed / 1e9
    assert report.head_gmacs == 80 / 1e9
    assert report.gmacs == counter.gmacs and report.overhead_gmacs * 1e9 == pytest.approx(30)
    assert report.embed_gmacs * 1e9 == pytest.approx(counter.embed) and report.head_gmacs * 1e9 == pytest.approx(80)
    assert report.blocks == counter.blocks and report.notes == ("a",) and report.baseline_gmacs == 1.0
    assert report.method == "x" and report.img_size == (32, 32)


def test_swin_counter_after_blocks_sets_the_next_grid():
    from tokenreduce.core.cost import SwinCounter

    seen = []

    def after(stage: int, grid: tuple[int, int]):
        seen.append((stage, grid))
        return (6, 6) if stage == 0 else None  # a build that shrinks the grid after stage 0

    counter = SwinCounter(tiny_swin()).stages(after)
    assert seen == [(0, (8, 8)), (1, (3, 3))]
    assert counter.other == 9 * 32 * 16 and counter.blocks[1].tokens_in == 9
    counter.add(5, 4, 1000, 2000)
    assert (counter.blocks[-1].index, counter.blocks[-1].tokens_out) == (2, 4)
    assert counter.blocks[-1].gmacs * 1e9 == pytest.approx(3000)


# --- what a new method inherits from the base class -----------------------------------------------------------

def test_base_method_defaults_and_default_step():
    from tokenreduce.methods.base import Method

    class DropTwo(Method):  # not registered: the registry stays as the other tests expect it
        name = "drop_two"

        def amounts(self, depth: int) -> list[int]:
            return [2] * depth

    method = DropTwo(a=1, b="x")
    assert repr(method) == "DropTwo(a=1, b='x')"
    assert method.describe() == {"method": "drop_two", "options": {"a": 1, "b": "x"}}
    plan = method.plan(5, 1, 1)  # 4 image tokens, drop 2
    assert (plan.amounts, plan.tokens_in, plan.tokens_out, plan.notes) == ((2,), (5,), (3,), ())
    assert method.plan(5, 1, 1) is plan  # cached per shape
    assert method.prop_attn(0) is False and method.overhead_macs(plan, 8, 2, 1) == 0.0
    assert method.needs(0, plan) == frozenset() and method.attn_transform(0, plan) is None
    state = TokenState(torch.zeros(1, 5, 2))
    assert method.begin(state, plan) is state and method.diagnostics([state]) == {}
    with pytest.raises(ValueError, match="block 1 would remove 2 of its 2 image tokens"):
        method.plan(5, 1, 2)  # block 1 is entered by 3 tokens, 2 of them image tokens


def test_require_names_the_extra():
    from tokenreduce.core.errors import MissingExtraError, require

    assert require("math", "viz") is None
    with pytest.raises(MissingExtraError, match=r'no_such_module_ab12 is not installed; .*tokenreduce\[viz\]'):
        require("no_such_module_ab12", "viz")


def test_registered_method_is_created_by_name(monkeypatch):
    from tokenreduce.methods import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # registered for this test only

    @base.register
    class Nothing(base.Method):
        name = "nothing_test"

    assert "nothing_test" in base.method_names()
    made = create_method("nothing_test", k=3)
    assert isinstance(made, Nothing) and made.options == {"k": 3}


# --- ops on a batch of two ------------------------------------------------------------------------------------

def test_keep_and_unkeep_per_image():
    from tokenreduce.core.ops import keep, kept_destination, unkeep

    t = torch.arange(12.0).view(2, 3, 2)
    index = torch.tensor([[2, 0], [1, 2]])
    kept = keep(t, index)
    assert kept.tolist() == [[[4.0, 5.0], [0.0, 1.0]], [[8.0, 9.0], [10.0, 11.0]]]
    back = unkeep(kept * 10, index, torch.zeros(2, 3, 2))
    assert back.tolist() == [[[0.0, 10.0], [0.0, 0.0], [40.0, 50.0]], [[0.0, 0.0], [80.0, 90.0], [100.0, 110.0]]]
    assert kept_destination(index, 3).tolist() == [[1, -1, 0], [-1, 0, 1]]


# --- diagnostics of a traced pass --------------------------------------------------------------------------------

def test_diagnostics_of_no_states_and_of_states_without_their_records():
    ppt, gtp = create_method("ppt", r=[1]), create_method("gtp", r=[1], graph="spatial")
    plain = TokenState(torch.zeros(1, 5, 2), grid=(2, 2))
    for method in (ppt, gtp):
        assert method.diagnostics([]) == {}
        assert method.diagnostics([plain]) == {}


def test_gtp_diagnostics_of_one_state_and_of_several():
    method = create_method("gtp", r=[1, 1], graph="spatial")
    x = torch.randn(2, 10, 3, generator=torch.Generator().manual_seed(0))
    state = method.begin(TokenState(x, num_prefix=1, grid=(3, 3)), method.plan(10, 1, 2))
    # 3 x 3 grid: 4 corners * 3 + 4 edges * 5 + centre 8 = 40 directed edges per image.
    assert method.diagnostics([state]) == {"image_tokens": 9, "graph_edges": 40.0}
    assert method.diagnostics([TokenState(x), state]) == {"image_tokens": 9, "graph_edges": 40.0}  # the last one


def test_gtp_current_graph_per_image():
    from tokenreduce.methods.gtp import current_graph

    method = create_method("gtp", r=[1], graph="spatial", selection="cls_attn")
    x = torch.randn(2, 10, 3, generator=torch.Generator().manual_seed(0))
    state = method.begin(TokenState(x, num_prefix=1, grid=(3, 3)), method.plan(10, 1, 1))
    scores = torch.full((2, 2, 10), 0.5)
    scores[0, :, 1 + 0] = 0.1  # image 0 removes corner 0, image 1 the centre 4
    scores[1, :, 1 + 4] = 0.1
    out = method.reduce(0, state, {"cls_attn": scores}, 1)
    graph = current_graph(out)
    # Image 0 keeps tokens 1..8, image 1 tokens 0..3, 5..8: position 0 is token 1 (degree 5) in image 0, token 0
    # (degree 3) in image 1; position 4 is token 5 (degree 5) in both.
    assert graph.shape == (2, 8, 8)
    assert graph[0, 0, 1].item() == pytest.approx(1 / math.sqrt(5 * 3))  # tokens 1 and 2
    assert graph[0, 0, 4].item() == pytest.approx(1 / math.sqrt(5 * 5))  # tokens 1 and 5
    assert graph[1, 0, 1].item() == pytest.approx(1 / math.sqrt(3 * 5))  # tokens 0 and 1
    assert graph[1, 0, 4].item() == 0.0  # tokens 0 and 5 are not neighbours
    assert graph[1, 3, 4].item() == 0.0  # tokens 3 and 5 are not neighbours either (4 is not in the way)


def test_describe_of_gtp_lists_every_option():
    method = create_method("gtp", r=3, graph="semantic", k=4, alpha=0.5, selection="cls_attn", token_scale=False,
                           sparsity=0.9, seed=7, map="full")
    options = dict(r=3, graph="semantic", k=4, alpha=0.5, selection="cls_attn", token_scale=False, sparsity=0.9,
                   seed=7, map="full")
    assert method.describe() == {"method": "gtp", "options": options, **{k: v for k, v in options.items() if k != "r"}}


def test_topk_ties_keep_the_earlier_tokens_and_plans_carry_no_notes():
    # 40 image tokens, every third one attended 1.0, the rest 0.0 (ties): keep 20 = the 14 attended ones and the
    # first 6 of the others in raster order (the order an unstable sort would not keep at this length).
    row = [0.0] + [1.0 if i % 3 == 0 else 0.0 for i in range(40)]
    method = create_method("topk", r=[20], layers=None)
    plan = method.plan(41, 1, 1)
    assert plan.notes == ()
    x = torch.arange(41.0, dtype=torch.float64).view(1, 41, 1)
    out = method.reduce(0, TokenState(x.clone(), num_prefix=1), cls_stats(row), 20)
    attended = [i for i in range(40) if i % 3 == 0]
    others = [i for i in range(40) if i % 3][:6]
    assert out.x.flatten().tolist() == [0.0] + [1.0 + i for i in sorted(attended + others)]


def test_evit_mean_fuse_per_image_in_a_batch_and_keeps_the_feature_dtype():
    x = torch.cat([X, X * 2]).to(torch.bfloat16)
    stats = {"cls_attn": torch.tensor([[[0.0625, 0.125, 0.5, 0.0625, 0.25]] * 2,
                                       [[0.0625, 0.5, 0.375, 0.25, 0.0625]] * 2])}  # image 1 drops .25, .0625
    method = create_method("evit", r=[2], layers=None, fuse="mean")
    out = method.reduce(0, TokenState(x, num_prefix=1, grid=(2, 2)), stats, 2)
    assert out.x.dtype == torch.bfloat16
    # Image 0 fuses image tokens 0 (.125) and 2 (.0625): 2/3 x1 + 1/3 x3; image 1 fuses 2 (.25) and 3 (.0625):
    # .8 x3 + .2 x4 (each image's weights renormalised by its own sum).
    expected0 = 2 / 3 * X[0, 1] + 1 / 3 * X[0, 3]
    expected1 = 0.8 * X[0, 3] * 2 + 0.2 * X[0, 4] * 2
    torch.testing.assert_close(out.x[0, 3].double(), expected0, rtol=1e-2, atol=0)
    torch.testing.assert_close(out.x[1, 3].double(), expected1, rtol=1e-2, atol=0)


def test_evit_without_prefix_tokens_keeps_the_owner_of_position_zero():
    # No CLS (a GAP model): the mean of all query rows scores the tokens; token 0 is kept and keeps its patch.
    x = X[:, 1:].clone()  # 4 image tokens, no prefix
    state = TokenState(x, num_prefix=0, grid=(2, 2)).tracked()
    out = create_method("evit", r=[2], layers=None).reduce(0, state, cls_stats([0.5, 0.125, 0.3125, 0.0625]), 2)
    # drops tokens 1 (.125) and 3 (.0625): .125 * (0, 2) + .0625 * (4, 4)
    assert out.x.tolist() == [[[1.0, 0.0], [3.0, 1.0], [0.25, 0.5]]]
    assert out.owner.tolist() == [[0, 2, 1, 2]]


def test_gtp_overhead_by_hand():
    spatial = create_method("gtp", r=[0, 2], graph="spatial")
    plan = spatial.plan(10, 1, 2)  # 9 image tokens; block 1 propagates 2 into the 7 kept
    assert spatial.overhead_macs(plan, 4, 2, 1) == (9 - 2) * 2 * (4 + 1)  # features and sizes
    assert create_method("gtp", r=0).overhead_macs(create_method("gtp", r=0).plan(10, 1, 2), 4, 2, 1) == 0.0
    mixed = create_method("gtp", r=[2, 2], graph="mixed", k=2, token_scale=False, selection="cls_attn")
    plan = mixed.plan(10, 1, 2)
    # semantic graph 9 * 9 * D, then per block (n - prefix - r) * r * D and the CLS row n * D
    assert mixed.overhead_macs(plan, 4, 2, 1) == 9 * 9 * 4 + (7 * 2 * 4 + 10 * 4) + (5 * 2 * 4 + 8 * 4)
    sparse = create_method("gtp", r=[2], graph="spatial", selection="cls_attn", sparsity=0.5)
    assert sparse.overhead_macs(sparse.plan(10, 1, 1), 4, 2, 1) == 7 * 2 * 5  # the full map gives the CLS row


def test_evit_options_and_schedule():
    evit = create_method("evit")
    assert evit.prop_attn(0) is False and evit.options["prop_attn"] is False
    assert create_method("evit", prop_attn=True).prop_attn(0) is True
    plan = create_method("evit", keep_rate=1.0, layers=(0, 1)).plan(9, 1, 2)  # keeps every token: nothing fused
    assert plan.amounts == (0, 0) and plan.tokens_out == (9, 9) and plan.notes == ()
    assert create_method("evit", r=[0, 3], layers=None).plan(9, 1, 2).notes == ()
    with pytest.raises(ValueError, match="evit: block 1 would remove 7 of its 7 image tokens"):
        create_method("evit", r=[2, 7], layers=None).plan(9, 1, 2)  # 9 tokens - 2 + 1 = 8: 7 image tokens


def test_restore_needs_left_and_keeps_the_feature_dtype():
    from tokenreduce.core.ops import keep_tokens, restore

    state = TokenState(X.clone().float(), num_prefix=1, grid=(2, 2))
    with pytest.raises(ValueError, match="restore needs a state with dense tracking"):
        restore(state.tracked(dense=False))  # owner but no left
    tracked = state.tracked(dense=True)
    tracked = tracked.replace(left_x=tracked.left_x.double())  # recorded in another dtype than the features
    out = restore(keep_tokens(tracked, torch.tensor([[1, 3]])))
    assert out.dtype == torch.float32
    assert out.tolist() == X.tolist()  # the dropped tokens 0 and 2 keep the features they had


# --- schedules by hand ----------------------------------------------------------------------------------------

def test_resolve_r_forms_by_hand():
    from tokenreduce.methods.base import check_count, check_keep_rate, check_layers, resolve_r, validate_r

    assert resolve_r("m", 3, 4, None) == [3, 3, 3, 3]
    assert resolve_r("m", 3, 4, (1, 3)) == [0, 3, 0, 3]
    assert resolve_r("m", [1, 2], 4, None) == [1, 2, 0, 0]
    assert resolve_r("m", (1, 2, 3), 4, None) == [1, 2, 3, 0]  # a 3-tuple is a list, not (r, inflection)
    assert resolve_r("m", {2: 5, 0: 1}, 4, None) == [1, 0, 5, 0]
    assert resolve_r("m", 4.0, 2, None) == [4, 4]  # a whole float is accepted as an int
    # (r, inflection) over the blocks of ``layers`` only: low = int(r (1 - f)), high = 2r - low, linear in between.
    assert resolve_r("m", (6, 1), 5, (1, 2, 4)) == [0, 0, 6, 0, 12]
    assert resolve_r("m", (6, -1), 5, (1, 2, 4)) == [0, 12, 6, 0, 0]
    assert resolve_r("m", (6, 0.5), 3, None) == [3, 6, 9]
    assert resolve_r("m", (6, 1), 2, None) == [0, 12]  # two blocks: one step of 12
    assert resolve_r("m", (5, 0), 1, None) == [5]  # one block: no division by zero
    with pytest.raises(ValueError, match=r"m: r\[1\] must be a non-negative integer, got True"):
        resolve_r("m", (6, True), 2, None)  # a bool is no inflection: a list of two counts, and no count either
    for bad in (-1, 2.5, "8", None, True):
        with pytest.raises(ValueError, match="m: r must be a non-negative integer"):
            resolve_r("m", bad, 2, None)
    with pytest.raises(ValueError, match=r"^m: r must be a non-negative integer, got -1"):
        resolve_r("m", (-1, 0.5), 2, None)
    with pytest.raises(ValueError, match=r"m: schedule inflection must be in \[-1, 1\], got 1.5"):
        resolve_r("m", (6, 1.5), 2, None)
    with pytest.raises(ValueError, match=r"m: schedule inflection must be in \[-1, 1\], got -1.5"):
        resolve_r("m", (6, -1.5), 2, None)
    with pytest.raises(ValueError, match=r"m: r\[1\] must be a non-negative integer, got -2"):
        resolve_r("m", [1, -2], 2, None)
    with pytest.raises(ValueError, match=r"m: r\[3\] must be a non-negative integer, got -2"):
        resolve_r("m", {3: -2}, 4, None)
    with pytest.raises(ValueError, match="m: layer 4 is outside the model's blocks 0..3"):
        resolve_r("m", {4: 1}, 4, None)
    validate_r("m", {7: 1})  # depth unknown yet: any block of a dict is fine
    validate_r("m", [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="m: r must be a non-negative integer, got -3"):
        validate_r("m", -3)
    with pytest.raises(ValueError, match=r"m: r\[9\] must be a non-negative integer, got -1"):
        validate_r("m", {9: -1})
    assert check_count("m", "r", 0) == 0 and check_count("m", "r", 2.0) == 2 and check_count("m", "r", 0.0) == 0
    assert check_keep_rate("m", 1) == 1.0 and check_keep_rate("m", 0.25) == 0.25
    for bad in (0, 0.0, 1.01, True, "0.5", None):
        with pytest.raises(ValueError, match="m: keep_rate must be in"):
            check_keep_rate("m", bad)
    assert check_layers("m", None, 4) is None and check_layers("m", 2, 4) == (2,)
    assert check_layers("m", [3, 1, 3], 4) == (1, 3)  # sorted, once each
    for bad in (-1, 4, True, 1.0):
        with pytest.raises(ValueError, match="m: layer .* is outside the model's blocks 0..3"):
            check_layers("m", [bad], 4)


def test_evit_without_prefix_tokens_fuses_the_token_at_position_zero():
    x = X[:, 1:].clone()
    state = TokenState(x, num_prefix=0, grid=(2, 2)).tracked()
    out = create_method("evit", r=[2], layers=None).reduce(0, state, cls_stats([0.0625, 0.5, 0.3125, 0.125]), 2)
    # drops tokens 0 (.0625) and 3 (.125): kept 1, 2; fused .0625 * (1, 0) + .125 * (4, 4) at position 2
    assert out.x.tolist() == [[[0.0, 2.0], [3.0, 1.0], [0.5625, 0.5]]]
    assert out.owner.tolist() == [[2, 0, 1, 2]]


def test_swin_counter_on_a_non_square_grid_with_three_stages_and_no_head():
    import timm

    from tokenreduce.core.cost import SwinCounter

    # 32 x 48 px in 4 x 2 patches: an 8 x 24 grid, merged to 4 x 12 and 2 x 6; widths 8, 16, 32; no classifier.
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(32, 48), patch_size=(4, 2),
                              embed_dim=8, depths=(1, 1, 1), num_heads=(1, 1, 1), window_size=2, num_classes=0)
    counter = SwinCounter(model).stages()
    assert counter.embed == 8 * 24 * 3 * 4 * 2 * 8 and counter.head == 0
    assert counter.other == 4 * 12 * 32 * 16 + 2 * 6 * 64 * 32
    assert [b.tokens_in for b in counter.blocks] == [192, 48, 12]

    def attention(n: int, dim: int) -> int:  # n queries in 2 x 2 windows (4 keys each)
        return 4 * n * dim * dim + 2 * n * 4 * dim

    expected = [attention(192, 8) + 2 * 192 * 8 * 32, attention(48, 16) + 2 * 48 * 16 * 64,
                attention(12, 32) + 2 * 12 * 32 * 128]
    assert [round(b.gmacs * 1e9) for b in counter.blocks] == expected


def test_semantic_graph_accepts_one_neighbour_and_refuses_all():
    from tokenreduce.methods.gtp import semantic_adjacency

    tokens = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    assert semantic_adjacency(tokens, 1).long().tolist() == [[[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1],
                                                              [0, 0, 1, 0]]]
    assert semantic_adjacency(tokens, 3).sum().item() == 12  # every other token
    for k in (0, 4):
        with pytest.raises(ValueError, match=f"gtp: the semantic graph needs 1 <= k < 4 image tokens, got k={k}"):
            semantic_adjacency(tokens, k)


def test_ppt_and_tome_overhead_by_hand_on_odd_and_even_token_counts():
    ppt = create_method("ppt", r=[2, 2], threshold=1e-3)
    plan = ppt.plan(10, 1, 2)  # blocks entered by 10 and 8 tokens
    assert plan.tokens_in == (10, 8)
    # score row n * D, similarity ceil(n/2) * floor(n/2) * head_dim (D = 6, 2 heads: head_dim 3)
    assert ppt.overhead_macs(plan, 6, 2, 1) == (10 * 6 + 5 * 5 * 3) + (8 * 6 + 4 * 4 * 3)
    plan = ppt.plan(11, 1, 2)  # 11 and 9: odd
    assert ppt.overhead_macs(plan, 6, 2, 1) == (11 * 6 + 6 * 5 * 3) + (9 * 6 + 5 * 4 * 3)
    assert create_method("ppt", r=[2], threshold=0.0).overhead_macs(plan, 6, 2, 1) == (11 + 9) * 6  # prunes only
    assert create_method("ppt", r=[2], threshold=math.inf).overhead_macs(plan, 6, 2, 1) == (30 + 20) * 3  # pools
    assert create_method("tome", r=[2]).overhead_macs(create_method("tome", r=[2]).plan(10, 1, 1), 6, 2, 1) == 75
    tome = create_method("tome", r=[2, 0, 2])
    plan = tome.plan(11, 1, 3)
    assert tome.overhead_macs(plan, 6, 2, 1) == 6 * 5 * 3 + 5 * 4 * 3  # blocks 0 and 2, entered by 11 and 9 tokens


# --- GTP: the spatial graph computed afresh, the selections by hand ----------------------------------------

def _flush_spatial_cache() -> None:
    """Build more grids than the bounded cache holds, so the next grid is computed, not read from the cache (a
    test process may have cached every grid of the other tests already)."""
    from tokenreduce.methods.gtp import MAX_CACHED_GRIDS, spatial_graph

    for width in range(101, 102 + MAX_CACHED_GRIDS):
        spatial_graph((1, width))


def test_spatial_graph_computed_afresh_on_a_non_square_grid():
    from tokenreduce.methods.gtp import spatial_adjacency, spatial_graph

    _flush_spatial_cache()
    adjacency = spatial_adjacency((2, 3))  # 0 1 2 / 3 4 5
    expected = {0: {1, 3, 4}, 1: {0, 2, 3, 4, 5}, 2: {1, 4, 5}, 3: {0, 1, 4}, 4: {0, 1, 2, 3, 5}, 5: {1, 2, 4}}
    assert adjacency.tolist() == [[j in expected[i] for j in range(6)] for i in range(6)]
    _flush_spatial_cache()
    graph = spatial_graph((3, 2))  # 0 1 / 2 3 / 4 5: degrees 3, 3, 5, 5, 3, 3
    assert graph.dtype == torch.float32 and graph.shape == (6, 6)
    assert graph[0, 1].item() == pytest.approx(1 / 3) and graph[0, 2].item() == pytest.approx(1 / math.sqrt(15))
    assert graph[2, 3].item() == pytest.approx(1 / 5) and graph[0, 4].item() == 0.0 and graph[0, 0].item() == 0.0
    assert spatial_graph((3, 2)) is graph  # cached once computed


def test_gtp_trains_with_a_graph_first_built_under_inference_mode():
    _flush_spatial_cache()
    method = create_method("gtp", r=[1], graph="spatial", selection="cls_attn")
    plan = method.plan(7, 1, 1)
    x = torch.randn(1, 7, 3)
    with torch.inference_mode():
        method.begin(TokenState(x.clone(), num_prefix=1, grid=(2, 3)), plan)  # caches the 2 x 3 graph
    leaf = x.clone().requires_grad_()
    state = method.begin(TokenState(leaf * 1.0, num_prefix=1, grid=(2, 3)), plan)
    out = method.reduce(0, state, cls_stats([0.5, 0.1, 0.5, 0.5, 0.5, 0.5, 0.5]), 1)
    out.x.sum().backward()
    # Image token 0 (corner, degree 3) goes; its neighbours 1, 3 (degree 5), 4 (degree 3) each get 0.1 * G of it.
    grad = leaf.grad[0, 1].tolist()
    assert grad == pytest.approx([0.1 * (2 / math.sqrt(15) + 1 / 3)] * 3)


def test_gtp_selection_scores_by_hand():
    from tokenreduce.methods.gtp import selection_scores

    head0 = [[0.2, 0.2, 0.2, 0.2, 0.2], [0.1, 0.5, 0.2, 0.1, 0.1], [0.3, 0.3, 0.1, 0.2, 0.1],
             [0.2, 0.1, 0.1, 0.4, 0.2], [0.2, 0.2, 0.2, 0.1, 0.3]]
    head1 = [[0.6, 0.1, 0.1, 0.1, 0.1], [0.4, 0.2, 0.2, 0.1, 0.1], [0.3, 0.1, 0.3, 0.2, 0.1],
             [0.5, 0.1, 0.2, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.6]]
    stats = {"attn": torch.tensor([[head0, head1]], dtype=torch.float64)}
    # image tokens: diagonals (.5 .1 .4 .3) and (.2 .3 .1 .6); column sums (1.3 .8 1.0 .9) and (.6 .9 .6 1.0)
    expected = {"diag": [0.5, 0.3, 0.4, 0.6], "col_sum": [1.3, 0.9, 1.0, 1.0],
                "mixed_attn_max": [0.65, 0.27, 0.4, 0.6],
                "mixed_attn_mean": [0.35 * 0.95, 0.2 * 0.85, 0.25 * 0.8, 0.45 * 0.95]}
    for selection, values in expected.items():
        got = selection_scores(selection, stats, 1, 5)
        torch.testing.assert_close(got, torch.tensor([values], dtype=torch.float64), rtol=0, atol=1e-12)
    cls = {"cls_attn": torch.tensor([[[0.3, 0.1, 0.2, 0.3, 0.4], [0.5, 0.3, 0.2, 0.1, 0.0]]])}
    torch.testing.assert_close(selection_scores("cls_attn", cls, 1, 5), torch.tensor([[0.2, 0.2, 0.2, 0.2]]))


def test_gtp_random_selection_is_a_fixed_stream_per_seed_and_block():
    from tokenreduce.methods.gtp import selection_scores

    first = selection_scores("random", {}, 1, 6)
    assert first.shape == (1, 5) and first.device.type == "cpu"
    assert torch.equal(first, selection_scores("random", {}, 1, 6, "cpu", 0, 0))  # the defaults: block 0, seed 0
    # The stream of (seed, block) is generator seed ``seed * 1_000_003 + block``: the same tokens in every release.
    for seed, block in ((0, 2), (3, 1)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        expected = torch.rand(1, 5, generator=generator)
        assert torch.equal(selection_scores("random", {}, 1, 6, "cpu", block, seed), expected)


def test_gtp_random_selection_through_reduce_uses_seed_and_block():
    from tokenreduce.methods.gtp import selection_scores

    method = create_method("gtp", r=[0, 2], graph="spatial", selection="random", seed=3)
    plan = method.plan(10, 1, 2)
    state = TokenState(torch.arange(10.0).view(1, 10, 1), num_prefix=1, grid=(3, 3)).tracked(dense=True)
    out = method.reduce(1, method.begin(state, plan), {}, 2)
    lowest = selection_scores("random", {}, 1, 10, "cpu", 1, 3).argsort(dim=-1)[0, :2]  # block 1, seed 3
    assert out.left[0].nonzero().flatten().tolist() == sorted(lowest.tolist())


def test_gtp_ties_drop_the_earlier_tokens_and_sizes_pass_through_without_token_scale():
    # 40 image tokens (5 x 8 grid), scores 0 or 1 (ties): the 10 lowest are the first 10 zero-score tokens.
    row = [0.5] + [1.0 if i % 3 == 0 else 0.0 for i in range(40)]
    method = create_method("gtp", r=[10], graph="spatial", selection="cls_attn", token_scale=False)
    plan = method.plan(41, 1, 1)
    x = torch.zeros(1, 41, 1)
    size = torch.arange(1.0, 42.0).view(1, 41, 1)
    state = method.begin(TokenState(x, size=size, num_prefix=1, grid=(5, 8)), plan)
    out = method.reduce(0, state, cls_stats(row), 10)
    gone = [i for i in range(40) if i % 3][:10]
    kept = [i for i in range(40) if i not in gone]
    assert out.size.flatten().tolist() == [1.0] + [2.0 + i for i in kept]  # the kept sizes, unchanged


def test_gtp_build_graph_defaults_and_float64_sizes():
    from tokenreduce.methods.gtp import build_graph

    tokens = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(build_graph(tokens, (4, 4)), build_graph(tokens, (4, 4), "mixed", 8))
    assert not torch.equal(build_graph(tokens, (4, 4)), build_graph(tokens, (4, 4), "mixed", 9))
    # Sizes kept in float64 stay float64 and receive alpha * G * size of the propagated token.
    method = create_method("gtp", r=[1], graph="spatial", selection="cls_attn", alpha=0.5)
    plan = method.plan(5, 1, 1)
    size = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]], dtype=torch.float64)
    state = method.begin(TokenState(X.clone(), size=size, num_prefix=1, grid=(2, 2)), plan)
    out = method.reduce(0, state, cls_stats([0.5, 0.5, 0.125, 0.5, 0.5]), 1)  # image token 1 goes
    # 2 x 2 grid: every token has degree 3, G = 1/3 between all pairs; token 1 (size 3) spreads .5/3 * 3 = .5.
    assert out.size.dtype == torch.float64
    torch.testing.assert_close(out.size.flatten(), torch.tensor([1.0, 2.5, 4.5, 5.5], dtype=torch.float64))


def test_each_method_asks_only_for_the_statistics_it_reads_and_only_where_it_reduces():
    cases = {
        ("tome", ()): {"metric"},
        ("topk", ()): {"cls_attn"},
        ("evit", ()): {"cls_attn"},
        ("ppt", (("threshold", 1e-3),)): {"cls_attn", "value_norm", "metric"},
        ("ppt", (("threshold", 0.0),)): {"cls_attn", "value_norm"},
        ("ppt", (("threshold", math.inf),)): {"metric"},
        ("gtp", (("selection", "cls_attn"),)): {"cls_attn"},
        ("gtp", (("selection", "random"),)): set(),
        ("gtp", (("selection", "mixed_attn_max"),)): {"col_sum", "diag"},
        ("gtp", (("selection", "mixed_attn_mean"),)): {"col_sum", "diag"},
        ("gtp", (("selection", "col_sum"),)): {"col_sum"},
        ("gtp", (("selection", "diag"),)): {"diag"},
        ("gtp", (("selection", "mixed_attn_max"), ("map", "full"))): {"attn"},
        ("gtp", (("selection", "diag"), ("sparsity", 0.5))): {"attn"},  # the sparsified map exists whole
    }
    for (name, options), needed in cases.items():
        method = create_method(name, r=[0, 2], **({"layers": None} if name in ("topk", "evit") else {}),
                               **dict(options))
        plan = method.plan(10, 1, 2)
        assert method.needs(0, plan) == frozenset(), name  # block 0 removes nothing
        assert method.needs(1, plan) == frozenset(needed), (name, options)


def test_gtp_current_graph_right_after_begin_is_the_whole_graph_per_image():
    from tokenreduce.methods.gtp import GRAPH_KEY, current_graph

    method = create_method("gtp", r=[1], graph="mixed", k=1)
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    state = method.begin(TokenState(x, num_prefix=1, grid=(2, 2)), method.plan(5, 1, 1))
    graph = current_graph(state)
    assert graph.shape == (2, 4, 4) and torch.equal(graph, state.extras[GRAPH_KEY])


def test_merge_and_unmerge_with_four_prefix_tokens_by_hand():
    from tokenreduce.core.ops import bipartite_match, merge, merge_destination, unmerge

    # 4 prefix tokens (registers) + 6 image tokens. A = positions 0 2 4 6 8, B = 1 3 5 7 9; prefix: A 0 2, B 1 3.
    # Image A tokens 4, 6, 8 are most similar to B tokens 5, 7, 9 by construction; r = 2 merges the two closest.
    metric = torch.tensor([[[1.0, 0.0]] * 4 + [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0],
                                                [-1.0, 1.0]]])
    m = bipartite_match(metric, 2, 4)
    assert (m.src.tolist(), m.dst.tolist(), m.stay.tolist()) == ([[2, 3]], [[2, 3]], [[4]])
    t = torch.arange(10.0).view(1, 10, 1)
    merged = merge(t, m)  # prefix 0 1 2 3, the A token that stays (8), then B: 5 + 4, 7 + 6, 9
    assert merged.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 8.0, 9.0, 13.0, 9.0]
    assert merge_destination(m).tolist() == [[0, 1, 2, 3, 5, 5, 6, 6, 4, 7]]
    assert unmerge(merged, m).flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 9.0, 9.0, 13.0, 13.0, 8.0, 9.0]


def test_ppt_policy_records_per_image_and_ties_keep_the_earlier_tokens():
    from tokenreduce.methods.ppt import POLICY_KEY

    x = torch.arange(3.0).view(1, 3, 1).expand(2, -1, -1).clone()
    stats = {name: torch.cat([t, t]) for name, t in PPT_STATS.items()}
    for threshold, pooled in ((math.inf, True), (0.0, False), (0.1, False)):
        out = create_method("ppt", r=[1], threshold=threshold).reduce(0, TokenState(x, num_prefix=1), stats, 1)
        policy = out.extras[f"{POLICY_KEY}0"]
        assert policy.dtype == torch.bool and policy.tolist() == [pooled, pooled], threshold
    # Pruning 40 image tokens with tied scores (1 or 0) keeps the highest first, ties in raster order.
    value_norm = torch.tensor([[1.0] + [1.0 if i % 3 == 0 else 0.5 for i in range(40)]])
    stats = {"cls_attn": torch.full((1, 1, 41), 1 / 41), "value_norm": value_norm}
    x = torch.arange(41.0).view(1, 41, 1)
    out = create_method("ppt", r=[20], threshold=0.0).reduce(0, TokenState(x, num_prefix=1), stats, 20)
    kept = [i for i in range(40) if i % 3 == 0] + [i for i in range(40) if i % 3][:6]
    assert out.x.flatten().tolist() == [0.0] + [1.0 + i for i in kept]


def test_tome_and_gtp_plans_name_the_method_and_note_only_clamps():
    # 9 image tokens: r = 4 fits; then 6 tokens, 5 image: r = 5 is clamped to 2
    assert create_method("tome", r=[4, 5]).plan(10, 1, 2).notes == ("block 1: r=5 clamped to 2 (6 tokens)",)
    assert create_method("tome", r=[4, 0]).plan(10, 1, 2).notes == ()
    assert create_method("tome", r=[4]).plan(10, 1, 1).notes == ()  # r == the limit: no clamp, no note
    assert create_method("tome", r=[5]).plan(10, 1, 1).notes == ("block 0: r=5 clamped to 4 (10 tokens)",)
    with pytest.raises(ValueError, match="^gtp: r lists 5 blocks but the model has 4"):
        create_method("gtp", r=[1, 1, 1, 1, 1]).plan(10, 1, 4)


def test_ppt_mixed_batch_records_departures_of_the_pruning_image_only():
    stats = {name: torch.cat([t, t]) for name, t in PPT_STATS.items()}
    stats["value_norm"][1] = torch.tensor([7.0, 1.0, 1.0])  # image 1: flat scores, pools
    state = TokenState(torch.cat([PPT_X, PPT_X]), num_prefix=1).tracked(dense=True)
    out = create_method("ppt", r=[1], threshold=0.1).reduce(0, state, stats, 1)
    assert out.left.tolist() == [[True, False], [False, False]]  # image 0 pruned image token 0 (feature 2)
    assert out.left_x[0, 0].tolist() == [2.0]
    assert out.owner.tolist() == [[-1, 1], [1, 1]]


def test_topk_and_evit_step_with_nothing_requested_remove_nothing():
    for name in ("topk", "evit"):
        method = create_method(name, keep_rate=0.5)
        assert method.step(0, 9, 1, 0) == (0, 9, "")  # amount 0: nothing, whatever the keep rate
        assert method.step(0, 9, 1, -1)[:2] == ((4, 5) if name == "topk" else (4, 6))  # -1: the keep rate's count


def test_record_departures_without_prefix_and_in_the_recorded_dtype():
    from tokenreduce.core.ops import record_departures

    state = TokenState(torch.tensor([[[5.0], [6.0], [7.0]]], dtype=torch.float64), num_prefix=0).tracked(dense=True)
    state = state.replace(left_x=state.left_x.float())
    out = record_departures(state, torch.tensor([[True, False, True]]))  # the tokens at positions 0 and 2 leave
    assert out.left.tolist() == [[True, False, True]]
    assert out.left_x.dtype == torch.float32 and out.left_x.flatten().tolist() == [5.0, 0.0, 7.0]
    again = record_departures(out.replace(x=out.x * 10), torch.tensor([[True, True, True]]))
    assert again.left_x.flatten().tolist() == [5.0, 60.0, 7.0]  # a patch keeps the feature of its first departure


def test_option_defaults_and_checks_of_topk_and_gtp():
    topk = create_method("topk")
    assert topk.options == {"keep_rate": 0.7, "r": None, "layers": (3, 6, 9), "prop_attn": False}
    assert topk.prop_attn(0) is False and create_method("topk", prop_attn=True).prop_attn(0) is True
    assert create_method("topk", r=2, layers=(1,)).options == {"keep_rate": None, "r": 2, "layers": (1,),
                                                               "prop_attn": False}
    assert create_method("topk", keep_rate=0.5, layers=(1,)).plan(9, 1, 3).amounts == (0, 4, 0)
    with pytest.raises(ValueError, match="^topk: r lists 5 blocks but the model has 4"):
        create_method("topk", r=[1, 1, 1, 1, 1], layers=None).plan(10, 1, 4)
    gtp = create_method("gtp")
    assert gtp.options == {"r": 8, "graph": "mixed", "k": 8, "alpha": 0.1, "selection": "mixed_attn_max",
                           "token_scale": True, "sparsity": 1.0, "seed": 0, "map": "chunked"}
    assert create_method("gtp", k=1).k == 1 and create_method("gtp", alpha=1).alpha == 1.0
    for options, message in ((dict(r=-1), "^gtp: r must be a non-negative integer, got -1"),
                             (dict(k=True), "^gtp: k .semantic neighbours. must be an integer >= 1, got True"),
                             (dict(k=0), "^gtp: k .semantic neighbours. must be an integer >= 1, got 0"),
                             (dict(alpha=True), r"^gtp: alpha must be in \(0, 1\], got True"),
                             (dict(sparsity=0.0), r"^gtp: sparsity must be in \(0, 1\], got 0.0"),
                             (dict(seed=True), "^gtp: seed must be an integer, got True")):
        with pytest.raises((ValueError, TypeError), match=message):
            create_method("gtp", **options)


def test_tome_options_and_layers():
    assert create_method("tome").options == {"r": 8, "layers": None, "prop_attn": True}
    tome = create_method("tome", r=2, layers=(1, 3), prop_attn=False)
    assert tome.options == {"r": 2, "layers": (1, 3), "prop_attn": False} and tome.prop_attn(0) is False
    assert tome.amounts(4) == [0, 2, 0, 2]
    with pytest.raises(ValueError, match="^tome: layer 5 is outside the model's blocks 0..3"):
        create_method("tome", r=2, layers=(5,)).amounts(4)
    with pytest.raises(ValueError, match="^topk: r must be a non-negative integer, got -1"):
        create_method("topk", r=-1)


# --- ToMe's matching and merge by hand -------------------------------------------------------------------------

def test_bipartite_match_uses_cosine_not_dot_product_and_no_prefix_means_every_token():
    from tokenreduce.core.ops import bipartite_match

    # A = positions 0 2, B = 1 3. A0 = (10, 0) is long; A1 = (1, 1) points exactly at B1 = (2, 2).
    # Cosine: A1-B1 = 1 beats A0-B0 (.8); a dot product would pick A0 (10 * 4 = 40 against 4).
    metric = torch.tensor([[[10.0, 0.0], [4.0, 3.0], [1.0, 1.0], [2.0, 2.0]]])
    m = bipartite_match(metric, 1, 0)
    assert (m.src.tolist(), m.dst.tolist(), m.stay.tolist()) == ([[1]], [[1]], [[0]])
    # No prefix: the first A token can merge too (here it is the best match).
    metric = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.2]]])
    m = bipartite_match(metric, 1, 0)
    assert (m.src.tolist(), m.dst.tolist(), m.stay.tolist()) == ([[0]], [[0]], [[1]])


def test_bipartite_match_ties_merge_the_earlier_a_tokens():
    from tokenreduce.core.ops import bipartite_match

    metric = torch.ones(1, 161, 2)  # CLS + 160 identical tokens: every A token matches B token 0 with score 1
    m = bipartite_match(metric, 30, 1)
    assert m.src.tolist() == [list(range(1, 31))] and m.dst.tolist() == [[0] * 30]
    assert m.stay.tolist() == [list(range(31, 81))]


def test_bipartite_merge_of_zero_is_the_state_and_keeps_the_feature_dtype():
    from tokenreduce.core.ops import bipartite_merge, keep_tokens

    state = TokenState(X.clone().to(torch.bfloat16), num_prefix=1)
    assert bipartite_merge(state, torch.randn(1, 5, 2), 0) is state
    merged = bipartite_merge(state, torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]), 1)
    assert merged.x.dtype == torch.bfloat16 and merged.size.dtype == torch.float32
    # No prefix: keep_tokens keeps the patch of the token that lands at position 0.
    plain = TokenState(X[:, 1:].clone(), num_prefix=0).tracked(dense=True)
    kept = keep_tokens(plain, torch.tensor([[2, 0]]))
    assert kept.left.tolist() == [[False, True, False, True]] and kept.owner.tolist() == [[1, -1, 0, -1]]


def test_ppt_schedule_errors_name_the_method():
    with pytest.raises(ValueError, match="^ppt: r lists 5 blocks but the model has 4"):
        create_method("ppt", r=[1, 1, 1, 1, 1]).plan(10, 1, 4)
    with pytest.raises(ValueError, match="^ppt: layer 7 is outside the model's blocks 0..3"):
        create_method("ppt", r=1, layers=(7,)).plan(10, 1, 4)
    assert create_method("ppt", r=1).amounts(12) == [0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]  # default (3, 6, 9)
    assert create_method("ppt", r={0: 2}).amounts(2) == [2, 0]


def test_ppt_options_and_tracking_default():
    assert create_method("ppt").options == {"r": 50, "layers": None, "threshold": 7e-5, "prop_attn": True}
    assert create_method("ppt", r=(4, 0), layers=(1,)).amounts(3) == [0, 4, 0]  # (r, inflection) takes layers
    with pytest.raises(ValueError, match="^ppt: r=.1, 2, 3. names its blocks itself"):
        create_method("ppt", r=(1, 2, 3), layers=(1,))
    with pytest.raises(ValueError, match="^ppt: r must be a non-negative integer, got -1"):
        create_method("ppt", r=-1)
    state = TokenState(torch.zeros(1, 3, 2)).tracked()
    assert state.owner.tolist() == [[1, 2]] and state.left is None and state.left_x is None


def test_max_bipartite_r_is_floor_of_image_tokens_over_two():
    from tokenreduce.core.ops import max_bipartite_r

    cases = {(1, 1): 0, (2, 1): 0, (3, 1): 1, (10, 0): 5, (10, 2): 4, (11, 2): 4, (197, 0): 98, (197, 1): 98,
             (201, 5): 98, (10, 4): 3}
    for (num_tokens, num_prefix), expected in cases.items():
        got = max_bipartite_r(num_tokens, num_prefix)
        assert got == expected and isinstance(got, int), (num_tokens, num_prefix, got)


# --- projections: fused qkv, separate q / kv, cross attention, qk-norm and scale-norm ----------------------------

@pytest.mark.parametrize("fused", [True, False], ids=["fused_sdpa", "full_map"])
@pytest.mark.parametrize("norms", [dict(), dict(qk_norm=True), dict(scale_norm=True)], ids=["plain", "qk", "scale"])
def test_attention_without_sizes_is_the_module_itself(fused, norms):
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, qkv_bias=True, norm_layer=torch.nn.LayerNorm, attn_drop=0.5,
                     **norms).double().eval()  # dropout is off in eval mode
    attn.fused_attn = fused
    with torch.no_grad():  # norms away from the identity, so skipping one shows
        for module in (attn.q_norm, attn.k_norm, attn.norm):
            for p in module.parameters():
                p.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out, _ = attention(attn, x)
    torch.testing.assert_close(out, attn(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_cross_attention_takes_keys_and_values_from_the_context(qkv_bias):
    from tokenreduce.core.attention import project

    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, qkv_bias=qkv_bias).double().eval()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    q, k, v = project(attn, x)
    q2, k2, v2 = project(attn, x[:, 3:], context=x)  # queries of tokens 3, 4; keys and values of all five
    torch.testing.assert_close(q2, q[:, :, 3:], rtol=0, atol=1e-12)
    torch.testing.assert_close((k2, v2), (k, v), rtol=0, atol=1e-12)
    out, _ = attention(attn, x[:, 3:], context=x)
    torch.testing.assert_close(out, attn(x)[:, 3:], rtol=0, atol=1e-12)


def test_separate_q_and_kv_projections_by_hand():
    from tokenreduce.core.attention import project

    class QKV(torch.nn.Module):  # STViT's layout: q and kv Linears, no fused qkv
        def __init__(self):
            super().__init__()
            self.num_heads, self.scale = 2, 0.5
            self.q, self.kv = torch.nn.Linear(4, 4).double(), torch.nn.Linear(4, 8).double()
            self.attn_drop, self.proj, self.proj_drop = torch.nn.Dropout(0.0), torch.nn.Identity(), torch.nn.Identity()

    torch.manual_seed(0)
    module = QKV()
    x, context = torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64)
    for ctx in (None, context):
        q, k, v = project(module, x, ctx)
        keys_from = x if ctx is None else ctx
        kv = module.kv(keys_from).view(1, -1, 2, 2, 2)  # tokens x (k, v) x heads x d_head
        torch.testing.assert_close(q, module.q(x).view(1, 2, 2, 2).transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(k, kv[:, :, 0].transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(v, kv[:, :, 1].transpose(1, 2), rtol=0, atol=0)
    out, _ = attention(module, x, context=context)
    q, k, v = project(module, x, context)
    expected = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(1, 2, 4), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_sdpa", "full_map"])
def test_attention_dropout_only_in_training(fused):
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, attn_drop=0.5).double()
    attn.fused_attn = fused
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    attn.train()
    first, second = attention(attn, x)[0], attention(attn, x)[0]
    assert (first - second).abs().max() > 1e-3  # dropped at random in training
    attn.eval()
    torch.testing.assert_close(attention(attn, x)[0], attention(attn, x)[0], rtol=0, atol=0)


def test_attend_statistics_without_cls_on_the_fused_path_transform_and_checks():
    q, k, v = _qkv(seed=3)
    probs = ((q @ k.transpose(-2, -1)) * 0.5).softmax(dim=-1)
    out, stats = attend(q, k, v, 0.5, need=("cls_attn",), has_cls=False)  # fused by default
    torch.testing.assert_close(stats["cls_attn"], probs.mean(dim=2), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, probs @ v, rtol=0, atol=1e-12)
    # A transform of the map is applied on the default (fused) call too.
    out, _ = attend(q, k, v, 0.5, transform=lambda p: p * 0.5)
    torch.testing.assert_close(out, 0.5 * (probs @ v), rtol=0, atol=1e-12)
    # A float32 size bias with float64 heads.
    bias = torch.tensor([1.0, 2.0, 1.0]).log().view(1, 1, 1, 3)
    out, _ = attend(q, k, v, 0.5, bias)
    expected = ((q @ k.transpose(-2, -1)) * 0.5 + bias.double()).softmax(dim=-1) @ v
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"unknown attention statistics \['bogus'\]"):
        attend(q, k, v, 0.5, need=("bogus",))


def test_attention_output_gate():
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2).double().eval()
    attn.gate = torch.nn.Linear(8, 8).double()  # a gated attention: out * sigmoid(gate(x)) before the projection
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    out, _ = attention(attn, x)
    q, k, v = attn.qkv(x).reshape(1, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
    heads = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1) @ v
    expected = attn.proj(heads.transpose(1, 2).reshape(1, 4, 8) * attn.gate(x).sigmoid())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
