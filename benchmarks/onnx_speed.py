"""Speed in ONNX Runtime: every method at the README's settings, exported with ``tr.export_onnx``, against the
exported unreduced model, on DeiT-S (random weights: speed does not depend on them), CPU execution provider.

    python benchmarks/onnx_speed.py                 # batch 1 and 32 -> benchmarks/results/onnx_speed.json
    python benchmarks/onnx_speed.py --table         # the README's markdown table from the JSON (no run)
    python benchmarks/onnx_speed.py --model-kwargs depth=4,embed_dim=64,num_heads=2,img_size=64 \\
        --rounds 2 --out /tmp/onnx_speed.json       # a quick check that it runs

Protocol (measurement.md): every graph is exported with a dynamic batch axis and checked against PyTorch in
ONNX Runtime (largest difference recorded); inputs are made beforehand; per batch size, a warm-up, then rounds
in which every session runs once each (several calls per timing at small batches, so that one timing lasts about
``--min-time`` seconds), interleaved, the order rotated every round; the result is each session's median images/s
and its ratio to the unreduced graph's, beside the GMACs ratio (the ceiling) and the share of it reached.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

import tokenreduce as tr
from tokenreduce.export import DEFAULT_OPSET, export_onnx, onnx_session

sys.path.insert(0, str(Path(__file__).parent))
from speed import SETTINGS  # noqa: E402  (the README's settings, shared with benchmarks/speed.py)

DEFAULT_OUT = Path(__file__).parent / "results" / "onnx_speed.json"


def parse_kwargs(text: str | None) -> dict:
    import ast

    pairs = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        pairs[key.strip()] = ast.literal_eval(value.strip())
    return pairs


def time_sessions(sessions: dict, batch: np.ndarray, rounds: int, warmup: int, min_time: float) -> dict:
    """Median images/s (and min, max) of every session on ``batch``, interleaved, order rotated every round."""
    feeds = {name: {s.get_inputs()[0].name: batch} for name, s in sessions.items()}
    for _ in range(warmup):
        for name, session in sessions.items():
            session.run(None, feeds[name])
    # Calls per timing: enough for ``min_time`` seconds of the slowest (the unreduced) graph.
    start = time.perf_counter()
    first = next(iter(sessions))
    sessions[first].run(None, feeds[first])
    calls = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-6)))
    names = list(sessions)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            session, feed = sessions[name], feeds[name]
            start = time.perf_counter()
            for _ in range(calls):
                session.run(None, feed)
            rates[name].append(calls * batch.shape[0] / (time.perf_counter() - start))
    return {name: {"images_per_s": statistics.median(r), "min": min(r), "max": max(r), "calls_per_timing": calls}
            for name, r in rates.items()}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = parse_kwargs(args.model_kwargs)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    settings = {k: v for k, v in SETTINGS.items() if v is None or v[0] in tr.methods()}
    if args.settings:
        wanted = set(args.settings.split(";"))
        settings = {k: v for k, v in settings.items() if v is None or k in wanted}
    baseline_gmacs = tr.flops(model).total_gmacs
    folder = Path(tempfile.mkdtemp(prefix="onnx_speed_"))
    sessions, exports = {}, {}
    for label, setting in settings.items():
        reduced = model if setting is None else tr.patch(copy.deepcopy(model), setting[0], **setting[1])
        started = time.perf_counter()
        result = export_onnx(reduced, folder / f"{len(exports)}.onnx", opset=args.opset)
        gmacs = tr.flops(reduced).total_gmacs
        exports[label] = {"method": None if setting is None else setting[0],
                          "options": {} if setting is None else setting[1], "gmacs": gmacs,
                          "gmacs_ratio": baseline_gmacs / gmacs, "max_abs_diff": result.max_abs_diff,
                          "export_s": time.perf_counter() - started,
                          "onnx_mb": os.path.getsize(result.path) / 1e6}
        sessions[label] = onnx_session(result.path, threads=args.threads, optimization=args.optimization)
        print(f"exported {label}: {gmacs:.2f} GMACs, onnxruntime vs PyTorch {result.max_abs_diff:.2g}", flush=True)
    img_size = tr.export.default_img_size(model)
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        batch = torch.randn(batch_size, 3, *img_size, generator=torch.Generator().manual_seed(0)).numpy()
        timings = time_sessions(sessions, batch, args.rounds, args.warmup, args.min_time)
        base = timings["unreduced"]["images_per_s"]
        for label, timing in timings.items():
            speedup = timing["images_per_s"] / base
            row = {"label": label, "batch_size": batch_size, **timing, "speedup": speedup, **exports[label],
                   "share_of_ceiling": speedup / exports[label]["gmacs_ratio"]}
            rows.append(row)
            print(f"{label:<24} batch {batch_size:>3}: {timing['images_per_s']:8.1f} img/s, {speedup:.2f}x "
                  f"(ceiling {row['gmacs_ratio']:.2f}x, {row['share_of_ceiling']:.2f} of it)", flush=True)
    import onnx
    import onnxruntime
    import onnxscript

    return {
        "model": args.model, "model_kwargs": kwargs, "img_size": list(img_size),
        "protocol": f"onnxruntime CPUExecutionProvider, graphs of tr.export_onnx (dynamic batch, opset {args.opset}), "
                    f"interleaved rounds (order rotated), median images/s after {args.warmup} warm-up rounds",
        "rounds": args.rounds, "warmup": args.warmup, "min_time": args.min_time,
        "environment": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                        "onnxscript": onnxscript.__version__, "torch": torch.__version__,
                        "threads": args.threads or "onnxruntime default (one per core)",
                        "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                        "graph_optimization": args.optimization, "execution_mode": "sequential",
                        "dtype": "float32", "load_average": list(os.getloadavg())},
        "rows": rows,
    }


def table(result: dict) -> str:
    """The README's markdown table: one row per setting, speed-ups at each batch size and the share of the
    ceiling at the largest."""
    batches = sorted({row["batch_size"] for row in result["rows"]})
    by_label: dict[str, dict[int, dict]] = {}
    for row in result["rows"]:
        by_label.setdefault(row["label"], {})[row["batch_size"]] = row
    largest = batches[-1]
    head = ("| setting | GMACs | ceiling (GMACs ratio) | " + " | ".join(f"speed-up, batch {b}" for b in batches)
            + f" | share of ceiling, batch {largest} | onnxruntime vs PyTorch |")
    lines = [head, "|---|---:|---:|" + "---:|" * len(batches) + "---:|---:|"]
    for label, per_batch in by_label.items():
        any_row = next(iter(per_batch.values()))
        speedups = " | ".join(f"{per_batch[b]['speedup']:.2f}x" if b in per_batch else "" for b in batches)
        share = per_batch.get(largest, {}).get("share_of_ceiling")
        lines.append(f"| {label} | {any_row['gmacs']:.2f} | {any_row['gmacs_ratio']:.2f}x | {speedups} | "
                     f"{'' if share is None else f'{share:.2f}'} | {any_row['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--model-kwargs", default=None, help="timm.create_model overrides, e.g. depth=4,img_size=64")
    parser.add_argument("--settings", default=None,
                        help="';'-separated labels of benchmarks/speed.py's SETTINGS to run (default all)")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timing (several calls at batch 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of torch and onnxruntime (default: onnxruntime's, one per core)")
    parser.add_argument("--optimization", default="all", choices=("disable", "basic", "extended", "all"),
                        help="onnxruntime graph optimisation level (default all, onnxruntime's own default)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--table", action="store_true", help="print the README table from --out and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}\n")
    print(table(result))


if __name__ == "__main__":
    main()
