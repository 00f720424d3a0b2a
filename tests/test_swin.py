"""timm's SwinTransformer (``adapters/swin.py``): the training-free methods inside every window between the
window attention and the MLP. The engine's promises on small configurations (r=0 equals the plain model, the
windowed path equals timm's block, unpatch exact, batch independence, gradients, FLOPs against
``FlopCounterMode``, compile, ONNX), the schedule per window, and the refusals that name their reason."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

import tokenreduce as tr
from tokenreduce.adapters import swin as adapter
from tokenreduce.core.errors import InputError, InputTypeError
from tokenreduce.core.restore import RestoreRule

ALL_BLOCKS = list(range(6))
REDUCING = {
    "tome": dict(r=4),
    "topk": dict(keep_rate=0.5, layers=ALL_BLOCKS),
    "evit": dict(keep_rate=0.5, layers=ALL_BLOCKS),
    "ppt": dict(r=6, layers=ALL_BLOCKS, threshold=0.0),
    "gtp": dict(r=4),
}
NO_OP = {"tome": dict(r=0), "topk": dict(keep_rate=1.0, layers=ALL_BLOCKS),
         "evit": dict(keep_rate=1.0, layers=ALL_BLOCKS), "ppt": dict(r=0, layers=ALL_BLOCKS), "gtp": dict(r=0)}
METHODS = sorted(REDUCING)


def make_swin(**overrides) -> SwinTransformer:
    """64 px, patch 4, 4 x 4 windows (16 tokens): grids 16, 8, 4 over three stages of two blocks each."""
    torch.manual_seed(0)
    kwargs = dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 2, 4),
                  num_classes=10)
    return SwinTransformer(**{**kwargs, **overrides}).eval()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> SwinTransformer:
    return make_swin()


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
def test_nothing_removed_equals_the_plain_model(model, method):
    x = images()
    with torch.no_grad():
        ref = model(x)
        with tr.patched(model, method, **NO_OP[method]):
            assert torch.equal(model(x), ref)
            assert tr.describe(model)["tokens_out"] == [256, 256, 64, 64, 16, 16]


@pytest.mark.floor
def test_the_windowed_path_is_timms_block(model):
    """Every block (shifted or not) through the adapter's window path with nothing removed: timm's output."""
    class Identity:  # a method that removes nothing, through every hook the window path calls
        name, restore_rule = "identity", RestoreRule("departure")

        def needs(self, i, plan):
            return frozenset()

        def attn_transform(self, i, plan):
            return None

        def begin(self, state, plan):
            return state

        def reduce(self, i, state, stats, amount):
            return state

    method = Identity()
    plan = adapter.WindowPlan((0,) * 6, (16,) * 6, (16,) * 6)
    x = model.patch_embed(images())
    shifted = 0
    with torch.no_grad():
        for i, blk in enumerate(adapter.blocks_of(model)):
            if i in (2, 4):
                x = model.layers[i // 2].downsample(x)
            ours, ref = adapter.reduced_block(blk, x, i, method, plan), blk(x)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
            shifted += any(blk.shift_size)
            x = ref
    assert shifted == 2  # the shifted-window mask was exercised (the 4 x 4 last stage does not shift)


@pytest.mark.parametrize("method", METHODS)
def test_reduced_runs_and_unpatch_is_exact(model, method):
    x = images()
    with torch.no_grad():
        ref = model(x)
        tr.patch(model, method, **REDUCING[method])
        out = model(x)
        tr.unpatch(model)
        assert type(model) is SwinTransformer
        assert torch.equal(model(x), ref)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=1e-4)  # the reduction changed something


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
def test_batch_independence(model, method):
    x = images(4, seed=1)
    with torch.no_grad(), tr.patched(model, method, **REDUCING[method]):
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_window_token_counts(model, method):
    with tr.patched(model, method, **REDUCING[method]):
        info = tr.describe(model)
    per_window = {"tome": 12, "topk": 8, "evit": 9, "ppt": 10, "gtp": 12}[method]
    assert info["window_tokens_out"] == [per_window] * 6
    # The MLP runs on every window's remaining tokens: 16 windows, then 4, then 1.
    assert info["tokens_out"] == [16 * per_window] * 2 + [4 * per_window] * 2 + [per_window] * 2
    assert info["tokens_in"] == [256, 256, 64, 64, 16, 16]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rule", ["departure", "reconstruct"])
def test_flops_match_the_counter(model, method, rule):
    options = dict(REDUCING[method])
    if method != "tome":
        options["restore"] = rule
    elif rule != "departure":
        pytest.skip("ToMe only merges: nothing to restore by rule")
    x = images(1)
    with tr.patched(model, method, **options):
        report = tr.flops(model)
        counted = tr.count_gmacs(model, x)
    assert report.total_gmacs < report.baseline_gmacs
    # Top-K / EViT / PPT count a CLS-row product that a model without CLS does not run (0.2% here).
    assert abs(counted / report.total_gmacs - 1) < 0.01, (counted, report.total_gmacs)
    if rule == "reconstruct":
        assert report.restore_gmacs > 0


def test_unreduced_flops_are_timms(model):
    assert tr.flops(model).total_gmacs == pytest.approx(tr.count_gmacs(model, images(1)), rel=1e-9)


@pytest.mark.parametrize("method", ["tome", "topk", "ppt"])
def test_schedule_for_flops_reaches_the_target(model, method):
    base = tr.flops(model).total_gmacs
    options = {} if method == "tome" else dict(layers=ALL_BLOCKS)
    chosen = tr.schedule_for_flops(model, method, target_gmacs=0.8 * base, **options)
    with tr.patched(model, method, **chosen):
        assert tr.flops(model).total_gmacs <= 0.8 * base
        assert tr.flops(model).total_gmacs > 0.6 * base


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_the_parameters(method):
    model = make_swin().train()
    tr.patch(model, method, **REDUCING[method])
    model(images()).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for recompute in (False, True):
        model = make_swin().train()
        model.set_grad_checkpointing(recompute)
        tr.patch(model, "topk", keep_rate=0.5, layers=ALL_BLOCKS)
        model(images()).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def test_forward_intermediates_and_features(model):
    x = images()
    with torch.no_grad():
        final_ref, inter_ref = model.forward_intermediates(x)
        with tr.patched(model, "tome", r=0):
            final, inter = model.forward_intermediates(x)
            assert torch.equal(final, final_ref)
            assert all(torch.equal(a, b) for a, b in zip(inter, inter_ref, strict=True))
        with tr.patched(model, "topk", keep_rate=0.5, layers=ALL_BLOCKS):
            final, inter = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
            assert [t.shape for t in inter] == [t.shape for t in inter_ref[:2]]
            assert final.shape == inter_ref[1].permute(0, 2, 3, 1).shape
            torch.testing.assert_close(inter[1], model.forward_intermediates(x, intermediates_only=True)[1])
            assert model.forward_features(x).shape == SwinTransformer.forward_features(model, x).shape


def test_empty_batch(model):
    with torch.no_grad(), tr.patched(model, "ppt", **REDUCING["ppt"]):
        assert model(torch.randn(0, 3, 64, 64)).shape == (0, 10)
        assert model.forward_features(torch.randn(0, 3, 64, 64)).shape == (0, 4, 4, 128)


def test_pickle_and_deepcopy(model):
    x = images()
    with torch.no_grad(), tr.patched(model, "evit", **REDUCING["evit"]):
        ref = model(x)
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert torch.equal(other(x), ref)
            assert tr.describe(other)["method"] == "evit"


def test_compile_fullgraph_equals_eager(model):
    x = images()
    with torch.no_grad(), tr.patched(model, "ppt", **REDUCING["ppt"]):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


def test_onnx_export_equals_eager(model, tmp_path):
    pytest.importorskip("onnxruntime")
    with tr.patched(model, "topk", **REDUCING["topk"], restore="reconstruct"):
        result = tr.export_onnx(model, tmp_path / "swin.onnx", images=images(3))  # checked on batch 3 and 1
    assert result.max_abs_diff < 1e-4 and result.checked_batches == (3, 1)


# --- refusals ------------------------------------------------------------------------------------------------

def test_refuses_a_reduction_in_a_padded_block():
    model = make_swin(img_size=48, window_size=8, depths=(2, 2), num_heads=(2, 2))  # 12 x 12 grid, 8 x 8 windows
    with pytest.raises(InputError, match=r"block 0 runs on a 12x12 grid that its 8x8 windows do not tile"):
        tr.patch(model, "tome", r=4)
    assert type(model) is SwinTransformer
    tr.patch(model, "tome", r=[0, 0, 4, 4])  # stage 2 (6 x 6 grid, one 6 x 6 window) can reduce
    assert tr.describe(model)["window_tokens_out"] == [64, 64, 32, 32]


def test_refuses_removing_a_whole_window(model):
    with pytest.raises(InputError, match="block 0 would remove 16 of its 16 image tokens"):
        tr.patch(model, "topk", r=16, layers=[0])
    with pytest.raises(InputError, match=r"layer 6 is outside the model's blocks 0\.\.5"):
        tr.patch(model, "topk", keep_rate=0.5)  # the DeiT default layers (3, 6, 9)
    assert type(model) is SwinTransformer


def test_refuses_another_image_size(model):
    with tr.patched(model, "tome", r=4), pytest.raises(InputError, match="built for 64x64"):
        tr.flops(model, img_size=96)


def test_refuses_swin_v2_naming_why():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    model = SwinTransformerV2(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2,), num_heads=(2,))
    with pytest.raises(InputTypeError, match="scaled cosine similarity"):
        tr.patch(model, "tome", r=4)


def test_the_command_counts_a_swin(tmp_path, capsys):
    from tokenreduce.cli import main

    out = tmp_path / "flops.json"
    argv = ["flops", "--model", "swin_tiny_patch4_window7_224", "--model-kwargs",
            "img_size=112,embed_dim=32,depths=(2,2),num_heads=(2,2)", "--method", "ppt", "--opt", "r=20",
            "--opt", "layers=[0,1,2,3]", "--opt", "threshold=0.0", "--count", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "restore = " in printed  # the restore work has its own term in the total line
    data = json.loads(out.read_text())
    assert data["tokens_out"] == [16 * 29] * 2 + [4 * 29] * 2  # 49 - 20 per 7x7 window
    assert abs(data["counted_gmacs"] / data["total_gmacs"] - 1) < 0.01
