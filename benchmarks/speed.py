"""Speed of every method against the unreduced model on DeiT-S, CPU, with the protocol of measurement.md.

    python benchmarks/speed.py                      # batch 1 and 32, writes benchmarks/results/speed.json
    python benchmarks/speed.py --batch-sizes 1,8,32,64 --rounds 11

All variants are timed interleaved in one process on the same input; the result is the median images/s of
each and its ratio to the unreduced model, beside the GMACs ratio (the ceiling). Random weights: speed does
not depend on the weights, except where a method's choice does (PPT's per-image policy); PPT's two branches
both run for every image, so its cost is the same either way.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import timm
import torch

import tokenreduce as tr
from tokenreduce.measure.speed import environment, method_speedups

SETTINGS = {
    "unreduced": None,
    "tome r=13": ("tome", {"r": 13}),
    "topk keep=0.7 @3,6,9": ("topk", {"keep_rate": 0.7, "layers": (3, 6, 9)}),
    "evit keep=0.7 @3,6,9": ("evit", {"keep_rate": 0.7, "layers": (3, 6, 9)}),
    "gtp P=8": ("gtp", {"r": 8}),
    "ppt r=50 @3,6,9": ("ppt", {"r": 50, "layers": (3, 6, 9)}),
}


def gtp_breakdown(model: torch.nn.Module, batch_size: int = 32, rounds: int = 3) -> dict:
    """Share of a GTP forward pass spent building the graph, scoring the tokens, and in the whole reduce step
    (scores + propagation + gathers), timed by wrapping those functions of one patched copy."""
    from tokenreduce.methods import gtp

    patched = tr.patch(copy.deepcopy(model), "gtp", r=8)
    method = tr.method_of(patched)
    spent: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - start
            return out
        return wrapper

    original_scores = gtp.selection_scores
    method.begin = timed("graph", method.begin)
    method.reduce = timed("reduce", method.reduce)
    gtp.selection_scores = timed("selection", original_scores)
    images = torch.randn(batch_size, 3, 224, 224)
    shares = defaultdict(list)
    try:
        with torch.inference_mode():
            patched(images)  # warm-up
            for _ in range(rounds):
                spent.clear()
                start = time.perf_counter()
                patched(images)
                total = time.perf_counter() - start
                for name in ("graph", "selection", "reduce"):
                    shares[name].append(spent[name] / total)
    finally:
        gtp.selection_scores = original_scores
    return {"batch_size": batch_size, "rounds": rounds,
            "share_of_forward": {name: statistics.median(v) for name, v in shares.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    args = parser.parse_args()

    settings = {k: v for k, v in SETTINGS.items() if v is None or v[0] in tr.methods()}
    model = timm.create_model(args.model, pretrained=False).eval()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = method_speedups(model, settings, batch_sizes, rounds=args.rounds, warmup=args.warmup)
    print(f"{'setting':<24} {'batch':>5} {'img/s':>8} {'speed-up':>9} {'GMACs':>6} {'ceiling':>8}")
    for row in rows:
        print(f"{row['label']:<24} {row['batch_size']:>5} {row['images_per_s']:>8.1f} {row['speedup']:>8.2f}x "
              f"{row['gmacs']:>6.2f} {row['gmacs_ratio']:>7.2f}x")
    result = {"model": args.model, "protocol": "interleaved rounds, median images/s, inference_mode",
              "rounds": args.rounds, "warmup": args.warmup, "environment": environment(), "rows": rows}
    if "gtp" in tr.methods():
        result["gtp_breakdown"] = gtp_breakdown(model)
        print("GTP P=8, batch 32, share of the forward pass: " + ", ".join(
            f"{k} {v:.1%}" for k, v in result["gtp_breakdown"]["share_of_forward"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
