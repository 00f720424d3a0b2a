"""Export a model, patched or not, to OpenVINO IR (``.xml`` + ``.bin``), float32 or int8, checked in OpenVINO.

Two routes to the same IR:

- ``source="onnx"`` (default): :func:`tokenreduce.export_onnx` writes and checks the ONNX graph (int8 too: ONNX
  Runtime's quantization, whose QDQ graph OpenVINO runs in int8), then ``openvino.convert_model`` reads it;
- ``source="torch"``: ``openvino.convert_model(model, example_input=...)`` traces the patched PyTorch model itself
  (TorchScript), for a stack that has no ONNX toolchain. float32 only.

Either way the IR keeps float32 weights (``compress_to_fp16=False``), has a dynamic batch axis unless
``batch_size`` is given, and is compiled and run on OpenVINO's CPU device against PyTorch on the check images
(float32 inference precision, so that a CPU with bf16 units does not silently run bf16) before it is written.

>>> import timm, tokenreduce as tr
>>> model = tr.patch(timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64), "tome", r=4)
>>> tr.export_openvino(model, "/tmp/tome.xml").max_abs_diff < 1e-4  # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import call
from .core.errors import InputError, InputTypeError, require
from .export import (
    DEFAULT_INT8_RECIPE,
    DEFAULT_OPSET,
    INT8_MODES,
    INT8_RECIPES,
    Predicting,
    default_img_size,
    eval_mode,
    export_onnx,
    float_outputs,
    input_channels,
    output_agreement,
    prepare_check_images,
    refuse_unexportable,
    size_pair,
)

__all__ = ["SOURCES", "OpenVinoExport", "export_openvino", "openvino_model"]

EXTRA = "openvino"
#: Where the IR is converted from.
SOURCES = ("onnx", "torch")


@dataclass(frozen=True)
class OpenVinoExport:
    """What :func:`export_openvino` wrote and how it was checked."""

    path: str  # the .xml; its weights are in the .bin beside it
    img_size: tuple[int, int]
    batch_size: int | None  # None: dynamic batch axis
    source: str  # "onnx" or "torch"
    int8: str | None  # "dynamic" / "static", None for float32
    max_abs_diff: float | None  # float32: OpenVINO against PyTorch on the check images; None when not checked
    cosine: float | None  # int8: mean cosine of the outputs against float PyTorch
    agreement: float | None  # int8: share of check images whose top-1 agrees with float PyTorch
    checked_batches: tuple[int, ...]
    int8_recipe: str | None = None  # int8: the recipe (a key of tokenreduce.export.INT8_RECIPES)


def openvino_model(path: str | os.PathLike, threads: int | None = None, device: str = "CPU") -> Any:
    """An IR (``.xml``) compiled by OpenVINO on ``device`` at float32 inference precision; ``threads`` caps the
    inference threads (None: OpenVINO's default). Call it with a numpy batch: ``compiled(images)[0]``."""
    require("openvino", EXTRA)
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), device, config)


def export_openvino(model: nn.Module, path: str | os.PathLike, img_size: int | tuple[int, int] | None = None,
                    batch_size: int | None = None, source: str = "onnx", int8: str | None = None,
                    calibration: torch.Tensor | None = None, images: torch.Tensor | None = None,
                    check: bool = True, atol: float = 1e-4, min_cosine: float = 0.99,
                    predict: Callable[[nn.Module, torch.Tensor], Any] | None = None,
                    int8_recipe: str = DEFAULT_INT8_RECIPE) -> OpenVinoExport:
    """Export ``model`` (as patched now, or plain) to the OpenVINO IR ``path`` (``.xml``, weights in ``.bin``).

    Args:
        model: a module taking one ``B x C x H x W`` float tensor; exported in eval mode.
        path: the ``.xml`` to write (its folder is created; the ``.bin`` goes beside it).
        img_size: the fixed input size, an int or (height, width); default the model's own.
        batch_size: None (default) for a dynamic batch axis, or a fixed batch size.
        source: ``"onnx"`` (default: through :func:`tokenreduce.export_onnx`) or ``"torch"`` (OpenVINO traces
            the PyTorch model; float32 only).
        int8: None, ``"dynamic"`` or ``"static"``: the ONNX graph's matrix products quantized by ONNX Runtime
            (see :func:`tokenreduce.export_onnx`) and run by OpenVINO in int8.
        calibration: ``int8="static"`` (and the ``"smooth"`` recipe's ranges): the calibration batch (default the
            check images).
        images: the check batch; default random images.
        check: compile the IR on OpenVINO's CPU device and compare with PyTorch: float32 within ``atol``, int8
            with a mean output cosine of at least ``min_cosine``; otherwise a ``RuntimeError`` and nothing written.
        predict: export ``predict(model, images)`` instead of ``model(images)`` (see :func:`tokenreduce.export_onnx`).
        int8_recipe: ``"smooth"`` (default), ``"per-channel"`` or ``"per-tensor"`` (see
            :func:`tokenreduce.export_onnx`).

    Raises:
        MissingExtraError: openvino (or, from ONNX, onnx / onnxscript / onnxruntime) missing.
        InputError: a bad size, batch size, source or int8 mode; int8 from ``source="torch"``.
    """
    require("openvino", EXTRA)
    if source not in SOURCES:
        raise InputError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")
    if int8 is not None and int8 not in INT8_MODES:
        raise InputError(f"unknown int8 mode {int8!r}; valid: {', '.join(INT8_MODES)} (or None for float32)")
    if int8_recipe not in INT8_RECIPES:
        raise InputError(f"unknown int8_recipe {int8_recipe!r}; valid: {', '.join(INT8_RECIPES)}")
    if int8 is not None and source == "torch":
        raise InputError("int8 goes through the ONNX graph (ONNX Runtime's quantization); use source='onnx'")
    if int8 is not None and not check:
        raise InputError("an int8 export is always checked against the float model; drop check=False")
    if type(model).__name__ == "OptimizedModule":
        model = model._orig_mod
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"export_openvino needs a torch.nn.Module, got {type(model).__name__}")
    if Path(path).suffix != ".xml":
        raise InputError(f"an OpenVINO IR is written as a .xml file (weights in the .bin beside it), got {path!r}")
    size = default_img_size(model) if img_size is None else size_pair(img_size)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be None (dynamic) or a positive integer, got {batch_size!r}")
    refuse_unexportable(model)
    in_chans = input_channels(model)
    check_images = prepare_check_images(images, size, batch_size, in_chans)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import openvino as ov

    net = model if predict is None or predict is call else Predicting(model, predict)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tokenreduce-export-") as folder:
        if source == "onnx":
            onnx_path = Path(folder) / "model.onnx"
            export_onnx(model, onnx_path, img_size=size, batch_size=batch_size, opset=DEFAULT_OPSET,
                        images=check_images, check=check, atol=atol, predict=predict, int8=int8,
                        calibration=calibration, min_cosine=min_cosine, int8_recipe=int8_recipe)
            converted = ov.convert_model(str(onnx_path))
        else:
            converted = _convert_torch(net, size, batch_size, in_chans)
        staged = Path(folder) / path.name
        ov.save_model(converted, str(staged), compress_to_fp16=False)
        diff = cosine = agreement = None
        batches: tuple[int, ...] = ()
        if check:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            compiled = openvino_model(staged)
            batches = (check_images.shape[0],) if batch_size is not None or check_images.shape[0] == 1 \
                else (check_images.shape[0], 1)
            with eval_mode(net):
                for count in batches:
                    expected = float_outputs(net, check_images[:count], device)
                    result = compiled(check_images[:count].numpy())
                    got = [result[output] for output in compiled.outputs]
                    if int8 is None:
                        for e, g in zip(expected, got, strict=True):
                            if e.shape != g.shape:
                                raise RuntimeError(f"the IR gives shape {g.shape} where PyTorch gives {e.shape}")
                            diff = max(diff or 0.0, float(abs(e - g).max()) if e.size else 0.0)
                    elif count == check_images.shape[0]:
                        cosine, agreement = output_agreement(expected, got)
            if diff is not None and diff > atol:
                raise RuntimeError(f"the OpenVINO IR differs from PyTorch by {diff:.3g} (> atol {atol:g}) on the "
                                   f"check images; nothing written")
            if cosine is not None and cosine < min_cosine:
                raise RuntimeError(f"the int8 IR's outputs have mean cosine {cosine:.4f} against the float model "
                                   f"(< min_cosine {min_cosine:g}); nothing written")
        for suffix in (".xml", ".bin"):
            os.replace(staged.with_suffix(suffix), path.with_suffix(suffix))
    return OpenVinoExport(str(path), size, batch_size, source, int8, diff, cosine, agreement, batches,
                          int8_recipe if int8 is not None else None)


def _convert_torch(model: nn.Module, size: tuple[int, int], batch_size: int | None, in_chans: int) -> Any:
    """OpenVINO's direct conversion (TorchScript tracing) of the model in eval mode, batch axis dynamic unless
    fixed. Methods take their tracing-safe forms here (``methods/gtp.py``: no in-place diagonal fill)."""
    import openvino as ov

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.zeros(batch_size or 2, in_chans, *size, device=device)
    shape = ov.PartialShape([batch_size or -1, in_chans, *size])
    with eval_mode(model), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # TorchScript's tracer warnings (Python ints from tensors: fixed schedule)
        return ov.convert_model(model, example_input=example, input=[shape])
