"""The throughput protocol of ``specs/measurement.md``: time the model only, inputs already made, under
``torch.inference_mode()``, a warm-up, then repeated timed batches; medians and spread; the unreduced model
timed in the same run, interleaved, so that the ratio survives a noisy shared machine.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import api
from ..core.errors import InputError


@dataclass
class Timing:
    """Images per second of one model at one setting (median over the timed rounds)."""

    label: str
    batch_size: int
    img_size: int
    images_per_s: float
    spread: tuple[float, float]
    seconds: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None


def environment(dtype: torch.dtype = torch.float32, compiled: bool = False) -> dict[str, Any]:
    """The settings every speed number must carry."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "dtype": str(dtype).replace("torch.", ""),
        "attention": "fused sdpa where no full map is needed",
        "compile": compiled,
    }


def _time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare_speed(
    models: dict[str, nn.Module],
    batch_size: int,
    img_size: int = 224,
    warmup: int = 2,
    rounds: int = 7,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Timing]:
    """Time several models on the same input, interleaved round by round.

    Each round times every model once on the same batch, in turn, so slow phases of a shared machine hit
    them all alike; the result per model is the median over rounds (and the min-max spread).

    >>> import timm
    >>> m = timm.create_model("deit_tiny_patch16_224", depth=2).eval()
    >>> t = compare_speed({"base": m}, batch_size=1, warmup=1, rounds=2)
    >>> t["base"].images_per_s > 0
    True
    """
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else None
    seconds: dict[str, list[float]] = {name: [] for name in models}

    def run(model: nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            if autocast is None:
                return model(images)
            with torch.autocast("cpu", dtype=dtype):
                return model(images)
        return call

    with torch.inference_mode():
        for model in models.values():
            model.eval()
            for _ in range(warmup):
                run(model)()
        for _ in range(rounds):
            for name, model in models.items():
                seconds[name].append(_time_once(run(model)))
    out = {}
    for name, times in seconds.items():
        rates = [batch_size / t for t in times]
        out[name] = Timing(name, batch_size, img_size, statistics.median(rates), (min(rates), max(rates)), times)
    return out


def method_speedups(
    model: nn.Module,
    settings: dict[str, tuple[str, dict[str, Any]] | nn.Module | None],
    batch_sizes: Sequence[int] = (1, 32),
    img_size: int = 224,
    rounds: int = 7,
    warmup: int = 2,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, Any]]:
    """Speed of each ``settings`` entry (label -> (method, options), a ready model such as an STViT, or None for
    unreduced) relative to the unreduced model, per batch size, with the GMACs ratio (the ceiling) beside it.

    Returns JSON-ready rows: label, method, options, batch size, images/s, spread, speed-up, GMACs, ceiling.
    """
    unreduced = api.unpatch(copy.deepcopy(model))
    variants: dict[str, nn.Module] = {}
    gmacs: dict[str, float] = {}
    for label, setting in settings.items():
        if isinstance(setting, nn.Module):
            variant = setting
        else:
            variant = copy.deepcopy(unreduced)
            if setting is not None:
                api.patch(variant, setting[0], **setting[1])
        variants[label] = variant
        gmacs[label] = api.flops(variant, img_size).total_gmacs
    base_label = next((label for label, s in settings.items() if s is None), None)
    if base_label is None:
        raise InputError("settings must include the unreduced model (a label mapped to None)")
    rows = []
    for batch_size in batch_sizes:
        timings = compare_speed(variants, batch_size, img_size, warmup, rounds, dtype)
        base = timings[base_label].images_per_s
        for label, timing in timings.items():
            setting = settings[label]
            method, options = (setting if isinstance(setting, tuple) else
                               (None if setting is None else type(setting).__name__, {}))
            rows.append({
                "label": label,
                "method": method,
                "options": options,
                "batch_size": batch_size,
                "img_size": img_size,
                "images_per_s": timing.images_per_s,
                "spread": list(timing.spread),
                "speedup": timing.images_per_s / base,
                "gmacs": gmacs[label],
                "gmacs_ratio": gmacs[base_label] / gmacs[label],
            })
    return rows


def timing_dict(timing: Timing) -> dict[str, Any]:
    return asdict(timing)
