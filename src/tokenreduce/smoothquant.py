"""Float rewrites that make a model easier to quantize to int8, found by looking at one forward pass.

int8 loses most where a layer's input has a few channels far larger than the rest (one scale must cover them):
the LayerNorm outputs that feed the projections, and the GELU outputs that feed an MLP's second layer. Two tools:

- :func:`smooth_quant` (Xiao et al., "SmoothQuant", ICML 2023): per input channel ``s = max|x|^alpha /
  max|w|^(1 - alpha)`` over calibration images; the LayerNorm's weight and bias are divided by ``s`` and the
  Linear layers it feeds multiplied by it (and, for a fused ``qkv`` with a sibling ``proj``, the values divided
  and ``proj``'s inputs multiplied, since attention is linear in the values). The outputs are unchanged in float
  (checked on the calibration images; a model whose LayerNorm output also goes elsewhere is refused), the
  int8 inputs flatter.
- :func:`after_activation_linears`: the Linear layers whose input is an activation's output (an MLP's
  second layer), which an int8 recipe may keep in float.

Both find the connections from tensor identity in one forward pass (a LayerNorm's output object passed on to a
Linear), so they know no model family: timm ViTs and Swin, Hugging Face and open_clip models alike.

>>> import timm, torch
>>> model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32).eval()
>>> smoothed = smooth_quant(model, torch.randn(4, 3, 32, 32))
>>> bool(torch.allclose(smoothed(torch.ones(1, 3, 32, 32)), model(torch.ones(1, 3, 32, 32)), atol=1e-4))
True
>>> sorted(after_activation_linears(model, torch.randn(1, 3, 32, 32)))
['blocks.0.mlp.fc2', 'blocks.1.mlp.fc2']
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from .core.errors import InputError

__all__ = ["after_activation_linears", "smooth_quant"]

#: Parameter-free leaf modules whose class name matches this are activations.
ACTIVATION = re.compile(r"gelu|relu|silu|swish|mish|sigmoid|tanh|activation", re.IGNORECASE)
#: Largest relative change of the outputs (in float64) the rewrite may make: rounding only.
REWRITE_RTOL = 1e-9


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    first = output[0] if isinstance(output, tuple | list) and output else getattr(output, "logits", None)
    return first if isinstance(first, torch.Tensor) else None


def _is_activation(module: nn.Module) -> bool:
    return (not list(module.children()) and not list(module.parameters(recurse=False))
            and bool(ACTIVATION.search(type(module).__name__)))


@torch.inference_mode()
def trace_linears(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> dict[str, Any]:
    """One pass over ``images`` (in chunks): per Linear, the largest |input| of every input channel
    (``"maxima"``), the LayerNorm whose output object it was given (``"norm_of"``, name -> name) and the
    Linear layers given an activation's output (``"after_activation"``)."""
    maxima: dict[str, torch.Tensor] = {}
    norm_of: dict[str, str] = {}
    after_activation: set[str] = set()
    produced: dict[int, tuple[str, str, torch.Tensor]] = {}  # id(tensor) -> (kind, name, tensor kept alive)
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def linear_hook(_module, inputs, name=name):
                x = inputs[0]
                peak = x.detach().abs().flatten(0, -2).amax(0).float()
                maxima[name] = torch.maximum(maxima[name], peak) if name in maxima else peak
                kind, source, _ = produced.get(id(x), (None, None, None))
                if kind == "norm":
                    norm_of[name] = source
                elif kind == "act":
                    after_activation.add(name)
            hooks.append(module.register_forward_pre_hook(linear_hook))
        elif isinstance(module, nn.LayerNorm) or _is_activation(module):
            kind = "norm" if isinstance(module, nn.LayerNorm) else "act"

            def output_hook(_module, _inputs, output, name=name, kind=kind):
                if isinstance(output, torch.Tensor):
                    produced[id(output)] = (kind, name, output)
            hooks.append(module.register_forward_hook(output_hook))
    try:
        for chunk in images.split(batch_size):
            model(chunk)
            produced.clear()
    finally:
        for handle in hooks:
            handle.remove()
    return {"maxima": maxima, "norm_of": norm_of, "after_activation": after_activation}


def after_activation_linears(model: nn.Module, images: torch.Tensor) -> set[str]:
    """Names of the Linear layers whose input is an activation module's output (e.g. timm's ``mlp.fc2``)."""
    with _eval(model):
        return trace_linears(model, images)["after_activation"]


class _eval:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.modes = model, {m: m.training for m in model.modules()}

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for module, mode in self.modes.items():
            module.training = mode


def smooth_quant(model: nn.Module, images: torch.Tensor, alpha: float = 0.7, values: bool = True) -> nn.Module:
    """A copy of ``model`` with SmoothQuant's scales folded in: equal outputs in float, flatter int8 inputs.

    The fold is checked in float64 on (up to 16 of) ``images``: the outputs may change by rounding only, so that
    no decision a method makes flips; if the value -> ``proj`` fold changes them, only the LayerNorm folds are
    kept. A method that ranks tokens by the values' norms (PPT) needs ``values=False``: a check on a few images
    may miss a decision that flips on others.

    Args:
        model: any module taking one image batch (patched or not); not changed.
        images: calibration images, preprocessed (e.g. 32-256 real photos); the input maxima come from them.
        alpha: how much of the activation range moves into the weights (0.5-0.8 typical; 0.7 the default).
        values: also fold into the values of a fused ``qkv`` and its ``proj``.

    Raises:
        InputError: ``alpha`` outside [0, 1]; no LayerNorm feeding a Linear layer; a rewrite that changes the
            float outputs (a LayerNorm output also used elsewhere than its Linear layers).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise InputError(f"SmoothQuant's alpha must be a number in [0, 1], got {alpha!r}")
    with _eval(model):
        found = trace_linears(model, images)
    modules = dict(model.named_modules())
    groups: dict[str, list[str]] = {}
    for linear, norm in found["norm_of"].items():
        if modules[norm].weight is not None and modules[norm].bias is not None:
            groups.setdefault(norm, []).append(linear)
    if not groups:
        raise InputError(f"{type(model).__name__} has no LayerNorm (with weight and bias) feeding a Linear layer "
                         f"directly; SmoothQuant has nothing to fold into")
    change = 0.0
    model64 = copy.deepcopy(model).double().eval()
    for with_values in (True, False) if values else (False,):
        smoothed64 = copy.deepcopy(model64)
        if not _fold(smoothed64, groups, found["maxima"], alpha, with_values):
            continue  # no value fold to try
        change = _relative_change(model64, smoothed64, images[:16].double())
        if change <= REWRITE_RTOL:
            smoothed = copy.deepcopy(model).eval()
            _fold(smoothed, groups, found["maxima"], alpha, with_values)
            return smoothed
    raise InputError(f"SmoothQuant changed {type(model).__name__}'s outputs by {change:.2g} (relative, in float64; "
                     f"> {REWRITE_RTOL:g}): a LayerNorm output is used elsewhere than in the Linear layers it "
                     f"feeds; quantize without it (int8_recipe='per-channel')")


def _scale(activation_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    weight_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).float()
    return (activation_max.clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def _fold(model: nn.Module, groups: dict[str, list[str]], maxima: dict[str, torch.Tensor], alpha: float,
          values: bool) -> bool:
    """Fold the scales into ``model`` in place: every LayerNorm into the Linear layers it feeds and, with
    ``values``, every fused ``qkv``'s value rows into its sibling ``proj``. False if ``values`` found none."""
    modules = dict(model.named_modules())
    folded_values = False
    for norm_name, linears in groups.items():
        norm = modules[norm_name]
        s = _scale(maxima[linears[0]], [modules[name].weight for name in linears], alpha)
        norm.weight.div_(s.to(norm.weight.dtype))
        norm.bias.div_(s.to(norm.bias.dtype))
        for name in linears:
            modules[name].weight.mul_(s.to(modules[name].weight.dtype))
        for name in linears if values else ():  # attention is linear in the values
            parent, _, leaf = name.rpartition(".")
            proj_name = f"{parent}.proj" if parent else "proj"
            proj, qkv = modules.get(proj_name), modules[name]
            if leaf != "qkv" or not isinstance(proj, nn.Linear) or proj_name not in maxima \
                    or proj.in_features * 3 != qkv.out_features:
                continue
            width = proj.in_features
            s_v = _scale(maxima[proj_name], [proj.weight], alpha)
            qkv.weight[2 * width:].div_(s_v.unsqueeze(1).to(qkv.weight.dtype))
            if qkv.bias is not None:
                qkv.bias[2 * width:].div_(s_v.to(qkv.bias.dtype))
            proj.weight.mul_(s_v.to(proj.weight.dtype))
            folded_values = True
    return folded_values or not values


@torch.inference_mode()
def _relative_change(model: nn.Module, smoothed: nn.Module, images: torch.Tensor) -> float:
    """Relative change of the first output from ``model`` to ``smoothed`` on ``images``."""
    before, after = _first_tensor(model(images)), _first_tensor(smoothed(images))
    if before is None or after is None:
        return 0.0
    return float((after - before).norm() / before.norm().clamp(min=1e-300))
