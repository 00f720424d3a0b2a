"""STViT-R on the benchmark classifier's backbone: does the recovered token grid match the unreduced model's
final patch tokens? Against ToMe and GTP at the same cost, whose merged/propagated tokens are copied back to
the patches they hold (``tr.trace(...)[-1].owner``).

    python benchmarks/stvit_dense.py train   # cache teacher tokens, feature-distil STViT-R (/tmp/stvit_dense)
    python benchmarks/stvit_dense.py eval    # cosine on test images, GMACs, speed; JSON + picture

Model: DINOv2 ViT-S/14 (``dinov2_s14_cifar10.safetensors``, 12 blocks, 256 patches + CLS at 224).
STViT-R: 1 unit of 8 blocks (blocks 0-3 unchanged; block 4 full, 5-6 generation, 7-11 semantic, + recovery),
64 semantic tokens, learned pooling. Distillation target: the unreduced model's final normed patch tokens;
loss 1 - cosine per patch token. Only the unit trains (blocks 0-3 are frozen, so their output is cached once).
Preprocessing: resize 32 -> 224 bicubic, ImageNet mean/std. One thread; training under bfloat16 autocast.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torchvision import datasets, transforms

import tokenreduce as tr
from tokenreduce import stvit
from tokenreduce.train import per_class_subset

WEIGHTS = "/work/shared/models/dinov2_s14_cifar10.safetensors"
TRAIN = "/work/shared/data/cifar10/train"
TEST = "/work/shared/data/cifar10/test"
RESULTS = Path(__file__).parent / "results" / "stvit_dense"
WORK = Path("/tmp/stvit_dense")
OPTIONS = {"num_semantic": 64, "units": 1, "unit_depth": 8, "pooling": "learned"}


def classifier() -> torch.nn.Module:
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=10)
    model.load_state_dict(load_file(WEIGHTS))
    return model.eval()


def images(root: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    transform = transforms.Compose([
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    subset = per_class_subset(datasets.ImageFolder(root, transform), per_class)
    pairs = [subset[i] for i in range(len(subset))]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


@torch.inference_mode()
def teacher_tokens(model: torch.nn.Module, x: torch.Tensor, lead: int, batch: int = 25) -> tuple[torch.Tensor, ...]:
    """(tokens after the ``lead`` unchanged blocks, final normed tokens), both B x 257 x 384."""
    hidden, final = [], []
    for chunk in x.split(batch):
        h = model.blocks[:lead](embed(model, chunk))
        hidden.append(h)
        final.append(model.norm(model.blocks[lead:](h)))
    return torch.cat(hidden), torch.cat(final)


def cosine_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def run_train(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    WORK.mkdir(parents=True, exist_ok=True)
    model = classifier()
    student = stvit.build(model, recover=True, **OPTIONS)
    lead = len(student.vit.blocks)
    start = time.time()
    x, _ = images(TRAIN, args.per_class)
    hidden, target = teacher_tokens(model, x, lead)
    print(f"cached {len(x)} training images in {time.time() - start:.0f} s", flush=True)
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
    steps = args.epochs * (len(x) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[args.lr, args.lr * 20], total_steps=steps,
                                                   pct_start=0.1)
    grid = (16, 16)
    history = []
    student.train()
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(x))
        for i in range(len(x) // args.batch_size):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = student.vit.norm(unit(hidden[idx], grid, student.vit.num_prefix_tokens))
            loss = (1 - cosine_per_token(out[:, 1:], target[idx, 1:])).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(others + scales, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            history.append(loss.item())
            if step % 10 == 0 or step == steps:
                print(f"epoch {epoch} step {step}/{steps} loss {statistics.mean(history[-10:]):.4f} "
                      f"({time.time() - start:.0f} s)", flush=True)
    torch.save(student.state_dict(), WORK / "student.pth")
    (WORK / "train.json").write_text(json.dumps({
        "images": len(x), "per_class": args.per_class, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr,        "loss_history": history, "wall_seconds": time.time() - start}))


def dense_from_trace(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x 256 x C: every patch gets the final normed token that holds it (merged / propagated), the
    classifier's logits from the CLS token of the same pass)."""
    state = tr.trace(model, x)[-1]
    tokens = model.norm(state.x)
    owner = state.owner
    dense = tokens.gather(1, owner.clamp(min=0)[..., None].expand(-1, -1, tokens.shape[-1]))
    return dense.masked_fill((owner < 0)[..., None], 0.0), model.head(model.fc_norm(tokens[:, 0]))


@torch.inference_mode()
def images_per_second(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return len(x) / statistics.median(times)


@torch.inference_mode()
def run_eval(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    model = classifier()
    fresh = stvit.build(model, recover=True, **OPTIONS).eval()
    student = stvit.build(model, recover=True, **OPTIONS).eval()
    student.load_state_dict(torch.load(WORK / "student.pth"))
    target_gmacs = tr.flops(student).total_gmacs
    x, labels = images(TEST, args.test_per_class)
    lead = len(student.vit.blocks)
    _, reference = teacher_tokens(model, x, lead)
    reference_pred = model.forward_head(reference).argmax(-1)
    results = {"unreduced": {"gmacs": tr.flops(model).total_gmacs, "cosine_mean": 1.0}}

    def record(name: str, dense: torch.Tensor, gmacs: float, logits: torch.Tensor | None = None, **extra) -> None:
        cos = cosine_per_token(dense, reference[:, 1:])
        results[name] = {"gmacs": gmacs, "cosine_mean": cos.mean().item(), "cosine_median": cos.median().item(),
                         "cosine_p10": cos.flatten().quantile(0.1).item(), **extra}
        if logits is not None:
            results[name]["agreement"] = (logits.argmax(-1) == reference_pred).float().mean().item()
        print(name, json.dumps(results[name]), flush=True)
        maps[name] = cos[args.picture_index].view(16, 16)

    maps: dict[str, torch.Tensor] = {}
    for name, net in (("stvit_r_untrained", fresh), ("stvit_r", student)):
        feats = torch.cat([net.forward_features(c) for c in x.split(25)])
        record(name, feats[:, 1:], tr.flops(net).total_gmacs, net.forward_head(feats))
    for method in ("tome", "gtp"):
        options = tr.schedule_for_flops(model, method, target_gmacs)
        tr.patch(model, method, **options)
        dense, logits = (torch.cat(parts) for parts in zip(*(dense_from_trace(model, c) for c in x.split(25)),
                                                              strict=True))
        record(method, dense, tr.flops(model).total_gmacs, logits, options=options)
        tr.unpatch(model)

    torch.set_num_threads(1)
    batch = x[:args.speed_batch]
    speed = {"unreduced": images_per_second(model.forward_features, batch, args.repeats),
             "stvit_r": images_per_second(student.forward_features, batch, args.repeats)}
    for method in ("tome", "gtp"):
        tr.patch(model, method, **results[method]["options"])
        speed[method] = images_per_second(lambda c: dense_from_trace(model, c), batch, args.repeats)
        tr.unpatch(model)
    for name, ips in speed.items():
        results[name]["images_per_second"] = ips
        results[name]["speed_ratio"] = ips / speed["unreduced"]
    train_info = json.loads((WORK / "train.json").read_text())
    out = {
        "model": "vit_small_patch14_dinov2 (dinov2_s14_cifar10.safetensors), 224x224, 256 patches + CLS",
        "stvit_r_options": OPTIONS,
        "distillation": {k: v for k, v in train_info.items() if k != "loss_history"} | {
            "data": f"CIFAR-10 train, first {train_info['per_class']} images per class",
            "loss": "1 - cosine per patch token vs the unreduced final normed patch tokens",
            "trained": "the STViT-R unit only (blocks 0-3 frozen, final norm frozen)",
            "final_loss": statistics.mean(train_info["loss_history"][-10:])},
        "test": f"CIFAR-10 test, first {args.test_per_class} images per class ({len(x)} images)",
        "cosine": "per patch token, against the unreduced model's final normed patch tokens",
        "dense_restore": "tome/gtp: each patch takes the final normed token that holds it (trace owner)",
        "speed": {"threads": 1, "batch": args.speed_batch, "repeats": args.repeats, "torch": torch.__version__,
                  "dtype": "float32", "note": "median of repeats; tome/gtp include the trace and the unmerge"},
        "results": results,
    }
    (RESULTS / "stvit_dense.json").write_text(json.dumps(out, indent=1))

    fig, axes = plt.subplots(1, 2 + len(maps), figsize=(4 * (2 + len(maps)), 3.6))
    for name, r in results.items():
        axes[0].scatter(r["gmacs"], r["cosine_mean"], label=name)
    axes[0].set_xlabel("GMACs per image")
    axes[0].set_ylabel("mean per-token cosine")
    axes[0].legend(fontsize=7)
    axes[0].set_title("recovered grid vs unreduced")
    axes[1].plot(train_info["loss_history"])
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("1 - cosine")
    axes[1].set_title("STViT-R distillation")
    for ax, (name, cos) in zip(axes[2:], maps.items(), strict=True):
        im = ax.imshow(cos, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{name}: {cos.mean():.2f}", fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=axes[-1], fraction=0.046)
    fig.tight_layout()
    fig.savefig(RESULTS / "stvit_dense.png", dpi=110)
    print(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("train", "eval"))
    parser.add_argument("--per-class", type=int, default=40, dest="per_class", help="training images per class")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--speed-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--picture-index", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    (run_train if args.stage == "train" else run_eval)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
