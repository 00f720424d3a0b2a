"""The command line on models of the other families: ``--model hf:PATH`` (a tiny ``ViTForImageClassification``
saved with ``save_pretrained``, its ``preprocessor_config.json`` beside it) and ``--model open_clip:NAME`` (a tiny
open_clip model config, ``--checkpoint`` with its weights) through ``flops``, ``bench``, ``eval`` and ``viz``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenreduce as tr
from tokenreduce.adapters import num_classes, predictor
from tokenreduce.cli import main

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
needs_open_clip = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip not installed")

OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 48, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


def _hf_adapter_ready() -> bool:
    """Whether the Hugging Face adapter (tokenreduce.adapters.hf, written separately) runs a ViT classifier."""
    try:
        from transformers import ViTConfig, ViTForImageClassification

        model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3))
        tr.patch(model.eval(), "tome", r=1)
        with torch.no_grad():
            model(pixel_values=torch.zeros(1, 3, 32, 32))
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
                       intermediate_size=96, num_labels=3)
    path = tmp_path_factory.mktemp("hf") / "vit"
    ViTForImageClassification(config).eval().save_pretrained(path)
    ViTImageProcessor(size={"height": 64, "width": 64}, resample=2, image_mean=[0.5, 0.4, 0.3],
                      image_std=[0.2, 0.25, 0.3]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def open_clip_spec(tmp_path_factory) -> tuple[str, Path]:
    """(``open_clip:<config json>``, a checkpoint of the whole CLIP model built from it with a fixed seed)."""
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("open_clip")
    config = root / "tiny-clip.json"
    config.write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-clip", pretrained=None)
    with torch.no_grad():
        model.visual.class_embedding.normal_(0, 0.5)
        model.visual.positional_embedding.normal_(0, 0.5)
    checkpoint = root / "tiny-clip.pth"
    torch.save(model.state_dict(), checkpoint)
    return f"open_clip:{config}", checkpoint


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images") / "data"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (70, 80, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def run_json(tmp_path: Path, argv: list[str]) -> dict:
    out = tmp_path / "out.json"
    assert main(argv + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


# --- open_clip: -------------------------------------------------------------------------------------------
@needs_open_clip
def test_open_clip_model_is_the_image_tower_with_its_weights_and_preprocessing(open_clip_spec):
    import open_clip

    spec, checkpoint = open_clip_spec
    model, prep = tr.load(spec, checkpoint=str(checkpoint))  # what the commands call
    assert type(model) is open_clip.transformer.VisionTransformer and not model.training
    reference = open_clip.create_model("tiny-clip", pretrained=None)
    reference.load_state_dict(torch.load(checkpoint))
    x = torch.randn(2, 3, 64, 64)
    predict = predictor(model)
    with torch.no_grad():
        assert torch.equal(predict(model, x), reference.eval().encode_image(x))
    cfg = prep.data_config()
    assert cfg["input_size"] == (3, 64, 64) and cfg["interpolation"] == "bicubic" and cfg["crop_mode"] == "center"
    assert cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and cfg["crop_pct"] == 1.0
    assert len(tr.flops(model).blocks) == 4 and num_classes(model) == 0
    # the tower's own state dict loads too
    tower = checkpoint.parent / "tower.pth"
    torch.save(reference.visual.state_dict(), tower)
    with torch.no_grad():
        assert torch.equal(predict(tr.load(spec, checkpoint=str(tower)).model, x), predict(model, x))
    tr.patch(model, "tome", r=4)  # the family's own model: no wrapper
    assert tr.describe(model)["tokens_out"] == [61, 57, 53, 49]
    assert type(model).__name__ == "TokenReducedVisionTransformer"


@needs_open_clip
def test_open_clip_flops_count_and_bench(tmp_path, open_clip_spec):
    spec, checkpoint = open_clip_spec
    data = run_json(tmp_path, ["flops", "--model", spec, "--checkpoint", str(checkpoint), "--method", "tome",
                               "--r", "4", "--count"])
    assert data["tokens_out"] == [61, 57, 53, 49] and data["unreduced"]["tokens_out"] == [65] * 4
    assert data["counted_gmacs"] == pytest.approx(data["total_gmacs"], rel=0.01)
    bench = run_json(tmp_path, ["bench", "--model", spec, "--method", "topk", "--keep-rate", "0.5", "--layers", "1",
                                "--batch-sizes", "2", "--rounds", "1", "--warmup", "0", "--no-memory"])
    assert [(r["img_size"], r["batch_size"]) for r in bench["rows"]] == [(64, 2)]
    assert bench["rows"][0]["gmacs"] < bench["rows"][0]["baseline_gmacs"]


@needs_open_clip
def test_open_clip_viz_and_eval_refusal(tmp_path, open_clip_spec, image_folder, capsys):
    spec, checkpoint = open_clip_spec
    photo = next(image_folder.rglob("*.png"))
    out = tmp_path / "viz.png"
    data = run_json(tmp_path, ["viz", "--model", spec, "--checkpoint", str(checkpoint), "--method", "tome", "--r",
                               "4", "--image", str(photo), "--out", str(out), "--blocks", "1,3"])
    assert out.is_file() and data["blocks"] == [1, 3]
    # An image tower has no classes: eval (top-1, agreement and KL of class predictions) refuses it.
    assert main(["eval", "--model", spec, "--data", str(image_folder), "--method", "tome", "--r", "4",
                 "--no-progress"]) == 2
    assert "no classifier head" in capsys.readouterr().err


@needs_open_clip
def test_open_clip_bad_specs_exit_2(tmp_path, capsys):
    assert main(["flops", "--model", "open_clip:no-such-config", "--method", "none"]) == 2
    assert "unknown open_clip model config" in capsys.readouterr().err
    assert main(["flops", "--model", f"open_clip:{tmp_path / 'missing.json'}", "--method", "none"]) == 2
    assert "no such model config file" in capsys.readouterr().err


# --- hf: --------------------------------------------------------------------------------------------------
@needs_hf
def test_hf_model_and_preprocessing_from_the_directory(hf_dir):
    from transformers import ViTForImageClassification

    model, prep = tr.load(f"hf:{hf_dir}")  # what the commands call
    assert type(model) is ViTForImageClassification and num_classes(model) == 3 and not model.training
    cfg = prep.data_config()
    assert cfg["input_size"] == (3, 64, 64) and cfg["crop_mode"] == "squash" and cfg["interpolation"] == "bilinear"
    assert cfg["mean"] == pytest.approx((0.5, 0.4, 0.3)) and cfg["std"] == pytest.approx((0.2, 0.25, 0.3))
    x = torch.randn(2, 3, 64, 64)
    reference = ViTForImageClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        assert torch.equal(predictor(model)(model, x), reference(pixel_values=x).logits)
    assert len(tr.flops(model).blocks) == 4


@needs_hf
def test_hf_shortest_edge_and_centre_crop_map_to_timm_crop_pct(tmp_path):
    from transformers import ViTConfig

    from tokenreduce.adapters.hf import preprocessing

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 256},
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "resample": 3,
        "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    prep = preprocessing(tmp_path, ViTConfig())
    assert prep.input_size == (3, 224, 224) and prep.crop_mode == "center"
    assert prep.crop_pct == pytest.approx(224 / 256) and prep.interpolation == "bicubic"
    assert prep.mean == pytest.approx((0.1, 0.2, 0.3)) and prep.std == pytest.approx((0.4, 0.5, 0.6))
    assert preprocessing(tmp_path / "none", ViTConfig(image_size=96)).input_size == (3, 96, 96)


def _hf_method() -> list[str]:
    return ["--method", "tome", "--r", "4"] if _hf_adapter_ready() else ["--method", "none"]


@needs_hf
def test_hf_flops_bench_eval_viz(tmp_path, hf_dir, image_folder, capsys):
    method = _hf_method()
    spec = ["--model", f"hf:{hf_dir}"]
    flops = run_json(tmp_path, ["flops", *spec, *method])
    reduced = method[1] != "none"
    assert flops["unreduced"]["tokens_out"] == [65] * 4
    assert flops["tokens_out"] == ([61, 57, 53, 49] if reduced else [65] * 4)
    bench = run_json(tmp_path, ["bench", *spec, *method, "--batch-sizes", "2", "--rounds", "1", "--warmup", "0",
                                "--no-memory"])
    assert bench["rows"][0]["img_size"] == 64
    evaluated = run_json(tmp_path, ["eval", *spec, *method, "--data", str(image_folder), "--no-progress"])
    assert evaluated["images"] == 6 and evaluated["labelled"] == 6
    assert evaluated["preprocessing"]["mean"] == pytest.approx([0.5, 0.4, 0.3])
    if not reduced:
        assert evaluated["agreement"] == 100.0
    out = tmp_path / "viz.png"
    photo = next(image_folder.rglob("*.png"))
    run_json(tmp_path, ["viz", *spec, *method, "--image", str(photo), "--out", str(out), "--blocks", "0,3"])
    assert out.is_file()


@needs_hf
def test_hf_bad_directory_and_image_size_exit_2(tmp_path, hf_dir, capsys):
    assert main(["flops", "--model", f"hf:{tmp_path / 'nothing'}", "--method", "none"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["eval", "--model", f"hf:{hf_dir}", "--data", str(tmp_path), "--img-size", "96",
                 "--method", "none"]) == 2


def test_train_refuses_an_open_clip_tower_clearly(tmp_path, capsys):
    (tmp_path / "data" / "a").mkdir(parents=True)
    argv = ["train", "--model", "open_clip:ViT-B-16", "--data", str(tmp_path / "data"), "--out",
            str(tmp_path / "out"), "--epochs", "1"]
    assert main(argv) == 2
    assert "has no classifier to train" in capsys.readouterr().err


def test_train_fine_tunes_a_patched_hf_classifier(tmp_path, hf_dir, image_folder, capsys):
    if not _hf_adapter_ready():
        pytest.skip("the Hugging Face adapter is not available")
    out = tmp_path / "run"
    argv = ["train", "--model", f"hf:{hf_dir}", "--data", str(image_folder), "--out", str(out), "--epochs", "1",
            "--batch-size", "3", "--workers", "0", "--no-progress", "--threads", "1", "--method", "tome",
            "--opt", "r=2"]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["steps"] == 2 and result["images_seen"] == 6
    assert main([*argv[:-4], "--freeze-blocks", "2"]) == 2
    assert "--freeze-blocks reads a timm model's layout" in capsys.readouterr().err
