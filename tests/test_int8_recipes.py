"""benchmarks/int8_recipes.py: the layer selection quantizes exactly the layers named, and the whole study runs at a
tiny size. (Its SmoothQuant is the library's, tested in test_int8_recipe_export.py.)"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import benchmark_script, shared_file

TINY = "depth=4,embed_dim=32,num_heads=2,img_size=56"


@pytest.fixture(scope="module")
def recipes_module():
    return benchmark_script("int8_recipes.py")


def tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=10, depth=2, embed_dim=32,
                              num_heads=2, img_size=28).eval()
    # LayerNorm affine, biases and LayerScale (DINOv2 starts it at 1e-5) away from 1 / 0, so that a wrong fold shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm1.bias", "norm2.bias", "qkv.bias",
                                   "ls1.gamma", "ls2.gamma")):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def test_layer_selection(recipes_module):
    model = tiny_classifier()
    quantized = recipes_module.quantize(model, only="fc2")
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    kinds = {name: isinstance(m, dynamic) for name, m in quantized.named_modules() if name in
             recipes_module.linear_names(model)}
    assert kinds == {name: name.endswith("fc2") for name in recipes_module.linear_names(model)}
    quantized = recipes_module.quantize(model, ("fc2", "head"))
    kinds = {name: isinstance(m, dynamic) for name, m in quantized.named_modules() if name in
             recipes_module.linear_names(model)}
    assert kinds == {name: not name.endswith(("fc2", "head")) for name in recipes_module.linear_names(model)}


@pytest.mark.skipif(shared_file("data", "cifar10", "test") is None, reason="no shared CIFAR-10 images here")
def test_the_study_at_a_tiny_size(recipes_module, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert recipes_module.main(["--model-kwargs", TINY, "--images", "4", "--calibration", "4", "--threads", "1",
                                "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    names = [r["recipe"] for r in result["recipes"]]
    assert "per-tensor" in names and "SmoothQuant 0.7, per-channel" in names and "only fc2" in names
    assert result["best_recipe"] in names and not result["best_recipe"].startswith("only ")
    assert result["images"] == 4
    for row in result["recipes"]:
        assert 0 <= row["top1"] <= 100 and 0 <= row["agreement_with_float32"] <= 100
        assert -1.0 <= row["cosine_with_float32"] <= 1.0 + 1e-6
    assert result["methods"], result["failed"]
    for entry in result["methods"]:
        assert entry["float32"]["agreement_with_float32"] == 100.0
        assert {"per-tensor", result["best_recipe"]} <= set(entry)
    assert "| recipe |" in capsys.readouterr().out
    assert recipes_module.main(["--out", str(out), "--table"]) == 0
