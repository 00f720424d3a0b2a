"""Stateless token operations shared by the methods: gather, keep, bipartite merge, owner bookkeeping.

Every function works on whole batches with ``gather``/``scatter_reduce``: no host syncs, no loops over
images, so a fixed schedule runs at the speed of the blocks it shortens.
"""

from __future__ import annotations

import torch

from .state import TokenState


def gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick tokens per image: ``t`` is ``B x N x C``, ``index`` is ``B x K``; returns ``B x K x C``.

    One ``index_select`` of whole rows: on CPU about 2.5x faster than ``gather`` with an index expanded over
    the channels (DeiT-S shapes).

    >>> gather_tokens(torch.arange(6.).view(1, 3, 2), torch.tensor([[2, 0]])).tolist()
    [[[4.0, 5.0], [0.0, 1.0]]]
    """
    batch, num_tokens, channels = t.shape
    offsets = torch.arange(0, batch * num_tokens, num_tokens, device=index.device).unsqueeze(1)
    rows = t.reshape(batch * num_tokens, channels).index_select(0, (index + offsets).flatten())
    return rows.view(batch, index.shape[1], channels)


def remap_owner(owner: torch.Tensor | None, new_index_of_old: torch.Tensor) -> torch.Tensor | None:
    """Follow every input patch to its new token: ``new_index_of_old`` is ``B x N`` (-1 = dropped)."""
    if owner is None:
        return None
    moved = new_index_of_old.gather(1, owner.clamp(min=0))
    return torch.where(owner < 0, owner, moved)


def keep_tokens(state: TokenState, keep_index: torch.Tensor) -> TokenState:
    """Keep the image tokens ``keep_index`` (``B x K``, indices into the current tokens, prefix
    excluded from the list); the prefix tokens are always kept first, then the listed ones in the
    given order."""
    batch, num_tokens = state.x.shape[:2]
    prefix = torch.arange(state.num_prefix, device=keep_index.device).expand(batch, -1)
    index = torch.cat([prefix, keep_index], dim=1)
    size = gather_tokens(state.size, index) if state.size is not None else None
    owner = None
    if state.owner is not None:
        new_index_of_old = torch.full((batch, num_tokens), -1, dtype=torch.long, device=index.device)
        new_pos = torch.arange(index.shape[1], device=index.device).expand(batch, -1)
        new_index_of_old.scatter_(1, index, new_pos)
        owner = remap_owner(state.owner, new_index_of_old)
    return state.replace(x=gather_tokens(state.x, index), size=size, owner=owner)


def bipartite_merge(state: TokenState, metric: torch.Tensor, r: int) -> TokenState:
    """Bipartite soft matching (the ToMe step): merge ``r`` tokens of set A into their best match in B.

    A are the even positions of the current order, B the odd ones; prefix tokens never merge and
    nothing merges into them. Each source joins its best B token by size-weighted mean and the sizes
    add. Output order: the prefix tokens, the A tokens that stay in their original order, then B.

    ``metric`` is ``B x N x d`` (ToMe: keys averaged over heads). ``r`` must be at most the number of
    mergeable A tokens; callers clamp. Prefix tokens stay first, in their order, whatever their parity.
    """
    if r <= 0:
        return state
    x, num_prefix = state.x, state.num_prefix
    batch, num_tokens, channels = x.shape
    size = state.sizes()

    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    # Prefix tokens sit at the front: A holds ceil(num_prefix / 2) of them, B floor(num_prefix / 2).
    scores[:, : (num_prefix + 1) // 2, :] = -torch.inf
    scores[:, :, : num_prefix // 2] = -torch.inf

    best_score, best_dst = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True, stable=True)
    src_idx = order[:, :r]
    stay_idx = order[:, r:].sort(dim=-1).values
    dst_idx = best_dst.gather(1, src_idx)

    xs = x * size
    xa, xb = xs[:, ::2], xs[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    expand = dst_idx.unsqueeze(-1)
    xb = xb.scatter_add(1, expand.expand(-1, -1, channels), gather_tokens(xa, src_idx))
    sb = sb.scatter_add(1, expand, gather_tokens(sa, src_idx))
    # Prefix tokens take no part in a merge (their scores are -inf, so they always stay, first in stay_idx,
    # and nothing lands on them): put them back first, in their own order, so CLS / distillation / register
    # positions do not move; then the other A tokens that stay, then the other B tokens.
    prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2
    stay_idx = stay_idx[:, prefix_a:]
    new_size = torch.cat([size[:, :num_prefix], gather_tokens(sa, stay_idx), sb[:, prefix_b:]], dim=1)
    new_x = torch.cat([xs[:, :num_prefix], gather_tokens(xa, stay_idx), xb[:, prefix_b:]], dim=1) / new_size

    owner = None
    if state.owner is not None:
        num_stay = stay_idx.shape[1]
        arange = torch.arange(num_tokens, device=x.device)
        # new position of every old token: stayers by rank, B tokens after them, sources follow their destination.
        new_of_a = torch.empty(batch, a.shape[1], dtype=torch.long, device=x.device)
        new_of_a[:, :prefix_a] = arange[0 : 2 * prefix_a : 2]
        new_of_a.scatter_(1, stay_idx, num_prefix + arange[:num_stay].expand(batch, -1))
        new_of_b = (num_prefix + num_stay - prefix_b + arange[: b.shape[1]]).expand(batch, -1).clone()
        new_of_b[:, :prefix_b] = arange[1 : 2 * prefix_b : 2]
        new_of_a.scatter_(1, src_idx, new_of_b.gather(1, dst_idx))
        new_index_of_old = torch.empty(batch, num_tokens, dtype=torch.long, device=x.device)
        new_index_of_old[:, ::2] = new_of_a
        new_index_of_old[:, 1::2] = new_of_b
        owner = remap_owner(state.owner, new_index_of_old)
    return state.replace(x=new_x.to(x.dtype), size=new_size, owner=owner)


def max_bipartite_r(num_tokens: int, num_prefix: int) -> int:
    """The most tokens one bipartite merge can remove: the mergeable A tokens, which is
    floor((N - num_prefix) / 2) whenever the prefix count is even or odd alike."""
    num_a = (num_tokens + 1) // 2
    return max(0, min(num_a - (num_prefix + 1) // 2, (num_tokens - num_prefix) // 2))
