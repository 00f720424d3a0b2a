"""GTP (graph-based token propagation): graph, selection, propagation, schedule, cost, model families."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce as tr
from tokenreduce.core.state import TokenState
from tokenreduce.methods.base import create_method
from tokenreduce.methods.gtp import (
    GRAPH_KEY,
    build_graph,
    current_graph,
    normalise_graph,
    semantic_adjacency,
    sparsify_attention,
    spatial_adjacency,
    spatial_graph,
)

SQ2 = 1 / math.sqrt(2)


def small_deit(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    options = dict(pretrained=False, depth=3, embed_dim=96, num_heads=3, img_size=64)
    return timm.create_model("deit_small_patch16_224", **{**options, **overrides}).eval()


def images(batch: int = 2, size: tuple[int, int] = (64, 64), seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


# --- the graph ----------------------------------------------------------------------------------

def test_spatial_graph_on_3x3_grid_matches_hand_computation():
    adjacency = spatial_adjacency((3, 3))
    # Raster order 0 1 2 / 3 4 5 / 6 7 8: 8-neighbourhood, no self loops.
    neighbours = {
        0: {1, 3, 4}, 1: {0, 2, 3, 4, 5}, 2: {1, 4, 5},
        3: {0, 1, 4, 6, 7}, 4: {0, 1, 2, 3, 5, 6, 7, 8}, 5: {1, 2, 4, 7, 8},
        6: {3, 4, 7}, 7: {3, 4, 5, 6, 8}, 8: {4, 5, 7},
    }
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for i, js in neighbours.items():
        expected[i, list(js)] = True
    assert torch.equal(adjacency, expected)
    assert adjacency.sum(dim=1).tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]

    graph = spatial_graph((3, 3))
    assert graph[0, 1].item() == pytest.approx(1 / math.sqrt(3 * 5))  # corner - edge
    assert graph[0, 4].item() == pytest.approx(1 / math.sqrt(3 * 8))  # corner - centre
    assert graph[1, 4].item() == pytest.approx(1 / math.sqrt(5 * 8))  # edge - centre
    assert graph[4, 4].item() == 0 and graph[0, 8].item() == 0 and graph[0, 2].item() == 0
    assert torch.allclose(graph, graph.T)
    # Cached per (grid, device): the same tensor comes back.
    assert spatial_graph((3, 3)) is graph


def test_spatial_graph_on_non_square_grid():
    adjacency = spatial_adjacency((2, 3))  # 0 1 2 / 3 4 5
    assert adjacency.sum(dim=1).tolist() == [3, 5, 3, 3, 5, 3]
    assert adjacency[0].nonzero().flatten().tolist() == [1, 3, 4]
    assert not adjacency[0, 2] and not adjacency[2, 3]
    assert spatial_adjacency((1, 4)).sum(dim=1).tolist() == [1, 2, 2, 1]


def test_normalisation_uses_row_degrees_elementwise():
    # Directed: row 0 has 2 out-neighbours, rows 1 and 2 one each.
    adjacency = torch.tensor([[0, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    graph = normalise_graph(adjacency)
    expected = torch.tensor([[0, SQ2, SQ2], [0, 0, 1.0], [SQ2, 0, 0]])
    assert torch.allclose(graph, expected)
    # An isolated token (1 x 1 grid) gets a zero row, not NaN.
    assert normalise_graph(torch.zeros(1, 1, dtype=torch.bool)).tolist() == [[0.0]]


@pytest.mark.parametrize("num_prefix", [0, 1, 4])
def test_semantic_graph_has_exactly_k_out_neighbours(num_prefix):
    torch.manual_seed(3)
    grid, k = (4, 5), 3
    x = torch.randn(2, num_prefix + 20, 16)
    if num_prefix:
        x[:, 0] = x[:, num_prefix + 7]  # a prefix token identical to an image token must not be a node
    method = create_method("gtp", r=1, graph="semantic", k=k)
    plan = method.plan(x.shape[1], num_prefix, 2)
    state = method.begin(TokenState(x=x, num_prefix=num_prefix, grid=grid), plan)
    graph = state.extras[GRAPH_KEY]
    assert graph.shape == (2, 20, 20)
    edges = graph > 0
    assert edges.sum(dim=-1).eq(k).all()
    assert not edges.diagonal(dim1=1, dim2=2).any()
    # The neighbours are the k most cosine-similar other image tokens.
    unit = torch.nn.functional.normalize(x[:, num_prefix:], dim=-1)
    similarity = unit @ unit.transpose(1, 2) - 10 * torch.eye(20)
    expected = torch.zeros_like(edges).scatter_(2, similarity.topk(k, dim=-1).indices, True)
    assert torch.equal(edges, expected)
    # Row degree k everywhere: every entry is 1 / sqrt(k * k).
    assert torch.allclose(graph[edges], torch.full((2 * 20 * k,), 1 / k))


def test_mixed_graph_is_union_normalised_by_row_degree():
    torch.manual_seed(4)
    tokens = torch.randn(1, 12, 8)
    union = semantic_adjacency(tokens, 2) | spatial_adjacency((3, 4))
    graph = build_graph(tokens, (3, 4), "mixed", 2)
    assert torch.equal(graph > 0, union)
    degree = union.sum(dim=-1).float()
    i, j = union[0].nonzero()[0].tolist()
    assert graph[0, i, j].item() == pytest.approx(1 / math.sqrt(degree[0, i] * degree[0, j]))


# --- selection and propagation by hand ------------------------------------------------------------

# Two heads, CLS + 4 image tokens on a 1 x 4 grid (a path 0-1-2-3: degrees 1, 2, 2, 1).
HEAD0 = [[0.2, 0.2, 0.2, 0.2, 0.2],
         [0.1, 0.5, 0.2, 0.1, 0.1],
         [0.3, 0.3, 0.1, 0.2, 0.1],
         [0.2, 0.1, 0.1, 0.4, 0.2],
         [0.2, 0.2, 0.2, 0.1, 0.3]]
HEAD1 = [[0.6, 0.1, 0.1, 0.1, 0.1],
         [0.4, 0.2, 0.2, 0.1, 0.1],
         [0.3, 0.1, 0.3, 0.2, 0.1],
         [0.5, 0.1, 0.2, 0.1, 0.1],
         [0.1, 0.1, 0.1, 0.1, 0.6]]
# Image tokens: diag head0 .5 .1 .4 .3, head1 .2 .3 .1 .6 -> u(max) = .5 .3 .4 .6
# column sums head0 1.3 .8 1.0 .9, head1 .6 .9 .6 1.0 -> v(max) = 1.3 .9 1.0 1.0
# score = u * v = .65 .27 .40 .60 -> image token 1 goes first, then 2.
# Means over heads: u = .35 .2 .25 .45, v = .95 .85 .8 .95, score = .3325 .17 .2 .4275 -> 1, then 2.
X = [[9.0, 9.0], [1.0, 0.0], [2.0, 4.0], [0.0, 1.0], [3.0, 3.0]]


def hand_state(owner: bool = True) -> tuple[TokenState, dict]:
    x = torch.tensor([X])
    attn = torch.tensor([[HEAD0, HEAD1]])
    state = TokenState(x=x, num_prefix=1, grid=(1, 4),
                       owner=torch.tensor([[1, 2, 3, 4]]) if owner else None)
    return state, {"attn": attn}


def run_reduce(amount: int, stats: dict | None = None, **options) -> TokenState:
    method = create_method("gtp", r=amount, graph="spatial", **options)
    state, default_stats = hand_state()
    plan = method.plan(5, 1, 1)
    state = method.begin(state, plan)
    return method.reduce(0, state, stats or default_stats, amount)


def test_default_selection_and_propagation_match_hand_computation():
    out = run_reduce(1)
    # Image token 1 (score .27) goes; G[0,1] = 1/sqrt(1*2), G[2,1] = 1/sqrt(2*2), G[3,1] = 0.
    a = 0.1
    expected_x = torch.tensor([[[9.0, 9.0],
                                [1 + a * SQ2 * 2, 0 + a * SQ2 * 4],
                                [0 + a * 0.5 * 2, 1 + a * 0.5 * 4],
                                [3.0, 3.0]]])
    assert torch.allclose(out.x, expected_x)
    assert torch.allclose(out.size, torch.tensor([[[1.0], [1 + a * SQ2], [1 + a * 0.5], [1.0]]]))
    # The graph shrinks to G[K, K] of the kept image tokens 0, 2, 3 (no renormalisation).
    assert torch.allclose(current_graph(out), torch.tensor([[[0, 0, 0], [0, 0, SQ2], [0, SQ2, 0]]]))
    # Patch of image token 1 goes to its largest receiver, image token 0 (new position 1).
    assert out.owner.tolist() == [[1, 1, 2, 3]]


def test_second_block_uses_the_sub_graph_of_the_kept_tokens():
    method = create_method("gtp", r=1, graph="spatial")  # selection switched to cls_attn for block 1
    state, stats = hand_state()
    state = method.begin(state, method.plan(5, 1, 2))
    first = method.reduce(0, state, stats, 1)  # image token 1 goes (see above)
    # Block 1: CLS attention picks current image token 1 (block-0 token 2); in G[K, K] its only kept
    # neighbour is block-0 token 3 (G = 1/sqrt(2 * 1)); block-0 token 0 is no longer adjacent to it.
    method.selection = "cls_attn"
    second = method.reduce(1, first, {"cls_attn": torch.tensor([[[0.5, 0.9, 0.1, 0.9]]])}, 1)
    x2 = [0.1, 1.2]  # block-0 token 2 after receiving 0.1 * G[2, 1] * x1 in block 0
    expected_x = torch.tensor([[[9.0, 9.0], [1 + 0.1 * SQ2 * 2, 0.1 * SQ2 * 4],
                                [3 + 0.1 * SQ2 * x2[0], 3 + 0.1 * SQ2 * x2[1]]]])
    assert torch.allclose(second.x, expected_x)
    assert second.size[0, -1].item() == pytest.approx(1 + 0.1 * SQ2 * (1 + 0.1 * 0.5))
    assert second.owner.tolist() == [[1, 1, 2, 2]]
    assert torch.allclose(current_graph(second), torch.zeros(1, 2, 2))
    assert second.extras[GRAPH_KEY] is state.extras[GRAPH_KEY]  # never rebuilt


def test_mean_selection_two_tokens_and_owner():
    out = run_reduce(2, selection="mixed_attn_mean", alpha=0.5, token_scale=False)
    # Image tokens 1 and 2 go; kept 0 (receives .5 * G[0,1] x1) and 3 (receives .5 * G[3,2] x2).
    expected_x = torch.tensor([[[9.0, 9.0], [1 + 0.5 * SQ2 * 2, 0.5 * SQ2 * 4], [3.0, 3 + 0.5 * SQ2 * 1]]])
    assert torch.allclose(out.x, expected_x)
    assert out.size is None  # token_scale off: no sizes
    assert out.owner.tolist() == [[1, 1, 2, 2]]


def test_propagated_token_without_kept_neighbour_loses_its_patch():
    # CLS attention picks image tokens 0 and 1; token 0's only neighbour (1) goes too.
    cls_attn = torch.tensor([[[0.9, 0.01, 0.02, 0.5, 0.5]]])
    out = run_reduce(2, stats={"cls_attn": cls_attn}, selection="cls_attn")
    expected_x = torch.tensor([[[9.0, 9.0], [0 + 0.1 * 0.5 * 2, 1 + 0.1 * 0.5 * 4], [3.0, 3.0]]])
    assert torch.allclose(out.x, expected_x)
    assert out.owner.tolist() == [[-1, 1, 1, 2]]


def test_prefix_tokens_are_never_candidates_and_receive_nothing():
    state, stats = hand_state()
    attn = stats["attn"].clone()
    attn[..., 0] = 0.0  # CLS would have the lowest score of all if it were a candidate
    out = run_reduce(3, stats={"attn": attn})
    assert out.x[0, 0].tolist() == [9.0, 9.0]
    assert out.x.shape == (1, 2, 2) and out.size[0, 0].item() == 1.0
    # Image token 0 (score .65) stays and receives image token 1, its only neighbour.
    assert torch.allclose(out.x[0, 1], torch.tensor([1 + 0.1 * SQ2 * 2, 0.1 * SQ2 * 4]))


@pytest.mark.parametrize("selection, removed", [("diag", 0), ("col_sum", 1), ("mixed_attn_max", 0),
                                                ("mixed_attn_mean", 0)])
def test_single_statistic_selections(selection, removed):
    # One head; image diag u = .1 .5 .5 .5, column sums v = 2 .5 1 1, u * v = .2 .25 .5 .5.
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, [1, 2, 3, 4], [1, 2, 3, 4]] = torch.tensor([0.1, 0.5, 0.5, 0.5])
    attn[0, 0, 0, [1, 3, 4]] = torch.tensor([1.9, 0.5, 0.5])
    out = run_reduce(1, stats={"attn": attn}, selection=selection)
    if removed == 0:  # image token 0 goes into its only neighbour, image token 1 (G = 1/sqrt(2 * 1))
        expected = [[2 + 0.1 * SQ2 * 1, 4.0], [0.0, 1.0], [3.0, 3.0]]
    else:  # image token 1 goes into image tokens 0 (G = 1/sqrt(1 * 2)) and 2 (G = 1/sqrt(2 * 2))
        expected = [[1 + 0.1 * SQ2 * 2, 0.1 * SQ2 * 4], [0.1 * 0.5 * 2, 1 + 0.1 * 0.5 * 4], [3.0, 3.0]]
    assert torch.allclose(out.x[0, 1:], torch.tensor(expected))


def test_random_selection_is_seeded_and_batch_independent():
    model = small_deit()
    x = images(4)
    tr.patch(model, "gtp", r=3, selection="random", seed=5)
    with torch.no_grad():
        first, again, single = model(x), model(x), model(x[2:3])
        tr.patch(model, "gtp", r=3, selection="random", seed=6)
        other = model(x)
    assert torch.equal(first, again)
    assert torch.allclose(first[2:3], single, atol=1e-5)
    assert not torch.allclose(first, other)


# --- sparsification -------------------------------------------------------------------------------

def test_sparsity_zeroes_the_expected_fraction_without_renormalising():
    probs = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(0)).softmax(dim=-1)
    for theta in (0.6, 0.8, 0.95):
        k = math.floor(100 * (1 - theta))
        out = sparsify_attention(probs, theta)
        zeroed = (out == 0).flatten(2).sum(dim=-1)
        assert zeroed.eq(k - 1).all(), (theta, zeroed)  # strictly below the k-th smallest
        kept = out != 0
        assert torch.equal(out[kept], probs[kept])
        assert (out.sum(dim=-1) <= probs.sum(dim=-1) + 1e-6).all()
    assert sparsify_attention(probs, 1.0) is probs


def test_sparsity_applies_only_below_one_and_only_where_tokens_go():
    method = create_method("gtp", r=[2, 0, 2])
    plan = method.plan(17, 1, 3)
    assert method.attn_transform(0, plan) is None  # theta = 1: off
    sparse = create_method("gtp", r=[2, 0, 2], sparsity=0.6)
    plan = sparse.plan(17, 1, 3)
    assert sparse.attn_transform(0, plan) is not None and sparse.attn_transform(2, plan) is not None
    assert sparse.attn_transform(1, plan) is None
    model = small_deit()
    x = images()
    with torch.no_grad():
        tr.patch(model, "gtp", r=2)
        dense = model(x)
        tr.patch(model, "gtp", r=2, sparsity=0.6)
        sparse_out = model(x)
    assert not torch.allclose(dense, sparse_out, atol=1e-4)


# --- schedule and errors --------------------------------------------------------------------------

def test_token_counts_per_block():
    model = small_deit()
    tr.patch(model, "gtp", r=[3, 0, 5])
    info = tr.describe(model)
    assert info["tokens_in"] == [17, 14, 14] and info["tokens_out"] == [14, 14, 9]
    assert info["graph"] == "mixed" and info["k"] == 8 and info["selection"] == "mixed_attn_max"
    states = tr.trace(model, images())
    assert [s.x.shape[1] for s in states] == [14, 14, 9]
    assert [s.size.shape[1] for s in states] == [14, 14, 9]


def test_error_when_r_removes_every_image_token():
    model = small_deit()
    reference_class = type(model)
    with pytest.raises(ValueError, match=r"gtp: block 2 would remove 6 of its 4 image tokens"):
        tr.patch(model, "gtp", r=6)
    assert type(model) is reference_class
    with pytest.raises(ValueError, match=r"block 0 would remove 16 of its 16"):
        tr.patch(model, "gtp", r=[16])


@pytest.mark.parametrize("options, message", [
    ({"graph": "knn"}, r"unknown graph 'knn'; valid graphs: spatial, semantic, mixed"),
    ({"selection": "cls"}, r"unknown selection 'cls'; valid selections: mixed_attn_max, .*random"),
    ({"k": 0}, r"k \(semantic neighbours\) must be an integer >= 1, got 0"),
    ({"alpha": 0}, r"alpha must be in \(0, 1\], got 0"),
    ({"alpha": 1.5}, r"alpha must be in \(0, 1\], got 1.5"),
    ({"sparsity": 0.0}, r"sparsity must be in \(0, 1\], got 0.0"),
    ({"sparsity": 1.2}, r"sparsity must be in \(0, 1\], got 1.2"),
    ({"r": -1}, r"r must be a non-negative integer, got -1"),
    ({"k": 16, "r": 1}, r"the mixed graph needs k < 16 image tokens, got k=16"),
])
def test_bad_options_are_refused(options, message):
    model = small_deit()
    with pytest.raises(ValueError, match=message):
        tr.patch(model, "gtp", **options)
    assert tr.describe(model)["method"] is None


# --- whole models ---------------------------------------------------------------------------------

def test_r0_equals_unpatched_and_unpatch_restores_exactly():
    model = small_deit()
    x = images()
    with torch.no_grad():
        reference = model(x)
        tr.patch(model, "gtp", r=0, sparsity=0.5)
        # r=0: timm's own ops, sparsity idle (measured: identical); 1e-6 allows a valid reordering only
        torch.testing.assert_close(model(x), reference, atol=1e-6, rtol=0)
        tr.patch(model, "gtp", r=4)
        assert not torch.allclose(model(x), reference, atol=1e-3)
        tr.unpatch(model)
        assert torch.equal(model(x), reference)


@pytest.mark.parametrize("graph", ["mixed", "spatial", "semantic"])
def test_batch_independence(graph):
    model = tr.patch(small_deit(), "gtp", r=4, graph=graph, k=3)
    x = images(4)
    with torch.no_grad():
        batched = model(x)
        singles = torch.cat([model(x[i:i + 1]) for i in range(4)])
    # The graph is built per image; only the matmul blocking changes with the batch (measured <= 3.6e-7).
    torch.testing.assert_close(batched, singles, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name, num_prefix", [
    ("deit_base_distilled_patch16_224", 2),
    ("vit_medium_patch16_reg4_gap_256", 4),
])
def test_prefix_tokens_are_kept(name, num_prefix):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=3, embed_dim=64, num_heads=2, img_size=64).eval()
    assert model.num_prefix_tokens == num_prefix
    x = images()
    tr.patch(model, "gtp", r=0)
    unreduced = tr.trace(model, x)
    tr.patch(model, "gtp", r=5, alpha=1.0)
    reduced = tr.trace(model, x)
    assert [s.x.shape[1] for s in reduced] == [num_prefix + 16 - 5 * (i + 1) for i in range(3)]
    # Block 0: same attention, so the prefix tokens (which receive nothing; the MLP is per token) match.
    assert torch.allclose(reduced[0].x[:, :num_prefix], unreduced[0].x[:, :num_prefix], atol=1e-6)
    assert torch.equal(reduced[0].size[:, :num_prefix], torch.ones(2, num_prefix, 1))
    owner = reduced[-1].owner
    assert ((owner >= num_prefix) | (owner == -1)).all()
    with torch.no_grad():
        assert model(x).shape == (2, 1000)


def test_non_square_grid_with_dynamic_img_size():
    model = small_deit(dynamic_img_size=True)
    x = images(2, (48, 80))  # 3 x 5 patches
    with torch.no_grad():
        reference = model(x)
        tr.patch(model, "gtp", r=0)
        torch.testing.assert_close(model(x), reference, atol=1e-6, rtol=0)  # as at the default size
        tr.patch(model, "gtp", r=4, graph="mixed", k=4)
        states = tr.trace(model, x)
    assert states[0].grid == (3, 5)
    assert [s.x.shape[1] for s in states] == [12, 8, 4]
    assert tr.describe(model, img_size=(48, 80))["tokens_out"] == [12, 8, 4]
    assert spatial_adjacency((3, 5)).shape == (15, 15)


def test_gradients_reach_parameters_in_train_mode():
    model = tr.patch(small_deit(), "gtp", r=3).train()
    model(images()).logsumexp(dim=-1).sum().backward()
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.2.mlp.fc2.weight", "pos_embed"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("sparsity", [1.0, 0.8])
def test_bfloat16(sparsity):
    # Low precision flips near-ties of the token choice (and, with sparsity < 1, of which attention entries are
    # zeroed): such an image then differs from float32 by more than rounding. The rounding bound (4 unit
    # roundoffs u) is checked where the choice matches float32's.
    model = tr.patch(small_deit(), "gtp", r=3, sparsity=sparsity)
    x = images(8)
    with torch.no_grad():
        reference, reference_states = model(x), tr.trace(model, x)
        runs = {}
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                runs[f"{dtype} autocast"] = dtype, model(x), tr.trace(model, x)
        model.to(torch.bfloat16)
        runs["bfloat16 weights"] = torch.bfloat16, model(x.bfloat16()), tr.trace(model, x.bfloat16())
    roundoff = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
    for name, (dtype, out, states) in runs.items():
        assert out.dtype == dtype and bool(torch.isfinite(out.float()).all()), name
        assert states[-1].size.dtype == torch.float32, name
        block = -1 if sparsity == 1.0 else 0  # the whole model, or the first block (sparsified attention)
        same = (states[block].owner == reference_states[block].owner).all(dim=1)
        # Measured: float16 keeps every image's choice; bfloat16 3 of 8 at sparsity 1, 3 of 8 at block 0 at 0.8.
        assert same.sum() >= (4 if dtype == torch.float16 else 1), (name, same)
        if sparsity == 1.0:  # logits of the images that removed the same tokens everywhere
            # measured <= 8.6e-3 relative in bfloat16 (2.2 u), 9.8e-4 in float16 (2.0 u)
            error = (out.float() - reference)[same].norm(dim=-1) / reference[same].norm(dim=-1)
        else:  # block 0's features; later blocks see differently sparsified maps (logits moved up to 0.07)
            got, expected = states[0].x.float()[same], reference_states[0].x[same]
            error = (got - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)  # measured <= 1.3 u
        assert bool((error < 4 * roundoff[dtype]).all()), (name, error)


@pytest.mark.parametrize("options", [
    {"r": 3},
    {"r": [2, 5, 0], "graph": "spatial"},
    {"r": 3, "graph": "semantic", "k": 3, "token_scale": False},
])
def test_analytic_flops_match_flop_counter(options):
    model = small_deit(depth=4)
    tr.patch(model, "gtp", **options)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(images(1))
    counted = counter.get_total_flops() / 2
    report = tr.flops(model)
    assert report.overhead_gmacs > 0
    assert report.total_gmacs * 1e9 == pytest.approx(counted, rel=0.01)
    # Every matrix product is accounted for, the graph and the propagation included: the counts agree exactly.
    assert report.total_gmacs * 1e9 == pytest.approx(counted, abs=1)


# --- the map statistics without the whole map (core.attention.map_statistics) ---------------------

@pytest.mark.parametrize("kernel", ["chunked", "fused"])
# one query row, three query rows of one image, two images, the default (the whole batch)
@pytest.mark.parametrize("chunk_elements", [1, 3 * 3 * 7, 2 * 3 * 7 * 7, None])
def test_map_statistics_equal_the_full_map(kernel, chunk_elements):
    from tokenreduce.core.attention import attend, map_statistics

    q, k, v = torch.randn(3, 5, 3, 7, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    bias = torch.rand(5, 1, 1, 7, generator=torch.Generator().manual_seed(1)).add(0.5).log()
    reference, full = attend(q, k, v, 8 ** -0.5, bias, need=("attn",), fused=False)
    out, stats = map_statistics(q, k, v, 8 ** -0.5, bias, kernel=kernel, chunk_elements=chunk_elements)
    torch.testing.assert_close(stats["col_sum"], full["attn"].sum(dim=-2), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["diag"], full["attn"].diagonal(dim1=-2, dim2=-1), atol=1e-7, rtol=0)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    whole_images = chunk_elements is None or chunk_elements >= 3 * 7 * 7
    if kernel == "chunked" and whole_images:  # the reference arithmetic, image by image: bit for bit
        assert torch.equal(out, reference) and torch.equal(stats["col_sum"], full["attn"].sum(dim=-2))
        assert torch.equal(stats["diag"], full["attn"].diagonal(dim1=-2, dim2=-1))


@pytest.mark.parametrize("chunk_elements", [3 * 3 * 7, None])  # three query rows of one image; the whole batch
def test_mean_query_row_of_a_model_without_cls_comes_from_the_chunks(chunk_elements, monkeypatch):
    """Without a CLS token the "CLS row" (Top-K, EViT, PPT) is the mean of all query rows: made from the chunks'
    column sums, never from the whole map (video: 1,568 tokens); with one chunk, bit for bit the full map's mean."""
    from tokenreduce.core import attention

    q, k, v = torch.randn(3, 5, 3, 7, 8, generator=torch.Generator().manual_seed(2)).unbind(0)
    bias = torch.rand(5, 1, 1, 7, generator=torch.Generator().manual_seed(3)).add(0.5).log()
    reference, full = attention.attend(q, k, v, 8 ** -0.5, bias, need=("attn",), fused=False)
    if chunk_elements is not None:
        monkeypatch.setattr(attention, "MAP_CHUNK_ELEMENTS", chunk_elements)
    made, map_chunk = [], attention._map_chunk

    def recorded(*args):
        probs = map_chunk(*args)
        made.append(probs.numel())
        return probs

    monkeypatch.setattr(attention, "_map_chunk", recorded)
    out, stats = attention.attend(q, k, v, 8 ** -0.5, bias, need=("cls_attn",), has_cls=False)
    assert set(stats) == {"cls_attn"} and stats["cls_attn"].dtype == torch.float32
    if chunk_elements is None:
        assert made == [5 * 3 * 7 * 7]
        assert torch.equal(stats["cls_attn"], full["attn"].mean(dim=2)) and torch.equal(out, reference)
    else:
        assert max(made) == chunk_elements and len(made) == 5 * 3  # 3 row blocks (3, 3, 1 rows) per image
        torch.testing.assert_close(stats["cls_attn"], full["attn"].mean(dim=2), atol=1e-7, rtol=0)
        torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


def test_map_statistics_refuse_an_unknown_kernel():
    from tokenreduce.core.attention import map_statistics

    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="unknown map kernel 'flash'; known: auto, chunked, fused"):
        map_statistics(q, q, q, 0.5, kernel="flash")


@pytest.mark.parametrize("selection", ["mixed_attn_max", "mixed_attn_mean", "col_sum", "diag"])
def test_chunked_map_equals_the_full_map_reference(selection, monkeypatch):
    from tokenreduce.core import attention

    monkeypatch.setattr(attention, "MAP_CHUNK_ELEMENTS", 3 * 17 * 17 * 2)  # two images per chunk: 3 chunks
    model = small_deit()
    x = images(5)
    with torch.no_grad():
        tr.patch(model, "gtp", r=4, selection=selection, map="full")
        reference, reference_states = model(x), tr.trace(model, x)
        tr.patch(model, "gtp", r=4, selection=selection)
        chunked, states = model(x), tr.trace(model, x)
    assert tr.describe(model)["map"] == "chunked"
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)
    assert all(torch.equal(a.owner, b.owner) for a, b in zip(states, reference_states, strict=True))


def test_unknown_map_is_refused():
    with pytest.raises(ValueError, match="gtp: unknown map 'dense'; valid: chunked, full"):
        tr.patch(small_deit(), "gtp", map="dense")
