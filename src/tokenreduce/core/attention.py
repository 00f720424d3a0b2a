"""Multi-head self-attention that adds the log-size bias and returns exactly the statistics asked for.

Statistics a method may ask for (by name):

- ``"metric"``: the keys averaged over heads, ``B x N x d_head`` (ToMe's similarity metric).
- ``"cls_attn"``: post-softmax attention of the CLS query, ``B x H x N``; for a model without a CLS
  token, the mean over all query rows.
- ``"value_norm"``: L2 norm of every token's value vector, heads concatenated, ``B x N``.
- ``"attn"``: the full post-softmax map, ``B x H x N x N`` (forces the unfused path).

Where no full map is needed the output uses ``F.scaled_dot_product_attention`` (the fused kernel) with the
size bias as an additive float mask, and the CLS row is its own small product ``q_cls . K^T``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

STATISTICS = frozenset({"metric", "cls_attn", "value_norm", "attn"})


def _add_bias(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return logits if bias is None else logits + bias


def attention(
    attn: nn.Module,
    x: torch.Tensor,
    size_bias: torch.Tensor | None = None,
    need: Collection[str] = (),
    has_cls: bool = True,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run a timm ``Attention`` module on ``x`` (``B x N x C``) with an optional log-size bias.

    Args:
        attn: a timm ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj``, ...).
        size_bias: ``B x 1 x 1 x N`` added to the logits of every query (log of the token sizes).
        need: names of the statistics to return (see the module doc).
        has_cls: whether token 0 is a CLS token (for ``cls_attn``).
        transform: applied to the full post-softmax map before it is used (e.g. GTP's sparsification);
            implies the unfused path.

    Returns:
        The projected attention output (``B x N x C``) and a dict with the statistics asked for.
    """
    unknown = set(need) - STATISTICS
    if unknown:
        raise ValueError(f"unknown attention statistics {sorted(unknown)}; known: {sorted(STATISTICS)}")
    batch, num_tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size_bias is None else size_bias.to(q.dtype)
    stats: dict[str, torch.Tensor] = {}

    # Without a CLS token the "CLS row" is the mean of all rows: that needs the whole map anyway, so compute it
    # once and take the output from it rather than a second Q K^T beside the fused kernel.
    full_map = ("attn" in need or transform is not None or not getattr(attn, "fused_attn", True)
                or ("cls_attn" in need and not has_cls))
    if full_map:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits += bias  # in place: one B x H x N x N buffer less per block (matmul keeps its inputs only)
        probs = logits.softmax(dim=-1)
        if transform is not None:
            probs = transform(probs)
        if "attn" in need:
            stats["attn"] = probs
        if "cls_attn" in need:
            stats["cls_attn"] = probs[:, :, 0] if has_cls else probs.mean(dim=2)
        out = attn.attn_drop(probs) @ v
    else:
        dropout = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        if "cls_attn" in need:
            row = _add_bias((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1), bias)
            stats["cls_attn"] = row.softmax(dim=-1)[:, :, 0]
    if "metric" in need:
        stats["metric"] = k.mean(dim=1)
    if "value_norm" in need:
        stats["value_norm"] = v.transpose(1, 2).reshape(batch, num_tokens, heads * head_dim).norm(dim=-1)

    out = attn.norm(out.transpose(1, 2).reshape(batch, num_tokens, heads * head_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), stats
