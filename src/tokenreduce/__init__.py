"""tokenreduce: token reduction for pre-trained Vision Transformers under one API.

>>> import timm, tokenreduce as tr
>>> model = timm.create_model("deit_small_patch16_224")
>>> tr.patch(model, "tome", r=13) is model
True
>>> round(tr.flops(model).gmacs, 2)
2.7
"""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from . import stvit
from .api import (
    describe,
    diagnostics,
    flops,
    method_of,
    methods,
    patch,
    patched,
    restore,
    schedule_for_flops,
    trace,
    unpatch,
)
from .core.cost import count_gmacs
from .core.errors import InputError, InputTypeError, MissingExtraError, TokenReduceError
from .core.state import TokenState
from .export import OnnxExport, export_onnx
from .export_openvino import OpenVinoExport, export_openvino
from .loading import Preprocessing, load
from .methods.base import Method, Plan, register

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "InputTypeError",
    "MissingExtraError",
    "OnnxExport",
    "OpenVinoExport",
    "TokenReduceError",
    "Method",
    "Plan",
    "Preprocessing",
    "TokenState",
    "count_gmacs",
    "describe",
    "diagnostics",
    "export_onnx",
    "export_openvino",
    "flops",
    "load",
    "method_of",
    "methods",
    "patch",
    "patched",
    "register",
    "restore",
    "schedule_for_flops",
    "stvit",
    "trace",
    "unpatch",
]
