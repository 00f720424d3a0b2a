"""A patched model is an ordinary module: it pickles, saves, deep-copies, crosses to spawned workers, keeps its
state-dict keys, works inside torch.compile / DataParallel wrappers, honours gradient checkpointing and runs
in several threads at once."""

from __future__ import annotations

import copy
import io
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REDUCING, images, make_model

import tokenreduce as tr
from tokenreduce.adapters import common

METHODS = sorted(REDUCING)


def patched_model(method: str, case: str = "deit_small_patch16_224") -> torch.nn.Module:
    return tr.patch(make_model(case), method, **REDUCING[method])


@pytest.mark.parametrize("method", METHODS)
def test_pickle_torch_save_and_deepcopy_round_trip(method):
    model = patched_model(method)
    x = images(model)
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert type(other) is type(model)
        assert tr.describe(other)["options"] == tr.describe(model)["options"]
        with torch.no_grad():
            assert torch.equal(other(x), expected)
        assert type(tr.unpatch(other)).__name__ == "VisionTransformer"


def test_state_dict_keys_unchanged_and_interchangeable():
    plain = make_model("deit_small_patch16_224")
    keys = list(plain.state_dict())
    patched = tr.patch(copy.deepcopy(plain), "tome", r=4)
    assert list(patched.state_dict()) == keys
    fresh = make_model("deit_small_patch16_224")
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    patched.load_state_dict(fresh.state_dict())  # a plain model's state dict loads into a patched one ...
    plain.load_state_dict(patched.state_dict())  # ... and back
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fresh.state_dict().values(),
                                                 strict=True))


def _run_in_worker(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_spawned_worker_receives_and_runs_the_patched_model():
    model = patched_model("gtp")
    x = images(model)
    with torch.no_grad():
        expected = model(x)
    with mp.get_context("spawn").Pool(1) as pool:
        out = pool.apply(_run_in_worker, (model, x))
    assert torch.equal(out, expected)


def test_compiled_and_data_parallel_wrappers_are_patched_inside():
    model = make_model("deit_small_patch16_224")
    x = images(model)
    compiled = torch.compile(model)
    assert tr.patch(compiled, "tome", r=4) is compiled
    assert tr.method_of(model).name == "tome" and tr.describe(compiled)["method"] == "tome"
    assert tr.flops(compiled).gmacs == tr.flops(model).gmacs < tr.flops(model).baseline_gmacs
    with torch.no_grad():
        # The compiled wrapper recompiles for the patched class; inductor's fused kernels round differently.
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)
    tr.unpatch(compiled)
    assert tr.method_of(model) is None and type(model).__name__ == "VisionTransformer"
    parallel = torch.nn.DataParallel(model)
    with tr.patched(parallel, "topk", keep_rate=0.5, layers=(1,)):
        assert tr.method_of(model).name == "topk"
        assert len(tr.trace(parallel, x)) == len(model.blocks)
    assert tr.method_of(model) is None


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_is_used_and_gives_the_same_gradients(method, monkeypatch):
    model = patched_model(method).train()
    x = images(model)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(0)
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    calls = []
    real = common.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(common, "checkpoint", counting)
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert len(calls) == len(model.blocks)
    assert len(checkpointed) == len(plain)
    for a, b in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same arithmetic, recomputed
    with torch.no_grad():
        model(x)
    assert len(calls) == len(model.blocks)  # no checkpointing without gradients


def test_patch_dropout_in_train_mode_is_refused_clearly():
    model = tr.patch(make_model("deit_small_patch16_224", patch_drop_rate=0.25), "gtp", r=2)
    x = images(model)
    with torch.no_grad():
        model.eval()(x)  # patch dropout is off in eval mode: fine
    with pytest.raises(ValueError, match=r"patch dropout \(patch_drop_rate=0.25\) cannot run with token reduction"):
        model.train()(x)


@pytest.mark.parametrize("method", METHODS)
def test_threads_running_the_same_model_give_the_serial_outputs(method):
    model = patched_model(method)
    inputs = [images(model, batch=2, seed=s) for s in range(8)]
    with torch.no_grad():
        serial = [model(x) for x in inputs]
        with ThreadPoolExecutor(max_workers=4) as pool:
            threaded = list(pool.map(model, inputs))
    for a, b in zip(threaded, serial, strict=True):
        assert torch.equal(a, b)
