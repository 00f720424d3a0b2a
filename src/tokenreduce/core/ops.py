"""Stateless token operations shared by the methods: matching apart from what is merged, in both directions.

A reduction step is described by index tensors, and one pair of functions applies it to any per-token tensor
(features, sizes, positions), forwards and back:

- pruning: ``keep(t, index)`` gathers the kept tokens; ``unkeep(kept, index, into)`` scatters them back;
- merging: ``bipartite_match(metric, r, num_prefix)`` returns a :class:`Matching`; ``merge(t, m)`` sums every
  merged token into its destination; ``unmerge(t, m)`` copies every new token back to the tokens it holds.

The state-level steps (``keep_tokens``, ``bipartite_merge``) run features, sizes and owners through those
functions, and :func:`restore` turns a reduced state back into the full token grid. Every function works on
whole batches with ``gather``/``scatter``: no host syncs, no loops over images.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .attention import exporting
from .errors import InputError
from .precision import at_least_float32, decide
from .restore import RULES, carry_weights, merge_weights, similarity_links
from .state import TokenState


def gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick tokens per image: ``t`` is ``B x N x C``, ``index`` is ``B x K``; returns ``B x K x C``.

    One ``index_select`` of whole rows: on CPU about 2.5x faster than ``gather`` with an index expanded over
    the channels (DeiT-S shapes).

    >>> gather_tokens(torch.arange(6.).view(1, 3, 2), torch.tensor([[2, 0]])).tolist()
    [[[4.0, 5.0], [0.0, 1.0]]]
    """
    batch, num_tokens, channels = t.shape
    if batch == 1:  # one image (latency): no row offsets, two ops instead of six
        return t.index_select(1, index[0])
    offsets = torch.arange(0, batch * num_tokens, num_tokens, device=index.device).unsqueeze(1)
    rows = t.reshape(batch * num_tokens, channels).index_select(0, (index + offsets).flatten())
    return rows.view(batch, index.shape[1], channels)


# --- pruning: keep and unkeep ----------------------------------------------------------------------------
def keep(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The tokens ``index`` (``B x K``) of any per-token tensor ``t`` (``B x N x C``), in that order.

    >>> keep(torch.tensor([[[1.], [2.], [3.]]]), torch.tensor([[0, 2]])).flatten().tolist()
    [1.0, 3.0]
    """
    return gather_tokens(t, index)


def unkeep(kept: torch.Tensor, index: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`keep`: ``into`` (``B x N x C``) with rows ``index`` replaced by ``kept``.

    >>> unkeep(torch.tensor([[[7.], [9.]]]), torch.tensor([[0, 2]]), torch.zeros(1, 3, 1)).flatten().tolist()
    [7.0, 0.0, 9.0]
    """
    return into.scatter(1, index.unsqueeze(-1).expand(-1, -1, kept.shape[-1]), kept)


def marked(shape: tuple[int, ...], dim: int, index: torch.Tensor) -> torch.Tensor:
    """A boolean tensor of ``shape``, True at ``index`` along ``dim`` (a ``scatter`` into zeros). The source is a
    boolean tensor, not the scalar True: TorchScript tracing (OpenVINO's direct conversion) has no scatter with a
    bool scalar.

    >>> marked((1, 4), 1, torch.tensor([[1, 3]])).tolist()
    [[False, True, False, True]]
    """
    marks = torch.ones_like(index, dtype=torch.bool)
    return torch.zeros(shape, dtype=torch.bool, device=index.device).scatter(dim, index, marks)


def kept_destination(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """New position of every old token after :func:`keep` with ``index``, ``B x N`` (-1 where dropped).

    >>> kept_destination(torch.tensor([[2, 0]]), 3).tolist()
    [[1, -1, 0]]
    """
    batch, count = index.shape
    positions = torch.arange(count, device=index.device).expand(batch, -1)
    return torch.full((batch, num_tokens), -1, dtype=torch.long, device=index.device).scatter(1, index, positions)


# --- merging: match, merge, unmerge ----------------------------------------------------------------------
class Matching(NamedTuple):
    """A bipartite matching of the tokens of one sequence (ToMe): A are the even positions, B the odd ones.

    ``src`` (``B x r``) are the A tokens merged away and ``dst`` (``B x r``) their destinations in B, both as
    indices into their set; ``stay`` (``B x (|A| - r - ceil(p/2))``) the non-prefix A tokens that stay, in
    order. ``num_prefix`` leading tokens never merge. After a merge the order is: the prefix tokens, the A
    tokens that stay, then the non-prefix B tokens.
    """

    src: torch.Tensor
    dst: torch.Tensor
    stay: torch.Tensor
    num_prefix: int
    num_tokens: int
    #: The A tokens that stay with the prefix A tokens in front (``B x (|A| - r)``), or None: what lets
    #: :func:`merge` gather the front of its output at once.
    kept: torch.Tensor | None = None


def bipartite_match(metric: torch.Tensor, r: int, num_prefix: int) -> Matching:
    """Bipartite soft matching: each A token's most similar B token (cosine of ``metric``, ``B x N x d``), and
    the ``r`` A tokens with the most similar match are merged. Prefix tokens never merge and nothing merges
    into them. ``r`` must be at most the mergeable A tokens (``max_bipartite_r``); callers clamp.

    >>> m = bipartite_match(torch.tensor([[[1., 0.], [1., 0.], [0., 1.], [1., .1]]]), 1, 0)
    >>> m.src.tolist(), m.dst.tolist(), m.stay.tolist()
    ([[0]], [[0]], [[1]])
    """
    with decide(metric):  # float32 whatever the model's dtype: bf16 similarities tie (core/precision.py)
        metric = at_least_float32(metric)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
    # Prefix tokens sit at the front: A holds ceil(num_prefix / 2) of them, B floor(num_prefix / 2).
    if num_prefix:  # fill_ with a Python scalar: one op fewer than an indexed assignment
        scores[:, : (num_prefix + 1) // 2].fill_(-torch.inf)
    if num_prefix > 1:
        scores[:, :, : num_prefix // 2].fill_(-torch.inf)
    best_score, best_dst = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True, stable=True)
    src, rest = order.split([r, order.shape[1] - r], dim=1)  # one op for the two slices
    # The prefix A tokens (scores -inf) always stay and have the smallest indices: drop them from ``stay``.
    kept = rest.sort(dim=-1).values
    stay = kept[:, (num_prefix + 1) // 2:]
    return Matching(src, best_dst.gather(1, src), stay, num_prefix, metric.shape[1], kept)


def add_tokens_(into: torch.Tensor, index: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Add the tokens ``t`` (``B x K x C``) into the rows ``index`` (``B x K``) of ``into`` (``B x N x C``), in
    place, in index order (repeated rows add up): ``into.scatter_add_`` over the channels, one ``index_add_`` for
    a single image.

    >>> add_tokens_(torch.zeros(1, 2, 1), torch.tensor([[1, 1]]), torch.ones(1, 2, 1)).flatten().tolist()
    [0.0, 2.0]
    """
    if into.shape[0] == 1:
        return into.index_add_(1, index[0], t)
    return into.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]), t)


def merge(t: torch.Tensor, m: Matching) -> torch.Tensor:
    """Apply a matching to any per-token tensor ``t`` (``B x N x C``): every merged token is added into its
    destination; returns ``B x (N - r) x C``. A size-weighted mean is ``merge(x * s, m) / merge(s, m)``.

    >>> m = Matching(torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([[1]]), 0, 4)
    >>> merge(torch.tensor([[[1.], [2.], [3.], [4.]]]), m).flatten().tolist()
    [3.0, 2.0, 5.0]
    """
    prefix_b = m.num_prefix // 2
    t_b = t[:, 1::2]
    # A tokens are gathered from ``t`` by their rows there (A token i is row 2i), not from the strided view
    # ``t[:, ::2]``: a gather from that view first copies all of A (about half the tokens) to make it contiguous.
    sources = gather_tokens(t, m.src * 2)
    if m.kept is not None and prefix_b == 0:
        # No prefix token among B: the front (prefix and staying A tokens, in order) is one gather, B follows
        # whole, and the sources are added into their destinations in place (the same sums in the same order).
        out = torch.cat([gather_tokens(t, m.kept * 2), t_b], dim=1)
        add_tokens_(out[:, m.kept.shape[1]:], m.dst, sources)
        return out
    t_b = t_b.scatter_add(1, m.dst.unsqueeze(-1).expand(-1, -1, t.shape[-1]), sources)
    return torch.cat([t[:, : m.num_prefix], gather_tokens(t, m.stay * 2), t_b[:, prefix_b:]], dim=1)


def merge_destination(m: Matching) -> torch.Tensor:
    """New position of every old token after :func:`merge`, ``B x N`` (merged tokens: their destination's).

    >>> m = Matching(torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([[1]]), 0, 4)
    >>> merge_destination(m).tolist()
    [[2, 1, 0, 2]]
    """
    batch, device = m.src.shape[0], m.src.device
    num_prefix, num_tokens = m.num_prefix, m.num_tokens
    prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2
    num_a, num_b, num_stay = (num_tokens + 1) // 2, num_tokens // 2, m.stay.shape[1]
    arange = torch.arange(num_tokens, device=device)
    # stayers by rank after the prefix, B tokens after them, sources follow their destination.
    new_of_a = torch.empty(batch, num_a, dtype=torch.long, device=device)
    new_of_a[:, :prefix_a] = arange[0: 2 * prefix_a: 2]
    new_of_a.scatter_(1, m.stay, num_prefix + arange[:num_stay].expand(batch, -1))
    new_of_b = (num_prefix + num_stay - prefix_b + arange[:num_b]).expand(batch, -1).clone()
    new_of_b[:, :prefix_b] = arange[1: 2 * prefix_b: 2]
    new_of_a.scatter_(1, m.src, new_of_b.gather(1, m.dst))
    destination = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    destination[:, ::2] = new_of_a
    destination[:, 1::2] = new_of_b
    return destination


def unmerge(t: torch.Tensor, m: Matching) -> torch.Tensor:
    """The inverse direction of :func:`merge`: ``t`` (``B x (N - r) x C``) back to ``B x N x C``, every old
    token taking the value of the new token that holds it.

    >>> m = Matching(torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([[1]]), 0, 4)
    >>> unmerge(torch.tensor([[[3.], [2.], [5.]]]), m).flatten().tolist()
    [5.0, 2.0, 3.0, 5.0]
    """
    return gather_tokens(t, merge_destination(m))


# --- state-level steps -----------------------------------------------------------------------------------
def remap_owner(owner: torch.Tensor | None, destination: torch.Tensor) -> torch.Tensor | None:
    """Follow every input patch to its new token: ``destination`` is ``B x N`` (-1 = dropped).

    >>> remap_owner(torch.tensor([[1, 2, -1]]), torch.tensor([[0, 1, -1]])).tolist()
    [[1, -1, -1]]
    """
    if owner is None:
        return None
    moved = destination.gather(1, owner.clamp(min=0))
    return torch.where(owner < 0, owner, moved)


def _newly_left(state: TokenState, leaving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(patches whose token is among ``leaving`` and that had not left before, ``B x n0`` bool; their carrier)."""
    carrier = state.owner.clamp(min=0)
    return leaving.gather(1, carrier) & (state.owner >= 0) & ~state.left, carrier


def record_departures(state: TokenState, leaving: torch.Tensor) -> TokenState:
    """Mark the patches carried by the tokens ``leaving`` (``B x N`` bool) as left, keeping the feature their
    token has now; a no-op unless the state tracks dense output.

    >>> s = TokenState(torch.tensor([[[0.], [1.], [2.]]])).tracked(dense=True)
    >>> out = record_departures(s, torch.tensor([[False, True, False]]))
    >>> out.left.tolist(), out.left_x.flatten().tolist()
    ([[True, False]], [1.0, 0.0])
    """
    if state.left is None:
        return state
    return _record(state, *_newly_left(state, leaving))


def _record(state: TokenState, now: torch.Tensor, carrier: torch.Tensor) -> TokenState:
    left_x = torch.where(now.unsqueeze(-1), gather_tokens(state.x, carrier).to(state.left_x.dtype), state.left_x)
    return state.replace(left=state.left | now, left_x=left_x)


def depart(state: TokenState, keep_index: torch.Tensor, leave_index: torch.Tensor,
           links: torch.Tensor | None = None) -> TokenState:
    """The bookkeeping of a step that keeps the tokens ``keep_index`` (``B x N'``, prefix first, in their new
    order) and lets ``leave_index`` (``B x d``) go: their patches are recorded as left (:func:`record_departures`)
    and, under a rule that follows tokens (``state.rule``, ``core.restore``), the left patches' weights pass
    on along ``links`` (``B x d x N'``; by default the rule's similarity links). Features, sizes and owners are
    the caller's. A no-op unless the state tracks dense output.

    >>> from tokenreduce.core.restore import RestoreRule
    >>> s = TokenState(torch.tensor([[[9., 9.], [1., 0.], [.2, 1.], [0., 1.]]])).tracked(dense=True)
    >>> s = s.replace(rule=RestoreRule("nearest"))
    >>> out = depart(s, torch.tensor([[0, 1, 3]]), torch.tensor([[2]]))
    >>> out.left.tolist(), out.left_weights.tolist()
    ([[False, True, False]], [[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    """
    if state.left is None:
        return state
    leaving = marked(state.x.shape[:2], 1, leave_index)
    rule = state.rule
    if rule is None or not rule.tracks_weights or leave_index.shape[1] == 0:
        return record_departures(state, leaving)
    now, carrier = _newly_left(state, leaving)
    out = _record(state, now, carrier)  # newly left patches found once, for left_x and for the weights
    if links is None:
        links = similarity_links(state.x, keep_index, leave_index, state.num_prefix, rule)
    return out.replace(left_weights=carry_weights(state.left_weights, now, carrier, keep_index, leave_index, links))


def leaving_tokens(destination: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` tokens a step drops (``destination`` -1), ``B x count``, in their old order (no host sync).

    >>> leaving_tokens(torch.tensor([[1, -1, 0, -1]]), 2).tolist()
    [[1, 3]]
    """
    return (destination >= 0).to(torch.uint8).argsort(dim=1, stable=True)[:, :count]


def keep_tokens(state: TokenState, keep_index: torch.Tensor) -> TokenState:
    """Keep the image tokens ``keep_index`` (``B x K``, indices into the current tokens, prefix excluded from
    the list); the prefix tokens are always kept first, then the listed ones in the given order. Patches of
    the dropped tokens leave (owner -1, their feature recorded for dense output)."""
    batch = state.x.shape[0]
    prefix = torch.arange(state.num_prefix, device=keep_index.device).expand(batch, -1)
    return keep_indexed(state, torch.cat([prefix, keep_index], dim=1))


def keep_indexed(state: TokenState, index: torch.Tensor) -> TokenState:
    """:func:`keep_tokens` with the whole new order given, prefix tokens included: ``index`` (``B x N'``) lists
    the tokens kept (the prefix tokens first, as a method guarantees), in their new order."""
    num_tokens = state.x.shape[1]
    owner = None
    if state.owner is not None:
        destination = kept_destination(index, num_tokens)
        if state.rule is not None and state.rule.tracks_weights:
            state = depart(state, index, leaving_tokens(destination, num_tokens - index.shape[1]))
        else:
            state = record_departures(state, destination < 0)
        owner = remap_owner(state.owner, destination)
    size = keep(state.size, index) if state.size is not None else None
    return state.replace(x=keep(state.x, index), size=size, owner=owner)


def bipartite_merge(state: TokenState, metric: torch.Tensor, r: int) -> TokenState:
    """The ToMe step on a state: match on ``metric`` (``B x N x d``; ToMe: keys averaged over heads), then
    merge features by size-weighted mean and add the sizes. No patch leaves: merged patches follow their
    token. ``r`` must be at most ``max_bipartite_r``; callers clamp."""
    if r <= 0:
        return state
    m = bipartite_match(metric, r, state.num_prefix)
    size = state.sizes()
    if state.x.dtype == size.dtype and not torch.is_grad_enabled() and not exporting():
        # Inference: features times sizes and the sizes side by side, one merge for both (the same sums per
        # channel). Not with gradients (the outputs then differed from the two merges in the last bit, so a model
        # would give other outputs with and without no_grad) nor while exporting (torch.export's stride
        # propagation through the channel slices broke a later view).
        widths = [state.x.shape[-1], size.shape[-1]]
        weighted = state.x if state.size is None else state.x * size  # sizes all 1: x * 1 is x, bit for bit
        merged_x, new_size = merge(torch.cat([weighted, size], dim=-1), m).split(widths, dim=-1)
        new_x = merged_x / new_size
    else:
        new_size = merge(size, m)
        new_x = merge(state.x * size, m) / new_size
    owner, left_weights = None, None
    if state.owner is not None:
        destination = merge_destination(m)
        owner = remap_owner(state.owner, destination)
        left_weights = merge_weights(state.left_weights, destination, new_size.shape[1])
    return state.replace(x=new_x if new_x.dtype == state.x.dtype else new_x.to(state.x.dtype), size=new_size,
                         owner=owner, left_weights=left_weights)


def restore(state: TokenState, rule: str | None = None) -> torch.Tensor:
    """The full token grid of a reduced state, ``B x (num_prefix + h*w) x C``: prefix tokens first, then every
    input patch in raster order with the feature of the token that carries it, or, for a patch that left
    (pruned, propagated away, fused), the feature its restore rule gives (``core.restore``): ``departure``, the
    feature its token had when it left; ``nearest`` / ``reconstruct`` / ``graph``, the weighted final features of
    the tokens it was linked to. ``rule`` None is the rule the state was traced with; ``departure`` is always
    available. With nothing reduced this is ``state.x`` itself. Needs a state traced with dense tracking
    (``TokenState.tracked(dense=True)``, e.g. ``tr.trace(model, images)``).

    >>> s = TokenState(torch.tensor([[[9.], [1.], [2.], [3.]]])).tracked(dense=True)
    >>> restore(keep_tokens(s, torch.tensor([[2]]))).flatten().tolist()
    [9.0, 1.0, 2.0, 3.0]
    """
    if state.left is None or state.owner is None:
        raise InputError("restore needs a state with dense tracking (owner and left); trace the model with "
                         "tr.trace(model, images) or build the state with TokenState.tracked(dense=True)")
    traced = "departure" if state.rule is None else state.rule.name
    name = traced if rule is None else rule
    if name not in RULES:
        raise InputError(f"unknown restore rule {name!r}; valid rules: {', '.join(RULES)}")
    if name not in ("departure", traced):
        raise InputError(f"this state was traced with the {traced!r} restore rule, so it can restore with "
                         f"{traced!r} or 'departure', not {name!r}; trace with tr.trace(model, images, "
                         f"restore={name!r})")
    carried = gather_tokens(state.x, state.owner.clamp(min=0))
    left_value = state.left_x.to(carried.dtype)
    if name != "departure" and state.left_weights is not None:
        weights = state.left_weights
        total = weights.sum(dim=-1, keepdim=True)
        followed = (weights / total.clamp(min=1e-12)).to(state.x.dtype) @ state.x
        # A patch whose links all ended (GTP: a token with no kept neighbour) keeps its departure feature.
        left_value = torch.where(total > 0, followed, left_value)
    image = torch.where(state.left.unsqueeze(-1), left_value, carried)
    return torch.cat([state.x[:, : state.num_prefix], image], dim=1)


def max_bipartite_r(num_tokens: int, num_prefix: int) -> int:
    """The most tokens one bipartite merge can remove: the mergeable A tokens, which is
    floor((N - num_prefix) / 2) whenever the prefix count is even or odd alike.

    >>> max_bipartite_r(197, 1)
    98
    """
    num_a = (num_tokens + 1) // 2
    return max(0, min(num_a - (num_prefix + 1) // 2, (num_tokens - num_prefix) // 2))
