"""Serving paths: int8 ONNX (``tr.export_onnx(int8=...)``), OpenVINO IR (``tr.export_openvino``, from ONNX and
straight from PyTorch), ``torch.export`` and AOTInductor, for every method on a small model; refusals and the
missing extra."""

from __future__ import annotations

import contextlib
import json
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from conftest import REDUCING, make_model

import tokenreduce as tr
from tokenreduce.cli import main
from tokenreduce.export_openvino import openvino_model

needs_export = pytest.mark.skipif(any(find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
                                  reason="the [export] extra is not installed")
needs_openvino = pytest.mark.skipif(find_spec("openvino") is None, reason="the [openvino] extra is not installed")
CASE = "deit_small_patch16_224"  # 6 x 6 patches + CLS, width 48 (conftest)
DEPTH = 3
TINY_CLI = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "depth=2,embed_dim=32,num_heads=2,img_size=32",
            "--check-count", "3"]


def patched(method: str) -> torch.nn.Module:
    model = make_model(CASE, depth=DEPTH)
    return model if method == "none" else tr.patch(model, method, **REDUCING[method])


def check_images(count: int = 6) -> torch.Tensor:
    return torch.randn(count, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def reference(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(images).numpy()


@needs_export
@pytest.mark.parametrize(("method", "mode"), [("none", "dynamic"), ("tome", "static"), ("topk", "dynamic"),
                                           ("evit", "static"), ("gtp", "dynamic"), ("ppt", "static")])
def test_int8_onnx_stays_close_to_the_float_model(method, mode, tmp_path):
    model, images = patched(method), check_images()
    result = tr.export_onnx(model, tmp_path / "m.onnx", images=images, int8=mode)
    assert result.int8 == mode and result.max_abs_diff <= 1e-4  # the float graph is checked first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    graph_ops = {node.op_type for node in __import__("onnx").load(tmp_path / "m.onnx").graph.node}
    assert ("MatMulInteger" if mode == "dynamic" else "QuantizeLinear") in graph_ops
    got = tr.export.onnx_session(tmp_path / "m.onnx", threads=1).run(None, {"images": images.numpy()})[0]
    expected = reference(model, images)
    cosine = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert result.cosine == pytest.approx(float(cosine.mean()), abs=1e-6) and result.cosine >= 0.99
    assert 0 < np.abs(got - expected).max() < 0.5 * np.abs(expected).max()  # int8 is not float32, yet close
    assert result.agreement == float((got.argmax(-1) == expected.argmax(-1)).mean())


@needs_export
def test_int8_below_min_cosine_writes_nothing_and_keeps_an_earlier_file(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_text("earlier")
    message = r"int8 graph's outputs have mean cosine [01]\.\d{4} against .*\(< min_cosine 1; top-1"
    with pytest.raises(RuntimeError, match=message):
        tr.export_onnx(patched("tome"), target, images=check_images(), int8="dynamic", min_cosine=1.0)
    assert target.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@needs_export
@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(int8="int4"), "unknown int8 mode 'int4'; valid: dynamic, static"),
    (dict(int8="dynamic", check=False), "an int8 export is always checked"),
    (dict(int8="static", calibration=torch.zeros(2, 3, 32, 32)), r"images are \(32, 32\) but the graph"),
    (dict(int8="dynamic", min_cosine=2), "min_cosine must be a number in"),
])
def test_bad_int8_arguments_write_nothing(kwargs, message, tmp_path):
    with pytest.raises(tr.InputError, match=message):
        tr.export_onnx(patched("tome"), tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


@needs_openvino
@pytest.mark.parametrize("method", ["none", *REDUCING, "gtp_sparse", "gtp_semantic"])
def test_openvino_direct_conversion_equals_pytorch_at_another_batch_size(method, tmp_path):
    if method.startswith("gtp_"):
        model = tr.patch(make_model(CASE, depth=DEPTH), "gtp", r=4,
                         **(dict(sparsity=0.9) if method == "gtp_sparse" else dict(graph="semantic")))
    else:
        model = patched(method)
    result = tr.export_openvino(model, tmp_path / "m.xml", source="torch", images=check_images(4))
    assert result.source == "torch" and result.checked_batches == (4, 1) and result.max_abs_diff <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
    batch = check_images(7)  # neither checked batch size: the batch axis is dynamic
    got = openvino_model(tmp_path / "m.xml", threads=1)(batch.numpy())[0]
    np.testing.assert_allclose(got, reference(model, batch), rtol=0, atol=1e-4)


@needs_openvino
@needs_export
@pytest.mark.parametrize(("method", "int8"), [("gtp", None), ("ppt", "static")])
def test_openvino_from_onnx_float_and_int8(method, int8, tmp_path):
    model, images = patched(method), check_images()
    result = tr.export_openvino(model, tmp_path / "m.xml", images=images, int8=int8)
    assert result.source == "onnx" and sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
    got = openvino_model(tmp_path / "m.xml", threads=1)(images.numpy())[0]
    if int8 is None:
        assert result.max_abs_diff <= 1e-4 and result.cosine is None
        np.testing.assert_allclose(got, reference(model, images), rtol=0, atol=1e-4)
    else:
        assert result.max_abs_diff is None and result.cosine >= 0.99
        assert 0 < np.abs(got - reference(model, images)).max() < 0.5


@needs_openvino
@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(source="tflite"), "unknown source 'tflite'; valid: onnx, torch"),
    (dict(source="torch", int8="dynamic"), "int8 goes through the ONNX graph"),
    (dict(int8="fp8"), "unknown int8 mode 'fp8'"),
    (dict(path="m.onnx"), r"an OpenVINO IR is written as a \.xml file"),
    (dict(batch_size=0), "batch_size must be None"),
])
def test_bad_openvino_arguments_write_nothing(kwargs, message, tmp_path):
    path = tmp_path / kwargs.pop("path", "m.xml")
    with pytest.raises(tr.InputError, match=message):
        tr.export_openvino(patched("tome"), path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_missing_openvino_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(tr.MissingExtraError, match=r"pip install \"tokenreduce\[openvino\]\""):
        tr.export_openvino(patched("tome"), tmp_path / "m.xml")
    assert main(["export", *TINY_CLI, "--method", "tome", "--r", "2", "--format", "openvino",
                 "--out", str(tmp_path / "m.xml")]) == 2
    assert "openvino is not installed; it comes with the 'openvino' extra" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@needs_openvino
@needs_export
def test_cli_openvino_int8(tmp_path, capsys):
    out, report = tmp_path / "ppt.xml", tmp_path / "export.json"
    argv = ["export", *TINY_CLI, "--method", "ppt", "--r", "2", "--layers", "1", "--format", "openvino",
            "--int8", "static", "--out", str(out), "--json", str(report)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    described = "ppt(r=2, layers=(1,)) at 32x32, batch dynamic"
    assert f"wrote {out} (OpenVINO IR, int8 static smooth, from onnx): {described}" in printed
    assert "int8 vs float PyTorch on random images: mean output cosine 0.99" in printed
    data = json.loads(report.read_text())
    assert data["format"] == "openvino" and data["int8"] == "static" and data["cosine"] >= 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json", "ppt.bin", "ppt.xml"]


@needs_export
def test_cli_int8_flag_alone_is_dynamic(tmp_path, capsys):
    out = tmp_path / "tome.onnx"
    assert main(["export", *TINY_CLI, "--method", "tome", "--r", "2", "--int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (ONNX, int8 dynamic smooth): tome(r=2) at 32x32, batch dynamic, opset 18" in printed


@pytest.mark.parametrize(("argv", "message"), [
    (["--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
    (["--int8", "int4"], "argument --int8: invalid choice: 'int4'"),
    (["--calibration", "{tmp}/none"], "--calibration goes with --int8 static"),
    (["--int8", "static", "--calibration", "{tmp}/none"], "does not exist"),
    (["--int8", "--no-check"], "an int8 export is always checked"),
    (["--source", "torch"], "--source goes with --format openvino"),
])
def test_cli_bad_serving_flags_exit_2_and_write_nothing(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) if "invalid choice" in message else contextlib.nullcontext():
        code = main(["export", *TINY_CLI, "--method", "tome", "--r", "2", *argv, "--out", str(tmp_path / "m.x")])
        assert code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["none", *REDUCING])
def test_torch_export_with_a_dynamic_batch_equals_eager(method):
    model = patched(method)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (check_images(3),), dynamic_shapes=({0: batch},))
    for count in (3, 1, 5):
        images = check_images(count)
        with torch.inference_mode():
            assert torch.equal(program.module()(images), model(images))


def test_aot_inductor_package_equals_eager(tmp_path):
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    model = patched("gtp")
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (check_images(3),), dynamic_shapes=({0: batch},))
    package = aoti_compile_and_package(program, package_path=str(tmp_path / "gtp.pt2"))
    runner = aoti_load_package(package)
    for count in (3, 1):
        images = check_images(count)
        with torch.inference_mode():
            torch.testing.assert_close(runner(images), model(images), rtol=0, atol=1e-5)


@needs_openvino
@pytest.mark.parametrize(("case", "method"), [(CASE, "gtp"), ("vit_base_patch16_gap_224", "topk")])
def test_openvino_direct_conversion_of_a_chunked_map_keeps_the_batch_axis(case, method, tmp_path, monkeypatch):
    """A map over the chunk budget is made a few images at a time in eager code (GTP's statistics; the mean row of a
    model without CLS); traced for OpenVINO it is one chunk, so the graph does not unroll the example's batch. GTP's
    spatial graph starts from a cold cache (a fresh process): the trace and its check trace must not differ."""
    from tokenreduce.core import attention

    monkeypatch.setattr(attention, "MAP_CHUNK_ELEMENTS", 2 * 37 * 37)  # less than one image's map in eager
    monkeypatch.setattr(sys.modules["tokenreduce.methods.gtp"], "_SPATIAL_CACHE", {})
    model = tr.patch(make_model(case, depth=DEPTH), method, **REDUCING[method])
    tr.export_openvino(model, tmp_path / "m.xml", source="torch", images=check_images(4))
    batch = check_images(7)
    got = openvino_model(tmp_path / "m.xml", threads=1)(batch.numpy())[0]
    np.testing.assert_allclose(got, reference(model, batch), rtol=0, atol=1e-4)
