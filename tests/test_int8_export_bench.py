"""benchmarks/int8_export.py at a tiny size (the classifier's architecture, random weights): every graph comes from
``tr.export_onnx``, the JSON holds top-1, agreement and paired speed-ups per recipe, and the table prints."""

from __future__ import annotations

import json
import os
from importlib.util import find_spec

import pytest
from conftest import benchmark_script, shared_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [
    pytest.mark.skipif(any(find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
                       reason="needs the [export] extra"),
    pytest.mark.skipif(shared_file("data", "cifar10", "test") is None, reason="no shared CIFAR-10 images here"),
]


def test_int8_export_benchmark_at_a_tiny_size(tmp_path, capsys):
    script = benchmark_script("int8_export.py")
    out = tmp_path / "e.json"
    assert script.main(["--model-kwargs", "depth=4,embed_dim=32,num_heads=2,img_size=56", "--methods", "tome",
                        "--recipes", "smooth,per-tensor", "--images", "4", "--calibration", "4", "--rounds", "1",
                        "--warmup", "0", "--min-time", "0", "--batch-sizes", "1,2", "--threads", "1",
                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["setting"] for row in result["rows"]] == ["unreduced", "tome"], result["failed"]
    assert result["images"] == 4 and result["mode"] == "dynamic" and result["recipes"] == ["smooth", "per-tensor"]
    for row in result["rows"]:
        assert row["float32"]["agreement_with_float32"] == 100.0
        assert row["float32"]["max_abs_diff_float_graph"] <= 1e-4
        for recipe in ("smooth", "per-tensor"):
            assert row[recipe]["top1_delta"] == pytest.approx(row[recipe]["top1"] - row["float32"]["top1"])
            assert 0 <= row[recipe]["agreement_with_float32"] <= 100 and row[recipe]["check_cosine"] >= 0.9
            # The paired counts make the change: (fixed - broken) images of 4, in points.
            change = row[recipe]["fixed"] - row[recipe]["broken"]
            assert row[recipe]["top1_delta"] == pytest.approx(100 * change / 4)
            assert 0 < row[recipe]["mcnemar_p"] <= 1
        assert set(row["speed"]) == {"1", "2"}
        for timings in row["speed"].values():
            assert set(timings) == {"float32", "smooth", "per-tensor"}
            assert all(t["images_per_s"] > 0 and t["speedup_vs_float32_unreduced"] > 0 for t in timings.values())
    unreduced = result["rows"][0]["speed"]["1"]
    assert unreduced["float32"]["speedup_vs_float32_unreduced"] == 1.0  # the base against itself, round by round
    assert unreduced["smooth"]["speedup_vs_same_precision_unreduced"] == 1.0
    printed = capsys.readouterr().out
    assert "| tome |" in printed and f"wrote {out}" in printed
    assert script.main(["--out", str(out), "--table"]) == 0 and "| unreduced | 100% |" in capsys.readouterr().out


def test_heldout_split_reads_training_images_the_export_does_not(tmp_path, monkeypatch, capsys):
    """--split heldout evaluates CIFAR-10 training images after the calibration and check images; with no batch
    sizes nothing is timed and the table has no speed columns."""
    script = benchmark_script("int8_export.py")
    asked = []
    real = script.cifar_images

    def spy(split, count, size, skip=0, per_class_limit=None):
        asked.append((split, count, skip))
        return real(split, count, size, skip=skip, per_class_limit=per_class_limit)

    monkeypatch.setattr(script, "cifar_images", spy)
    out = tmp_path / "h.json"
    assert script.main(["--model-kwargs", "depth=2,embed_dim=32,num_heads=2,img_size=28", "--methods", "topk",
                        "--recipes", "smooth", "--images", "5", "--calibration", "3", "--split", "heldout",
                        "--batch-sizes", "", "--out", str(out)]) == 0
    # evaluated: 5 images after the 3 calibration and 8 check images; then the calibration and check images.
    assert asked == [("train", 5, 3 + script.CHECK_IMAGES), ("train", 3, 0), ("train", script.CHECK_IMAGES, 3)]
    result = json.loads(out.read_text())
    assert result["split"] == "heldout" and result["images"] == 5 and result["image_folder"].endswith("train")
    assert all(row["speed"] == {} for row in result["rows"])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| setting | GMACs | float32 top-1 | smooth: top-1 (change, McNemar p; agreement) |"
    assert table[1] == "|---|---:|---:|---:|" and table[2].startswith("| unreduced | 100% |")
    assert script.HELDOUT_OUT.name == "int8_export_heldout.json"


def _run(split, images, counts):
    """A stand-in result JSON: per setting (fixed, broken) of the smooth recipe."""
    return {"split": split, "images": images, "recipes": ["smooth"],
            "rows": [{"setting": setting, "smooth": {"fixed": fixed, "broken": broken,
                                                      "top1_delta": 100 * (fixed - broken) / images}}
                     for setting, (fixed, broken) in counts.items()]}


def test_pooled_adds_up_the_fixed_and_broken_images_of_each_run(tmp_path, capsys):
    script = benchmark_script("int8_export.py")
    frontier = _run("frontier", 100, {"unreduced": (3, 5), "tome": (9, 1)})
    heldout = _run("heldout", 300, {"unreduced": (4, 4), "tome": (0, 6), "ppt": (1, 1)})
    summed = script.pooled([frontier, heldout])
    assert list(summed) == ["unreduced", "tome"]  # a setting missing from a run is left out
    tome = summed["tome"]["smooth"]
    assert (tome["images"], tome["fixed"], tome["broken"]) == (400, 9, 7)
    assert tome["top1_delta"] == pytest.approx(0.5) and tome["top1_delta_se"] == pytest.approx(1.0)
    assert tome["mcnemar_p"] == pytest.approx(benchmark_script("paired.py").mcnemar_p(9, 7))
    assert summed["unreduced"]["smooth"]["top1_delta"] == pytest.approx(-0.5)
    paths = []
    for name, result in (("f.json", frontier), ("h.json", heldout)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(result))
    assert script.main(["--pooled", *map(str, paths)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == ("| setting | smooth: change per run | smooth: frontier (100) + heldout (300): change "
                        "(fixed / broken, p) |")
    assert table[3] == "| tome | +8.00 / -2.00 | +0.50 (9 / 7, p 0.80) |"
    with pytest.raises(SystemExit, match="needs runs on different images"):
        script.pooled([frontier, frontier])


def test_unknown_recipe_or_method_is_refused(capsys):
    script = benchmark_script("int8_export.py")
    with pytest.raises(SystemExit):
        script.main(["--recipes", "int4"])
    assert "unknown --recipes ['int4']; valid: smooth, per-channel, per-tensor" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--methods", "tome,stvit"])
    assert "unknown --methods ['stvit']" in capsys.readouterr().err


def test_mcnemar_and_paired_change():
    script = benchmark_script("paired.py")
    assert script.mcnemar_p(0, 0) == 1.0 and script.mcnemar_p(5, 5) == 1.0
    assert script.mcnemar_p(0, 6) == pytest.approx(2 / 64)  # both tails of 6 coin flips all alike
    assert script.mcnemar_p(1, 6) == script.mcnemar_p(6, 1) == pytest.approx(2 * 8 / 128)
    np = pytest.importorskip("numpy")
    labels = np.array([0, 0, 0, 0, 1])
    change = script.paired_change(np.array([0, 1, 1, 0, 2]), np.array([0, 0, 1, 1, 3]), labels)
    assert (change["fixed"], change["broken"]) == (1, 1)  # image 1 fixed, image 3 broken; image 4 wrong in both
    assert change["top1_delta_se"] == pytest.approx(100 * 2 ** 0.5 / 5)


def test_paired_counts_compare_each_int8_graph_with_its_float32_graph(tmp_path, monkeypatch):
    """The counts come from the int8 graph's predictions against the float32 graph's: an int8 runner that moves every
    prediction to the next class must show up as a changed prediction for every image, fixed or broken or neither."""
    script = benchmark_script("int8_export.py")
    real_runner, seen = script.ort_runner, []

    def runner(path, threads):
        run = real_runner(path, threads)
        if "float32" in path.name:
            return run
        return lambda batch: np.roll(run(batch), 1, axis=1)  # argmax + 1 (mod classes) for every image

    def spy(reference, predicted, labels):
        seen.append((reference.copy(), predicted.copy(), labels.copy()))
        return paired_change(reference, predicted, labels)

    np = pytest.importorskip("numpy")
    paired_change = benchmark_script("paired.py").paired_change
    monkeypatch.setattr(script, "ort_runner", runner)
    monkeypatch.setattr(script, "paired_change", spy)
    out = tmp_path / "e.json"
    assert script.main(["--model-kwargs", "depth=4,embed_dim=32,num_heads=2,img_size=56", "--methods", "tome",
                        "--recipes", "smooth", "--images", "4", "--calibration", "4", "--rounds", "1",
                        "--warmup", "0", "--min-time", "0", "--batch-sizes", "1", "--threads", "1",
                        "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(seen) == len(rows) == 2
    for (reference, predicted, labels), row in zip(seen, rows, strict=True):
        assert (predicted != reference).all() and row["smooth"]["agreement_with_float32"] == 0.0
        right, right_int8 = reference == labels, predicted == labels
        assert row["smooth"]["fixed"] == int((right_int8 & ~right).sum())
        assert row["smooth"]["broken"] == int((right & ~right_int8).sum())
