"""Aten ops of every method with and without a dense output, before and after the restore rules.

    python benchmarks/restore_ops.py --before 9f17854     # writes benchmarks/results/restore_ops.json

The library at ``--before`` is imported beside the current one (``before_after.import_before``). For each
method at the settings of ``before_after.py`` on DeiT-S (random weights, batch 2, 224 px), the ops a forward pass
dispatches are recorded with ``TorchDispatchMode`` (a device-independent count of kernel launches):

Every count is taken on a second call (the first fills per-shape caches).

- ``model(x)`` (the CLS head: no dense output): the sequence must be identical before and after, under every rule;
- ``model.forward_features(x)`` (the restored grid): before, and after under each rule, with the ops the rule adds.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import subprocess
import tempfile
from pathlib import Path

import timm
import torch
from before_after import ROOT, SETTINGS, import_before
from torch.utils._python_dispatch import TorchDispatchMode

import tokenreduce as tr
from tokenreduce.methods.base import create_method

RULES = ("departure", "nearest", "reconstruct", "graph")


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def record(fn, x: torch.Tensor) -> list[str]:
    with torch.inference_mode():
        fn(x)  # warm-up: per-shape caches (GTP's spatial graph) are filled outside the count
    recorder = OpRecorder()
    with torch.inference_mode(), recorder:
        fn(x)
    return recorder.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git commit of the library before the restore rules")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "restore_ops.json"))
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before], check=True,
                            capture_output=True, text=True).stdout.strip()
    after = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                           capture_output=True, text=True).stdout.strip()
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before = import_before(commit, Path(tmp))
        # On random weights every image pools at PPT's default threshold: threshold 0 shows its pruning branch.
        settings = {**SETTINGS,
                    "ppt r=50 @3,6,9 threshold=0": ("ppt", {"r": 50, "layers": (3, 6, 9), "threshold": 0.0})}
        for label, (method, options) in settings.items():
            old = before.patch(copy.deepcopy(model), method, **options)
            old_cls, old_dense = record(old, x), record(old.forward_features, x)
            row = {"setting": label, "cls_head_ops_before": len(old_cls), "dense_ops_before": len(old_dense),
                   "rules": {}}
            for rule in RULES:
                if rule not in create_method(method).restore_rules:
                    continue
                new = tr.patch(copy.deepcopy(model), method, restore=rule, **options)
                new_cls, new_dense = record(new, x), record(new.forward_features, x)
                added = collections.Counter(new_dense) - collections.Counter(old_dense)
                row["rules"][rule] = {"cls_head_ops": len(new_cls), "cls_head_identical": new_cls == old_cls,
                                      "dense_ops": len(new_dense), "dense_identical": new_dense == old_dense,
                                      "dense_ops_added": dict(sorted(added.items())),
                                      "restore_gmacs": tr.flops(new).restore_gmacs}
                print(f"{label:<22} {rule:<12} CLS head {len(old_cls)} -> {len(new_cls)} ops "
                      f"(identical: {new_cls == old_cls}); dense {len(old_dense)} -> {len(new_dense)}", flush=True)
            rows.append(row)
    result = {"model": "deit_small_patch16_224 (random weights), batch 2, 224 px, inference_mode, CPU",
              "before": commit, "after": after, "count": "aten ops dispatched (TorchDispatchMode)", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
