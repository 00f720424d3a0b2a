"""``tokenreduce export``: a reduced model as an ONNX graph (checked in ONNX Runtime against PyTorch) or an
OpenVINO IR (checked in OpenVINO), float32 or int8.

    tokenreduce export --model deit_small_patch16_224 --method tome --r 13 --out deit_s_tome.onnx
    tokenreduce export --model demo --method ppt --r 50 --layers 3,6,9 --out ppt.onnx --images photos/
    tokenreduce export --method stvit --stvit-checkpoint runs/stvit/last.pth --out stvit.onnx --batch-size 32
    tokenreduce export --model demo --method tome --r 13 --int8 static --calibration photos/ --out tome8.onnx
    tokenreduce export --model demo --method gtp --r 13 --format openvino --out gtp.xml

The image size is fixed in the graph (the model's own, or ``--img-size``); the batch axis is dynamic unless
``--batch-size`` fixes it. The check runs ``--check-count`` images (from ``--images``, preprocessed as the model
expects, else random) through the runtime and PyTorch; a difference above ``--atol`` writes nothing.

``--int8`` (``dynamic``, the default, or ``static``, calibrated on ``--calibration DIR``) quantizes the matrix
products with ONNX Runtime in the ``--int8-recipe`` (``smooth``, the default: SmoothQuant's rewrite, then the linear
layers with one scale per output channel, an MLP's second layer in float; ``per-channel``; ``per-tensor``: every
product, the fastest, least accurate) and writes the graph only if its outputs' mean cosine against the float model
stays at least ``--min-cosine``. ``--format openvino`` writes ``.xml`` + ``.bin``, converted from the checked ONNX graph
(``--source onnx``, the default) or traced from PyTorch (``--source torch``).
"""

from __future__ import annotations

import argparse

from ..core.errors import InputError
from . import _common

NAME = "export"
#: tokenreduce.export.INT8_RECIPES's names, default first (not imported here: the parser is built without torch).
INT8_RECIPE_NAMES = ("smooth", "per-channel", "per-tensor")
HELP = ("Export a reduced model to ONNX or OpenVINO (float32 or int8, dynamic batch axis) and check it against "
        "PyTorch.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_model_arguments(parser)
    _common.add_method_arguments(parser, required=False)
    parser.add_argument("--out", required=True, help="the file to write: .onnx, or .xml for --format openvino")
    parser.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                        help="onnx (default) or openvino (IR .xml + .bin; needs the [openvino] extra)")
    parser.add_argument("--source", choices=("onnx", "torch"), default=None,
                        help="--format openvino: convert the checked ONNX graph (default) or trace PyTorch")
    parser.add_argument("--int8", nargs="?", const="dynamic", choices=("dynamic", "static"), default=None,
                        help="quantize the matrix products to int8: dynamic (default when given alone) or static")
    parser.add_argument("--int8-recipe", choices=INT8_RECIPE_NAMES, default=None,
                        help="--int8: smooth (default: SmoothQuant, linear layers per channel, MLP outputs float), "
                             "per-channel (linear layers) or per-tensor (every matrix product)")
    parser.add_argument("--calibration", default=None, metavar="DIR",
                        help="--int8 static, or the smooth recipe's ranges: photos to calibrate on (default: the "
                             "check images)")
    parser.add_argument("--calibration-count", type=int, default=64,
                        help="photos of --calibration used (default 64)")
    parser.add_argument("--min-cosine", type=float, default=0.99,
                        help="--int8: least mean cosine of the outputs against the float model (default 0.99)")
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
    from ..export import DEFAULT_INT8_RECIPE, DEFAULT_OPSET, EXTRA, INT8_RECIPES, default_img_size

    if args.format == "openvino":
        require("openvino", "openvino")
    for module in ("onnx", "onnxscript") + (() if args.no_check and not args.int8 else ("onnxruntime",)):
        if args.format == "onnx" or args.source != "torch":
            require(module, EXTRA)  # before building anything
    name, options = _common.method_options(args)
    for flag, value in (("--img-size", args.img_size), ("--batch-size", args.batch_size),
                        ("--check-count", args.check_count), ("--opset", args.opset),
                        ("--calibration-count", args.calibration_count)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be positive, got {value}")
    recipe = args.int8_recipe or DEFAULT_INT8_RECIPE
    if args.calibration and not (args.int8 == "static" or (args.int8 and INT8_RECIPES[recipe][3] is not None)):
        raise InputError("--calibration goes with --int8 static or the smooth recipe")
    if args.int8_recipe and not args.int8:
        raise InputError("--int8-recipe goes with --int8")
    if args.int8 and args.no_check:
        raise InputError("an int8 export is always checked against the float model; drop --no-check")
    if args.source is not None and args.format != "openvino":
        raise InputError("--source goes with --format openvino")
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
    calibration = None
    if args.calibration:
        calibration = check_batch(prep, args.calibration, args.calibration_count, size)
    common = dict(img_size=size, batch_size=args.batch_size, images=images, check=not args.no_check,
                  atol=args.atol, predict=predict, int8=args.int8, calibration=calibration,
                  min_cosine=args.min_cosine, int8_recipe=recipe)
    if args.format == "openvino":
        result = tr.export_openvino(model, args.out, source=args.source or "onnx", **common)
        kind, runtime, tail = "OpenVINO IR", "OpenVINO", ""
    else:
        result = tr.export_onnx(model, args.out, opset=args.opset or DEFAULT_OPSET, **common)
        kind, runtime, tail = "ONNX", "onnxruntime", f", opset {result.opset}"
    batch = "dynamic" if result.batch_size is None else str(result.batch_size)
    details = [f"int8 {args.int8} {recipe}"] if args.int8 else []
    if args.format == "openvino":
        details.append(f"from {result.source}")
    label = f" ({', '.join([kind, *details])})" if details or args.format != "onnx" else ""
    print(f"wrote {result.path}{label}: {_common.describe_method(name, options)} at {size[0]}x{size[1]}, "
          f"batch {batch}{tail}")
    source = f"{images.shape[0]} images of {args.images}" if args.images else "random images"
    if result.max_abs_diff is not None:
        print(f"{runtime} vs PyTorch on {source} (batches {list(result.checked_batches)}): largest difference "
              f"{result.max_abs_diff:.3g} (atol {args.atol:g})")
    if result.cosine is not None:
        print(f"int8 vs float PyTorch on {source}: mean output cosine {result.cosine:.4f} (min {args.min_cosine:g}), "
              f"top-1 agreement {result.agreement:.3f}")
    _common.write_json(args.json, {"command": "export", "model": args.model, "method": name, "options": options,
                                   "format": args.format, "images": args.images,
                                   "calibration": args.calibration, **vars(result)})
    return 0
