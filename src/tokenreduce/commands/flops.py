"""``tokenreduce flops``: analytic GMACs and tokens per block of a patched model, unreduced beside it.

    tokenreduce flops --model deit_small_patch16_224 --method tome --r 13
    tokenreduce flops --method topk --keep-rate 0.7 --layers 3,6,9 --json out/flops.json
"""

from __future__ import annotations

import argparse

from . import _common

NAME = "flops"
HELP = "GMACs (multiply-adds) and tokens per block of a reduced model, with the unreduced cost beside it."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_model_arguments(parser)
    _common.add_method_arguments(parser)
    parser.add_argument("--img-size", type=int, default=None, help="input side in pixels (default: the model's)")
    parser.add_argument("--count", action="store_true",
                        help="cross-check with torch's FlopCounterMode on one image (math attention kernel), run on "
                             "--device with --dtype")
    _common.add_device_arguments(parser)
    _common.add_json_argument(parser)


def counted_gmacs(model, img_size: tuple[int, int], device="cpu", dtype=None) -> float:
    """GMACs of one image as torch's FlopCounterMode counts them (FLOPs / 2) under the math attention kernel
    (``tr.count_gmacs``: the counter misses CPU's fused attention), the model run on ``device`` (autocast to
    ``dtype`` below float32: the count is the same)."""
    import copy

    import torch

    import tokenreduce as tr

    from ..measure.speed import autocast

    model = copy.deepcopy(model).to(device)
    with autocast(device, dtype or torch.float32):
        return tr.count_gmacs(model, torch.randn(1, 3, *img_size, device=device))


def run(args: argparse.Namespace) -> int:
    import tokenreduce as tr

    name, options = _common.method_options(args)
    device, dtype = _common.resolve_device(args.device), _common.resolve_dtype(args.dtype)
    model = _common.build_model(args).model
    base = tr.flops(model, args.img_size)
    model = _common.patch_model(model, name, options)
    report = tr.flops(model, args.img_size)

    print(f"model {args.model} at {report.img_size[0]}x{report.img_size[1]}, "
          f"method {_common.describe_method(name, options)}")
    print(f"{'block':>5} {'tokens in':>9} {'tokens out':>10} {'GMACs':>8} | {'unreduced':>9} {'GMACs':>8}")
    for block, unreduced in zip(report.blocks, base.blocks, strict=True):
        print(f"{block.index:>5} {block.tokens_in:>9} {block.tokens_out:>10} {block.gmacs:>8.4f} | "
              f"{unreduced.tokens_in:>9} {unreduced.gmacs:>8.4f}")
    restore = f" + {report.restore_gmacs:.4f} restore" if report.dense_output and report.restore_gmacs else ""
    print(f"total {report.gmacs:.3f} GMACs + {report.overhead_gmacs:.4f} reduction overhead{restore} = "
          f"{report.total_gmacs:.3f} (unreduced {report.baseline_gmacs:.3f}; ratio {report.ratio:.2f}x)")
    for note in report.notes:
        print(f"note: {note}")
    counted = None
    if args.count:
        counted = counted_gmacs(model, report.img_size, device, dtype)
        print(f"FlopCounterMode ({device}, {args.dtype}): {counted:.3f} GMACs counted vs {report.total_gmacs:.3f} "
              f"analytic ({100 * (counted / report.total_gmacs - 1):+.2f}%)")
    _common.write_json(args.json, {
        "command": "flops",
        "model": args.model,
        "method": name,
        "options": options,
        **report.as_dict(),
        "unreduced": base.as_dict(),
        "counted_gmacs": counted,
        "counted_on": {"device": str(device), "dtype": args.dtype} if args.count else None,
    })
    return 0
