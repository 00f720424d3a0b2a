"""Hugging Face transformers models (adapters/hf.py): the engine's promises for every supported class and every
method on small configs built in code (random weights, no hub), and exactness across families: timm models
converted by key mapping give the same reduced outputs through either adapter."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import timm
import torch
import transformers
from conftest import REDUCING as SMALL_REDUCING
from hf_convert import timm_to_hf_clip, timm_to_hf_dinov2, timm_to_hf_vit
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce as tr
from tokenreduce.adapters.hf import siglip_pool
from tokenreduce.core.errors import InputError, InputTypeError

SMALL = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, image_size=64, patch_size=8,
             layer_norm_eps=1e-6)
# case -> (model class, config class, config overrides)
CASES = {
    "ViTModel": ("ViTModel", "ViTConfig", dict(intermediate_size=96)),
    "ViTForImageClassification": ("ViTForImageClassification", "ViTConfig", dict(intermediate_size=96, num_labels=5)),
    "DeiTModel": ("DeiTModel", "DeiTConfig", dict(intermediate_size=96)),
    "DeiTForImageClassification": ("DeiTForImageClassification", "DeiTConfig", dict(intermediate_size=96,
                                                                                    num_labels=5)),
    "DeiTForImageClassificationWithTeacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig",
                                              dict(intermediate_size=96, num_labels=5)),
    "Dinov2Model": ("Dinov2Model", "Dinov2Config", dict(mlp_ratio=2)),
    "Dinov2Model:swiglu": ("Dinov2Model", "Dinov2Config", dict(mlp_ratio=2, use_swiglu_ffn=True)),
    "Dinov2ForImageClassification": ("Dinov2ForImageClassification", "Dinov2Config", dict(mlp_ratio=2, num_labels=5)),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                                 dict(mlp_ratio=2, num_register_tokens=3)),
    "Dinov2WithRegistersForImageClassification": ("Dinov2WithRegistersForImageClassification",
                                                  "Dinov2WithRegistersConfig",
                                                  dict(mlp_ratio=2, num_register_tokens=3, num_labels=5)),
    "CLIPVisionModel": ("CLIPVisionModel", "CLIPVisionConfig", dict(intermediate_size=96)),
    "CLIPVisionModelWithProjection": ("CLIPVisionModelWithProjection", "CLIPVisionConfig",
                                      dict(intermediate_size=96, projection_dim=16)),
    "SiglipVisionModel": ("SiglipVisionModel", "SiglipVisionConfig", dict(intermediate_size=96)),
}
PREFIX = {"ViT": 1, "DeiT": 2, "Dinov2Model": 1, "Dinov2Model:swiglu": 1, "Dinov2ForImageClassification": 1,
          "Dinov2With": 4, "CLIP": 1, "Siglip": 0}
# conftest's reducing options, PPT with the threshold these transformers configs were checked with.
REDUCING = {**SMALL_REDUCING, "ppt": dict(r=4, layers=(1, 2), threshold=2e-6)}
NO_OP = {"tome": dict(r=0), "topk": dict(keep_rate=1.0, layers=(1, 2)), "evit": dict(keep_rate=1.0, layers=(1, 2)),
         "gtp": dict(r=0, sparsity=0.5), "ppt": dict(r=0, layers=(1, 2))}
METHODS = sorted(REDUCING)
TOKEN_NAMES = ("cls_token", "distillation_token", "register_tokens", "position_embeddings", "class_embedding",
               "position_embedding.weight", "probe")


def num_prefix(case: str) -> int:
    return next(v for k, v in PREFIX.items() if case.startswith(k))


_BUILT: dict[tuple[str, str], torch.nn.Module] = {}


def make(case: str, impl: str = "eager") -> torch.nn.Module:
    """A small, seeded, eval-mode model of ``case`` with the attention implementation ``impl`` (a deep copy of one
    built once: building a transformers model costs more than the test)."""
    if (case, impl) not in _BUILT:
        _BUILT[case, impl] = _build(case, impl)
    return copy.deepcopy(_BUILT[case, impl])


def _build(case: str, impl: str) -> torch.nn.Module:
    cls_name, cfg_name, overrides = CASES[case]
    config = getattr(transformers, cfg_name)(**{**SMALL, **overrides})
    config._attn_implementation = impl
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # spread the prefix and position embeddings so that tokens differ and reductions matter
        for name, p in model.named_parameters():
            if name.endswith(TOKEN_NAMES):
                p.normal_(0, 0.5)
    return model


def images(batch: int = 2, seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tensors(out) -> dict[str, torch.Tensor]:
    """Every tensor a user reads in an output (hidden states included), by name."""
    got = {}
    for key, value in out.items():
        if torch.is_tensor(value):
            got[key] = value
        elif key == "hidden_states" and value is not None:
            got.update({f"hidden_states[{i}]": h for i, h in enumerate(value)})
    return got


def main(out) -> torch.Tensor:
    for key in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return out[key]
    raise AssertionError(out.keys())


def assert_outputs_close(got, expected, atol: float, exact: bool = False) -> None:
    a, b = tensors(got), tensors(expected)
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


# --- promises ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_nothing_to_remove_equals_unpatched(case, impl):
    model = make(case, impl)
    x = images()
    with torch.no_grad():
        expected = model(x, output_hidden_states=True)
    for method in METHODS:
        with torch.no_grad():
            tr.patch(model, method, **NO_OP[method])
            got = model(x, output_hidden_states=True)
        assert type(got) is type(expected)
        # The dense restore at r=0 (last_hidden_state, every hidden state) is the unreduced tokens exactly; the
        # heads run the model's own modules (SigLIP's pooling head through attend: 1 ulp).
        assert_outputs_close(got, expected, atol=1e-5)
        if "last_hidden_state" in expected:
            assert torch.equal(got["last_hidden_state"], expected["last_hidden_state"]), method
        for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
            assert torch.equal(a, b), method


@pytest.mark.parametrize("method", METHODS)
def test_unpatch_restores_class_and_outputs_and_reduction_changes_them(case, method):
    model = make(case)
    cls, x = type(model), images()
    with torch.no_grad():
        expected = model(x)
        tr.patch(model, method, **REDUCING[method])
        reduced = model(x)
        tr.unpatch(model)
        restored = model(x)
    assert type(model) is cls and "_tokenreduce" not in model.__dict__
    assert not torch.allclose(main(reduced), main(expected), atol=1e-6), "the reduction should change the output"
    assert_outputs_close(restored, expected, 0, exact=True)
    assert tensors(reduced).keys() == tensors(expected).keys()
    for key, value in tensors(reduced).items():  # same fields, same shapes (the restored grid)
        assert value.shape == tensors(expected)[key].shape


@pytest.mark.parametrize("method", METHODS)
def test_eager_and_sdpa_give_the_same_reduced_outputs(case, method):
    outs = []
    for impl in ("eager", "sdpa"):
        model = tr.patch(make(case, impl), method, **REDUCING[method])
        with torch.no_grad():
            outs.append(model(images(), output_hidden_states=True))
    assert_outputs_close(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_batch_independence(case, method):
    model = tr.patch(make(case), method, **REDUCING[method])
    x = images(batch=4)
    with torch.no_grad():
        together = model(x)
        alone = [model(x[i:i + 1]) for i in (0, 3)]
    for key, value in tensors(together).items():
        torch.testing.assert_close(torch.cat([tensors(a)[key] for a in alone]), value[[0, 3]], atol=3e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_prefix_tokens_kept_sizes_conserved_counts_as_described(case, method):
    model = tr.patch(make(case), method, **REDUCING[method])
    info = tr.describe(model)
    prefix = num_prefix(case)
    assert info["num_prefix"] == prefix
    x = images(batch=4)
    with torch.no_grad():
        states = tr.trace(model, x)
        tr.unpatch(model)
        plain = model(x, output_hidden_states=True).hidden_states
    assert [s.x.shape[1] for s in states] == info["tokens_out"]
    assert info["tokens_out"][-1] < info["tokens_in"][0]
    # Layer 0 attends over every token (nothing is reduced before it): its prefix rows are the unpatched ones.
    torch.testing.assert_close(states[0].x[:, :prefix], plain[1][:, :prefix], atol=1e-6, rtol=0)
    for state in states:
        assert bool((state.owner < 0).logical_or(state.owner >= prefix).all())
        size = state.sizes()
        assert torch.equal(size[:, :prefix], torch.ones_like(size[:, :prefix]))
        if method != "gtp":
            carried = (state.owner >= 0).sum(dim=1).float()
            assert torch.equal(size[:, prefix:].sum(dim=(1, 2)), carried)


def counted_gmacs(model, x) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


@pytest.mark.parametrize("method,options", [
    ("tome", dict(r=[6, 0, 2, 9])), ("topk", dict(keep_rate=0.5, layers=(0, 2))),
    ("evit", dict(keep_rate=0.7, layers=(1, 2, 3))), ("gtp", dict(r=3, sparsity=0.8)),
    ("ppt", dict(r=5, layers=(0, 3), threshold=0.0)),
])
def test_analytic_flops_match_flop_counter(case, method, options):
    model = tr.patch(make(case, "eager"), method, **options)  # eager: the attention products are counted
    report = tr.flops(model)
    assert report.total_gmacs == pytest.approx(counted_gmacs(model, images(batch=1)), rel=0.01)


def test_unpatched_flops_match_flop_counter(case):
    model = make(case, "eager")
    if case == "SiglipVisionModel":  # nn.MultiheadAttention's fast path is not seen by FlopCounterMode
        pytest.skip("unpatched SigLIP head runs torch's native MHA")
    assert tr.flops(model).gmacs == pytest.approx(counted_gmacs(model, images(batch=1)), rel=0.01)


def test_bfloat16_autocast(case):
    model = make(case)
    x = images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = main(model(x))
    for method in METHODS:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            tr.patch(model, method, **NO_OP[method])
            nothing = main(model(x))
            tr.patch(model, method, **REDUCING[method])
            reduced = main(model(x))
        assert nothing.dtype == expected.dtype and bool(torch.isfinite(reduced).all())
        # The same bfloat16 kernels up to the order of the attention scale (a bfloat16 ulp of the outputs).
        torch.testing.assert_close(nothing.float(), expected.float(), atol=0.05, rtol=0.02)


def test_train_mode_gradients_reach_the_parameters(case):
    model = make(case).train()
    x = images()
    main(model(x)).float().square().mean().backward()
    expected = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert len(expected) > 10
    for method in METHODS:
        model.zero_grad(set_to_none=True)
        tr.patch(model, method, **REDUCING[method])
        main(model(x)).float().square().mean().backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == expected, method


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tr.patch(make("Dinov2Model").train(), "tome", r=4)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(images()).last_hidden_state.square().mean().backward()
        grads.append(model.encoder.layer[0].attention.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=0)


# --- outputs, arguments, refusals ------------------------------------------------------------------------------


def test_restored_outputs_are_the_dense_restore_of_the_traced_states():
    model = tr.patch(make("ViTModel"), "topk", keep_rate=0.6, layers=(1, 2))
    x = images()
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        states = tr.trace(model, x)
    assert out.last_hidden_state.shape == (2, 65, 48) and len(out.hidden_states) == 5
    for i, state in enumerate(states):
        assert torch.equal(out.hidden_states[i + 1], tr.restore(state))
    assert torch.equal(out.last_hidden_state, model.layernorm(tr.restore(states[-1])))


@pytest.mark.parametrize("method", ["tome", "ppt"])
def test_siglip_pooling_over_reduced_tokens_with_log_size_equals_the_head_on_the_restored_grid(method):
    # A merged token of size s stands for s identical keys: attention pooling over the reduced tokens with log(s)
    # on the keys is the model's own head run on the restored grid (PPT threshold inf: every image merges).
    options = {**REDUCING[method], "threshold": math.inf} if method == "ppt" else REDUCING[method]
    model = tr.patch(make("SiglipVisionModel"), method, **options)
    with torch.no_grad():
        out = model(images())
        own_head = model.head(out.last_hidden_state)
    torch.testing.assert_close(out.pooler_output, own_head, atol=1e-5, rtol=0)
    assert tr.describe(model)["tokens_out"][-1] < 64


def test_siglip_pool_without_sizes_is_the_head():
    model = make("SiglipVisionModel")
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(siglip_pool(model, x, None, False), model.head(x), atol=1e-6, rtol=0)


def test_siglip_flops_count_the_pooling_head_at_the_reduced_token_count():
    model = tr.patch(make("SiglipVisionModel"), "tome", r=6)
    report = tr.flops(model)
    assert report.head_gmacs < tr.flops(tr.unpatch(make("SiglipVisionModel"))).head_gmacs
    tr.patch(model, "tome", r=6)
    assert report.total_gmacs == pytest.approx(counted_gmacs(model, images(batch=1)), rel=0.01)


def test_output_attentions_and_masks_are_refused():
    model = tr.patch(make("ViTForImageClassification"), "tome", r=4)
    with pytest.raises(InputError, match="output_attentions"):
        model(images(), output_attentions=True)
    with pytest.raises(InputError, match="attention_mask"):
        model(images(), attention_mask=torch.ones(2, 65))
    with pytest.raises(InputError, match="not supported"):
        model(images(), some_option=1)
    model.config.output_attentions = True
    with pytest.raises(InputError, match="output_attentions"):
        model(images())


def test_return_dict_false_labels_and_hidden_state_selection():
    model = tr.patch(make("ViTForImageClassification"), "tome", r=4)
    x, labels = images(), torch.tensor([1, 3])
    with torch.no_grad():
        out = model(x, labels=labels, output_hidden_states=True)
        as_tuple = model(x, labels=labels, return_dict=False)
        selected = model(x, output_hidden_states=[1, 3]).hidden_states
    assert out.loss is not None and out.loss.ndim == 0 and torch.equal(as_tuple[1], out.logits)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert selected[0] is None and torch.equal(selected[1], out.hidden_states[2]) and selected[2] is None
    tr.unpatch(model)
    with torch.no_grad():
        plain = model(x, output_hidden_states=[1, 3]).hidden_states
    assert [h is None for h in plain] == [h is None for h in selected]


def test_interpolate_pos_encoding_and_bool_masked_pos_are_honoured():
    model = make("ViTModel")
    masked_model = make("Dinov2Model")
    x = images(size=80)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        expected = model(x, interpolate_pos_encoding=True)
        expected_masked = masked_model(images(), bool_masked_pos=mask)
        tr.patch(model, "tome", r=0)
        tr.patch(masked_model, "tome", r=0)
        got = model(x, interpolate_pos_encoding=True)
        got_masked = masked_model(images(), bool_masked_pos=mask)
        tr.patch(model, "tome", r=4)
        reduced = model(x, interpolate_pos_encoding=True)
    assert_outputs_close(got, expected, atol=1e-6)
    assert_outputs_close(got_masked, expected_masked, atol=1e-6)
    assert reduced.last_hidden_state.shape == (2, 101, 48)
    assert tr.describe(model, img_size=80)["tokens_out"][-1] == 101 - 16


def test_patched_model_pickles_deep_copies_and_saves(tmp_path):
    model = tr.patch(make("DeiTForImageClassificationWithTeacher"), "gtp", r=4)
    x = images()
    with torch.no_grad():
        expected = model(x).logits
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert type(clone) is type(model) and tr.describe(clone)["method"] == "gtp"
            assert torch.equal(clone(x).logits, expected)
        model.save_pretrained(tmp_path)
        loaded = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path).eval()
        assert type(loaded) is transformers.DeiTForImageClassificationWithTeacher
        assert set(loaded.state_dict()) == set(tr.unpatch(copy.deepcopy(model)).state_dict())
        assert torch.equal(tr.patch(loaded, "gtp", r=4)(x).logits, expected)


@pytest.mark.parametrize("cls_name,cfg_name", [("ViTForMaskedImageModeling", "ViTConfig"),
                                               ("SiglipForImageClassification", "SiglipConfig")])
def test_unsupported_classes_are_refused_with_a_reason(cls_name, cfg_name):
    if cfg_name == "SiglipConfig":
        config = transformers.SiglipConfig(vision_config={**SMALL, "intermediate_size": 96},
                                           text_config=dict(hidden_size=48, num_hidden_layers=1,
                                                            num_attention_heads=3, intermediate_size=96))
    else:
        config = transformers.ViTConfig(**SMALL, intermediate_size=96)
    model = getattr(transformers, cls_name)(config)
    with pytest.raises(InputTypeError, match=cls_name):
        tr.patch(model, "tome", r=4)
    assert type(model) is getattr(transformers, cls_name)


def test_other_layer_types_are_refused():
    model = make("ViTModel")
    model.layers[2] = torch.nn.Identity()
    with pytest.raises(InputTypeError, match="layer 2"):
        tr.patch(model, "tome", r=4)


# --- exactness across families ---------------------------------------------------------------------------------

CROSS = {
    # timm model (random, seeded) -> converter, HF features -> timm's final normed grid
    "deit_small_patch16_224": dict(depth=4),
    "deit_small_distilled_patch16_224": dict(depth=4),
    "vit_small_patch14_dinov2": dict(depth=4, img_size=224),
    "vit_base_patch16_clip_224": dict(depth=4),
}
SCHEDULES = {
    "tome": [dict(r=8), dict(r=[20, 0, 12, 16])],
    "topk": [dict(keep_rate=0.7, layers=(1, 2)), dict(keep_rate=0.5, layers=(0, 2, 3))],
    "evit": [dict(keep_rate=0.7, layers=(1, 2)), dict(keep_rate=0.5, layers=(0, 2, 3))],
    "gtp": [dict(r=8), dict(r=16, graph="spatial")],
    "ppt": [dict(r=20, layers=(1, 2), threshold=0.0), dict(r=30, layers=(0, 3), threshold=math.inf)],
}
MAX_DIFF: dict[str, float] = {}


def timm_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **CROSS[name]).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("cls_token", "dist_token", "pos_embed")):
                p.normal_(0, 0.5)
            elif pname.endswith("gamma"):
                p.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def pairs():
    out = {}
    for name in CROSS:
        model = timm_model(name)
        convert = (timm_to_hf_dinov2 if "dinov2" in name else timm_to_hf_clip if "clip" in name else timm_to_hf_vit)
        out[name] = (model, convert(model, "sdpa"))
    return out


@pytest.mark.parametrize("schedule", [0, 1])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CROSS))
def test_same_weights_same_reduced_outputs_in_timm_and_transformers(pairs, name, method, schedule):
    timm_vit, hf = pairs[name]
    options = SCHEDULES[method][schedule]
    tr.patch(timm_vit, method, **options)
    tr.patch(hf, method, **options)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            timm_grid = timm_vit.forward_features(x)
            out = hf(x)
            timm_states, hf_states = tr.trace(timm_vit, x), tr.trace(hf, x)
        hf_grid = hf.post_layernorm(out.last_hidden_state) if "clip" in name else out.last_hidden_state
        pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
    finally:
        tr.unpatch(timm_vit)
        tr.unpatch(hf)
    counts = [s.x.shape[1] for s in timm_states]
    assert counts == [s.x.shape[1] for s in hf_states] == tr.describe(tr.patch(hf, method, **options))["tokens_out"]
    tr.unpatch(hf)
    assert min(counts) < timm_vit.patch_embed.num_patches + timm_vit.num_prefix_tokens
    diffs = [(hf_grid - timm_grid).abs().max().item(), (pooled - timm_grid[:, 0]).abs().max().item()]
    diffs += [(a.x - b.x).abs().max().item() for a, b in zip(timm_states, hf_states, strict=True)]
    key = f"{name} {method} {options}"
    MAX_DIFF[key] = max(diffs)
    print(f"\ncross-family max |timm - transformers| {key}: {max(diffs):.2e} (tokens {counts})")
    assert max(diffs) < 1e-4


def test_cross_family_summary(pairs):
    """Prints the largest difference over every cross-family case run in this session."""
    if MAX_DIFF:
        worst = max(MAX_DIFF, key=MAX_DIFF.get)
        print(f"\ncross-family: {len(MAX_DIFF)} cases, max difference {MAX_DIFF[worst]:.2e} ({worst})")
        assert MAX_DIFF[worst] < 1e-4
