"""The exported graphs on real photos: every method at the README's settings (and STViT) on the real pre-trained
benchmark classifier (DINOv2 ViT-S/14 + CIFAR-10 linear head, ``../shared/models``), exported with
``tr.export_onnx`` and run in ONNX Runtime (CPU) on real ImageNet validation photos against PyTorch.

    python benchmarks/onnx_check.py                  # -> benchmarks/results/onnx_check.json (not a timing)

Photos: the first ``--count`` files of ``imagenet-val-1300/images`` (sorted), preprocessed as ``tokenreduce
export --images`` does (the model's timm data config at 224: bicubic resize, centre crop, ImageNet mean/std).
Each graph is exported with a dynamic batch axis and checked on the whole batch and on its first photo alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import tokenreduce as tr
from tokenreduce.commands.export import check_batch
from tokenreduce.export import export_onnx, onnx_session
from tokenreduce.measure.data import data_root

sys.path.insert(0, str(Path(__file__).parent))
from speed import SETTINGS  # noqa: E402  (the README's settings)

# The shared data and models: $TOKENREDUCE_DATA_ROOT, else ``shared`` beside the repository root.
SHARED = data_root(start=__file__, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(SHARED / "models" / "dinov2_s14_cifar10.safetensors"))
    parser.add_argument("--images", default=str(SHARED / "data" / "imagenet-val-1300" / "images"))
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "onnx_check.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model, prep = tr.load("vit_small_patch14_dinov2", checkpoint=args.checkpoint, img_size=224, num_classes=10)
    photos = check_batch(prep, args.images, args.count, (224, 224))
    folder = Path(tempfile.mkdtemp(prefix="onnx_check_"))
    variants = dict(SETTINGS)
    variants["stvit num_semantic=16 (untrained)"] = ("stvit", {"num_semantic": 16})
    rows = []
    for label, setting in variants.items():
        if setting is None:
            reduced = model
        elif setting[0] == "stvit":
            torch.manual_seed(0)
            reduced = tr.stvit.build(model, **setting[1]).eval()
        else:
            reduced = tr.patch(copy.deepcopy(model), setting[0], **setting[1])
        started = time.perf_counter()
        result = export_onnx(reduced, folder / f"{len(rows)}.onnx", images=photos, atol=args.atol)
        with torch.inference_mode():
            expected = reduced(photos).argmax(dim=-1)
        got = torch.from_numpy(onnx_session(result.path).run(None, {"images": photos.numpy()})[0]).argmax(dim=-1)
        row = {"label": label, "method": None if setting is None else setting[0],
               "options": {} if setting is None else setting[1], "gmacs": tr.flops(reduced).total_gmacs,
               "max_abs_diff": result.max_abs_diff, "checked_batches": list(result.checked_batches),
               "same_top1": float((expected == got).float().mean()), "export_s": time.perf_counter() - started}
        if setting is not None and setting[0] == "ppt":
            row["pooled_share"] = tr.diagnostics(reduced, photos)["pooled_share"]
        rows.append(row)
        print(f"{label:<34} max |onnxruntime - PyTorch| {result.max_abs_diff:.2e}, same top-1 "
              f"{row['same_top1']:.0%}", flush=True)
    import onnxruntime

    out = {"model": "vit_small_patch14_dinov2 + CIFAR-10 head (../shared/models/dinov2_s14_cifar10.safetensors)",
           "images": f"first {photos.shape[0]} of imagenet-val-1300/images", "img_size": [224, 224],
           "atol": args.atol, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
