"""int8 recipes of ``tr.export_onnx`` / ``tr.export_openvino`` / ``tokenreduce export --int8-recipe``: SmoothQuant's
rewrite (``tokenreduce.smoothquant``) is exact in float for every method and refuses what it cannot fold; each
recipe quantizes exactly the matrix products it names."""

from __future__ import annotations

import collections
from importlib.util import find_spec

import pytest
import torch
from conftest import REDUCING, make_model
from torch import nn

import tokenreduce as tr
from tokenreduce.cli import main
from tokenreduce.commands.export import INT8_RECIPE_NAMES
from tokenreduce.export import INT8_RECIPES, linear_nodes
from tokenreduce.smoothquant import after_activation_linears, smooth_quant, trace_linears

needs_export = pytest.mark.skipif(any(find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
                                  reason="the [export] extra is not installed")
CASE = "deit_small_patch16_224"  # 6 x 6 patches + CLS, width 48 (conftest)
DEPTH = 3


def patched(method: str) -> nn.Module:
    model = make_model(CASE, depth=DEPTH)
    with torch.no_grad():  # LayerNorm affine and biases away from 1 / 0, so that a wrong fold shows
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm1.bias", "norm2.bias", "qkv.bias")):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) + 0.5)
    return model if method == "none" else tr.patch(model, method, **REDUCING[method])


def images(count: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 96, 96, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["none", *REDUCING])
def test_smooth_quant_is_exact_in_float_for_every_method(method):
    # float64: the rewrite's float32 rounding (1e-7) flips near-ties of this random model's scores (PPT)
    model = patched(method).double()
    values = not tr.export.reads_value_norms(model)
    assert values == (method != "ppt")  # PPT ranks by the values' norms
    smoothed = smooth_quant(model, images(8, seed=2).double(), alpha=0.7, values=values)
    for i in range(DEPTH):  # every LayerNorm -> Linear pair and every value -> proj pair was rescaled
        for name in ("norm1.weight", "norm2.weight", "mlp.fc1.weight") + ("attn.proj.weight",) * values:
            before = model.get_submodule(f"blocks.{i}").get_parameter(name)
            after = smoothed.get_submodule(f"blocks.{i}").get_parameter(name)
            assert not torch.allclose(before, after, rtol=1e-3), (i, name)
    assert torch.equal(smoothed.blocks[0].mlp.fc2.weight, model.blocks[0].mlp.fc2.weight)  # fed by GELU: untouched
    with torch.inference_mode():
        expected, got = model(images().double()), smoothed(images().double())
    if method != "none":  # the same decisions, not only the same logits: every patch's owner after every block
        owners = [[s.owner for s in tr.trace(m, images().double())] for m in (model, smoothed)]
        assert all(torch.equal(a, b) for a, b in zip(*owners, strict=True))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_smooth_quant_is_exact_with_layerscale_and_registers():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=10, depth=2, embed_dim=32,
                              num_heads=2, img_size=28, reg_tokens=2).eval().double()
    with torch.no_grad():  # LayerScale starts at 1e-5 in DINOv2: set it, and the LayerNorms, away from 1e-5 / 1 / 0
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm1.bias", "norm2.bias", "ls1.gamma", "ls2.gamma")):
                p.copy_(torch.rand_like(p) + 0.5)
    calibration = torch.randn(4, 3, 28, 28, dtype=torch.float64)
    smoothed = smooth_quant(model, calibration)
    assert not torch.allclose(smoothed.blocks[1].attn.proj.weight, model.blocks[1].attn.proj.weight, rtol=1e-3)
    x = torch.randn(3, 3, 28, 28, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(smoothed(x), model(x), rtol=1e-10, atol=1e-10)


def test_smooth_quant_flattens_the_inputs_it_folds_into():
    model, calibration = patched("none"), images(8, seed=2)
    with torch.no_grad():  # an outlier channel, as real ViTs have after their LayerNorms
        model.blocks[1].norm2.weight[0] *= 30
    before = trace_linears(model, calibration)["maxima"]["blocks.1.mlp.fc1"]
    after = trace_linears(smooth_quant(model, calibration, alpha=0.5), calibration)["maxima"]["blocks.1.mlp.fc1"]
    assert before.max() / before.min() > 20 and after.max() / after.min() < before.max() / before.min() / 4


def test_connections_found_from_one_forward_pass():
    found = trace_linears(patched("tome"), images(2))
    assert found["norm_of"] == {f"blocks.{i}.{lin}": f"blocks.{i}.{norm}" for i in range(DEPTH)
                                for lin, norm in (("attn.qkv", "norm1"), ("mlp.fc1", "norm2"))}
    assert after_activation_linears(patched("tome"), images(2)) == {f"blocks.{i}.mlp.fc2" for i in range(DEPTH)}


class LayerNormUsedTwice(nn.Module):
    """Its LayerNorm's output goes to a Linear layer and, unscaled, straight into the output."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x.flatten(1)[:, :8] * torch.arange(1.0, 9.0))
        return self.fc(h) + h


@pytest.mark.parametrize(("model", "kwargs", "message"), [
    (None, dict(alpha=1.5), r"SmoothQuant's alpha must be a number in \[0, 1\], got 1.5"),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), {}, "has no LayerNorm .* feeding a Linear layer"),
    (LayerNormUsedTwice(), {},
     r"SmoothQuant changed LayerNormUsedTwice's outputs by 0\.\d+ \(relative, in float64.*int8_recipe='per-channel'"),
])
def test_smooth_quant_refusals_leave_the_model_unchanged(model, kwargs, message):
    model = model or patched("tome")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tr.InputError, match=message):
        smooth_quant(model, torch.randn(4, 3, 2, 2) if isinstance(model, nn.Sequential | LayerNormUsedTwice)
                     else images(4), **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def quantized_ops(path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@needs_export
@pytest.mark.parametrize(("recipe", "integer_products"), [
    # 3 blocks x (qkv, proj, fc1, fc2) = 12 linear layers; ONNX Runtime's dynamic mode leaves the head's Gemm float
    ("smooth", 9),  # fc2 x 3 kept float
    ("per-channel", 12),
])
def test_each_linear_recipe_quantizes_the_linear_layers_it_names(recipe, integer_products, tmp_path):
    result = tr.export_onnx(patched("tome"), tmp_path / "m.onnx", images=images(), int8="dynamic", int8_recipe=recipe)
    assert result.int8_recipe == recipe and result.int8 == "dynamic" and result.cosine >= 0.99
    assert result.max_abs_diff <= 1e-4  # the float graph (SmoothQuant's rewrite included) against PyTorch
    assert quantized_ops(tmp_path / "m.onnx")["MatMulInteger"] == integer_products


@needs_export
def test_per_tensor_recipe_quantizes_every_product(tmp_path):
    import onnx

    result = tr.export_onnx(patched("tome"), tmp_path / "m.onnx", images=images(), int8="static",
                            int8_recipe="per-tensor")
    assert result.int8_recipe == "per-tensor" and result.cosine >= 0.99
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(products) > 4 * DEPTH + 1  # attention's products and ToMe's similarity too
    assert all(made_by.get(n.input[0]) == "DequantizeLinear" for n in products)


@needs_export
def test_static_smooth_recipe_calibrates_the_linear_layers_but_mlp_outputs(tmp_path):
    import onnx

    result = tr.export_onnx(patched("ppt"), tmp_path / "m.onnx", images=images(), int8="static",
                            calibration=images(8, seed=3))
    assert result.int8_recipe == "smooth" and result.cosine >= 0.99
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    dequantized = [n for n in products if made_by.get(n.input[1]) == "DequantizeLinear"]
    assert len(dequantized) == 3 * DEPTH + 1  # qkv, proj, fc1 per block and the head; fc2 and attention float
    assert all(made_by.get(n.input[0]) == "DequantizeLinear" for n in dequantized)  # inputs calibrated too


@needs_export
def test_linear_nodes_are_the_linear_layers(tmp_path):
    tr.export_onnx(patched("tome"), tmp_path / "m.onnx", images=images(2))
    all_linear = linear_nodes(tmp_path / "m.onnx")
    assert len(all_linear) == 4 * DEPTH + 1  # + the head
    without = linear_nodes(tmp_path / "m.onnx", ("blocks.0.mlp.fc2", "head"))
    assert len(without) == 4 * DEPTH - 1 and set(without) < set(all_linear)


@needs_export
def test_unknown_recipe_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(tr.InputError, match="unknown int8_recipe 'int4'; valid: smooth, per-channel, per-tensor"):
        tr.export_onnx(patched("tome"), tmp_path / "m.onnx", int8="dynamic", int8_recipe="int4")
    assert list(tmp_path.iterdir()) == []


def test_cli_recipe_names_are_the_library_recipes():
    assert INT8_RECIPE_NAMES == tuple(INT8_RECIPES) and INT8_RECIPE_NAMES[0] == tr.export.DEFAULT_INT8_RECIPE


@needs_export
def test_cli_int8_recipe(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = ["export", "--model", "deit_tiny_patch16_224", "--model-kwargs",
            "depth=2,embed_dim=32,num_heads=2,img_size=32", "--check-count", "3", "--method", "tome", "--r", "2",
            "--int8", "--int8-recipe", "per-channel", "--out", str(out)]
    assert main(argv) == 0
    assert f"wrote {out} (ONNX, int8 dynamic per-channel): tome(r=2)" in capsys.readouterr().out
    assert main([*argv[:-5], "--int8-recipe", "smooth", "--out", str(out)]) == 2  # without --int8
    assert "--int8-recipe goes with --int8" in capsys.readouterr().err
