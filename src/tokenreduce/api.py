"""The public API: patch, unpatch, patched, methods, describe, flops, schedule_for_flops, trace, restore,
diagnostics."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import adapter_for
from .core.cost import FlopsReport, analytic_flops
from .core.errors import InputError
from .core.ops import restore
from .core.restore import OPTION_NAMES as RESTORE_OPTIONS
from .core.state import TokenState
from .methods.base import Method, create_method, method_names

__all__ = ["describe", "diagnostics", "flops", "method_of", "methods", "patch", "patched", "restore",
           "schedule_for_flops", "trace", "unpatch", "unwrap"]


@dataclass
class _Patch:
    method: Method
    original_class: type


def methods() -> list[str]:
    """Names of the registered token-reduction methods.

    >>> "tome" in methods()
    True
    """
    return method_names()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` (``_orig_mod``), ``DistributedDataParallel`` and ``DataParallel``
    (``.module``) wrappers, which every call of this API acts on.

    >>> import torch
    >>> inner = torch.nn.Linear(2, 2)
    >>> unwrap(torch.nn.DataParallel(inner)) is inner
    True
    """
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _current(model: nn.Module) -> _Patch | None:
    return unwrap(model).__dict__.get("_tokenreduce")


def _as_method(method: str | Method, options: dict[str, Any]) -> Method:
    if isinstance(method, Method):
        restore_options = {key: options[key] for key in RESTORE_OPTIONS if key in options}
        others = sorted(set(options) - set(restore_options))
        if others:
            raise InputError(f"options {others} given with a ready Method instance {method!r}")
        return method.with_restore(**restore_options) if restore_options else method
    return create_method(method, **options)


def _report(adapter: Any, model: nn.Module, method: Method | None,
            img_size: int | tuple[int, int] | None = None) -> FlopsReport:
    """The cost report of ``method`` on ``model`` by its adapter: a hierarchical family's own, else the plain-ViT
    cost table on the adapter's ``ModelInfo``. Raises on a schedule the model cannot run."""
    own = getattr(adapter, "flops_report", None)
    if own is not None:
        return own(model, method, img_size)
    return analytic_flops(adapter.model_info(model, img_size), method)


def patch(model: nn.Module, method: str | Method, **options: Any) -> nn.Module:
    """Patch ``model`` in place with a token-reduction method; returns the model.

    Patching an already patched model replaces its method. Every check runs before anything changes, so a
    bad method, option or schedule leaves the model exactly as it was.

    ``restore`` chooses what a dense output (``forward_features``, intermediates, ``last_hidden_state``, ...)
    gives a patch whose token left: ``"departure"``, ``"nearest"``, ``"reconstruct"`` (with ``restore_k``,
    ``restore_tau``, ``restore_weights``), ``"ridge"`` (with ``restore_lambda``) or, for GTP, ``"graph"``; None is
    the method's default (``tokenreduce.core.restore``). Outputs that read only the prefix tokens are the same
    under every rule.

    >>> import timm, tokenreduce as tr
    >>> model = tr.patch(timm.create_model("deit_tiny_patch16_224"), "tome", r=13)
    >>> tr.describe(model)["tokens_out"][-1]
    41

    A model wrapped by ``torch.compile``, DDP or ``DataParallel`` is patched inside its wrapper (see
    :func:`unwrap`); a compiled wrapper recompiles on its next call, since the inner model's class changed.
    """
    inner = unwrap(model)
    adapter = adapter_for(inner)
    resolved = _as_method(method, options)
    _report(adapter, inner, resolved)  # raises on impossible schedules
    current = _current(inner)
    original = current.original_class if current is not None else type(inner)
    inner.__class__ = adapter.patched_class(original)
    inner._tokenreduce = _Patch(resolved, original)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the model's original class; its outputs are then exactly the unpatched ones."""
    inner = unwrap(model)
    current = _current(inner)
    if current is not None:
        inner.__class__ = current.original_class
        del inner._tokenreduce
    return model


@contextmanager
def patched(model: nn.Module, method: str | Method, **options: Any) -> Iterator[nn.Module]:
    """Patch for the duration of a ``with`` block, then restore whatever was there before.

    >>> import timm, tokenreduce as tr
    >>> model = timm.create_model("deit_tiny_patch16_224")
    >>> with tr.patched(model, "evit", keep_rate=0.7):
    ...     tr.describe(model)["method"]
    'evit'
    >>> tr.describe(model)["method"] is None
    True
    """
    previous = _current(model)
    patch(model, method, **options)
    try:
        yield model
    finally:
        unpatch(model)
        if previous is not None:
            patch(model, previous.method)


def method_of(model: nn.Module) -> Method | None:
    """The method patched into ``model``, or None."""
    current = _current(model)
    return None if current is None else current.method


def describe(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """The method, its options, the resolved per-block schedule and the token counts per block.

    ``tokens_in[i]`` enter block i; its MLP runs on ``tokens_out[i]``. ``notes`` says where the method's own
    definition clamped the schedule. Diagnostics of a forward pass come from :func:`diagnostics`.
    """
    model = unwrap(model)
    adapter = adapter_for(model)
    method = method_of(model)
    own = getattr(adapter, "describe", None)
    if own is not None:
        out = own(model, method, img_size)
        if method is not None:
            out.update({k: v for k, v in method.describe().items() if k not in out})
        return out
    info = adapter.model_info(model, img_size)
    report = analytic_flops(info, method)
    out = {
        "method": None if method is None else method.name,
        "options": {} if method is None else dict(method.options),
        "num_prefix": info.num_prefix,
        "grid": list(info.grid),
        "schedule": [0] * info.depth,
        "tokens_in": [b.tokens_in for b in report.blocks],
        "tokens_out": [b.tokens_out for b in report.blocks],
        "notes": list(report.notes),
        "restore": None if method is None else method.restore_rule.as_dict(),
    }
    if method is not None:
        plan = method.plan(info.num_tokens, info.num_prefix, info.depth)
        out["schedule"] = list(plan.amounts)
        out.update({k: v for k, v in method.describe().items() if k not in out})
    return out


def flops(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> FlopsReport:
    """Analytic cost (GMACs) of one image through ``model`` as patched now (unreduced if not patched).

    >>> import timm, tokenreduce as tr
    >>> round(tr.flops(timm.create_model("deit_small_patch16_224")).gmacs, 2)
    4.6
    """
    model = unwrap(model)
    own = getattr(model, "tokenreduce_flops", None)
    if callable(own):  # models built by tokenreduce itself (STViT) count their own cost
        return own(img_size)
    return _report(adapter_for(model), model, method_of(model), img_size)


def schedule_for_flops(model: nn.Module, method: str, target_gmacs: float,
                       img_size: int | tuple[int, int] | None = None, **options: Any) -> dict[str, Any]:
    """The smallest reduction of ``method`` whose total cost (overhead included) reaches ``target_gmacs``.

    Searches the method's main knob (``r`` for merge/propagation methods, ``keep_rate`` for pruning),
    keeping the other ``options`` fixed, and returns the keyword arguments for ``patch``.

    >>> import timm, tokenreduce as tr
    >>> tr.schedule_for_flops(timm.create_model("deit_small_patch16_224"), "tome", 2.71)
    {'r': 13}
    """
    model = unwrap(model)
    adapter = adapter_for(model)
    if not isinstance(target_gmacs, int | float) or not math.isfinite(target_gmacs) or target_gmacs <= 0:
        raise InputError(f"target_gmacs must be a positive number, got {target_gmacs!r}")
    knob = create_method(method, **options).search_knob
    fixed = {k: v for k, v in options.items() if k not in ("r", "keep_rate")}
    most_tokens = max(b.tokens_in for b in _report(adapter, model, None, img_size).blocks)

    def cost(value: Any) -> float:
        try:
            return _report(adapter, model, create_method(method, **{**fixed, knob: value}), img_size).total_gmacs
        except ValueError:
            return math.inf  # a schedule this model cannot run

    if knob == "keep_rate":
        if cost(1.0) <= target_gmacs:
            return {**fixed, knob: 1.0}
        # Cost grows with keep_rate: bisect for the largest keep_rate under the target.
        low, high = 1e-4, 1.0
        if cost(low) > target_gmacs:
            raise InputError(f"{method} cannot reach {target_gmacs} GMACs on this model "
                             f"(lowest {cost(low):.3f} at keep_rate={low})")
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if cost(mid) <= target_gmacs else (low, mid)
        return {**fixed, knob: low}
    # r is a small integer and the analytic cost takes microseconds: scan it.
    for r in range(most_tokens):
        if cost(r) <= target_gmacs:
            return {**fixed, knob: r}
    raise InputError(f"{method} cannot reach {target_gmacs} GMACs on this model "
                     f"(unreduced {cost(0):.3f}); try a larger target")


def trace(model: nn.Module, images: torch.Tensor, track_owner: bool = True, dense: bool = True,
          **restore_options: Any) -> list[TokenState]:
    """Run ``model`` as patched now and return the token state after every block (before the final norm).

    Each state has ``owner`` (which token holds every input patch) when ``track_owner`` is on, and with
    ``dense`` what :func:`restore` needs to rebuild the full token grid at that block, under the model's restore
    rule or the one given by ``restore`` / ``restore_k`` / ``restore_tau`` / ``restore_weights`` /
    ``restore_lambda`` (see :func:`patch`).

    >>> import timm, torch, tokenreduce as tr
    >>> model = tr.patch(timm.create_model("deit_tiny_patch16_224", depth=2), "tome", r=50)
    >>> states = tr.trace(model, torch.randn(1, 3, 224, 224))
    >>> [s.x.shape[1] for s in states], tuple(tr.restore(states[-1]).shape)
    ([147, 97], (1, 197, 192))
    """
    model = unwrap(model)
    unknown = sorted(set(restore_options) - set(RESTORE_OPTIONS))
    if unknown:
        raise InputError(f"trace: unknown options {unknown}; valid: {', '.join(RESTORE_OPTIONS)}")
    method = method_of(model)
    if method is not None and restore_options:
        method = method.with_restore(**restore_options)
    states: list[TokenState] = []
    adapter_for(model).forward_tokens(model, images, method, track_owner=track_owner, dense=dense,
                            on_block=lambda i, s: states.append(s))
    return states


def diagnostics(model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """What the patched method did on ``images``, as plain numbers (one traced forward pass; nothing is read
    from or written to the model): PPT ``{"pooled_share": {block: share of images that pooled}}``, GTP the
    size of its graph. ``{}`` for an unpatched model or a method without diagnostics.
    """
    model = unwrap(model)
    method = method_of(model)
    if method is None:
        adapter_for(model)  # an unsupported model is an error here too
        return {}
    with torch.no_grad():
        return method.diagnostics(trace(model, images, track_owner=False, dense=False))
