"""Speed of every method before and after a change of the library, in one process, interleaved.

    python benchmarks/before_after.py --before 11fd49b      # writes benchmarks/results/before_after.json

The library at the ``--before`` commit is extracted with ``git archive`` into a temporary directory and imported
under another name (``tokenreduce_before``; the package imports itself relatively), so the same model, input and
round-robin order time both versions and the unreduced model side by side, and a slow phase of a shared machine
hits them alike. Reported per batch size: the median speed-up over the unreduced model of each version and its
share of the GMACs ceiling.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm
import torch

import tokenreduce as tr
from tokenreduce.measure.speed import compare_speed, environment

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "tome r=13": ("tome", {"r": 13}),
    "topk keep=0.7 @3,6,9": ("topk", {"keep_rate": 0.7, "layers": (3, 6, 9)}),
    "evit keep=0.7 @3,6,9": ("evit", {"keep_rate": 0.7, "layers": (3, 6, 9)}),
    "gtp r=8": ("gtp", {"r": 8}),
    "ppt r=50 @3,6,9": ("ppt", {"r": 50, "layers": (3, 6, 9)}),
}


def import_before(commit: str, into: Path):
    """The package as it was at ``commit``, imported as ``tokenreduce_before``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src/tokenreduce"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / "tokenreduce_before"
    (into / "src" / "tokenreduce").rename(package)
    for source in package.rglob("*.py"):  # module names written as strings (the adapter registry, the CLI)
        text = source.read_text()
        source.write_text(text.replace('"tokenreduce.', '"tokenreduce_before.').replace(
            'f"tokenreduce.', 'f"tokenreduce_before.'))
    sys.path.insert(0, str(into))
    return importlib.import_module("tokenreduce_before")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git commit of the library to compare with")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "before_after.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before], check=True,
                            capture_output=True, text=True).stdout.strip()
    after = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                           capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], check=True,
                                capture_output=True, text=True).stdout.strip())
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        before = import_before(commit, Path(tmp))
        models = {"unreduced": model}
        ceilings = {}
        for label, (method, options) in SETTINGS.items():
            models[f"{label} | after"] = tr.patch(copy.deepcopy(model), method, **options)
            models[f"{label} | before"] = before.patch(copy.deepcopy(model), method, **options)
            ceilings[label] = tr.flops(model).total_gmacs / tr.flops(models[f"{label} | after"]).total_gmacs
        rows = []
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            timings = compare_speed(models, batch_size, warmup=args.warmup, rounds=args.rounds)
            base = timings["unreduced"].images_per_s
            for label, ceiling in ceilings.items():
                row = {"setting": label, "batch_size": batch_size, "ceiling": ceiling}
                for version in ("before", "after"):
                    speedup = timings[f"{label} | {version}"].images_per_s / base
                    row[f"speedup_{version}"] = speedup
                    row[f"share_{version}"] = speedup / ceiling
                rows.append(row)
                print(f"{label:<22} batch {batch_size:>3}  ceiling {ceiling:.2f}x  before {row['speedup_before']:.2f}x "
                      f"({row['share_before']:.2f})  after {row['speedup_after']:.2f}x ({row['share_after']:.2f})",
                      flush=True)
    result = {"model": args.model, "before": commit, "after": after + ("+uncommitted" if dirty else ""),
              "protocol": "one process, interleaved rounds, median images/s, inference_mode, float32, eager",
              "rounds": args.rounds, "environment": environment(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
