"""GTP: graph-based token propagation (Xu et al., "GTP-ViT: Efficient Vision Transformers via Graph-based
Token Propagation", WACV 2024). Training-free.

Written from ``specs/gtp.md``. Once per forward, a graph is built over the image tokens (spatial
8-neighbourhood, semantic kNN, or both) and normalised as ``G_ij = A_ij / sqrt(d_i d_j)``. In every
reducing block the ``r`` image tokens with the lowest attention score are removed and their features
propagated into their kept neighbours: ``x[K] += alpha * G[K, R] @ x[R]``; the graph then shrinks to
``G[K, K]`` (never rebuilt or renormalised).

>>> import timm, tokenreduce as tr
>>> model = timm.create_model("deit_small_patch16_224", pretrained=False)
>>> tr.describe(tr.patch(model, "gtp", r=8))["tokens_in"][:3]
[197, 189, 181]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..core.attention import as_dtype, diagonal_of, exporting
from ..core.errors import InputError, InputTypeError
from ..core.ops import depart, gather_tokens, kept_destination, marked, remap_owner
from ..core.precision import decide
from ..core.state import TokenState
from .base import Method, Plan, register, resolve_r, validate_r

GRAPHS = ("spatial", "semantic", "mixed")
SELECTIONS = ("mixed_attn_max", "mixed_attn_mean", "cls_attn", "col_sum", "diag", "random")
#: What each selection reads of the post-softmax attention map (column sums, diagonal).
_MAP_STATISTICS = {"mixed_attn_max": frozenset({"col_sum", "diag"}), "mixed_attn_mean": frozenset({"col_sum", "diag"}),
                   "col_sum": frozenset({"col_sum"}), "diag": frozenset({"diag"})}
#: How the map statistics are computed: "chunked" (a few images at a time, ``core.attention.map_statistics``)
#: or "full" (the whole ``B x H x N x N`` map, as the official code; the reference).
MAPS = ("chunked", "full")
#: ``state.extras`` keys: the graph of block 0 (``B x n0 x n0``), the same flattened (``B x n0*n0``, a view) and,
#: per image, the block-0 image index of every current token (``B x N``; the prefix tokens' entries are 0 and
#: mean nothing); the current graph is ``current_graph(state)``.
GRAPH_KEY = "gtp_graph"
FLAT_GRAPH_KEY = "gtp_graph_flat"
ALIVE_KEY = "gtp_alive"

# The spatial graph depends only on the grid: one (adjacency, normalised graph) per (grid, device), at most
# MAX_CACHED_GRIDS of them. Built outside inference mode so that a graph first made under
# ``torch.inference_mode()`` can still be used by a forward pass that trains.
_SPATIAL_CACHE: dict[tuple[tuple[int, int], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
MAX_CACHED_GRIDS = 16


def spatial_adjacency(grid: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``n0 x n0`` adjacency of the cells at Chebyshev distance 1 on an ``h x w`` grid (the
    8-neighbourhood) or a ``t x h x w`` space-time grid (the 26-neighbourhood: the same cell and its 8 neighbours
    in the previous and next time step too), raster order, no self loops.

    Cached per (grid, device); do not modify the returned tensor.

    >>> spatial_adjacency((2, 2)).sum(dim=1).tolist()
    [3, 3, 3, 3]
    >>> spatial_adjacency((2, 1, 2)).sum(dim=1).tolist()
    [3, 3, 3, 3]
    """
    return _spatial(grid, torch.device(device))[0]


def spatial_graph(grid: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised spatial graph ``G = A / sqrt(d_i d_j)``, ``n0 x n0`` float32 (cached, read-only)."""
    return _spatial(grid, torch.device(device))[1]


def _spatial(grid: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (tuple(int(g) for g in grid), device)
    if torch.compiler.is_compiling() or exporting():
        # Traced into the graph, never read from the cache: a guard on the cache's contents would fail once the
        # first compiled call filled it, and the second call of that shape would recompile; a TorchScript trace
        # (OpenVINO's direct conversion) that filled the cold cache would differ from its check trace, which reads it.
        return _build_spatial(key[0], device)
    graphs = _SPATIAL_CACHE.get(key)  # one lookup: another thread may clear the cache between two
    if graphs is None:
        with torch.inference_mode(False):
            graphs = _build_spatial(key[0], device)
        if len(_SPATIAL_CACHE) >= MAX_CACHED_GRIDS:
            _SPATIAL_CACHE.clear()
        _SPATIAL_CACHE[key] = graphs
    return graphs


def _build_spatial(grid: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Raster coordinates of every cell, n0 x len(grid) (last axis fastest), for a 2-D or 3-D grid.
    coords = torch.stack(torch.meshgrid(*(torch.arange(g, device=device) for g in grid), indexing="ij"),
                         dim=-1).reshape(-1, len(grid))
    chebyshev = (coords[:, None, :] - coords[None, :, :]).abs().amax(dim=-1)
    adjacency = chebyshev == 1
    return adjacency, normalise_graph(adjacency)


def semantic_adjacency(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Directed kNN graph on cosine similarity: ``tokens`` is ``B x n0 x D``; returns a boolean
    ``B x n0 x n0`` whose row i marks i's ``k`` most similar other tokens (exactly ``k``, self excluded).

    The graph is discrete, so no gradient flows through it.
    """
    n0 = tokens.shape[1]
    if not 1 <= k < n0:
        raise InputError(f"gtp: the semantic graph needs 1 <= k < {n0} image tokens, got k={k}")
    with torch.no_grad(), decide(tokens):  # float32 cosine, also under autocast
        unit = F.normalize(tokens.detach().float(), dim=-1)
        similarity = unit @ unit.transpose(1, 2)
        similarity = _exclude_self(similarity)
        neighbours = similarity.topk(k, dim=-1).indices
        return marked(similarity.shape, 2, neighbours)


def _exclude_self(similarity: torch.Tensor) -> torch.Tensor:
    """``similarity`` (``B x n x n``) with -inf on its diagonal: in place, or, while exporting (the exporter
    cannot translate a fill through a diagonal view), out of place with the same values."""
    if exporting():
        eye = torch.eye(similarity.shape[-1], dtype=torch.bool, device=similarity.device)
        return similarity.masked_fill(eye, -math.inf)
    similarity.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    return similarity


def normalise_graph(adjacency: torch.Tensor) -> torch.Tensor:
    """``G_ij = A_ij / sqrt(d_i d_j)`` with the row degrees ``d_i = sum_j A_ij``, element-wise, float32.

    A token without neighbours (a 1 x 1 grid) keeps an all-zero row instead of dividing by zero.

    >>> normalise_graph(torch.tensor([[0, 1, 1], [1, 0, 0], [1, 0, 0]])).tolist()[0][1]  # 1 / sqrt(2 * 1)
    0.7071067690849304
    """
    a = adjacency.float()
    inv_sqrt_degree = a.sum(dim=-1).clamp(min=1).rsqrt()
    return a * inv_sqrt_degree.unsqueeze(-1) * inv_sqrt_degree.unsqueeze(-2)


def build_graph(tokens: torch.Tensor, grid: tuple[int, ...], kind: str = "mixed", k: int = 8) -> torch.Tensor:
    """The normalised graph over the image tokens ``B x n0 x D`` on ``grid``: ``B x n0 x n0`` float32.

    ``kind`` is "spatial" (8-neighbourhood; 26-neighbourhood on a ``(t, h, w)`` grid), "semantic" (directed
    cosine kNN with ``k`` neighbours) or "mixed" (their union). The spatial graph is an expanded view of a
    cached tensor (no copy per image).
    """
    batch, n0 = tokens.shape[:2]
    if math.prod(grid) != n0:
        raise InputError(f"gtp: grid {tuple(grid)} has {math.prod(grid)} cells but there are {n0} image tokens")
    if kind == "spatial":
        return spatial_graph(grid, tokens.device).expand(batch, -1, -1)
    adjacency = semantic_adjacency(tokens, k)
    if kind == "mixed":
        adjacency |= spatial_adjacency(grid, tokens.device)
    elif kind != "semantic":
        raise InputError(f"gtp: unknown graph {kind!r}; valid graphs: {', '.join(GRAPHS)}")
    return normalise_graph(adjacency)


def current_graph(state: TokenState) -> torch.Tensor:
    """The graph over the current image tokens, ``G[K, K]`` of every block so far (``B x n x n``).

    The forward pass never builds it: it reads the few entries G[K, R] it needs from the block-0 graph.
    """
    graph, alive = state.extras[GRAPH_KEY], state.extras[ALIVE_KEY][:, state.num_prefix:]
    rows = graph.gather(1, alive.unsqueeze(-1).expand(-1, -1, graph.shape[-1]))
    return rows.gather(2, alive.unsqueeze(1).expand(-1, alive.shape[1], -1))


def sparsify_attention(probs: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero, per image and head, the attention entries strictly below the k-th smallest one,
    k = floor(N * N * (1 - sparsity)); rows are not renormalised. ``probs`` is ``B x H x N x N``."""
    num_tokens = probs.shape[-1]
    k = math.floor(num_tokens * num_tokens * (1.0 - sparsity))
    if k < 1:
        return probs
    threshold = probs.flatten(2).kthvalue(k, dim=-1, keepdim=True).values.unsqueeze(-1)
    return probs.masked_fill(probs < threshold, 0.0)


def selection_scores(selection: str, stats: dict[str, torch.Tensor], num_prefix: int, num_tokens: int,
                     device: torch.device | str = "cpu", block: int = 0, seed: int = 0) -> torch.Tensor:
    """Score of every image token, ``B x (N - num_prefix)``; the lowest are propagated away.

    - ``mixed_attn_max``: u * v with u_i = max_h A_h[i, i], v_i = max_h sum_q A_h[q, i] (all queries).
    - ``mixed_attn_mean``: the same with means over heads.
    - ``col_sum``: v (max over heads); ``diag``: u (max over heads).
    - ``cls_attn``: the CLS row (mean of all rows without a CLS token), mean over heads.
    - ``random``: uniform scores from a generator seeded by (seed, block); the same for every image of a
      batch, so an image's selection never depends on its batch.

    The map statistics are read from ``stats["col_sum"]`` / ``stats["diag"]`` (per head, ``B x H x N``) or,
    when only the whole map ``stats["attn"]`` is given, from it.
    """
    if selection == "cls_attn":
        return stats["cls_attn"][:, :, num_prefix:].mean(dim=1)
    if selection == "random":
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed) * 1_000_003 + block)
        return torch.rand(1, num_tokens - num_prefix, generator=generator, device=device)
    reduce_heads = (lambda t: t.amax(dim=1)) if selection != "mixed_attn_mean" else (lambda t: t.mean(dim=1))
    attn = stats.get("attn")
    if selection in ("mixed_attn_max", "mixed_attn_mean", "diag"):
        per_head = stats["diag"] if "diag" in stats else diagonal_of(attn)
        diag = reduce_heads(per_head[:, :, num_prefix:])
        if selection == "diag":
            return diag
    per_head = stats["col_sum"] if "col_sum" in stats else attn.sum(dim=-2)  # summing the contiguous map is faster
    column = reduce_heads(per_head[..., num_prefix:])
    if selection == "col_sum":
        return column
    return diag * column


def token_scores(selection: str, stats: dict[str, torch.Tensor], num_prefix: int, num_tokens: int,
                 device: torch.device | str = "cpu", block: int = 0, seed: int = 0) -> torch.Tensor:
    """:func:`selection_scores` over all tokens, ``B x N``, the prefix tokens' +inf (never among the lowest).

    The max-over-heads selections are computed on every token and the prefix entries overwritten (the same
    image-token scores, element by element, without slicing the statistics); the others are padded.
    """
    if selection in ("mixed_attn_max", "col_sum", "diag"):  # maxima: exact on any slice
        attn = stats.get("attn")
        if selection != "col_sum":
            diag = (stats["diag"] if "diag" in stats else diagonal_of(attn)).amax(dim=1)
        if selection != "diag":
            column = (stats["col_sum"] if "col_sum" in stats else attn.sum(dim=-2)).amax(dim=1)
        scores = diag if selection == "diag" else column if selection == "col_sum" else diag * column
        if num_prefix:
            scores[:, :num_prefix].fill_(math.inf)  # a new tensor (the head reduction made it)
        return scores
    # Means (a mean over a slice may differ in the last bit from one over the whole row) and the others: padded.
    scores = selection_scores(selection, stats, num_prefix, num_tokens, device, block, seed)
    return F.pad(scores, (num_prefix, 0), value=math.inf) if num_prefix else scores


@register
class GTP(Method):
    """Graph-based token propagation: in every reducing block propagate the ``r`` least important image
    tokens into their graph neighbours, ``x[K] += alpha * G[K, R] @ x[R]``, and drop them.

    Args:
        r: tokens propagated per block: an int (every block, first and last included), a per-block list,
            a dict {block: r} or (r, inflection). 0 changes nothing. Refused (ValueError) when a block would
            remove every image token.
        graph: "mixed" (default; spatial union semantic), "spatial" (8-neighbourhood) or "semantic"
            (directed cosine kNN of the image tokens after the position embedding).
        k: out-neighbours per token in the semantic graph (default 8).
        alpha: propagation weight in (0, 1] (default 0.1).
        selection: "mixed_attn_max" (default), "mixed_attn_mean", "cls_attn", "col_sum", "diag" or "random".
        token_scale: propagate sizes too and add log(size) to every attention's logits (default True).
        sparsity: theta in (0, 1]; below 1, each reducing block zeroes the attention entries under the
            floor(N^2 (1 - theta))-th smallest per image and head, for the output and the selection.
        seed: seed of the "random" selection.
        map: how the selection reads the attention map: "chunked" (default; column sums and diagonal made a
            few images at a time, never the whole ``B x H x N x N`` map; same scores to float rounding) or
            "full" (the whole map, as the official code; the reference).

    Prefix tokens (CLS, distillation, registers) are never removed and receive nothing; kept tokens stay in
    raster order. With owner tracking, a propagated token's patches go to the kept neighbour that received
    most of it (-1 when it had no kept neighbour).
    """

    name = "gtp"
    restore_rules = ("departure", "nearest", "reconstruct", "ridge", "graph")

    def __init__(self, r: Any = 8, graph: str = "mixed", k: int = 8, alpha: float = 0.1,
                 selection: str = "mixed_attn_max", token_scale: bool = True, sparsity: float = 1.0,
                 seed: int = 0, map: str = "chunked") -> None:
        super().__init__(r=r, graph=graph, k=k, alpha=alpha, selection=selection, token_scale=token_scale,
                         sparsity=sparsity, seed=seed, map=map)
        validate_r(self.name, r)
        if graph not in GRAPHS:
            raise InputError(f"{self.name}: unknown graph {graph!r}; valid graphs: {', '.join(GRAPHS)}")
        if selection not in SELECTIONS:
            raise InputError(f"{self.name}: unknown selection {selection!r}; valid selections: "
                             f"{', '.join(SELECTIONS)}")
        if map not in MAPS:
            raise InputError(f"{self.name}: unknown map {map!r}; valid: {', '.join(MAPS)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"{self.name}: k (semantic neighbours) must be an integer >= 1, got {k!r}")
        for option, value in (("alpha", alpha), ("sparsity", sparsity)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise InputError(f"{self.name}: {option} must be in (0, 1], got {value!r}")
        if not isinstance(token_scale, bool):
            raise InputTypeError(f"{self.name}: token_scale must be True or False, got {token_scale!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputTypeError(f"{self.name}: seed must be an integer, got {seed!r}")
        self.r, self.graph, self.k, self.alpha = r, graph, k, float(alpha)
        self.selection, self.token_scale, self.sparsity, self.seed = selection, token_scale, float(sparsity), seed
        self.map = map

    # --- schedule -------------------------------------------------------------------------------
    def amounts(self, depth: int) -> list[int]:
        return resolve_r(self.name, self.r, depth, None)

    def plan(self, num_tokens: int, num_prefix: int, depth: int) -> Plan:
        plan = super().plan(num_tokens, num_prefix, depth)
        image_tokens = num_tokens - num_prefix
        if any(plan.amounts) and self.graph != "spatial" and self.k >= image_tokens:
            raise InputError(f"{self.name}: the {self.graph} graph needs k < {image_tokens} image tokens, "
                             f"got k={self.k}")
        return plan

    # --- forward hooks --------------------------------------------------------------------------
    def needs(self, block: int, plan: Plan) -> frozenset[str]:
        if not plan.reduces(block):
            return frozenset()
        if self.selection in _MAP_STATISTICS:
            # A sparsified map exists whole anyway (its threshold is over all N^2 entries).
            return frozenset({"attn"}) if self.map == "full" or self.sparsity < 1.0 else _MAP_STATISTICS[self.selection]
        return frozenset({"cls_attn"}) if self.selection == "cls_attn" else frozenset()

    def prop_attn(self, block: int) -> bool:
        return self.token_scale

    def attn_transform(self, block: int, plan: Plan) -> Callable[[torch.Tensor], torch.Tensor] | None:
        # Only where tokens go, so r=0 blocks keep the fused, unchanged attention.
        if self.sparsity >= 1.0 or not plan.reduces(block):
            return None
        sparsity = self.sparsity
        return lambda probs: sparsify_attention(probs, sparsity)

    def begin(self, state: TokenState, plan: Plan) -> TokenState:
        if not any(plan.amounts):
            return state
        image = state.x[:, state.num_prefix:]
        graph = build_graph(image, state.grid, self.graph, self.k)
        # Every token's block-0 image index (prefix tokens: 0, never read), so that the indices the selection
        # makes over all tokens index it directly.
        alive = torch.arange(-state.num_prefix, image.shape[1], device=image.device).clamp(min=0).expand(
            image.shape[0], -1)
        return state.replace(extras={**state.extras, GRAPH_KEY: graph, FLAT_GRAPH_KEY: graph.flatten(1),
                                     ALIVE_KEY: alive})

    def reduce(self, block: int, state: TokenState, stats: dict[str, torch.Tensor], amount: int) -> TokenState:
        x, num_prefix = state.x, state.num_prefix
        batch, num_tokens, _ = x.shape
        graph, alive = state.extras[GRAPH_KEY], state.extras[ALIVE_KEY]

        # Scores of every token, the prefix tokens' +inf: the stable ascending order lists the image tokens as the
        # image-token scores would and the prefix tokens last, so its indices are token indices as they are.
        scores = token_scores(self.selection, stats, num_prefix, num_tokens, x.device, block, self.seed)
        order = scores.argsort(dim=-1, stable=True)
        if order.shape[0] != batch:  # ``random``: one order for the whole batch
            order = order.expand(batch, -1)
        propagated_index, rest = order.split([amount, order.shape[1] - amount], dim=1)  # one op for two slices
        index = rest.sort(dim=-1).values  # the prefix tokens, then the kept ones in raster order

        # G[K, R] straight from the graph of block 0 through the original indices of the tokens alive: the
        # sub-matrix G[K, K] the next block uses is never materialised (it is the same entries of G).
        alive_next = alive.gather(1, index)
        alive_kept, alive_propagated = alive_next[:, num_prefix:], alive.gather(1, propagated_index)
        if batch == 1:  # one image (latency): the columns R, then the rows K, four ops instead of seven
            weights = graph.index_select(2, alive_propagated[0]).index_select(1, alive_kept[0])
        else:  # per image: one gather of the entries (k, r) from the flattened graph
            flat_index = (alive_kept * graph.shape[-1]).unsqueeze(-1) + alive_propagated.unsqueeze(1)
            flat_graph = state.extras[FLAT_GRAPH_KEY]
            weights = flat_graph.gather(1, flat_index.flatten(1)).view(batch, alive_kept.shape[1], amount)

        scaled = weights * self.alpha
        size = state.size
        sizes = state.sizes() if self.token_scale else None
        if sizes is not None and sizes.dtype == x.dtype and batch == 1 and not torch.is_grad_enabled():
            # One image, inference (latency): features and sizes side by side, one gather of each set and one
            # product for both (bit for bit the two products here; a batched product of another width may round
            # otherwise; with gradients the two products, as ToMe's merge).
            both = self._propagate(torch.cat([x, sizes], dim=-1), index, propagated_index, scaled, num_prefix)
            x_new, size = both[..., : x.shape[-1]], both[..., x.shape[-1]:]
        else:
            x_new = self._propagate(x, index, propagated_index, scaled, num_prefix)
            if sizes is not None:
                size = self._propagate(sizes, index, propagated_index, scaled, num_prefix)
            elif size is not None:
                size = gather_tokens(size, index)

        owner = state.owner
        if owner is not None:
            # For dense output a propagated token's patches are restored by the state's rule (``graph``: from the
            # tokens it was propagated into, with these weights); for pictures they follow the kept neighbour that
            # received most of it.
            if state.left is not None:
                links = None
                if state.rule is not None and state.rule.name == "graph":
                    # Each propagated token's receivers, weights G[K, r] normalised (zero without a kept neighbour).
                    received = weights.transpose(1, 2)
                    received = received / received.sum(dim=-1, keepdim=True).clamp(min=1e-12)
                    links = torch.cat([received.new_zeros(batch, amount, num_prefix), received], dim=2)
                state = depart(state, index, propagated_index, links)
            best, receiver = weights.max(dim=1)
            receiver = torch.where(best > 0, receiver + num_prefix, torch.full_like(receiver, -1))
            destination = kept_destination(index, num_tokens).scatter_(1, propagated_index, receiver)
            owner = remap_owner(owner, destination)

        return state.replace(x=x_new, size=size, owner=owner, extras={**state.extras, ALIVE_KEY: alive_next})

    @staticmethod
    def _propagate(t: torch.Tensor, index: torch.Tensor, propagated_index: torch.Tensor, scaled: torch.Tensor,
                   num_prefix: int) -> torch.Tensor:
        """``t[K] + scaled @ t[R]`` for the kept tokens ``index`` (prefix first, which receive nothing)."""
        out = gather_tokens(t, index)
        # bmm then add (not baddbmm_, which FlopCounterMode does not see; the difference is one pass over t[K]).
        out[:, num_prefix:].add_(as_dtype(scaled, t.dtype) @ gather_tokens(t, propagated_index))
        return out

    # --- cost -----------------------------------------------------------------------------------
    def overhead_macs(self, plan: Plan, dim: int, heads: int, num_prefix: int) -> float:
        """Semantic graph n0^2 * D, propagation (n - r) * r * D per block (+ (n - r) * r for the sizes),
        and for ``cls_attn`` selection the CLS row N * D beside the fused attention."""
        if not any(plan.amounts):
            return 0.0
        macs = 0
        if self.graph != "spatial":
            n0 = plan.tokens_in[0] - num_prefix
            macs += n0 * n0 * dim
        width = dim + (1 if self.token_scale else 0)
        for n_in, amount in zip(plan.tokens_in, plan.amounts, strict=True):
            if amount:
                macs += (n_in - num_prefix - amount) * amount * width
                if self.selection == "cls_attn" and self.sparsity >= 1.0:
                    macs += n_in * dim
        return float(macs)

    def diagnostics(self, states: list[TokenState]) -> dict[str, Any]:
        """``{"image_tokens": n0, "graph_edges": mean edges per image}`` of the graph built in a traced pass."""
        graph = states[-1].extras.get(GRAPH_KEY) if states else None
        if graph is None:
            return {}
        return {"image_tokens": int(graph.shape[-1]), "graph_edges": float((graph > 0).sum(dim=(1, 2)).float().mean())}

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "options": dict(self.options),
            "graph": self.graph,
            "k": self.k,
            "alpha": self.alpha,
            "selection": self.selection,
            "token_scale": self.token_scale,
            "sparsity": self.sparsity,
            "seed": self.seed,
            "map": self.map,
        }
