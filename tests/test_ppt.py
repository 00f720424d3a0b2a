"""PPT (adaptive token pruning and pooling): policies, schedule, prefix safety, cost, errors, dtypes."""

from __future__ import annotations

import math
import os

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce as tr
from tokenreduce.adapters import timm_vit

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The pooled share per block comes from ``tr.diagnostics`` (no state written on the module during forward).

SMALL = {"depth": 4, "embed_dim": 96, "num_heads": 3, "img_size": 96}  # 36 patches, 37 tokens with CLS
LAYERS, R = (1, 3), 6


def small_model(name: str = "deit_small_patch16_224", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**SMALL, **overrides}).eval()


def images(batch: int, seed: int = 1, size: int = 96) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Different contrasts per image give the importance scores clearly different variances.
    scale = torch.linspace(0.2, 3.0, batch).view(-1, 1, 1, 1) if batch > 1 else 1.0
    return torch.randn(batch, 3, size, size, generator=generator) * scale


def reference_scores(block: torch.nn.Module, x: torch.Tensor, num_prefix: int,
                     size: torch.Tensor | None = None) -> torch.Tensor:
    """The ATS score computed independently from the block's full attention map (log-size bias if sizes)."""
    attn = block.attn
    batch, num_tokens, channels = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * attn.scale
    if size is not None:
        logits = logits + size.log().view(batch, 1, 1, num_tokens)
    probs = logits.softmax(dim=-1)
    cls_to_images = probs[:, :, 0, num_prefix:].sum(dim=1)
    value_norm = v.transpose(1, 2).reshape(batch, num_tokens, channels).norm(dim=-1)[:, num_prefix:]
    weighted = cls_to_images * value_norm
    return weighted / weighted.sum(dim=-1, keepdim=True)


def embed(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return timm_vit.embed(model, batch).x


def first_layer_variances(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = embed(model, batch)
        for blk in model.blocks[: LAYERS[0]]:
            x = blk(x)
        return reference_scores(model.blocks[LAYERS[0]], x, model.num_prefix_tokens).var(dim=-1)


def mixed_threshold(model: torch.nn.Module, batch: torch.Tensor) -> tuple[float, torch.Tensor]:
    """A threshold halfway between the 4th and 5th variance: half the batch prunes at the first layer."""
    variances = first_layer_variances(model, batch)
    ordered = variances.sort().values
    half = len(ordered) // 2
    assert (ordered[half] - ordered[half - 1]) / ordered[half] > 1e-3, "variances too close to split safely"
    threshold = float((ordered[half - 1] + ordered[half]) / 2)
    return threshold, variances < threshold


def test_registered_and_options():
    assert "ppt" in tr.methods()
    model = tr.patch(small_model(), "ppt", r=R, layers=LAYERS)
    info = tr.describe(model)
    assert info["method"] == "ppt"
    assert info["options"] == {"r": R, "layers": LAYERS, "threshold": 7e-5, "prop_attn": True}
    assert info["schedule"] == [0, 6, 0, 6]
    assert "last_forward" not in info and "pooled_share" not in info  # nothing from a forward pass in describe


def test_policy_on_hand_computed_scores():
    from tokenreduce.core.ops import bipartite_merge
    from tokenreduce.core.state import TokenState
    from tokenreduce.methods.ppt import PPT, importance_scores

    # One image, CLS + 3 image tokens, 2 heads: the heads' CLS rows sum to 0.5 on every image token, the
    # value norms are 1, 2, 3, so s = (1, 2, 3) / 6 with unbiased variance ((1/6)^2 + 0 + (1/6)^2) / 2 = 1/36.
    stats = {
        "cls_attn": torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]]),
        "value_norm": torch.tensor([[9.0, 1.0, 2.0, 3.0]]),
        "metric": torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]]),
    }
    scores = importance_scores(stats, 1)
    torch.testing.assert_close(scores, torch.tensor([[1 / 6, 2 / 6, 3 / 6]]))
    torch.testing.assert_close(scores.var(dim=-1), torch.tensor([1 / 36]))
    state = TokenState(x=torch.arange(4.0).view(1, 4, 1), owner=torch.tensor([[1, 2, 3]]), num_prefix=1)
    pruned = PPT(r=1, threshold=0.99 / 36).reduce(0, state, stats, 1)
    assert pruned.x.flatten().tolist() == [0.0, 3.0, 2.0]  # CLS, then the survivors by descending score
    assert pruned.owner.tolist() == [[-1, 2, 1]] and pruned.size.flatten().tolist() == [1.0, 1.0, 1.0]
    pooled = PPT(r=1, threshold=1.01 / 36).reduce(0, state, stats, 1)
    expected = bipartite_merge(state.replace(size=state.sizes()), stats["metric"], 1)
    assert pooled.x.flatten().tolist() == expected.x.flatten().tolist() == [0.0, 1.5, 3.0]
    assert pooled.size.flatten().tolist() == [1.0, 2.0, 1.0]


def test_threshold_zero_is_top_k_of_ats_score_in_descending_order():
    model = small_model()
    batch = images(3)
    with torch.no_grad():
        # Independent reference: score from the full attention map, top-k, descending order.
        x = embed(model, batch)
        for i, blk in enumerate(model.blocks):
            if i in LAYERS:
                scores = reference_scores(blk, x, 1)
                keep = scores.topk(scores.shape[1] - R, dim=-1, sorted=True).indices + 1
                x = x + blk.attn(blk.norm1(x))
                index = torch.cat([torch.zeros(len(x), 1, dtype=torch.long), keep], dim=1)
                x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
                x = x + blk.mlp(blk.norm2(x))
            else:
                x = blk(x)
        expected = model.forward_head(model.norm(x))
        tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=0.0)
        got = model(batch)
        states = tr.trace(model, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.norm(states[-1].x), model.norm(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(states[-1].size, torch.ones_like(states[-1].size))  # pruning keeps sizes


@pytest.mark.parametrize("threshold", [1e9, math.inf])
def test_high_threshold_is_exactly_tome(threshold):
    model = small_model()
    batch = images(4)
    with torch.no_grad():
        tr.patch(model, "tome", r=[0, R, 0, R])
        tome_out = model(batch)
        tome_states = tr.trace(model, batch)
        tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=threshold)
        ppt_out = model(batch)
        ppt_states = tr.trace(model, batch)
    assert torch.equal(ppt_out, tome_out)
    for ppt_state, tome_state in zip(ppt_states, tome_states, strict=True):
        assert torch.equal(ppt_state.owner, tome_state.owner)
        assert (ppt_state.size is None) == (tome_state.size is None)
        if ppt_state.size is not None:
            assert torch.equal(ppt_state.size, tome_state.size)
    assert ppt_states[-1].size.sum(dim=1).flatten().tolist() == [37.0] * 4  # every patch is counted once


def test_mixed_batch_selects_per_image_and_matches_single_runs():
    model = small_model()
    batch = images(8)
    threshold, pools = mixed_threshold(model, batch)
    assert pools.sum() == 4
    with torch.no_grad():
        tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=threshold)
        together = model(batch)
        mixed_first = tr.trace(model, batch)[LAYERS[0]]
        alone = torch.cat([model(batch[i : i + 1]) for i in range(len(batch))])
        tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=0.0)
        pruned_first = tr.trace(model, batch)[LAYERS[0]]
        tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=math.inf)
        pooled_first = tr.trace(model, batch)[LAYERS[0]]
    # Both policies and the per-image selection run in each batch size: only the matmul blocking differs
    # (measured 3.0e-7 on |logits| <= 0.6).
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    for i, pooled in enumerate(pools.tolist()):
        chosen, other = (pooled_first, pruned_first) if pooled else (pruned_first, pooled_first)
        assert torch.equal(mixed_first.x[i], chosen.x[i])
        assert torch.equal(mixed_first.size[i], chosen.size[i])
        assert torch.equal(mixed_first.owner[i], chosen.owner[i])
        assert not torch.equal(mixed_first.x[i], other.x[i])  # the two policies really differ
    # Pooling conserves the patches' total size; pruning keeps N - r tokens of size 1.
    totals = mixed_first.size.sum(dim=(1, 2))
    assert torch.equal(totals, torch.where(pools, torch.tensor(37.0), torch.tensor(31.0)))


@pytest.fixture(scope="module")
def deit_small() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


def test_deit_small_token_counts_and_clamp_note(deit_small):
    model = deit_small
    tr.patch(model, "ppt", r=50, layers=(3, 6, 9), threshold=7e-5, prop_attn=True)
    info = tr.describe(model)
    expected_out = [197] * 3 + [147] * 3 + [97] * 3 + [49] * 3
    assert info["tokens_out"] == expected_out
    assert info["tokens_in"][3::3] == [197, 147, 97]
    assert info["schedule"] == [0, 0, 0, 50, 0, 0, 50, 0, 0, 48, 0, 0]
    assert info["notes"] == ["block 9: r=50 clamped to 48 = floor((97 tokens - 1 prefix) / 2)"]
    with torch.no_grad():
        states = tr.trace(model, images(2, size=224))
    assert [s.x.shape[1] for s in states] == expected_out


@pytest.mark.parametrize(("r", "gmacs"), [(0, 4.60), (20, 3.92), (50, 2.94), (80, 2.46), (100, 2.28)])
def test_deit_small_analytic_gmacs_match_the_spec(deit_small, r, gmacs):
    assert round(tr.flops(tr.patch(deit_small, "ppt", r=r)).total_gmacs, 2) == gmacs


@pytest.mark.parametrize(("name", "num_prefix"), [("deit_base_distilled_patch16_224", 2),
                                                  ("vit_medium_patch16_reg4_gap_256", 4)])
@pytest.mark.parametrize("threshold", [0.0, math.inf])
def test_prefix_tokens_survive_both_branches(name, num_prefix, threshold):
    model = small_model(name)
    assert model.num_prefix_tokens == num_prefix
    batch = images(2)
    with torch.no_grad():
        plain = embed(model, batch)
        for blk in model.blocks[: LAYERS[0] + 1]:
            plain = blk(plain)
        tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=threshold)
        states = tr.trace(model, batch)
    policy = 1.0 if threshold == math.inf else 0.0
    assert tr.diagnostics(model, batch) == {"pooled_share": {1: policy, 3: policy}}
    # At the first reducing block the prefix rows are exactly what the unreduced block computes.
    torch.testing.assert_close(states[LAYERS[0]].x[:, :num_prefix], plain[:, :num_prefix], atol=1e-5, rtol=1e-5)
    for state in states[LAYERS[0]:]:
        assert torch.equal(state.size[:, :num_prefix], torch.ones(2, num_prefix, 1))
        owner = state.owner
        assert bool(((owner == -1) | (owner >= num_prefix)).all())  # no patch ever lands on a prefix token
    image_tokens = 36
    if threshold == math.inf:  # pooling: every patch still counted once, by an image token
        assert states[-1].size[:, num_prefix:].sum(dim=(1, 2)).tolist() == [image_tokens] * 2
        assert bool((states[-1].owner >= num_prefix).all())
    else:  # pruning: the dropped patches are gone
        assert (states[-1].owner == -1).sum(dim=1).tolist() == [2 * R] * 2


def test_r_zero_equals_unpatched_and_unpatch_restores():
    model = small_model()
    batch = images(2)
    with torch.no_grad():
        expected = model(batch)
        original = type(model)
        tr.patch(model, "ppt", r=0, layers=LAYERS)
        torch.testing.assert_close(model(batch), expected, atol=1e-5, rtol=1e-5)
        tr.patch(model, "ppt", r=R, layers=LAYERS)
        assert not torch.allclose(model(batch), expected, atol=1e-5)
        tr.unpatch(model)
        assert type(model) is original
        assert torch.equal(model(batch), expected)


def test_per_block_r_forms_agree():
    model = small_model()
    batch = images(4)
    with torch.no_grad():
        outs = []
        for options in ({"r": R, "layers": LAYERS}, {"r": [0, R, 0, R]}, {"r": {1: R, 3: R}}):
            tr.patch(model, "ppt", threshold=5e-6, **options)
            outs.append(model(batch))
            assert tr.describe(model)["schedule"] == [0, R, 0, R]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    tr.patch(model, "ppt", r={1: 2, 2: 100})
    info = tr.describe(model)
    assert info["schedule"] == [0, 2, 17, 0]  # 35 tokens: at most floor(34 / 2) = 17
    assert info["notes"] == ["block 2: r=100 clamped to 17 = floor((35 tokens - 1 prefix) / 2)"]


def test_batch_independence_at_default_threshold():
    model = tr.patch(small_model(), "ppt", r=R, layers=LAYERS)
    batch = images(6, seed=3)
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(batch[i : i + 1]) for i in range(len(batch))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("r", "threshold"), [(2, 5e-6), (6, 5e-6), (12, 5e-6), (6, 0.0), (6, math.inf)])
def test_analytic_flops_match_flop_counter(r, threshold):
    model = small_model()
    tr.patch(model, "ppt", r=r, layers=LAYERS, threshold=threshold)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(images(1))
    counted_gmacs = counter.get_total_flops() / 2 / 1e9
    report = tr.flops(model)
    assert report.overhead_gmacs > 0
    assert abs(report.total_gmacs - counted_gmacs) / counted_gmacs < 0.01


def test_overhead_is_the_score_row_and_the_similarity():
    model = small_model()

    batch = images(8)

    def counted_macs(threshold: float, x: torch.Tensor = batch) -> float:
        tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=threshold)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(x)
        return counter.get_total_flops() / 2 / len(x)

    # Same token counts; only the bipartite similarity (blocks entered by 37 and 31 tokens) differs. A batch
    # whose images take both branches runs both (the analytic cost); on CPU a batch whose images all agree
    # runs only its own branch (here one image at the threshold that mixes the batch of 8).
    similarity = (19 * 18 + 16 * 15) * 32
    mixed, pools = mixed_threshold(model, batch)
    shares = tr.diagnostics(tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=mixed), batch)["pooled_share"]
    assert 0 < shares[LAYERS[0]] < 1 and shares[LAYERS[1]] in (0.0, 1.0)  # both branches, then one
    assert counted_macs(mixed) - counted_macs(0.0) == 19 * 18 * 32 + (shares[LAYERS[1]] == 1.0) * 16 * 15 * 32
    first = batch[:1]
    one_branch = counted_macs(math.inf if pools[0] else 0.0, first)
    assert counted_macs(mixed, first) == one_branch
    score_rows = (37 + 31) * 96  # q_cls . K^T beside the fused attention
    expected = {5e-6: score_rows + similarity, 0.0: score_rows, math.inf: similarity}
    for threshold, macs in expected.items():
        assert tr.flops(tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=threshold)).overhead_gmacs * 1e9 \
            == pytest.approx(macs)


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"r": -1}, ValueError, "-1"),
    ({"r": 2.5}, ValueError, "2.5"),
    ({"r": "many"}, ValueError, "'many'"),
    ({"r": [0, 3, -2], "layers": None}, ValueError, "r\\[2\\].*-2"),
    ({"r": {1: 3, 4: 3}, "layers": None}, ValueError, "layer 4"),
    ({"r": [0, 3]}, ValueError, "layers=\\(1, 3\\) only with an int r"),
    ({"layers": (1, 4)}, ValueError, "layer 4"),
    ({"layers": (-1,)}, ValueError, "layer -1"),
    ({"threshold": -1e-5}, ValueError, "threshold.*-1e-05"),
    ({"threshold": float("nan")}, ValueError, "threshold.*nan"),
    ({"threshold": "high"}, ValueError, "threshold.*'high'"),
])
def test_bad_input_errors_leave_model_unchanged(options, error, message):
    model = tr.patch(small_model(), "tome", r=2)
    patched_class = type(model)
    with pytest.raises(error, match=message):
        tr.patch(model, "ppt", **{"r": R, "layers": LAYERS, **options})
    assert type(model) is patched_class
    assert tr.describe(model)["method"] == "tome"


def test_gradients_flow_in_train_mode():
    model = small_model()
    batch = images(4)
    threshold, _ = mixed_threshold(model, batch)
    tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=threshold).train()
    model(batch).logsumexp(dim=-1).sum().backward()
    for param in (model.patch_embed.proj.weight, model.blocks[0].attn.qkv.weight, model.blocks[-1].mlp.fc2.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    # the mixed policy ran in train mode too
    assert tr.diagnostics(model, batch)["pooled_share"][LAYERS[0]] == 0.5


def test_bfloat16_and_autocast_run():
    model = small_model()
    batch = images(4)
    threshold, pools = mixed_threshold(model, batch)  # variances 7% or more from the threshold
    with torch.no_grad():
        tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=threshold)
        reference, reference_first = model(batch), tr.trace(model, batch)[LAYERS[0]]
        runs = {}
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                runs[f"{dtype} autocast"] = dtype, model(batch), tr.trace(model, batch)[LAYERS[0]]
        model.to(torch.bfloat16)
        runs["bfloat16 weights"] = torch.bfloat16, model(batch.bfloat16()), tr.trace(model, batch.bfloat16())[LAYERS[0]]
    roundoff = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
    for name, (dtype, out, first) in runs.items():
        assert out.dtype == dtype and out.shape == reference.shape and bool(torch.isfinite(out.float()).all())
        assert first.size.dtype == torch.float32 and first.x.shape[1] == 31
        # Same policy per image as float32 (scores in float32; the margin is far above the rounding).
        totals = first.size.sum(dim=(1, 2))
        assert torch.equal(totals, torch.where(pools, torch.tensor(37.0), torch.tensor(31.0))), name
        # Where an image keeps or pools the same tokens as in float32 at that block (bfloat16 may flip a near-tie
        # of the pruning order), its features are within rounding: measured <= 2.2e-3 relative, < u; bound 4 u.
        same = (first.owner == reference_first.owner).all(dim=1)
        assert dtype != torch.float16 or same.sum() >= 2, name  # float16 (measured: 3 of 4 images)
        error = (first.x.float() - reference_first.x).flatten(1).norm(dim=1) / reference_first.x.flatten(1).norm(dim=1)
        assert bool((error[same] < 4 * roundoff[dtype]).all()), (name, error, same)
        # Logits: later blocks may flip a near-tie of the bipartite matching (measured <= 0.040 relative in
        # bfloat16, 9e-4 in float16).
        logit_error = (out.float() - reference).norm(dim=-1) / reference.norm(dim=-1)
        assert logit_error.max() < 0.1, (name, logit_error)


def test_pooled_share_is_exact():
    """tr.diagnostics gives the share of images that pooled at each block: 0 / 1 at threshold 0 / inf, and on a
    batch of a peaked and a flat image, the shares computed by hand from the importance scores at both blocks."""
    from tokenreduce.methods.ppt import importance_scores

    model = small_model()
    batch = images(4)[[0, 3]]  # contrasts 0.2 and 3.0
    variances = first_layer_variances(model, batch)
    peaked, flat = int(variances.argmax()), int(variances.argmin())
    assert variances[peaked] > 1.5 * variances[flat]
    threshold = float((variances[peaked] * variances[flat]).sqrt())  # between them, far from both
    tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=0.0)
    assert tr.diagnostics(model, batch) == {"pooled_share": {1: 0.0, 3: 0.0}}
    tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=math.inf)
    assert tr.diagnostics(model, batch) == {"pooled_share": {1: 1.0, 3: 1.0}}
    tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=threshold)
    with torch.no_grad():
        before_second = tr.trace(model, batch)[LAYERS[1] - 1]
        # Block 3's scores by hand: its attention with the log-size bias, CLS row summed over heads, value norms.
        blk = model.blocks[LAYERS[1]]
        x, size = before_second.x, before_second.size
        b, n, c = x.shape
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(b, n, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        probs = (q @ k.transpose(-2, -1) * blk.attn.scale + size.log().view(b, 1, 1, n)).softmax(dim=-1)
        stats = {"cls_attn": probs[:, :, 0], "value_norm": v.transpose(1, 2).reshape(b, n, c).norm(dim=-1)}
        second = importance_scores(stats, 1).var(dim=-1)
    assert bool(((second - threshold).abs() > 0.05 * threshold).all()), "an image sits on the threshold at block 3"
    expected_second = float((second < threshold).float().mean())
    assert tr.diagnostics(model, batch) == {"pooled_share": {1: 0.5, 3: expected_second}}
    # The flat image pooled at block 1 (size total 37: every patch kept), the peaked one pruned (31 tokens of 1).
    first_totals = tr.trace(model, batch)[LAYERS[0]].size.sum(dim=(1, 2))
    assert first_totals[flat] == 37.0 and first_totals[peaked] == 31.0
    with torch.no_grad():
        assert tr.diagnostics(model, batch[[flat]]) == {"pooled_share": {1: 1.0, 3: float(second[flat] < threshold)}}


def test_other_image_size_with_dynamic_img_size():
    model = small_model(dynamic_img_size=True)
    tr.patch(model, "ppt", r=R, layers=LAYERS, threshold=5e-6)
    batch = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(2))  # 8 x 10 patches
    with torch.no_grad():
        states = tr.trace(model, batch)
        together = model(batch)
        alone = torch.cat([model(batch[i : i + 1]) for i in range(2)])
    assert [s.x.shape[1] for s in states] == [81, 75, 75, 69]
    assert tr.describe(model, img_size=(128, 160))["tokens_out"] == [81, 75, 75, 69]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
