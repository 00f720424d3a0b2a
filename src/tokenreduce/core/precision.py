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

import torch


def decide(t: torch.Tensor) -> torch.autocast:
    """A context with autocast off on ``t``'s device: matmuls inside it run in their inputs' dtype (an autocast
    matmul would round a float32 similarity back to bfloat16 / float16)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is a narrower float (bfloat16, float16); itself when it is float32 or float64
    (no copy, so float32 and float64 arithmetic is unchanged bit for bit).

    >>> [at_least_float32(torch.ones(1, dtype=d)).dtype for d in (torch.float16, torch.float64)]
    [torch.float32, torch.float64]
    """
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
