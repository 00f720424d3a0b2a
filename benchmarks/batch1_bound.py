"""How close can a method come to its GMACs ceiling at batch 1? Each method against the same model run on the
same token counts with no reduction work (the reduction replaced by a slice), interleaved in one process.

    python benchmarks/batch1_bound.py --threads 2 --rounds 40 --repeats 5   # -> benchmarks/results/batch1_bound.json

The "bound" model runs every block on exactly the token counts of the method's plan, but its reduction step only
keeps the first tokens (no statistics, no matching, no gathers): what remains of the gap to the ceiling there is
the cost of smaller matrix products and of the fixed per-op work, which no reduction code can remove. The gap
between the method and its bound is the reduction's own cost: ``of_bound`` is the method's speed over its bound's
(two medians over rounds), ``of_bound_paired`` the median over rounds of the same ratio within each round; with
``--repeats K`` the whole measurement runs K times in turn and each figure is the median of the K (each run is kept
under ``runs``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import timm
import torch
from before_after import SETTINGS  # the README's settings, one list for both scripts

import tokenreduce as tr
from tokenreduce.core.state import TokenState
from tokenreduce.measure.speed import compare_speed, environment
from tokenreduce.methods.base import Method, Plan


class SameTokenCounts(Method):
    """The plan of another method, with each reduction a slice: the blocks see its token counts, nothing else."""

    name = "same-token-counts"

    def __init__(self, inner: Method) -> None:
        super().__init__()
        self.inner = inner

    def plan(self, num_tokens: int, num_prefix: int, depth: int) -> Plan:
        return self.inner.plan(num_tokens, num_prefix, depth)

    def reduce(self, block: int, state: TokenState, stats: dict[str, torch.Tensor], amount: int) -> TokenState:
        plan = self.inner.plan(state.extras["tokens_in0"], state.num_prefix, state.extras["depth"])
        return state.replace(x=state.x[:, : plan.tokens_out[block]].contiguous())

    def begin(self, state: TokenState, plan: Plan) -> TokenState:
        depth = len(plan.amounts)
        return state.replace(extras={**state.extras, "tokens_in0": state.num_tokens, "depth": depth})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="measurements in turn; rows give their medians")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch1_bound.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    models: dict[str, torch.nn.Module] = {"unreduced": model}
    ceilings: dict[str, float] = {}
    for label, (method, options) in SETTINGS.items():
        reduced = tr.patch(copy.deepcopy(model), method, **options)
        models[label] = reduced
        models[f"{label} | bound"] = tr.patch(copy.deepcopy(model), SameTokenCounts(tr.method_of(reduced)))
        ceilings[label] = tr.flops(model).total_gmacs / tr.flops(reduced).total_gmacs
    # Several measurements in turn (each one interleaved rounds of every model): on a shared VM one measurement's
    # method / bound moves by several points from one minute to the next; the row keeps each and their median.
    runs = [compare_speed(models, batch_size=1, warmup=args.warmup, rounds=args.rounds) for _ in range(args.repeats)]
    rows: list[dict[str, Any]] = []
    for label, ceiling in ceilings.items():
        per_run = []
        for timings in runs:
            base = timings["unreduced"].images_per_s
            speedup, bound = (timings[key].images_per_s / base for key in (label, f"{label} | bound"))
            # The method against its bound round by round (the two ran back to back), then the median: a slow
            # phase of a shared machine slows both calls of a round alike, which two separate medians do not cancel.
            paired = statistics.median(b / m for m, b in zip(timings[label].seconds,
                                                              timings[f"{label} | bound"].seconds, strict=True))
            per_run.append({"speedup": speedup, "bound_speedup": bound, "of_bound": speedup / bound,
                            "of_bound_paired": paired})
        middle = {key: statistics.median(run[key] for run in per_run) for key in per_run[0]}
        speedup, bound = middle["speedup"], middle["bound_speedup"]
        rows.append({"setting": label, "ceiling": ceiling, "speedup": speedup, "share": speedup / ceiling,
                     "bound_speedup": bound, "bound_share": bound / ceiling, "of_bound": middle["of_bound"],
                     "of_bound_paired": middle["of_bound_paired"], "runs": per_run})
        each = ", ".join(f"{run['of_bound_paired']:.3f}" for run in per_run)
        print(f"{label:<22} ceiling {ceiling:.2f}x  method {speedup:.2f}x ({speedup / ceiling:.2f})  "
              f"same token counts, no reduction work {bound:.2f}x ({bound / ceiling:.2f})  method / bound "
              f"{middle['of_bound']:.3f}, paired per round {middle['of_bound_paired']:.3f} "
              f"(runs: {each})")
    result = {"model": args.model, "batch_size": 1, "rounds": args.rounds, "repeats": args.repeats,
              "protocol": "one process, interleaved rounds, median images/s, inference_mode, float32, eager",
              "environment": environment(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
