"""How many aten ops does each method's reduction work add per block? A device-independent proxy for the fixed
per-op (launch) overhead that dominates batch-1 latency.

    python benchmarks/op_counts.py --record-before   # the counts at this commit, as "before"
    python benchmarks/op_counts.py                   # the current code, as "after" (keeps "before")

Every op dispatched in one forward pass (timm ``deit_small_patch16_224``, pretrained=False, seeded; batch 1,
float32, ``inference_mode``) is counted by a ``TorchDispatchMode``, for the settings of ``before_after.py`` (those
of ``batch1_bound.py``). Per setting: the ops of the whole forward pass, of the unreduced model, of the "same
token counts" bound (``batch1_bound.SameTokenCounts``: the method's token counts, each reduction a slice), and
what the method adds over the bound, in total and per reducing block, with the op names it adds most.
Writes ``benchmarks/results/op_counts.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import timm
import torch
from batch1_bound import SameTokenCounts
from before_after import SETTINGS
from torch.utils._python_dispatch import TorchDispatchMode

import tokenreduce as tr

ROOT = Path(__file__).resolve().parents[1]
TOP = 15


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by overload name (``aten.add.Tensor``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model: torch.nn.Module, images: torch.Tensor) -> Counter[str]:
    """The ops of one forward pass of ``model`` on ``images`` (after one uncounted pass that fills caches)."""
    with torch.inference_mode():
        model(images)
        with OpCounter() as counter:
            model(images)
    return counter.counts


def setting_row(model: torch.nn.Module, label: str, method: str, options: dict[str, Any], images: torch.Tensor,
                unreduced: int) -> dict[str, Any]:
    reduced = tr.patch(copy.deepcopy(model), method, **options)
    bound = tr.patch(copy.deepcopy(model), SameTokenCounts(tr.method_of(reduced)))
    ops, bound_ops = count_ops(reduced, images), count_ops(bound, images)
    plan = tr.method_of(reduced).plan(model.patch_embed.num_patches + model.num_prefix_tokens,
                                      model.num_prefix_tokens, len(model.blocks))
    steps = sum(1 for amount in plan.amounts if amount)
    added = Counter(ops)
    added.subtract(bound_ops)
    total, total_bound = sum(ops.values()), sum(bound_ops.values())
    top = [(name, n) for name, n in sorted(added.items(), key=lambda kv: (-kv[1], kv[0])) if n > 0][:TOP]
    fewer = [(name, n) for name, n in sorted(added.items(), key=lambda kv: (kv[1], kv[0])) if n < 0][:5]
    return {"setting": label, "method": method, "options": {k: list(v) if isinstance(v, tuple) else v
                                                             for k, v in options.items()},
            "ops": total, "unreduced_ops": unreduced, "bound_ops": total_bound, "reducing_blocks": steps,
            "added_ops": total - total_bound, "added_per_step": (total - total_bound) / steps,
            "top_added": dict(top), "fewer_than_bound": dict(fewer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--record-before", action="store_true", help="store the counts as 'before'")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "op_counts.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(1, 3, 224, 224)
    unreduced = sum(count_ops(model, images).values())
    rows = [setting_row(model, label, method, options, images, unreduced)
            for label, (method, options) in SETTINGS.items()]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True,
                                text=True).stdout.strip())
    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result.update({"model": args.model, "batch_size": 1,
                   "protocol": "aten ops dispatched in one forward pass (TorchDispatchMode), float32, "
                               "inference_mode, pretrained=False, seed 0; added = method - same-token-counts bound"})
    result["before" if args.record_before else "after"] = {
        "commit": commit + ("+changes" if dirty else ""), "torch": torch.__version__, "rows": rows}
    for row in rows:
        print(f"{row['setting']:<22} ops {row['ops']:>5}  unreduced {row['unreduced_ops']:>5}  bound "
              f"{row['bound_ops']:>5}  added {row['added_ops']:>4} = {row['added_per_step']:.1f} per step "
              f"({row['reducing_blocks']} steps)")
        print("    " + ", ".join(f"{name} {n}" for name, n in row["top_added"].items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
