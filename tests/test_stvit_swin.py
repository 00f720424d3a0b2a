"""STViT for Swin: token counts per stage, weights, padding, gradients, FLOPs, errors, a short fine-tune."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce as tr
import tokenreduce.stvit
from tokenreduce.stvit import pooling
from tokenreduce.stvit.swin import STViTSwin, fit_block, key_windows, window_regions

SIZES = {"swin_tiny_patch4_window7_224": (6, 4), "swin_small_patch4_window7_224": (18, 12),
         "swin_base_patch4_window7_224": (18, 12)}  # stage-3 depth, default full blocks


def tiny_swin(img_size: int = 224, depths: tuple = (1, 1, 4, 1), **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, depths=depths,
                             num_heads=(1, 1, 2, 2), num_classes=5, img_size=img_size, **kwargs).eval()


def _no_fused(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False


@pytest.fixture(scope="module")
def meta_swins() -> dict[str, nn.Module]:
    with torch.device("meta"):
        return {name: timm.create_model(name, pretrained=False) for name in SIZES}


@pytest.mark.parametrize(("name", "tokens_per_window"), [(name, 9) for name in SIZES]
                         + [("swin_tiny_patch4_window7_224", 16)])
def test_token_counts_per_stage_every_size(meta_swins, name, tokens_per_window):
    model = meta_swins[name]
    stvit = tr.stvit.build(model, tokens_per_window=tokens_per_window)
    depth, full = SIZES[name]
    side = {9: 3, 16: 4}[tokens_per_window]
    assert isinstance(stvit, STViTSwin)
    assert len(stvit.swin.layers[2].blocks) == full
    assert len(stvit.semantic.semantic_blocks) == depth - full - 2
    assert [b.group for b in stvit.semantic.semantic_blocks] == [tokens_per_window, None] * ((depth - full - 2) // 2)
    assert stvit.semantic_grid == (2 * side, 2 * side)
    dims = {"swin_base_patch4_window7_224": 1024}.get(name, 768)
    features = stvit.forward_features(torch.empty(2, 3, 224, 224, device="meta"))
    assert features.shape == (2, side, side, dims)  # stage 4: the (2k x 2k) semantic grid, merged 2 x 2
    assert stvit(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)
    report = tr.flops(stvit)
    tokens = [(b.tokens_in, b.tokens_out) for b in report.blocks]
    s = 4 * tokens_per_window
    assert tokens[:4] == [(3136, 3136)] * 2 + [(784, 784)] * 2
    assert tokens[4:4 + full] == [(196, 196)] * full
    assert tokens[4 + full:6 + full] == [(400, s), (s + 196, s)]  # 4 enlarged 10x10 key windows; [S ; X]
    assert tokens[6 + full:-2] == [(s, s)] * (depth - full - 2)
    assert tokens[-2:] == [(side * side, side * side)] * 2
    assert len(model.layers[2].blocks) == depth  # the host is untouched


@pytest.mark.parametrize(("name", "reduced", "saving"), [
    ("swin_tiny_patch4_window7_224", 3.463, 0.229),
    ("swin_small_patch4_window7_224", 6.554, 0.250),
    ("swin_base_patch4_window7_224", 11.561, 0.251),
])
def test_published_flops_ratios(meta_swins, name, reduced, saving):
    report = tr.flops(tr.stvit.build(meta_swins[name], tokens_per_window=9))
    assert report.baseline_gmacs == pytest.approx({"swin_tiny_patch4_window7_224": 4.491,
                                                   "swin_small_patch4_window7_224": 8.741,
                                                   "swin_base_patch4_window7_224": 15.431}[name], abs=1e-3)
    assert report.gmacs == pytest.approx(reduced, abs=1e-3)
    assert 1 - report.gmacs / report.baseline_gmacs == pytest.approx(saving, abs=1e-3)  # paper: 24 / 25 / 25 %


@pytest.mark.parametrize("img_size", [224, 192])  # 192: stage-3 grid 12 x 12, partial windows
def test_flops_match_flop_counter(img_size):
    model = tiny_swin(img_size)
    stvit = tr.stvit.build(model, tokens_per_window=9, full_blocks=1).eval()
    _no_fused(model)
    _no_fused(stvit)
    images = torch.randn(1, 3, img_size, img_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    report = tr.flops(stvit)
    assert report.baseline_gmacs == pytest.approx(counter.get_total_flops() / 2e9, rel=1e-9)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        stvit(images)
    assert report.total_gmacs == pytest.approx(counter.get_total_flops() / 2e9, rel=1e-3)


def test_weights_come_from_the_pretrained_stage():
    model = tiny_swin()
    stvit = tr.stvit.build(model, tokens_per_window=9, full_blocks=1)
    blocks = model.layers[2].blocks
    gen1 = stvit.semantic.generation[0]
    assert torch.equal(gen1.attn.q.weight, blocks[1].attn.qkv.weight[:96])
    assert torch.equal(gen1.attn.kv.weight, blocks[1].attn.qkv.weight[96:])
    assert torch.equal(gen1.mlp.fc2.weight, blocks[1].mlp.fc2.weight)
    assert torch.equal(stvit.semantic.generation[1].norm1.weight, blocks[2].norm1.weight)
    assert torch.equal(stvit.semantic.semantic_blocks[0].qkv.weight, blocks[3].attn.qkv.weight)
    assert torch.equal(stvit.swin.layers[3].blocks[0].mlp.fc1.weight, model.layers[3].blocks[0].mlp.fc1.weight)
    images = torch.randn(2, 3, 224, 224)
    # the unchanged part (stages 1-2, the full block of stage 3) gives the host's tokens exactly
    host = model.layers[2](model.layers[:2](model.patch_embed(images)))
    ours = stvit.swin.layers[2].blocks(stvit.swin.layers[2].downsample(stvit.swin.layers[:2](
        stvit.swin.patch_embed(images))))
    torch.testing.assert_close(ours, model.layers[2].blocks[0](model.layers[2].downsample(
        model.layers[:2](model.patch_embed(images)))))
    assert host.shape == (2, 14, 14, 96)


def test_stage4_window_reads_the_pretrained_bias_table():
    model = tiny_swin()
    block = model.layers[3].blocks[0]
    table = block.attn.relative_position_bias_table.detach().clone()
    fit_block(block, (3, 3))
    assert block.window_size == (3, 3) and block.shift_size == (0, 0) and block.attn_mask is None
    bias = block.attn._get_rel_pos_bias()
    assert bias.shape == (1, 2, 9, 9)
    # offset (0, 0) is the table's centre row (6, 6) of 13 x 13; token 0 -> token 8 is offset (-2, -2)
    torch.testing.assert_close(bias[0, :, 4, 4], table[6 * 13 + 6])
    torch.testing.assert_close(bias[0, :, 0, 8], table[4 * 13 + 4])
    assert torch.equal(block.attn.relative_position_bias_table, table)


def test_key_windows_and_partial_window_regions_by_hand():
    keys = key_windows((14, 14), (7, 7), 10)
    assert keys.shape == (4, 100)
    assert keys[0].view(10, 10)[0, 0] == 0 and keys[0].view(10, 10)[-1, -1] == 9 * 14 + 9
    assert keys[3].view(10, 10)[0, 0] == 4 * 14 + 4 and keys[3].view(10, 10)[-1, -1] == 13 * 14 + 13
    keys = key_windows((12, 12), (7, 7), 10)  # the second window row (rows 7-11) takes key rows 2-11
    assert keys[3].view(10, 10)[0, 0] == 2 * 12 + 2
    index, valid = window_regions((12, 12), (7, 7), 3)
    assert index.shape[0] == 36
    assert set(index[valid].tolist()) == set(range(144))  # every real token pooled, padding never
    # regions follow torch's adaptive pooling (they overlap when uneven) and stay inside their window
    rows_of = index // 12
    assert (rows_of[:18][valid[:18]] < 7).all() and (rows_of[18:][valid[18:]] >= 7).all()
    # window 3 (rows 7-11, cols 7-11) splits 5 x 5 into rows/cols {7,8} {8,9} {10,11}: region 0 = 2 x 2 tokens
    assert sorted(index[27][valid[27]].tolist()) == [7 * 12 + 7, 7 * 12 + 8, 8 * 12 + 7, 8 * 12 + 8]


def test_non_divisible_grid_is_padded_and_masked():
    model = tiny_swin(192)  # stage 3: 12 x 12 with 7 x 7 windows -> 2 x 2 windows, three of them partial
    stvit = tr.stvit.build(model, tokens_per_window=9, full_blocks=1, pooling="avg").eval()
    tokens = torch.randn(2, 144, 96)
    pooled = stvit.semantic.pool(tokens, (12, 12))
    assert pooled.shape == (2, 36, 96)
    grid = tokens.view(2, 12, 12, 96)
    torch.testing.assert_close(pooled[:, 27], grid[:, 7:9, 7:9].mean(dim=(1, 2)))  # only real tokens averaged
    torch.testing.assert_close(pooled[:, 35], grid[:, 10:12, 10:12].mean(dim=(1, 2)))
    images = torch.randn(2, 3, 192, 192)
    assert stvit.forward_features(images).shape == (2, 3, 3, 192)
    assert torch.isfinite(stvit(images)).all()
    learned = tr.stvit.build(model, tokens_per_window=9, full_blocks=1).eval()
    assert torch.isfinite(learned(images)).all()


def test_gradients_reach_new_and_pretrained_parameters():
    stvit = tr.stvit.build(tiny_swin(), tokens_per_window=9, full_blocks=1).train()
    with torch.no_grad():  # the learned scorer starts at zero (= average pooling); open it so it gets gradient
        stvit.semantic.pool.scorer[-1].weight.normal_()
    stvit(torch.randn(2, 3, 224, 224)).logsumexp(dim=1).sum().backward()
    named = dict(stvit.named_parameters())
    for name in ("semantic.global_centres", "semantic.pool.scorer.0.weight", "semantic.generation.0.attn.q.weight",
                 "semantic.generation.1.attn.kv.weight", "semantic.semantic_blocks.0.qkv.weight",
                 "semantic.semantic_blocks.0.mlp.fc1.weight",
                 "swin.layers.2.blocks.0.attn.relative_position_bias_table", "swin.layers.0.blocks.0.attn.qkv.weight",
                 "swin.layers.3.blocks.0.attn.qkv.weight", "swin.head.fc.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name


@pytest.mark.parametrize("recover", [False, True])
def test_evaluated_under_inference_mode_then_trained(recover):
    """Pooling regions and key windows first built under inference_mode must not reach a training step."""
    pooling._INDEX_CACHE.clear()  # the tables are made by the inference-mode pass below
    options = {"recover": True, "unit_depth": 4} if recover else {"full_blocks": 1}
    stvit = tr.stvit.build(tiny_swin(112), tokens_per_window=4, **options)
    images = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        expected = stvit.eval()(images)
    stvit.train()(images).logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None for p in stvit.parameters() if p.requires_grad)
    torch.testing.assert_close(stvit.eval()(images).detach(), expected)


def test_compiled_matches_eager():
    """One graph (fullgraph=True: no host syncs), also when the index tables are not cached yet."""
    stvit = tr.stvit.build(tiny_swin(112, depths=(1, 1, 3, 1)), tokens_per_window=4, full_blocks=1).eval()
    images = torch.randn(2, 3, 112, 112)
    pooling._INDEX_CACHE.clear()
    with torch.no_grad():
        compiled = torch.compile(stvit, fullgraph=True)(images)
        torch.testing.assert_close(compiled, stvit(images), atol=1e-5, rtol=1e-5)


def test_short_training_lowers_the_loss():
    stvit = tr.stvit.build(tiny_swin(112), tokens_per_window=9, full_blocks=1).train()  # 7 x 7 stage 3
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 112, 112), torch.randint(0, 5, (4,))
    optimizer = torch.optim.SGD(stvit.parameters(), lr=0.02)
    losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(stvit(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_bad_options_raise_and_leave_the_model_unchanged(meta_swins):
    model = tiny_swin()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="tokens_per_window=8"):
        tr.stvit.build(model, tokens_per_window=8)
    with pytest.raises(ValueError, match="full_blocks=3"):
        tr.stvit.build(model, tokens_per_window=9, full_blocks=3)
    with pytest.raises(ValueError, match="cannot hold 8x8"):
        tr.stvit.build(model, tokens_per_window=64)
    with pytest.raises(ValueError, match="pooling='median'"):
        tr.stvit.build(model, pooling="median")
    with pytest.raises(ValueError, match="img_size=256"):
        tr.flops(tr.stvit.build(model), img_size=256)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=48, num_heads=3, img_size=64)
    with pytest.raises(TypeError, match="tokens_per_window is a Swin option"):
        tr.stvit.build(vit, tokens_per_window=9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(model.layers[2].blocks) == 4
