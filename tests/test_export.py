"""ONNX export (``tr.export_onnx``, ``tokenreduce export``): every method and STViT exported on a small model,
run in onnxruntime against PyTorch at another batch size than the export's; fixed sizes refused by onnxruntime;
the missing extra; bad input writes nothing."""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import timm
import torch
from conftest import REDUCING, images, make_model

import tokenreduce as tr
from tokenreduce.cli import main

needs_export = pytest.mark.skipif(any(find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
                                  reason="the [export] extra is not installed")
ATOL = 1e-4
CASE = "deit_small_patch16_224"  # 6 x 6 patches + CLS, width 48 (conftest), 3 blocks: each block costs export time
DEPTH = 3
TINY_CLI = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "depth=2,embed_dim=32,num_heads=2,img_size=32",
            "--check-count", "3"]


def run_onnx(path, batch: torch.Tensor) -> np.ndarray:
    return tr.export.onnx_session(path, threads=1).run(None, {"images": batch.numpy()})[0]


def assert_matches(model, path, batch: torch.Tensor) -> None:
    with torch.inference_mode():
        expected = model(batch).numpy()
    got = run_onnx(path, batch)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def stvit_swin() -> torch.nn.Module:
    torch.manual_seed(0)
    host = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, depths=(1, 1, 4, 1),
                             num_heads=(1, 1, 2, 2), num_classes=5, img_size=112).eval()
    return tr.stvit.build(host).eval()


@needs_export
@pytest.mark.parametrize("method", ["none", *REDUCING, "gtp_sparse", "stvit", "stvit_swin"])
def test_export_equals_pytorch_at_another_batch_size(method, tmp_path):
    model = make_model(CASE, depth=DEPTH)
    if method in REDUCING:
        tr.patch(model, method, **REDUCING[method])
    elif method == "gtp_sparse":  # kthvalue, translated by tokenreduce.export
        tr.patch(model, "gtp", r=4, sparsity=0.9)
    elif method == "stvit":
        model = tr.stvit.build(model, num_semantic=4, full_blocks=1).eval()
    elif method == "stvit_swin":
        model = stvit_swin()
    model.train()  # exported in eval mode; the modes come back
    size = tr.export.default_img_size(model)
    check = images(model, batch=4, size=size)
    result = tr.export_onnx(model, tmp_path / "m.onnx", images=check)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert result.batch_size is None and result.checked_batches == (4, 1) and result.max_abs_diff <= ATOL
    assert result.img_size == size and result.opset == tr.export.DEFAULT_OPSET and result.output_names == ("output",)
    # Exported at batch 2; run at 3 (another batch, other images) and compare with PyTorch.
    other = images(model, batch=3, seed=1, size=size)
    assert_matches(model, result.path, other)
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    with pytest.raises(InvalidArgument, match=rf"index: 3 Got: {size[1] + 16} Expected: {size[1]}"):
        run_onnx(result.path, images(model, batch=1, size=(size[0], size[1] + 16)))  # the image size is fixed
    if method == "ppt":  # the per-image policy: the check images mix pruning and pooling at a reducing block
        shares = tr.diagnostics(model, check)["pooled_share"].values()
        assert any(0 < share < 1 for share in shares)
    if method in REDUCING:  # the graph really reduces: fewer MACs than the unreduced model
        assert tr.flops(model).gmacs < tr.flops(make_model(CASE, depth=DEPTH)).gmacs


class Sorts(torch.nn.Module):
    """The ops tokenreduce.export translates itself: stable sorts both ways (on ties), kthvalue."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = images.flatten(1).round()  # many ties
        ascending = scores.argsort(dim=-1, stable=True)
        descending = scores.argsort(dim=-1, descending=True, stable=True)
        kth = scores.kthvalue(5, dim=-1, keepdim=True).values.expand(-1, scores.shape[1])
        return torch.cat([ascending.float(), descending.float(), kth], dim=1)


@needs_export
def test_translated_sorts_are_stable_like_torch(tmp_path):
    model = Sorts()
    batch = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    result = tr.export_onnx(model, tmp_path / "sorts.onnx", img_size=4, images=batch)
    assert result.max_abs_diff == 0.0  # the same indices on ties, in both directions


@needs_export
def test_fixed_batch_and_image_size_are_refused_by_onnxruntime(tmp_path):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    model = tr.patch(make_model(CASE, depth=DEPTH), "tome", r=4)
    result = tr.export_onnx(model, tmp_path / "fixed.onnx", batch_size=2, images=images(model, batch=2))
    assert result.batch_size == 2 and result.checked_batches == (2,)
    assert_matches(model, result.path, images(model, batch=2, seed=3))
    with pytest.raises(InvalidArgument, match=r"index: 0 Got: 3 Expected: 2"):
        run_onnx(result.path, images(model, batch=3))
    with pytest.raises(InvalidArgument, match=r"index: 2 Got: 64 Expected: 96"):
        run_onnx(result.path, images(model, batch=2, size=(64, 64)))


@needs_export
def test_a_failed_check_writes_nothing_and_keeps_an_earlier_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"earlier")
    # A stand-in exporter (the real one is tested above): the check alone decides.
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, f, **kwargs: open(f, "wb").write(b"new"))
    monkeypatch.setattr(tr.export, "_compare", lambda *args: 0.5)
    with pytest.raises(RuntimeError, match=r"differs from PyTorch by 0.5 \(> atol 0.0001\) on the check images; "
                                           r"nothing written"):
        tr.export_onnx(tr.patch(make_model(CASE, depth=DEPTH), "topk", **REDUCING["topk"]), path)
    assert path.read_bytes() == b"earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_gtp_random_selection_is_refused(tmp_path):
    model = tr.patch(make_model(CASE, depth=DEPTH), "gtp", r=4, selection="random")
    with pytest.raises(tr.InputError, match="selection='random' cannot be exported"):
        tr.export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(img_size=0), "img_size must be a positive int"),
    (dict(img_size=(96, 96, 3)), "img_size must be a positive int"),
    (dict(batch_size=0), "batch_size must be None"),
    (dict(opset=11), "opset must be an integer >= 17"),
    (dict(images=torch.zeros(2, 3, 64, 64)), r"images are \(64, 64\) but the graph is exported at img_size \(96, 96\)"),
    (dict(batch_size=3, images=torch.zeros(2, 3, 96, 96)), "fixed batch_size=3"),
    (dict(img_size=64), r"does not run at img_size \(64, 64\)"),
])
@needs_export
def test_bad_arguments_write_nothing(kwargs, message, tmp_path):
    with pytest.raises(tr.InputError, match=message):
        tr.export_onnx(tr.patch(make_model(CASE, depth=DEPTH), "tome", r=4), tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_extra_names_the_extra(missing, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    with pytest.raises(tr.MissingExtraError, match=r"pip install \"tokenreduce\[export\]\""):
        tr.export_onnx(make_model(CASE, depth=DEPTH), tmp_path / "m.onnx")
    assert main(["export", *TINY_CLI, "--method", "tome", "--r", "2", "--out", str(tmp_path / "m.onnx")]) == 2
    assert f"{missing} is not installed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@needs_export
def test_cli_exports_and_checks(tmp_path, capsys):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):  # --check-count 3 takes the first three (sorted)
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{i}.png")
    out, report = tmp_path / "tome.onnx", tmp_path / "export.json"
    argv = ["export", *TINY_CLI, "--method", "tome", "--r", "2", "--out", str(out), "--json", str(report),
            "--images", str(photos)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: tome(r=2) at 32x32, batch dynamic, opset 18" in printed
    assert f"onnxruntime vs PyTorch on 3 images of {photos} (batches [3, 1])" in printed
    data = json.loads(report.read_text())
    assert data["method"] == "tome" and data["batch_size"] is None and data["max_abs_diff"] <= ATOL
    assert data["checked_batches"] == [3, 1] and data["img_size"] == [32, 32]
    torch.manual_seed(0)
    model = tr.patch(timm.create_model("deit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2, img_size=32),
                     "tome", r=2).eval()
    assert_matches(model, out, torch.randn(5, 3, 32, 32))


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "nope"], "unknown method 'nope'; known methods: evit, gtp, ppt, tome, topk"),
    (["--method", "tome", "--r", "2", "--batch-size", "0"], "--batch-size must be positive"),
    (["--method", "stvit"], "--method stvit and --stvit-checkpoint PATH go together"),
    (["--method", "tome", "--r", "2", "--images", "{tmp}/none"], "does not exist"),
])
@needs_export
def test_cli_bad_input_exits_2_and_writes_nothing(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["export", *TINY_CLI, *argv, "--out", str(tmp_path / "m.onnx")]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
