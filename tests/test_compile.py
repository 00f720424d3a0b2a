"""torch.compile of a patched model with a fixed schedule: one graph (``fullgraph=True`` fails on any graph
break, so this also proves the forward pass has no host syncs) and the eager outputs, at batch 1 and 8, with no
recompilation when a shape comes again (dynamo's counters)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch._dynamo
from torch._dynamo.utils import counters

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


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


# GTP's spatial graph is cached per grid in a module-level dict; while compiling it is built in the graph instead
# (a guard on the dict's contents would fail once the first call filled it: the second call would recompile).
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_compiled_patched_model_matches_eager(method):
    from tokenreduce.methods import gtp

    torch._dynamo.reset()
    counters.clear()
    getattr(gtp, "_SPATIAL_CACHE", {}).clear()  # as in a fresh process: no shape cached by earlier tests
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                              img_size=64).eval()
    tr.patch(model, method, **OPTIONS[method])
    compiled = torch.compile(model, fullgraph=True)
    for batch in (1, 8):
        images = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            first = compiled(images)  # before any eager call: nothing cached for this shape yet
            graphs = compiled_graphs()
            second = compiled(images)
            eager = model(images)
        assert compiled_graphs() == graphs, f"batch {batch}: the second call of the same shape recompiled"
        torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second, eager, atol=1e-5, rtol=1e-5)
    # One graph per batch size (fullgraph: no breaks): batch 1 is static, batch 8 a second graph.
    assert compiled_graphs() == 2


# mode="reduce-overhead" (CUDA graphs on a GPU; on CPU torch compiles the same graph without them) needs static
# shapes and no host sync: the whole forward pass, every reduction step included, is one graph without breaks
# (PPT's per-image policy is a mask, both branches computed, when compiled).
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_reduce_overhead_mode_matches_eager_and_the_reduction_has_no_graph_break(method):
    from tokenreduce.methods import gtp

    torch._dynamo.reset()
    getattr(gtp, "_SPATIAL_CACHE", {}).clear()
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                              img_size=64).eval()
    tr.patch(model, method, **OPTIONS[method])
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(images)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        out = compiled(images[:1])
        eager = model(images[:1])
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


def test_method_speedups_compiles_more_models_than_the_recompile_limit():
    """Patched models share their forward code and dynamo compiles it once per model; past its recompile limit (8)
    it ran the rest eagerly, so ``method_speedups`` timed them eagerly as compiled. Ten different models: ten graphs
    (nine without the room: the tenth model ran eagerly), and the limit back at its value afterwards."""
    from tokenreduce.measure.speed import method_speedups

    torch._dynamo.reset()
    counters.clear()
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, limit)
    model = timm.create_model("deit_tiny_patch16_224", depth=1, img_size=64).eval()
    settings = {"unreduced": None, "topk": ("topk", {"keep_rate": 0.5, "layers": (0,)}),
                **{f"tome r={r}": ("tome", {"r": r}) for r in range(1, 9)}}
    rows = method_speedups(model, settings, batch_sizes=(2,), img_size=64, rounds=1, warmup=2,
                           compile_modes=("default",))
    assert len(rows) == 10 and {row["compile"] for row in rows} == {"default"}
    assert compiled_graphs() == 10
    assert getattr(config, limit) == before
