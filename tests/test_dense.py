"""Dense output of a reduced model: ``tr.restore``, the patched ``forward_features`` / ``forward_intermediates`` /
``get_intermediate_layers``, and the merge / keep operations they rest on."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import MODEL_CASES, NO_OP, REDUCING, images, make_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce as tr
from tokenreduce.core import ops
from tokenreduce.core.state import TokenState
from tokenreduce.methods.base import create_method

METHODS = sorted(REDUCING)
POOLING_CASES = ["deit_small_patch16_224", "deit_base_distilled_patch16_224", "vit_base_patch16_gap_224",
                 "vit_medium_patch16_reg4_gap_256"]


# --- core operations -------------------------------------------------------------------------------------
@pytest.mark.floor
def test_merge_then_unmerge_copies_each_merged_token_to_every_token_it_holds():
    torch.manual_seed(0)
    metric, t = torch.randn(3, 11, 4), torch.randn(3, 11, 5)
    m = ops.bipartite_match(metric, 4, num_prefix=1)
    merged = ops.merge(t, m)
    assert merged.shape == (3, 7, 5)
    destination = ops.merge_destination(m)
    # sums: every new token is the sum of the old tokens that map to it
    expected = torch.zeros(3, 7, 5)
    for b in range(3):
        expected[b] = torch.zeros(7, 5).index_add_(0, destination[b], t[b])
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)  # float32 sums of at most 3 terms
    back = ops.unmerge(merged, m)
    assert torch.equal(back, ops.gather_tokens(merged, destination))
    assert torch.equal(back[:, 0], merged[:, 0])  # the prefix token stays first and is never merged


@pytest.mark.floor
def test_keep_then_unkeep_is_identity_on_the_kept_rows():
    t = torch.arange(12.0).view(1, 6, 2)
    index = torch.tensor([[4, 1, 0]])
    kept = ops.keep(t, index)
    assert kept[0, :, 0].tolist() == [8.0, 2.0, 0.0]
    assert torch.equal(ops.unkeep(kept, index, t), t)
    assert ops.kept_destination(index, 6).tolist() == [[2, 1, -1, -1, 0, -1]]


@pytest.mark.floor
def test_restore_of_a_tome_merge_equals_unmerge_of_the_merged_tokens():
    torch.manual_seed(1)
    x, metric = torch.randn(2, 9, 4), torch.randn(2, 9, 3)
    state = TokenState(x, num_prefix=1).tracked(dense=True)
    merged = ops.bipartite_merge(state, metric, 3)
    m = ops.bipartite_match(metric, 3, 1)
    assert torch.equal(ops.restore(merged), ops.unmerge(merged.x, m))
    assert not bool(merged.left.any())  # merging never removes a patch


@pytest.mark.floor
def test_pruned_patch_keeps_its_departure_feature():
    torch.manual_seed(2)
    x = torch.randn(2, 7, 4)
    state = TokenState(x, num_prefix=1).tracked(dense=True)
    kept = ops.keep_tokens(state, torch.tensor([[3, 1], [6, 2]]))
    later = kept.replace(x=kept.x + 100.0)  # what later blocks would do to the kept tokens
    full = ops.restore(later)
    for b, dropped in enumerate(([2, 4, 5, 6], [1, 3, 4, 5])):
        for token in dropped:
            assert torch.equal(full[b, token], x[b, token])  # the feature it had when it left
    assert torch.equal(full[0, 3], x[0, 3] + 100.0) and torch.equal(full[1, 6], x[1, 6] + 100.0)
    assert torch.equal(full[:, 0], x[:, 0] + 100.0)


@pytest.mark.floor
@pytest.mark.parametrize("method,options", [("gtp", dict(r=3, graph="spatial")), ("evit", dict(r=3)),
                                            ("ppt", dict(r=3, threshold=0.0))])
def test_every_method_records_departures_at_the_block_where_tokens_leave(method, options):
    """Patches that leave at the reducing block keep the feature their token had there (GTP: before its
    propagation; EViT: not the fused token's)."""
    torch.manual_seed(3)
    x = torch.randn(2, 10, 6)
    resolved = create_method(method, **options, layers=(0,)) if method != "gtp" else create_method(method, **options)
    plan = resolved.plan(10, 1, 1)
    state = resolved.begin(TokenState(x, num_prefix=1, grid=(3, 3)).tracked(dense=True), plan)
    stats = {"cls_attn": torch.rand(2, 2, 10).softmax(-1), "value_norm": torch.rand(2, 10),
             "metric": torch.randn(2, 10, 3), "attn": torch.rand(2, 2, 10, 10).softmax(-1)}
    out = resolved.reduce(0, state, stats, plan.amounts[0])
    assert out.left.sum(dim=1).tolist() == [3, 3]
    torch.testing.assert_close(out.left_x[out.left], x[:, 1:][out.left], rtol=0, atol=0)
    restored = ops.restore(out)
    assert restored.shape == (2, 10, 6)
    assert torch.equal(restored[:, 1:][out.left], x[:, 1:][out.left])


def test_restore_without_dense_tracking_is_a_clear_error():
    with pytest.raises(ValueError, match="dense tracking"):
        ops.restore(TokenState(torch.zeros(1, 3, 2)))


# --- the public call and the patched entry points ---------------------------------------------------------
@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
def test_restore_with_nothing_removed_equals_the_unreduced_tokens_exactly(model_case, method):
    model = make_model(model_case)
    x = images(model)
    with torch.no_grad():
        layers = model.forward_intermediates(x, norm=False, output_fmt="NLC", return_prefix_tokens=True,
                                             intermediates_only=True)
        states = tr.trace(tr.patch(model, method, **NO_OP[method]), x)
    for layer, state in zip(layers, states, strict=True):
        expected = torch.cat([layer[1], layer[0]], dim=1) if model.num_prefix_tokens else layer
        assert torch.equal(tr.restore(state), expected)


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
def test_forward_intermediates_with_nothing_removed_equals_timm(model_case, method):
    model = make_model(model_case)
    x = images(model)
    with torch.no_grad():
        plain = model.forward_intermediates(x, indices=[0, 2, 3], norm=True, return_prefix_tokens=True)
        plain_layers = model.get_intermediate_layers(x, n=2, reshape=True)
        tr.patch(model, method, **NO_OP[method])
        patched = model.forward_intermediates(x, indices=[0, 2, 3], norm=True, return_prefix_tokens=True)
        patched_layers = model.get_intermediate_layers(x, n=2, reshape=True)
    # The same operations run in the same order (timm's fused attention kernel included): exactly equal.
    assert torch.equal(patched[0], plain[0])
    for a, b in zip(patched[1], plain[1], strict=True):
        a, b = (a, b) if model.num_prefix_tokens else ((a, a[:, :0]), (b, b[:, :0]))  # no prefix: no pairs
        assert a[0].shape == b[0].shape and a[0].shape[2:] == tuple(model.patch_embed.grid_size)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(patched_layers, plain_layers, strict=True):
        assert torch.equal(a, b)


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["deit_base_distilled_patch16_224", "vit_medium_patch16_reg4_gap_256"])
def test_reduced_forward_intermediates_are_full_grids_at_the_reduced_cost(case, method):
    model = tr.patch(make_model(case), method, **REDUCING[method])
    x = images(model, batch=1)
    h, w = model.patch_embed.grid_size
    with torch.no_grad():
        final, layers = model.forward_intermediates(x, indices=4, output_fmt="NLC", norm=True)
        nchw = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        as_dict = model.forward_intermediates(x, indices=[1], output_dict=True, return_prefix_tokens=True)
        states = tr.trace(model, x)
    assert final.shape == (1, model.num_prefix_tokens + h * w, model.embed_dim)
    assert [tuple(t.shape) for t in layers] == [(1, h * w, model.embed_dim)] * 4
    assert tuple(nchw[0].shape) == (1, model.embed_dim, h, w)
    assert set(as_dict) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
    for i, state in enumerate(states):
        torch.testing.assert_close(layers[i], model.norm(tr.restore(state))[:, model.num_prefix_tokens:],
                                   rtol=0, atol=1e-6)
    counts = tr.describe(model)["tokens_out"]
    assert [s.x.shape[1] for s in states] == counts and counts[-1] < model.num_prefix_tokens + h * w
    # The reduced cost itself, without a restore rule's work (counted apart: test_restore_rules.py).
    tr.patch(model, method, restore="departure", **REDUCING[method])
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model.forward_intermediates(x)
    counted = counter.get_total_flops() / 2 / 1e9
    report = tr.flops(model)
    assert counted == pytest.approx(report.total_gmacs - report.head_gmacs, rel=0.01)
    assert counted < report.baseline_gmacs - report.head_gmacs


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", POOLING_CASES)
def test_forward_head_of_forward_features_equals_forward(case, method):
    model = tr.patch(make_model(case), method, **REDUCING[method])
    x = images(model)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), model(x), rtol=0, atol=0)
    h, w = model.patch_embed.grid_size
    assert features.shape == (2, model.num_prefix_tokens + h * w, model.embed_dim)


@pytest.mark.parametrize("entry", ["forward", "forward_features", "forward_intermediates"])
def test_attention_masks_are_refused_not_ignored(entry):
    model = tr.patch(make_model("deit_small_patch16_224"), "tome", r=4)
    with pytest.raises(ValueError, match="attn_mask / is_causal are not supported"):
        getattr(model, entry)(images(model), attn_mask=torch.zeros(1, 1, 37, 37))
    with pytest.raises(ValueError, match="output_fmt='NHWC'"):
        model.forward_intermediates(images(model), output_fmt="NHWC")


# --- no per-forward state on modules ----------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_forward_writes_nothing_on_the_model_or_the_method(method):
    model = tr.patch(make_model("deit_small_patch16_224"), method, **REDUCING[method])
    resolved = tr.method_of(model)
    x = images(model)
    model(x)  # plans are cached per input shape on the first call (python ints, not tensors)
    before_method = pickle.dumps(resolved)
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    model(x)
    model.forward_intermediates(x)
    tr.diagnostics(model, x)
    assert pickle.dumps(resolved) == before_method
    assert all(torch.equal(before_model[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(v, torch.Tensor) for v in vars(resolved).values())


def test_ppt_diagnostics_report_the_pooled_share_per_block():
    model = tr.patch(make_model("deit_small_patch16_224"), "ppt", r=4, layers=(1, 2), threshold=2.15e-6)
    x = images(model, batch=8)
    share = tr.diagnostics(model, x)["pooled_share"]
    states = tr.trace(model, x)
    by_hand = {b: float(states[-1].extras[f"ppt.pooled.{b}"].float().mean()) for b in (1, 2)}
    assert share == by_hand and 0.0 < share[1] < 1.0  # the threshold mixes both policies in this batch
    assert tr.diagnostics(tr.patch(model, "ppt", r=4, layers=(1, 2), threshold=0.0), x) == \
        {"pooled_share": {1: 0.0, 2: 0.0}}
    assert tr.diagnostics(tr.unpatch(model), x) == {}


def test_gtp_diagnostics_report_the_graph_size():
    model = tr.patch(make_model("deit_small_patch16_224"), "gtp", r=4, graph="spatial")
    out = tr.diagnostics(model, images(model))
    h, w = model.patch_embed.grid_size
    # 8-neighbourhood edges on an h x w grid, both directions
    edges = 2 * (h * (w - 1) + w * (h - 1) + 2 * (h - 1) * (w - 1))
    assert out == {"image_tokens": h * w, "graph_edges": float(edges)}


def test_gtp_graph_made_under_inference_mode_serves_training_later():
    model = tr.patch(make_model("deit_small_patch16_224", img_size=80), "gtp", r=3, graph="spatial")
    x = images(model)
    with torch.inference_mode():
        model(x)
    model.train()
    model(x).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_model_cases_are_the_engine_cases():
    assert set(POOLING_CASES) <= set(MODEL_CASES)


def test_caches_stay_bounded():
    from tokenreduce.methods import gtp

    for side in range(2, 2 + 3 * gtp.MAX_CACHED_GRIDS):
        gtp.spatial_graph((side, side))
    assert 0 < len(gtp._SPATIAL_CACHE) <= gtp.MAX_CACHED_GRIDS
    method = create_method("tome", r=1)
    for n in range(10, 200):
        method.plan(n, 1, 2)
    assert 0 < len(method._plans) <= 32


def test_a_patch_keeps_the_feature_of_its_first_departure():
    """EViT: patches fused at block 0 stay 'left' with their block-0 feature when the fused token they live in
    is dropped (and fused again) at block 1."""
    method = create_method("evit", r=[2, 2], layers=None)
    plan = method.plan(5, 1, 2)
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [4.0, 4.0]]])
    state = TokenState(x.clone(), num_prefix=1, grid=(2, 2)).tracked(dense=True)

    def stats(row: list[float]) -> dict[str, torch.Tensor]:
        return {"cls_attn": torch.tensor(row).view(1, 1, -1).expand(1, 2, -1)}

    first = method.reduce(0, state, stats([0.15, 0.4, 0.3, 0.1, 0.05]), plan.amounts[0])  # tokens 3, 4 leave
    later = first.replace(x=first.x + 10.0)  # what the next block's attention would do
    second = method.reduce(1, later, stats([0.3, 0.4, 0.2, 0.1]), plan.amounts[1])  # token 2 and the fused one
    assert second.left.tolist() == [[False, True, True, True]]
    full = ops.restore(second)
    assert torch.equal(full[0, 3:], x[0, 3:])  # block-0 features, not the fused token's at block 1
    assert torch.equal(full[0, 2], x[0, 2] + 10.0)  # left at block 1 with its block-1 feature
