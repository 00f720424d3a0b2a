"""Peak memory of one CPU forward pass: the growth of the process's peak resident set (Linux ``VmHWM``).

torch has no CPU allocator statistics, so this resets the kernel's high-water mark
(``/proc/self/clear_refs``), runs the forward once and reads ``VmHWM - VmRSS(before)``: the extra resident
memory the forward needed (activations, attention maps), weights and inputs excluded. Before that, glibc's
``malloc_trim(0)`` hands the memory freed by earlier passes back to the system: without it a warmed-up
forward reuses resident memory and grows nothing (0 MB). Compare settings measured alike.
Returns None where ``/proc`` does not allow it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

WHAT = "peak resident-set growth of one forward pass (Linux VmHWM after malloc_trim and clear_refs), MB"


def _release_free_memory() -> None:
    """glibc's ``malloc_trim(0)``: return freed heap memory to the system (nothing where there is no glibc)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Run ``fn`` once; the peak resident memory it added, in MB (None if unmeasurable here)."""
    _release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 1024.0
