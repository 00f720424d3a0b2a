"""The promises of the engine (specs/engine.md) for every method on every supported model family."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import MODEL_CASES, images, make_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce as tr
from tokenreduce.core.state import TokenState
from tokenreduce.methods.base import create_method

# Reducing options that fit the small models of conftest (36 or 49 patches, 4 blocks).
REDUCING = {
    "tome": dict(r=4),
    "topk": dict(keep_rate=0.7, layers=(1, 2)),
    "evit": dict(keep_rate=0.7, layers=(1, 2)),
    "gtp": dict(r=4),
    "ppt": dict(r=4, layers=(1, 2)),
}
NO_OP = {"tome": dict(r=0), "topk": dict(keep_rate=1.0, layers=(1, 2)), "evit": dict(keep_rate=1.0, layers=(1, 2)),
         "gtp": dict(r=0, sparsity=0.5), "ppt": dict(r=0, layers=(1, 2))}
METHODS = sorted(REDUCING)
# PPT's variance threshold per family: in the widest gap between the block-1 variances of the 8 images of
# ``images(model, batch=8)`` (measured: 7-58% from either side), so a batch of 8 mixes pruning and pooling and
# no image sits near the threshold (the split survives bfloat16).
PPT_THRESHOLD = {
    "deit_tiny_patch16_224": 2.15e-6,            # 1.92 | 2.38 (e-6): 2 pool, 6 prune
    "deit_small_patch16_224": 2.15e-6,
    "deit_base_distilled_patch16_224": 2.55e-6,  # 2.46 | 2.64: 6 pool
    "deit3_small_patch16_224": 2.4e-6,           # 2.15 | 2.67: 4 pool
    "vit_small_patch14_dinov2": 1.2e-6,          # 1.13 | 1.28: 2 pool
    "vit_base_patch16_224": 2.15e-6,
    "vit_medium_patch16_reg4_gap_256": 2.2e-6,   # 2.11 | 2.30: 2 pool
    "vit_base_patch16_gap_224": 2.33e-6,         # 2.18 | 2.47: 4 pool
    "vit_small_patch16_224:qk_norm": 2.13e-4,    # 1.99 | 2.28 (e-4): 4 pool
}


def reducing(method: str, case: str) -> dict:
    """Options that really reduce ``case``; PPT with a threshold that mixes both policies in a batch of 8."""
    return {**REDUCING[method], "threshold": PPT_THRESHOLD[case]} if method == "ppt" else REDUCING[method]


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
def test_nothing_to_remove_equals_unpatched(model_case, method):
    model = make_model(model_case)
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        tr.patch(model, method, **NO_OP[method])
        got = model(x)
    # The patched forward runs timm's own ops (measured: bit-identical). 1e-6 (spec: 1e-5) leaves room for a
    # valid reordering only: fused vs unfused attention moves these logits by up to 6.6e-7.
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_nothing_to_remove_equals_unpatched_under_bfloat16_autocast(model_case, method):
    model = make_model(model_case)
    x = images(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        tr.patch(model, method, **NO_OP[method])
        got = model(x)
    assert got.dtype == expected.dtype  # bfloat16, float32 where the model ends in a norm (DINOv2)
    # Exact: the same bfloat16 kernels run on the same inputs. Any tolerance would have to be a bfloat16 ulp
    # of the logits (~1e-2), the size of the effects it should catch (a cast to float32, a bias, an upcast).
    assert torch.equal(got, expected)


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
def test_unpatch_restores_class_and_outputs(model_case, method):
    model = make_model(model_case)
    cls, x = type(model), images(model)
    with torch.no_grad():
        expected = model(x)
        tr.patch(model, method, **reducing(method, model_case))
        reduced = model(x)
        tr.unpatch(model)
        restored = model(x)
    assert type(model) is cls and "_tokenreduce" not in model.__dict__
    assert not torch.allclose(reduced, expected, atol=1e-6), "the reduction should change the output"
    assert torch.equal(restored, expected)


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
def test_batch_independence(model_case, method):
    model = tr.patch(make_model(model_case), method, **reducing(method, model_case))
    x = images(model, batch=8)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in (0, 5)])
    # Only the matmul blocking changes with the batch size: measured at most 7.2e-7 (3 ulp at |logit| ~ 3).
    torch.testing.assert_close(alone, together[[0, 5]], atol=3e-6, rtol=0)
    if method == "ppt":  # the batch of 8 really mixes both policies
        assert 0.0 < tr.diagnostics(model, x)["pooled_share"][1] < 1.0


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
def test_describe_counts_equal_forward_counts_and_prefix_kept(model_case, method):
    model = tr.patch(make_model(model_case), method, **reducing(method, model_case))
    info = tr.describe(model)
    x = images(model, batch=8)
    with torch.no_grad():
        plain = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        plain = model.blocks[0](plain)
        states = tr.trace(model, x)
    assert [s.x.shape[1] for s in states] == info["tokens_out"]
    assert info["tokens_out"][-1] < info["tokens_in"][0]
    num_prefix, num_patches = info["num_prefix"], info["grid"][0] * info["grid"][1]
    # Block 0 attends over every token (nothing is reduced before it), so its prefix rows are the unpatched ones.
    torch.testing.assert_close(states[0].x[:, :num_prefix], plain[:, :num_prefix], atol=1e-6, rtol=0)
    for state in states:
        # No input patch is ever carried by a prefix token, and patch owners are valid token indices.
        assert bool((state.owner < 0).logical_or(state.owner >= num_prefix).all())
        assert int(state.owner.max()) < state.x.shape[1]
        size = state.sizes()
        assert torch.equal(size[:, :num_prefix], torch.ones_like(size[:, :num_prefix]))  # prefix: never merged
        if method != "gtp":  # propagation spreads fractions of a patch; the others conserve it exactly:
            # the image tokens' sizes add up to the patches still carried (dropped patches have owner -1).
            carried = (state.owner >= 0).sum(dim=1).float()
            assert torch.equal(size[:, num_prefix:].sum(dim=(1, 2)), carried)
    if method in ("tome", "evit"):  # nothing is ever dropped: every patch is carried to the end
        assert bool((states[-1].owner >= 0).all()) and num_patches == states[-1].owner.shape[1]


@pytest.mark.floor
@pytest.mark.parametrize("method,options", [
    ("tome", {}), ("topk", {"layers": (0,)}), ("evit", {"layers": (0,)}), ("gtp", {}),
    ("ppt", {"layers": (0,), "threshold": 0.0}), ("ppt", {"layers": (0,), "threshold": math.inf}),
])
def test_reduce_never_touches_prefix_tokens(method, options):
    torch.manual_seed(0)
    num_prefix, n, dim, heads = 3, 13, 8, 2
    state = TokenState(x=torch.randn(2, n, dim), num_prefix=num_prefix, grid=(2, 5))
    # The prefix tokens are the most attended, most similar and largest-valued: a method that let them
    # compete with the image tokens would keep, merge or propagate them.
    attn = torch.rand(2, heads, n, n)
    attn[..., :num_prefix] += 5.0
    stats = {"metric": torch.randn(2, n, dim // heads),
             "cls_attn": torch.rand(2, heads, n).softmax(-1),
             "value_norm": torch.rand(2, n),
             "attn": attn.softmax(-1)}
    stats["cls_attn"][..., :num_prefix] = 1.0
    stats["value_norm"][..., :num_prefix] = 10.0
    stats["metric"][:, 1:num_prefix] = stats["metric"][:, num_prefix:num_prefix + 2]
    m = create_method(method, r=4, **options)
    state = m.begin(state, m.plan(n, num_prefix, 1))
    out = m.reduce(0, state, stats, 4)
    assert torch.equal(out.x[:, :num_prefix], state.x[:, :num_prefix])
    assert out.x.shape[1] == n - 4 + (1 if method == "evit" else 0)


@pytest.mark.floor
def test_tome_merge_by_hand():
    """1 prefix + 6 tokens, r = 2: the expected merged features, sizes and order, computed by hand."""
    x = torch.arange(7 * 2, dtype=torch.float32).view(1, 7, 2)
    size = torch.tensor([1, 1, 3, 1, 1, 1, 1], dtype=torch.float32).view(1, 7, 1)
    metric = torch.tensor([[5.0, 5.0],    # 0: prefix (A), never merges
                           [1.0, 0.0],    # 1: B
                           [1.0, 0.1],    # 2: A -> 1 (cos 0.995)
                           [0.0, 1.0],    # 3: B
                           [0.0, 1.0],    # 4: A -> 3 (cos 1.0)
                           [-1.0, 0.0],   # 5: B
                           [-1.0, 0.5]])  # 6: A -> 5 (cos 0.894), third best: stays
    state = TokenState(x=x, size=size, num_prefix=1, owner=torch.arange(1, 7).view(1, 6))
    out = tr.methods and create_method("tome", r=2).reduce(0, state, {"metric": metric[None]}, 2)
    x0, x1, x2, x3, x4, x5, x6 = x[0]
    expected = torch.stack([x0, x6, (x1 + 3 * x2) / 4, (x3 + x4) / 2, x5])
    torch.testing.assert_close(out.x[0], expected)
    assert out.size.flatten().tolist() == [1, 1, 4, 2, 1]
    # patches 1..6 are now held by tokens: 1->2, 2->2, 3->3, 4->3, 5->4, 6->1
    assert out.owner.flatten().tolist() == [2, 2, 3, 3, 4, 1]


def meta_model(name: str) -> torch.nn.Module:
    """A real-size model without weights: enough for the analytic cost, in a fraction of a second."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def _counted_gmacs(model, x):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


@pytest.mark.floor
@pytest.mark.parametrize("case", ["deit_small_patch16_224", "deit_base_distilled_patch16_224",
                                  "vit_medium_patch16_reg4_gap_256", "vit_small_patch14_dinov2"])
@pytest.mark.parametrize("method,options", [
    ("tome", dict(r=0)), ("tome", dict(r=4)), ("tome", dict(r=(3, -0.5))), ("tome", dict(r=[6, 0, 2, 9])),
    ("topk", dict(keep_rate=0.5, layers=(0, 2))), ("evit", dict(keep_rate=0.7, layers=(1, 2, 3))),
    ("gtp", dict(r=4)), ("gtp", dict(r=[2, 5, 0, 3], graph="spatial")), ("gtp", dict(r=3, sparsity=0.8)),
    ("ppt", dict(r=4, layers=(1, 2), threshold=2e-6)), ("ppt", dict(r=[6, 0, 4, 0], threshold=math.inf)),
    ("ppt", dict(r=5, layers=(0, 3), threshold=0.0)),
])
def test_analytic_flops_match_flop_counter(case, method, options):
    model = tr.patch(make_model(case), method, **options)
    report = tr.flops(model)
    counted = _counted_gmacs(model, images(model, batch=1))
    assert report.total_gmacs == pytest.approx(counted, rel=0.01)


@pytest.mark.floor
@pytest.mark.parametrize("name,expected", [("deit_small_patch16_224", 4.60), ("deit_base_patch16_224", 17.56),
                                           ("deit_tiny_patch16_224", 1.26)])
def test_reference_costs(name, expected):
    # Matrix products only, as FlopCounterMode counts them; DeiT-T comes to 1.254 (the published 1.26 also
    # counts element-wise work, which weighs more at width 192).
    model = meta_model(name)
    assert tr.flops(model).gmacs == pytest.approx(expected, rel=0.01)


def test_reference_costs_of_baselines_on_deit_small():
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    expected = {("tome", 8): 3.4, ("tome", 13): 2.70, ("tome", 16): 2.3}
    for (method, r), gmacs in expected.items():
        assert tr.flops(tr.patch(model, method, r=r)).gmacs == pytest.approx(gmacs, abs=0.05)
    assert tr.flops(tr.patch(model, "tome", r=13)).gmacs == pytest.approx(2.70, abs=0.005)
    assert tr.flops(tr.patch(model, "evit", keep_rate=0.7)).gmacs == pytest.approx(3.0, abs=0.05)
    tr.unpatch(model)
    # cross-check one real-size model against the flop counter
    tr.patch(model, "tome", r=13)
    counted = _counted_gmacs(model, torch.randn(1, 3, 224, 224))
    assert tr.flops(model).total_gmacs == pytest.approx(counted, rel=0.01)


# Low precision may flip a near-tie in a token choice (random-weight models are full of near-ties), after which
# an image's logits legitimately differ by more than rounding. So the rounding bound is checked on the state at
# the first reducing block, per image whose choice there matches float32's; the logits only against a flip.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["deit_small_patch16_224", "vit_medium_patch16_reg4_gap_256"])
def test_dtypes(case, method):
    model = tr.patch(make_model(case), method, **reducing(method, case))
    first = next(i for i, amount in enumerate(tr.describe(model)["schedule"]) if amount)
    x = images(model, batch=8)
    with torch.no_grad():
        ref, ref_state = model(x), tr.trace(model, x)[first]
        runs = {}
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cpu", dtype=dtype):
                runs[f"{dtype} autocast"] = dtype, model(x), tr.trace(model, x)[first]
        model.to(torch.bfloat16)
        runs["bfloat16 weights"] = torch.bfloat16, model(x.bfloat16()), tr.trace(model, x.bfloat16())[first]
    for name, (dtype, out, state) in runs.items():
        assert out.dtype == dtype and out.shape == ref.shape and bool(torch.isfinite(out.float()).all()), name
        same = (state.owner == ref_state.owner).all(dim=1)
        # float16 (u = 4.9e-4) keeps the choice of at least 2 of the 8 images for every method (ToMe's bipartite
        # matching of 36 random-weight tokens flips the most); bfloat16 may flip every image.
        assert dtype != torch.float16 or same.sum() >= 2, f"{name}: {int(same.sum())} of 8 chose as in float32"
        error = (state.x.float() - ref_state.x)[same].flatten(1).norm(dim=1) / ref_state.x[same].flatten(1).norm(dim=1)
        # Relative error of the block's features: measured <= 2.1e-4 (float16), 2.0e-3 (bfloat16 autocast),
        # 3.6e-3 (bfloat16 weights), i.e. < 1 unit roundoff u; bound 4 u.
        assert bool((error < 4 * UNIT_ROUNDOFF[dtype]).all()), (name, error)
        # Logits, flips included: measured <= 0.11 relative (a GTP flip on the register model); far below a
        # wrong method (a different reduction of the same image moves them by ~1).
        logit_error = (out.float() - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert logit_error.max() < 0.2, (name, logit_error.max())


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
def test_train_mode_gradients_reach_parameters(model_case, method):
    model = tr.patch(make_model(model_case), method, **reducing(method, model_case)).train()
    out = model(images(model))
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["deit_small_patch16_224", "vit_small_patch14_dinov2",
                                  "vit_medium_patch16_reg4_gap_256"])
def test_other_image_size(case, method):
    model = tr.patch(make_model(case, dynamic_img_size=True), method, **reducing(method, case))
    patch = model.patch_embed.patch_size[0]
    size = (5 * patch, 9 * patch)  # a non-square grid the model was not built for
    info = tr.describe(model, img_size=size)
    assert info["grid"] == [5, 9]
    states = tr.trace(model, images(model, size=size))
    assert [s.x.shape[1] for s in states] == info["tokens_out"]
    assert info["tokens_in"][0] == 45 + info["num_prefix"]
    with torch.no_grad():
        assert model(images(model, size=size)).shape[0] == 2


def test_average_pool_weighs_tokens_by_size():
    model = tr.patch(make_model("vit_base_patch16_gap_224"), "tome", r=4)
    x = images(model)
    state = tr.trace(model, x)[-1]
    with torch.no_grad():
        final = model.norm(state.x)
        pooled = (final * state.size).sum(1) / state.size.sum(1)
        expected = model.head(model.fc_norm(pooled))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_patching_again_replaces_and_patched_restores():
    model = make_model("deit_small_patch16_224")
    tr.patch(model, "tome", r=2)
    tr.patch(model, "evit", keep_rate=0.5, layers=(1, 2))
    assert tr.describe(model)["method"] == "evit"
    with tr.patched(model, "topk", keep_rate=0.6, layers=(2,)):
        assert tr.describe(model)["method"] == "topk"
    assert tr.describe(model)["method"] == "evit"
    tr.unpatch(model)
    assert type(model) is timm.models.vision_transformer.VisionTransformer


def test_schedules():
    model = meta_model("deit_small_patch16_224")
    assert tr.describe(tr.patch(model, "tome", r=(8, 0)))["schedule"] == [8] * 12
    # ToMe's (r, inflection): int(low + i * (high - low) / 11) with low = int(r * (1 - inflection)), high = 2r - low.
    increasing = [int(16 / 11 * i) for i in range(12)]  # low 0, high 16
    assert increasing == [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16]
    assert tr.describe(tr.patch(model, "tome", r=(8, 1)))["schedule"] == increasing
    assert tr.describe(tr.patch(model, "tome", r=(8, -1)))["schedule"] == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert tr.describe(tr.patch(model, "tome", r=(8, 0.5)))["schedule"] == [4, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12]
    assert tr.describe(tr.patch(model, "tome", r=[5, 5]))["schedule"] == [5, 5] + [0] * 10
    info = tr.describe(tr.patch(model, "tome", r=200))
    assert info["tokens_out"][0] == 99 and info["notes"][0].startswith("block 0: r=200 clamped to 98")


def test_schedule_for_flops_reaches_target_with_smallest_reduction():
    model = meta_model("deit_small_patch16_224")
    for method in METHODS:
        options = tr.schedule_for_flops(model, method, target_gmacs=3.2)
        assert tr.flops(tr.patch(model, method, **options)).total_gmacs <= 3.2
        knob = "r" if "r" in options else "keep_rate"
        weaker = dict(options)
        weaker[knob] = options[knob] - 1 if knob == "r" else options[knob] + 1e-3
        assert tr.flops(tr.patch(model, method, **weaker)).total_gmacs > 3.2
    with pytest.raises(ValueError, match="cannot reach 0.01 GMACs"):
        tr.schedule_for_flops(model, "tome", target_gmacs=0.01)


BAD = [
    ("nope", {}, ValueError, r"unknown token-reduction method 'nope'; known methods: .*evit.*tome.*topk"),
    ("topk", dict(r=40, layers=(1,)), ValueError, r"topk: block 1 would remove 40 of its 36 image tokens"),
    ("tome", dict(r=-1), ValueError, r"tome: r must be a non-negative integer, got -1"),
    ("tome", dict(r=2.5), ValueError, r"tome: r must be a non-negative integer, got 2.5"),
    ("tome", dict(r="8"), ValueError, r"tome: r must be a non-negative integer, got '8'"),
    ("evit", dict(keep_rate=0.0), ValueError, r"evit: keep_rate must be in \(0, 1\], got 0.0"),
    ("topk", dict(keep_rate=1.5), ValueError, r"topk: keep_rate must be in \(0, 1\], got 1.5"),
    ("evit", dict(layers=(2, 12)), ValueError, r"evit: layer 12 is outside the model's blocks 0..3"),
    ("tome", dict(r=[1, 2, 3, 4, 5]), ValueError, r"tome: r lists 5 blocks but the model has 4"),
    ("tome", dict(bogus=1), ValueError, r"tome: unknown option 'bogus'; valid options: r, layers, prop_attn, restore"),
    ("topk", dict(kep_rate=0.5), ValueError,
     r"topk: unknown option 'kep_rate' \(did you mean 'keep_rate'\?\); valid options: keep_rate, r, layers"),
    ("ppt", dict(treshold=1e-4), ValueError, r"ppt: unknown option 'treshold' \(did you mean 'threshold'\?\)"),
]


@pytest.mark.floor
@pytest.mark.parametrize("method,options,error,message", BAD)
def test_bad_input_leaves_model_as_it_was(method, options, error, message):
    model = make_model("deit_small_patch16_224")
    x = images(model)
    tr.patch(model, "tome", r=2)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(error, match=message):
        tr.patch(model, method, **options)
    assert tr.describe(model)["method"] == "tome" and tr.describe(model)["options"]["r"] == 2
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.floor
def test_unsupported_models_raise_type_error():
    with pytest.raises(TypeError, match="ResNet is not a timm VisionTransformer"):
        tr.patch(timm.create_model("resnet18", pretrained=False), "tome", r=2)
    with pytest.raises(TypeError, match="global_pool='map'"):
        tr.patch(timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, global_pool="map"), "tome")
    with pytest.raises(TypeError, match="block 0 is a ResPostBlock"):
        tr.patch(timm.create_model("vit_small_patch16_224", pretrained=False, depth=1,
                                   block_fn=timm.models.vision_transformer.ResPostBlock), "tome")
    plain = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(TypeError):
        tr.flops(plain)
    assert type(plain).__name__ == "ResNet"


def test_methods_lists_builtins():
    assert set(METHODS) <= set(tr.methods())


def test_model_cases_cover_the_issue_list():
    names = {case.split(":")[0] for case in MODEL_CASES}
    assert {"deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_distilled_patch16_224",
            "deit3_small_patch16_224", "vit_small_patch14_dinov2", "vit_base_patch16_224"} <= names
