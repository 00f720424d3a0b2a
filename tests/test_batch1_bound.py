"""benchmarks/batch1_bound.py at a tiny size: each method beside its same-token-counts bound, eager or with every
model compiled, and the settings it refuses."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import benchmark_script

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = ["--model-kwargs", "depth=2,embed_dim=48,num_heads=2", "--rounds", "2", "--warmup", "1", "--threads", "1"]


def test_compile_compiles_every_model_and_names_the_mode(tmp_path, monkeypatch):
    script = benchmark_script("batch1_bound.py")
    compiled = []

    def spy(module, mode=None):  # records what would be compiled; runs eager (test_compile.py compiles for real)
        compiled.append((type(module).__name__, mode))
        return module

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(script, "RESULTS", tmp_path)
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, limit)  # not monkeypatched: torch's config aliases the two names
    limits = []
    timed = script.compare_speed

    def compare_speed(*args, **kwargs):
        limits.append(getattr(config, limit))
        return timed(*args, **kwargs)

    monkeypatch.setattr(script, "compare_speed", compare_speed)
    script.main([*TINY, "--settings", "tome r=13", "--compile", "reduce-overhead"])
    # While timing, room for every model's compilation of the shared forward code (past the limit dynamo would run
    # the rest eagerly); the value it had again afterwards.
    assert limits == [max(before, 3 * 8)] and getattr(config, limit) == before
    out = tmp_path / "batch1_bound_compiled.json"  # compiled runs default to their own file
    # The unreduced model, ToMe and its bound: all three compiled, in that mode.
    assert len(compiled) == 3 and {mode for _, mode in compiled} == {"reduce-overhead"}
    result = json.loads(out.read_text())
    assert result["compiled"] == result["environment"]["compile"] == "reduce-overhead"
    assert result["protocol"].endswith("torch.compile mode "
                                                                                  "'reduce-overhead'")
    assert [row["setting"] for row in result["rows"]] == ["tome r=13"]
    row = result["rows"][0]
    assert row["of_bound"] == pytest.approx(row["speedup"] / row["bound_speedup"])
    assert len(row["runs"]) == 1 and row["runs"][0]["of_bound_paired"] > 0


def test_eager_by_default_and_default_outputs(tmp_path, monkeypatch):
    script = benchmark_script("batch1_bound.py")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled without --compile"))
    monkeypatch.setattr(script, "RESULTS", tmp_path)
    script.main([*TINY, "--settings", "gtp r=8"])
    out = tmp_path / "batch1_bound.json"
    result = json.loads(out.read_text())
    assert result["compiled"] is None and result["environment"]["compile"] is False
    assert result["protocol"].endswith(", eager")
    assert [row["setting"] for row in result["rows"]] == ["gtp r=8"]


def test_unknown_setting_is_refused(capsys):
    script = benchmark_script("batch1_bound.py")
    with pytest.raises(SystemExit):
        script.main(["--settings", "tome r=13,tome r=99"])
    assert "unknown --settings ['tome r=99']; valid: tome r=13, topk keep=0.7 @3,6,9" in capsys.readouterr().err
