"""The one place that finds the shared data and models (``tokenreduce.measure.data.data_root``), and the
``--data-root`` flag of the commands that read data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenreduce.cli import main
from tokenreduce.core.errors import InputError
from tokenreduce.measure.data import (
    DATA_ROOT_ENV,
    DataRootNotFound,
    data_root,
    portable_path,
    repo_root,
    resolve_data_path,
    shared_path,
)

ENV = "TOKENREDUCE_DATA_ROOT"


@pytest.fixture
def fake_checkout(tmp_path: Path) -> Path:
    """tmp/repo (a tokenreduce checkout, with another project's pyproject.toml inside it) and tmp/shared."""
    repo = tmp_path / "repo"
    (repo / "src" / "tokenreduce").mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[project]\nname = "tokenreduce"\nversion = "0"\n')
    (repo / "src" / "tokenreduce" / "module.py").write_text("")
    (repo / "vendor" / "other").mkdir(parents=True)
    (repo / "vendor" / "other" / "pyproject.toml").write_text('[project]\nname = "other"\n')
    (tmp_path / "shared" / "models").mkdir(parents=True)
    (tmp_path / "shared" / "models" / "m.safetensors").write_bytes(b"x")
    return repo


def test_the_variable_name_and_the_error_kind():
    assert DATA_ROOT_ENV == ENV
    assert issubclass(DataRootNotFound, InputError)  # the command line reports it in one line, exit 2


def test_default_is_shared_beside_the_repository_root(fake_checkout, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    start = fake_checkout / "src" / "tokenreduce" / "module.py"
    assert repo_root(start) == fake_checkout.resolve()
    assert repo_root(fake_checkout / "vendor" / "other") == fake_checkout.resolve()  # not another project's
    assert data_root(start=start) == fake_checkout.resolve().parent / "shared"
    # This checkout: its own repository root (tests/ is in it).
    assert repo_root() == Path(__file__).resolve().parents[1]


def test_variable_wins_over_the_default_and_the_flag_over_both(fake_checkout, tmp_path, monkeypatch):
    start = fake_checkout / "src" / "tokenreduce" / "module.py"
    elsewhere, flag = tmp_path / "elsewhere", tmp_path / "flag"
    elsewhere.mkdir()
    flag.mkdir()
    monkeypatch.setenv(ENV, str(elsewhere))
    assert data_root(start=start) == elsewhere
    assert data_root(str(flag), start=start) == flag
    monkeypatch.setenv(ENV, "")  # empty: as if unset
    assert data_root(start=start) == fake_checkout.resolve().parent / "shared"


def test_clear_errors_name_the_variable(fake_checkout, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    outside = tmp_path / "site-packages" / "tokenreduce"
    outside.mkdir(parents=True)
    with pytest.raises(DataRootNotFound, match=f"not inside its repository.*set {ENV}.*--data-root"):
        data_root(start=outside)
    with pytest.raises(DataRootNotFound, match=f"not inside its repository.*set {ENV}"):
        data_root(start=outside, check=False)  # no default to give without a repository
    monkeypatch.setenv(ENV, str(tmp_path / "missing"))
    with pytest.raises(DataRootNotFound, match=f"missing' of {ENV}=.* does not exist; set {ENV}"):
        data_root()
    assert data_root(check=False) == tmp_path / "missing"  # a script's default, checked where it is used
    with pytest.raises(DataRootNotFound, match=r"of --data-root .* does not exist"):
        data_root(tmp_path / "no-flag-folder")
    monkeypatch.delenv(ENV)
    (tmp_path / "shared").rename(tmp_path / "moved")
    with pytest.raises(DataRootNotFound, match=f"shared' of the default .* does not exist; set {ENV}"):
        data_root(start=fake_checkout)


def test_shared_path(fake_checkout, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "shared"))
    assert shared_path("models", "m.safetensors") == tmp_path / "shared" / "models" / "m.safetensors"
    with pytest.raises(DataRootNotFound, match=f"models/absent.safetensors.*does not exist.*set {ENV}"):
        shared_path("models", "absent.safetensors")


def test_resolve_data_path_looks_in_the_data_root_only_for_relative_paths_not_found_here(
        fake_checkout, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "shared"))
    monkeypatch.chdir(fake_checkout)
    found = tmp_path / "shared" / "models" / "m.safetensors"
    assert resolve_data_path("models/m.safetensors") == str(found)
    assert resolve_data_path("models/absent") == "models/absent"  # the command's own error follows
    assert resolve_data_path(None) is None
    assert resolve_data_path(str(tmp_path / "abs")) == str(tmp_path / "abs")
    (fake_checkout / "models").mkdir()
    (fake_checkout / "models" / "m.safetensors").write_bytes(b"here")
    assert resolve_data_path("models/m.safetensors") == "models/m.safetensors"  # the current folder first
    assert resolve_data_path("x", tmp_path / "shared") == "x"
    with pytest.raises(DataRootNotFound, match="--data-root"):
        resolve_data_path("x", tmp_path / "no-such-root")


def test_portable_path_names_no_absolute_path_of_the_machine(fake_checkout, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    shared = data_root()  # this checkout's default (need not exist: check=False inside)
    assert portable_path(shared / "models" / "x.safetensors") == "../shared/models/x.safetensors"
    assert portable_path(tmp_path / "other") == str(tmp_path / "other")
    monkeypatch.setenv(ENV, str(tmp_path / "shared"))
    assert portable_path(tmp_path / "shared" / "data" / "a") == f"${ENV}/data/a"


@pytest.fixture
def tiny_data_root(tmp_path: Path) -> Path:
    """A data root with data/tiny (2 classes x 2 images) and models/tiny.pth (a tiny DeiT's weights)."""
    import timm

    root = tmp_path / "root"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / "data" / "tiny" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "data" / "tiny" / name /
                                                                                     f"{i}.png")
    (root / "models").mkdir()
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=32, num_heads=2,
                              img_size=32, num_classes=2)
    torch.save(model.state_dict(), root / "models" / "tiny.pth")
    return root


TINY = ["--model", "deit_tiny_patch16_224",
        "--model-kwargs", "depth=1,embed_dim=32,num_heads=2,img_size=32,num_classes=2"]


def test_eval_finds_relative_data_and_checkpoint_in_the_data_root(tiny_data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # data/tiny and models/tiny.pth are not here
    monkeypatch.delenv(ENV, raising=False)
    out = tmp_path / "eval.json"
    assert main(["eval", *TINY, "--data", "data/tiny", "--checkpoint", "models/tiny.pth", "--method", "tome",
                 "--r", "2", "--no-progress", "--data-root", str(tiny_data_root), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"] == str(tiny_data_root / "data" / "tiny") and result["images"] == 4
    assert result["checkpoint"] == str(tiny_data_root / "models" / "tiny.pth")
    monkeypatch.setenv(ENV, str(tiny_data_root))  # the variable instead of the flag
    assert main(["eval", *TINY, "--data", "data/tiny", "--method", "tome", "--r", "2", "--no-progress"]) == 0
    assert "images 4 (labelled 4)" in capsys.readouterr().out


def test_a_missing_data_root_is_one_line_exit_2(tmp_path, capsys):
    assert main(["eval", *TINY, "--data", "data/tiny", "--method", "tome", "--data-root",
                 str(tmp_path / "nowhere")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert main(["bench", *TINY, "--method", "tome", "--r", "1", "--data-root", str(tmp_path / "nowhere")]) == 2
    assert f"set {ENV}" in capsys.readouterr().err


def test_train_takes_the_data_root(tiny_data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "deit_tiny_patch16_224", "--model-kwargs",
                 "depth=1,embed_dim=32,num_heads=2,img_size=32", "--data", "data/tiny", "--checkpoint",
                 "models/tiny.pth", "--data-root", str(tiny_data_root), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--batch-size", "2", "--transform", "resize32", "--workers", "0",
                 "--no-progress"]) == 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["data"] == str(tiny_data_root / "data" / "tiny") and saved["train_images"] == 4
