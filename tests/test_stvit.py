"""STViT for plain timm ViTs: shapes, initialisation, pooling, gradients, FLOPs, errors."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce as tr
from tokenreduce.adapters.timm_vit import embed
from tokenreduce.core.attention import attention
from tokenreduce.stvit import build, pooling
from tokenreduce.stvit.model import CrossAttention, GenerationLayer
from tokenreduce.stvit.pooling import TokenPooling, region_index


def tiny(depth: int = 6, img_size: int = 64, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=depth, embed_dim=48, num_heads=3,
                             img_size=img_size, num_classes=5, **kwargs).eval()


def _no_fused(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False


@pytest.mark.floor
@pytest.mark.parametrize(("depth", "img_size", "num_semantic", "full_blocks", "generation_layers", "extra"), [
    (6, 64, 4, 2, 2, {}),                                    # 4x4 grid, CLS
    (4, 80, 4, 1, 2, {}),                                    # 5x5 grid: uneven, padded + masked
    (5, 96, 9, 2, 3, {"reg_tokens": 2}),                     # CLS + 2 registers, 3 generation layers
    (3, 64, 16, 0, 1, {"class_token": False, "global_pool": "avg"}),  # no prefix, M = whole grid
    (2, 112, 4, 0, 2, {"class_token": False, "global_pool": "avg", "reg_tokens": 1}),  # no semantic blocks
])
def test_shapes_and_token_counts(depth, img_size, num_semantic, full_blocks, generation_layers, extra):
    model = tiny(depth, img_size, **extra)
    stvit = build(model, num_semantic=num_semantic, full_blocks=full_blocks, generation_layers=generation_layers)
    images = torch.randn(2, 3, img_size, img_size)
    tokens = stvit.forward_features(images)
    assert tokens.shape == (2, num_semantic, 48)
    assert stvit(images).shape == (2, 5)
    assert len(stvit.vit.blocks) == full_blocks
    assert len(stvit.generation) == generation_layers
    assert len(stvit.semantic_blocks) == depth - full_blocks - generation_layers
    assert torch.isfinite(stvit(images)).all()


@pytest.mark.floor
def test_build_leaves_model_unchanged_and_copies_weights():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stvit = build(model, num_semantic=4, full_blocks=2)
    assert len(model.blocks) == 6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # full and semantic blocks are copies of the pre-trained blocks 0-1 and 4-5, not shared
    assert torch.equal(stvit.vit.blocks[1].mlp.fc1.weight, model.blocks[1].mlp.fc1.weight)
    assert torch.equal(stvit.semantic_blocks[0].attn.qkv.weight, model.blocks[4].attn.qkv.weight)
    assert stvit.semantic_blocks[0].attn.qkv.weight.data_ptr() != model.blocks[4].attn.qkv.weight.data_ptr()
    assert torch.equal(stvit.vit.head.weight, model.head.weight)
    assert stvit.global_centres.shape == (1, 4, 48)
    assert 0 < stvit.global_centres.std() < 0.05  # trunc-normal, std 0.02


@pytest.mark.floor
def test_generation_layer_is_the_pretrained_block_when_queries_are_the_keys():
    """q from the q part of qkv and k/v from the k/v parts: self-attention through it is the block itself."""
    model = tiny(img_size=64, init_values=0.5)  # LayerScale on, so ls1/ls2 must be copied too
    block = model.blocks[3]
    with torch.no_grad():
        block.attn.qkv.bias.normal_()
    layer = GenerationLayer(block)
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        assert torch.allclose(layer(x, x), block(x), atol=1e-5)
        # cross-attention: 3 queries over the 17 tokens, by hand from the block's own weights
        queries = torch.randn(2, 3, 48)
        w_q, w_k, w_v = block.attn.qkv.weight.chunk(3)
        b_q, b_k, b_v = block.attn.qkv.bias.chunk(3)
        q_in, kv_in = block.norm1(queries), block.norm1(x)

        def heads(t):
            return t.reshape(2, -1, 3, 16).transpose(1, 2)

        q, k, v = heads(q_in @ w_q.T + b_q), heads(kv_in @ w_k.T + b_k), heads(kv_in @ w_v.T + b_v)
        attended = ((q @ k.transpose(-2, -1)) / 4.0).softmax(-1) @ v
        h = block.attn.proj(attended.transpose(1, 2).reshape(2, 3, 48))
        s = queries + block.ls1(h)
        expected = s + block.ls2(block.mlp(block.norm2(s)))
        assert torch.allclose(layer(queries, x), expected, atol=1e-5)


def test_one_attention_kernel_for_self_and_cross_attention():
    """The core kernel with a timm Attention (fused qkv) is the module itself; given a separate context it splits
    qkv into q and kv and equals STViT's CrossAttention (separate q and kv Linears) built from it."""
    attn = tiny(qk_norm=True).blocks[2].attn
    x, queries = torch.randn(2, 17, 48), torch.randn(2, 5, 48)
    with torch.no_grad():
        assert torch.equal(attention(attn, x)[0], attn(x))
        assert torch.equal(attention(attn, x, context=x)[0], attn(x))
        cross = CrossAttention(attn)
        torch.testing.assert_close(attention(attn, queries, context=x)[0], cross(queries, x), atol=1e-6, rtol=0)
        out, stats = attention(cross, queries, context=x, need=("cls_attn", "metric", "value_norm", "attn"))
        assert stats["attn"].shape == (2, 3, 5, 17) and stats["cls_attn"].shape == (2, 3, 17)
        assert stats["metric"].shape == (2, 17, 16) and stats["value_norm"].shape == (2, 17)
        torch.testing.assert_close(out, cross(queries, x), atol=1e-6, rtol=0)


@pytest.mark.floor
def test_forward_follows_the_paper_equations():
    model = tiny(depth=5, img_size=64)
    stvit = build(model, num_semantic=4, full_blocks=1, generation_layers=2)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = model.blocks[0](embed(model, images).x)  # embed equals timm exactly (test_dense)
        image_tokens = x[:, 1:]  # CLS dropped
        p = F.adaptive_avg_pool2d(image_tokens.transpose(1, 2).reshape(2, 48, 4, 4), 2).flatten(2).transpose(1, 2)
        s1 = stvit.generation[0](p, image_tokens)  # learned pooling starts as average pooling
        s2 = stvit.generation[1](s1, torch.cat([s1, image_tokens], 1), stvit.global_centres)
        tokens = model.blocks[4](model.blocks[3](s2))
        logits = model.head(model.norm(tokens.mean(1)))
        assert torch.allclose(stvit(images), logits, atol=1e-5)


def test_pooling_regions_match_adaptive_pooling_on_uneven_grids():
    x = torch.randn(2, 5 * 7, 6)
    image = x.transpose(1, 2).reshape(2, 6, 5, 7)
    for side in (2, 3, 5):
        avg = TokenPooling("avg", 6, side)(x, (5, 7))
        mx = TokenPooling("max", 6, side)(x, (5, 7))
        assert torch.allclose(avg, F.adaptive_avg_pool2d(image, side).flatten(2).transpose(1, 2), atol=1e-6)
        assert torch.equal(mx, F.adaptive_max_pool2d(image, side).flatten(2).transpose(1, 2))
    index, valid = region_index((5, 5), 2)  # rows/cols [0, 3) and [2, 5): 9 tokens each, no padding
    assert index.shape == (4, 9) and valid.all()
    index, valid = region_index((3, 5), 2)  # rows [0,2),[1,3); cols [0,3),[2,5): 6 tokens each
    assert index[0].tolist() == [0, 1, 2, 5, 6, 7]
    index, valid = region_index((5, 5), 3)  # spans [0,2),[1,4),[3,5): sizes 2, 3, 2 -> padded to 9
    assert valid.sum(1).tolist() == [4, 6, 4, 6, 9, 6, 4, 6, 4]


def test_learned_pooling_is_a_softmax_within_regions_that_ignores_padding():
    torch.manual_seed(0)
    pool = TokenPooling("learned", 6, 3)
    x = torch.randn(2, 25, 6)
    assert torch.allclose(pool(x, (5, 5)), TokenPooling("avg", 6, 3)(x, (5, 5)), atol=1e-6)  # zero-init scorer
    nn.init.normal_(pool.scorer[-1].weight)
    logits = pool.scorer(x.transpose(1, 2).reshape(2, 6, 5, 5)).flatten(1)
    index, valid = region_index((5, 5), 3)
    r = 0  # region 0 holds tokens 0, 1, 5, 6 (+ 5 padding slots)
    weight = logits[:, [0, 1, 5, 6]].softmax(-1)
    expected = (x[:, [0, 1, 5, 6]] * weight[..., None]).sum(1)
    assert torch.allclose(pool(x, (5, 5))[:, r], expected, atol=1e-6)
    assert index[r][valid[r]].tolist() == [0, 1, 5, 6]


@pytest.mark.floor
def test_gradients_reach_new_and_pretrained_parameters():
    stvit = build(tiny(img_size=80), num_semantic=4, full_blocks=2).train()
    stvit(torch.randn(2, 3, 80, 80)).logsumexp(-1).sum().backward()
    named = dict(stvit.named_parameters())
    for name in ("global_centres", "pool.scorer.3.weight", "generation.0.attn.q.weight", "generation.1.attn.kv.weight",
                 "semantic_blocks.0.mlp.fc1.weight", "vit.blocks.0.attn.qkv.weight", "vit.patch_embed.proj.weight",
                 "vit.pos_embed", "vit.head.weight", "vit.norm.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    assert named["vit.cls_token"].grad.abs().sum() > 0  # the CLS token shapes the full blocks' image tokens


def test_evaluated_under_inference_mode_then_trained():
    """Index tables first built under inference_mode must not reach a training step ("Inference tensors cannot
    be saved for backward")."""
    for recover in (False, True):
        pooling._INDEX_CACHE.clear()  # the tables are made by the inference-mode pass below
        options = {"unit_depth": 3} if recover else {"full_blocks": 1}
        stvit = build(tiny(4, img_size=80), num_semantic=4, recover=recover, **options)
        images = torch.randn(2, 3, 80, 80)
        with torch.inference_mode():
            expected = stvit.eval()(images)
        logits = stvit.train()(images)
        logits.logsumexp(-1).sum().backward()
        assert all(p.grad is not None for p in stvit.parameters() if p.requires_grad)
        torch.testing.assert_close(stvit.eval()(images).detach(), expected)


def test_index_cache_is_bounded():
    pooling._INDEX_CACHE.clear()
    pool = TokenPooling("avg", 6, 2)
    for side in range(2, 2 + 2 * pooling.MAX_CACHED_INDEX):
        pool(torch.randn(1, side * side, 6), (side, side))
        assert len(pooling._INDEX_CACHE) <= pooling.MAX_CACHED_INDEX


def test_compiled_stvit_matches_eager():
    """One graph (fullgraph=True: no host syncs), also when the index tables are not cached yet."""
    stvit = build(tiny(3, img_size=64), num_semantic=4, full_blocks=1).eval()
    images = torch.randn(2, 3, 64, 64)
    pooling._INDEX_CACHE.clear()
    with torch.no_grad():
        compiled = torch.compile(stvit, fullgraph=True)(images)
        torch.testing.assert_close(compiled, stvit(images), atol=1e-5, rtol=1e-5)


def test_flops_reproduce_the_paper_for_deit_small():
    deit_s = timm.create_model("deit_small_patch16_224", pretrained=False)
    for options, paper, exact in (({}, 1.91, 1.9153244), ({"generation_layers": 3}, 1.97, 1.9755356),
                                  ({"full_blocks": 3}, 1.56, 1.5654413)):
        report = tr.flops(build(deit_s, **options))
        assert report.gmacs == pytest.approx(exact, abs=1e-6)
        assert math.floor(report.gmacs * 100) / 100 == paper
        assert report.baseline_gmacs == pytest.approx(tr.flops(deit_s).gmacs)
        assert [b.tokens_out for b in report.blocks][:4 - ("full_blocks" in options)] == [197] * (
            4 - ("full_blocks" in options))
        assert report.blocks[-1].tokens_out == 16
    assert tr.flops(build(deit_s, pooling="avg")).overhead_gmacs == 0
    assert tr.flops(build(deit_s)).overhead_gmacs == pytest.approx(10 * 196 * 384 / 1e9)
    no_full = tr.flops(build(deit_s, full_blocks=0))  # no host block left in ``vit``: the cost still counts
    assert [b.tokens_in for b in no_full.blocks][:3] == [196, 212, 16]


@pytest.mark.parametrize(("model_name", "kwargs", "options"), [
    ("deit_small_patch16_224", {}, {}),
    ("deit_tiny_patch16_224", {"depth": 5, "img_size": 80, "reg_tokens": 1}, {"num_semantic": 4, "full_blocks": 1,
                                                                               "generation_layers": 3}),
])
def test_flops_match_flop_counter_mode(model_name, kwargs, options):
    vit = timm.create_model(model_name, pretrained=False, **kwargs)
    stvit = build(vit, **options).eval()
    _no_fused(stvit)
    size = vit.patch_embed.img_size
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        stvit(torch.randn(1, 3, *size))
    measured = counter.get_total_flops() / 2 / 1e9
    assert tr.flops(stvit).total_gmacs == pytest.approx(measured, rel=0.01)


def test_bad_input_gives_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="num_semantic=15"):
        build(model, num_semantic=15)
    with pytest.raises(ValueError, match="num_semantic=0"):
        build(model, num_semantic=0)
    with pytest.raises(ValueError, match="full_blocks=5 \\+ generation_layers=2 exceeds the model's depth 6"):
        build(model, full_blocks=5)
    with pytest.raises(ValueError, match="generation_layers=0"):
        build(model, generation_layers=0)
    with pytest.raises(ValueError, match="pooling='median'"):
        build(model, pooling="median")
    with pytest.raises(TypeError, match="not a timm VisionTransformer"):
        build(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="not a timm VisionTransformer"):
        build(timm.create_model("resnet10t", pretrained=False))
    stvit = build(model, num_semantic=25)  # 4x4 grid at 64: too small for 5x5 semantic tokens
    with pytest.raises(ValueError, match="4x4 token grid cannot be pooled into 5x5"):
        stvit(torch.randn(1, 3, 64, 64))
    assert len(model.blocks) == 6
