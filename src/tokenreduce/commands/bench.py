"""``tokenreduce bench``: images/s of a reduced model against the unreduced one, timed in the same run.

    tokenreduce bench --model deit_small_patch16_224 --method tome --r 13 --batch-sizes 1,8,32
    tokenreduce bench --method topk --keep-rate 0.7 --img-sizes 224,384 --rounds 7 --json out/bench.json

Protocol (``measure.speed``): inputs made beforehand, ``torch.inference_mode()``, warm-up, then rounds that
time every model once each, interleaved; medians and min-max spread; the ceiling is the GMACs ratio.
"""

from __future__ import annotations

import argparse

from ..core.errors import InputError
from . import _common

NAME = "bench"
HELP = "Speed (images/s) of a reduced model and of the unreduced one in the same run, per batch size."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_model_arguments(parser)
    _common.add_method_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--img-sizes", default=None,
                        help="comma-separated input sides (the model is built with dynamic_img_size=True)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="autocast dtype (float32: no autocast)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    _common.add_json_argument(parser)


def run(args: argparse.Namespace) -> int:
    import copy

    import torch

    import tokenreduce as tr

    from ..measure.memory import WHAT, peak_memory_mb
    from ..measure.speed import environment, method_speedups

    name, options = _common.method_options(args)
    batch_sizes = _common.parse_ints(args.batch_sizes, "--batch-sizes") or [1]
    img_sizes = _common.parse_ints(args.img_sizes, "--img-sizes")
    if any(b <= 0 for b in batch_sizes) or (img_sizes and any(s <= 0 for s in img_sizes)):
        raise InputError(f"batch and image sizes must be positive, got {batch_sizes} and {img_sizes}")
    if args.rounds <= 0 or args.warmup < 0:
        raise InputError(f"--rounds must be positive and --warmup non-negative, got {args.rounds}, {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = _common.build_model(args, **({"dynamic_img_size": True} if img_sizes else {}))
    sizes = img_sizes or [int(model.patch_embed.img_size[0])]
    label = name or "unreduced (again)"
    # Build the reduced model before any timing: a bad option must fail fast, model untouched.
    reduced_model = _common.patch_model(copy.deepcopy(model), name, options)
    settings = {"unreduced": None, label: None if name is None else
                reduced_model if name == _common.STVIT else (name, options)}

    rows = []
    print(f"model {args.model}, method {_common.describe_method(name, options)}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'img':>4} {'batch':>5} {'unreduced img/s':>16} {'reduced img/s':>14} {'ratio':>6} {'ceiling':>7} "
          f"{'GMACs':>7} {'mem MB (unred/red)':>19}")
    for img_size in sizes:
        speed = method_speedups(model, settings, batch_sizes=batch_sizes, img_size=img_size, rounds=args.rounds,
                                warmup=args.warmup, dtype=dtype)
        variants = {"unreduced": model, label: reduced_model}
        for batch_size in batch_sizes:
            base = next(r for r in speed if r["label"] == "unreduced" and r["batch_size"] == batch_size)
            reduced = next(r for r in speed if r["label"] == label and r["batch_size"] == batch_size)
            memory = {}
            if not args.no_memory:
                images = torch.randn(batch_size, 3, img_size, img_size)
                with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    for key, variant in variants.items():
                        variant(images)  # so that both are measured after the same warm-up
                        measured = [peak_memory_mb(lambda v=variant, x=images: v(x)) for _ in range(2)]
                        memory[key] = None if None in measured else max(measured)
            row = {"img_size": img_size, "batch_size": batch_size,
                   "unreduced_images_per_s": base["images_per_s"], "unreduced_spread": base["spread"],
                   "images_per_s": reduced["images_per_s"], "spread": reduced["spread"],
                   "speed_ratio": reduced["speedup"], "gmacs": reduced["gmacs"], "baseline_gmacs": base["gmacs"],
                   "ceiling": reduced["gmacs_ratio"], "peak_memory_mb_unreduced": memory.get("unreduced"),
                   "peak_memory_mb": memory.get(label)}
            rows.append(row)
            mem = ("n/a" if not memory or None in memory.values()
                   else f"{memory['unreduced']:.0f}/{memory[label]:.0f}")
            print(f"{img_size:>4} {batch_size:>5} {row['unreduced_images_per_s']:>16.1f} {row['images_per_s']:>14.1f} "
                  f"{row['speed_ratio']:>6.2f} {row['ceiling']:>7.2f} {row['gmacs']:>7.4g} {mem:>19}")
    print(f"ratio = reduced/unreduced images/s (median of {args.rounds} interleaved rounds); ceiling = GMACs ratio; "
          f"memory: {WHAT}")
    _common.write_json(args.json, {
        "command": "bench", "model": args.model, "method": name, "options": options,
        "describe": tr.describe(variants[label]) if name and name != _common.STVIT else None, "rows": rows,
        "memory_measure": None if args.no_memory else WHAT, "rounds": args.rounds, "warmup": args.warmup,
        "environment": environment(dtype), "timings": speed,
    })
    return 0
