"""The training-free methods on a hierarchical backbone (issue 23): accuracy and agreement against GMACs, and
speed, on the trained Swin and PVTv2 test beds (``testbeds.py``).

Per method and cost level (shares of the unreduced GMACs, overhead and restore work included), the schedule
comes from ``tr.schedule_for_flops`` with every block reducing (``layers`` = all blocks; ToMe and GTP reduce in
every block by default), each method with its default restore rule on the family (Swin: the method's; PVTv2:
``departure``, see ``adapters/pvt.py``). Scored on the 2,000 report images of the
test bed (the first 200 CIFAR-10 test images of each class, never trained on): top-1, agreement with the
unreduced model's prediction. Speed: images/s against the unreduced model at batch 1 and 32, interleaved in
the same run (``tokenreduce.measure.speed.method_speedups``, median of rounds), and the share of the GMACs
ceiling (speed-up / (unreduced GMACs / reduced GMACs)).

    python benchmarks/hierarchical.py                      # swin: frontier + speed -> results/hierarchical/
    python benchmarks/hierarchical.py --levels 0.7 --no-speed --out /tmp/h   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testbeds  # noqa: E402

import tokenreduce as tr  # noqa: E402
from tokenreduce.measure.speed import environment, method_speedups  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "hierarchical"
METHODS = ("tome", "topk", "evit", "ppt", "gtp")
LEVELS = (0.9, 0.8, 0.7, 0.6)
SPEED_LEVEL = 0.7
#: PPT's policy at the 70% level with only one branch: prune (threshold 0) or pool (threshold inf).
PPT_BRANCHES = {"ppt (prune only)": dict(threshold=0.0), "ppt (pool only)": dict(threshold=math.inf)}


def fixed_options(model: torch.nn.Module, method: str) -> dict:
    """Every block reduces: the layer-based methods name them all (their DeiT defaults do not fit these models)."""
    depth = len(tr.describe(model, img_size=testbeds.IMG_SIZE)["schedule"])
    return {"layers": list(range(depth))} if method in ("topk", "evit", "ppt") else {}


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def point(model: torch.nn.Module, label: str, method: str, options: dict, images: torch.Tensor,
          labels: torch.Tensor, reference: torch.Tensor, base: float, level: float | None) -> dict:
    with tr.patched(model, method, **options):
        report = tr.flops(model, img_size=testbeds.IMG_SIZE)
        start = time.perf_counter()
        predicted = predict(model, images)
        seconds = time.perf_counter() - start
    row = {"label": label, "method": method, "options": {k: (str(v) if v == math.inf else v)
                                                         for k, v in options.items()},
           "level": level, "gmacs": report.total_gmacs, "gmacs_ratio": report.total_gmacs / base,
           "overhead_gmacs": report.overhead_gmacs, "restore_gmacs": report.restore_gmacs,
           "top1": 100 * float((predicted == labels).float().mean()),
           "agreement": 100 * float((predicted == reference).float().mean()), "seconds": round(seconds, 1)}
    print(json.dumps(row), flush=True)
    return row


def plot(path: Path, name: str, base_top1: float, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in METHODS:
        pts = sorted((r["gmacs_ratio"], r["top1"]) for r in rows if r["label"] == method)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.axhline(base_top1, color="grey", linestyle="--", label="unreduced")
    ax.set_xlabel("GMACs / unreduced GMACs (overhead and restore included)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{name} test bed (CIFAR-10, 2,000 report images)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict) -> str:
    lines = [f"{result['model']} test bed: unreduced top-1 {result['unreduced']['top1']:.2f}% at "
             f"{result['unreduced']['gmacs']:.4f} GMACs ({result['images']} images).", "",
             "| setting | options | GMACs (ratio) | overhead + restore | top-1 | loss | agreement |",
             "|---|---|---:|---:|---:|---:|---:|"]
    base = result["unreduced"]["top1"]
    for r in result["rows"]:
        opts = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r["options"].items() if k != "layers")
        lines.append(f"| {r['label']} @ {r['level']:.0%} | {opts} | {r['gmacs']:.4f} ({r['gmacs_ratio']:.2f}) | "
                     f"{r['overhead_gmacs'] + r['restore_gmacs']:.4f} | {r['top1']:.2f} | {r['top1'] - base:+.2f} | "
                     f"{r['agreement']:.2f} |")
    if result.get("speed"):
        env = result["speed_environment"]
        lines += ["", f"Speed at {result['speed_level']:.0%} GMACs against the unreduced model, same run, "
                      f"{env.get('device_name', 'CPU')} ({env.get('threads')} threads), median of rounds:", "",
                  "| setting | batch | speed-up | GMACs ceiling | share of the ceiling |", "|---|---:|---:|---:|---:|"]
        for s in result["speed"]:
            if s["label"] == "unreduced":
                continue
            lines.append(f"| {s['label']} | {s['batch_size']} | {s['speedup']:.2f}x | {s['gmacs_ratio']:.2f}x | "
                         f"{s['speedup'] / s['gmacs_ratio']:.2f} |")
    real = result.get("speed_real")
    if real:
        lines += ["", f"The same on `{real['model']}` at {real['img_size']} px (random weights; speed does not "
                      f"depend on them), each method scheduled to {result['speed_level']:.0%} of its GMACs (3-5 "
                      "points more where out of reach):",
                  "",
                  "| setting | batch | speed-up | GMACs ceiling | share of the ceiling |", "|---|---:|---:|---:|---:|"]
        for s in real["rows"]:
            if s["label"] != "unreduced":
                lines.append(f"| {s['label']} | {s['batch_size']} | {s['speedup']:.2f}x | {s['gmacs_ratio']:.2f}x | "
                             f"{s['speedup'] / s['gmacs_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="swin", choices=list(testbeds.CONFIGS))
    parser.add_argument("--levels", nargs="*", type=float, default=list(LEVELS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--speed-level", type=float, default=SPEED_LEVEL,
                        help="the level of the speed runs, the restore-rule and PPT-branch rows (default 0.7)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--speed-timm", default=None,
                        help="also time the methods at 70%% on this timm model at its own size, random weights "
                             "(e.g. swin_tiny_patch4_window7_224): a real-size speed beside the test bed's")
    args = parser.parse_args(argv)
    speed_level = args.speed_level
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = testbeds.load(args.model, train_if_missing=False)
    images, labels = testbeds.report_set()
    base = tr.flops(model, img_size=testbeds.IMG_SIZE).total_gmacs
    reference = predict(model, images)
    result = {"model": args.model, "images": len(images), "testbed": json.loads(
        (testbeds.RESULTS / f"{args.model}.json").read_text()) if (testbeds.RESULTS / f"{args.model}.json").is_file()
        else None, "unreduced": {"gmacs": base, "top1": 100 * float((reference == labels).float().mean())},
        "rows": [], "speed": [], "speed_level": speed_level}
    result["testbed"] = {k: v for k, v in (result["testbed"] or {}).items() if k != "curve"}
    chosen: dict[str, dict] = {}
    for method in args.methods:
        for level in args.levels:
            try:
                options = tr.schedule_for_flops(model, method, level * base, img_size=testbeds.IMG_SIZE,
                                                **fixed_options(model, method))
            except tr.TokenReduceError as err:
                print(f"skipped {method} @ {level}: {err}", file=sys.stderr)
                continue
            result["rows"].append(point(model, method, method, options, images, labels, reference, base, level))
            if math.isclose(level, speed_level):
                chosen[method] = options
    for method in ("topk", "evit", "ppt", "gtp"):
        if method not in chosen:
            continue
        # The other restore rule at the speed level, its own schedule (the rules cost differently).
        with tr.patched(model, method, **chosen[method]):
            default = tr.describe(model, img_size=testbeds.IMG_SIZE)["restore"]["name"]
        other = "departure" if default != "departure" else "reconstruct"
        try:
            options = tr.schedule_for_flops(model, method, speed_level * base, img_size=testbeds.IMG_SIZE,
                                            restore=other, **fixed_options(model, method))
        except tr.TokenReduceError as err:
            print(f"skipped {method} restore={other}: {err}", file=sys.stderr)
            continue
        result["rows"].append(point(model, f"{method} ({other})", method, options, images, labels, reference, base,
                                    speed_level))
    if "ppt" in chosen:
        for label, extra in PPT_BRANCHES.items():
            options = {**chosen["ppt"], **extra}
            result["rows"].append(point(model, label, "ppt", options, images, labels, reference, base, speed_level))
    (out / f"{args.model}.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_speed and chosen:
        settings = {"unreduced": None, **{m: (m, o) for m, o in chosen.items()}}
        result["speed"] = method_speedups(model, settings, batch_sizes=(1, 32), img_size=testbeds.IMG_SIZE,
                                          rounds=args.rounds)
        result["speed_environment"] = environment()
    if args.speed_timm:
        import timm

        big = timm.create_model(args.speed_timm, pretrained=False).eval()
        size = big.pretrained_cfg["input_size"][-1]
        big_base = tr.flops(big, img_size=size).total_gmacs
        depth = len(tr.describe(big, img_size=size)["schedule"])
        settings = {"unreduced": None}
        for method in args.methods:
            fixed = {"layers": list(range(depth))} if method in ("topk", "evit", "ppt") else {}
            for level in (speed_level, speed_level + 0.03, speed_level + 0.05):  # "about" the level (Swin-T PPT: 71%)
                try:
                    settings[method] = (method, tr.schedule_for_flops(big, method, level * big_base,
                                                                      img_size=size, **fixed))
                    break
                except tr.TokenReduceError as err:
                    print(f"{method} on {args.speed_timm} at {level:.0%}: {err}", file=sys.stderr)
        result["speed_real"] = {"model": args.speed_timm, "img_size": size, "rows": method_speedups(
            big, settings, batch_sizes=(1, 32), img_size=size, rounds=max(3, args.rounds - 2))}
    (out / f"{args.model}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{args.model}.md").write_text(table(result))
    plot(out / f"{args.model}.png", args.model, result["unreduced"]["top1"], result["rows"])
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
