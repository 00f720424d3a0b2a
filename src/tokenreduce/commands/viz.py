"""``tokenreduce viz``: a picture of the tokens each chosen block kept, merged, pruned or propagated.

    tokenreduce viz --model demo --method tome --r 13 --image photo.jpg --out tome.png --blocks 3,6,9,11
"""

from __future__ import annotations

import argparse

from ..core.errors import InputError
from . import _common

NAME = "viz"
HELP = "Draw which tokens each chosen block kept, merged (one colour per group), pruned or propagated."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_model_arguments(parser)
    _common.add_method_arguments(parser)
    parser.add_argument("--image", required=True, help="an image file")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--blocks", default=None, help="blocks to draw, e.g. 3,6,9 (default: four spread blocks)")
    parser.add_argument("--crop-pct", type=float, default=None, help="override the model's crop_pct")
    _common.add_device_arguments(parser)
    _common.add_json_argument(parser)


def default_blocks(depth: int) -> list[int]:
    return sorted({max(0, depth // 4), depth // 2, (3 * depth) // 4, depth - 1})


def load_image(prep, path: str, crop_pct: float | None = None):
    """(normalised 1 x 3 x H x W tensor, the same crop as H x W x 3 floats in [0, 1]) preprocessed as ``prep`` (the
    model's ``tokenreduce.load`` preprocessing) says."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    overrides = {"crop_pct": crop_pct} if crop_pct is not None else {}
    config = prep.data_config(**overrides)
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"cannot read image {path!r}: {err}") from err
    tensor = prep.transform(**overrides)(rgb).unsqueeze(0)
    mean = np.array(config["mean"]).reshape(3, 1, 1)
    std = np.array(config["std"]).reshape(3, 1, 1)
    picture = (tensor[0].numpy() * std + mean).transpose(1, 2, 0).clip(0, 1)
    return tensor, picture


def draw(model, prep, name: str | None, options: dict, image_path: str, out: str, blocks: list[int] | None,
         crop_pct: float | None = None, title: str | None = None, device="cpu", dtype=None) -> dict:
    """Trace ``model`` (patched as ``name``/``options``) on one image preprocessed as ``prep`` says, on ``device``
    (autocast to ``dtype`` below float32), and write the picture; returns counts."""
    import torch

    import tokenreduce as tr

    from ..measure.speed import autocast
    from ..measure.viz import draw_token_panels

    depth = len(tr.flops(model).blocks)
    blocks = default_blocks(depth) if blocks is None else blocks
    for block in blocks:
        if not 0 <= block < depth:
            raise InputError(f"--blocks: block {block} is outside the model's blocks 0..{depth - 1}")
    images, picture = load_image(prep, image_path, crop_pct)
    _common.patch_model(model, name, options)
    model.to(device)
    with torch.inference_mode(), autocast(device, dtype or torch.float32):
        states = tr.trace(model, images.to(device))
    owners = [states[b].owner[0].cpu() for b in blocks]
    grid = tuple(states[0].grid)
    report = tr.flops(model)
    title = title or (f"{_common.describe_method(name, options)}: {report.total_gmacs:.2f} GMACs "
                      f"(unreduced {report.baseline_gmacs:.2f})")
    counts = draw_token_panels(picture, owners, blocks, grid, out, title=title)
    return {"blocks": blocks, "counts": counts, "gmacs": report.total_gmacs, "baseline_gmacs": report.baseline_gmacs}


def run(args: argparse.Namespace) -> int:
    name, options = _common.method_options(args)
    if name == _common.STVIT:
        raise InputError("viz draws where each patch went; STViT replaces the image tokens by semantic tokens, "
                         "so there is no per-patch picture to draw")
    blocks = _common.parse_ints(args.blocks, "--blocks")
    device, dtype = _common.resolve_device(args.device), _common.resolve_dtype(args.dtype)
    model, prep = _common.build_model(args)
    result = draw(model, prep, name, options, args.image, args.out, blocks, args.crop_pct, device=device,
                  dtype=dtype)
    for block, counts in result["counts"].items():
        print(f"block {block}: {counts['tokens']} tokens = {counts['kept']} kept + {counts['groups']} groups "
              f"({counts['grouped_patches']} patches), {counts['pruned']} patches pruned")
    print(f"wrote {args.out}")
    _common.write_json(args.json, {"command": "viz", "model": args.model, "method": name, "options": options,
                                   "device": str(device), "dtype": args.dtype, "image": args.image, "out": args.out,
                                   **result})
    return 0
