"""Token reduction on video: the training-free methods on a small VideoMAE at 16 frames, and STViT on Video Swin-T.

    python benchmarks/video.py                  # the real run (quiet machine): writes benchmarks/results/video.json
    python benchmarks/video.py --skip-speed     # cost, image comparison and picture only (no timings)
    python benchmarks/video.py --tiny           # self-check on tiny settings (seconds); writes to a temp file

What it measures (random weights: speed and cost do not depend on them; this machine cannot train on Kinetics):

1. VideoMAE-S (ViT-S widths: 384 wide, 12 layers, 6 heads; 16 frames of 224 px, 2 x 16 x 16 tubelets: 1,568
   tokens, no CLS, mean pooling). Every training-free method at about 70% and 50% of the unreduced GMACs
   (``tr.schedule_for_flops``; Top-K, EViT and PPT reduce at layers 3, 6, 9): GMACs, the GMACs ratio (the
   ceiling of the speed-up) and the measured speed ratio (interleaved rounds, median).
2. The same method on the image model of the same widths (ViT-S at 224 px, 197 tokens) at the same share of
   tokens removed (the mean over blocks of the tokens each block's MLP runs on, as a share of the input
   tokens): the GMACs saving there beside the video's. Video attention is quadratic in 1,568 tokens, so the
   same share of tokens removed saves more. The image model is timed with 8 images per clip (1,576 tokens).
3. STViT on Video Swin-T (torchvision ``swin3d_t``; semantic tokens per frame window in stage 3): GMACs at 32
   frames x 224 px (Video Swin's own reporting), against Video Swin-T, and the speed ratio at that clip size.
4. A picture: one clip made by panning across one shared ImageNet photo, and which tubelets each method keeps,
   merges and prunes over its 8 time steps (``benchmarks/results/video/tokens_over_frames.png``).

Every reported GMACs figure is checked against ``FlopCounterMode`` (eager attention; within 1%) in ``--tiny``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce as tr
from tokenreduce.measure.data import data_root
from tokenreduce.measure.speed import environment

RESULTS = Path(__file__).parent / "results"
# The shared data (tokenreduce.measure.data.data_root, the one place that finds it): $TOKENREDUCE_DATA_ROOT,
# else ``shared`` beside the repository root.
DATA_ROOT = data_root(start=__file__, check=False)
PHOTOS = DATA_ROOT / "data" / "imagenet-val-1300" / "images"
PHOTO = "ILSVRC2012_val_00000347.JPEG"
METHODS = ("tome", "topk", "evit", "gtp", "ppt")
SHARES = (0.7, 0.5)
# VideoMAE's classifier averages the restored token grid, so a restore rule's cost is part of its forward pass. The
# settings restore by ``departure`` (a left tubelet counts with the feature it had when it left: no extra products);
# the default rule of Top-K / EViT / GTP / PPT (``ridge``, made for dense heads) would add its regression on every
# clip, reported per row as ``video_default_restore_gmacs``.
RESTORE = "departure"
VIDEO = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, image_size=224,
             patch_size=16, num_frames=16, tubelet_size=2, num_labels=400)
TINY = dict(hidden_size=48, num_hidden_layers=8, num_attention_heads=3, intermediate_size=96, image_size=96,
            patch_size=8, num_frames=8, tubelet_size=2, num_labels=10)


def fixed_options(method: str, depth: int) -> dict[str, Any]:
    """The options a schedule search keeps fixed: the pruning methods reduce at a quarter, half, three quarters,
    and every method restores by ``departure`` (see ``RESTORE``)."""
    layers = (depth // 4, depth // 2, 3 * depth // 4)
    return {"layers": layers, "restore": RESTORE} if method in ("topk", "evit", "ppt") else {"restore": RESTORE}


def video_model(config: dict[str, Any], impl: str = "sdpa") -> torch.nn.Module:
    cfg = transformers.VideoMAEConfig(**config)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.VideoMAEForVideoClassification(cfg).eval()


def image_model(config: dict[str, Any], impl: str = "sdpa") -> torch.nn.Module:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
            "num_labels")
    cfg = transformers.ViTConfig(**{k: config[k] for k in keys})
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(cfg).eval()


def tokens_removed(model: torch.nn.Module) -> float:
    """Share of tokens removed: 1 - mean over blocks of the tokens each block's MLP runs on / the input tokens."""
    out = tr.describe(model)["tokens_out"]
    total = tr.flops(model).blocks[0].tokens_in
    return 1.0 - sum(out) / (len(out) * total)


def counted_gmacs(model: torch.nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def interleaved(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, warmup: int) -> dict[str, dict]:
    """Median seconds per call of every model on ``x``, timed round by round in turn (the speed protocol)."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                model(x)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                seconds[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "spread_s": [min(t), max(t)]} for name, t in seconds.items()}


def settings_for(model: torch.nn.Module, shares: tuple[float, ...]) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (method, options) for every method at every share of the unreduced GMACs."""
    base = tr.flops(model).gmacs
    depth = len(tr.describe(model)["tokens_in"])
    out = {}
    for method in METHODS:
        for share in shares:
            try:
                options = tr.schedule_for_flops(model, method, share * base, **fixed_options(method, depth))
            except ValueError as err:  # e.g. GTP's constant r on a shallow tiny model
                print(f"skipped {method} at {share:.0%}: {err}")
                continue
            out[f"{method} {int(share * 100)}%"] = (method, options)
    return out


def image_match(image: torch.nn.Module, method: str, options: dict[str, Any], share: float) -> dict[str, Any]:
    """The options of ``method`` on the image model whose share of tokens removed is closest to ``share``."""
    knob = "keep_rate" if "keep_rate" in options else "r"
    candidates = ([k / 200 for k in range(1, 201)] if knob == "keep_rate"
                  else range(0, tr.flops(image).blocks[0].tokens_in))
    best, best_gap = None, float("inf")
    for value in candidates:
        trial = {**options, knob: value}
        try:
            tr.patch(image, method, **trial)
        except ValueError:
            continue
        gap = abs(tokens_removed(image) - share)
        if gap < best_gap:
            best, best_gap = trial, gap
    tr.unpatch(image)
    return best


def cost_rows(video: torch.nn.Module, image: torch.nn.Module) -> list[dict[str, Any]]:
    """Per setting: the video schedule, its GMACs, ratio and tokens removed; the image schedule at the same share
    of tokens removed and its saving."""
    video_base, image_base = tr.flops(video).gmacs, tr.flops(image).gmacs
    rows = []
    for label, (method, options) in settings_for(video, SHARES).items():
        tr.patch(video, method, **{k: v for k, v in options.items() if k != "restore"})
        default_restore = tr.flops(video).restore_gmacs  # what the method's default rule would add
        tr.patch(video, method, **options)
        report = tr.flops(video)
        removed = tokens_removed(video)
        image_options = image_match(image, method, options, removed)
        tr.patch(image, method, **image_options)
        image_report = tr.flops(image)
        rows.append({
            "label": label, "method": method, "options": options,
            "video_gmacs": report.total_gmacs, "video_baseline_gmacs": video_base,
            "video_gmacs_share": report.total_gmacs / video_base, "video_gmacs_ratio": video_base / report.total_gmacs,
            "video_tokens_removed": removed, "video_saving": 1 - report.total_gmacs / video_base,
            "video_restore_gmacs": report.restore_gmacs, "video_default_restore_gmacs": default_restore,
            "image_options": image_options, "image_gmacs": image_report.total_gmacs,
            "image_baseline_gmacs": image_base, "image_tokens_removed": tokens_removed(image),
            "image_saving": 1 - image_report.total_gmacs / image_base,
        })
        tr.unpatch(video)
        tr.unpatch(image)
    return rows


def speed_rows(video: torch.nn.Module, image: torch.nn.Module, rows: list[dict[str, Any]], config: dict[str, Any],
               batch_sizes: list[int], rounds: int, warmup: int) -> list[dict[str, Any]]:
    """Speed ratios (reduced over unreduced, interleaved medians) of the video and the image settings."""
    out = []
    for batch in batch_sizes:
        clip = torch.randn(batch, config["num_frames"], 3, config["image_size"], config["image_size"])
        images = torch.randn(8 * batch, 3, config["image_size"], config["image_size"])
        for kind, model, x, key in (("video", video, clip, "options"), ("image", image, images, "image_options")):
            variants = {"unreduced": tr.unpatch(copy.deepcopy(model))}
            for row in rows:
                variants[row["label"]] = tr.patch(copy.deepcopy(variants["unreduced"]), row["method"], **row[key])
            timings = interleaved(variants, x, rounds, warmup)
            base = timings["unreduced"]["median_s"]
            for row in rows:
                gmacs_ratio = row["video_gmacs_ratio"] if kind == "video" else 1 / (1 - row["image_saving"])
                speed = base / timings[row["label"]]["median_s"]
                out.append({"kind": kind, "label": row["label"], "batch_size": x.shape[0], "speed_ratio": speed,
                            "gmacs_ratio": gmacs_ratio, "share_of_ceiling": speed / gmacs_ratio,
                            "median_s": timings[row["label"]]["median_s"], "unreduced_median_s": base,
                            "spread_s": timings[row["label"]]["spread_s"]})
    return out


def video_swin(clip: tuple[int, int, int], speed: bool, rounds: int, warmup: int, tiny: bool) -> dict[str, Any]:
    """STViT-Video-Swin-T against Video Swin-T: analytic GMACs at ``clip`` (frames, height, width), the check
    against FlopCounterMode on a small clip, and (with ``speed``) the speed ratio at ``clip``."""
    from torchvision.models.video import swin3d_t
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    from tokenreduce.stvit import build_video_swin
    from tokenreduce.stvit.video_swin import video_swin_flops

    torch.manual_seed(0)
    host = (SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=24, depths=[1, 1, 6, 1], num_heads=[1, 2, 4, 8],
                              window_size=[8, 7, 7], num_classes=10) if tiny else swin3d_t()).eval()
    model = build_video_swin(host).eval()
    base = video_swin_flops(host, clip).gmacs
    report = model.tokenreduce_flops(clip[1:], frames=clip[0])
    out: dict[str, Any] = {"clip": list(clip), "video_swin_t_gmacs": base, "stvit_gmacs": report.gmacs,
                           "stvit_overhead_gmacs": report.overhead_gmacs, "stvit_total_gmacs": report.total_gmacs,
                           "saving": 1 - report.total_gmacs / base, "gmacs_ratio": base / report.total_gmacs,
                           "paper_saving": 0.27, "build": {"tokens_per_window": model.tokens_per_window,
                                                           "full_blocks": model.full_blocks, "pooling": model.pooling},
                           "notes": list(report.notes)}
    if tiny:  # the analytic cost against FlopCounterMode (fused attention off) on the small clip
        x = torch.randn(1, 3, *clip)
        unfused = copy.deepcopy(model)
        for module in unfused.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        out["check"] = {"host": counted_gmacs(host, x) / base, "stvit": counted_gmacs(unfused, x) / report.total_gmacs}
    if not tiny:  # where the -27% of the paper's Table 6 lies: every placement, on meta tensors (cost only)
        from torchvision.models.video import swin3d_s

        out["sweep"] = []
        with torch.device("meta"):
            for name, make in (("swin3d_t", swin3d_t), ("swin3d_s", swin3d_s)):
                meta = make()
                meta_base = video_swin_flops(meta, clip).gmacs
                for full_blocks in range(len(meta.features[4]) - 1):
                    for tokens in (4, 9, 16):
                        built = build_video_swin(meta, tokens_per_window=tokens, full_blocks=full_blocks)
                        total = built.tokenreduce_flops(clip[1:], frames=clip[0]).total_gmacs
                        out["sweep"].append({"model": name, "full_blocks": full_blocks, "tokens_per_window": tokens,
                                             "gmacs": total, "baseline_gmacs": meta_base,
                                             "saving": 1 - total / meta_base})
    if speed:
        x = torch.randn(1, 3, *clip)
        timings = interleaved({"video swin-t": host, "stvit": model}, x, rounds, warmup)
        ratio = timings["video swin-t"]["median_s"] / timings["stvit"]["median_s"]
        out["speed"] = {"batch_size": 1, "speed_ratio": ratio, "gmacs_ratio": out["gmacs_ratio"], "timings": timings}
    return out


def panned_clip(frames: int, size: int, step: int) -> tuple[torch.Tensor, np.ndarray]:
    """A clip panning left to right across one shared photo: (model input 1 x T x 3 x H x W, frames T x H x W x 3)."""
    from PIL import Image

    photo = Image.open(PHOTOS / PHOTO).convert("RGB")
    width = size + step * (frames - 1)
    scale = max(size / photo.height, width / photo.width)  # keep the aspect ratio, then crop the middle rows
    photo = photo.resize((max(width, round(photo.width * scale)), max(size, round(photo.height * scale))),
                         Image.BICUBIC)
    top = (photo.height - size) // 2
    pixels = np.asarray(photo, dtype=np.float32)[top:top + size] / 255.0
    shown = np.stack([pixels[:, i * step: i * step + size] for i in range(frames)])
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(((shown - mean) / std).astype(np.float32)).permute(0, 3, 1, 2).unsqueeze(0)
    return x, shown


def repo_relative(path: Path) -> str:
    """``path`` from the repository root (results name no absolute path of the machine they ran on)."""
    try:
        return Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix()
    except ValueError:
        return str(path)


def picture(video: torch.nn.Module, rows: list[dict[str, Any]], config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Which tubelets each method keeps, merges and prunes over the frames of a panned clip (the 50% schedules),
    after the last block; one row per method, one column per time step (its first frame)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenreduce.measure.viz import render_clip_tokens

    tubelet = config["tubelet_size"]
    x, shown = panned_clip(config["num_frames"], config["image_size"], 8)
    chosen = [r for r in rows if r["label"].endswith("50%")]
    steps = config["num_frames"] // tubelet
    fig, axes = plt.subplots(len(chosen) + 1, steps, figsize=(1.6 * steps, 1.75 * (len(chosen) + 1)), dpi=80,
                             squeeze=False)
    counts = {}
    for t in range(steps):
        axes[0, t].imshow(shown[t * tubelet])
        axes[0, t].set_title(f"t = {t}", fontsize=8)
    axes[0, 0].set_ylabel("clip", fontsize=8)
    for i, row in enumerate(chosen, start=1):
        tr.patch(video, row["method"], **row["options"])
        with torch.no_grad():
            last = tr.trace(video, x)[-1]
        pictures, counts[row["label"]] = render_clip_tokens(shown[::tubelet], last.owner[0], last.grid)
        for t, pic in enumerate(pictures):
            axes[i, t].imshow(pic)
        c = counts[row["label"]]
        axes[i, 0].set_ylabel(f"{row['method']}\n{c['tokens']} tokens", fontsize=8)
    tr.unpatch(video)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("VideoMAE-S (random weights), 50% of the GMACs: tubelets after the last block\n"
                 "(one colour per merged / propagated token, across frames; dark: pruned)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return {"path": repo_relative(out), "photo": PHOTO, "pan_px_per_frame": 8, "counts": counts}


def self_check(video: torch.nn.Module, image: torch.nn.Module, rows: list[dict[str, Any]], config: dict) -> None:
    """On tiny settings: every schedule meets its target, its analytic GMACs match FlopCounterMode within 1%,
    and nothing to remove gives the unreduced outputs."""
    clip = torch.randn(1, config["num_frames"], 3, config["image_size"], config["image_size"])
    eager_video, eager_image = video_model(config, "eager"), image_model(config, "eager")
    for row in rows:
        share = int(row["label"].split()[-1][:-1]) / 100
        assert row["video_gmacs_share"] <= share + 1e-9, row
        tr.patch(eager_video, row["method"], **row["options"])
        counted = counted_gmacs(eager_video, clip)
        assert abs(counted / row["video_gmacs"] - 1) < 0.01, (row["label"], counted, row["video_gmacs"])
        tr.patch(eager_image, row["method"], **row["image_options"])
        counted = counted_gmacs(eager_image, clip[:, 0])
        assert abs(counted / row["image_gmacs"] - 1) < 0.01, (row["label"], counted, row["image_gmacs"])
        assert abs(row["image_tokens_removed"] - row["video_tokens_removed"]) < 0.1, row
    tr.unpatch(eager_video)
    with torch.no_grad():
        expected = eager_video(clip).logits
        tr.patch(eager_video, "tome", r=0)
        assert torch.allclose(eager_video(clip).logits, expected, atol=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny settings, self-checks, output to a temp file")
    parser.add_argument("--skip-speed", action="store_true", help="cost, image comparison and picture only")
    parser.add_argument("--batch-sizes", default="1,4", help="clips per batch (the image model runs 8x as many)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = TINY if args.tiny else VIDEO
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) / "video.json" if args.tiny
                                           else RESULTS / "video.json")
    rounds, warmup = (2, 1) if args.tiny else (args.rounds, args.warmup)
    torch.set_num_threads(torch.get_num_threads())
    video, image = video_model(config), image_model(config)

    started = time.perf_counter()
    rows = cost_rows(video, image)
    if args.tiny:
        self_check(video, image, rows, config)
    result: dict[str, Any] = {
        "config": {"videomae": config, "image_vit": "the same widths on one 224 px image (ViTForImageClassification)",
                   "weights": "random (speed and cost do not depend on them)"},
        "environment": environment(),
        "settings": rows,
        "speed": None,
        "video_swin": video_swin((16, 112, 112) if args.tiny else (32, 224, 224), not args.skip_speed, rounds,
                                 warmup, args.tiny),
    }
    if args.tiny:
        check = result["video_swin"]["check"]
        assert abs(check["host"] - 1) < 0.01 and abs(check["stvit"] - 1) < 0.01, check
    if not args.skip_speed:
        batches = [int(b) for b in args.batch_sizes.split(",")]
        result["speed"] = {"protocol": f"interleaved rounds, median; {rounds} rounds after {warmup} warm-up",
                           "rows": speed_rows(video, image, rows, config, batches[:1] if args.tiny else batches,
                                              rounds, warmup)}
    picture_path = out.parent / "video" / "tokens_over_frames.png"
    result["picture"] = picture(video, rows, config, picture_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    for row in rows:
        print(f"{row['label']:>10}  video {row['video_gmacs']:7.2f} GMACs ({row['video_saving']:.0%} saved, "
              f"{row['video_tokens_removed']:.0%} tokens removed)  image at the same share: "
              f"{row['image_saving']:.0%} saved")
    swin = result["video_swin"]
    print(f"STViT-Video-Swin-T {swin['stvit_total_gmacs']:.2f} vs Video Swin-T {swin['video_swin_t_gmacs']:.2f} "
          f"GMACs ({swin['saving']:.1%} saved; paper 27%)")


if __name__ == "__main__":
    main()
