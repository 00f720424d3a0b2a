"""What deciding in float32 costs: the same patched model timed with this checkout's library and another commit's
(decisions in the model's dtype), interleaved in one process, eager and ``torch.compile``, batch 1 and 32, in
float32 and under bfloat16 autocast.

The other commit's ``src/tokenreduce`` is loaded as a second package (``tokenreduce_before``: the library's own
imports are relative), so both run on the same weights, inputs and threads, round after round.

    git worktree add /tmp/before 8dc7d15
    python benchmarks/precision_cost.py --before /tmp/before/src      # -> results/precision/cost.json

Without native bf16 units (``lscpu``: no avx512_bf16 / amx) the bf16 matmuls are emulated, so the bf16 rows
measure this CPU's emulation as much as the library; the float32 rows must show no change.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision import cpu_name, library  # noqa: E402

import tokenreduce as tr  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "precision"
METHODS = ("tome", "topk", "evit", "gtp", "ppt")


def load_other(src: Path):
    """``src/tokenreduce`` of another checkout as the package ``tokenreduce_before``."""
    spec = importlib.util.spec_from_file_location("tokenreduce_before", src / "tokenreduce" / "__init__.py",
                                                  submodule_search_locations=[str(src / "tokenreduce")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tokenreduce_before"] = module
    spec.loader.exec_module(module)
    return module


def seconds(model, x, dtype: torch.dtype) -> float:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout's src/")
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=RESULTS / "cost.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    other = load_other(args.before)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    level = 0.65 * tr.flops(base).total_gmacs
    rows = []
    for name in args.methods:
        options = tr.schedule_for_flops(base, name, target_gmacs=level)
        after, before = tr.patch(copy.deepcopy(base), name, **options), other.patch(copy.deepcopy(base), name,
                                                                                    **options)
        for compiled in (False, True):
            runs = {"after": torch.compile(after) if compiled else after,
                    "before": torch.compile(before) if compiled else before}
            for batch in args.batches:
                x = torch.randn(batch, 3, *base.patch_embed.img_size)
                for dtype in (torch.float32, torch.bfloat16):
                    for run in runs.values():  # warm-up (and compile)
                        seconds(run, x, dtype)
                    times = {"after": [], "before": []}
                    for i in range(args.rounds):
                        order = ("after", "before") if i % 2 == 0 else ("before", "after")
                        for label in order:
                            times[label].append(seconds(runs[label], x, dtype))
                    ratios = [a / b for a, b in zip(times["after"], times["before"], strict=True)]
                    row = {"method": name, "options": options, "compiled": compiled, "batch": batch,
                           "dtype": str(dtype).removeprefix("torch."),
                           "after_ms": 1e3 * statistics.median(times["after"]),
                           "before_ms": 1e3 * statistics.median(times["before"]),
                           "ratio_median": statistics.median(ratios)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({
                        "model": args.model, "level": 0.65, "rounds": args.rounds, "library": library(),
                        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
