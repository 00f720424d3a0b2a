"""int8 as users export it: ``tr.export_onnx(int8=..., int8_recipe=...)`` on the benchmark classifier, unreduced and
every training-free method at about 65% of the unreduced GMACs, run in ONNX Runtime: top-1 in float32 and int8 and
the speed of int8 plus reduction against float32 unreduced, measured side by side.

    python benchmarks/int8_export.py                       # the 2,000 frontier images -> results/int8_export.json
    python benchmarks/int8_export.py --images 1000         # the first 1,000 (100 per class)
    python benchmarks/int8_export.py --table               # the markdown table of the JSON (no run)
    python benchmarks/int8_export.py --split heldout --recipes smooth --batch-sizes ""
                                                           # 2,000 other images, no timing -> int8_export_heldout.json
    python benchmarks/int8_export.py --pooled benchmarks/results/int8_export.json \\
        benchmarks/results/int8_export_heldout.json        # each setting's int8 change over both samples (no run)
    python benchmarks/int8_export.py --model-kwargs "depth=2,embed_dim=48,num_heads=2,img_size=28" --images 8 \\
        --rounds 1 --out /tmp/e.json                      # a test size (random weights)

Per setting (unreduced, then each method at ``--level`` x the unreduced GMACs, ``tr.schedule_for_flops``): the
float32 graph and one int8 graph per ``--recipes`` entry (``--mode``, default dynamic; SmoothQuant's ranges and the
static calibration from ``--calibration`` CIFAR-10 *training* images, never the evaluated ones), each made by
``tr.export_onnx`` exactly as a user's call makes it (checked against PyTorch before it is written). Accuracy: top-1
on the first ``--images`` frontier images (``deploy.cifar_images``: class by class in turn), agreement with the
same setting's float32 graph, and the images int8 fixed and broke against it with the exact McNemar p-value of
that split (``paired.py``: is the top-1 change more than int8's own flips in both directions?). ``--split heldout``
measures the same on other images: CIFAR-10 training images after the calibration and check images (which the
export reads), class by class in turn; a second sample of the same int8 change, to tell a real shift from the
noise of one sample of 2,000; ``--pooled`` adds up the images int8 fixed and broke in several such JSONs (each
on its own images) into one change per setting. Speed
(measurement.md): per batch size, every graph timed interleaved in one process (``deploy.time_group``: warm-up,
``--rounds`` rounds, order rotated), the paired median ratio against the unreduced float32 graph (int8 + reduction
combined) and against the same recipe's unreduced int8 graph (reduction alone).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from deploy import (
    FRONTIER_PER_CLASS,
    build_model,
    cifar_images,
    cpu_name,
    ort_runner,
    paired_ratio,
    parse_kwargs,
    predict,
    settings_for,
    time_group,
    training_free_methods,
)
from paired import paired_change, split_of
from tqdm import tqdm

import tokenreduce as tr
from tokenreduce.measure.speed import environment

DEFAULT_OUT = Path(__file__).parent / "results" / "int8_export.json"
#: --split heldout without --out writes here.
HELDOUT_OUT = Path(__file__).parent / "results" / "int8_export_heldout.json"
#: CIFAR-10 training images the export reads: the check images follow the calibration images.
CHECK_IMAGES = 8


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, description, _ = build_model("classifier", parse_kwargs(args.model_kwargs))
    size = model.patch_embed.img_size
    if args.split == "frontier":
        images, labels, folder = cifar_images("test", args.images, size, per_class_limit=FRONTIER_PER_CLASS)
    else:  # training images the export never reads: after the calibration and check images
        images, labels, folder = cifar_images("train", args.images, size, skip=args.calibration + CHECK_IMAGES)
    calibration, _, _ = cifar_images("train", args.calibration, size)
    check = cifar_images("train", CHECK_IMAGES, size, skip=args.calibration)[0]
    settings, failed = settings_for(model, args.methods, args.level)
    base_gmacs = tr.flops(model).total_gmacs
    rows, runners = [], {}
    with tempfile.TemporaryDirectory(prefix="int8-export-") as folder_out:
        for label, setting in tqdm(settings.items(), desc="settings"):
            variant = copy.deepcopy(model) if setting is None else tr.patch(copy.deepcopy(model), setting[0],
                                                                              **setting[1])
            row: dict[str, Any] = {"setting": label, "options": None if setting is None else setting[1],
                                   "gmacs_ratio": tr.flops(variant).total_gmacs / base_gmacs}
            graphs = {"float32": None, **{recipe: recipe for recipe in args.recipes}}
            predictions = {}
            for precision, recipe in graphs.items():
                path = Path(folder_out) / f"{label}-{precision}.onnx"
                t0 = time.perf_counter()
                result = tr.export_onnx(variant, path, images=check, calibration=calibration,
                                        int8=None if recipe is None else args.mode,
                                        **({} if recipe is None else {"int8_recipe": recipe, "min_cosine": 0.9}))
                runners[(label, precision)] = ort_runner(path, args.threads)
                predictions[precision] = predict(runners[(label, precision)], images, args.batch_size).argmax(1)
                row[precision] = {
                    "top1": 100 * float((predictions[precision] == labels.numpy()).mean()),
                    "agreement_with_float32": 100 * float((predictions[precision] == predictions["float32"]).mean()),
                    "export_s": time.perf_counter() - t0, "check_cosine": result.cosine,
                    "max_abs_diff_float_graph": result.max_abs_diff}
                if recipe is not None:
                    row[precision]["top1_delta"] = row[precision]["top1"] - row["float32"]["top1"]
                    row[precision].update(paired_change(predictions["float32"], predictions[precision],
                                                        labels.numpy()))
            rows.append(row)
        speed = {}
        for batch_size in args.batch_sizes:
            batch = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(0)).numpy()
            named = {f"{label} {precision}": run for (label, precision), run in runners.items()}
            with tqdm(total=args.rounds, desc=f"timing batch {batch_size}") as bar:
                timing = time_group(named, batch, args.rounds, args.warmup, args.min_time, bar)
            base = timing["unreduced float32"]
            speed[str(batch_size)] = {
                name: {"images_per_s": t["images_per_s"], "speedup_vs_float32_unreduced": paired_ratio(t, base),
                       "speedup_vs_same_precision_unreduced": paired_ratio(
                           t, timing[f"unreduced {name.split(' ', 1)[1]}"])}
                for name, t in timing.items()}
    for row in rows:
        row["speed"] = {b: {p: speed[b][f"{row['setting']} {p}"] for p in ("float32", *args.recipes)}
                        for b in speed}
    return {"command": "python benchmarks/int8_export.py " + " ".join(sys.argv[1:]), "model": description,
            "images": len(images), "split": args.split, "image_folder": folder,
            "calibration": f"the first {args.calibration} CIFAR-10 "
            "train images (class by class)", "mode": args.mode, "recipes": args.recipes, "level": args.level,
            "rows": rows, "failed": failed,
            "environment": {**environment(), "cpu": cpu_name(), "threads": args.threads,
                            "python": platform.python_version(),
                            "onnxruntime": __import__("onnxruntime").__version__},
            "run_s": time.perf_counter() - started}


def table(result: dict[str, Any]) -> str:
    recipes = result["recipes"]
    head = " | ".join(f"{r}: top-1 (change, McNemar p; agreement)" for r in recipes)
    speed_head = "".join(f" b{b} fp32 / {' / '.join(recipes)} |" for b in result["rows"][0]["speed"])
    lines = [f"| setting | GMACs | float32 top-1 | {head} |{speed_head}",
             "|---|---:|---:|" + "---:|" * (len(recipes) + len(result["rows"][0]["speed"]))]
    for row in result["rows"]:
        cells = [f"{row[r]['top1']:.1f} ({row[r]['top1_delta']:+.1f}, p {row[r]['mcnemar_p']:.2f}; "
                 f"{row[r]['agreement_with_float32']:.1f})" for r in recipes]
        speeds = [" / ".join(f"{row['speed'][b][p]['speedup_vs_float32_unreduced']:.2f}x"
                             for p in ("float32", *recipes)) for b in row["speed"]]
        lines.append(f"| {row['setting']} | {row['gmacs_ratio']:.0%} | {row['float32']['top1']:.1f} | "
                     f"{' | '.join(cells)} |" + "".join(f" {cell} |" for cell in speeds))
    return "\n".join(lines)


def pooled(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each setting's int8 change per recipe over several runs on different images (their splits must differ):
    ``{setting: {recipe: {"images", "fixed", "broken", "top1_delta", "top1_delta_se", "mcnemar_p"}}}``, the fixed
    and broken images added up, the change in points of all the images, the exact McNemar p of the summed split."""
    splits = [result.get("split", "frontier") for result in results]  # runs before --split: the frontier
    if len(set(splits)) != len(splits):
        raise SystemExit(f"--pooled needs runs on different images; the splits are {splits}")
    recipes = [r for r in results[0]["recipes"] if all(r in result["recipes"] for result in results)]
    images = sum(result["images"] for result in results)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in results[0]["rows"]:
        matching = setting_rows(results, row["setting"])
        if None in matching:
            continue
        out[row["setting"]] = {}
        for recipe in recipes:
            fixed = sum(other[recipe]["fixed"] for other in matching)
            broken = sum(other[recipe]["broken"] for other in matching)
            out[row["setting"]][recipe] = {"images": images, "top1_delta": 100 * (fixed - broken) / images,
                                           **split_of(fixed, broken, images)}
    return out


def setting_rows(results: list[dict[str, Any]], setting: str) -> list[dict[str, Any] | None]:
    """The row of ``setting`` in each run (None where a run has none)."""
    return [next((row for row in result["rows"] if row["setting"] == setting), None) for result in results]


def pooled_table(results: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`pooled`: per setting and recipe, the change in each run and over all of them."""
    summed = pooled(results)
    recipes = list(next(iter(summed.values()), {}))
    splits = " + ".join(f"{result.get('split', 'frontier')} ({result['images']:,})" for result in results)
    lines = ["| setting | " + " | ".join(f"{r}: change per run | {r}: {splits}: change (fixed / broken, p)"
                                            for r in recipes) + " |",
             "|---|" + "---:|" * (2 * len(recipes))]
    for setting, by_recipe in summed.items():
        cells = []
        for recipe, total in by_recipe.items():
            each = [row[recipe]["top1_delta"] for row in setting_rows(results, setting)]
            cells += [" / ".join(f"{delta:+.2f}" for delta in each),
                      f"{total['top1_delta']:+.2f} ({total['fixed']} / {total['broken']}, p {total['mcnemar_p']:.2f})"]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="first N images of --split (frontier: 2,000 = all)")
    parser.add_argument("--split", choices=("frontier", "heldout"), default="frontier",
                        help="frontier: the CIFAR-10 test images of the frontier; heldout: CIFAR-10 training "
                             "images the export does not read")
    parser.add_argument("--calibration", type=int, default=64, help="CIFAR-10 train images for the ranges")
    parser.add_argument("--recipes", default="smooth,per-tensor",
                        help=f"comma-separated int8 recipes (of {', '.join(tr.export.INT8_RECIPES)})")
    parser.add_argument("--mode", choices=tr.export.INT8_MODES, default="dynamic")
    parser.add_argument("--methods", default=",".join(training_free_methods()),
                        help="comma-separated methods (default: every training-free one)")
    parser.add_argument("--level", type=float, default=0.65, help="methods at this share of the unreduced GMACs")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the accuracy runs")
    parser.add_argument("--batch-sizes", default="1,32", help='timed batch sizes ("": accuracy only)')
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timing (several calls at batch 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-kwargs", default=None, help="tests: the classifier's architecture, random weights")
    parser.add_argument("--out", default=None, help="default: results/int8_export.json, "
                        "results/int8_export_heldout.json for --split heldout")
    parser.add_argument("--table", action="store_true", help="print the table of --out (no run)")
    parser.add_argument("--pooled", nargs="+", metavar="JSON", default=None,
                        help="print each setting's int8 change over these runs' images together (no run)")
    args = parser.parse_args(argv)
    if args.pooled:
        print(pooled_table([json.loads(Path(path).read_text()) for path in args.pooled]))
        return 0
    out = Path(args.out) if args.out else HELDOUT_OUT if args.split == "heldout" else DEFAULT_OUT
    if args.table:
        print(table(json.loads(out.read_text())))
        return 0
    args.recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in args.recipes if r not in tr.export.INT8_RECIPES]
    if unknown or not args.recipes:
        parser.error(f"unknown --recipes {unknown}; valid: {', '.join(tr.export.INT8_RECIPES)}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - set(training_free_methods()):
        parser.error(f"unknown --methods {sorted(set(args.methods) - set(training_free_methods()))}; valid: "
                     f"{', '.join(training_free_methods())}")
    if args.images < 1 or args.calibration < 1 or args.rounds < 1 or min(args.batch_sizes, default=1) < 1:
        parser.error("--images, --calibration, --rounds and --batch-sizes must be at least 1")
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
