"""Analytic GMACs of every method against the reference values of the specs (measurement.md, gtp.md, ppt.md,
stvit.md), on weight-less (meta) models, so it runs in seconds.

    python benchmarks/flops_table.py     # writes benchmarks/results/flops.json and prints a markdown table
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch

import tokenreduce as tr
import tokenreduce.stvit
from tokenreduce.core.cost import FlopsReport

# (model, method, options, published GMACs, source)
CASES = [
    ("deit_tiny_patch16_224", None, {}, 1.26, "measurement.md"),
    ("deit_small_patch16_224", None, {}, 4.60, "measurement.md"),
    ("deit_base_patch16_224", None, {}, 17.56, "measurement.md"),
    ("deit_small_patch16_224", "tome", {"r": 8}, 3.4, "baselines.md"),
    ("deit_small_patch16_224", "tome", {"r": 13}, 2.70, "measurement.md"),
    ("deit_small_patch16_224", "tome", {"r": 16}, 2.3, "baselines.md"),
    ("deit_small_patch16_224", "evit", {"keep_rate": 0.7}, 3.0, "baselines.md"),
    ("deit_small_patch16_224", "topk", {"keep_rate": 0.7}, None, ""),
    ("deit_small_patch16_224", "ppt", {"r": 20, "layers": (3, 6, 9)}, 3.92, "ppt.md"),
    ("deit_small_patch16_224", "ppt", {"r": 50, "layers": (3, 6, 9)}, 2.94, "measurement.md"),
    ("deit_small_patch16_224", "ppt", {"r": 80, "layers": (3, 6, 9)}, 2.46, "ppt.md"),
    ("deit_small_patch16_224", "ppt", {"r": 100, "layers": (3, 6, 9)}, 2.28, "ppt.md"),
    ("deit_small_patch16_224", "gtp", {"r": 4, "graph": "spatial"}, 4.023, "gtp.md"),
    ("deit_small_patch16_224", "gtp", {"r": 8, "graph": "spatial"}, 3.440, "gtp.md"),
    ("deit_small_patch16_224", "gtp", {"r": 8}, 3.455, "gtp.md (mixed: +0.015)"),
    ("deit_small_patch16_224", "gtp", {"r": 16, "graph": "spatial"}, 2.307, "gtp.md"),
    ("deit_base_patch16_224", "gtp", {"r": 8, "graph": "spatial"}, 13.135, "gtp.md"),
    ("deit_small_patch16_224", "stvit", {}, 1.91, "stvit.md"),
    ("deit_small_patch16_224", "stvit", {"generation_layers": 3}, 1.97, "stvit.md"),
    ("deit_small_patch16_224", "stvit", {"full_blocks": 3}, 1.56, "stvit.md"),
    ("swin_tiny_patch4_window7_224", "stvit", {"tokens_per_window": 9}, None, "stvit.md: -24%"),
    ("swin_small_patch4_window7_224", "stvit", {"tokens_per_window": 9}, None, "stvit.md: -25%"),
    ("swin_small_patch4_window7_224", "stvit", {"recover": True}, 5.8, "stvit.md (STViT-R: 5.8 vs 8.8, -33%)"),
    ("swin_base_patch4_window7_224", "stvit", {"tokens_per_window": 9}, None, "stvit.md: -25%"),
]


def cost(model_name: str, method: str | None, options: dict) -> FlopsReport:
    if method == "stvit" and model_name.startswith("deit"):  # the ViT build copies weights: real (random) ones
        return tr.flops(tr.stvit.build(timm.create_model(model_name, pretrained=False), **options))
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    if method == "stvit":  # the Swin and STViT-R builds work on weight-less models
        return tr.flops(tr.stvit.build(model, **options))
    if method is not None:
        tr.patch(model, method, **options)
    return tr.flops(model)


def main() -> None:
    rows = []
    for model_name, method, options, published, source in CASES:
        if method not in (None, "stvit") and method not in tr.methods():
            continue
        report = cost(model_name, method, options)
        baseline = report.baseline_gmacs
        rows.append({"model": model_name, "method": method or "unreduced", "options": options,
                     "baseline_gmacs": round(baseline, 4), "saving": round(1 - report.total_gmacs / baseline, 4),
                     "gmacs": round(report.gmacs, 4), "overhead_gmacs": round(report.overhead_gmacs, 4),
                     "total_gmacs": round(report.total_gmacs, 4), "published": published, "source": source})
    out = Path(__file__).parent / "results" / "flops.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"unit": "GMACs per image at 224", "rows": rows}, indent=2) + "\n")
    print("| model | method | options | GMACs | + overhead | unreduced | saving | published |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        opts = ", ".join(f"{k}={v}" for k, v in row["options"].items())
        pub = "" if row["published"] is None else f"{row['published']}"
        print(f"| {row['model'].replace('_patch16_224', '')} | {row['method']} | {opts} | {row['gmacs']:.3f} | "
              f"{row['overhead_gmacs']:.4f} | {row['baseline_gmacs']:.3f} | {row['saving']:.1%} | "
              f"{pub} {row['source']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
