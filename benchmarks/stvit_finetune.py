"""STViT (16 semantic tokens) fine-tuned on CIFAR-10 from the benchmark classifier, against the unreduced model.

Stages (run in this order; each writes what the next reads):

    python benchmarks/stvit_finetune.py baseline   # top-1 of the unreduced model on the 2,000 test images
    python benchmarks/stvit_finetune.py train      # fine-tune STViT, checkpoints in /tmp/stvit_cifar10
    python benchmarks/stvit_finetune.py eval       # top-1 of the STViT model, writes stvit_cifar10.json
    # optional, when time is left: a second phase from phase 1's weights, then evaluate it
    python benchmarks/stvit_finetune.py train --phase 2 --epochs 1 --subset 4800
    python benchmarks/stvit_finetune.py eval --phase 2

Test set: the first 200 test images of each class (sorted file names, 2,000 images), the set of the models
README (75.05% unreduced). Preprocessing: resize to 224 bicubic, ImageNet mean/std (random flip in training).
One thread (the machine is shared); training under bfloat16 autocast (AMX), evaluation in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

import tokenreduce as tr
from tokenreduce import stvit
from tokenreduce.measure.data import data_root, portable_path
from tokenreduce.train import TrainConfig, evaluate, load_weights, train

# The shared data and models (tokenreduce.measure.data.data_root, the one place that finds them):
# $TOKENREDUCE_DATA_ROOT, else ``shared`` beside the repository root.
DATA_ROOT = data_root(start=__file__, check=False)
WEIGHTS = str(DATA_ROOT / "models" / "dinov2_s14_cifar10.safetensors")
TRAIN = str(DATA_ROOT / "data" / "cifar10" / "train")
TEST = str(DATA_ROOT / "data" / "cifar10" / "test")
RESULTS = Path(__file__).parent / "results" / "stvit"
CKPT_DIR = Path("/tmp/stvit_cifar10")
STVIT_OPTIONS = {"num_semantic": 16, "full_blocks": 4, "pooling": "learned", "global_centres": True,
                 "generation_layers": 2}


def classifier() -> torch.nn.Module:
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=10)
    model.load_state_dict(load_file(WEIGHTS))
    return model.eval()


def run_baseline(args: argparse.Namespace) -> None:
    model = classifier()
    result = evaluate(model, TEST, per_class=200, batch_size=50, transform="resize224")
    result["gmacs"] = tr.flops(model).gmacs
    (RESULTS / "baseline.json").write_text(json.dumps(result))
    print(f"unreduced: top-1 {result['top1']:.2f}% on {result['images']} images, {result['gmacs']:.3f} GMACs, "
          f"{result['seconds']:.0f} s", flush=True)


def phase_dir(phase: int) -> Path:
    return CKPT_DIR if phase == 1 else CKPT_DIR / f"phase{phase}"


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(data=TRAIN, out=str(phase_dir(args.phase)), epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, min_lr=1e-6, weight_decay=0.05, warmup_epochs=0.2, label_smoothing=0.1,
                       freeze_blocks=STVIT_OPTIONS["full_blocks"], bf16=True, transform="resize224",
                       subset=args.subset, seed=args.phase - 1, grad_clip=1.0, resume=args.resume,
                       head_lr_scale=args.head_lr_scale, extra={"phase": args.phase})


def run_train(args: argparse.Namespace) -> None:
    """Phase 1 starts from the classifier; phase k > 1 starts from phase k-1's weights with a fresh schedule
    on another random subset (seed k-1), used when time is left after phase 1."""
    model = stvit.build(classifier(), **STVIT_OPTIONS)
    if args.phase > 1:
        load_weights(model, phase_dir(args.phase - 1) / "last.pth")
    print(f"STViT: {tr.flops(model).total_gmacs:.3f} GMACs; phase {args.phase}: {args.epochs} epochs on "
          f"{args.subset} images, batch {args.batch_size}, lr {args.lr} (head x{args.head_lr_scale})", flush=True)
    result = train(model, train_config(args))
    print(json.dumps({k: result[k] for k in ("steps", "images_seen", "wall_seconds", "history")}), flush=True)


def run_eval(args: argparse.Namespace) -> None:
    baseline = json.loads((RESULTS / "baseline.json").read_text())
    model = stvit.build(classifier(), **STVIT_OPTIONS)
    load_weights(model, phase_dir(args.phase) / "last.pth")
    result = evaluate(model, TEST, per_class=200, batch_size=50, transform="resize224")
    agree = sum(a == b for a, b in zip(result["predictions"], baseline["predictions"], strict=True))
    report = tr.flops(model)
    phases = []
    for phase in range(1, args.phase + 1):
        checkpoint = torch.load(phase_dir(phase) / "last.pth", map_location="cpu", weights_only=False)
        history = checkpoint["history"]
        phases.append({"phase": phase, "epochs_completed": len(history), "steps": checkpoint["step"],
                       "images_seen": checkpoint["step"] * checkpoint["config"]["batch_size"],
                       "train_images": checkpoint["config"]["subset"],
                       "wall_seconds": history[-1]["seconds"] if history else None,
                       "history": history,
                       "settings": {**checkpoint["config"], "data": portable_path(checkpoint["config"]["data"])}})
    previous = RESULTS / "stvit_cifar10.json"
    earlier = json.loads(previous.read_text()).get("evaluations", []) if previous.exists() else []
    stvit_result = {"top1": result["top1"], "gmacs": report.total_gmacs, "gmacs_without_scorer": report.gmacs,
                    "agreement_with_unreduced": 100.0 * agree / len(baseline["predictions"]),
                    "after_phase": args.phase, "eval_seconds": result["seconds"], "options": STVIT_OPTIONS}
    evaluations = [e for e in earlier if e.get("after_phase") != args.phase] + [stvit_result]
    out = {
        "model": "vit_small_patch14_dinov2 CIFAR-10 benchmark classifier",
        "test_set": "first 200 test images of each class (sorted file names), 2000 images",
        "stvit": stvit_result,
        "unreduced": {"top1": baseline["top1"], "gmacs": baseline["gmacs"], "eval_seconds": baseline["seconds"]},
        "training": {
            "epochs_completed": sum(p["epochs_completed"] for p in phases),
            "steps": sum(p["steps"] for p in phases),
            "images_seen": sum(p["images_seen"] for p in phases),
            "wall_seconds": sum(p["wall_seconds"] or 0 for p in phases),
            "threads": 1, "device": "cpu (2 shared cores), bfloat16 autocast",
            "phases": phases,
        },
        "evaluations": evaluations,
        "notes": "fine-tuned from the pre-trained classifier (first 4 blocks and the embedding frozen); the paper "
                 "trains from scratch on ImageNet for 300 epochs. Evaluation in float32.",
    }
    previous.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k not in ("training", "evaluations")}, indent=2), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("baseline", "train", "eval"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--head-lr-scale", type=float, default=10.0)
    parser.add_argument("--phase", type=int, default=1, help="training phase (> 1: continue from the last)")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.time()
    {"baseline": run_baseline, "train": run_train, "eval": run_eval}[args.stage](args)
    print(f"{args.stage} done in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
