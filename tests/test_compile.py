"""torch.compile of a patched model with a fixed schedule: one graph (``fullgraph=True`` fails on any graph
break, so this also proves the forward pass has no host syncs) and the eager outputs."""

from __future__ import annotations

import pytest
import timm
import torch

import tokenreduce as tr

OPTIONS = {
    "tome": dict(r=3),
    "topk": dict(keep_rate=0.5, layers=(1,)),
    "evit": dict(keep_rate=0.5, layers=(1,)),
    "gtp": dict(r=2),
    "ppt": dict(r=3, layers=(0, 1), threshold=1e-3),  # a threshold between policies: both branches, by mask
}


def test_every_method_is_covered():
    assert set(OPTIONS) == set(tr.methods())


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_compiled_patched_model_matches_eager(method):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                              img_size=64).eval()
    tr.patch(model, method, **OPTIONS[method])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model, fullgraph=True)(images)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
