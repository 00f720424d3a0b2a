"""tokenreduce.train and the ``tokenreduce train`` command on a tiny model and a tiny generated ImageFolder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tokenreduce as tr
from tokenreduce.cli import main as cli_main
from tokenreduce.stvit import build
from tokenreduce.train import TrainConfig, freeze_first_blocks, load_weights, train

MODEL_ARGS = {"depth": 3, "embed_dim": 24, "num_heads": 2, "img_size": 32, "patch_size": 8, "num_classes": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """16 PNGs of 2 classes (reddish / bluish noise), 32 x 32."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for label, name in enumerate(("red", "blue")):
        (root / name).mkdir()
        for i in range(8):
            pixels = rng.integers(0, 120, (32, 32, 3))
            pixels[..., 2 * label] += 135  # channel 0 bright for class 0, channel 2 for class 1
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def tiny_model(stvit: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **MODEL_ARGS)
    return build(model, num_semantic=4, full_blocks=1, generation_layers=2) if stvit else model


def config(folder: Path, out: Path, **kwargs) -> TrainConfig:
    options = {"epochs": 3, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0.5, "transform": "resize32",
               "progress": False, "num_workers": 0}
    options.update(kwargs)
    return TrainConfig(data=str(folder), out=str(out), **options)


def test_short_run_lowers_the_loss_and_keeps_frozen_blocks(folder, tmp_path):
    model = tiny_model(stvit=True)
    frozen_before = model.vit.blocks[0].attn.qkv.weight.clone()
    new_before = model.generation[0].attn.q.weight.clone()
    result = train(model, config(folder, tmp_path, epochs=8, batch_size=4, freeze_blocks=1, val_data=str(folder)))
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0]
    assert result["steps"] == 8 * 4 and result["images_seen"] == 8 * 16
    assert result["val"]["images"] == 16 and result["val"]["top1"] >= 75.0
    assert torch.equal(model.vit.blocks[0].attn.qkv.weight, frozen_before)
    assert not torch.equal(model.generation[0].attn.q.weight, new_before)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 32 and saved["config"]["freeze_blocks"] == 1


def test_killed_run_resumes_to_the_same_weights(folder, tmp_path):
    """An uninterrupted run vs a run stopped in its second epoch and resumed from its epoch-1 checkpoint."""
    options = {"epochs": 3, "hflip": 0.5, "ema_decay": 0.9, "label_smoothing": 0.1, "mixup": 0.4}
    full = tiny_model()
    train(full, config(folder, tmp_path / "full", **options))
    killed = tiny_model()
    result = train(killed, config(folder, tmp_path / "killed", max_steps=3, **options))  # 2 steps per epoch
    assert result["stopped_early"] and result["epochs_completed"] == 1
    checkpoint = torch.load(tmp_path / "killed" / "last.pth", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["step"] == 2
    assert not any(p.name.startswith(".") for p in (tmp_path / "killed").iterdir())  # no temp file left
    resumed = tiny_model()
    train(resumed, config(folder, tmp_path / "killed", resume=str(tmp_path / "killed" / "last.pth"), **options))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    final_full = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    final_resumed = torch.load(tmp_path / "killed" / "last.pth", weights_only=True)
    assert final_resumed["step"] == final_full["step"] == 6
    for name, value in final_full["ema"].items():
        assert torch.allclose(value, final_resumed["ema"][name], atol=1e-6), name


def _cli_args(folder: Path, out: Path, batch_size: int) -> list[str]:
    args = ["train", "--model", "deit_tiny_patch16_224", "--data", str(folder), "--out", str(out),
            "--epochs", "2", "--batch-size", str(batch_size), "--lr", "1e-3", "--warmup-epochs", "0.5",
            "--transform", "resize32", "--hflip", "0", "--workers", "0", "--no-progress", "--threads", "1"]
    for key, value in MODEL_ARGS.items():
        if key != "num_classes":
            args += ["--model-arg", f"{key}={value}"]
    return args


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tokenreduce.cli", *_cli_args(folder, tmp_path / "ddp", 4)],
                   check=True, env=env, capture_output=True, timeout=300)
    assert cli_main(_cli_args(folder, tmp_path / "one", 8)) == 0
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert ddp["world_size"] == 2 and ddp["global_batch"] == one["global_batch"] == 8
    assert ddp["steps"] == one["steps"] == 4
    a = torch.load(tmp_path / "ddp" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "last.pth", weights_only=True)["model"]
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert not torch.equal(a["head.weight"], tiny_model().head.weight)  # training did move the weights


def test_corrupt_or_mismatched_checkpoints_give_clear_errors(folder, tmp_path, capsys):
    model = tiny_model()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read checkpoint .*bad.pth"):
        load_weights(model, bad)
    other = tmp_path / "other.pth"
    torch.save(build(tiny_model(), num_semantic=4, full_blocks=1).state_dict(), other)
    with pytest.raises(ValueError, match="missing keys: .*blocks.*unexpected keys: .*generation"):
        load_weights(model, other)
    with pytest.raises(ValueError, match="cannot resume from .*bad.pth"):
        train(model, config(folder, tmp_path / "r", resume=str(bad)))
    assert cli_main(_cli_args(folder, tmp_path / "c", 8) + ["--checkpoint", str(bad)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert cli_main(_cli_args(folder, tmp_path / "c", 8) + ["--checkpoint", str(other)]) == 2
    assert "missing keys" in capsys.readouterr().err


def test_cli_builds_stvit_and_loads_weights(folder, tmp_path):
    from tokenreduce.cli import build_parser
    from tokenreduce.commands.train import build_model

    weights = tmp_path / "host.pth"
    torch.save(tiny_model().state_dict(), weights)
    args = build_parser().parse_args(_cli_args(folder, tmp_path / "s", 8) + [
        "--stvit", "--num-semantic", "4", "--full-blocks", "1", "--checkpoint", str(weights)])
    model = build_model(args)
    assert isinstance(model, tr.stvit.STViT) and model.num_semantic == 4
    assert torch.equal(model.vit.blocks[0].attn.qkv.weight, tiny_model().blocks[0].attn.qkv.weight)
    assert model.vit.head.out_features == 2  # classes counted from the folder


def test_freeze_first_blocks_rejects_bad_counts():
    model = tiny_model()
    with pytest.raises(ValueError, match="freeze_blocks=4"):
        freeze_first_blocks(model, 4)
    names = freeze_first_blocks(model, 2)
    assert "blocks.1.mlp.fc2.weight" in names and "pos_embed" in names and "blocks.2.mlp.fc2.weight" not in names
    assert not model.blocks[1].attn.qkv.weight.requires_grad and model.blocks[2].attn.qkv.weight.requires_grad


def test_train_takes_the_model_and_method_flags_of_the_other_commands(tmp_path):
    import tokenreduce as tr
    from tokenreduce.cli import build_parser
    from tokenreduce.commands.train import build_model

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = build_parser().parse_args([
        "train", "--model", "deit_tiny_patch16_224", "--model-kwargs", "depth=2,img_size=64",
        "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--method", "tome", "--opt", "r=3"])
    model = build_model(args)
    assert len(model.blocks) == 2 and model.num_classes == 2
    assert tr.describe(model)["schedule"] == [3, 3]


def test_resume_refuses_a_checkpoint_that_needs_arbitrary_code(folder, tmp_path):
    """--resume reads with weights_only=True: a checkpoint that pickles code (here a model object) is refused."""
    bad = tmp_path / "bad.pth"
    torch.save({"model": tiny_model(), "optimizer": {}, "scheduler": {}, "epoch": 0, "step": 0}, bad)
    with pytest.raises(ValueError, match="cannot resume from .*bad.pth"):
        train(tiny_model(), config(folder, tmp_path / "out", resume=str(bad)))
