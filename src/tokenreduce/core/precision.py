"""Decisions in float32: what a method ranks or thresholds does not follow the model's dtype.

A bfloat16 number keeps 8 bits of mantissa: two cosine similarities of 0.912 and 0.914 are one value there, so
an argsort over bf16 scores breaks near-ties by position, and a variance of 7e-5 compared in bf16 has two
significant digits. The methods therefore compute their similarities, attention scores and statistics in
float32 from the model's (possibly bf16 / fp16) keys, queries and features, with autocast off, while the
blocks and the features stay in the model's dtype. In a float32 model without autocast every function here is
the identity, so float32 outputs do not change.

>>> x = torch.ones(2, 3, dtype=torch.bfloat16)
>>> with torch.autocast("cpu", dtype=torch.bfloat16), decide(x):
...     (at_least_float32(x) @ at_least_float32(x).T).dtype
torch.float32
"""

from __future__ import annotations

import contextlib

import torch


def autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type`` here (torch 2.3 has one function per device).

    >>> autocast_on("cpu")
    False
    """
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def decide(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``t``'s device: matmuls inside it run in their inputs' dtype (an autocast
    matmul would round a float32 similarity back to bfloat16 / float16). Where autocast is off already it is a
    null context: entering ``torch.autocast`` costs a few microseconds of Python per call, once or twice per block
    (batch-1 latency); compiled code always gets the autocast context, which the compiler traces."""
    if torch.compiler.is_compiling() or autocast_on(t.device.type):
        return torch.autocast(device_type=t.device.type, enabled=False)
    return contextlib.nullcontext()


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is a narrower float (bfloat16, float16); itself when it is float32 or float64
    (no copy, so float32 and float64 arithmetic is unchanged bit for bit).

    >>> [at_least_float32(torch.ones(1, dtype=d)).dtype for d in (torch.float16, torch.float64)]
    [torch.float32, torch.float64]
    """
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
