"""Speed of every method against the unreduced model on DeiT-S, with the protocol of measurement.md: eager and
``torch.compile`` side by side per batch size, and a sweep of image sizes at a fixed share of tokens removed.

    python benchmarks/speed.py                       # everything: ~45 min on a quiet 2-core CPU (see README)
    python benchmarks/speed.py --skip-sweep --compile off --batch-sizes 1,32   # the eager batch table only
    python benchmarks/speed.py --skip-batch --img-sizes 224,384               # the image-size sweep only
    python benchmarks/speed.py --device cuda --dtype float16                  # on a GPU
    python benchmarks/speed.py --table               # README tables from the committed JSON (no timing)
    python benchmarks/speed.py --plot                # the two plots from the committed JSON (no timing)

Writes ``benchmarks/results/speed.json`` (a run of one part replaces that part and keeps the other),
``speed_sizes.png`` (speed-up against the token count per method, the GMACs ceiling dashed) and
``speed_batch.png`` (share of the ceiling per setting, eager and compiled, per batch size).

**Batch table** (``rows``): every setting of ``SETTINGS`` at 224 px, per batch size, eager and compiled
(``--compile both``); compiled rows are compiled reduced against compiled unreduced. All variants of one group
are timed interleaved in one process on the same input; the result is the median images/s of each and its
ratio to the unreduced model, beside the GMACs ratio (the ceiling), and the first call (the compilation for
compiled rows) apart.

**Image-size sweep** (``sweep``): DeiT-S built with ``dynamic_img_size=True`` at each ``--img-sizes`` (224, 384,
512: 196, 576, 1024 patches), one batch size (``--sweep-batch``), with the share of tokens removed the same at
every size: the per-block counts of ToMe, GTP and PPT (``r``) are scaled with the number of patches
(``r * patches / 196``, rounded), Top-K and EViT keep their ``keep_rate`` (already a share). Each row has the
speed-up, the ceiling, the token count, the mean share of tokens the blocks see (``token_share``: the same at
every size, up to rounding) and the peak memory of one forward pass (reduced and unreduced).

What recompiles under ``torch.compile`` is in the README ("GPU and compile"); here every batch and image size
is compiled afresh with ``dynamic=False`` after ``torch._dynamo.reset()``, so each timing uses a graph
specialised to its shape and no variant reaches dynamo's recompile limit.

Random weights: speed does not depend on the weights, except where a method's choice does (PPT's per-image
policy: on CPU a batch whose images all take one branch runs only that branch; a mixed batch runs both).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import timm
import torch

import tokenreduce as tr
from tokenreduce.commands import _common
from tokenreduce.core.errors import InputError
from tokenreduce.measure.speed import COMPILE_MODES, environment, memory_measure, method_speedups

RESULTS = Path(__file__).parent / "results"
SETTINGS = {
    "unreduced": None,
    "tome r=13": ("tome", {"r": 13}),
    "topk keep=0.7 @3,6,9": ("topk", {"keep_rate": 0.7, "layers": (3, 6, 9)}),
    "evit keep=0.7 @3,6,9": ("evit", {"keep_rate": 0.7, "layers": (3, 6, 9)}),
    "gtp P=8": ("gtp", {"r": 8}),
    "ppt r=50 @3,6,9": ("ppt", {"r": 50, "layers": (3, 6, 9)}),
}
#: Methods whose ``r`` is a count of tokens per block: scaled with the number of patches in the size sweep.
COUNT_OPTIONS = {"tome": "r", "gtp": "r", "ppt": "r"}
BASE_PATCHES = 196  # DeiT-S at 224 px, the size SETTINGS are chosen for


def scaled_settings(settings: dict, patches: int) -> dict:
    """``settings`` with the per-block token counts (``COUNT_OPTIONS``) scaled from 196 patches to ``patches``,
    so that the share of tokens removed stays the same; shares (``keep_rate``) are kept as they are.

    >>> scaled_settings({"tome r=13": ("tome", {"r": 13})}, 576)["tome r=13"]
    ('tome', {'r': 38})
    """
    out = {}
    for label, setting in settings.items():
        if setting is not None and COUNT_OPTIONS.get(setting[0]) in setting[1]:
            key = COUNT_OPTIONS[setting[0]]
            options = {**setting[1], key: max(1, round(setting[1][key] * patches / BASE_PATCHES))}
            setting = (setting[0], options)
        out[label] = setting
    return out


def token_counts(model: torch.nn.Module, setting: tuple | None, img_size: int, patches: int) -> dict[str, Any]:
    """Patches, and the mean share of the input tokens the blocks see (1.0 unreduced), from the analytic count."""
    variant = copy.deepcopy(model)
    if setting is not None:
        tr.patch(variant, setting[0], **setting[1])
    report = tr.flops(variant, img_size)
    first = report.blocks[0].tokens_in
    share = statistics.mean(b.tokens_in for b in report.blocks) / first
    return {"tokens": first, "patches": patches, "token_share": share,
            "tokens_out": report.blocks[-1].tokens_out}


def gtp_breakdown(model: torch.nn.Module, batch_size: int = 32, rounds: int = 3) -> dict | None:
    """Share of a GTP forward pass (CPU, eager) spent building the graph, scoring the tokens, and in the whole
    reduce step (scores + propagation + gathers), timed by wrapping those functions of one patched copy."""
    from tokenreduce.methods import gtp

    if not hasattr(gtp, "selection_scores"):
        return None
    patched = tr.patch(copy.deepcopy(model), "gtp", r=8)
    method = tr.method_of(patched)
    spent: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - start
            return out
        return wrapper

    original_scores = gtp.selection_scores
    method.begin = timed("graph", method.begin)
    method.reduce = timed("reduce", method.reduce)
    gtp.selection_scores = timed("selection", original_scores)
    images = torch.randn(batch_size, 3, 224, 224)
    shares = defaultdict(list)
    try:
        with torch.inference_mode():
            patched(images)  # warm-up
            for _ in range(rounds):
                spent.clear()
                start = time.perf_counter()
                patched(images)
                total = time.perf_counter() - start
                for name in ("graph", "selection", "reduce"):
                    shares[name].append(spent[name] / total)
    finally:
        gtp.selection_scores = original_scores
    return {"batch_size": batch_size, "rounds": rounds,
            "share_of_forward": {name: statistics.median(v) for name, v in shares.items()}}


# --- reading the JSON: tables and plots ---------------------------------------------------------------------


def _mode_name(mode: str | None) -> str:
    return "eager" if mode is None else "compiled"


def batch_table(result: dict) -> str:
    """The README table of the batch rows: per setting GMACs and ceiling, then per batch size and mode the
    speed-up and (in brackets) its share of the ceiling."""
    rows = result.get("rows") or []
    if not rows:
        return "(no batch rows in the JSON: run without --skip-batch)"
    batches = sorted({r["batch_size"] for r in rows})
    modes = sorted({r.get("compile") for r in rows}, key=lambda m: m is not None)
    columns = [(b, m) for b in batches for m in modes]
    lines = ["| setting | GMACs | ceiling | " + " | ".join(f"batch {b} {_mode_name(m)}" for b, m in columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for label in dict.fromkeys(r["label"] for r in rows):
        if label == "unreduced":
            continue
        cells = []
        for b, m in columns:
            row = next((r for r in rows if (r["label"], r["batch_size"], r.get("compile")) == (label, b, m)), None)
            cells.append("" if row is None else
                         f"{row['speedup']:.2f}x ({row['speedup'] / row['gmacs_ratio']:.2f})")
        first = next(r for r in rows if r["label"] == label)
        lines.append(f"| {label} | {first['gmacs']:.2f} | {first['gmacs_ratio']:.2f}x | " + " | ".join(cells) + " |")
    env = result.get("environment_batch") or result.get("environment", {})
    lines.append("")
    compiled = (f"; compiled: torch.compile mode {env.get('compile')!r}, against the compiled unreduced model"
                if any(m is not None for m in modes) else "")
    lines.append(f"speed-up (share of the ceiling); {result.get('model')}, {env.get('device')} "
                 f"({env.get('device_name')}), {env.get('dtype')}, {env.get('threads')} threads, torch "
                 f"{env.get('torch')}, median of {result.get('rounds')} interleaved rounds{compiled}")
    return "\n".join(lines)


def sweep_table(result: dict) -> str:
    """The image-size sweep as a markdown table: per setting and size, tokens, speed-up, ceiling, peak memory."""
    sweep = result.get("sweep") or {}
    rows = sweep.get("rows") or []
    if not rows:
        return "(no sweep in the JSON: run without --skip-sweep)"
    lines = ["| setting | options | mode | img | tokens | token share | speed-up | ceiling | share of ceiling | "
             "peak MB (reduced / unreduced) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["label"] == "unreduced":
            continue
        base = next(r for r in rows if r["label"] == "unreduced" and r["img_size"] == row["img_size"]
                    and r.get("compile") == row.get("compile"))
        memory = ("n/a" if None in (row["peak_memory_mb"], base["peak_memory_mb"])
                  else f"{row['peak_memory_mb']:.0f} / {base['peak_memory_mb']:.0f}")
        options = ", ".join(f"{k}={v}" for k, v in row["options"].items() if k != "layers")
        lines.append(f"| {row['label']} | {options} | {_mode_name(row.get('compile'))} | {row['img_size']} | "
                     f"{row['tokens']} | "
                     f"{row['token_share']:.2f} | {row['speedup']:.2f}x | {row['gmacs_ratio']:.2f}x | "
                     f"{row['speedup'] / row['gmacs_ratio']:.2f} | {memory} |")
    lines.append("")
    lines.append(f"batch {sweep.get('batch_size')}; {sweep.get('scaling')}")
    return "\n".join(lines)


def plot(result: dict, out_dir: Path) -> list[Path]:
    """``speed_sizes.png`` (from the sweep) and ``speed_batch.png`` (from the batch rows), where there is data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    all_sweep = (result.get("sweep") or {}).get("rows", [])
    sweep_rows = [r for r in all_sweep if r["label"] != "unreduced"]
    if sweep_rows:
        fig, (ax, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
        labels = list(dict.fromkeys(r["label"] for r in all_sweep))
        modes = sorted({r.get("compile") for r in all_sweep}, key=lambda m: m is not None)
        for i, label in enumerate(labels):
            color = "black" if label == "unreduced" else f"C{i}"
            for mode in modes:
                points = sorted((r["tokens"], r["speedup"], r["peak_memory_mb"]) for r in all_sweep
                                if r["label"] == label and r.get("compile") == mode)
                style = {"color": color, "marker": "o" if mode is None else "s",
                         "linestyle": "-" if mode is None else ":", "label": f"{label} ({_mode_name(mode)})"}
                if label != "unreduced":
                    ax.plot([p[0] for p in points], [p[1] for p in points], **style)
                if mode is None and all(p[2] is not None for p in points):
                    ax_mem.plot([p[0] for p in points], [p[2] for p in points], **style)
            if label != "unreduced":
                ceiling = sorted({(r["tokens"], r["gmacs_ratio"]) for r in sweep_rows if r["label"] == label})
                ax.plot([p[0] for p in ceiling], [p[1] for p in ceiling], color=color, linestyle="--", alpha=0.6)
        sizes = ", ".join(str(s) for s in sorted({r["img_size"] for r in sweep_rows}))
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel(f"tokens entering the first block (image sides {sizes})")
        ax.set_ylabel("speed-up over the unreduced model")
        env = result.get("environment_sweep") or {}
        ax.set_title(f"{result.get('model')}, batch {result['sweep'].get('batch_size')}, {env.get('device')} "
                     f"{env.get('dtype')}; dashed: GMACs ceiling", fontsize=9)
        ax.legend(fontsize=7)
        ax_mem.set_xlabel("tokens entering the first block")
        ax_mem.set_ylabel("peak memory of one forward pass, MB")
        ax_mem.set_title("peak memory (eager)", fontsize=9)
        ax_mem.legend(fontsize=7)
        written.append(_save(fig, out_dir / "speed_sizes.png"))
    rows = [r for r in result.get("rows") or [] if r["label"] != "unreduced"]
    if rows:
        labels = list(dict.fromkeys(r["label"] for r in rows))
        groups = sorted({(r.get("compile") is not None, r["batch_size"]) for r in rows})
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(groups)
        for j, (compiled, batch) in enumerate(groups):
            shares = []
            for label in labels:
                row = next((r for r in rows if r["label"] == label and r["batch_size"] == batch
                            and (r.get("compile") is not None) == compiled), None)
                shares.append(float("nan") if row is None else row["speedup"] / row["gmacs_ratio"])
            ax.bar([i + (j - (len(groups) - 1) / 2) * width for i in range(len(labels))], shares, width,
                   label=f"{'compiled' if compiled else 'eager'}, batch {batch}",
                   hatch="//" if compiled else None, color=f"C{sorted({g[1] for g in groups}).index(batch)}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
        ax.set_ylabel("speed-up / GMACs ceiling")
        env = result.get("environment_batch") or {}
        ax.set_title(f"{result.get('model')}, {env.get('device')} {env.get('dtype')}: share of the ceiling",
                     fontsize=9)
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "speed_batch.png"))
    return written



def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

# --- measuring ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--model-kwargs", default=None, metavar="K=V,...",
                        help="overrides for timm.create_model (e.g. depth=2 for a quick check of the script)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="batch sizes of the batch table")
    parser.add_argument("--img-sizes", default="224,384,512", help="image sides of the sweep")
    parser.add_argument("--sweep-batch", type=int, default=8, help="the batch size of the image-size sweep")
    parser.add_argument("--compile", default="both", choices=("off", "on", "both"),
                        help="eager only, compiled only, or both side by side (default both)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-sweep", action="store_true", help="no image-size sweep")
    parser.add_argument("--skip-batch", action="store_true", help="no batch table (and no GTP breakdown)")
    parser.add_argument("--table", action="store_true", help="print the README tables from --out and exit")
    parser.add_argument("--plot", action="store_true", help="draw the plots from --out and exit")
    parser.add_argument("--out", default=str(RESULTS / "speed.json"))
    _common.add_device_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.table or args.plot:
        result = json.loads(out.read_text())
        if args.table:
            print(batch_table(result) + "\n\n" + sweep_table(result))
        if args.plot:
            print("wrote " + ", ".join(str(p) for p in plot(result, out.parent)))
        return 0
    try:
        device, dtype = _common.resolve_device(args.device), _common.resolve_dtype(args.dtype)
        batch_sizes = _common.parse_ints(args.batch_sizes, "--batch-sizes") or []
        img_sizes = _common.parse_ints(args.img_sizes, "--img-sizes") or []
        model_kwargs = _common.parse_pairs(args.model_kwargs, "--model-kwargs")
    except InputError as err:
        print(f"speed.py: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = {"off": [None], "on": [args.compile_mode], "both": [None, args.compile_mode]}[args.compile]
    settings = {k: v for k, v in SETTINGS.items() if v is None or v[0] in tr.methods()}
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({"model": args.model, "model_kwargs": model_kwargs,
                   "protocol": "interleaved rounds, median images/s, inference_mode; "
                               "compiled: torch.compile(dynamic=False) per shape, first call apart",
                   "rounds": args.rounds, "warmup": args.warmup})

    if not args.skip_batch:
        model = timm.create_model(args.model, pretrained=False, **model_kwargs).eval()
        rows = method_speedups(model, settings, batch_sizes, rounds=args.rounds, warmup=args.warmup, dtype=dtype,
                               device=device, compile_modes=modes)
        print(f"{'setting':<24} {'batch':>5} {'mode':>8} {'img/s':>8} {'speed-up':>9} {'GMACs':>6} {'ceiling':>8} "
              f"{'share':>6} {'1st call s':>10}")
        for row in rows:
            print(f"{row['label']:<24} {row['batch_size']:>5} {_mode_name(row.get('compile')):>8} "
                  f"{row['images_per_s']:>8.1f} {row['speedup']:>8.2f}x {row['gmacs']:>6.2f} "
                  f"{row['gmacs_ratio']:>7.2f}x {row['speedup'] / row['gmacs_ratio']:>6.2f} "
                  f"{row['first_call_s']:>10.2f}")
        result["rows"] = rows
        result["environment_batch"] = environment(dtype, modes[-1] or False, device)
        result["environment"] = result["environment_batch"]
        breakdown = gtp_breakdown(model) if "gtp" in tr.methods() and device.type == "cpu" else None
        result["gtp_breakdown"] = breakdown
        if breakdown:
            print("GTP P=8, batch 32, share of the forward pass: " + ", ".join(
                f"{k} {v:.1%}" for k, v in breakdown["share_of_forward"].items()))

    if not args.skip_sweep:
        rows = []
        for img_size in img_sizes:
            # Built at each size (dynamic_img_size kept): a patch is checked against the model's own token count.
            torch.manual_seed(0)
            model = timm.create_model(args.model, pretrained=False, dynamic_img_size=True, img_size=img_size,
                                      **model_kwargs).eval()
            patch = model.patch_embed.patch_size[0]
            patches = (img_size // patch) ** 2
            sized = scaled_settings(settings, patches)
            timed = method_speedups(model, sized, (args.sweep_batch,), img_size=img_size, rounds=args.rounds,
                                    warmup=args.warmup, dtype=dtype, device=device, compile_modes=modes, memory=True)
            for row in timed:
                row.update(token_counts(model, sized[row["label"]], img_size, patches))
                print(f"{img_size:>4} {row['tokens']:>5} {row['label']:<24} {_mode_name(row.get('compile')):>8} "
                      f"{row['speedup']:>6.2f}x (ceiling {row['gmacs_ratio']:.2f}x, token share "
                      f"{row['token_share']:.2f}) peak {row['peak_memory_mb'] or float('nan'):.0f} MB")
            rows += timed
        result["sweep"] = {
            "batch_size": args.sweep_batch, "img_sizes": img_sizes, "rows": rows,
            "scaling": f"ToMe/GTP/PPT r scaled with the patch count (r * patches / {BASE_PATCHES}, rounded); "
                       f"Top-K/EViT keep_rate unchanged; model built at each size with dynamic_img_size=True",
            "memory_measure": memory_measure(device),
        }
        result["environment_sweep"] = environment(dtype, modes[-1] or False, device)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print("wrote " + ", ".join(str(p) for p in plot(result, out.parent)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
