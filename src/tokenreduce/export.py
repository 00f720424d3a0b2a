"""Export a model, patched or not (and STViT models), to ONNX, and check the graph in ONNX Runtime.

The graph is captured by ``torch.export`` and translated by ``torch.onnx.export(..., dynamo=True)`` (the
``onnxscript`` translator). Every method's forward pass exports as it runs in eager mode: the token counts of a
fixed schedule are Python integers, and the data-dependent choices (which tokens go, PPT's per-image policy) are
batched tensor operations, so they become ONNX ``TopK``/``Gather``/``ScatterElements``/``Where`` nodes. Two things
need help, only while exporting:

- ``argsort(stable=True)`` / ``sort(stable=True)`` (ToMe's and PPT's matching, Top-K, EViT and GTP's selection)
  and ``kthvalue`` (GTP's ``sparsity``): the translator has no function for them; we give it ONNX ``TopK``, which
  ONNX defines to break ties by the lower index, i.e. a stable sort.
- GTP builds its graph with two forms that only the exporter sees (``methods/gtp.py``: no in-place diagonal fill,
  no write of traced tensors into the spatial-graph cache); the eager path is unchanged.

int8: ``int8="dynamic"`` or ``"static"`` quantizes the checked float graph's matrix products (``MatMul``/``Gemm``,
signed int8 weights) with ONNX Runtime's quantization tools; ``"static"`` calibrates the activations on
``calibration`` images (QDQ format, which OpenVINO also runs as int8). ``int8_recipe`` says which products and how:
``"smooth"`` (default: SmoothQuant's rewrite, then the linear layers per output channel, an MLP's second layer in
float), ``"per-channel"`` or ``"per-tensor"`` (every product, attention's too). The int8 graph is checked against
the float PyTorch model on the check images (mean cosine of the outputs >= ``min_cosine``, top-1 agreement
reported) before it is written. The methods' choices (similarities, attention) are computed inside the graph: in
float under the two linear-layer recipes, from int8 products under ``"per-tensor"``.

One option cannot be exported: GTP's ``selection="random"`` (an ablation) draws its scores from a
``torch.Generator``, which no ONNX graph reproduces; it is refused with an ``InputError``.

The image size is fixed in the graph (the token schedule depends on it): ONNX Runtime refuses another size with an
"invalid dimensions" error. The batch axis is dynamic unless ``batch_size`` is given.

>>> import timm, tokenreduce as tr
>>> model = tr.patch(timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64), "tome", r=4)
>>> tr.export_onnx(model, "/tmp/tome.onnx").max_abs_diff < 1e-4  # doctest: +SKIP
True
"""

from __future__ import annotations

import ast
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
from .api import method_of
from .core.errors import InputError, InputTypeError, require
from .methods.base import Plan
from .smoothquant import after_activation_linears, smooth_quant

__all__ = ["DEFAULT_INT8_RECIPE", "DEFAULT_OPSET", "INT8_MODES", "INT8_RECIPES", "OnnxExport", "default_img_size",
           "export_onnx", "onnx_session"]

EXTRA = "export"
#: ONNX opset of the exported graphs: onnxscript's own, run by onnxruntime >= 1.14.
DEFAULT_OPSET = 18
#: Largest model written as one file; a larger one keeps its weights in ``<path>.data`` (protobuf's 2 GB limit).
SINGLE_FILE_BYTES = 1_800_000_000
INPUT_NAME = "images"
#: More blocks than any model has: asking a method what it needs at every block.
MAX_BLOCKS = 256
#: int8 quantization of the exported graph: weights only, activations at run time ("dynamic"), or both calibrated.
INT8_MODES = ("dynamic", "static")
#: Quantized: matrix products (which of them: the recipe); the rest stays float32.
INT8_OPS = ("MatMul", "Gemm")
#: int8 recipes: name -> (linear layers only, one weight scale per output channel, the Linear layers fed by an
#: activation kept in float, SmoothQuant's alpha or None). "per-tensor" is the first recipe (every matrix product,
#: attention's included, one scale per weight); "smooth" keeps the benchmark classifier within 0.5 top-1 points.
INT8_RECIPES: dict[str, tuple[bool, bool, bool, float | None]] = {
    "smooth": (True, True, True, 0.7),
    "per-channel": (True, True, False, None),
    "per-tensor": (False, False, False, None),
}
DEFAULT_INT8_RECIPE = "smooth"


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how it was checked."""

    path: str
    img_size: tuple[int, int]
    batch_size: int | None  # None: dynamic batch axis
    opset: int
    input_name: str
    output_names: tuple[str, ...]
    max_abs_diff: float | None  # ONNX Runtime against PyTorch on the check images; None when not checked
    checked_batches: tuple[int, ...]
    int8: str | None = None  # "dynamic" / "static" quantization, None for float32
    cosine: float | None = None  # int8: mean cosine of the outputs against float PyTorch on the check images
    agreement: float | None = None  # int8: share of check images whose top-1 (argmax of the output) agrees
    int8_recipe: str | None = None  # int8: the recipe (a key of INT8_RECIPES)


def _require_extra(check: bool) -> None:
    for module in ("onnx", "onnxscript") + (("onnxruntime",) if check else ()):
        require(module, EXTRA)


def _translations() -> dict[Any, Any]:
    """ONNX for the two ops the translator lacks. ``aten.sort.stable`` (what ``argsort(stable=True)`` and
    ``sort(stable=True)`` export as): ``TopK`` over the whole axis, sorted; ONNX's TopK puts the lower index first
    among equal values, so it is stable. ``aten.kthvalue``: ``TopK`` of the k smallest, then the k-th."""
    from onnxscript import opset18 as op

    def sort_stable(self, *, stable=None, dim=-1, descending=False):
        size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
        return op.TopK(self, size, axis=dim, largest=descending, sorted=True)

    def kthvalue(self, k, dim=-1, keepdim=False):
        # GTP's sparsity threshold: the k smallest along ``dim``, sorted, and the last of them.
        values, indices = op.TopK(self, op.Constant(value_ints=[k]), axis=dim, largest=False, sorted=True)
        start, end, axes = op.Constant(value_ints=[k - 1]), op.Constant(value_ints=[k]), op.Constant(value_ints=[dim])
        values, indices = op.Slice(values, start, end, axes), op.Slice(indices, start, end, axes)
        if not keepdim:
            values, indices = op.Squeeze(values, axes), op.Squeeze(indices, axes)
        return values, indices

    return {torch.ops.aten.sort.stable: sort_stable, torch.ops.aten.kthvalue.default: kthvalue}


def default_img_size(model: nn.Module) -> tuple[int, int]:
    """The input size a model was built for: the first ``patch_embed.img_size`` among its modules (timm, and
    tokenreduce's STViT builds), else a Hugging Face ``config.image_size`` or open_clip's ``image_size``."""
    for module in model.modules():
        size = getattr(getattr(module, "patch_embed", None), "img_size", None)
        if size is not None:
            return size_pair(size, "the model's patch_embed.img_size")
    for size in (getattr(getattr(model, "config", None), "image_size", None), getattr(model, "image_size", None)):
        if size is not None:
            return size_pair(size, "the model's image size")
    raise InputError(f"cannot tell the image size of a {type(model).__name__}; pass img_size=")


def size_pair(size: Any, what: str = "img_size") -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, list | tuple) else ()
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise InputError(f"{what} must be a positive int or (height, width), got {size!r}")
    return pair


def _flat(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, in order (a tensor, nested tuples/lists, or a ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, list | tuple):
        return [t for item in output for t in _flat(item)]
    raise InputTypeError(f"cannot export a model whose output is a {type(output).__name__}")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the export (dropout off, as deployed), every module's own flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def onnx_session(path: str | os.PathLike, threads: int | None = None, optimization: str = "all",
                 sequential: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU execution provider.

    ``threads`` sets the intra-op threads (None: onnxruntime's default, one per core); ``optimization`` is the
    graph optimisation level: "disable", "basic", "extended" or "all" (default; fuses attention, layer norm and
    GELU subgraphs where onnxruntime recognises them); ``sequential`` runs nodes one after another (the
    default; parallelism comes from the intra-op threads).
    """
    require("onnxruntime", EXTRA)
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise InputError(f"unknown optimization {optimization!r}; valid: {', '.join(levels)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def prepare_check_images(images: torch.Tensor | None, img_size: tuple[int, int], batch_size: int | None,
                  in_chans: int) -> torch.Tensor:
    if images is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(batch_size or 4, in_chans, *img_size, generator=generator)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise InputError(f"images must be a B x C x H x W tensor, got {getattr(images, 'shape', type(images))}")
    if tuple(images.shape[-2:]) != img_size:
        raise InputError(f"images are {tuple(images.shape[-2:])} but the graph is exported at img_size {img_size}")
    if batch_size is not None and images.shape[0] != batch_size:
        raise InputError(f"images hold {images.shape[0]} images but the graph has a fixed batch_size={batch_size}")
    return images.float().cpu()


def export_onnx(model: nn.Module, path: str | os.PathLike, img_size: int | tuple[int, int] | None = None,
                batch_size: int | None = None, opset: int = DEFAULT_OPSET, images: torch.Tensor | None = None,
                check: bool = True, atol: float = 1e-4,
                predict: Callable[[nn.Module, torch.Tensor], Any] | None = None, int8: str | None = None,
                calibration: torch.Tensor | None = None, min_cosine: float = 0.99,
                int8_recipe: str = DEFAULT_INT8_RECIPE) -> OnnxExport:
    """Export ``model`` (as patched now; an STViT build; or plain) to the ONNX file ``path`` and check it.

    Args:
        model: a module taking one ``B x C x H x W`` float tensor (a ``torch.compile`` wrapper is looked
            through); exported in eval mode, its modes restored afterwards.
        path: the ``.onnx`` file to write (its folder is created).
        img_size: the fixed input size, an int or (height, width); default the model's own.
        batch_size: None (default) for a dynamic batch axis, or a fixed batch size.
        opset: the ONNX opset (default 18).
        images: the check batch (e.g. real photos, preprocessed); default random images.
        check: run the written graph in ONNX Runtime (CPU) on ``images`` (and, with a dynamic batch, on the
            first image alone) and compare every output with PyTorch's; a difference above ``atol`` raises a
            ``RuntimeError`` and writes nothing.
        predict: export ``predict(model, images)`` instead of ``model(images)``, e.g.
            ``tokenreduce.adapters.predictor(model)``: one tensor (logits or embedding) of a Hugging Face model
            instead of every field of its output.
        int8: None (float32), ``"dynamic"`` (int8 weights, activations quantized at run time) or ``"static"``
            (activations calibrated on ``calibration``): the matrix products of the checked float graph
            quantized by ONNX Runtime; the int8 graph is written only when its outputs' mean cosine against
            PyTorch's float outputs on the check images is at least ``min_cosine``.
        calibration: ``"static"``: the calibration batch (e.g. 32-256 real photos, preprocessed); default the
            check images. The ``"smooth"`` recipe takes its input ranges from it too.
        min_cosine: int8: the least mean cosine of the int8 graph's outputs against float PyTorch.
        int8_recipe: which matrix products are quantized and how (``INT8_RECIPES``): ``"smooth"`` (default)
            folds SmoothQuant's scales (alpha 0.7, from the calibration images) into the LayerNorms and values
            before the export (an exact rewrite in float), then quantizes only the linear layers, one weight
            scale per output channel, keeping those fed by an activation (an MLP's second layer) in float;
            ``"per-channel"``: every linear layer, one scale per output channel, no rewrite; ``"per-tensor"``:
            every matrix product (attention's too), one scale per weight: the fastest, and on the benchmark
            classifier 6 top-1 points below float32 where ``"smooth"`` stays within 0.5 (docs/export.md).

    Returns:
        An :class:`OnnxExport` (path, sizes, opset, input and output names, largest difference found).

    Raises:
        MissingExtraError: onnx, onnxscript (or, to check, onnxruntime) missing: ``pip install
            "tokenreduce[export]"``.
        InputError: a bad size, batch size or check batch; a model that does not run at ``img_size``.
    """
    _require_extra(check or int8 is not None)
    if int8 is not None and int8 not in INT8_MODES:
        raise InputError(f"unknown int8 mode {int8!r}; valid: {', '.join(INT8_MODES)} (or None for float32)")
    if not (isinstance(min_cosine, int | float) and -1 <= min_cosine <= 1):
        raise InputError(f"min_cosine must be a number in [-1, 1], got {min_cosine!r}")
    if int8_recipe not in INT8_RECIPES:
        raise InputError(f"unknown int8_recipe {int8_recipe!r}; valid: {', '.join(INT8_RECIPES)}")
    if int8 is not None and not check:
        raise InputError("an int8 export is always checked against the float model; drop check=False")
    if type(model).__name__ == "OptimizedModule":  # torch.compile's wrapper: export the model inside
        model = model._orig_mod
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    size = default_img_size(model) if img_size is None else size_pair(img_size)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be None (dynamic) or a positive integer, got {batch_size!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 17:
        raise InputError(f"opset must be an integer >= 17, got {opset!r}")
    refuse_unexportable(model)
    in_chans = input_channels(model)
    check_images = prepare_check_images(images, size, batch_size, in_chans)
    linear_only, per_channel, float_after_activation, alpha = INT8_RECIPES[int8_recipe]
    if int8 == "static" or (int8 is not None and (alpha is not None or float_after_activation)):
        calibration = check_images if calibration is None \
            else prepare_check_images(calibration, size, batch_size, in_chans)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # Example batch: the fixed size, or 2 for a dynamic axis (torch.export specialises a size-1 axis).
    example = torch.zeros(batch_size or 2, in_chans, *size, device=device)
    net = model if predict is None or predict is call else Predicting(model, predict)

    with eval_mode(net):
        exported, float_layers = net, ()
        if int8 is not None and float_after_activation:
            float_layers = tuple(sorted(after_activation_linears(net, calibration[:2].to(device))))
        if int8 is not None and alpha is not None:  # the float graph is exported from the rewritten copy
            exported = smooth_quant(net, calibration.to(device), alpha, values=not reads_value_norms(model))
        try:
            with torch.inference_mode():
                reference = _flat(net(example))
        except (AssertionError, RuntimeError, ValueError) as err:  # timm asserts the input size
            raise InputError(f"the model does not run at img_size {size}: {err}") from err
        output_names = ("output",) if len(reference) == 1 else tuple(f"output_{i}" for i in range(len(reference)))
        dynamic = None if batch_size is not None else ({0: torch.export.Dim("batch", min=1)},)
        big = sum(p.numel() * p.element_size() for p in model.parameters()) > SINGLE_FILE_BYTES
        # Written in a new folder beside ``path`` and moved into place once checked: a failed export or check
        # leaves no file and an earlier file at ``path`` untouched.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tokenreduce-export-") as folder:
            # int8: the float graph goes to a subfolder (checked first), its quantized copy to the staged path.
            staged = Path(folder) / path.name if int8 is None else Path(folder) / "float" / path.name
            staged.parent.mkdir(exist_ok=True)
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")  # the exporter's progress lines and warnings
                    torch.onnx.export(exported, (example,), str(staged), dynamo=True, opset_version=opset,
                                      input_names=[INPUT_NAME], output_names=list(output_names),
                                      dynamic_shapes=dynamic, custom_translation_table=_translations(),
                                      external_data=big, verbose=False)
            except Exception as err:
                if dynamic is not None and "Constraints violated" in str(err):
                    raise InputError(f"{type(model).__name__} cannot be exported with a dynamic batch axis (its "
                                     f"forward pass depends on the batch size); pass batch_size=N: {err}") from err
                raise
            diff, batches = None, ()
            if check:
                batches = (check_images.shape[0],) if batch_size is not None or check_images.shape[0] == 1 \
                    else (check_images.shape[0], 1)
                diff = _compare(exported, staged, check_images, batches, device)
                if diff > atol:
                    raise RuntimeError(f"the exported graph differs from PyTorch by {diff:.3g} (> atol {atol:g}) "
                                       f"on the check images; nothing written")
            cosine = agreement = None
            if int8 is not None:
                quantized = Path(folder) / path.name
                quantize_onnx(staged, quantized, int8, calibration, big, int8_recipe, float_layers)
                expected = float_outputs(net, check_images, device)
                got = onnx_session(quantized).run(None, {INPUT_NAME: check_images.numpy()})
                cosine, agreement = output_agreement(expected, got)
                if cosine < min_cosine:
                    raise RuntimeError(f"the int8 graph's outputs have mean cosine {cosine:.4f} against the float "
                                       f"model (< min_cosine {min_cosine:g}; top-1 agreement {agreement:.3f}) on "
                                       f"the check images; nothing written")
            for staged_file in Path(folder).iterdir():  # the graph, and its weights file for a large model
                if staged_file.is_file():
                    os.replace(staged_file, path.parent / staged_file.name)
    return OnnxExport(str(path), size, batch_size, opset, INPUT_NAME, output_names, diff, batches, int8, cosine,
                      agreement, int8_recipe if int8 is not None else None)


def quantize_onnx(source: Path, target: Path, mode: str, calibration: torch.Tensor | None = None,
                  external_data: bool = False, recipe: str = "per-tensor", float_layers: tuple[str, ...] = ()
                  ) -> None:
    """ONNX Runtime's int8 quantization of ``source``'s matrix products into ``target``: ``"dynamic"``
    (``quantize_dynamic``) or ``"static"`` (``quantize_static``, QDQ format, activations calibrated on the
    ``calibration`` batch, min-max, in batches of at most 16 images). ``recipe`` (``INT8_RECIPES``) says which
    products and how; ``float_layers``: module names (as in ``named_modules``) whose products stay float.
    SmoothQuant's rewrite, if the recipe has one, is already in ``source``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    linear_only, per_channel = INT8_RECIPES[recipe][:2]
    nodes = linear_nodes(source, float_layers) if linear_only or float_layers else None
    common = dict(op_types_to_quantize=list(INT8_OPS), weight_type=QuantType.QInt8, per_channel=per_channel,
                  nodes_to_quantize=nodes, use_external_data_format=external_data)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # "please consider to run pre-processing before quantization"
        if mode == "dynamic":
            quantize_dynamic(str(source), str(target), **common)
            return
        batches = [{INPUT_NAME: chunk.numpy()} for chunk in calibration.split(16)]

        class Batches(CalibrationDataReader):
            def get_next(self) -> dict[str, Any] | None:
                return batches.pop(0) if batches else None

        quantize_static(str(source), str(target), Batches(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, **common)


def linear_nodes(path: Path, float_layers: tuple[str, ...] = ()) -> list[str]:
    """Names of the ``MatMul``/``Gemm`` nodes of the ONNX graph at ``path`` that are linear layers (a weight
    initializer as second input, not attention's products of two activations), except those the exporter
    recorded as inside a module named in ``float_layers``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    kept_float = set(float_layers)
    chosen = []
    for node in graph.node:
        if node.op_type not in INT8_OPS or len(node.input) < 2 or node.input[1] not in weights:
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if not kept_float.intersection(ast.literal_eval(scopes) if scopes.startswith("[") else ()):
            chosen.append(node.name)
    return chosen


def output_agreement(expected: list[Any], got: list[Any]) -> tuple[float, float]:
    """(mean cosine over every output row, share of images whose first output's top-1 agrees): how close a
    quantized graph's outputs (``got``, numpy arrays) stay to the float model's (``expected``)."""
    import numpy as np

    cosines = []
    for e, g in zip(expected, got, strict=True):
        if e.shape != g.shape:
            raise RuntimeError(f"the int8 graph gives shape {g.shape} where PyTorch gives {e.shape}")
        e2, g2 = e.reshape(e.shape[0], -1).astype(np.float64), g.reshape(g.shape[0], -1).astype(np.float64)
        norms = np.linalg.norm(e2, axis=1) * np.linalg.norm(g2, axis=1)
        cosines.append(np.where(norms > 0, (e2 * g2).sum(axis=1) / np.maximum(norms, 1e-30), 1.0))
    first_e, first_g = expected[0].reshape(expected[0].shape[0], -1), got[0].reshape(got[0].shape[0], -1)
    agreement = float((first_e.argmax(axis=1) == first_g.argmax(axis=1)).mean()) if first_e.size else 1.0
    return float(np.concatenate(cosines).mean()), agreement


def float_outputs(model: nn.Module, images: torch.Tensor, device: torch.device) -> list[Any]:
    with torch.inference_mode():
        return [t.float().cpu().numpy() for t in _flat(model(images.to(device)))]


class Predicting(nn.Module):
    """What is exported when ``export_onnx`` is given a ``predict`` function: ``predict(model, images)``."""

    def __init__(self, model: nn.Module, predict: Callable[[nn.Module, torch.Tensor], Any]) -> None:
        super().__init__()
        self.model = model
        self.predict = predict

    def forward(self, images: torch.Tensor) -> Any:
        return self.predict(self.model, images)


def reads_value_norms(model: nn.Module) -> bool:
    """Whether the method patched into ``model`` ranks tokens by the values' norms at some block (PPT): then
    SmoothQuant must not rescale the values."""
    method = method_of(model)
    if method is None:
        return False
    every_block_reduces = Plan(amounts=(1,) * MAX_BLOCKS, tokens_in=(2,) * MAX_BLOCKS, tokens_out=(1,) * MAX_BLOCKS)
    return any("value_norm" in method.needs(block, every_block_reduces) for block in range(MAX_BLOCKS))


def refuse_unexportable(model: nn.Module) -> None:
    method = method_of(model)
    if method is not None and method.name == "gtp" and method.options.get("selection") == "random":
        raise InputError("gtp with selection='random' cannot be exported: its scores come from a torch.Generator, "
                         "which an ONNX graph cannot reproduce; export another selection")


def input_channels(model: nn.Module) -> int:
    for module in model.modules():
        proj = getattr(getattr(module, "patch_embed", None), "proj", None)
        if isinstance(proj, nn.Conv2d):
            return proj.in_channels
    return 3


def _compare(model: nn.Module, path: Path, images: torch.Tensor, batches: tuple[int, ...],
             device: torch.device) -> float:
    session = onnx_session(path)
    worst = 0.0
    for count in batches:
        batch = images[:count]
        expected = float_outputs(model, batch, device)
        got = session.run(None, {INPUT_NAME: batch.numpy()})
        for e, g in zip(expected, got, strict=True):
            if e.shape != g.shape:
                raise RuntimeError(f"the exported graph gives shape {g.shape} where PyTorch gives {e.shape}")
            worst = max(worst, float(abs(e - g).max()) if e.size else 0.0)
    return worst
