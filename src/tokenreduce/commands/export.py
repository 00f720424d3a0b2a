"""``tokenreduce export``: a reduced model as an ONNX graph, checked in ONNX Runtime against PyTorch.

    tokenreduce export --model deit_small_patch16_224 --method tome --r 13 --out deit_s_tome.onnx
    tokenreduce export --model demo --method ppt --r 50 --layers 3,6,9 --out ppt.onnx --images photos/
    tokenreduce export --method stvit --stvit-checkpoint runs/stvit/last.pth --out stvit.onnx --batch-size 32

The image size is fixed in the graph (the model's own, or ``--img-size``); the batch axis is dynamic unless
``--batch-size`` fixes it. The check runs ``--check-count`` images (from ``--images``, preprocessed as the model
expects, else random) through ONNX Runtime and PyTorch; a difference above ``--atol`` writes nothing.
"""

from __future__ import annotations

import argparse

from ..core.errors import InputError
from . import _common

NAME = "export"
HELP = "Export a reduced model to ONNX (dynamic batch axis) and check it in ONNX Runtime against PyTorch."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_model_arguments(parser)
    _common.add_method_arguments(parser, required=False)
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input side in pixels, fixed in the graph (default: the model's; timm models are "
                             "built at this size)")
    parser.add_argument("--batch-size", type=int, default=None, help="fix the batch size (default: dynamic)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="photos for the check (an image folder or ImageFolder tree); default random images")
    parser.add_argument("--check-count", type=int, default=8, help="images in the check batch (default 8)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest difference allowed (default 1e-4)")
    parser.add_argument("--no-check", action="store_true", help="write the graph without running it")
    _common.add_json_argument(parser)


def check_batch(prep, data_dir: str, count: int, img_size: tuple[int, int]):
    """The first ``count`` images of ``data_dir`` (sorted), preprocessed as ``prep`` (the model's
    ``tokenreduce.load`` preprocessing) says at ``img_size``, as one ``count x 3 x H x W`` tensor."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from ..measure.data import image_list

    files = image_list(data_dir)[0][:count]
    if not files:
        raise InputError(f"--images {data_dir!r} holds no images")
    transform = prep.transform(input_size=(3, *img_size))
    batch = []
    for file in files:
        try:
            with Image.open(file) as image:
                batch.append(transform(image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as err:
            raise InputError(f"cannot read image {str(file)!r}: {err}") from err
    return torch.stack(batch)


def run(args: argparse.Namespace) -> int:
    import torch

    import tokenreduce as tr

    from ..adapters import predictor
    from ..api import unwrap
    from ..core.errors import require
    from ..export import DEFAULT_OPSET, EXTRA, default_img_size

    for module in ("onnx", "onnxscript") + (() if args.no_check else ("onnxruntime",)):
        require(module, EXTRA)  # before building anything
    name, options = _common.method_options(args)
    for flag, value in (("--img-size", args.img_size), ("--batch-size", args.batch_size),
                        ("--check-count", args.check_count), ("--opset", args.opset)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be positive, got {value}")
    loaded, prep = _common.build_model(args, **({"img_size": args.img_size} if args.img_size else {}))
    predict = predictor(loaded)
    model = _common.patch_model(loaded, name, options)
    size = (args.img_size, args.img_size) if args.img_size else default_img_size(unwrap(model))
    images = None
    if not args.no_check:
        count = args.batch_size or args.check_count
        if args.images:
            images = check_batch(prep, args.images, count, size)
            if images.shape[0] != count:
                raise InputError(f"--images {args.images!r} holds {images.shape[0]} images; the fixed --batch-size "
                                 f"{count} needs as many")
        else:
            images = torch.randn(count, 3, *size, generator=torch.Generator().manual_seed(0))
    result = tr.export_onnx(model, args.out, img_size=size, batch_size=args.batch_size,
                            opset=args.opset or DEFAULT_OPSET, images=images, check=not args.no_check,
                            atol=args.atol, predict=predict)
    batch = "dynamic" if result.batch_size is None else str(result.batch_size)
    print(f"wrote {result.path}: {_common.describe_method(name, options)} at {size[0]}x{size[1]}, batch {batch}, "
          f"opset {result.opset}")
    if result.max_abs_diff is not None:
        source = f"{images.shape[0]} images of {args.images}" if args.images else "random images"
        print(f"onnxruntime vs PyTorch on {source} (batches {list(result.checked_batches)}): largest difference "
              f"{result.max_abs_diff:.3g} (atol {args.atol:g})")
    _common.write_json(args.json, {"command": "export", "model": args.model, "method": name, "options": options,
                                   "images": args.images, **vars(result)})
    return 0
