"""How close can a method come to its GMACs ceiling at batch 1? Each method against the same model run on the
same token counts with no reduction work (the reduction replaced by a slice), interleaved in one process.

    python benchmarks/batch1_bound.py --threads 2 --rounds 40 --repeats 5   # -> benchmarks/results/batch1_bound.json
    python benchmarks/batch1_bound.py --threads 2 --rounds 40 --repeats 5 --compile
                                                    # every model torch.compile'd -> results/batch1_bound_compiled.json

The "bound" model runs every block on exactly the token counts of the method's plan, but its reduction step only
keeps the first tokens (no statistics, no matching, no gathers): what remains of the gap to the ceiling there is
the cost of smaller matrix products and of the fixed per-op work, which no reduction code can remove. The gap
between the method and its bound is the reduction's own cost: ``of_bound`` is the method's speed over its bound's
(two medians over rounds), ``of_bound_paired`` the median over rounds of the same ratio within each round; with
``--repeats K`` the whole measurement runs K times in turn and each figure is the median of the K (each run is kept
under ``runs``). ``--compile [MODE]`` compiles every model, the unreduced one and the bounds too (``torch.compile``,
default mode unless named), each compiled before it is timed (the first warm-up call compiles, timed apart):
each method against its compiled bound.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import timm
import torch
from before_after import SETTINGS  # the README's settings, one list for both scripts
from deploy import parse_kwargs

import tokenreduce as tr
from tokenreduce.core.state import TokenState
from tokenreduce.measure.speed import compare_speed, environment, recompile_room
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


RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--model-kwargs", default=None, help='tests: timm.create_model keywords, e.g. "depth=2"')
    parser.add_argument("--settings", default=None,
                        help=f"comma-separated settings (default: all of {', '.join(SETTINGS)})")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="torch.compile every model (MODE: default, reduce-overhead, max-autotune)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="measurements in turn; rows give their medians")
    parser.add_argument("--out", default=None,
                        help="default: results/batch1_bound.json (results/batch1_bound_compiled.json compiled)")
    args = parser.parse_args(argv)
    asked = list(SETTINGS) if args.settings is None else [p.strip() for p in args.settings.split(",") if p.strip()]
    unknown = [label for label in asked if label not in SETTINGS]
    if unknown or not asked:
        parser.error(f"unknown --settings {unknown}; valid: {', '.join(SETTINGS)}")
    settings = {label: SETTINGS[label] for label in asked}
    out = Path(args.out) if args.out else RESULTS / ("batch1_bound_compiled.json" if args.compile else
                                                     "batch1_bound.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, **parse_kwargs(args.model_kwargs)).eval()
    models: dict[str, torch.nn.Module] = {"unreduced": model}
    ceilings: dict[str, float] = {}
    for label, (method, options) in settings.items():
        reduced = tr.patch(copy.deepcopy(model), method, **options)
        models[label] = reduced
        models[f"{label} | bound"] = tr.patch(copy.deepcopy(model), SameTokenCounts(tr.method_of(reduced)))
        ceilings[label] = tr.flops(model).total_gmacs / tr.flops(reduced).total_gmacs
    if args.compile:
        models = {name: torch.compile(module, mode=args.compile) for name, module in models.items()}
    # Several measurements in turn (each one interleaved rounds of every model): on a shared VM one measurement's
    # method / bound moves by several points from one minute to the next; the row keeps each and their median.
    # Compiled: room for every model's graph (past dynamo's recompile limit, 8, the rest would run eagerly).
    with recompile_room(len(models)) if args.compile else contextlib.nullcontext():
        runs = [compare_speed(models, batch_size=1, warmup=args.warmup, rounds=args.rounds)
                for _ in range(args.repeats)]
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
              "compiled": args.compile,
              "protocol": "one process, interleaved rounds, median images/s, inference_mode, float32, "
                          + (f"torch.compile mode {args.compile!r}" if args.compile else "eager"),
              "environment": environment(compiled=args.compile or False), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
