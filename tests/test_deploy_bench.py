"""benchmarks/deploy.py at a tiny size: the classifier's architecture (tiny, random weights), every runtime, float32
and int8, one method, two images, one round; the JSON's structure and its numbers in range, and the table. DeiT-S
runs the same code (only its builder differs, checked apart)."""

from __future__ import annotations

import json
import math
import os
from importlib.util import find_spec

import pytest
from conftest import benchmark_script, shared_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [
    pytest.mark.skipif(any(find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime", "openvino")),
                       reason="needs the [export] and [openvino] extras"),
    pytest.mark.skipif(shared_file("data", "cifar10", "test") is None, reason="no shared CIFAR-10 images here"),
]
TINY = ["--models", "classifier", "--methods", "tome",
        "--classifier-kwargs", "depth=4,embed_dim=32,num_heads=2,img_size=56",
        "--images", "2", "--rounds", "1", "--warmup", "1", "--batch-sizes", "1,2", "--min-time", "0",
        "--calibration", "4", "--check-images", "2", "--threads", "1"]


def deploy_script():
    return benchmark_script("deploy.py")


def test_deploy_benchmark_at_a_tiny_size(tmp_path, capsys):
    deploy = deploy_script()
    out = tmp_path / "deploy.json"
    assert deploy.main(TINY + ["--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    result = json.loads(out.read_text())
    assert result["size"]["images"] == 2 and result["size"]["rounds"] == 1
    assert set(result["models"]) == {"classifier"}
    for info in result["models"].values():
        assert set(info["settings"]) == {"unreduced", "tome"}, info["schedule_failed"]
        assert 0.5 < info["settings"]["tome"]["gmacs_share"] < 0.8  # about 65% of the unreduced GMACs
        assert info["int8_eager_failed"] == {}
        for meta in info["exports"].values():  # ONNX Runtime's dynamic graph, OpenVINO's static one, both "smooth"
            assert {meta[f"int8-{mode}"]["recipe"] for mode in ("dynamic", "static")} == {"smooth"}
    keys = {(r["model"], r["runtime"], r["precision"], r["setting"]) for r in result["fidelity"]}
    assert keys == {(m, rt, p, s) for m in ("classifier",) for rt in ("eager", "onnxruntime", "openvino")
                    for p in ("float32", "int8") for s in ("unreduced", "tome")}
    for row in result["fidelity"]:
        limit = 1e-4 if row["precision"] == "float32" else 10.0
        assert 0 <= row["max_abs_diff"] <= limit and -1 <= row["cosine"] <= 1 + 1e-6, row
    assert len(result["speed"]) == 2 * len(keys)  # two batch sizes
    for row in result["speed"]:
        for field in ("images_per_s", "speedup_vs_float32_unreduced", "speedup_vs_same_precision_unreduced",
                      "share_of_ceiling"):
            assert math.isfinite(row[field]) and 0 < row[field] < 1e6, (field, row)
        if row["setting"] == "unreduced":
            assert row["speedup_vs_same_precision_unreduced"] == 1.0
    # Accuracy only for the classifier: every runtime x precision x setting, agreement in [0, 100].
    assert {r["model"] for r in result["accuracy"]} == {"classifier"} and len(result["accuracy"]) == 12
    for row in result["accuracy"]:
        assert row["images"] == 2 and 0 <= row["top1"] <= 100 and 0 <= row["agreement"] <= 100
    base = next(r for r in result["accuracy"] if (r["runtime"], r["precision"], r["setting"]) ==
                ("eager", "float32", "unreduced"))
    assert base["agreement"] == 100.0
    assert len(result["int8_delta"]) == 6 and all(math.isfinite(r["delta"]) for r in result["int8_delta"])
    assert "openvino_float32_within_1e-4" in result["targets"]
    written = out.read_text().replace(str(tmp_path), "")
    assert str(shared_file("data")) not in written  # shared data named portably (../shared/...), no machine path
    capsys.readouterr()
    assert deploy.main(["--table", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| model | runtime | setting |") and len(lines) == 2 + 3 * 2


def test_deit_builder_and_the_balanced_image_order():
    deploy = deploy_script()
    model, description, has_accuracy = deploy.build_model("deit_s", {"depth": 1, "embed_dim": 32, "num_heads": 2})
    assert not has_accuracy and "random weights" in description and len(model.blocks) == 1
    images, labels, folder = deploy.cifar_images("test", 12, (32, 32))
    assert images.shape == (12, 3, 32, 32) and labels.tolist() == list(range(10)) + [0, 1]
    assert folder.endswith("data/cifar10/test") and not folder.startswith("/")
