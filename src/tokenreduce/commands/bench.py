"""``tokenreduce bench``: images/s of a reduced model against the unreduced one, timed in the same run.

    tokenreduce bench --model deit_small_patch16_224 --method tome --r 13 --batch-sizes 1,8,32
    tokenreduce bench --method topk --keep-rate 0.7 --img-sizes 224,384 --rounds 7 --json out/bench.json
    tokenreduce bench --method tome --r 13 --device cuda --dtype float16 --compile --compile-mode max-autotune

Protocol (``measure.speed``): inputs made beforehand, ``torch.inference_mode()``, warm-up, then rounds that
time every model once each, interleaved; medians and min-max spread; the ceiling is the GMACs ratio.
On CUDA the batches are timed with CUDA events and the peak memory is the allocator's. ``--compile`` adds
rows for ``torch.compile`` beside the eager ones (compiled reduced against compiled unreduced), with the
first call (compilation) reported apart; each batch and image size gets its own graph (``dynamic=False``).
"""

from __future__ import annotations

import argparse

from ..core.errors import InputError
from . import _common, _paths

NAME = "bench"
HELP = "Speed (images/s) of a reduced model and of the unreduced one in the same run, per batch size."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_model_arguments(parser)
    _common.add_method_arguments(parser)
    _common.add_device_arguments(parser, compile=True)
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--img-sizes", default=None,
                        help="comma-separated input sides (the model is built with dynamic_img_size=True)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (at least one is made)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    _paths.add_data_root_argument(parser)
    _common.add_json_argument(parser)


def run(args: argparse.Namespace) -> int:
    import copy

    import torch

    import tokenreduce as tr

    from ..measure.speed import environment, memory_measure, method_speedups

    _paths.resolve_data_paths(args, "checkpoint")
    name, options = _common.method_options(args)
    device, dtype = _common.resolve_device(args.device), _common.resolve_dtype(args.dtype)
    modes = _common.resolve_compile_modes(args)
    batch_sizes = _common.parse_ints(args.batch_sizes, "--batch-sizes") or [1]
    img_sizes = _common.parse_ints(args.img_sizes, "--img-sizes")
    if any(b <= 0 for b in batch_sizes) or (img_sizes and any(s <= 0 for s in img_sizes)):
        raise InputError(f"batch and image sizes must be positive, got {batch_sizes} and {img_sizes}")
    if args.rounds <= 0 or args.warmup < 0:
        raise InputError(f"--rounds must be positive and --warmup non-negative, got {args.rounds}, {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, prep = _common.build_model(args, **({"dynamic_img_size": True} if img_sizes else {}))
    sizes = img_sizes or [int(prep.img_size[0])]
    label = name or "unreduced (again)"
    # Build the reduced model before any timing: a bad option must fail fast, model untouched.
    reduced_model = _common.patch_model(copy.deepcopy(model), name, options)
    settings = {"unreduced": None, label: None if name is None else
                reduced_model if name == _common.STVIT else (name, options)}
    memory_what = None if args.no_memory else memory_measure(device)

    rows, speed = [], []
    print(f"model {args.model}, method {_common.describe_method(name, options)}, {device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'img':>4} {'batch':>5} {'mode':>8} {'unreduced img/s':>16} {'reduced img/s':>14} {'ratio':>6} "
          f"{'ceiling':>7} {'GMACs':>7} {'mem MB (unred/red)':>19} {'1st call s (unred/red)':>23}")
    for img_size in sizes:
        timed = method_speedups(model, settings, batch_sizes=batch_sizes, img_size=img_size, rounds=args.rounds,
                                warmup=args.warmup, dtype=dtype, device=device, compile_modes=modes,
                                memory=memory_what is not None)
        speed += timed
        for batch_size in batch_sizes:
            for mode in modes:
                base, reduced = (next(r for r in timed if r["label"] == key and r["batch_size"] == batch_size
                                      and r["compile"] == mode) for key in ("unreduced", label))
                row = {"img_size": img_size, "batch_size": batch_size, "compile": mode,
                       "unreduced_images_per_s": base["images_per_s"], "unreduced_spread": base["spread"],
                       "images_per_s": reduced["images_per_s"], "spread": reduced["spread"],
                       "speed_ratio": reduced["speedup"], "gmacs": reduced["gmacs"],
                       "baseline_gmacs": base["gmacs"], "ceiling": reduced["gmacs_ratio"],
                       "peak_memory_mb_unreduced": base["peak_memory_mb"], "peak_memory_mb": reduced["peak_memory_mb"],
                       "first_call_s_unreduced": base["first_call_s"], "first_call_s": reduced["first_call_s"]}
                rows.append(row)
                mem = ("n/a" if None in (base["peak_memory_mb"], reduced["peak_memory_mb"])
                       else f"{base['peak_memory_mb']:.0f}/{reduced['peak_memory_mb']:.0f}")
                first = f"{base['first_call_s']:.2f}/{reduced['first_call_s']:.2f}"
                print(f"{img_size:>4} {batch_size:>5} {mode or 'eager':>8} {row['unreduced_images_per_s']:>16.1f} "
                      f"{row['images_per_s']:>14.1f} {row['speed_ratio']:>6.2f} {row['ceiling']:>7.2f} "
                      f"{row['gmacs']:>7.4g} {mem:>19} {first:>23}")
    print(f"ratio = reduced/unreduced images/s (median of {args.rounds} interleaved rounds, eager against eager, "
          f"compiled against compiled); ceiling = GMACs ratio; 1st call = the first warm-up call (compilation "
          f"included), not timed in the rounds; memory: {memory_what or 'not measured'}")
    _common.write_json(args.json, {
        "command": "bench", "model": args.model, "method": name, "options": options,
        "describe": tr.describe(reduced_model) if name and name != _common.STVIT else None, "rows": rows,
        "memory_measure": memory_what, "rounds": args.rounds, "warmup": args.warmup,
        "environment": environment(dtype, modes[-1] or False, device), "timings": speed,
    })
    return 0
