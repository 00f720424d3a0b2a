"""open_clip's image tower (``open_clip.transformer.VisionTransformer``): the engine's promises for every method on
small configurations (both block types, CLS / average / no pooling), the CLIP model around it (``encode_image``
reduced, text tower untouched), and exactness against timm: a timm CLIP tower converted by key mapping gives the
same reduced outputs and token counts."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from conftest import make_model

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import tokenreduce as tr  # noqa: E402
from tokenreduce.core.errors import InputError, InputTypeError  # noqa: E402

REDUCING = {
    "tome": dict(r=4),
    "topk": dict(keep_rate=0.7, layers=(1, 2)),
    "evit": dict(keep_rate=0.7, layers=(1, 2)),
    "gtp": dict(r=4),
    "ppt": dict(r=4, layers=(1, 2), threshold=0.0),
}
NO_OP = {"tome": dict(r=0), "topk": dict(keep_rate=1.0, layers=(1, 2)), "evit": dict(keep_rate=1.0, layers=(1, 2)),
         "gtp": dict(r=0), "ppt": dict(r=0, layers=(1, 2))}
METHODS = sorted(REDUCING)

# Small towers: 8x8 patches of 8 px, width 48, 3 heads, 4 blocks. "tok" / "avg" use nn.MultiheadAttention
# (ResidualAttentionBlock); "custom" open_clip's own Attention (qk-norm, LayerScale, head scale, inner norms).
CASES = {
    "tok": dict(),
    "avg": dict(pool_type="avg"),
    "avg_ln_after_pool": dict(pool_type="avg", final_ln_after_pool=True, ls_init_value=0.5),
    "custom": dict(qk_norm=True, ls_init_value=0.5, scale_heads=True, scale_attn_inner=True, scale_attn=True,
                   scale_fc=True),
}


def make_tower(case: str = "tok", **overrides) -> VisionTransformer:
    torch.manual_seed(0)
    kwargs = dict(image_size=64, patch_size=8, width=48, layers=4, heads=3, mlp_ratio=4.0, output_dim=32)
    model = VisionTransformer(**{**kwargs, **CASES[case], **overrides}).eval()
    with torch.no_grad():  # spread the tokens so that reductions matter (as conftest.make_model does for timm)
        model.class_embedding.normal_(0, 0.5)
        model.positional_embedding.normal_(0, 0.5)
    return model


def images(batch: int = 2, seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


# --- the engine's promises -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_nothing_to_remove_equals_unpatched(case, method):
    model = make_tower(case)
    x = images()
    with torch.no_grad():
        expected = model(x)
        tr.patch(model, method, **NO_OP[method])
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_unpatch_restores_class_and_outputs(case, method):
    model = make_tower(case)
    cls, x = type(model), images()
    with torch.no_grad():
        expected = model(x)
        tr.patch(model, method, **REDUCING[method])
        reduced = model(x)
        tr.unpatch(model)
        restored = model(x)
    assert type(model) is cls and "_tokenreduce" not in model.__dict__
    assert not torch.allclose(reduced, expected, atol=1e-5), "the reduction should change the output"
    assert torch.equal(restored, expected)


@pytest.mark.parametrize("method", METHODS)
def test_batch_independence(case, method):
    options = {**REDUCING[method], "threshold": 2.5e-5} if method == "ppt" else REDUCING[method]
    model = tr.patch(make_tower(case), method, **options)
    x = images(batch=8)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in (0, 5)])
    torch.testing.assert_close(alone, together[[0, 5]], atol=3e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_counts_prefix_kept_and_sizes_conserved(case, method):
    model = tr.patch(make_tower(case), method, **REDUCING[method])
    info = tr.describe(model)
    assert info["num_prefix"] == 1 and info["grid"] == [8, 8]
    with torch.no_grad():
        states = tr.trace(model, images(batch=4))
    assert [s.x.shape[1] for s in states] == info["tokens_out"]
    assert info["tokens_out"][-1] < info["tokens_in"][0]
    for state in states:
        assert bool((state.owner < 0).logical_or(state.owner >= 1).all())  # no patch carried by the class token
        size = state.sizes()
        assert torch.equal(size[:, :1], torch.ones_like(size[:, :1]))  # the class token is never merged
        if method != "gtp":
            carried = (state.owner >= 0).sum(dim=1).float()
            assert torch.equal(size[:, 1:].sum(dim=(1, 2)), carried)


def _counted_gmacs(model: torch.nn.Module, x: torch.Tensor) -> float:
    model = copy.deepcopy(model)
    for blk in model.transformer.resblocks:
        blk.attn.fused_attn = False  # the counter sees neither SDPA nor nn.MultiheadAttention's fast path
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


@pytest.mark.parametrize("case_", ["tok", "avg", "custom"])
@pytest.mark.parametrize("method,options", [
    ("tome", dict(r=0)), ("tome", dict(r=4)), ("tome", dict(r=[6, 0, 2, 9])),
    ("topk", dict(keep_rate=0.5, layers=(0, 2))), ("evit", dict(keep_rate=0.7, layers=(1, 2, 3))),
    ("gtp", dict(r=4)), ("gtp", dict(r=[2, 5, 0, 3], graph="spatial")),
    ("ppt", dict(r=4, layers=(1, 2), threshold=0.0)), ("ppt", dict(r=[6, 0, 4, 0], threshold=math.inf)),
])
def test_analytic_flops_match_flop_counter(case_, method, options):
    model = tr.patch(make_tower(case_), method, **options)
    counted = _counted_gmacs(model, images(batch=1))
    assert tr.flops(model).total_gmacs == pytest.approx(counted, rel=0.01)


def test_flops_of_none_pooling_count_the_projection_of_every_token():
    model = tr.patch(make_tower("tok", pool_type="none"), "tome", r=4)
    assert tr.flops(model).total_gmacs == pytest.approx(_counted_gmacs(model, images(batch=1)), rel=0.01)


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_autocast(method):
    model = tr.patch(make_tower("tok"), method, **REDUCING[method])
    x = images()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == ref.shape and bool(torch.isfinite(out.float()).all())
    # bfloat16 may flip a near-tie in a token choice: a loose bound against a wrong computation only.
    assert float(((out.float() - ref).norm(dim=-1) / ref.norm(dim=-1)).max()) < 0.2
    tr.patch(model, method, **NO_OP[method])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
        tr.unpatch(model)
        expected = model(x)
    torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_gradients_reach_parameters(method):
    model = tr.patch(make_tower("custom"), method, **REDUCING[method]).train()
    model(images()).pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("transformer.") and p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    model = tr.patch(make_tower("tok"), "tome", r=4).train()
    x = images()
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(x)
    out2.sum().backward()
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_pickle_deepcopy_and_state_dict(method):
    model = make_tower("avg")
    keys = list(model.state_dict())
    tr.patch(model, method, **REDUCING[method])
    x = images()
    with torch.no_grad():
        expected = model(x)
        loaded = pickle.loads(pickle.dumps(model))
        copied = copy.deepcopy(model)
        assert torch.equal(loaded(x), expected) and torch.equal(copied(x), expected)
    assert list(model.state_dict()) == keys
    assert type(tr.unpatch(loaded)) is VisionTransformer


# --- entry points ----------------------------------------------------------------------------------------------
def test_forward_intermediates_run_reduced_with_restored_grids():
    model = make_tower("tok")
    x = images()
    with torch.no_grad():
        plain = model.forward_intermediates(x, indices=[1, 3], output_extra_tokens=True, normalize_intermediates=True)
        tr.patch(model, "tome", r=0)
        same = model.forward_intermediates(x, indices=[1, 3], output_extra_tokens=True, normalize_intermediates=True)
        tr.patch(model, "tome", r=8)
        reduced = model.forward_intermediates(x, indices=[1, 3], output_extra_tokens=True)
        nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True, stop_early=True)
        features = model(x)
    assert set(same) == set(plain)
    for key in plain:
        for got, want in zip(same[key], plain[key], strict=True) if isinstance(plain[key], list) else \
                [(same[key], plain[key])]:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert [t.shape for t in reduced["image_intermediates"]] == [t.shape for t in plain["image_intermediates"]]
    assert reduced["image_intermediates"][0].shape == (2, 48, 8, 8)
    torch.testing.assert_close(reduced["image_features"], features, atol=1e-6, rtol=0)
    assert [t.shape for t in nlc["image_intermediates"]] == [(2, 64, 48)] * 2
    with pytest.raises(InputError):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("pool_type", ["tok", "avg", "none"])
def test_token_outputs_are_the_restored_grid(pool_type):
    model = make_tower("tok", pool_type=pool_type, output_tokens=True)
    x = images()
    with torch.no_grad():
        pooled, tokens = model(x)
        tr.patch(model, "tome", r=0)
        same_pooled, same_tokens = model(x)
        tr.patch(model, "topk", keep_rate=0.5, layers=(1,))
        reduced_pooled, reduced_tokens = model(x)
    torch.testing.assert_close(same_pooled, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(same_tokens, tokens, atol=1e-5, rtol=0)
    assert reduced_pooled.shape == pooled.shape and reduced_tokens.shape == tokens.shape


def small_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    vision = dict(image_size=64, patch_size=8, width=48, layers=4, head_width=16)
    text = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


@pytest.mark.parametrize("method", METHODS)
def test_clip_encode_image_runs_reduced_and_text_tower_untouched(method):
    model = small_clip()
    x, text = images(), torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_ref, text_ref = model.encode_image(x), model.encode_text(text)
        tr.patch(model.visual, method, **NO_OP[method])
        torch.testing.assert_close(model.encode_image(x), image_ref, atol=1e-5, rtol=0)
        tr.patch(model.visual, method, **REDUCING[method])
        image_features, text_features, _ = model(x, text)
        assert torch.equal(model.encode_text(text), text_ref)
        torch.testing.assert_close(text_features, torch.nn.functional.normalize(text_ref, dim=-1), atol=0, rtol=0)
        torch.testing.assert_close(model.encode_image(x), model.visual(x), atol=0, rtol=0)
        assert not torch.allclose(model.encode_image(x), image_ref, atol=1e-4)
        inter = model.forward_intermediates(x, image_indices=[1])
        torch.testing.assert_close(inter["image_features"], image_features, atol=1e-6, rtol=0)
    assert tr.describe(model.visual)["tokens_out"][-1] < 65


def test_clip_wrapper_is_refused_with_the_way_to_patch_it():
    model = small_clip()
    with pytest.raises(InputTypeError, match=r"tr\.patch\(model\.visual"):
        tr.patch(model, "tome", r=4)
    assert type(model) is open_clip.CLIP


def test_attention_pooling_and_patch_dropout_refused():
    model = make_tower("tok", attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    with pytest.raises(InputTypeError, match="attention pooling"):
        tr.patch(model, "tome", r=4)
    with pytest.raises(InputTypeError, match="open_clip VisionTransformer"):
        tr.patch(open_clip.transformer.TextTransformer(context_length=8, vocab_size=10, width=16, heads=2,
                                                        layers=1), "tome", r=1)
    dropped = tr.patch(make_tower("tok", patch_dropout=0.5), "tome", r=4)
    with torch.no_grad():
        dropped(images())  # eval: patch dropout is off
    with pytest.raises(InputError, match="patch dropout"):
        dropped.train()(images())


# --- exactness across families: a timm CLIP tower converted to open_clip --------------------------------------
DEPTH, IMG = 4, 160  # ViT-B/16 width and heads; 4 blocks at 160 px (10 x 10 patches) keep the test fast
SCHEDULES = {
    "tome": [dict(r=8), dict(r=[20, 0, 10, 16])],
    "topk": [dict(keep_rate=0.7, layers=(1, 2)), dict(keep_rate=0.5, layers=(0, 3))],
    "evit": [dict(keep_rate=0.7, layers=(1, 2)), dict(keep_rate=0.5, layers=(0, 3))],
    "gtp": [dict(r=8), dict(r=[4, 12, 0, 8], graph="spatial")],
    "ppt": [dict(r=16, layers=(1, 2), threshold=0.0), dict(r=[8, 0, 16, 0], threshold=math.inf)],
}
MAX_DIFFERENCE: dict[str, float] = {}


def timm_to_open_clip(timm_model: torch.nn.Module, pool_type: str) -> VisionTransformer:
    """The open_clip tower with the weights of a timm ``vit_base_patch16_clip_224`` (key mapping only); its
    ``proj`` is the transposed timm head (zero bias). timm's average pooling norms after pooling (fc_norm)."""
    width, depth = timm_model.embed_dim, len(timm_model.blocks)
    oc = VisionTransformer(image_size=IMG, patch_size=16, width=width, layers=depth, heads=12, mlp_ratio=4.0,
                           output_dim=timm_model.num_classes, pool_type=pool_type,
                           final_ln_after_pool=pool_type == "avg").eval()
    sd = timm_model.state_dict()
    final = "fc_norm" if pool_type == "avg" else "norm"
    new = {"conv1.weight": sd["patch_embed.proj.weight"], "class_embedding": sd["cls_token"].reshape(-1),
           "positional_embedding": sd["pos_embed"][0], "ln_pre.weight": sd["norm_pre.weight"],
           "ln_pre.bias": sd["norm_pre.bias"], "ln_post.weight": sd[f"{final}.weight"],
           "ln_post.bias": sd[f"{final}.bias"], "proj": sd["head.weight"].t()}
    names = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
             "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for key, value in sd.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            for old, name in names.items():
                if rest.startswith(old):
                    rest = name + rest[len(old):]
                    break
            new[f"transformer.resblocks.{i}.{rest}"] = value
    oc.load_state_dict(new, strict=True)
    return oc


@pytest.fixture(scope="module", params=["tok", "avg"])
def pair(request):
    pool = request.param
    timm_model = make_model("vit_base_patch16_clip_224", depth=DEPTH, embed_dim=768, num_heads=12, img_size=IMG,
                            num_classes=512, global_pool="token" if pool == "tok" else "avg")
    with torch.no_grad():
        timm_model.head.bias.zero_()
    oc = timm_to_open_clip(timm_model, pool)
    x = images(batch=2, size=IMG)
    with torch.no_grad():
        assert float((oc(x) - timm_model(x)).abs().max()) < 1e-4  # the conversion itself
    return pool, timm_model, oc


@pytest.mark.parametrize("method", METHODS)
def test_timm_clip_tower_converted_to_open_clip_gives_the_same_reduced_outputs(pair, method):
    pool, timm_model, oc = pair
    x = images(batch=2, size=IMG)
    with torch.no_grad():
        worst = 0.0
        for options in SCHEDULES[method]:
            with tr.patched(timm_model, method, **options), tr.patched(oc, method, **options):
                assert tr.describe(oc)["tokens_out"] == tr.describe(timm_model)["tokens_out"]
                assert tr.flops(oc).total_gmacs == pytest.approx(tr.flops(timm_model).total_gmacs, rel=1e-9)
                want, got = timm_model(x), oc(x)
                timm_states, oc_states = tr.trace(timm_model, x), tr.trace(oc, x)
            assert [s.x.shape[1] for s in oc_states] == [s.x.shape[1] for s in timm_states]
            assert [s.x.shape[1] for s in oc_states][-1] < 101
            for a, b in zip(oc_states, timm_states, strict=True):
                assert torch.equal(a.owner, b.owner)  # the same tokens chosen, merged and dropped
                worst = max(worst, float((a.x - b.x).abs().max()))
            worst = max(worst, float((got - want).abs().max()))
    MAX_DIFFERENCE[f"{pool}/{method}"] = worst
    print(f"open_clip vs timm, {pool} pooling, {method}: max |difference| {worst:.2e}")
    assert worst < 1e-4


def test_print_max_cross_family_difference():
    if MAX_DIFFERENCE:
        print(f"open_clip vs timm, every method at two schedules: max |difference| "
              f"{max(MAX_DIFFERENCE.values()):.2e} over {sorted(MAX_DIFFERENCE)}")
