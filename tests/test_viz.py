"""Token pictures: the kinds read from ``owner`` and the PNG the ``viz`` command writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokenreduce.cli import main
from tokenreduce.measure.viz import GROUPED, KEPT, PRUNED, patch_kinds, render_tokens

TINY = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "depth=4,embed_dim=32,num_heads=2,img_size=64"]


def test_patch_kinds_from_owner():
    # Patches 1 and 2 share token 5, patch 3 was dropped, patches 0 and 4 are alone in their tokens.
    info = patch_kinds(torch.tensor([1, 5, 5, -1, 2]))
    assert info["kind"].tolist() == [KEPT, GROUPED, GROUPED, PRUNED, KEPT]
    assert info["group"].tolist() == [-1, 0, 0, -1, -1]
    assert info["size"].tolist() == [1, 2, 2, 0, 1]


def test_render_colours_groups_and_darkens_pruned():
    image = np.full((4, 4, 3), 0.5)
    owner = torch.tensor([1, 2, 2, -1])  # a 2x2 grid of 2x2-pixel patches
    picture, counts = render_tokens(image, owner, (2, 2))
    assert counts == {"tokens": 2, "kept": 1, "groups": 1, "grouped_patches": 2, "pruned": 1}
    assert np.allclose(picture[0, 0], 0.5)  # kept patch, away from outlines: the image itself
    assert picture[3, 3].max() < 0.2  # pruned patch: darkened
    assert not np.allclose(picture[0, 2], 0.5)  # grouped patch: tinted


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("method", [["tome", "--r", "3"], ["topk", "--keep-rate", "0.5", "--layers", "1"]])
def test_viz_writes_picture(tmp_path, photo, method):
    out, meta = tmp_path / "viz.png", tmp_path / "viz.json"
    argv = ["viz", *TINY, "--method", *method, "--image", str(photo), "--out", str(out), "--blocks", "1,3",
            "--json", str(meta)]
    assert main(argv) == 0
    with Image.open(out) as picture:
        # 3 panels (input + 2 blocks) of 3.2 inches at 110 dpi, 4.1 inches high.
        assert picture.size == (round(3 * 3.2 * 110), round(4.1 * 110))
        assert len(np.unique(np.asarray(picture.convert("RGB")).reshape(-1, 3), axis=0)) > 100
    data = json.loads(meta.read_text())
    # 64 / 16 = 16 patches: image tokens after block 1 and 3 match the method's schedule.
    tokens = {b: c["tokens"] for b, c in data["counts"].items()}
    assert tokens == ({"1": 10, "3": 4} if method[0] == "tome" else {"1": 8, "3": 8})
    if method[0] == "topk":
        assert data["counts"]["1"]["pruned"] == 8


def test_viz_errors_exit_2(tmp_path, photo, capsys):
    argv = ["viz", *TINY, "--method", "tome", "--r", "2", "--image", str(photo), "--out", str(tmp_path / "x.png")]
    assert main([*argv, "--blocks", "7"]) == 2
    assert "block 7 is outside" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert main([*argv[:-4], "--image", str(tmp_path / "bad.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(tmp_path, photo, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the 'viz' extra were not installed
    argv = ["viz", *TINY, "--method", "tome", "--r", "2", "--image", str(photo), "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    assert 'matplotlib is not installed; it comes with the \'viz\' extra: pip install "tokenreduce[viz]"' in \
        capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_bug_is_not_reported_as_bad_input(tmp_path, photo, monkeypatch):
    """Only tokenreduce's own errors (and bad paths) become exit 2; anything else keeps its traceback."""
    from tokenreduce.measure import viz

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(viz, "draw_token_panels", broken)
    argv = ["viz", *TINY, "--method", "tome", "--r", "2", "--image", str(photo), "--out", str(tmp_path / "x.png")]
    with pytest.raises(ValueError, match="an internal bug"):
        main(argv)
