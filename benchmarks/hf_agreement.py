"""Real-model agreement of the timm and Hugging Face paths (issue 12, item 4).

The benchmark classifier (``../shared/models/dinov2_s14_cifar10.safetensors``: timm ``vit_small_patch14_dinov2``,
224 x 224, 10 classes) is converted by key mapping to ``transformers``' ``Dinov2ForImageClassification`` (its
classifier reads ``[CLS, mean of patch tokens]``; timm's head reads the CLS only, so the patch-mean half of the
classifier weight is zero), saved with ``save_pretrained`` to a temporary directory and loaded back with
``from_pretrained``. ToMe r=13 and GTP r=13 (and with ``--unreduced`` the unreduced models): top-1 of both paths
on the 2,000 frontier images (first 200 per class of the CIFAR-10 test set, see ``benchmarks/frontier.py``), the
share of images whose predicted class agrees, and the largest logit difference.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hf_agreement.py
        -> benchmarks/results/hf_agreement.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import transformers  # noqa: E402
from frontier import load_images, load_model  # noqa: E402
from hf_convert import timm_to_hf_dinov2  # noqa: E402
from transformers import Dinov2ForImageClassification  # noqa: E402

import tokenreduce as tr  # noqa: E402

SETTINGS = [("tome r=13", "tome", {"r": 13}), ("gtp r=13", "gtp", {"r": 13})]
UNREDUCED = ("unreduced", None, {})


@torch.inference_mode()
def logits_of(model: torch.nn.Module, images: torch.Tensor, batch_size: int, hf: bool) -> torch.Tensor:
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        out.append(model(pixel_values=x).logits if hf else model(x))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unreduced", action="store_true", help="also compare the unreduced models")
    parser.add_argument("--only", default=None, help="run only the settings whose label starts with this (e.g. gtp)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/hf_agreement.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, labels, _ = load_images(args.per_class, Path.home() / ".cache/tokenreduce/frontier")
    timm_model = load_model()
    with tempfile.TemporaryDirectory() as tmp:
        timm_to_hf_dinov2(timm_model, "sdpa", classifier=True).save_pretrained(tmp)
        hf_model = Dinov2ForImageClassification.from_pretrained(tmp, attn_implementation="sdpa").eval()
    result = {"model": "dinov2_s14_cifar10 (timm vit_small_patch14_dinov2, 224, 10 classes)",
              "hf_class": "Dinov2ForImageClassification (save_pretrained -> from_pretrained, sdpa)",
              "images": len(images), "transformers": transformers.__version__, "torch": torch.__version__,
              "threads": args.threads, "settings": {}}
    settings = ([UNREDUCED] if args.unreduced else []) + SETTINGS
    for label, method, options in [s for s in settings if args.only is None or s[0].startswith(args.only)]:
        start = time.perf_counter()
        if method is None:
            tr.unpatch(timm_model)
            tr.unpatch(hf_model)
        else:
            tr.patch(timm_model, method, **options)
            tr.patch(hf_model, method, **options)
        assert tr.describe(timm_model)["tokens_out"] == tr.describe(hf_model)["tokens_out"]
        a = logits_of(timm_model, images, args.batch_size, hf=False)
        b = logits_of(hf_model, images, args.batch_size, hf=True)
        pa, pb = a.argmax(1), b.argmax(1)
        row = {"gmacs": round(tr.flops(hf_model).total_gmacs, 4),
               "tokens_out": tr.describe(hf_model)["tokens_out"],
               "top1_timm": round(100 * (pa == labels).float().mean().item(), 2),
               "top1_hf": round(100 * (pb == labels).float().mean().item(), 2),
               "prediction_agreement": round(100 * (pa == pb).float().mean().item(), 2),
               "max_abs_logit_diff": (a - b).abs().max().item(),
               "seconds": round(time.perf_counter() - start, 1)}
        result["settings"][label] = row
        print(label, row, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every setting: partial runs keep theirs
    print("wrote", args.out)


if __name__ == "__main__":
    main()
