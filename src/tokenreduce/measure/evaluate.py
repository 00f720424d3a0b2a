"""The reduced and the unreduced model in the same pass over the data: top-1, top-5, agreement and KL.

Agreement is the share of images where both models predict the same class (no labels needed); KL is
the mean KL(unreduced || reduced) = sum_c p_unreduced(c) * (log p_unreduced(c) - log p_reduced(c)), i.e. the
divergence of the reduced model's distribution from the unreduced one's, in nats.

Under ``torchrun`` each rank evaluates the indices ``rank, rank + world, ...`` (no padding duplicates) and
the counts are summed with ``all_reduce`` (gloo on CPU, nccl on CUDA: :func:`dist_backend`), so the totals
equal a one-process run. On CUDA each process takes the GPU of its ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..adapters import predictor
from ..api import unwrap
from .data import ImageListDataset, collate_skip_broken, shard_indices

#: The order of the summed counters (one float64 tensor, all-reduced in one call).
COUNTERS = ("images", "labelled", "top1", "top5", "top1_unreduced", "top5_unreduced", "agree", "kl_sum", "broken")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    initialized_here: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_backend(device: torch.device | str) -> str:
    """The process-group backend for models on ``device``: nccl for CUDA, gloo otherwise.

    >>> dist_backend("cuda:1"), dist_backend("cpu")
    ('nccl', 'gloo')
    """
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def process_device(device: torch.device | str, env: dict[str, str] | None = None) -> torch.device:
    """The device of this process: under torchrun a bare ``cuda`` is the GPU of ``LOCAL_RANK``.

    >>> process_device("cuda", {"LOCAL_RANK": "1"})
    device(type='cuda', index=1)
    """
    device, env = torch.device(device), os.environ if env is None else env
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(env.get("LOCAL_RANK", "0")))
    return device


def init_distributed(device: torch.device | str = "cpu") -> DistContext:
    """Join the process group torchrun describes (:func:`dist_backend` of ``device``); a single process
    otherwise. On CUDA the process's GPU (:func:`process_device`) is made the current one."""
    device = process_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl and all_gather_object use the current GPU
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=device)
    if not dist.is_initialized():
        dist.init_process_group(dist_backend(device))
        return DistContext(dist.get_rank(), dist.get_world_size(), True, device)
    return DistContext(dist.get_rank(), dist.get_world_size(), False, device)


def close_distributed(context: DistContext) -> None:
    if context.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def _topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == labels[:, None]).any(-1)


def batch_counts(reduced: torch.Tensor, unreduced: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The ``COUNTERS`` of one batch of logits (float64)."""
    reduced, unreduced = reduced.float(), unreduced.float()
    labelled = labels >= 0
    log_p, log_q = unreduced.log_softmax(-1), reduced.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    values = [
        len(labels), labelled.sum(),
        (_topk_hits(reduced, labels, 1) & labelled).sum(), (_topk_hits(reduced, labels, 5) & labelled).sum(),
        (_topk_hits(unreduced, labels, 1) & labelled).sum(), (_topk_hits(unreduced, labels, 5) & labelled).sum(),
        (reduced.argmax(-1) == unreduced.argmax(-1)).sum(), kl.sum(), 0,
    ]
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def summarize(counts: torch.Tensor) -> dict[str, Any]:
    """Percentages and means from the summed counters."""
    c = dict(zip(COUNTERS, counts.tolist(), strict=True))
    images, labelled = int(c["images"]), int(c["labelled"])

    def pct(value: float, total: int) -> float | None:
        return 100.0 * value / total if total else None

    return {
        "images": images,
        "labelled": labelled,
        "broken": int(c["broken"]),
        "top1": pct(c["top1"], labelled),
        "top5": pct(c["top5"], labelled),
        "top1_unreduced": pct(c["top1_unreduced"], labelled),
        "top5_unreduced": pct(c["top5_unreduced"], labelled),
        "agreement": pct(c["agree"], images),
        "kl_unreduced_to_reduced": c["kl_sum"] / images if images else None,
    }


@torch.inference_mode()
def evaluate_pair(
    unreduced: nn.Module,
    reduced: nn.Module,
    dataset: ImageListDataset,
    batch_size: int = 32,
    workers: int = 0,
    limit: int | None = None,
    context: DistContext | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    desc: str = "eval",
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Evaluate both models on (this rank's share of) ``dataset`` on ``context.device`` (the models must be
    there), autocast to ``dtype`` below float32; counts summed over ranks. The logits are
    ``predict(model, images)``, by default the model family's (``tokenreduce.adapters.predictor``: a Hugging Face
    classifier's ``.logits``, a timm model's output).

    Returns ``summarize``'s fields plus ``broken_files`` (names of unreadable images, all ranks),
    ``seconds`` (this rank's whole pass) and ``first_batch_s`` (its first batch: a compiled model compiles).
    """
    from .speed import autocast, synchronize

    context = context or DistContext()
    predict = predict or predictor(unwrap(unreduced))
    device = context.device
    count = len(dataset) if limit is None else min(limit, len(dataset))
    subset = Subset(dataset, shard_indices(count, context.rank, context.world_size))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip_broken)
    counts = torch.zeros(len(COUNTERS), dtype=torch.float64)
    broken: list[int] = []
    unreduced.eval()
    reduced.eval()
    bar = tqdm(loader, desc=desc, unit="batch", disable=not (progress and context.is_main))
    start, first_batch_s = time.perf_counter(), None
    for batch in bar:
        broken += batch["broken"]
        counts[COUNTERS.index("broken")] += len(batch["broken"])
        if batch["images"] is None:
            continue
        images = batch["images"].to(device)
        with autocast(device, dtype):
            logits = predict(reduced, images).float().cpu(), predict(unreduced, images).float().cpu()
        counts += batch_counts(*logits, batch["labels"])
        if first_batch_s is None:
            synchronize(device)
            first_batch_s = time.perf_counter() - start
        done = summarize(counts)
        bar.set_postfix(agree=f"{done['agreement']:.1f}%", broken=done["broken"])
    names = [str(dataset.files[i]) for i in broken]
    synchronize(device)
    seconds = time.perf_counter() - start
    if context.world_size > 1:
        summed = counts.to(device) if device.type == "cuda" else counts  # nccl reduces GPU tensors only
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        counts = summed.cpu()
        gathered: list[list[str]] = [[] for _ in range(context.world_size)]
        dist.all_gather_object(gathered, names)
        names = sorted(name for part in gathered for name in part)
    return {**summarize(counts), "broken_files": names, "world_size": context.world_size, "seconds": seconds,
            "first_batch_s": first_batch_s}
