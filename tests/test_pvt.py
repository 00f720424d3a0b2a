"""timm's PyramidVisionTransformerV2 (``adapters/pvt.py``): the training-free methods in every block between its
attention (keys from the spatially reduced grid) and its MLP (depth-wise convolution on the grid). The engine's
promises on a small PVTv2-b0 at 64 px (grids 16x16, 8x8, 4x4, 2x2), and the refusals that name their reason."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import timm
import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2

import tokenreduce as tr
from tokenreduce.core.errors import InputError, InputTypeError

SIZE = 64
BLOCKS = list(range(4))
REDUCING = {
    "tome": dict(r=[64, 16, 4, 0]),
    "topk": dict(keep_rate=0.5, layers=BLOCKS),
    "evit": dict(keep_rate=0.5, layers=BLOCKS),
    "ppt": dict(r=[64, 16, 4, 0], threshold=0.0),
    "gtp": dict(r=[64, 16, 4, 0]),
}
NO_OP = {"tome": dict(r=0), "topk": dict(keep_rate=1.0, layers=BLOCKS), "evit": dict(keep_rate=1.0, layers=BLOCKS),
         "ppt": dict(r=0, layers=BLOCKS), "gtp": dict(r=0)}
METHODS = sorted(REDUCING)


def make_pvt(**overrides) -> PyramidVisionTransformerV2:
    torch.manual_seed(0)
    return timm.create_model("pvt_v2_b0", pretrained=False, num_classes=10, depths=(1, 1, 1, 1), **overrides).eval()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> PyramidVisionTransformerV2:
    return make_pvt()


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
def test_nothing_removed_equals_the_plain_model(model, method):
    x = images()
    with torch.no_grad():
        ref = model(x)
        with tr.patched(model, method, **NO_OP[method]):
            assert torch.equal(model(x), ref)


@pytest.mark.floor
@pytest.mark.parametrize("method", METHODS)
def test_reduced_runs_unpatch_exact_and_batch_independent(model, method):
    x = images(3, seed=1)
    with torch.no_grad():
        ref = model(x)
        with tr.patched(model, method, **REDUCING[method]):
            out = model(x)
            alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
        assert type(model) is PyramidVisionTransformerV2 and torch.equal(model(x), ref)
    assert out.shape == ref.shape and not torch.allclose(out, ref, atol=1e-4)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_token_counts_and_flops_match_the_counter(model, method):
    with tr.patched(model, method, **REDUCING[method]):
        info = tr.describe(model, img_size=SIZE)
        report = tr.flops(model, img_size=SIZE)
        counted = tr.count_gmacs(model, images(1))
    expected = {"tome": [192, 48, 12, 4], "topk": [128, 32, 8, 2], "evit": [129, 33, 9, 3], "ppt": [192, 48, 12, 4],
                "gtp": [192, 48, 12, 4]}[method]
    assert info["tokens_in"] == [256, 64, 16, 4] and info["tokens_out"] == expected
    assert abs(counted / report.total_gmacs - 1) < 0.01, (counted, report.total_gmacs)
    assert report.total_gmacs < report.baseline_gmacs


def test_restore_departure_by_default_and_a_chosen_rule_counted(model):
    with tr.patched(model, "topk", keep_rate=0.5, layers=BLOCKS):
        assert tr.describe(model, img_size=SIZE)["restore"] == {"name": "departure"}
        assert tr.flops(model, img_size=SIZE).restore_gmacs == 0
        cheap = model(images())
    with tr.patched(model, "topk", keep_rate=0.5, layers=BLOCKS, restore="reconstruct"):
        report = tr.flops(model, img_size=SIZE)
        assert report.restore_gmacs > 0
        assert abs(tr.count_gmacs(model, images(1)) / report.total_gmacs - 1) < 0.01
        assert not torch.allclose(model(images()), cheap, atol=1e-5)


def test_unreduced_flops_are_timms(model):
    assert tr.flops(model, img_size=SIZE).total_gmacs == pytest.approx(tr.count_gmacs(model, images(1)), rel=1e-9)


def test_statistics_per_token_come_from_the_regions(model):
    """Top-K ranks tokens by their region's received attention: at stage 1 (sr 8, a 16x16 grid of 2x2 regions of
    64 tokens) keeping 50% keeps whole regions, and the kept tokens' patches are exactly two regions."""
    from tokenreduce.adapters.pvt import region_index

    index, count = region_index((16, 16), 8, torch.device("cpu"))
    assert count.tolist() == [64, 64, 64, 64] and index.view(16, 16)[7, 8].item() == 1
    index, count = region_index((5, 5), 2, torch.device("cpu"))  # the convolution skips row/column 4
    assert count.tolist() == [4, 6, 6, 9]


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_the_parameters(method):
    model = make_pvt().train()
    tr.patch(model, method, **REDUCING[method])
    model(images()).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_forward_intermediates_empty_batch_pickle(model):
    x = images()
    with torch.no_grad():
        ref_final, ref_inter = model.forward_intermediates(x)
        with tr.patched(model, "tome", r=0):
            final, inter = model.forward_intermediates(x)
            assert torch.equal(final, ref_final) and all(
                torch.equal(a, b) for a, b in zip(inter, ref_inter, strict=True))
        with tr.patched(model, "ppt", **REDUCING["ppt"]):
            inter = model.forward_intermediates(x, indices=[1], intermediates_only=True)
            assert [t.shape for t in inter] == [ref_inter[1].shape]
            assert model(torch.randn(0, 3, SIZE, SIZE)).shape == (0, 10)
            ref = model(x)
            assert torch.equal(pickle.loads(pickle.dumps(model))(x), ref) and torch.equal(copy.deepcopy(model)(x), ref)


def test_compile_fullgraph_equals_eager(model):
    x = images()
    with torch.no_grad(), tr.patched(model, "topk", **REDUCING["topk"]):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


def test_refusals_name_the_reason(model):
    with tr.patched(model, "gtp", r=16):  # fits the configured 224 px (196 tokens in block 2), not 64 px
        with pytest.raises(InputError, match="block 2 would remove 16 of its 16 image tokens"):
            model(images())
        with pytest.raises(InputError, match="block 2 would remove 16 of its 16 image tokens"):
            tr.flops(model, img_size=SIZE)
    with pytest.raises(InputError, match=r"numbers its 4 blocks across the stages, 1 \+ 1 \+ 1 \+ 1"):
        tr.patch(model, "topk", keep_rate=0.5)  # the DeiT default layers (3, 6, 9)
    tr.patch(model, "gtp", r=[64, 0, 0, 0], sparsity=0.5)
    try:
        with pytest.raises(InputError, match="queries x key regions"):
            model(images())
    finally:
        tr.unpatch(model)
    linear = timm.create_model("pvt_v2_b2_li", pretrained=False, num_classes=10, depths=(1, 1, 1, 1))
    with pytest.raises(InputTypeError, match="linear-attention PVTv2"):
        tr.patch(linear, "tome", r=4)
    assert math.isfinite(tr.flops(model, img_size=SIZE).total_gmacs)


def test_onnx_export_equals_eager(model, tmp_path):
    pytest.importorskip("onnxruntime")
    with tr.patched(model, "tome", **REDUCING["tome"]):
        result = tr.export_onnx(model, tmp_path / "pvt.onnx", img_size=SIZE, images=images(3))
    assert result.max_abs_diff < 1e-4 and result.checked_batches == (3, 1)


def test_patches_to_tokens_is_the_mean_over_a_tokens_patches():
    """A remaining token takes the mean of its patches' convolution outputs; a patch that left counts for none."""
    from tokenreduce.adapters.pvt import patches_to_tokens
    from tokenreduce.core.state import TokenState

    values = torch.tensor([[[1.0], [3.0], [10.0], [7.0]]])
    state = TokenState(x=torch.zeros(1, 2, 1), num_prefix=0, owner=torch.tensor([[0, 0, 1, 1]]),
                       left=torch.tensor([[False, False, False, True]]))
    assert patches_to_tokens(values, state).flatten().tolist() == [2.0, 10.0]
