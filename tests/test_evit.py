"""EViT's fused token, worked out by hand: the attention-weighted sum of the dropped tokens, not renormalised."""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.state import TokenState
from tokenreduce.methods.base import create_method


def cls_attention(row: list[float]) -> dict[str, torch.Tensor]:
    """Statistics with the CLS row ``row`` (over all tokens) in two heads whose mean is ``row``."""
    row_t = torch.tensor(row)
    spread = torch.tensor([0.01] + [0.0] * (len(row) - 2) + [-0.01])
    return {"cls_attn": torch.stack([row_t + spread, row_t - spread]).unsqueeze(0)}  # 1 x 2 heads x N


X = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [4.0, 4.0]]])  # CLS + 4 image tokens


def test_fused_token_is_the_attention_weighted_sum_of_the_dropped_tokens():
    method = create_method("evit", r=[2], layers=None)
    plan = method.plan(5, 1, 1)
    state = TokenState(X.clone(), num_prefix=1, grid=(2, 2))
    # CLS attention (mean over heads): CLS 0.15, image tokens 0.4, 0.3, 0.1, 0.05 -> drop tokens 3 and 4.
    out = method.reduce(0, state, cls_attention([0.15, 0.4, 0.3, 0.1, 0.05]), plan.amounts[0])
    fused = 0.1 * X[0, 3] + 0.05 * X[0, 4]  # weights sum to 0.15 < 1: the fused token is small
    assert out.x.shape == (1, 4, 2)
    torch.testing.assert_close(out.x[0, :3], X[0, :3], rtol=0, atol=0)  # CLS, then kept tokens in raster order
    torch.testing.assert_close(out.x[0, 3], fused, rtol=0, atol=1e-7)
    assert out.x[0, 3].tolist() == pytest.approx([0.5, 0.3])
    assert out.size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0]


def test_fused_token_dropped_again_is_fused_again():
    method = create_method("evit", r=[2, 2], layers=None)
    plan = method.plan(5, 1, 2)
    assert plan.tokens_out == (4, 3)
    state = TokenState(X.clone(), num_prefix=1, grid=(2, 2))
    first = method.reduce(0, state, cls_attention([0.15, 0.4, 0.3, 0.1, 0.05]), plan.amounts[0])
    fused1 = first.x[0, 3].clone()  # 0.1 * x3 + 0.05 * x4
    # Block 1 sees CLS, x1, x2, fused1: now x2 (0.2) and the fused token (0.1) are the least attended.
    second = method.reduce(1, first, cls_attention([0.3, 0.4, 0.2, 0.1]), plan.amounts[1])
    expected = 0.2 * X[0, 2] + 0.1 * fused1
    assert second.x.shape == (1, 3, 2)
    torch.testing.assert_close(second.x[0, :2], X[0, :2], rtol=0, atol=0)
    torch.testing.assert_close(second.x[0, 2], expected, rtol=0, atol=1e-7)
    assert second.x[0, 2].tolist() == pytest.approx([0.05, 0.43])
    assert second.size.flatten().tolist() == [1.0, 1.0, 3.0]  # the fused token holds x2, x3 and x4


def test_mean_option_renormalises_and_describe_says_which_ran():
    method = create_method("evit", r=[2], layers=None, fuse="mean")
    plan = method.plan(5, 1, 1)
    out = method.reduce(0, TokenState(X.clone(), num_prefix=1, grid=(2, 2)),
                        cls_attention([0.15, 0.4, 0.3, 0.1, 0.05]), plan.amounts[0])
    torch.testing.assert_close(out.x[0, 3], (0.1 * X[0, 3] + 0.05 * X[0, 4]) / 0.15, rtol=0, atol=1e-6)
    import timm

    model = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=64)
    assert tr.describe(tr.patch(model, "evit", layers=(1,)))["options"]["fuse"] == "sum"
    assert tr.describe(tr.patch(model, "evit", layers=(1,), fuse="mean"))["options"]["fuse"] == "mean"
    with pytest.raises(ValueError, match="evit: unknown fuse 'avg'; valid: sum, mean"):
        tr.patch(model, "evit", fuse="avg")
    assert tr.describe(model)["options"]["fuse"] == "mean"  # the bad call left the model as it was
