"""Property-based tests (hypothesis): the engine's promises (specs/engine.md) on drawn models, batches, image sizes,
dtypes and method options, valid or not.

Every drawn example either keeps every promise, or is refused with a ``tr.TokenReduceError`` that says what is
wrong and leaves the model exactly as it was (class, method, weights, outputs). Options are drawn within and beyond
their valid ranges and the test knows which is which (``Options.errors``, ``schedule_errors``): a valid option
refused, an invalid one accepted, or a refusal for another reason is a failure.

Profiles (``HYPOTHESIS_PROFILE``): ``ci``, the default (derandomized: CI is reproducible), and ``deep`` (10x the
examples, fresh random ones each run: ``make test-deep``). ``pytest tests/test_properties.py
--hypothesis-show-statistics`` prints how many examples each test ran and how they ended (``event``).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
from typing import Any, NamedTuple

import pytest
import torch
import transformers
from conftest import make_model
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st
from test_hf import CASES as HF_CASES
from test_hf import SMALL as HF_SMALL
from test_hf import TOKEN_NAMES
from test_open_clip import make_tower

import tokenreduce as tr

# No "explain" phase: it reruns a failing example hundreds of times to comment on it (over a minute here).
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
COMMON = dict(deadline=None, database=None, print_blob=True, phases=PHASES)
settings.register_profile("ci", derandomize=True, max_examples=200, **COMMON)
settings.register_profile("deep", derandomize=False, max_examples=2000, **COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

METHODS = tr.methods()
ATOL = 1e-5  # float32: outputs that must be equal (nothing removed; an image alone vs in its batch)
batches = st.integers(0, 5)
seeds = st.integers(0, 2**16)


def share(fraction: float):
    """Settings for a test that runs ``fraction`` of the profile's examples (its models cost more)."""
    return settings(max_examples=max(1, int(settings.default.max_examples * fraction)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread only adds synchronisation, which costs 10-40x on a busy machine
    (measured here: a 5 x 69 x 48 Linear takes 0.1 ms on one thread, 4 ms on two while other jobs run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- method options, valid or not ----------------------------------------------------------------------------


class Options(NamedTuple):
    """Keyword arguments for ``tr.patch`` and, when they are invalid, the patterns of the errors they may raise
    (one is enough; several only where a fault and the schedule both fail). Whether a well-formed schedule fits
    the input is ``schedule_errors``."""

    kwargs: dict[str, Any]
    errors: tuple[str, ...] = ()


GTP_SELECTIONS = ("mixed_attn_max", "mixed_attn_mean", "cls_attn", "col_sum", "diag", "random")


def exact_layers(depth: int):
    """Valid reducing blocks of a ``depth``-block model: a non-empty tuple of block indices."""
    return st.lists(st.integers(0, depth - 1), min_size=1, max_size=depth, unique=True).map(tuple)


@st.composite
def r_values(draw, method: str, depth: int, patches: int, per_block: bool = True):
    """A well-formed ``r``: an int, a whole float (2.0 is 2), with ``per_block`` a list or a dict {block: r}, and
    for the methods that clamp r (ToMe, PPT) ToMe's (r, inflection). Small counts mostly, and the edges: what
    leaves one token, none, or fits every block just so (too large for Top-K, EViT, GTP: ``schedule_errors``)."""
    count = st.one_of(st.integers(0, patches // 2), st.integers(0, patches + 4),
                      st.sampled_from([patches - 1, patches, (patches - 1) // depth, patches // depth]))
    kinds = ["int", "int", "float"] + (["list", "dict"] if per_block else []) + \
        (["inflection"] if method in ("tome", "ppt") else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "int":
        return draw(count)
    if kind == "float":
        return float(draw(count))
    per = st.integers(0, patches // 2 + 2)
    if kind == "list":
        return draw(st.lists(per, max_size=depth))
    if kind == "dict":
        return draw(st.dictionaries(st.integers(0, depth - 1), per))
    return draw(st.integers(0, patches)), draw(st.floats(-1, 1))


@st.composite
def valid_options(draw, method: str, depth: int, patches: int) -> dict[str, Any]:
    """Well-formed options for ``method`` on a model of ``depth`` blocks (the schedule may still not fit)."""
    if method == "tome":
        kwargs = {"r": draw(r_values(method, depth, patches)), "prop_attn": draw(st.booleans())}
        if draw(st.booleans()):
            kwargs["layers"] = draw(exact_layers(depth))
    elif method in ("topk", "evit"):
        kwargs = {"layers": draw(exact_layers(depth)), "prop_attn": draw(st.booleans())}
        knob = draw(st.sampled_from(["keep_rate", "keep_rate", "r", "neither"]))  # neither: keep_rate 0.7
        if knob == "keep_rate":
            kwargs["keep_rate"] = draw(st.one_of(st.floats(0, 1, exclude_min=True), st.just(1.0)))
        elif knob == "r":
            kwargs["r"] = draw(r_values(method, depth, patches))
        if method == "evit":
            kwargs["fuse"] = draw(st.sampled_from(["sum", "mean"]))
    elif method == "gtp":
        kwargs = dict(r=draw(r_values(method, depth, patches)), graph=draw(st.sampled_from(["spatial", "semantic",
                                                                                          "mixed"])),
                      k=draw(st.one_of(st.integers(1, patches - 1), st.integers(1, patches + 2))),
                      alpha=draw(st.floats(0.01, 1.0)), selection=draw(st.sampled_from(GTP_SELECTIONS)),
                      token_scale=draw(st.booleans()), sparsity=draw(st.sampled_from([1.0, 0.7])),
                      map=draw(st.sampled_from(["chunked", "full"])))
    else:  # ppt: a list / dict r names its blocks itself; an int r reduces at ``layers``
        kwargs = {"threshold": draw(st.sampled_from([0.0, math.inf, 1e-7, 1e-6, 3e-6, 1e-5, 1e-4, 1e-3])),
                  "prop_attn": draw(st.booleans())}
        if draw(st.booleans()):
            kwargs["r"] = draw(st.one_of(st.lists(st.integers(0, patches), max_size=depth),
                                         st.dictionaries(st.integers(0, depth - 1), st.integers(0, patches))))
        else:
            kwargs.update(r=draw(r_values(method, depth, patches, per_block=False)), layers=draw(exact_layers(depth)))
    rules = ["departure", "nearest", "reconstruct"] + (["graph"] if method == "gtp" else [])
    rule = draw(st.sampled_from([None, None, *rules]))
    if rule is not None:
        kwargs["restore"] = rule
    if rule == "reconstruct":
        kwargs.update(restore_k=draw(st.integers(1, 6)), restore_weights=draw(st.sampled_from(["cosine", "distance"])))
    return kwargs


# Mistyped option names, as a user types them, and the option meant: refused by name, with the option meant where
# the method has it, and the valid ones (README's table of methods).
MISTYPED = {"kep_rate": "keep_rate", "layer": "layers", "Layers": "layers", "treshold": "threshold",
            "prop_atn": "prop_attn", "sparsty": "sparsity", "rr": "r", "restor": "restore"}
RESTORE_OPTIONS = ("restore", "restore_k", "restore_tau", "restore_weights")
OPTIONS = {"tome": ("r", "layers", "prop_attn"), "topk": ("keep_rate", "r", "layers", "prop_attn"),
           "evit": ("keep_rate", "r", "layers", "prop_attn", "fuse"),
           "gtp": ("r", "graph", "k", "alpha", "selection", "token_scale", "sparsity", "seed", "map"),
           "ppt": ("r", "layers", "threshold", "prop_attn")}


def unknown_option(method: str, name: str) -> str:
    """The message of an unknown option: its name, the option meant where the method has one, the valid ones."""
    valid = OPTIONS[method] + RESTORE_OPTIONS
    meant = rf" \(did you mean '{MISTYPED[name]}'\?\)" if MISTYPED.get(name) in valid else ""
    return rf"{method}: unknown option '{name}'{meant}; valid options: " + "".join(rf"(?=.*\b{v}\b)" for v in valid)
BAD_R = [  # an r that is no count of tokens, and what the message says
    (-1, r"r must be a non-negative integer, got -1"), (-7, r"r must be a non-negative integer, got -7"),
    (2.5, r"r must be a non-negative integer, got 2\.5"), (math.nan, r"r must be a non-negative integer, got nan"),
    (math.inf, r"r must be a non-negative integer, got inf"), ("8", r"r must be a non-negative integer, got '8'"),
    (True, r"r must be a non-negative integer, got True"), ([1, -2], r"r\[1\] must be a non-negative integer"),
    ((3, 1.5), r"schedule inflection must be in \[-1, 1\], got 1\.5"),
]
BAD_KEEP_RATES = [0.0, -0.5, 1.5, math.nan, math.inf, True, "0.5"]
BAD_GTP = {"k": (0, r"k \(semantic neighbours\) must be an integer >= 1, got 0"),
           "alpha": (1.5, r"alpha must be in \(0, 1\], got 1\.5"), "graph": ("grid", r"unknown graph 'grid'"),
           "sparsity": (0.0, r"sparsity must be in \(0, 1\], got 0\.0")}


def faults(method: str) -> list[str]:
    """What can be wrong with ``method``'s options (``inject``)."""
    common = ["mistyped", "bogus_rule", "restore_k", "bad_r", "too_long_r", "bad_layers"]
    own = {"tome": ["graph_rule"], "topk": ["graph_rule", "keep_rate", "both", "default_layers"],
           "evit": ["graph_rule", "keep_rate", "both", "default_layers", "fuse"],
           "gtp": ["gtp_option"], "ppt": ["graph_rule", "default_layers", "threshold", "per_block_with_layers"]}
    return common + own[method]


@st.composite
def inject(draw, fault: str, method: str, kwargs: dict[str, Any], depth: int) -> Options:
    """Valid ``kwargs`` made wrong in one way, and the error that must say so."""
    kwargs = dict(kwargs)
    if fault == "mistyped":
        name = draw(st.sampled_from(sorted(MISTYPED)))
        return Options({**kwargs, name: 1}, (unknown_option(method, name),))
    if fault in ("bogus_rule", "restore_k", "graph_rule"):
        for key in ("restore", "restore_k", "restore_weights"):
            kwargs.pop(key, None)
        kwargs.update({"bogus_rule": {"restore": "bogus"}, "graph_rule": {"restore": "graph"},
                       "restore_k": {"restore": "reconstruct", "restore_k": 0}}[fault])
        return Options(kwargs, ({"bogus_rule": r"unknown restore rule 'bogus'",
                                 "graph_rule": rf"{method}: restore rule 'graph' is not available",
                                 "restore_k": r"restore_k must be an integer >= 1, got 0"}[fault],))
    if fault in ("bad_r", "too_long_r"):
        kwargs.pop("keep_rate", None)  # Top-K and EViT: r instead of keep_rate
        if fault == "too_long_r":
            value, pattern = [1] * (depth + 1), rf"r lists {depth + 1} blocks but the model has {depth}"
        else:  # PPT: a list r is per block, which its layers would contradict first
            value, pattern = draw(st.sampled_from([b for b in BAD_R if method != "ppt" or not isinstance(b[0], list)]))
        if method == "ppt" and fault == "too_long_r":
            kwargs.pop("layers", None)  # (which a per-block r would contradict first)
        return Options({**kwargs, "r": value}, (rf"{method}: {pattern}",))
    if fault in ("bad_layers", "per_block_with_layers"):
        if method == "gtp":  # GTP takes no layers: an unknown option
            return Options({**kwargs, "layers": (0,)}, (unknown_option("gtp", "layers"),))
        bad = draw(st.sampled_from([-1, depth, depth + 7, 1.0, True, "1"]))
        layers = tuple(draw(st.permutations([*draw(exact_layers(depth)), bad])))
        if method == "ppt" and (fault == "per_block_with_layers" or isinstance(kwargs["r"], list | dict)):
            r = kwargs["r"] if isinstance(kwargs["r"], list | dict) else [1]
            good = draw(exact_layers(depth))
            return Options({**kwargs, "r": r, "layers": good},
                           (rf"ppt: r={re.escape(repr(r))} names its blocks itself",))
        return Options({**kwargs, "layers": layers},
                       (rf"{method}: layer {re.escape(repr(bad))} is outside the model's blocks 0\.\.{depth - 1}",))
    if fault == "default_layers":  # (3, 6, 9) lie beyond these small models (depth <= 4)
        kwargs.pop("layers", None)
        if method == "ppt" and isinstance(kwargs["r"], list | dict):
            kwargs["r"] = 1
        first = next(layer for layer in (3, 6, 9) if layer >= depth)
        return Options(kwargs, (rf"{method}: layer {first} is outside the model's blocks 0\.\.{depth - 1}",))
    if fault == "keep_rate":
        kwargs.pop("r", None)
        value = draw(st.sampled_from(BAD_KEEP_RATES))
        return Options({**kwargs, "keep_rate": value}, (rf"{method}: keep_rate must be in \(0, 1\], got ",))
    if fault == "both":
        return Options({**kwargs, "keep_rate": 0.5, "r": 1}, (rf"{method}: give keep_rate or r, not both",))
    if fault == "fuse":
        return Options({**kwargs, "fuse": "max"}, (r"evit: unknown fuse 'max'",))
    if fault == "threshold":
        value = draw(st.sampled_from([-1e-6, math.nan, "0.1"]))
        return Options({**kwargs, "threshold": value}, (r"ppt: threshold must be a non-negative number",))
    assert fault == "gtp_option"
    name = draw(st.sampled_from(sorted(BAD_GTP)))
    value, pattern = BAD_GTP[name]
    return Options({**kwargs, name: value}, (rf"gtp: {pattern}",))


@st.composite
def method_options(draw, method: str, depth: int, patches: int) -> Options:
    """Options for ``method`` on a model of ``depth`` blocks and about ``patches`` image tokens: valid ones, and
    a third of the time with one fault (a value out of range or of the wrong type, a mistyped name, a
    contradiction), with the error that must say so."""
    kwargs = draw(valid_options(method, depth, patches))
    fault = draw(st.one_of(st.none(), st.none(), st.sampled_from(faults(method))))
    return Options(kwargs) if fault is None else draw(inject(fault, method, kwargs, depth))


def schedule_errors(method: str, kwargs: dict, depth: int, patches: int) -> tuple[str, ...]:
    """The errors of a well-formed schedule that does not fit an input of ``patches`` image tokens, by the spec's
    rule: Top-K, EViT and GTP refuse to remove every image token of a block (ToMe and PPT clamp r instead), GTP's
    semantic graph needs k < image tokens (when it reduces at all)."""
    r = kwargs.get("r")
    if method not in ("topk", "evit", "gtp") or r is None:  # a keep_rate keeps at least one token
        return ()
    blocks = kwargs.get("layers", range(depth)) if method != "gtp" else range(depth)
    if isinstance(r, list):
        amounts = [int(v) for v in r] + [0] * (depth - len(r))
    elif isinstance(r, dict):
        amounts = [r.get(i, 0) for i in range(depth)]
    else:
        amounts = [int(r) if i in blocks else 0 for i in range(depth)]
    errors, left = [], patches
    for block, amount in enumerate(amounts):
        if amount and amount >= left:
            errors.append(rf"{method}: block {block} would remove {amount} of its {left} image tokens")
            break
        left -= amount - (1 if method == "evit" and amount else 0)  # EViT adds its fused token
    graph, k = kwargs.get("graph", "mixed"), kwargs.get("k", 8)  # GTP's defaults
    if method == "gtp" and graph != "spatial" and k >= patches and any(amounts):
        errors.append(rf"gtp: the {graph} graph needs k < {patches} image tokens, got k={k}")
    return tuple(errors)


def with_schedule(options: Options, method: str, depth: int, patches: int) -> Options:
    """``options`` with the errors of their schedule on ``patches`` image tokens (when they are well-formed)."""
    return options if options.errors else options._replace(
        errors=schedule_errors(method, options.kwargs, depth, patches))


@st.composite
def reducing_options(draw, method: str, depth: int, patches: int) -> Options:
    """Valid options whose schedule fits ``patches`` image tokens."""
    kwargs = draw(valid_options(method, depth, patches))
    if schedule_errors(method, kwargs, depth, patches):  # too large: the most every block can remove
        kwargs["r"] = (patches - 1) // depth if method == "gtp" else 1
        if method == "gtp":
            kwargs["k"] = min(kwargs["k"], patches - 1)
    return Options(kwargs)


@st.composite
def no_op_options(draw, method: str, depth: int) -> Options:
    """Options that remove nothing (r=0 in each of its forms, keep_rate=1), the method's other options drawn."""
    zero = draw(st.sampled_from([0, 0.0, [], [0] * depth, {0: 0}]))
    if method == "tome":
        return Options({"r": zero, "prop_attn": draw(st.booleans())})
    if method in ("topk", "evit"):
        knob = draw(st.sampled_from([{"keep_rate": 1.0}, {"r": zero}]))
        return Options({**knob, "layers": draw(exact_layers(depth)), "prop_attn": draw(st.booleans())})
    if method == "gtp":
        return Options({"r": zero, "graph": draw(st.sampled_from(["spatial", "semantic", "mixed"])),
                        "sparsity": draw(st.sampled_from([1.0, 0.5])), "token_scale": draw(st.booleans())})
    layers = {} if isinstance(zero, list | dict) else {"layers": draw(exact_layers(depth))}
    return Options({"r": zero, **layers, "threshold": draw(st.sampled_from([0.0, math.inf, 1e-5]))})


# --- the promises ---------------------------------------------------------------------------------------------


def images(batch: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def non_empty(x: torch.Tensor) -> torch.Tensor:
    """``x``, or one image of its size when it holds none."""
    return x if x.shape[0] else torch.zeros(1, *x.shape[1:], dtype=x.dtype)


def outputs(out: Any) -> dict[str, torch.Tensor]:
    """Every tensor a user reads in a model's output, by name (a tensor, a tuple of them, a transformers output)."""
    if torch.is_tensor(out):
        return {"out": out}
    if isinstance(out, tuple | list):
        return {f"out[{i}]": t for i, t in enumerate(out)}
    got = {key: value for key, value in out.items() if torch.is_tensor(value)}
    for i, hidden in enumerate(out.get("hidden_states") or ()):
        got[f"hidden_states[{i}]"] = hidden
    return got


def forward(x: torch.Tensor, **kwargs):
    """``run(model)``: the model's outputs on ``x`` (by name, ``outputs``)."""
    def run(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return outputs(model(x, **kwargs))
    return run


def features(x: torch.Tensor):
    """``run(model)``: a timm model's ``forward_features`` (patched: the restored full token grid, final norm)."""
    def run(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"features": model.forward_features(x)}
    return run


def snapshot(model: torch.nn.Module, run) -> tuple:
    """What must not change when a call is refused: class, method, weights, outputs."""
    return type(model), tr.method_of(model), {k: v.clone() for k, v in model.state_dict().items()}, run(model)


def assert_unchanged(model: torch.nn.Module, before: tuple, run) -> None:
    cls, method, weights, out = before
    assert type(model) is cls and tr.method_of(model) is method
    now = model.state_dict()
    assert now.keys() == weights.keys() and all(torch.equal(now[key], weights[key]) for key in weights)
    after = run(model)
    assert after.keys() == out.keys() and all(torch.equal(after[key], out[key]) for key in out)


def refused(call, errors: tuple[str, ...], model: torch.nn.Module, run, what: str) -> bool:
    """Run ``call()``; it must raise exactly when ``errors`` are expected, a ``TokenReduceError`` matching one of
    them, and leave ``model`` as it was (``run(model)``: the outputs to compare, on a non-empty batch, which
    transformers and open_clip cannot run unpatched). Returns whether it was refused."""
    before = snapshot(model, run)
    try:
        call()
    except tr.TokenReduceError as err:
        assert errors, f"{what}: refused, expected to run: {err}"
        assert any(re.search(e, str(err)) for e in errors), f"{what}: expected one of {errors}, got: {err}"
        assert_unchanged(model, before, run)
        event(f"refused at {what}")
        return True
    assert not errors, f"{what}: ran, expected one of {errors}"
    return False


def check_states(model: torch.nn.Module, x: torch.Tensor, plain: torch.nn.Module, method: str, options: dict,
                 grid: tuple[int, int], tol: float = 1e-6) -> None:
    """Invariants 2-4 on ``tr.trace(model, x)``: token counts per block as ``tr.describe`` says for this image
    size; prefix tokens kept (never an owner, size 1, block 0's rows those of the unpatched model within ``tol``:
    the attention may run fused in one and not the other); every patch owned by a token (except after Top-K and
    PPT's pruning, which drop patches, and GTP's propagation, which may leave one with no kept neighbour) and one
    without a token marked as left; the sizes of merge methods count the patches each token carries; the dense
    restore is ``B x (prefix + patches) x C``."""
    info = tr.describe(model, img_size=tuple(x.shape[-2:]))
    num_prefix, patches, batch = info["num_prefix"], grid[0] * grid[1], x.shape[0]
    assert info["grid"] == list(grid)
    with torch.no_grad():
        states, plain_states = tr.trace(model, x), tr.trace(plain, x)
    assert [s.x.shape[1] for s in states] == info["tokens_out"]
    first, unpatched = states[0].x[:, :num_prefix].float(), plain_states[0].x[:, :num_prefix].float()
    if not (method == "gtp" and options.get("sparsity", 1.0) < 1.0):  # GTP's sparsified map changes block 0's CLS
        torch.testing.assert_close(first, unpatched, atol=tol, rtol=tol)
    carries_all = method in ("tome", "evit") or (method == "ppt" and options.get("threshold") == math.inf)
    for i, state in enumerate(states):
        owner, num_tokens = state.owner, state.x.shape[1]
        assert state.num_prefix == num_prefix and owner.shape == (batch, patches) and state.x.shape[0] == batch
        assert bool(((owner == -1) | ((owner >= num_prefix) & (owner < num_tokens))).all()), f"block {i}: {owner}"
        assert not carries_all or bool((owner >= 0).all()), f"block {i}: {method} dropped a patch"
        assert bool(state.left[owner < 0].all()), f"block {i}: a patch without a token has not left"
        size = state.sizes()
        assert torch.equal(size[:, :num_prefix], torch.ones_like(size[:, :num_prefix])), f"block {i}"
        if method == "gtp":  # propagation adds fractions of tokens to their neighbours: sizes only grow
            assert bool((size >= 1).all()), f"block {i}"
        else:  # every token stands for exactly the patches it carries; dropped patches count nowhere
            carried = torch.zeros(batch, num_tokens).scatter_add_(1, owner.clamp(min=0), (owner >= 0).float())
            assert torch.equal(size[:, num_prefix:, 0].float(), carried[:, num_prefix:]), f"block {i}"
        # The dense restore: prefix tokens, then every patch with its token's feature; one that left, what its rule
        # gives it (under ``departure``, the feature its token had when it left).
        restored, departed = tr.restore(state), tr.restore(state, "departure")
        assert restored.shape == (batch, num_prefix + patches, state.x.shape[-1]) and restored.dtype == state.x.dtype
        assert torch.equal(restored[:, :num_prefix], state.x[:, :num_prefix])
        carried = state.x.gather(1, owner.clamp(min=0).unsqueeze(-1).expand(-1, -1, state.x.shape[-1]))
        stayed, left = ~state.left, state.left
        assert torch.equal(restored[:, num_prefix:][stayed], carried[stayed]), f"block {i}"
        assert torch.equal(departed[:, num_prefix:][left], state.left_x[left].to(state.x.dtype)), f"block {i}"


def check_batch_independence(model: torch.nn.Module, x: torch.Tensor, together: dict, run_on) -> None:
    """Invariant 6: each image's outputs alone equal its outputs in the batch (``run_on(x)(model)``)."""
    for i in range(x.shape[0]):
        alone = run_on(x[i : i + 1])(model)
        for key, value in together.items():
            torch.testing.assert_close(alone[key], value[i : i + 1], atol=ATOL, rtol=0, msg=f"image {i}, {key}")


def unpatched(plain: torch.nn.Module, run_on, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The unpatched model's outputs on ``x`` (``run_on(x)(plain)``). transformers, open_clip and timm with
    ``dynamic_img_size`` fail on an empty batch themselves (a reshape with -1): there, those of one image, emptied."""
    return {key: value[: x.shape[0]] for key, value in run_on(non_empty(x))(plain).items()}


def shapes(out: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {key: value.shape for key, value in out.items()}


def assert_close_outputs(got: dict, expected: dict, atol: float = ATOL) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=atol, rtol=0, msg=key)


# --- timm (the main share) --------------------------------------------------------------------------------------

# Prefix layouts: CLS; CLS with an average-pooled head; CLS + distillation token; CLS + registers; registers without
# CLS (average pool); no prefix token at all (average pool); a CLS token outside the position embedding.
TIMM_KINDS = {
    "cls": ("vit_tiny_patch16_224", {}),
    "cls_avg_pool": ("vit_tiny_patch16_224", dict(global_pool="avg")),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4)),
    "registers_no_cls": ("vit_tiny_patch16_224", dict(class_token=False, reg_tokens=4, no_embed_class=True,
                                                      global_pool="avg")),
    "no_cls": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "no_embed_class": ("vit_tiny_patch16_224", dict(no_embed_class=True)),
}


class TimmConfig(NamedTuple):
    kind: str
    grid: tuple[int, int]  # the model's own patch grid
    patch: int
    depth: int
    dim: int
    heads: int
    layerscale: bool
    qk_norm: bool
    dynamic: bool  # dynamic_img_size: runs other grids too

    def size(self, grid: tuple[int, int] | None = None) -> tuple[int, int]:
        return tuple(self.patch * g for g in (grid or self.grid))


grids = st.tuples(st.integers(3, 8), st.integers(3, 8))
timm_configs = st.builds(
    TimmConfig, kind=st.sampled_from(sorted(TIMM_KINDS)), grid=grids, patch=st.sampled_from([2, 4, 8]),
    depth=st.integers(2, 4), dim=st.sampled_from([24, 36, 48]), heads=st.sampled_from([2, 3]),
    layerscale=st.booleans(), qk_norm=st.booleans(), dynamic=st.booleans(),
)


@functools.lru_cache(maxsize=64)
def _timm(config: TimmConfig) -> torch.nn.Module:
    name, overrides = TIMM_KINDS[config.kind]
    extra = dict(init_values=1e-5) if config.layerscale else {}  # make_model spreads LayerScale to 0.5
    return make_model(name, img_size=config.size(), patch_size=config.patch, depth=config.depth,
                      embed_dim=config.dim, num_heads=config.heads, num_classes=10, qk_norm=config.qk_norm,
                      dynamic_img_size=config.dynamic, **extra, **overrides)


def timm_model(config: TimmConfig) -> torch.nn.Module:
    """A fresh copy of the small, seeded, eval-mode timm model of ``config`` (built once)."""
    return copy.deepcopy(_timm(config))


PREVIOUS = [None, ("tome", {"r": 1}), ("topk", {"keep_rate": 0.5, "layers": (0,)})]


@given(data=st.data())
def test_timm_patch_and_forward_keep_every_promise_or_refuse_and_change_nothing(data):
    """Invariants 1-4 and 6 in float32, over every prefix layout, batch 0 included, and every kind of option; on
    models with ``dynamic_img_size``, at another grid too, where a schedule valid at the model's own size may not
    fit (a refusal at the forward)."""
    config = data.draw(timm_configs, label="config")
    grid = data.draw(grids, label="input grid") if config.dynamic else config.grid
    method = data.draw(st.sampled_from(METHODS), label="method")
    options = data.draw(method_options(method, config.depth, grid[0] * grid[1]), label="options")
    batch, seed = data.draw(batches, label="batch"), data.draw(seeds, label="seed")
    previous = data.draw(st.sampled_from(PREVIOUS), label="patched before")
    model, plain = timm_model(config), timm_model(config)
    if previous is not None:
        tr.patch(model, previous[0], **previous[1])
    x = images(batch, config.size(grid), seed)
    own_size = forward(images(2, config.size(), seed))  # the outputs compared after a refusal
    patch_errors = with_schedule(options, method, config.depth, math.prod(config.grid)).errors
    if refused(lambda: tr.patch(model, method, **options.kwargs), patch_errors, model, own_size, "patch"):
        return
    run_errors = schedule_errors(method, options.kwargs, config.depth, grid[0] * grid[1])
    if refused(lambda: forward(x)(model), run_errors, model, own_size, "forward"):
        return
    event(f"ran {method}")
    event(f"ran on a batch of {batch}")
    got = forward(x)(model)
    assert shapes(got) == shapes(unpatched(plain, forward, x))
    check_states(model, x, plain, method, options.kwargs, grid)
    check_batch_independence(model, x, got, forward)
    # The dense output is the restored grid (the unpatched one's shape), and the head on it is the forward pass.
    dense = features(x)(model)
    assert shapes(dense) == shapes(unpatched(plain, features, x))
    with torch.no_grad():
        assert torch.equal(dense["features"], model.norm(tr.restore(tr.trace(model, x)[-1])))
        torch.testing.assert_close(model.forward_head(dense["features"]), got["out"], atol=ATOL, rtol=0)
    # unpatch: the original class and exactly the unpatched outputs.
    assert type(tr.unpatch(model)) is type(plain) and "_tokenreduce" not in model.__dict__
    assert_close_outputs(unpatched(model, forward, x), unpatched(plain, forward, x), atol=0)


@given(data=st.data())
def test_timm_bad_options_are_refused_by_name_and_change_nothing(data):
    """Every kind of fault of every method (as the test above draws a third of the time), each example one: the
    ``TokenReduceError`` names it, and the model, plain or patched before, is as it was."""
    config = data.draw(timm_configs, label="config")
    method = data.draw(st.sampled_from(METHODS), label="method")
    fault = data.draw(st.sampled_from(faults(method)), label="fault")
    valid = data.draw(valid_options(method, config.depth, math.prod(config.grid)), label="valid options")
    options = data.draw(inject(fault, method, valid, config.depth), label="options")
    previous = data.draw(st.sampled_from(PREVIOUS), label="patched before")
    model = timm_model(config)
    if previous is not None:
        tr.patch(model, previous[0], **previous[1])
    run = forward(images(2, config.size(), data.draw(seeds, label="seed")))
    assert refused(lambda: tr.patch(model, method, **options.kwargs), options.errors, model, run, "patch")


@given(data=st.data())
def test_timm_nothing_to_remove_equals_unpatched(data):
    """Invariant 5: r=0 in each of its forms, keep_rate=1: the unpatched outputs and dense grid, within 1e-5."""
    config = data.draw(timm_configs, label="config")
    method = data.draw(st.sampled_from(METHODS), label="method")
    options = data.draw(no_op_options(method, config.depth), label="options")
    x = images(data.draw(batches, label="batch"), config.size(), data.draw(seeds, label="seed"))
    plain = timm_model(config)
    model = tr.patch(timm_model(config), method, **options.kwargs)
    assert tr.describe(model)["tokens_out"] == tr.describe(plain)["tokens_out"]
    assert_close_outputs(forward(x)(model), unpatched(plain, forward, x))
    assert_close_outputs(features(x)(model), unpatched(plain, features, x))  # the dense grid


@given(data=st.data())
def test_timm_bfloat16_outputs_are_finite_and_reduce_as_described(data):
    """Invariant 7, and 1-4 in bfloat16: under autocast, and with the weights themselves in bfloat16."""
    config = data.draw(timm_configs, label="config")
    method = data.draw(st.sampled_from(METHODS), label="method")
    options = data.draw(reducing_options(method, config.depth, math.prod(config.grid)), label="options")
    how = data.draw(st.sampled_from(["autocast", "autocast", "weights"]), label="bfloat16")
    x = images(data.draw(batches, label="batch"), config.size(), data.draw(seeds, label="seed"))
    model, plain = tr.patch(timm_model(config), method, **options.kwargs), timm_model(config)
    if how == "weights":
        model, plain, x = model.to(torch.bfloat16), plain.to(torch.bfloat16), x.bfloat16()
    event(f"bfloat16 {how}")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
        got, expected = forward(x)(model)["out"], unpatched(plain, forward, x)["out"]
        assert got.shape == expected.shape and got.dtype == expected.dtype == torch.bfloat16
        assert bool(torch.isfinite(got).all())
        check_states(model, x, plain, method, options.kwargs, config.grid, tol=5e-2)  # a bfloat16 ulp


# --- Hugging Face transformers ---------------------------------------------------------------------------------

# One of each prefix layout: CLS; CLS + distillation; CLS with LayerScale (DINOv2); registers; CLIP; none (SigLIP).
HF_KINDS = ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher", "Dinov2Model",
            "Dinov2WithRegistersModel", "CLIPVisionModel", "SiglipVisionModel"]


class HfConfig(NamedTuple):
    case: str
    grid: int
    depth: int
    impl: str


hf_configs = st.builds(HfConfig, case=st.sampled_from(HF_KINDS), grid=st.integers(3, 6), depth=st.integers(2, 3),
                       impl=st.sampled_from(["eager", "sdpa"]))


@functools.lru_cache(maxsize=32)
def _hf(config: HfConfig) -> torch.nn.Module:
    """A small model of ``config``, built from its config class as test_hf builds them (8-pixel patches)."""
    cls_name, cfg_name, overrides = HF_CASES[config.case]
    cfg = getattr(transformers, cfg_name)(**{**HF_SMALL, **overrides, "num_hidden_layers": config.depth,
                                             "image_size": 8 * config.grid, "patch_size": 8})
    cfg._attn_implementation = config.impl
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # spread the prefix and position embeddings, as test_hf does
        for name, p in model.named_parameters():
            if name.endswith(TOKEN_NAMES):
                p.normal_(0, 0.5)
    return model


def hf_forward(x: torch.Tensor):
    return forward(x, output_hidden_states=True)


@share(0.5)
@given(data=st.data())
def test_hf_models_keep_every_promise_or_refuse(data):
    """Invariants 1-6 on transformers models (every output: logits, pooled, restored last and hidden states)."""
    config = data.draw(hf_configs, label="config")
    check_family_example(data, config, _hf(config), hf_forward, 8 * config.grid)


def check_family_example(data, config, built: torch.nn.Module, run, side: int) -> None:
    """Invariants 1-6 on one drawn example of a non-timm family: ``built`` is the cached model of ``config``,
    ``run(x)`` the function of a model that returns its outputs, ``side`` the image side in pixels."""
    method = data.draw(st.sampled_from(METHODS), label="method")
    no_op = data.draw(st.booleans(), label="nothing to remove")
    patches = config.grid**2
    options = data.draw(no_op_options(method, config.depth) if no_op else
                        method_options(method, config.depth, patches), label="options")
    x = images(data.draw(batches, label="batch"), (side,) * 2, data.draw(seeds, label="seed"))
    model, plain = copy.deepcopy(built), copy.deepcopy(built)
    errors = with_schedule(options, method, config.depth, patches).errors
    if refused(lambda: tr.patch(model, method, **options.kwargs), errors, model, run(non_empty(x)), "patch"):
        return
    event(f"ran {method}")
    event(f"ran on a batch of {x.shape[0]}")
    got = run(x)(model)
    assert shapes(got) == shapes(unpatched(plain, run, x))
    check_states(model, x, plain, method, options.kwargs, (config.grid, config.grid))
    check_batch_independence(model, x, got, run)
    if no_op:
        assert_close_outputs(got, unpatched(plain, run, x))


# --- open_clip ------------------------------------------------------------------------------------------------

# test_open_clip's cases (nn.MultiheadAttention with CLS / average pooling, open_clip's own Attention), no pooling,
# and the tokens returned beside the pooled output.
OPEN_CLIP_KINDS = {
    "tok": ("tok", {}), "avg": ("avg", {}), "avg_ln_after_pool": ("avg_ln_after_pool", {}), "custom": ("custom", {}),
    "none": ("tok", dict(pool_type="none")), "output_tokens": ("avg", dict(output_tokens=True)),
}


class OpenClipConfig(NamedTuple):
    kind: str
    grid: int
    patch: int
    depth: int


open_clip_configs = st.builds(OpenClipConfig, kind=st.sampled_from(sorted(OPEN_CLIP_KINDS)), grid=st.integers(3, 7),
                              patch=st.sampled_from([4, 8]), depth=st.integers(2, 4))


@functools.lru_cache(maxsize=32)
def _tower(config: OpenClipConfig) -> torch.nn.Module:
    case, overrides = OPEN_CLIP_KINDS[config.kind]
    return make_tower(case, image_size=config.patch * config.grid, patch_size=config.patch, layers=config.depth,
                      **overrides)


@share(0.5)
@given(data=st.data())
def test_open_clip_towers_keep_every_promise_or_refuse(data):
    """Invariants 1-6 on open_clip image towers (pooled features, and the restored tokens where they are output)."""
    config = data.draw(open_clip_configs, label="config")
    check_family_example(data, config, _tower(config), forward, config.patch * config.grid)
