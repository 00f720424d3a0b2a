"""Trained hierarchical test beds (issue 23): a small Swin and PVTv2-b0, trained on CIFAR-10 on this machine.

No trained hierarchical model is available offline, so accuracy under token reduction on Swin / PVTv2 needs
models trained here. Both are timm models built from a config (no hub), trained from scratch:

- ``swin``: ``SwinTransformer`` at 64 px, patch 4 (a 16 x 16 grid), window 4 (16 tokens per window), three
  stages of depth (2, 4, 2) on 16 x 16, 8 x 8 and 4 x 4 grids, width 64 -> 128 -> 256, heads (2, 4, 8).
- ``pvt``: timm's ``pvt_v2_b0`` (widths 32/64/160/256, depths 2/2/2/2, spatial reduction 8/4/2/1) at 64 px.

Data: ``../shared/data/cifar10`` (``TOKENREDUCE_DATA_ROOT``). Training images: the 10,000 of ``train/`` and test
images 200-999 of each class (8,000; sorted names); scored on the first 200 test images of each class (the
2,000 images of ``frontier.py``), which training never sees. Augmentation at 32 px (random crop with 4 px
padding, horizontal flip), then bicubic upsampling to 64 px and ImageNet mean/std. AdamW, cosine schedule with
one warm-up epoch, label smoothing 0.1.

Weights go to the cache (``$TOKENREDUCE_CACHE/testbeds``, default ``~/.cache/tokenreduce/testbeds``), never
into git; the recipe and the scores are committed in ``results/testbeds/``. Re-train with one command:

    python benchmarks/testbeds.py train swin          # 12 epochs; the minutes are in results/testbeds
    python benchmarks/testbeds.py train pvt
    python benchmarks/testbeds.py score swin          # top-1 of the cached weights on the 2,000 images

``load(name)`` (used by the benchmarks) trains the model when its weights are not cached.
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

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import DATA_ROOT, MEAN, ROOT, STD  # noqa: E402  (one place finds the shared data)

CIFAR = DATA_ROOT / "data" / "cifar10"
RESULTS = ROOT / "benchmarks" / "results" / "testbeds"
IMG_SIZE = 64
REPORT_PER_CLASS = 200

#: name -> (timm builder, kwargs, training recipe)
CONFIGS: dict[str, dict] = {
    "swin": {"builder": "swin", "kwargs": dict(img_size=IMG_SIZE, patch_size=4, window_size=4, embed_dim=64,
                                               depths=(2, 4, 2), num_heads=(2, 4, 8), num_classes=10),
             "epochs": 12, "lr": 1e-3, "weight_decay": 0.05, "batch_size": 64},
    "pvt": {"builder": "pvt_v2_b0", "kwargs": dict(num_classes=10),
            "epochs": 12, "lr": 1e-3, "weight_decay": 0.05, "batch_size": 64},
}


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENREDUCE_CACHE", Path.home() / ".cache" / "tokenreduce")) / "testbeds"


def build(name: str) -> torch.nn.Module:
    """The untrained test bed ``name`` (a timm model built from its config)."""
    if name not in CONFIGS:
        raise SystemExit(f"unknown test bed {name!r}; valid: {', '.join(CONFIGS)}")
    cfg = CONFIGS[name]
    if cfg["builder"] == "swin":
        from timm.models.swin_transformer import SwinTransformer

        return SwinTransformer(**cfg["kwargs"])
    return timm.create_model(cfg["builder"], pretrained=False, **cfg["kwargs"])


def read_split(split: str, start: int, stop: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``N x 3 x 32 x 32`` and labels: files ``start:stop`` (sorted) of every class of ``split``."""
    folder = CIFAR / split
    if not folder.is_dir():
        raise SystemExit(f"no CIFAR-10 at {folder} (set TOKENREDUCE_DATA_ROOT)")
    images, labels = [], []
    for index, cls in enumerate(sorted(p.name for p in folder.iterdir() if p.is_dir())):
        for path in sorted((folder / cls).iterdir())[start:stop]:
            with Image.open(path) as im:
                images.append(torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
                              .view(32, 32, 3).permute(2, 0, 1))
            labels.append(index)
    return torch.stack(images), torch.tensor(labels)


def training_set() -> tuple[torch.Tensor, torch.Tensor]:
    a, la = read_split("train", 0, None)
    b, lb = read_split("test", REPORT_PER_CLASS, None)
    return torch.cat([a, b]), torch.cat([la, lb])


def report_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The 2,000 scored images (first 200 test images of each class), preprocessed: ``N x 3 x 64 x 64``."""
    images, labels = read_split("test", 0, REPORT_PER_CLASS)
    return preprocess(images), labels


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 32 px -> normalised float 64 px (bicubic)."""
    x = F.interpolate(images.float() / 255, size=(IMG_SIZE, IMG_SIZE), mode="bicubic", align_corners=False)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32 px crop of the 4 px zero-padded image and a random horizontal flip, per image."""
    n = images.shape[0]
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(32)).view(n, 1, 32, 1).expand(n, 3, 32, 40)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(32)).view(n, 1, 1, 32).expand(n, 3, 32, 32)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)


@torch.inference_mode()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 200) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        correct += int((model(images[start:start + batch_size]).argmax(-1) == labels[start:start + batch_size]).sum())
    return 100.0 * correct / len(images)


def train(name: str, epochs: int | None = None, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    cfg = CONFIGS[name]
    epochs = epochs or cfg["epochs"]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build(name)
    images, labels = training_set()
    report_x, report_y = report_set()
    steps_per_epoch = math.ceil(len(images) / cfg["batch_size"])
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    warmup = steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    curve, start, step = [], time.time(), 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        losses = []
        for first in tqdm(range(0, len(images), cfg["batch_size"]), desc=f"{name} epoch {epoch + 1}/{epochs}",
                          mininterval=30, leave=False):
            index = order[first:first + cfg["batch_size"]]
            x = preprocess(augment(images[index], generator))
            loss = F.cross_entropy(model(x), labels[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
        accuracy = top1(model, report_x, report_y)
        curve.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "top1": accuracy,
                      "minutes": round((time.time() - start) / 60, 2)})
        print(json.dumps({"model": name, **curve[-1]}), flush=True)
    target = cache_dir() / f"{name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target))
    result = {"model": name, "config": {k: v for k, v in cfg.items()}, "epochs": epochs,
              "top1": curve[-1]["top1"], "training_minutes": round((time.time() - start) / 60, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
              "train_images": len(images), "report_images": len(report_x), "curve": curve,
              "data": "train/ (10,000) + test images 200-999 per class (8,000); scored on test images 0-199 "
                      "per class (2,000)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def load(name: str, train_if_missing: bool = True) -> torch.nn.Module:
    """The trained test bed (eval mode), from the cache; trained first when missing and ``train_if_missing``."""
    target = cache_dir() / f"{name}.safetensors"
    if not target.is_file():
        if not train_if_missing:
            raise SystemExit(f"no trained {name} at {target}: run `python benchmarks/testbeds.py train {name}`")
        train(name)
    model = build(name)
    model.load_state_dict(load_file(str(target)))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("train", "score"))
    parser.add_argument("model", choices=list(CONFIGS))
    parser.add_argument("--epochs", type=int, help="default: the recipe's")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.model, args.epochs, args.threads)
    else:
        x, y = report_set()
        print(json.dumps({"model": args.model, "top1": top1(load(args.model, False), x, y)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
