"""Is an accuracy change more than noise? Two predictions of the same images (float32 and int8, float32 and bf16)
compared image by image: the images the second one fixed and broke, and the exact McNemar test of that split.

>>> import numpy as np
>>> change = paired_change(np.array([0, 1, 1, 0]), np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0]))
>>> change["fixed"], change["broken"], change["mcnemar_p"]
(1, 1, 1.0)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def mcnemar_p(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar test: the probability, were both predictions right equally often, of a split of the
    ``fixed + broken`` discordant images at least as uneven as this one (binomial, p = 1/2).

    >>> round(mcnemar_p(10, 10), 3), round(mcnemar_p(0, 10), 4)
    (1.0, 0.002)
    """
    total = fixed + broken
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(fixed, broken) + 1)) / 2**total
    return min(1.0, 2 * tail)


def paired_change(reference: Any, predicted: Any, labels: Any) -> dict[str, Any]:
    """What ``predicted`` changed against ``reference`` (class indices per image; arrays or lists): ``fixed``
    (reference wrong, predicted right), ``broken`` (reference right, predicted wrong), the McNemar p-value of that
    split, and the standard error of the top-1 change in points (sqrt(fixed + broken) / n: the change is a
    difference of two paired proportions)."""
    reference, predicted, labels = (np.asarray(a) for a in (reference, predicted, labels))
    right, right_after = reference == labels, predicted == labels
    return split_of(int((~right & right_after).sum()), int((right & ~right_after).sum()), len(labels))


def split_of(fixed: int, broken: int, images: int) -> dict[str, Any]:
    """:func:`paired_change` from the counts: ``fixed`` and ``broken`` of ``images`` images (counts of several
    runs on different images add up).

    >>> split_of(3, 1, 400)["top1_delta_se"]
    0.5
    """
    return {"fixed": fixed, "broken": broken, "mcnemar_p": mcnemar_p(fixed, broken),
            "top1_delta_se": 100 * math.sqrt(fixed + broken) / images}
