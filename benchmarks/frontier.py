"""The accuracy/cost frontier of every training-free method on the offline benchmark classifier.

The model: ``../shared/models/dinov2_s14_cifar10.safetensors`` (DINOv2 ViT-S/14 + linear head on
CIFAR-10, see its README). The data: the first ``--per-class`` test images of each CIFAR-10 class (sorted
names), resized 32 -> 224 bicubic (no crop), ImageNet mean/std, preprocessed once and cached; every point
is evaluated on the same tensor. Each method is scheduled to fractions of the unreduced GMACs with
``tr.schedule_for_flops``; per point: top-1, agreement with the unreduced model, mean KL(unreduced ||
reduced), GMACs, and the speed ratio at batch 32 (``method_speedups``: unreduced timed in the same run).

Points are cached by (method, options, the method's source, images, dtype), so a re-run only evaluates
methods that are new or changed. Results are written after every point.

    python benchmarks/frontier.py --per-class 20 --levels 0.7 --out /tmp/frontier   # quick check
    nohup python benchmarks/frontier.py > frontier.log 2>&1 &                        # the full run
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

import tokenreduce as tr  # noqa: E402
from tokenreduce.measure.checkpoint import load_checkpoint  # noqa: E402
from tokenreduce.measure.data import data_root, portable_path  # noqa: E402
from tokenreduce.measure.speed import environment, method_speedups  # noqa: E402
from tokenreduce.methods.base import _REGISTRY  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The shared data and models (tokenreduce.measure.data.data_root, the one place that finds them):
# $TOKENREDUCE_DATA_ROOT, else ``shared`` beside the repository root.
DATA_ROOT = data_root(start=ROOT, check=False)
MODEL_FILE = DATA_ROOT / "models" / "dinov2_s14_cifar10.safetensors"
DATA_DIR = DATA_ROOT / "data" / "cifar10" / "test"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_images(per_class: int, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The preprocessed test tensor (N x 3 x 224 x 224), labels and file names, cached on disk."""
    cache = cache_dir / f"cifar10_test_{per_class}_per_class.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return saved["images"], saved["labels"], saved["files"].split("\n")
    preprocess = transforms.Compose([
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    classes = sorted(p.name for p in DATA_DIR.iterdir() if p.is_dir())
    images, labels, files = [], [], []
    for index, name in enumerate(classes):
        for path in sorted((DATA_DIR / name).iterdir())[:per_class]:
            images.append(preprocess(Image.open(path).convert("RGB")))
            labels.append(index)
            files.append(f"{name}/{path.name}")
    out = torch.stack(images), torch.tensor(labels), files
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"images": out[0], "labels": out[1], "files": "\n".join(files)}, cache)
    return out


def load_model() -> torch.nn.Module:
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=10)
    return load_checkpoint(model, MODEL_FILE).eval()


def training_free_methods() -> list[str]:
    """Registered methods that ``tr.patch`` applies to a pre-trained model as is."""
    return [name for name in tr.methods() if getattr(_REGISTRY[name], "training_free", True)]


def method_fingerprint(name: str) -> str:
    """A hash of the method's source file, so that cached points follow code changes."""
    return hashlib.sha1(inspect.getsource(sys.modules[_REGISTRY[name].__module__]).encode()).hexdigest()[:12]


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Logits (float32) of ``model`` on all ``images``."""
    outs = []
    for start in range(0, len(images), batch_size):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            outs.append(model(images[start:start + batch_size]).float())
    return torch.cat(outs)


def scores(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, agreement with the unreduced argmax and mean KL(unreduced || reduced), in percent / nats."""
    log_p, log_q = base_logits.log_softmax(-1), logits.log_softmax(-1)
    return {
        "top1": 100.0 * (logits.argmax(-1) == labels).float().mean().item(),
        "agreement": 100.0 * (logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item(),
        "kl": F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").item(),
    }


def source_candidates(name: str, fingerprint_log: Path | None) -> list[str]:
    """Fingerprints the method's source has had: now, in git history, and in a log of working-tree states.

    ``--cached-only`` uses them to find points computed while a method was still being edited.
    """
    import subprocess

    current = method_fingerprint(name)
    path = Path(inspect.getsourcefile(sys.modules[_REGISTRY[name].__module__]))
    seen = [current]
    try:
        commits = subprocess.run(["git", "log", "--format=%H", "--", str(path)], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.split()
        for commit in commits:
            text = subprocess.run(["git", "show", f"{commit}:{path.relative_to(ROOT)}"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout
            seen.append(hashlib.sha1(text.encode()).hexdigest()[:12])
    except (subprocess.CalledProcessError, OSError, ValueError):
        pass
    if fingerprint_log is not None and fingerprint_log.is_file():
        seen += [fp for line in fingerprint_log.read_text().splitlines()
                 for method, fp in [line.split()[:2]] if method == name]
    return list(dict.fromkeys(seen))


def point_key(parts: dict) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cached(cache_dir: Path, key: str, compute, only_cached: bool = False):
    path = cache_dir / "points" / f"{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    if only_cached:
        return None
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return value


def write_outputs(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "frontier.json").write_text(json.dumps(result, indent=2) + "\n")
    base = result["unreduced"]
    lines = [
        f"Benchmark classifier (DINOv2 ViT-S/14 + linear head, CIFAR-10 test, {result['images']} images, "
        f"{result['settings']['dtype']} autocast for every model); speed ratio at batch "
        f"{result['settings']['speed_batch']}, each point timed against the unreduced model in the same run "
        f"(interleaved, median of {result['settings']['speed_rounds']} rounds, on a shared 2-core CPU under load: "
        f"indicative only); ceiling = GMACs ratio. KL = mean KL(unreduced || reduced).",
        "",
        "| method | options | GMACs | % of unreduced | top-1 (%) | agreement (%) | KL | speed ratio | ceiling |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| unreduced | | {base['gmacs']:.2f} | 100 | {base['top1']:.2f} | 100.00 | 0 | 1.00 | 1.00 |",
    ]
    for p in sorted(result["points"], key=lambda p: (p["method"], -p["gmacs"])):
        opts = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in p["options"].items())
        speed = f"{p['speed_ratio']:.2f}" if p.get("speed_ratio") is not None else "n/a"
        mark = " *" if p.get("kept_from_previous_run") else ""
        lines.append(f"| {p['method']}{mark} | {opts} | {p['gmacs']:.2f} | {100 * p['gmacs'] / base['gmacs']:.0f} | "
                     f"{p['top1']:.2f} | {p['agreement']:.2f} | {p['kl']:.4f} | {speed} | "
                     f"{base['gmacs'] / p['gmacs']:.2f} |")
    if any(p.get("kept_from_previous_run") for p in result["points"]):
        lines += ["", "\\* kept from the previous run (`--keep-other-methods`): computed then against that run's "
                  "unreduced logits, with that method's code of then; rerun without the flag to recompute."]
    (out_dir / "frontier.md").write_text("\n".join(lines) + "\n")
    plot(out_dir / "frontier.png", result)


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["unreduced"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    methods = sorted({p["method"] for p in result["points"]})
    colours = plt.get_cmap("tab10")
    for ax, metric, title in ((axes[0], "top1", "top-1 accuracy (%)"),
                              (axes[1], "agreement", "agreement with unreduced (%)")):
        for i, name in enumerate(methods):
            pts = sorted((p for p in result["points"] if p["method"] == name), key=lambda p: p["gmacs"])
            xs = [p["gmacs"] for p in pts] + [base["gmacs"]]
            ys = [p[metric] for p in pts] + [base[metric]]
            ax.plot(xs, ys, "o-", color=colours(i), label=name, lw=1.8, ms=5)
        ax.plot([base["gmacs"]], [base[metric]], marker="*", color="black", ms=16, ls="none", label="unreduced",
                zorder=5)
        ax.set_xlabel("GMACs per image (reduction overhead included)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle(f"Token reduction on DINOv2 ViT-S/14 (CIFAR-10 linear probe, {result['images']} test images)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=200, help="test images per class (default 200: 2,000)")
    parser.add_argument("--levels", default="0.7,0.5,0.85,0.6",
                        help="target GMACs as fractions of unreduced, evaluated in this order (level-major)")
    parser.add_argument("--methods", default=None, help="comma list (default: every training-free method)")
    parser.add_argument("--keep-other-methods", action="store_true",
                        help="with --methods: keep the points of the other methods from the existing "
                             "OUT/frontier.json (marked 'kept_from_previous_run'), e.g. after one method changed")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--speed-batch", type=int, default=32)
    parser.add_argument("--speed-rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                        help="autocast dtype of every forward (the unreduced model too)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/frontier")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/tokenreduce/frontier")
    parser.add_argument("--rewrite", action="store_true",
                        help="only rewrite frontier.md and frontier.png from OUT/frontier.json")
    parser.add_argument("--cached-only", action="store_true",
                        help="write the outputs from the points already computed (e.g. by parallel runs)")
    parser.add_argument("--fingerprint-log", type=Path, default=None,
                        help="with --cached-only: lines 'method sha1[:12]' of method sources seen while computing")
    args = parser.parse_args(argv)

    if args.rewrite:
        write_outputs(args.out, json.loads((args.out / "frontier.json").read_text()))
        return 0
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    images, labels, files = load_images(args.per_class, args.cache)
    data_id = hashlib.sha1("\n".join(files).encode()).hexdigest()[:12]
    model = load_model()
    base_report = tr.flops(model)
    print(f"{len(images)} images, unreduced {base_report.gmacs:.3f} GMACs, {args.dtype}, {args.threads} threads",
          flush=True)

    t0 = time.time()
    base_logits = cached(args.cache, point_key({"method": None, "data": data_id, "dtype": args.dtype}),
                         lambda: predict(model, images, args.batch_size, dtype))
    base = {"gmacs": base_report.total_gmacs, **scores(base_logits, base_logits, labels)}
    print(f"unreduced: top-1 {base['top1']:.2f}% ({time.time() - t0:.0f}s)", flush=True)

    names = args.methods.split(",") if args.methods else training_free_methods()
    levels = [float(v) for v in args.levels.split(",")]
    result = {
        "model": f"vit_small_patch14_dinov2 + CIFAR-10 linear head ({portable_path(MODEL_FILE)})",
        "data": f"{portable_path(DATA_DIR)}: first {args.per_class} per class, sorted names; resize 224 bicubic, "
                "no crop",
        "images": len(images),
        "settings": {"dtype": args.dtype, "threads": args.threads, "speed_batch": args.speed_batch,
                     "speed_rounds": args.speed_rounds, "environment": environment(dtype)},
        "unreduced": base,
        "points": [],
        "skipped": {},
    }
    previous = args.out / "frontier.json"
    if args.keep_other_methods and args.methods and previous.is_file():
        kept = [p for p in json.loads(previous.read_text())["points"] if p["method"] not in names]
        result["points"] += [{**p, "kept_from_previous_run": True} for p in kept]
        print(f"kept {len(kept)} points of other methods from {previous}", flush=True)
    for level in levels:
        for name in names:
            try:
                options = tr.schedule_for_flops(model, name, level * base_report.total_gmacs)
                variant = tr.patch(copy.deepcopy(model), name, **options)
            except (ValueError, TypeError) as err:
                result["skipped"][f"{name}@{level}"] = str(err)
                print(f"skip {name} at {level:.0%}: {err}", flush=True)
                continue
            report = tr.flops(variant)
            source = method_fingerprint(name)
            key = point_key({"method": name, "options": repr(options), "source": source,
                             "data": data_id, "dtype": args.dtype})
            if args.cached_only and not (args.cache / "points" / f"{key}.pt").is_file():
                for candidate in source_candidates(name, args.fingerprint_log):
                    other = point_key({"method": name, "options": repr(options), "source": candidate,
                                       "data": data_id, "dtype": args.dtype})
                    if (args.cache / "points" / f"{other}.pt").is_file():
                        key, source = other, candidate
                        break
            t0 = time.time()
            logits = cached(args.cache, key, lambda v=variant: predict(v, images, args.batch_size, dtype),
                            args.cached_only)
            seconds = time.time() - t0
            speed = cached(args.cache, key + f"_speed{args.speed_batch}x{args.speed_rounds}",
                           lambda n=name, o=options: method_speedups(
                               model, {"unreduced": None, "reduced": (n, o)}, batch_sizes=(args.speed_batch,),
                               rounds=args.speed_rounds, warmup=1, dtype=dtype), args.cached_only)
            if logits is None or speed is None:
                result["skipped"][f"{name}@{level}"] = "not computed yet (--cached-only)"
                continue
            reduced_row = next(row for row in speed if row["label"] == "reduced")
            point = {"method": name, "level": level, "options": options, "source": source,
                     "source_is_current": source == method_fingerprint(name),
                     "gmacs": report.total_gmacs,
                     "overhead_gmacs": report.overhead_gmacs, "tokens_out": [b.tokens_out for b in report.blocks],
                     **scores(logits, base_logits, labels), "speed_ratio": reduced_row["speedup"],
                     "speed_spread": reduced_row["spread"]}
            result["points"].append(point)
            print(f"{name:>6} {level:.0%} {options}: {point['gmacs']:.2f} GMACs top-1 {point['top1']:.2f} "
                  f"agree {point['agreement']:.2f} KL {point['kl']:.4f} speed x{point['speed_ratio']:.2f} "
                  f"({seconds:.0f}s)", flush=True)
            write_outputs(args.out, result)
    write_outputs(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
