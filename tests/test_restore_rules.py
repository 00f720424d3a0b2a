"""The restore rules of a dense output (``core.restore``): hand-computed on a few tokens, followed through later
departures and merges, chosen by name on the patched model and on ``tr.restore``, counted in ``tr.flops``, the same
under ``torch.compile`` and in every family, and absent from the path without dense output."""

from __future__ import annotations

import math
from importlib.util import find_spec

import pytest
import timm
import torch
from conftest import NO_OP, REDUCING, images, make_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce as tr
from tokenreduce.core import ops
from tokenreduce.core.restore import RestoreRule, restore_macs
from tokenreduce.core.state import TokenState
from tokenreduce.methods.base import create_method

PRUNING = ["evit", "gtp", "ppt", "topk"]
COMMON = ["departure", "nearest", "reconstruct", "ridge"]
RULES = {"topk": COMMON, "evit": COMMON, "ppt": COMMON, "gtp": [*COMMON, "graph"], "tome": COMMON}
ALL_RULES = [(m, r) for m, rules in RULES.items() for r in rules]


def tracked(x: torch.Tensor, rule: str, num_prefix: int = 1, **options) -> TokenState:
    return TokenState(x, num_prefix=num_prefix).tracked(dense=True).replace(rule=RestoreRule(rule, **options))


# --- hand-computed on 3-5 tokens ----------------------------------------------------------------------------
# Prefix token 0, image tokens 1..4; token 4 is [1, 0.25]: closest (cosine) to token 1 [1, 0], then token 3 [1, 1].
X = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.25]]])


@pytest.mark.floor
def test_nearest_gives_a_pruned_patch_the_final_feature_of_its_most_similar_remaining_token():
    kept = ops.keep_tokens(tracked(X, "nearest"), torch.tensor([[1, 2, 3]]))  # token 4 leaves
    assert kept.left.tolist() == [[False, False, False, True]]
    # patch 3 (token 4) links to token 1, now at position 1 (the prefix stays at 0); never to the prefix
    assert kept.left_weights[0, 3].tolist() == [0.0, 1.0, 0.0, 0.0]
    final = kept.replace(x=torch.tensor([[[0.0, 0.0], [7.0, 8.0], [2.0, 3.0], [4.0, 6.0]]]))  # later blocks
    full = ops.restore(final)
    assert full[0, 4].tolist() == [7.0, 8.0]  # token 1's final feature, not token 4's departure feature
    assert ops.restore(final, "departure")[0, 4].tolist() == [1.0, 0.25]
    assert full[0, :4].tolist() == final.x[0].tolist()


@pytest.mark.floor
def test_reconstruct_weights_the_k_most_similar_by_softmax_of_tau_times_cosine():
    kept = ops.keep_tokens(tracked(X, "reconstruct", k=2, tau=10.0), torch.tensor([[1, 2, 3]]))
    cos1, cos3 = 1 / math.hypot(1, 0.25), 1.25 / (math.hypot(1, 0.25) * math.sqrt(2))
    w1 = math.exp(10 * cos1) / (math.exp(10 * cos1) + math.exp(10 * cos3))
    torch.testing.assert_close(kept.left_weights[0, 3], torch.tensor([0.0, w1, 0.0, 1 - w1]), rtol=0, atol=1e-6)
    final = kept.replace(x=torch.tensor([[[0.0, 0.0], [10.0, 0.0], [2.0, 3.0], [0.0, 10.0]]]))
    torch.testing.assert_close(ops.restore(final)[0, 4], torch.tensor([10 * w1, 10 * (1 - w1)]), rtol=0, atol=1e-5)


@pytest.mark.floor
def test_reconstruct_distance_weights_are_expedits_exp_of_minus_tau_squared_distance():
    kept = ops.keep_tokens(tracked(X, "reconstruct", k=2, tau=0.5, weights="distance"), torch.tensor([[1, 2, 3]]))
    d1, d3 = 0.25 ** 2, 0.75 ** 2  # squared distances of [1, 0.25] to [1, 0] and [1, 1]
    w1 = math.exp(-0.5 * d1) / (math.exp(-0.5 * d1) + math.exp(-0.5 * d3))
    torch.testing.assert_close(kept.left_weights[0, 3], torch.tensor([0.0, w1, 0.0, 1 - w1]), rtol=0, atol=1e-6)


@pytest.mark.floor
def test_ridge_gives_the_regression_of_the_remaining_tokens_by_hand():
    # Remaining image tokens [1, 0] and [0, 1] (token 2 and a copy of it leave), leaving [1, 0.25]. Centred on
    # their mean [.5, .5], the remaining ones are +-[.5, -.5]: an eigenvector of their Gram with eigenvalue 1, so
    # the dual solve is c = +-(a.(1, -1) / 2) / (1 + lam) and the weights 1/2 +- that, a the unit-length leaving one.
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.25]]])
    kept = ops.keep_tokens(tracked(x, "ridge", lam=1.0), torch.tensor([[1, 2]]))
    a = torch.tensor([1.0, 0.25]) / math.hypot(1, 0.25)
    c = float(a[0] - a[1]) / 2 / (1 + 1.0)
    torch.testing.assert_close(kept.left_weights[0, 2], torch.tensor([0.0, 0.5 + c, 0.5 - c]), rtol=0, atol=1e-6)
    final = kept.replace(x=torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]]))
    torch.testing.assert_close(ops.restore(final)[0, 3], torch.tensor([10 * (0.5 + c), 10 * (0.5 - c)]),
                               rtol=0, atol=1e-5)


@pytest.mark.floor
def test_ridge_recovers_an_affine_map_that_a_weighted_average_cannot(monkeypatch):
    # 5 remaining tokens in 2-d, final features an affine image of their unit-length features: with a tiny lam (and
    # the Chebyshev steps it needs to converge there) the leaving token gets its own affine image, even outside the
    # remaining ones' convex hull (reconstruct cannot).
    from tokenreduce.core import restore as restore_module

    monkeypatch.setattr(restore_module, "RIDGE_STEPS", 500)
    angles = torch.tensor([0.0, 0.4, 0.9, 1.3, 1.7, 2.6])  # the last one leaves, beyond the others
    x = torch.cat([torch.tensor([[9.0, 9.0]]), torch.stack([angles.cos(), angles.sin()], 1)]).unsqueeze(0)
    kept = ops.keep_tokens(tracked(x, "ridge", lam=1e-4), torch.tensor([[1, 2, 3, 4, 5]]))
    w, bias = torch.tensor([[2.0, -1.0], [0.3, 4.0]]), torch.tensor([1.0, -1.0])
    final = kept.replace(x=torch.cat([torch.zeros(1, 1, 2), kept.x[:, 1:] @ w + bias], dim=1))
    torch.testing.assert_close(ops.restore(final)[0, 6], x[0, 6] @ w + bias, rtol=0, atol=3e-3)
    reconstructed = ops.restore(ops.keep_tokens(tracked(x, "reconstruct"), torch.tensor([[1, 2, 3, 4, 5]]))
                                .replace(x=final.x))
    assert (reconstructed[0, 6] - (x[0, 6] @ w + bias)).abs().max() > 0.5


def test_ridge_links_as_reconstruct_past_its_token_cap_and_counts_so(monkeypatch):
    from tokenreduce.core import restore as restore_module

    remaining = torch.tensor([[1, 2, 3]])
    ridge = ops.keep_tokens(tracked(X, "ridge"), remaining).left_weights
    reconstruct = ops.keep_tokens(tracked(X, "reconstruct"), remaining).left_weights
    assert not torch.allclose(ridge, reconstruct)
    costs = {name: restore_macs(RestoreRule(name), [1], [5], 1, 4, 2, 4) for name in ("ridge", "reconstruct")}
    assert costs["ridge"] > costs["reconstruct"]
    monkeypatch.setattr(restore_module, "RIDGE_MAX_TOKENS", 2)  # 3 image tokens remain: past the cap
    assert torch.equal(ops.keep_tokens(tracked(X, "ridge"), remaining).left_weights, reconstruct)
    assert restore_macs(RestoreRule("ridge"), [1], [5], 1, 4, 2, 4) == costs["reconstruct"]


def exact_ridge(leaving: torch.Tensor, remaining: torch.Tensor, lam: float) -> torch.Tensor:
    a, b = torch.nn.functional.normalize(leaving, dim=-1), torch.nn.functional.normalize(remaining, dim=-1)
    mean = b.mean(1, keepdim=True)
    a, b = (a - mean).double(), (b - mean).double()
    c = torch.linalg.solve(b @ b.transpose(1, 2) + lam * torch.eye(b.shape[1], dtype=torch.float64),
                           b @ a.transpose(1, 2)).transpose(1, 2)
    return (c - c.mean(-1, keepdim=True) + 1 / b.shape[1]).float()


def test_ridge_chebyshev_steps_reach_the_exact_solve():
    from tokenreduce.core.restore import RIDGE_STEPS, ridge_weights

    # Features like a ViT's: a few strong directions and some noise.
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 64, generator=generator)
    scale = torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0, 0.5])
    remaining, leaving = ((torch.randn(2, n, 6, generator=generator) * scale) @ basis
                          + 0.3 * torch.randn(2, n, 64, generator=generator) for n in (60, 8))
    exact = exact_ridge(leaving, remaining, 0.1)
    errors = [(ridge_weights(leaving, remaining, 0.1, steps=s) - exact).abs().max() for s in (8, RIDGE_STEPS, 200)]
    assert errors[0] > errors[1] > errors[2]  # each step brings it closer
    assert errors[1] < 0.1 * exact.abs().max() and errors[2] < 1e-5
    torch.testing.assert_close(ridge_weights(leaving, remaining, 0.1).sum(-1), torch.ones(2, 8), rtol=0, atol=1e-5)


def test_ridge_residual_after_k_steps_is_the_scaled_chebyshev_polynomial():
    # The defining property of Chebyshev iteration on the bounds [lam, lam + ||A||_F] (centre c, radius r): after k
    # steps the residual is p_k(A + lam I) rhs, with p_k(mu) = T_k((c - mu) / r) / T_k(c / r). Checked in float64 in
    # the Gram's eigenbasis; any slip in the recurrence's coefficients breaks it.
    from numpy.polynomial.chebyshev import chebval

    from tokenreduce.core.restore import ridge_weights

    generator = torch.Generator().manual_seed(2)
    remaining = torch.randn(1, 12, 8, generator=generator, dtype=torch.float64)
    leaving = torch.randn(1, 3, 8, generator=generator, dtype=torch.float64)
    lam, steps = 0.1, 5
    weights = ridge_weights(leaving, remaining, lam, steps=steps)
    a, b = torch.nn.functional.normalize(leaving, dim=-1), torch.nn.functional.normalize(remaining, dim=-1)
    mean = b.mean(1, keepdim=True)
    a, b = (a - mean)[0], (b - mean)[0]
    gram, rhs = b @ b.T, b @ a.T
    solution = (weights[0] - 1 / 12).T  # the solve's columns sum to 0 (the features are centred)
    residual = rhs - (gram + lam * torch.eye(12, dtype=torch.float64)) @ solution
    centre, radius = lam + gram.norm() / 2, gram.norm() / 2
    eigenvalues, basis = torch.linalg.eigh(gram)
    degree = [0] * steps + [1]
    scale = torch.from_numpy(chebval(((centre - eigenvalues - lam) / radius).numpy(), degree)
                             / chebval(float(centre / radius), degree))
    torch.testing.assert_close(residual, basis @ (scale[:, None] * (basis.T @ rhs)), rtol=0, atol=1e-8)


def test_ridge_weights_move_smoothly_with_the_features():
    # The failure conjugate gradients had: stopped before converging, their step sizes (ratios of inner products)
    # turned rounding-level differences into 0.07 in the restored features. A fixed polynomial cannot.
    from tokenreduce.core.restore import ridge_weights

    # Decaying spectrum, as a ViT's features have (on these, 16 CG steps moved by 9e-4 to 4e-3 for seeds 0-2).
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(24, 96, generator=generator)
    remaining, leaving = ((torch.randn(3, n, 24, generator=generator) * torch.logspace(0.6, -1.5, 24)) @ basis
                          + 0.05 * torch.randn(3, n, 96, generator=generator) for n in (150, 40))
    nudge = 1e-6 * torch.randn(remaining.shape, generator=generator)
    change = (ridge_weights(leaving, remaining + nudge, 0.1) - ridge_weights(leaving, remaining, 0.1)).abs().max()
    assert change < 1e-4
    alone = torch.cat([ridge_weights(leaving[i:i + 1], remaining[i:i + 1], 0.1) for i in range(3)])
    torch.testing.assert_close(alone, ridge_weights(leaving, remaining, 0.1), rtol=0, atol=1e-5)


@pytest.mark.floor
def test_links_are_followed_through_later_departures_and_merges():
    # block a: token 4 leaves (-> token 1); block b: token 1 leaves (-> token 3, its nearest of 2 and 3)
    first = ops.keep_tokens(tracked(X, "nearest"), torch.tensor([[1, 2, 3]]))
    second = ops.keep_tokens(first, torch.tensor([[2, 3]]))  # current tokens [prefix, t1, t2, t3]: t1 leaves
    assert second.left.tolist() == [[True, False, False, True]]
    # patches 0 (token 1) and 3 (token 4, linked to token 1) both follow token 1 to token 3, now at position 2
    assert second.left_weights[0, 0].tolist() == [0.0, 0.0, 1.0]
    assert second.left_weights[0, 3].tolist() == [0.0, 0.0, 1.0]
    final = second.replace(x=torch.tensor([[[0.0, 0.0], [2.0, 2.0], [9.0, 9.0]]]))
    assert ops.restore(final)[0, 1:].tolist() == [[9.0, 9.0], [2.0, 2.0], [9.0, 9.0], [9.0, 9.0]]
    # a later merge adds the columns of the merged tokens: the link moves with the merged token
    merged = ops.bipartite_merge(final, torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]), 1)
    assert merged.x.shape[1] == 2 and merged.left_weights[0, 3].tolist() == [0.0, 1.0]
    assert ops.restore(merged)[0, 4].tolist() == merged.x[0, 1].tolist()


@pytest.mark.floor
def test_gtp_graph_rule_uses_the_normalised_propagation_weights():
    """A 2 x 2 grid, spatial graph (every cell neighbours the 3 others: G = 1/3 off the diagonal). The token with
    the lowest score is propagated into the 3 others, so its patch gets their mean final feature."""
    method = create_method("gtp", r=[1], graph="spatial", selection="diag", restore="graph")
    plan = method.plan(5, 1, 1)
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 3.0]]])
    state = TokenState(x, num_prefix=1, grid=(2, 2)).tracked(dense=True).replace(rule=method.restore_rule)
    state = method.begin(state, plan)
    stats = {"diag": torch.tensor([[[1.0, 0.9, 0.1, 0.8, 0.7]]])}  # image token 2 (patch 1) scores lowest
    out = method.reduce(0, state, stats, 1)
    assert out.left.tolist() == [[False, True, False, False]]
    torch.testing.assert_close(out.left_weights[0, 1], torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]), rtol=0, atol=1e-6)
    final = out.replace(x=torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 6.0], [9.0, 3.0]]]))
    torch.testing.assert_close(ops.restore(final)[0, 2], torch.tensor([4.0, 3.0]), rtol=0, atol=1e-6)


@pytest.mark.floor
def test_gtp_graph_rule_keeps_the_departure_feature_without_a_kept_neighbour():
    links = torch.zeros(1, 1, 4)  # the leaving token reached nobody
    state = tracked(X, "graph")
    index = torch.tensor([[0, 1, 2, 3]])
    out = ops.depart(state, index, torch.tensor([[4]]), links)
    assert out.left_weights[0, 3].tolist() == [0.0] * 4
    owner = ops.remap_owner(out.owner, ops.kept_destination(index, 5))
    moved = out.replace(x=ops.keep(out.x, index) + 50.0, owner=owner)
    assert ops.restore(moved)[0, 4].tolist() == [1.0, 0.25]


@pytest.mark.floor
def test_evit_fused_token_gets_an_empty_column_and_can_be_linked_to_later():
    method = create_method("evit", r=[2, 2], layers=None, restore="nearest")
    plan = method.plan(5, 1, 2)
    state = TokenState(X.clone(), num_prefix=1, grid=(2, 2)).tracked(dense=True).replace(rule=method.restore_rule)
    stats = {"cls_attn": torch.tensor([0.1, 0.4, 0.3, 0.1, 0.1]).view(1, 1, -1).expand(1, 2, -1)}
    out = method.reduce(0, state, stats, plan.amounts[0])  # tokens 3 and 4 leave, fused token appended
    assert out.x.shape[1] == 4 and out.left_weights.shape == (1, 4, 4)
    assert out.left_weights[0, :, 3].tolist() == [0.0] * 4  # nobody links to the new fused token
    # token 3 [1, 1] and token 4 [1, 0.25]: nearest remaining image tokens are... token 1 [1, 0] for token 4, and
    # token 1 or 2 tie for token 3 (cosine 0.707 each): the first (token 1) wins
    assert out.left_weights[0, 2].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert out.left_weights[0, 3].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_ppt_mixed_batch_selects_the_weights_per_image():
    torch.manual_seed(4)
    method = create_method("ppt", r=2, layers=(0,), threshold=1e-3, restore="nearest")
    plan = method.plan(9, 1, 1)
    x = torch.randn(2, 9, 4)
    state = TokenState(x, num_prefix=1, grid=(2, 4)).tracked(dense=True).replace(rule=method.restore_rule)
    flat, peaked = torch.full((8,), 1 / 8), torch.tensor([0.5, 0.3, 0.1, 0.04, 0.03, 0.02, 0.005, 0.005])
    cls = torch.stack([torch.cat([torch.zeros(1), flat]), torch.cat([torch.zeros(1), peaked])]).view(2, 1, 9)
    stats = {"cls_attn": cls, "value_norm": torch.ones(2, 9), "metric": torch.randn(2, 9, 3)}
    out = method.reduce(0, state, stats, plan.amounts[0])
    assert method.diagnostics([out])["pooled_share"] == {0: 0.5}
    assert out.left[0].sum() == 0 and out.left[1].sum() == 2  # image 0 pooled, image 1 pruned 2
    assert out.left_weights[0].abs().sum() == 0
    assert out.left_weights[1].sum(dim=-1).tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


# --- choosing a rule ---------------------------------------------------------------------------------------------
@pytest.mark.floor
@pytest.mark.parametrize("method", sorted(RULES))
def test_every_method_has_a_documented_default_rule(method):
    model = tr.patch(make_model("deit_small_patch16_224"), method, **REDUCING[method])
    default = create_method(method).default_restore
    assert tr.describe(model)["restore"]["name"] == default
    assert default in RULES[method]


@pytest.mark.parametrize("kwargs,message", [
    (dict(restore="graph"), "restore rule 'graph' is not available.*valid: departure, nearest, reconstruct"),
    (dict(restore="closest"), "unknown restore rule 'closest'"),
    (dict(restore="reconstruct", restore_k=0), "restore_k must be an integer >= 1, got 0"),
    (dict(restore="reconstruct", restore_tau=-1.0), "restore_tau must be a positive number, got -1.0"),
    (dict(restore="reconstruct", restore_weights="dot"), "unknown restore_weights 'dot'"),
    (dict(restore="ridge", restore_lambda=0), "restore_lambda must be a positive number, got 0"),
    (dict(restore="ridge", restore_lambda=True), "restore_lambda must be a positive number, got True"),
    (dict(restore=3), "restore must be a rule name or a RestoreRule"),
])
def test_bad_restore_options_are_clear_errors_and_change_nothing(kwargs, message):
    model = tr.patch(make_model("deit_small_patch16_224"), "tome", r=2)
    with pytest.raises(ValueError, match=message):
        tr.patch(model, "topk", **REDUCING["topk"], **kwargs)
    assert tr.describe(model)["method"] == "tome"


def test_restore_with_a_rule_the_state_was_not_traced_with_is_a_clear_error():
    model = tr.patch(make_model("deit_small_patch16_224"), "topk", restore="nearest", **REDUCING["topk"])
    state = tr.trace(model, images(model))[-1]
    with pytest.raises(ValueError, match="traced with the 'nearest' restore rule.*restore='reconstruct'"):
        tr.restore(state, "reconstruct")
    with pytest.raises(ValueError, match="unknown restore rule 'near'"):
        tr.restore(state, "near")
    with pytest.raises(ValueError, match="unknown options \\['restor'\\]"):
        tr.trace(model, images(model), restor="nearest")
    traced = tr.trace(model, images(model), restore="reconstruct", restore_k=2)[-1]
    assert traced.rule == RestoreRule("reconstruct", k=2)
    assert tr.describe(model)["restore"] == {"name": "nearest"}  # the model keeps its own rule


def test_a_ready_method_instance_takes_restore_options_without_being_changed():
    method = create_method("topk", **REDUCING["topk"])
    model = tr.patch(make_model("deit_small_patch16_224"), method, restore="departure")
    assert tr.method_of(model).restore_rule.name == "departure"
    assert method.restore_rule.name == method.default_restore
    with pytest.raises(ValueError, match="given with a ready Method instance"):
        tr.patch(model, method, keep_rate=0.5)


@pytest.mark.floor
@pytest.mark.parametrize("method,rule", ALL_RULES)
def test_forward_features_equals_the_restore_of_the_traced_state_under_every_rule(method, rule):
    model = tr.patch(make_model("vit_medium_patch16_reg4_gap_256"), method, restore=rule, **REDUCING[method])
    x = images(model)
    with torch.no_grad():
        features = model.forward_features(x)
        state = tr.trace(model, x)[-1]
        final, layers = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC")
        logits = model(x)
    assert state.rule.name == rule
    assert torch.equal(features, model.norm(tr.restore(state)))
    assert torch.equal(final, tr.restore(state))
    assert torch.equal(logits, model.forward_head(features))  # the avg-pooled head pools the restored grid
    if method != "tome":
        departure = model.norm(tr.restore(state, "departure"))
        left = torch.cat([torch.zeros_like(state.left[:, :model.num_prefix_tokens]), state.left], dim=1)
        assert bool(state.left.any())
        assert torch.equal(departure[~left], features[~left])  # patches that never left: the same under every rule
        assert (rule == "departure") == torch.equal(departure, features)


@pytest.mark.floor
@pytest.mark.parametrize("method,rule", ALL_RULES)
def test_nothing_removed_restores_the_unreduced_tokens_under_every_rule(method, rule):
    model = make_model("deit_small_patch16_224")
    x = images(model)
    with torch.no_grad():
        expected = model.forward_features(x)
        tr.patch(model, method, restore=rule, **NO_OP[method])
        assert torch.equal(model.forward_features(x), expected)


# --- cost -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,rule", [(m, r) for m, r in ALL_RULES if m != "tome"])
def test_restore_gmacs_are_what_flop_counter_mode_counts_beyond_the_departure_rule(method, rule):
    model = make_model("deit_small_patch16_224")
    x = images(model, batch=1)
    counted = {}
    for name in ("departure", rule):
        tr.patch(model, method, restore=name, **REDUCING[method])
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model.forward_features(x)
        counted[name] = counter.get_total_flops() / 2
    report = tr.flops(model)
    assert counted[rule] - counted["departure"] == pytest.approx(report.restore_gmacs * 1e9, rel=1e-9)
    assert (report.restore_gmacs > 0) == (rule != "departure")
    assert report.dense_gmacs == pytest.approx(report.total_gmacs + report.restore_gmacs)


def test_tome_leaves_nothing_so_no_rule_costs_anything():
    model = tr.patch(make_model("deit_small_patch16_224"), "tome", r=4, restore="reconstruct")
    assert tr.flops(model).restore_gmacs == 0
    assert restore_macs(RestoreRule("reconstruct"), [0, 0], [10, 10], 1, 9, 8, 10) == 0
    pooling = tr.patch(make_model("deit_small_patch16_224"), "ppt", r=4, layers=(1, 2), threshold=math.inf)
    assert tr.flops(pooling).restore_gmacs == 0  # every image pools: nothing leaves


# --- the path without dense output --------------------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", PRUNING)
def test_without_dense_output_every_rule_runs_the_same_ops(method):
    """A CLS head reads no restored grid: the rule adds no op (the ops of the departure rule, which are those of
    the library before the rules existed)."""
    model = make_model("deit_small_patch16_224")
    x = images(model)
    sequences = {}
    for rule in RULES[method]:
        tr.patch(model, method, restore=rule, **REDUCING[method])
        counter = OpCounter()
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(x)
        sequences[rule] = counter.ops
    assert all(ops_ == sequences["departure"] for ops_ in sequences.values())
    assert any("bmm" in op or "mm" in op for op in sequences["departure"])  # the counter saw the model


# --- compile and export -----------------------------------------------------------------------------------------
# Three cases: the similarity links (shared by nearest and reconstruct, here with Top-K's pruning), ridge's
# Chebyshev links and GTP's own links (compiling takes a minute each on this machine).
@pytest.mark.parametrize("method,rule,options", [("topk", "reconstruct", dict(keep_rate=0.6, layers=(0, 1))),
                                                 ("topk", "ridge", dict(keep_rate=0.6, layers=(0, 1))),
                                                 ("gtp", "graph", dict(r=3))])
def test_restore_rules_compile_fullgraph_equal_to_eager(method, rule, options):
    """fullgraph=True: no graph break, hence no host sync, in the rule's work (a tiny model: compiling is slow)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                              img_size=64).eval()
    tr.patch(model, method, restore=rule, **options)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model.forward_features(x)
        compiled = torch.compile(model.forward_features, fullgraph=True, dynamic=False)
        assert bool(tr.trace(model, x)[-1].left.any())
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(any(find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
                    reason="the [export] extra is not installed")
@pytest.mark.parametrize("method,rule", [("topk", "reconstruct"), ("topk", "ridge"), ("gtp", "graph")])
def test_restore_rules_export_to_onnx_equal_to_eager(method, rule, tmp_path):
    """An average-pooled head reads the restored grid, so its logits carry the rule's work."""
    model = tr.patch(make_model("vit_medium_patch16_reg4_gap_256", depth=3), method, restore=rule,
                     **{**REDUCING[method], **({"layers": (1, 2)} if method == "topk" else {"r": 3})})
    exported = tr.export_onnx(model, tmp_path / "model.onnx", images=images(model, batch=3))
    assert exported.max_abs_diff <= 1e-4
    x = images(model, batch=2, seed=5)
    with torch.inference_mode():
        expected = model(x).numpy()
    got = tr.export.onnx_session(exported.path, threads=1).run(None, {"images": x.numpy()})[0]
    assert abs(got - expected).max() <= 1e-4
