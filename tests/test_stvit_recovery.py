"""STViT-R: recovery layer, dumbbell units for plain ViTs and Swin, full grids back, FLOPs, training."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce as tr
import tokenreduce.stvit
from tokenreduce.adapters.timm_vit import embed
from tokenreduce.stvit.recovery import RecoveryLayer, STViTR, STViTRSwin


def tiny_vit(depth: int = 6, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=depth, embed_dim=48, num_heads=3,
                             img_size=64, num_classes=5, **kwargs).eval()


def tiny_swin(img_size: int = 112) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, depths=(1, 1, 4, 1),
                             num_heads=(1, 1, 2, 2), num_classes=5, img_size=img_size).eval()


def _no_fused(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}])
def test_vit_recovery_returns_the_original_grid(extra):
    model = tiny_vit(**extra)
    stvit = tr.stvit.build(model, recover=True, num_semantic=4, unit_depth=4)
    assert isinstance(stvit, STViTR) and len(stvit.units) == 1 and len(stvit.vit.blocks) == 2
    images = torch.randn(2, 3, 64, 64)
    assert stvit.forward_features(images).shape == model.forward_features(images).shape  # prefix + 16 patches
    assert stvit(images).shape == (2, 5)
    # LayerScale 1e-5: a fresh unit hands back (almost) the tokens of its full block, i.e. host blocks 0-2
    reference = model.norm(model.blocks[:3](embed(model, images).x))
    prefix = model.num_prefix_tokens
    torch.testing.assert_close(stvit.forward_features(images)[:, prefix:], reference[:, prefix:], atol=2e-3, rtol=0)


def test_recovery_layer_formula_and_layer_scale():
    block = tiny_vit().blocks[0]
    layer = RecoveryLayer(block)
    for scale in (layer.ls1, layer.ls2):
        assert torch.equal(scale.gamma, torch.full((48,), 1e-5))
    with torch.no_grad():
        layer.ls1.gamma.fill_(1.0)
        layer.ls2.gamma.fill_(1.0)
    x, s = torch.randn(2, 16, 48), torch.randn(2, 4, 48)
    # by hand: q from the q third of the pre-trained qkv, k/v from the rest; softmax over the semantic tokens
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    q = (block.norm1(x) @ w[:48].T + b[:48]).view(2, 16, 3, 16).transpose(1, 2)
    k = (block.norm1(s) @ w[48:96].T + b[48:96]).view(2, 4, 3, 16).transpose(1, 2)
    v = (block.norm1(s) @ w[96:].T + b[96:]).view(2, 4, 3, 16).transpose(1, 2)
    attended = ((q @ k.transpose(-1, -2)) / 4).softmax(-1) @ v
    y = x + block.attn.proj(attended.transpose(1, 2).reshape(2, 16, 48))
    y = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(layer(x, s), y)


def test_swin_recovery_returns_the_original_grid_and_gradients_flow():
    model = tiny_swin()
    stvit = tr.stvit.build(model, recover=True, unit_depth=4).train()
    assert isinstance(stvit, STViTRSwin) and len(stvit.units) == 1
    images = torch.randn(2, 3, 112, 112)
    features = stvit.forward_features(images)
    assert features.shape == model.forward_features(images).shape == (2, 4, 4, 192)
    stvit.forward_head(features).logsumexp(dim=1).sum().backward()
    named = dict(stvit.named_parameters())
    for name in ("units.0.recovery.ls1.gamma", "units.0.recovery.attn.q.weight", "units.0.semantic.global_centres",
                 "units.0.semantic.generation.0.attn.kv.weight", "units.0.semantic.semantic_blocks.0.qkv.weight",
                 "units.0.full.attn.relative_position_bias_table", "swin.layers.0.blocks.0.mlp.fc1.weight",
                 "swin.layers.3.blocks.0.attn.qkv.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name


def test_swin_s_recovery_flops_match_the_paper():
    with torch.device("meta"):
        model = timm.create_model("swin_small_patch4_window7_224", pretrained=False)
    stvit = tr.stvit.build(model, recover=True, tokens_per_window=9)
    assert len(stvit.units) == 3 and len(stvit.swin.layers[2].blocks) == 0
    report = tr.flops(stvit)
    assert report.baseline_gmacs == pytest.approx(8.741, abs=1e-3)
    assert report.gmacs == pytest.approx(5.826, abs=1e-3)  # paper: 5.8 vs 8.8, -33%
    assert 1 - report.gmacs / report.baseline_gmacs == pytest.approx(0.333, abs=1e-3)
    unit = [(b.tokens_in, b.tokens_out) for b in report.blocks[4:11]]
    assert unit == [(196, 196), (400, 36), (232, 36), (36, 36), (36, 36), (36, 36), (232, 196)]
    assert report.blocks[-1].tokens_out == 49  # stage 4 on the recovered 7 x 7 grid


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_flops_match_flop_counter(kind):
    model = tiny_vit(reg_tokens=1) if kind == "vit" else tiny_swin()
    # vit: two units of 3 blocks take every block (no semantic blocks); swin: one unit of 4
    options = {"num_semantic": 4, "units": 2, "unit_depth": 3} if kind == "vit" else {"unit_depth": 4}
    stvit = tr.stvit.build(model, recover=True, **options).eval()
    assert len(stvit.units) == (2 if kind == "vit" else 1)
    _no_fused(stvit)
    size = 64 if kind == "vit" else 112
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        stvit(torch.randn(1, 3, size, size))
    assert tr.flops(stvit).total_gmacs == pytest.approx(counter.get_total_flops() / 2e9, rel=1e-3)


def test_short_dense_training_lowers_the_loss():
    model = tiny_vit()
    stvit = tr.stvit.build(model, recover=True, num_semantic=4, unit_depth=4).train()
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    target = torch.randn(4, 17, 48)
    optimizer = torch.optim.SGD(stvit.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        loss = nn.functional.mse_loss(stvit.forward_features(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_bad_options_raise_and_leave_the_model_unchanged():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="units=2 of 4 blocks do not fit in the 6 blocks"):
        tr.stvit.build(model, recover=True, units=2, unit_depth=4)
    with pytest.raises(ValueError, match="unit_depth=2"):
        tr.stvit.build(model, recover=True, unit_depth=2)
    with pytest.raises(ValueError, match="num_semantic=5"):
        tr.stvit.build(model, recover=True, num_semantic=5)
    with pytest.raises(TypeError, match="tokens_per_window is a Swin option"):
        tr.stvit.build(model, recover=True, tokens_per_window=9)
    with pytest.raises(ValueError, match="units=3 of 6 blocks do not fit in the 4 blocks of Swin stage 3"):
        tr.stvit.build(tiny_swin(), recover=True, units=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
