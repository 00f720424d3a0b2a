"""``tokenreduce eval``: top-1/top-5, agreement and KL of a reduced model against the unreduced one, same pass.

    tokenreduce eval --model deit_small_patch16_224 --checkpoint deit_s.pth --data val/ --method tome --r 13
    tokenreduce eval --data images/ --labels labels.csv --method topk --keep-rate 0.7 --limit 500
    torchrun --nproc_per_node 2 $(which tokenreduce) eval --data val/ --method tome --opt r=13
    tokenreduce eval --data val/ --method tome --r 13 --device cuda --dtype bfloat16 --compile
    tokenreduce eval --model vit_small_patch14_dinov2 --model-kwargs num_classes=10 --data data/cifar10/test \
        --checkpoint models/dinov2_s14_cifar10.safetensors --method tome --r 8    # found in the data root

(under torchrun write `--opt r=13`: torchrun itself reads any option starting with `--r`; with ``--device
cuda`` each process takes the GPU of its LOCAL_RANK and the counts are summed over nccl, gloo otherwise).
``--compile`` makes a second pass with both models under ``torch.compile`` and prints its results beside the
eager pass's, with the time of each pass and of its first batch (compilation) apart. A relative ``--data``,
``--labels`` or ``--checkpoint`` not found from the current folder is looked up in the shared data folder
(``--data-root``, else ``$TOKENREDUCE_DATA_ROOT``, else ``shared`` beside the repository root).
"""

from __future__ import annotations

import argparse
import copy
import sys

from ..core.errors import InputError
from . import _common, _paths

NAME = "eval"
HELP = "Accuracy and agreement of a reduced model against the unreduced one, in one pass over a dataset."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_model_arguments(parser)
    _common.add_method_arguments(parser)
    _common.add_device_arguments(parser, compile=True)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="an ImageFolder tree, or a folder of images (with --labels)")
    data.add_argument("--labels", default=None, metavar="CSV", help="'file,label' rows (ImageNet class indices)")
    data.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    data.add_argument("--batch-size", type=int, default=32)
    data.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    data.add_argument("--crop-pct", type=float, default=None, help="override the model's crop_pct")
    data.add_argument("--interpolation", default=None, help="override the model's resize interpolation")
    data.add_argument("--img-size", type=int, default=None, help="override the model's input size")
    _paths.add_data_root_argument(data)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common.add_json_argument(parser)


def preprocessing(prep, args: argparse.Namespace) -> tuple[dict, object]:
    """The model's preprocessing (``tokenreduce.load``'s) with the command-line overrides as a timm data config,
    and its eval transform."""
    overrides = {k: v for k, v in {"crop_pct": args.crop_pct, "interpolation": args.interpolation}.items()
                 if v is not None}
    if args.img_size is not None:
        overrides["input_size"] = (3, args.img_size, args.img_size)
    return prep.data_config(**overrides), prep.transform(**overrides)


def run(args: argparse.Namespace) -> int:
    import tokenreduce as tr

    from ..adapters import num_classes as classes_of
    from ..measure.data import ImageListDataset, image_list
    from ..measure.evaluate import close_distributed, evaluate_pair, init_distributed
    from ..measure.speed import compile_model

    if args.limit is not None and args.limit <= 0:
        raise InputError(f"--limit must be positive, got {args.limit}")
    if args.batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    _paths.resolve_data_paths(args, "data", "labels", "checkpoint")
    name, options = _common.method_options(args)
    device, dtype = _common.resolve_device(args.device), _common.resolve_dtype(args.dtype)
    modes = _common.resolve_compile_modes(args)
    files, labels, classes = image_list(args.data, args.labels)
    if not files:
        raise InputError(f"no images found in {args.data!r}")
    extra = {"img_size": args.img_size} if args.img_size is not None else {}
    unreduced, prep = _common.build_model(args, **extra)
    reduced = _common.patch_model(copy.deepcopy(unreduced), name, options)
    config, transform = preprocessing(prep, args)
    num_classes = classes_of(unreduced)
    if not num_classes:
        raise InputError(f"model {args.model!r} has no classifier head (num_classes=0): eval compares class "
                         f"predictions; use a model with a head or --checkpoint with one")
    if classes and num_classes and len(classes) != num_classes:
        print(f"warning: {len(classes)} class folders but the model has {num_classes} outputs; labels are the "
              f"sorted folder indices", file=sys.stderr)

    context = init_distributed(device)
    unreduced, reduced = unreduced.to(context.device), reduced.to(context.device)
    dataset = ImageListDataset(files, labels, transform)
    passes = {}
    try:
        for mode in modes:
            pair = (unreduced, reduced) if mode is None else tuple(compile_model(m, mode) for m in (unreduced, reduced))
            passes[mode] = evaluate_pair(*pair, dataset, batch_size=args.batch_size,
                                         workers=args.workers, limit=args.limit, context=context,
                                         progress=not args.no_progress, dtype=dtype,
                                         desc="eval" if mode is None else f"eval (compiled, {mode})")
    finally:
        close_distributed(context)
    result = passes[None]
    if not context.is_main:
        return 0
    img_size = config["input_size"][1:]
    report = tr.flops(reduced, tuple(img_size))
    prep = {k: config[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
            if k in config}
    print(f"model {args.model}, method {_common.describe_method(name, options)}, "
          f"{report.total_gmacs:.4g} GMACs (unreduced {report.baseline_gmacs:.4g})")
    print("preprocessing: " + ", ".join(f"{k}={v}" for k, v in prep.items()))
    print(f"images {result['images']} (labelled {result['labelled']}), broken {result['broken']}, "
          f"processes {result['world_size']}")
    for path in result["broken_files"]:
        print(f"broken image skipped: {path}")

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}%"

    print(f"top-1 {fmt(result['top1'])} (unreduced {fmt(result['top1_unreduced'])}), "
          f"top-5 {fmt(result['top5'])} (unreduced {fmt(result['top5_unreduced'])})")
    kl = result["kl_unreduced_to_reduced"]
    print(f"agreement {fmt(result['agreement'])}, mean KL(unreduced || reduced) "
          f"{'n/a' if kl is None else f'{kl:.4f}'} nats")
    print(f"device {context.device}, {args.dtype}; eager pass {result['seconds']:.1f}s")
    compiled = passes.get(modes[-1]) if modes[-1] is not None else None
    if compiled is not None:
        print(f"compiled ({modes[-1]}): top-1 {fmt(compiled['top1'])} (unreduced {fmt(compiled['top1_unreduced'])}), "
              f"agreement {fmt(compiled['agreement'])}; pass {compiled['seconds']:.1f}s, of which the first batch "
              f"(compilation) {compiled['first_batch_s'] or 0:.1f}s")
    _common.write_json(args.json, {
        "command": "eval", "model": args.model, "checkpoint": args.checkpoint, "data": args.data,
        "labels": args.labels, "limit": args.limit, "method": name, "options": options,
        "preprocessing": prep, "gmacs": report.total_gmacs, "baseline_gmacs": report.baseline_gmacs,
        "device": str(context.device), "dtype": args.dtype, **result,
        "compiled": None if compiled is None else {"mode": modes[-1], **compiled},
    })
    return 0
