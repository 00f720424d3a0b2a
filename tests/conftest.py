"""Shared fixtures: small configurations of every supported timm model (random weights, no hub)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import timm
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Small sizes of each supported family: the structure (prefix tokens, LayerScale, pooling, patch size, qk-norm)
# of the real model at a fraction of the cost.
SMALL = dict(depth=4, embed_dim=48, num_heads=3)
MODEL_CASES = {
    "deit_tiny_patch16_224": dict(img_size=96),
    "deit_small_patch16_224": dict(img_size=96),
    "deit_base_distilled_patch16_224": dict(img_size=96),
    "deit3_small_patch16_224": dict(img_size=96),
    "vit_small_patch14_dinov2": dict(img_size=98),
    "vit_base_patch16_224": dict(img_size=96),
    "vit_medium_patch16_reg4_gap_256": dict(img_size=96),
    "vit_base_patch16_gap_224": dict(img_size=96),
    "vit_small_patch16_224:qk_norm": dict(img_size=96, qk_norm=True),
}


# Method options that really reduce the small models above (36 or 49 patches, 4 blocks), and ones that remove
# nothing; PPT's threshold mixes pruning and pooling in a batch of DeiT-S images.
REDUCING = {
    "tome": dict(r=4),
    "topk": dict(keep_rate=0.7, layers=(1, 2)),
    "evit": dict(keep_rate=0.7, layers=(1, 2)),
    "gtp": dict(r=4),
    "ppt": dict(r=4, layers=(1, 2), threshold=2.15e-6),
}
NO_OP = {"tome": dict(r=0), "topk": dict(keep_rate=1.0, layers=(1, 2)), "evit": dict(keep_rate=1.0, layers=(1, 2)),
         "gtp": dict(r=0), "ppt": dict(r=0, layers=(1, 2))}


def make_model(case: str, **overrides) -> torch.nn.Module:
    """A small, seeded, eval-mode instance of a supported model (``name[:tag]`` keys of MODEL_CASES)."""
    torch.manual_seed(0)
    name = case.split(":")[0]
    kwargs = {**SMALL, **MODEL_CASES.get(case, {}), **overrides}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    # Random-init LayerScale (1e-5) and tiny weights make every token alike; spread them so reductions matter.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and torch.all(p == p.flatten()[0]) and p.flatten()[0].abs() < 1e-3:
                p.fill_(0.5)
        for name_, p in model.named_parameters():
            if name_.endswith(("cls_token", "reg_token", "dist_token", "pos_embed")):
                p.normal_(0, 0.5)
    return model


def shared_file(*parts: str) -> Path | None:
    """A file of the shared data and models (``tokenreduce.measure.data.data_root``: $TOKENREDUCE_DATA_ROOT, else
    ``shared`` beside the repository root), or None when it is not on this machine (the test skips)."""
    from tokenreduce.measure.data import DataRootNotFound, shared_path

    try:
        return shared_path(*parts)
    except DataRootNotFound:
        return None


def images(model: torch.nn.Module, batch: int = 2, seed: int = 0, size: tuple[int, int] | None = None):
    h, w = size or model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(MODEL_CASES))
def model_case(request):
    return request.param


def pytest_configure(config):
    # .ci/lowest runs `-m floor` (on three families) against the lowest torch / timm that pyproject.toml declares.
    config.addinivalue_line("markers", "floor: the fast subset .ci/lowest runs at the lowest declared torch and timm")


@functools.cache
def benchmark_script(filename: str):
    """A script of benchmarks/ loaded as a module, with benchmarks/ on sys.path while it loads (the scripts import
    their neighbours: op_counts imports batch1_bound, int8_recipes imports deploy); loaded once per session."""
    import importlib.util
    import sys

    folder = Path(__file__).parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"{Path(filename).stem}_benchmark", folder / filename)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module
