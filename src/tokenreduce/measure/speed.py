"""The throughput protocol of ``specs/measurement.md``: time the model only, inputs already made, under
``torch.inference_mode()``, a warm-up, then repeated timed batches; medians and spread; the unreduced model
timed in the same run, interleaved, so that the ratio survives a noisy shared machine.

On any device: ``device`` and ``dtype`` (autocast below float32) are arguments, CUDA batches are timed with
CUDA events after a synchronisation (:func:`timer_for`), and peak memory is the CUDA allocator's peak on a
GPU and the resident-set growth of ``measure.memory`` on the CPU (:func:`peak_memory`).

``compile_mode`` times ``torch.compile(model, mode=..., dynamic=False)`` instead of the eager model: one
graph specialised to each batch and image size, compiled afresh for each (after ``torch._dynamo.reset()``, and with
room in dynamo's recompile limit for every variant of the group: :func:`recompile_room`); the first call of the
warm-up, which compiles, is reported apart as ``first_call_s`` and never among the timed rounds.

What recompiles when a user compiles a patched model with the defaults, ``torch.compile(model)``
(``dynamic=None``), counted with ``torch._dynamo.utils.counters["stats"]["unique_graphs"]`` on torch 2.14 for a
timm ViT patched with each method (and unpatched: the same):

- the same batch and image size again: nothing;
- a second batch size (2 or more): one recompile; dynamo then marks the batch dimension dynamic, and every
  later batch size of 2 or more runs that graph;
- batch size 1: one recompile of its own (dynamo specialises sizes 0 and 1), then reused;
- a new image size (``dynamic_img_size=True``): one recompile for every new size, every time: the graph
  is specialised to the grid (the unpatched timm model does the same); a batch of 1 at a new size is one more;
- GTP only: the second call of a new grid recompiles once more (its spatial graph is cached in a module-level
  dict that the first compiled call fills; ``tests/test_compile.py`` marks it);
- past ``torch._dynamo.config.recompile_limit`` (8) graphs of one function, dynamo runs new shapes eagerly.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import api
from ..core.errors import InputError
from .memory import WHAT as CPU_MEMORY_WHAT
from .memory import peak_memory_mb

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_MEMORY_WHAT = "CUDA allocator peak of one forward pass above what was allocated before it " \
                   "(torch.cuda.max_memory_allocated after reset_peak_memory_stats), MB"


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
    #: The first call of the warm-up (for a compiled model: compilation included), never in ``seconds``.
    first_call_s: float | None = None


def device_name(device: torch.device) -> str:
    """What the device is: the GPU's name on CUDA, the processor on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS (" + (platform.processor() or platform.machine()) + ")"
    return platform.processor() or platform.machine()


def environment(dtype: torch.dtype = torch.float32, compiled: bool | str = False,
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """The settings every speed number must carry (``compiled``: False or the ``torch.compile`` mode)."""
    device = torch.device(device)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "dtype": str(dtype).replace("torch.", ""),
        "attention": "fused sdpa where no full map is needed",
        "compile": compiled,
    }


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (CPU, CUDA or MPS); nothing for float32."""
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _wall_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _cuda_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    # Events time the GPU stream from before the first kernel to after the last; launch gaps are included.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def timer_for(device: torch.device | str) -> Callable[[Callable[[], Any], torch.device], float]:
    """The function that times one call on ``device``: CUDA events on CUDA, the wall clock between device
    synchronisations elsewhere.

    >>> timer_for("cpu").__name__
    '_wall_seconds'
    """
    return _cuda_seconds if torch.device(device).type == "cuda" else _wall_seconds


def memory_measure(device: torch.device | str) -> str | None:
    """What :func:`peak_memory` measures on ``device`` (None: not measured there)."""
    kind = torch.device(device).type
    return {"cuda": CUDA_MEMORY_WHAT, "cpu": CPU_MEMORY_WHAT}.get(kind)


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float | None:
    """Run ``fn`` once; the peak memory it added, in MB: the CUDA allocator's peak on a GPU, the resident-set
    growth on the CPU (``measure.memory``), None on MPS or where it cannot be measured."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if device.type == "cpu":
        return peak_memory_mb(fn)
    return None


@contextlib.contextmanager
def recompile_room(models: int) -> Iterator[None]:
    """Room in dynamo's recompile limit for ``models`` compiled models at once, restored on exit.

    Patched models share their forward code, and dynamo compiles that code once per model it runs; past
    ``torch._dynamo.config.recompile_limit`` (8; ``cache_size_limit`` before torch 2.6) it runs the code of every
    further model eagerly, with one warning: ten models compiled side by side would time two of them eagerly. Inside
    this context the limit is at least 8 per model.

    >>> limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    >>> with recompile_room(10):
    ...     getattr(torch._dynamo.config, limit)
    80
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    setattr(config, name, max(before, 8 * models))
    try:
        yield
    finally:
        setattr(config, name, before)


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """``torch.compile(model, mode=mode, dynamic=False)``: a graph per input shape, as the timings use."""
    if mode not in COMPILE_MODES:
        raise InputError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    return torch.compile(model, mode=mode, dynamic=False)


def compare_speed(
    models: dict[str, nn.Module],
    batch_size: int,
    img_size: int = 224,
    warmup: int = 2,
    rounds: int = 7,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str = "cpu",
    memory: bool = False,
) -> dict[str, Timing]:
    """Time several models on the same input on ``device``, interleaved round by round.

    Each round times every model once on the same batch, in turn, so slow phases of a shared machine hit
    them all alike; the result per model is the median over rounds (and the min-max spread). The first
    warm-up call of each model is timed apart (``first_call_s``: a compiled model compiles then); with
    ``memory``, each model's peak memory (:func:`peak_memory`, the larger of two calls) after the rounds.

    >>> import timm
    >>> m = timm.create_model("deit_tiny_patch16_224", depth=2).eval()
    >>> t = compare_speed({"base": m}, batch_size=1, warmup=1, rounds=2)
    >>> t["base"].images_per_s > 0
    True
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device)
    time_call = timer_for(device)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    first: dict[str, float | None] = dict.fromkeys(models)
    peaks: dict[str, float | None] = dict.fromkeys(models)

    def run(model: nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with autocast(device, dtype):
                return model(images)
        return call

    with torch.inference_mode():
        for name, model in models.items():
            model.eval()
            for step in range(max(warmup, 1)):  # at least one call, so that no compilation is timed
                elapsed = time_call(run(model), device)
                if step == 0:
                    first[name] = elapsed
        for _ in range(rounds):
            for name, model in models.items():
                seconds[name].append(time_call(run(model), device))
        if memory:
            for name, model in models.items():
                measured = [peak_memory(run(model), device) for _ in range(2)]
                peaks[name] = None if None in measured else max(measured)
    out = {}
    for name, times in seconds.items():
        rates = [batch_size / t for t in times]
        out[name] = Timing(name, batch_size, img_size, statistics.median(rates), (min(rates), max(rates)), times,
                           peaks[name], first[name])
    return out


def method_speedups(
    model: nn.Module,
    settings: dict[str, tuple[str, dict[str, Any]] | nn.Module | None],
    batch_sizes: Sequence[int] = (1, 32),
    img_size: int = 224,
    rounds: int = 7,
    warmup: int = 2,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    compile_modes: Sequence[str | None] = (None,),
    memory: bool = False,
) -> list[dict[str, Any]]:
    """Speed of each ``settings`` entry (label -> (method, options), a ready model such as an STViT, or None for
    unreduced) relative to the unreduced model, per batch size, with the GMACs ratio (the ceiling) beside it.

    ``compile_modes``: None for eager, or a ``torch.compile`` mode; each mode is timed as its own interleaved
    group (compiled reduced against compiled unreduced), compiled afresh per batch size (see the module doc).

    Returns JSON-ready rows: label, method, options, batch size, image size, device, dtype, compile mode,
    images/s, spread, speed-up, GMACs, ceiling, the first call's seconds and (``memory``) the peak memory.
    """
    device = torch.device(device)
    unreduced = api.unpatch(copy.deepcopy(model)).to(device)
    variants: dict[str, nn.Module] = {}
    gmacs: dict[str, float] = {}
    for label, setting in settings.items():
        if isinstance(setting, nn.Module):
            variant = setting.to(device)
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
        for mode in compile_modes:
            timed = variants
            if mode is not None:
                torch._dynamo.reset()  # fresh graphs for this shape
                timed = {label: compile_model(variant, mode) for label, variant in variants.items()}
            # Compiled: two warm-up calls at least, so that a recompile on the second call of a shape (a guard on
            # a cache that the first call filled) is never timed.
            with contextlib.nullcontext() if mode is None else recompile_room(len(timed)):
                timings = compare_speed(timed, batch_size, img_size, warmup if mode is None else max(warmup, 2),
                                        rounds, dtype, device=device, memory=memory)
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
                    "device": str(device),
                    "dtype": str(dtype).replace("torch.", ""),
                    "compile": mode,
                    "images_per_s": timing.images_per_s,
                    "spread": list(timing.spread),
                    "speedup": timing.images_per_s / base,
                    "gmacs": gmacs[label],
                    "gmacs_ratio": gmacs[base_label] / gmacs[label],
                    "first_call_s": timing.first_call_s,
                    "peak_memory_mb": timing.peak_memory_mb,
                })
    return rows


def timing_dict(timing: Timing) -> dict[str, Any]:
    return asdict(timing)
