"""benchmarks/dense.py's tables, from rows alone (the runs need the shared photos and take an hour)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import benchmark_script


def row(name: str, method: str, level: str, restore: str | None, gmacs: float, restore_gmacs: float,
        iou: float, default: bool = True) -> dict:
    return {"name": name, "method": method, "level": level, "restore": restore, "default_rule": default,
            "options": {}, "gmacs": gmacs, "restore_gmacs": restore_gmacs, "gmacs_ratio": gmacs / 6.0,
            "map_iou_0.5": iou, "map_mae": 0.05, "cosine_mean": 0.9, "cosine_median": 0.95, "cosine_p10": 0.8}


ROWS = [row("unreduced", "unreduced", "100%", None, 6.0, 0.0, 1.0),
        row("topk @ 65% (reconstruct)", "topk", "65%", "reconstruct", 3.9, 0.06, 0.84, default=False),
        row("topk @ 65% (ridge)", "topk", "65%", "ridge", 3.9, 0.3, 0.86)]


def test_the_table_gives_the_dense_output_cost_with_the_restore_rule():
    dense = benchmark_script("dense.py")
    lines = dense.markdown_table(ROWS).splitlines()
    assert "with restore (ratio)" in lines[0]
    assert "| 3.96 (0.66) |" in lines[3] and "| 4.20 (0.70) |" in lines[4]  # (3.9 + restore) / 6.0
    assert "| ridge (default) |" in lines[4] and "| reconstruct |" in lines[3]
    rules = dense.rule_table(ROWS).splitlines()
    assert rules[-2:] == ["| reconstruct | 0.840 / 0.900 |", "| ridge | 0.860 / 0.900 |"]


def test_the_table_stage_rewrites_table_md_from_dense_json(tmp_path, monkeypatch):
    dense = benchmark_script("dense.py")
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))  # main() imports stvitr_distil
    (tmp_path / "dense.json").write_text(json.dumps({"rows": ROWS}))
    assert dense.main(["table", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.md").read_text() == dense.markdown_table(ROWS) + "\n\n" + dense.rule_table(ROWS) + "\n"
    with pytest.raises(SystemExit, match="no .*dense.json: run eval first"):
        dense.main(["table", "--out", str(tmp_path / "empty")])
