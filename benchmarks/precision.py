"""Low precision and the methods' decisions (issue 22): does a bf16 / fp16 run reduce the same tokens as float32?

Two measurements, each run once with the library as it is (``--label after``) and once with another checkout's
``src`` first on the path (``--label before``: ``git worktree add /tmp/before <commit>`` then
``PYTHONPATH=/tmp/before/src python benchmarks/precision.py ... --label before``), and ``report`` joins them:

- ``classify``: the benchmark classifier (real DINOv2-S/14 + CIFAR-10 head, ``../shared/models``, the first
  ``--per-class`` test images of each class, as ``frontier.py``), every training-free method at about 65% of the
  unreduced GMACs: top-1 in float32 and in each low-precision mode, and the share of images whose low-precision
  prediction equals the float32 one. Modes: ``autocast`` (``torch.autocast("cpu", bfloat16)``), ``bf16``
  (``model.to(torch.bfloat16)``), ``fp16`` (``model.to(torch.float16)``). Per-image predictions are kept.
- ``hf``: ViT-S-sized Hugging Face CLIP, SigLIP and DINOv2 (random weights) with ``model.to(bfloat16 / float16)``
  against float32: the share of patches whose final token differs, the largest difference of the restored
  ``last_hidden_state``.
- ``demo``: the demo's DINOv2-S/14 (real weights) on ImageNet photos: per method, the mean cosine between the
  bf16-autocast and float32 restored patch features, the share of patches pruned differently (left the sequence
  in one run and not in the other, or at another block) and of patch pairs grouped differently (in the same
  token in one run and not in the other).
- ``replay``: the classifier in bf16 autocast with each method deciding for itself and with the float32 pass's
  decision inputs replayed (``DecisionReplay``): the agreement with float32 left when the tokens reduced are
  exactly float32's is what feature noise alone costs, which no decision precision can recover.

    python benchmarks/precision.py classify --per-class 50 --modes autocast --label after
    PYTHONPATH=/tmp/before/src python benchmarks/precision.py classify --per-class 50 --modes autocast --label before
    python benchmarks/precision.py demo --label after
    python benchmarks/precision.py replay --per-class 50 --out benchmarks/results/precision/native/replay_after.json
    python benchmarks/precision.py report          # -> results/precision/{precision.json,table.md}

Without native bf16 units (check ``lscpu`` for avx512_bf16 / amx) PyTorch's own bf16 / fp16 matmuls on CPU run
a slow reference kernel (7x slower than float32 for the classifier). ``--gemm fp32-accumulate`` (the default)
runs the matmuls, linears and convolutions of bf16 / fp16 tensors as an accelerator's GEMM does: the low-precision
inputs multiplied and accumulated in float32, the result (bias added) rounded once to the low dtype. Every other op
(attention, norms, residual adds, the methods' own work) runs in the low dtype as PyTorch runs it. ``--gemm native``
keeps PyTorch's CPU kernels (which round the product before the bias is added): the two are different valid bf16
computations, compared image for image in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontier  # noqa: E402  (the classifier, its images and their cache)
from paired import paired_change  # noqa: E402

import tokenreduce as tr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "precision"
LEVEL = 0.65
MODES = {"autocast": "bf16 autocast", "bf16": "model.to(bfloat16)", "fp16": "model.to(float16)"}
METHODS = ("tome", "topk", "evit", "gtp", "ppt")


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library() -> dict:
    src = Path(tr.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True)
    return {"src": "this checkout" if src == ROOT / "src" else "another checkout",
            "commit": head.stdout.strip() or "unknown"}


def schedules(model: torch.nn.Module) -> dict[str, dict]:
    """Each method's options at about ``LEVEL`` of the unreduced GMACs (and the unreduced model: None)."""
    base = tr.flops(model).total_gmacs
    out = {"unreduced": None}
    for name in METHODS:
        out[name] = tr.schedule_for_flops(model, name, target_gmacs=LEVEL * base)
    return out


class Float32AccumulateGemm(TorchDispatchMode):
    """Matmuls of bf16 / fp16 tensors computed as an accelerator GEMM does: float32 products and sums, one rounding.

    >>> lin = torch.nn.Linear(4, 3).to(torch.bfloat16)
    >>> with Float32AccumulateGemm():
    ...     out = lin(torch.ones(2, 4, dtype=torch.bfloat16))
    >>> out.dtype
    torch.bfloat16
    """

    aten = torch.ops.aten
    OPS = {aten.linear.default, aten.matmul.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
           aten.baddbmm.default, aten.convolution.default}
    LOW = (torch.bfloat16, torch.float16)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
            if len(dtypes) == 1 and (low := dtypes.pop()) in self.LOW:
                wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                return func(*wide, **kwargs).to(low)
        return func(*args, **kwargs)


@torch.inference_mode()
def predictions(model: torch.nn.Module, images: torch.Tensor, mode: str, batch_size: int,
                gemm: str = "fp32-accumulate") -> torch.Tensor:
    """Predicted classes of ``model`` on ``images`` in ``mode`` ("float32" or one of MODES)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    net = model.to(dtype) if dtype is not None else model
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=mode, leave=False):
        x = images[start:start + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            if gemm == "fp32-accumulate" and mode != "float32":
                with Float32AccumulateGemm():
                    logits = net(x.to(dtype) if dtype is not None else x)
            else:
                logits = net(x.to(dtype) if dtype is not None else x)
        out.append(logits.float().argmax(dim=-1))
    model.float()
    return torch.cat(out)


def classify(args: argparse.Namespace) -> dict:
    images, labels, names = frontier.load_images(args.per_class, Path(args.cache))
    model = frontier.load_model()
    rows, start = [], time.time()
    for name, options in schedules(model).items():
        if name != "unreduced":
            tr.patch(model, name, **options)
        gmacs = tr.flops(model).total_gmacs
        row = {"method": name, "options": options, "gmacs": gmacs}
        modes = (["float32"] if args.label == "after" else []) + list(args.modes)
        for mode in modes:
            t = time.time()
            predicted = predictions(model, images, mode, args.batch_size, args.gemm)
            row[mode] = {"top1": float((predicted == labels).float().mean()) * 100,
                         "predictions": predicted.tolist(), "seconds": round(time.time() - t, 1)}
            print(f"{args.label} {name} {mode}: top-1 {row[mode]['top1']:.2f} ({row[mode]['seconds']} s)", flush=True)
        rows.append(row)
        if name != "unreduced":
            tr.unpatch(model)
        write(args.out, {"kind": "classify", "label": args.label, "library": library(), "images": len(images),
                         "per_class": args.per_class, "cpu": cpu_name(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__, "gemm": args.gemm, "level": LEVEL, "labels": labels.tolist(),
                         "files": names, "rows": rows,
                         "seconds": round(time.time() - start)})
    return {}


class DecisionReplay:
    """Hand a low-precision pass the decision inputs of a float32 pass, so that it reduces exactly the same tokens.

    In ``record`` mode the wrapped method runs as usual and keeps what each reducing block hands it (the attention
    statistics and metric in ``stats``) and the features it begins from (GTP builds its graph from them); in
    ``replay`` mode it gets those float32 inputs instead of its own; in ``own`` mode it runs as usual, keeping
    nothing. Its features and blocks stay in the pass's precision, so the predictions that still differ from
    float32 differ through feature noise alone: what no choice of decision precision can remove. Installed as
    instance attributes of the patched method (a benchmark probe, not a library feature), removed by
    :meth:`remove`.

    >>> import timm
    >>> model = tr.patch(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, pretrained=False), "tome", r=4)
    >>> replay = DecisionReplay(tr.method_of(model))
    >>> with torch.no_grad():
    ...     _ = model(torch.randn(1, 3, 32, 32))
    >>> sorted(k for k in replay.recorded if k != "begin")
    [0, 1]
    >>> replay.remove()
    """

    def __init__(self, method) -> None:
        self.method, self.mode, self.recorded = method, "record", {}
        self._begin, self._reduce = method.begin, method.reduce  # the class's own, bound to the instance
        method.begin, method.reduce = self.begin, self.reduce

    def remove(self) -> None:
        del self.method.begin, self.method.reduce

    def begin(self, state, plan):
        if self.mode == "replay":
            return self._begin(state.replace(x=self.recorded["begin"]), plan).replace(x=state.x)
        if self.mode == "record":
            self.recorded["begin"] = state.x.detach().clone()
        return self._begin(state, plan)

    def reduce(self, block: int, state, stats: dict, amount: int):
        if self.mode == "replay":
            return self._reduce(block, state, self.recorded[block], amount)
        if self.mode == "record":
            self.recorded[block] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                    for k, v in stats.items()}
        return self._reduce(block, state, stats, amount)


@torch.inference_mode()
def replay_predictions(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Predictions of the patched ``model`` in float32, in bf16 autocast, and in bf16 autocast with the float32
    pass's decisions replayed (:class:`DecisionReplay`), batch by batch."""
    replay = DecisionReplay(tr.method_of(model))
    out: dict[str, list] = {"float32": [], "autocast": [], "autocast_replayed": []}
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="replay", leave=False):
            x = images[start:start + batch_size]
            replay.mode = "record"
            out["float32"].append(model(x).argmax(dim=-1))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                replay.mode = "replay"
                out["autocast_replayed"].append(model(x).float().argmax(dim=-1))
                replay.mode = "own"  # its own decisions
                out["autocast"].append(model(x).float().argmax(dim=-1))
    finally:
        replay.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def replay(args: argparse.Namespace) -> None:
    """Each method in bf16 autocast with its own (float32) decisions and with the float32 pass's decisions
    replayed: the agreement with float32 each reaches, beside the unreduced model's."""
    images, labels, names = frontier.load_images(args.per_class, Path(args.cache))
    model = frontier.load_model()
    rows, start = [], time.time()
    for name, options in schedules(model).items():
        if name == "unreduced":
            full = predictions(model, images, "float32", args.batch_size, "native")
            low = predictions(model, images, "autocast", args.batch_size, "native")
            row = {"method": name, "options": None,
                   "agreement": float((low == full).float().mean()) * 100,
                   "top1_float32": float((full == labels).float().mean()) * 100,
                   "top1_autocast": float((low == labels).float().mean()) * 100}
        else:
            tr.patch(model, name, **options)
            got = replay_predictions(model, images, args.batch_size)
            tr.unpatch(model)
            row = {"method": name, "options": options,
                   "agreement": float((got["autocast"] == got["float32"]).float().mean()) * 100,
                   "agreement_replayed": float((got["autocast_replayed"] == got["float32"]).float().mean()) * 100,
                   **{f"top1_{k}": float((v == labels).float().mean()) * 100 for k, v in got.items()}}
        print(f"replay {json.dumps(row)}", flush=True)
        rows.append(row)
        write(args.out, {"kind": "replay", "label": args.label, "library": library(), "images": len(images),
                         "per_class": args.per_class, "cpu": cpu_name(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__, "level": LEVEL, "rows": rows,
                         "seconds": round(time.time() - start)})


def grouping(state) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x n0 bool: the patch's token left the sequence, B x n0 x n0 bool: two patches share a token)."""
    left = state.left if state.left is not None else torch.zeros_like(state.owner, dtype=torch.bool)
    alone = left | (state.owner < 0)  # a patch that left (or has no token) shares nothing
    owner = torch.where(alone, -2 - torch.arange(state.owner.shape[1]), state.owner)
    return left, owner.unsqueeze(2) == owner.unsqueeze(1)


def demo(args: argparse.Namespace) -> None:
    from PIL import Image
    from torchvision import transforms

    from tokenreduce.measure.pretrained import load_demo_model

    model = load_demo_model().eval()
    photos = sorted((frontier.DATA_ROOT / "data" / "imagenet-val-1300").rglob("*.JPEG"))[:args.photos]
    if not photos:
        raise SystemExit(f"no photos under {frontier.DATA_ROOT / 'data' / 'imagenet-val-1300'}")
    cfg = model.pretrained_cfg
    normalize = transforms.Normalize(cfg.get("mean", frontier.MEAN), cfg.get("std", frontier.STD))
    preprocess = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                                     transforms.CenterCrop(224), transforms.ToTensor(), normalize])
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in photos])
    rows = []
    for name, options in schedules(model).items():
        if name != "unreduced":
            tr.patch(model, name, **options)
        with torch.inference_mode():
            full = tr.trace(model, x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = tr.trace(model, x)
            dense_full, dense_low = tr.restore(full[-1]).float(), tr.restore(low[-1]).float()
        prefix = full[-1].num_prefix
        cosine = F.cosine_similarity(dense_full[:, prefix:], dense_low[:, prefix:], dim=-1)
        row = {"method": name, "options": options, "cosine_mean": float(cosine.mean()),
               "cosine_min": float(cosine.min())}
        if name != "unreduced":
            # Per reducing block: which patches have left, which share a token; compared over the blocks.
            pruned, pairs = [], []
            for a, b in zip(full, low, strict=True):
                if a.owner is None:
                    continue
                left_a, same_a = grouping(a)
                left_b, same_b = grouping(b)
                pruned.append(left_a != left_b)
                pairs.append(same_a != same_b)
            row["pruned_differently"] = float(torch.stack(pruned).any(dim=0).float().mean())
            row["pairs_grouped_differently"] = float(torch.stack(pairs).any(dim=0).float().mean())
            tr.unpatch(model)
        print(f"{args.label} {name}: {json.dumps({k: v for k, v in row.items() if k != 'options'})}", flush=True)
        rows.append(row)
    write(args.out, {"kind": "demo", "label": args.label, "library": library(), "photos": [p.name for p in photos],
                     "cpu": cpu_name(), "torch": torch.__version__, "level": LEVEL, "rows": rows})


HF_MODELS = {  # ViT-S sized, random weights (seed 0): the families of the issue's measurement
    "CLIPVisionModel": ("CLIPVisionConfig", dict(patch_size=16)),
    "SiglipVisionModel": ("SiglipVisionConfig", dict(patch_size=16)),
    "Dinov2Model": ("Dinov2Config", dict(patch_size=14)),
}


def hf(args: argparse.Namespace) -> None:
    """Hugging Face models in bf16 / fp16 weights against float32: patches with another owner, and the largest
    difference of the restored ``last_hidden_state`` (unreduced beside it)."""
    import transformers

    rows = []
    for cls_name, (config_name, overrides) in HF_MODELS.items():
        config = getattr(transformers, config_name)(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                    intermediate_size=1536, image_size=224, **overrides)
        torch.manual_seed(0)
        model = getattr(transformers, cls_name)(config).eval()
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        for name, options in schedules(model).items():
            if name != "unreduced":
                tr.patch(model, name, **options)
            with torch.inference_mode():
                reference = model(x).last_hidden_state.float()
                owner = tr.trace(model, x)[-1].owner if name != "unreduced" else None
                for dtype in (torch.bfloat16, torch.float16):
                    low = model.to(dtype)
                    out = low(x.to(dtype)).last_hidden_state.float()
                    row = {"model": cls_name, "method": name, "options": options,
                           "dtype": str(dtype).removeprefix("torch."),
                           "max_abs_diff": float((out - reference).abs().max()),
                           "cosine_mean": float(F.cosine_similarity(out, reference, dim=-1).mean())}
                    if owner is not None:
                        low_owner = tr.trace(low, x.to(dtype))[-1].owner
                        row["other_owner"] = float((low_owner != owner).float().mean())
                    model.float()
                    rows.append(row)
                    print(f"{args.label} {json.dumps(row)}", flush=True)
            if name != "unreduced":
                tr.unpatch(model)
    write(args.out, {"kind": "hf", "label": args.label, "library": library(), "cpu": cpu_name(),
                     "torch": torch.__version__, "transformers": transformers.__version__, "level": LEVEL,
                     "rows": rows})


def write(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data) + "\n")


def native_comparison(folder: Path, after: dict, summary: dict) -> list[str]:
    """PyTorch's own CPU bf16 kernels (an earlier run on the first 10 images per class, ``folder``) against the
    float32-accumulating GEMM of this run, image for image on the images both saw (same files, sorted)."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("classify_*.json"))] if folder.is_dir() else []
    if not runs or after.get("gemm") != "fp32-accumulate" or "files" not in after:
        return []
    per_class = runs[0]["per_class"]
    # The earlier run kept no file names: its images are the first ``per_class`` of each class, in class order.
    index = [i for i, name in enumerate(after["files"]) if int(name.rsplit("/", 1)[1].split(".")[0]) < per_class]
    this = {(r["method"], mode): r[mode]["predictions"] for r in after["rows"] for mode in MODES if mode in r}
    lines = [f"PyTorch's own CPU bf16 kernels against the float32-accumulating GEMM (``--gemm``), bf16 autocast, on "
             f"the {len(index)} images both runs saw (share of images with the same prediction; top-1 of each):", "",
             "| method | same prediction | top-1 native | top-1 fp32-accumulate |", "|---|---:|---:|---:|"]
    labels = [after["labels"][i] for i in index]
    for run in runs:
        if run["label"] != "after":
            continue  # the library after the fix only: the emulation is checked once
        for row in run["rows"]:
            if "autocast" not in row or (row["method"], "autocast") not in this:
                continue
            native = row["autocast"]["predictions"]
            ours = [this[row["method"], "autocast"][i] for i in index]
            same = 100 * sum(a == b for a, b in zip(native, ours, strict=True)) / len(ours)
            top_native = 100 * sum(a == b for a, b in zip(native, labels, strict=True)) / len(labels)
            top_ours = 100 * sum(a == b for a, b in zip(ours, labels, strict=True)) / len(labels)
            summary.setdefault(row["method"], {})["native_vs_fp32_accumulate"] = {
                "images": len(index), "same_prediction": same, "top1_native": top_native, "top1_ours": top_ours}
            lines.append(f"| {row['method']} | {same:.0f}% | {top_native:.0f} | {top_ours:.0f} |")
    return lines + [""]


def report(args: argparse.Namespace) -> None:
    """Join the before / after runs of both measurements into precision.json and table.md."""
    found = (json.loads(p.read_text()) for p in Path(args.dir).glob("*.json") if p.name != "precision.json")
    runs = {f"{d['kind']}_{d['label']}": d for d in found if "kind" in d}  # (cost.json is precision_cost.py's)
    lines, summary = [], {}
    after, before = runs.get("classify_after"), runs.get("classify_before")
    if after:
        labels = torch.tensor(after["labels"])
        lines += [f"Benchmark classifier: {after['images']} CIFAR-10 test images, each method at about "
                  f"{round(100 * after['level'])}% of the unreduced GMACs; CPU: {after['cpu']} "
                  f"({after['threads']} threads), torch {after['torch']}. Top-1 in %, and the share of images whose "
                  "low-precision prediction equals the float32 one (agreement).", "",
                  "| method | mode | float32 top-1 | top-1 before | top-1 after | after: fixed / broken (McNemar p) "
                  "| agreement before | agreement after |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        by_before = {r["method"]: r for r in before["rows"]} if before else {}
        for row in after["rows"]:
            full = torch.tensor(row["float32"]["predictions"])
            for mode in MODES:
                if mode not in row:
                    continue
                cells = {}
                for label, source in (("after", row), ("before", by_before.get(row["method"], {}))):
                    if mode in source:
                        low = torch.tensor(source[mode]["predictions"])
                        cells[label] = (float((low == labels).float().mean()) * 100,
                                        float((low == full).float().mean()) * 100)
                # Is the top-1 change more than the flips both ways? (paired.py: exact McNemar test)
                change = paired_change(row["float32"]["predictions"], row[mode]["predictions"], after["labels"])
                summary.setdefault(row["method"], {})[mode] = {
                    "float32_top1": row["float32"]["top1"], **{f"{k}_top1": v[0] for k, v in cells.items()},
                    **{f"{k}_agreement": v[1] for k, v in cells.items()}, "after_change": change}

                def cell(label: str, i: int, cells: dict = cells) -> str:
                    return f"{cells[label][i]:.2f}" if label in cells else ""
                lines.append(f"| {row['method']} | {MODES[mode]} | {row['float32']['top1']:.2f} | {cell('before', 0)} "
                             f"| {cell('after', 0)} | {change['fixed']} / {change['broken']} "
                             f"({change['mcnemar_p']:.2f}) | {cell('before', 1)} | {cell('after', 1)} |")
        lines.append("")
        lines += native_comparison(Path(args.dir) / "native100", after, summary)
    replayed = runs.get("replay_after")
    if replayed:
        unreduced = next((r for r in replayed["rows"] if r["method"] == "unreduced"), None)
        lines += [f"Decisions replayed: the benchmark classifier on {replayed['images']} CIFAR-10 test images in bf16 "
                  "autocast, each method deciding for itself (in float32, from its bf16 keys and features) and with "
                  "the float32 pass's decision inputs replayed (`DecisionReplay`: the same tokens reduced as in "
                  f"float32); agreement with float32 in %; CPU: {replayed['cpu']}, torch {replayed['torch']}. The "
                  "unreduced model's agreement"
                  + (f" is {unreduced['agreement']:.2f}%." if unreduced else "."), "",
                  "| method | agreement, own decisions | agreement, float32 decisions replayed | top-1 float32 "
                  "| top-1 own | top-1 replayed |", "|---|---:|---:|---:|---:|---:|"]
        for row in replayed["rows"]:
            if row["method"] == "unreduced":
                continue
            lines.append(f"| {row['method']} | {row['agreement']:.2f} | {row['agreement_replayed']:.2f} "
                         f"| {row['top1_float32']:.2f} | {row['top1_autocast']:.2f} "
                         f"| {row['top1_autocast_replayed']:.2f} |")
            summary.setdefault(row["method"], {})["replay"] = row
        lines.append("")
    demo_after, demo_before = runs.get("demo_after"), runs.get("demo_before")
    if demo_after:
        lines += [f"Demo model (DINOv2-S/14, real weights), {len(demo_after['photos'])} ImageNet photos, about "
                  f"{round(100 * demo_after['level'])}% GMACs, bf16 autocast against float32 (restored patch "
                  "features with the method's default restore rule):", "",
                  "| method | cosine before | cosine after | pruned differently before | after "
                  "| pairs grouped differently before | after |", "|---|---:|---:|---:|---:|---:|---:|"]
        old = {r["method"]: r for r in demo_before["rows"]} if demo_before else {}
        for row in demo_after["rows"]:
            b = old.get(row["method"], {})

            def pct(r: dict, key: str) -> str:
                return f"{100 * r[key]:.1f}%" if key in r else ""
            lines.append(f"| {row['method']} | {b.get('cosine_mean', float('nan')):.4f} | {row['cosine_mean']:.4f} "
                         f"| {pct(b, 'pruned_differently')} | {pct(row, 'pruned_differently')} "
                         f"| {pct(b, 'pairs_grouped_differently')} | {pct(row, 'pairs_grouped_differently')} |")
            summary.setdefault(row["method"], {})["demo"] = {"before": b, "after": row}
    hf_after, hf_before = runs.get("hf_after"), runs.get("hf_before")
    if hf_after:
        lines += ["", "Hugging Face models (ViT-S sized, random weights, 2 random images) with their weights in bf16 / "
                  "fp16 against float32, about 65% GMACs: patches whose final token differs, and the largest "
                  "difference of the restored `last_hidden_state`:", "",
                  "| model | method | dtype | other owner before | after | max diff before | after |",
                  "|---|---|---|---:|---:|---:|---:|"]
        old = {(r["model"], r["method"], r["dtype"]): r for r in hf_before["rows"]} if hf_before else {}
        for row in hf_after["rows"]:
            b = old.get((row["model"], row["method"], row["dtype"]), {})

            def share(r: dict) -> str:
                return f"{100 * r['other_owner']:.1f}%" if "other_owner" in r else ""
            lines.append(f"| {row['model']} | {row['method']} | {row['dtype']} | {share(b)} | {share(row)} "
                         f"| {b.get('max_abs_diff', float('nan')):.3f} | {row['max_abs_diff']:.3f} |")
            summary.setdefault(row["method"], {}).setdefault("hf", []).append({"before": b, "after": row})
    Path(args.dir, "table.md").write_text("\n".join(lines) + "\n")
    Path(args.dir, "precision.json").write_text(json.dumps(
        {"runs": {k: {key: v[key] for key in v if key not in ("rows", "labels")} for k, v in runs.items()},
         "summary": summary}, indent=1) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("classify", "demo", "hf", "replay", "report"))
    parser.add_argument("--label", default="after", choices=("before", "after"))
    parser.add_argument("--per-class", type=int, default=50, help="classifier: test images per class (50: 500)")
    parser.add_argument("--modes", nargs="*", default=["autocast"], choices=list(MODES))
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--photos", type=int, default=4, help="demo: ImageNet photos")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "tokenreduce" / "frontier"))
    parser.add_argument("--out", default=None, help="result file (default: results/precision/<command>_<label>.json)")
    parser.add_argument("--dir", default=str(RESULTS), help="report: the folder of the runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gemm", default="fp32-accumulate", choices=("fp32-accumulate", "native"),
                        help="classify: how bf16 / fp16 matmuls run (see the module's text)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or str(RESULTS / f"{args.command}_{args.label}.json")
    {"classify": classify, "demo": demo, "hf": hf, "replay": replay, "report": report}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
