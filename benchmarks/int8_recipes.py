"""Is it int8 or the token reduction? int8 recipes on the benchmark classifier, unreduced and reduced.

``deploy.py`` found that every runtime's int8 loses 6-8.5 top-1 points on the classifier (real DINOv2 ViT-S/14 +
CIFAR-10 head) *before* any token reduction, so the methods cannot be judged on int8 there. This script asks
whether a better recipe fixes the unreduced model first, and then what the best recipe gives each method:

    python benchmarks/int8_recipes.py                    # 200 frontier images -> results/int8_recipes.json
    python benchmarks/int8_recipes.py --images 2000      # the whole frontier set
    python benchmarks/int8_recipes.py --model-kwargs "depth=2,embed_dim=48,num_heads=2,img_size=28" --images 8 \\
        --out /tmp/r.json                               # a test size (random weights)

Recipes (PyTorch eager, ``torch.ao.quantization.quantize_dynamic`` of ``nn.Linear``, int8 weights, activations
quantized per call, fbgemm), each on the unreduced model:

- ``per-tensor``: what ``deploy.py``'s eager int8 runs (one weight scale per layer);
- ``per-channel``: one weight scale per output channel;
- ``... fc2 float`` / ``... fc2 + head float``: the MLPs' second layer (its input, after GELU, has the widest
  range) and the classifier head kept in float32;
- ``SmoothQuant a``: Xiao et al. 2023, ``tokenreduce.smoothquant.smooth_quant`` (what ``tr.export_onnx``'s
  ``"smooth"`` recipe runs): per input channel ``s = max|x|^a / max|w|^(1-a)`` (maxima over ``--calibration``
  CIFAR-10 *training* images), the activation divided by ``s`` and the weight multiplied by it, an exact rewrite
  in float: folded into ``norm1`` -> ``qkv``, ``norm2`` -> ``fc1`` and (not for PPT, which ranks by the values'
  norms) the values -> ``proj`` (``fc2``'s input follows GELU, so nothing can be folded there);
- ``only <layer>``: only that kind of layer quantized (per-channel): where the loss comes from.

Then every training-free method at ``--level`` x the unreduced GMACs (``tr.schedule_for_flops``), in float32, in
``per-tensor`` int8 and in the recipe that kept the unreduced model closest to float32 (highest agreement, then
cosine). Reported per row: top-1, agreement with the same setting's float32 prediction and with the unreduced
float32 prediction, mean logit cosine against the same setting's float32, and int8 top-1 minus float32 top-1.
Images: the first ``--images`` of the frontier set (``deploy.cifar_images``: class by class in turn).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from deploy import (
    FRONTIER_PER_CLASS,
    build_model,
    cifar_images,
    int8_eager,
    parse_kwargs,
    settings_for,
    training_free_methods,
)
from tqdm import tqdm

import tokenreduce as tr
from tokenreduce.export import reads_value_norms
from tokenreduce.measure.speed import environment
from tokenreduce.smoothquant import smooth_quant

DEFAULT_OUT = Path(__file__).parent / "results" / "int8_recipes.json"
LAYER_KINDS = ("qkv", "proj", "fc1", "fc2", "head")


def linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def quantize(model: torch.nn.Module, float_layers: tuple[str, ...] = (), only: str | None = None) -> torch.nn.Module:
    """A dynamically quantized copy with one weight scale per output channel: every ``nn.Linear`` except those
    whose name ends with one of ``float_layers`` (or, with ``only``, just those ending with it). The per-tensor
    recipe is ``deploy.int8_eager``, what the serving table runs."""
    chosen = {name: torch.ao.quantization.per_channel_dynamic_qconfig for name in linear_names(model)
              if (name.endswith(only) if only else not name.endswith(float_layers or ("\0",)))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (-> torchao)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), chosen, dtype=torch.qint8)


def recipes(model: torch.nn.Module, calibration: torch.Tensor) -> dict[str, Any]:
    """name -> a function making the int8 model of ``model`` (unreduced or patched) in that recipe."""
    smoothed = {alpha: (lambda m, alpha=alpha: smooth_quant(m, calibration, alpha, values=not reads_value_norms(m)))
                for alpha in (0.5, 0.7)}
    out: dict[str, Any] = {
        "per-tensor": int8_eager,
        "per-channel": quantize,
        "per-channel, fc2 float": lambda m: quantize(m, ("fc2",)),
        "per-channel, fc2 + head float": lambda m: quantize(m, ("fc2", "head")),
        "SmoothQuant 0.5, per-channel": lambda m: quantize(smoothed[0.5](m)),
        "SmoothQuant 0.7, per-channel": lambda m: quantize(smoothed[0.7](m)),
        "SmoothQuant 0.7, per-channel, fc2 float": lambda m: quantize(smoothed[0.7](m), ("fc2",)),
    }
    for kind in LAYER_KINDS:
        out[f"only {kind}"] = lambda m, kind=kind: quantize(m, only=kind)
    return out


@torch.inference_mode()
def logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int, desc: str) -> torch.Tensor:
    chunks = list(images.split(batch_size))
    return torch.cat([model(chunk) for chunk in tqdm(chunks, desc=desc, leave=False)])


def scores(out: torch.Tensor, labels: torch.Tensor, own_float: torch.Tensor, unreduced_float: torch.Tensor
           ) -> dict[str, float]:
    predicted = out.argmax(1)
    return {"top1": 100 * (predicted == labels).float().mean().item(),
            "agreement_with_float32": 100 * (predicted == own_float.argmax(1)).float().mean().item(),
            "agreement_with_unreduced_float32": 100 * (predicted == unreduced_float.argmax(1)).float().mean().item(),
            "cosine_with_float32": torch.nn.functional.cosine_similarity(out, own_float, dim=1).mean().item()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, description, _ = build_model("classifier", parse_kwargs(args.model_kwargs))
    size = model.patch_embed.img_size
    images, labels, folder = cifar_images("test", args.images, size, per_class_limit=FRONTIER_PER_CLASS)
    calibration, _, _ = cifar_images("train", args.calibration, size)
    float_out = logits(model, images, args.batch_size, "unreduced float32")
    base = {"top1": 100 * (float_out.argmax(1) == labels).float().mean().item()}
    makers = recipes(model, calibration)
    rows = []
    for name, make in tqdm(makers.items(), desc="recipes (unreduced)"):
        out = logits(make(model), images, args.batch_size, name)
        rows.append({"setting": "unreduced", "recipe": name, **scores(out, labels, float_out, float_out)})
        rows[-1]["top1_delta"] = rows[-1]["top1"] - base["top1"]
    whole = [r for r in rows if not r["recipe"].startswith("only ")]
    best = max(whole, key=lambda r: (r["agreement_with_float32"], r["cosine_with_float32"]))["recipe"]
    settings, failed = settings_for(model, training_free_methods(), args.level)
    base_gmacs = tr.flops(model).total_gmacs
    methods = []
    for label, setting in settings.items():
        if setting is None:
            continue
        method, options = setting
        patched = tr.patch(copy.deepcopy(model), method, **options)
        own_float = logits(patched, images, args.batch_size, f"{label} float32")
        entry = {"setting": label, "method": method, "options": options,
                 "gmacs_ratio": tr.flops(patched).total_gmacs / base_gmacs,
                 "float32": scores(own_float, labels, own_float, float_out)}
        for recipe in dict.fromkeys(("per-tensor", best)):
            out = logits(makers[recipe](patched), images, args.batch_size, f"{label} {recipe}")
            entry[recipe] = scores(out, labels, own_float, float_out)
            entry[recipe]["top1_delta"] = entry[recipe]["top1"] - entry["float32"]["top1"]
        methods.append(entry)
    return {"command": "python benchmarks/int8_recipes.py " + " ".join(sys.argv[1:]),
            "model": description, "images": len(images), "image_folder": folder,
            "calibration": f"the first {args.calibration} CIFAR-10 train images (class by class)",
            "level": args.level, "unreduced_float32": base, "recipes": rows, "best_recipe": best,
            "methods": methods, "failed": failed,
            "environment": {**environment(), "threads": args.threads, "python": platform.python_version(),
                            "quantized_engine": torch.backends.quantized.engine},
            "run_s": time.perf_counter() - started}


def table(result: dict[str, Any]) -> str:
    lines = [f"Unreduced, {result['images']} images (float32 top-1 {result['unreduced_float32']['top1']:.1f}):", "",
             "| recipe | top-1 | change | agreement with float32 | logit cosine |", "|---|---:|---:|---:|---:|"]
    for r in result["recipes"]:
        lines.append(f"| {r['recipe']} | {r['top1']:.1f} | {r['top1_delta']:+.1f} | {r['agreement_with_float32']:.1f} "
                     f"| {r['cosine_with_float32']:.4f} |")
    best = result["best_recipe"]
    lines += ["", f"Methods at {result['level']:.0%} GMACs: top-1 float32 / int8 per-tensor / int8 {best} "
              "(change; agreement with the method's float32):", "",
              "| method | GMACs | float32 top-1 | per-tensor | best recipe |", "|---|---:|---:|---:|---:|"]
    for m in result["methods"]:
        cells = [f"{m[r]['top1']:.1f} ({m[r]['top1_delta']:+.1f}; {m[r]['agreement_with_float32']:.1f})"
                 for r in ("per-tensor", best)]
        lines.append(f"| {m['setting']} | {m['gmacs_ratio']:.0%} | {m['float32']['top1']:.1f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="first N frontier images (2,000 = all)")
    parser.add_argument("--calibration", type=int, default=64, help="CIFAR-10 train images for SmoothQuant")
    parser.add_argument("--level", type=float, default=0.65, help="methods at this share of the unreduced GMACs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-kwargs", default=None, help="tests: the classifier's architecture, random weights")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--table", action="store_true", help="print the table of --out (no run)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.table:
        print(table(json.loads(out.read_text())))
        return 0
    if args.images < 1 or args.calibration < 1:
        parser.error("--images and --calibration must be at least 1")
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
