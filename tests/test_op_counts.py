"""The ops each method's reduction adds per reducing block do not regress (batch-1 latency is launch-bound: every
small op counts; ``benchmarks/op_counts.py`` measures DeiT-S and ``docs/export.md`` has the table).

Every aten op of one forward pass of a small ViT at batch 1 is counted (``benchmarks/op_counts.py``'s counter),
for the method and for the same model whose reductions are a plain slice to the method's token counts
(``SameTokenCounts`` of ``benchmarks/batch1_bound.py``); the difference per reducing block must stay at or below
the counts after the cuts of issue 24. A change that adds ops to a reduction step fails here: lower the limit
when you cut more, and raise it only with a reason. (Counts are of this torch version's dispatch; a torch upgrade
may move them.)
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import benchmark_script

import tokenreduce as tr

# case -> (method, options, the most ops added per reducing block at batch 1; before the cuts in brackets)
LIMITS = {
    "tome": ("tome", dict(r=3), 30.5),  # [45.25]
    "topk": ("topk", dict(keep_rate=0.5, layers=(1, 3)), 14.0),  # [17]
    "evit": ("evit", dict(keep_rate=0.5, layers=(1, 3)), 27.5),  # [33]
    "gtp": ("gtp", dict(r=2), 40.5),  # [67.25] (the semantic graph, once per forward pass, shared by 4 steps)
    "gtp spatial": ("gtp", dict(r=2, graph="spatial"), 35.0),  # [61.75]
    "ppt": ("ppt", dict(r=3, layers=(1, 3)), 39.0),  # [53]
    "ppt prune": ("ppt", dict(r=3, layers=(1, 3), threshold=0.0), 25.0),  # [33]
    "ppt pool": ("ppt", dict(r=3, layers=(1, 3), threshold=float("inf")), 32.5),  # [48.5]
}

def op_counts_script():
    """benchmarks/op_counts.py (its counter, and batch1_bound's SameTokenCounts): one definition of both."""
    return benchmark_script("op_counts.py")


def count(model: torch.nn.Module, images: torch.Tensor) -> int:
    return sum(op_counts_script().count_ops(model, images).values())


def test_every_method_is_covered():
    assert {method for method, _, _ in LIMITS.values()} == set(tr.methods())


@pytest.mark.parametrize("case", sorted(LIMITS))
def test_ops_added_per_reduction_step_do_not_regress(case):
    method, options, limit = LIMITS[case]
    torch.manual_seed(0)
    make = lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=4, embed_dim=32,  # noqa: E731
                                     num_heads=2, img_size=64).eval()
    images = torch.randn(1, 3, 64, 64)
    reduced = tr.patch(make(), method, **options)
    inner = tr.method_of(reduced)
    bound = tr.patch(make(), op_counts_script().SameTokenCounts(inner))
    plan = inner.plan(17, 1, 4)
    steps = sum(1 for amount in plan.amounts if amount)
    added = (count(reduced, images) - count(bound, images)) / steps
    assert added <= limit, f"{case}: {added} ops per reducing block, at most {limit} allowed"
