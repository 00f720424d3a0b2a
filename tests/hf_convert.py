"""Key-mapping converters from timm ``VisionTransformer`` models to Hugging Face ``transformers`` models (the
same weights, so the two adapters of tokenreduce can be compared), used by ``test_hf.py`` and
``benchmarks/hf_agreement.py``. Configs are built in code: no hub."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    ViTConfig,
    ViTModel,
)


def _common(model, **extra) -> dict:
    blk = model.blocks[0]
    return dict(hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks),
                num_attention_heads=blk.attn.num_heads,
                intermediate_size=blk.mlp.fc1.out_features, image_size=model.patch_embed.img_size[0],
                patch_size=model.patch_embed.patch_size[0], num_channels=model.patch_embed.proj.in_channels,
                hidden_act="gelu", **extra)


def _blocks(sd: dict, prefix: str, depth: int, names: dict[str, str], attn: str, out: str) -> dict:
    """Per-block keys: the fused qkv split into q/k/v, the rest renamed by ``names`` (timm -> HF suffix)."""
    new = {}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"{prefix}{i}."
        for part, (w, b) in zip("qkv", zip(sd[src + "attn.qkv.weight"].chunk(3), sd[src + "attn.qkv.bias"].chunk(3),
                                           strict=True), strict=True):
            new[f"{dst}{attn}.{part}_proj.weight"], new[f"{dst}{attn}.{part}_proj.bias"] = w, b
        for kind in ("weight", "bias"):
            new[f"{dst}{attn}.{out}.{kind}"] = sd[f"{src}attn.proj.{kind}"]
        for timm_name, hf_name in names.items():
            for key in [k for k in sd if k == src + timm_name or k.startswith(src + timm_name + ".")]:
                new[dst + hf_name + key[len(src + timm_name):]] = sd[key]
    return new


def _load(hf, new: dict, allow_missing: tuple[str, ...] = ()) -> None:
    missing, unexpected = hf.load_state_dict(new, strict=False)
    missing = [k for k in missing if not k.endswith(allow_missing)]
    assert not missing and not unexpected, (missing, unexpected)


VIT_NAMES = {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def timm_to_hf_vit(model, attn_implementation: str = "eager") -> torch.nn.Module:
    """A timm DeiT/ViT (CLS token, optionally a distillation token) as ``ViTModel`` (1 prefix token) or
    ``DeiTModel`` (CLS + distillation token)."""
    sd = model.state_dict()
    distilled = model.num_prefix_tokens == 2
    cls, cfg = (DeiTModel, DeiTConfig) if distilled else (ViTModel, ViTConfig)
    config = cfg(**_common(model, layer_norm_eps=model.norm.eps, qkv_bias=True))
    config._attn_implementation = attn_implementation
    hf = cls(config, add_pooling_layer=False).eval()
    new = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    if distilled:
        new["embeddings.distillation_token"] = sd["dist_token"]
    new.update(_blocks(sd, "layers.", len(model.blocks), VIT_NAMES, "attention", "o_proj"))
    _load(hf, new)
    return hf


DINO_NAMES = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
              "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}


def timm_to_hf_dinov2(model, attn_implementation: str = "eager", classifier: bool = False) -> torch.nn.Module:
    """A timm DINOv2 (``vit_small_patch14_dinov2``: LayerScale, CLS token) as ``Dinov2Model``, or with
    ``classifier`` as ``Dinov2ForImageClassification``. HF's classifier reads ``[CLS, mean of patch tokens]``
    while timm's head reads the CLS only: the patch-mean half of its weight is set to zero, so both compute
    the same logits."""
    sd = model.state_dict()
    extra = dict(layer_norm_eps=model.norm.eps, qkv_bias=True, mlp_ratio=model.blocks[0].mlp.fc1.out_features
                 // model.embed_dim, layerscale_value=1.0, use_swiglu_ffn=False)
    if classifier:
        extra["num_labels"] = model.num_classes
    common = _common(model, **extra)
    common.pop("intermediate_size")
    config = Dinov2Config(**common)
    config._attn_implementation = attn_implementation
    hf = (Dinov2ForImageClassification if classifier else Dinov2Model)(config).eval()
    prefix = "dinov2." if classifier else ""
    new = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    new.update(_blocks(sd, "encoder.layer.", len(model.blocks), DINO_NAMES, "attention", "o_proj"))
    new = {prefix + k: v for k, v in new.items()}
    if classifier:
        weight = sd["head.weight"]
        new["classifier.weight"] = torch.cat([weight, torch.zeros_like(weight)], dim=1)
        new["classifier.bias"] = sd["head.bias"]
    _load(hf, new, allow_missing=("mask_token",))
    return hf


CLIP_NAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def timm_to_hf_clip(model, attn_implementation: str = "eager") -> torch.nn.Module:
    """A timm CLIP image tower (``vit_base_patch16_clip_224``: pre-norm, no patch bias) as ``CLIPVisionModel``
    (its ``pooler_output`` is timm's final norm of the CLS token)."""
    sd = model.state_dict()
    config = CLIPVisionConfig(**_common(model, layer_norm_eps=model.norm.eps))
    config._attn_implementation = attn_implementation
    hf = CLIPVisionModel(config).eval()
    new = {"embeddings.class_embedding": sd["cls_token"].flatten(),
           "embeddings.position_embedding.weight": sd["pos_embed"][0],
           "embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
           "pre_layrnorm.weight": sd["norm_pre.weight"], "pre_layrnorm.bias": sd["norm_pre.bias"],
           "post_layernorm.weight": sd["norm.weight"], "post_layernorm.bias": sd["norm.bias"]}
    new.update(_blocks(sd, "encoder.layers.", len(model.blocks), CLIP_NAMES, "self_attn", "out_proj"))
    _load(hf, new)
    return hf
