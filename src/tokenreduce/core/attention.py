"""Multi-head attention, self or cross, that adds the log-size bias and returns exactly the statistics asked for.

One stateless kernel (like ``torch.nn.functional``) for every attention the library runs: the ViT adapter's
blocks (self-attention), STViT's generation and recovery layers (queries from one token set, keys and values
from another) and the Swin semantic blocks. The module passed in only supplies weights, read by name:

- projections: a fused ``qkv`` Linear (timm's ``Attention``, Swin's ``WindowAttention``) or separate ``q`` and
  ``kv`` Linears; with a fused ``qkv`` and a separate ``context`` its weight is split into the q and kv thirds;
- ``num_heads``, ``scale``, ``proj``, ``attn_drop``, ``proj_drop``; optional ``q_norm``, ``k_norm`` (qk-norm),
  ``norm`` (scale-norm), ``gate``, ``fused_attn`` (default True).

Statistics a method may ask for (by name; over the key tokens, from the queries):

- ``"metric"``: the keys averaged over heads, ``B x N x d_head`` (ToMe's similarity metric).
- ``"cls_attn"``: post-softmax attention of the CLS query, ``B x H x N``; for a model without a CLS
  token, the mean over all query rows (the column sums over N, made chunk by chunk as ``"col_sum"``).
- ``"value_norm"``: L2 norm of every token's value vector, heads concatenated, ``B x N``.
- ``"col_sum"``: post-softmax attention summed over the queries, per head, ``B x H x N`` (GTP's selection).
- ``"diag"``: the diagonal of the post-softmax map (each token's attention to itself), per head, ``B x H x N``.
- ``"attn"``: the full post-softmax map, ``B x H x N x N`` (forces the unfused path).

Every statistic is computed in float32 with autocast off, from the model's (possibly bfloat16 / float16) queries,
keys and values (``core/precision.py``): methods rank and threshold them, and bf16 would turn near-ties into
ties. The output stays in the model's dtype. In float32 without autocast nothing changes.

Where no full map is needed the output uses ``F.scaled_dot_product_attention`` (the fused kernel) with the
size bias as an additive float mask, and the CLS row is its own small product ``q_cls . K^T``.

``"col_sum"`` and ``"diag"`` are read from the map a few images at a time (:func:`map_statistics`): the
``B x H x N x N`` map of the whole batch never exists. On CPU the output comes from the same chunks (at
DeiT-S sizes a cache-sized chunk of the unfused arithmetic is faster than the fused kernel plus a second
pass for the statistics); elsewhere it comes from the fused kernel and the chunks only make the statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .precision import at_least_float32, decide

STATISTICS = frozenset({"metric", "cls_attn", "value_norm", "attn", "col_sum", "diag"})
#: Statistics read from the post-softmax map, which ``map_statistics`` computes chunk by chunk.
MAP_STATISTICS = frozenset({"col_sum", "diag"})
#: Statistics a method ranks or thresholds that come from the post-softmax map: computed in float32.
MAP_DECISIONS = frozenset({"attn", "cls_attn", "col_sum", "diag"})
#: Elements of the map held at once by ``map_statistics`` (4 MiB in float32: a few images at DeiT-S sizes).
MAP_CHUNK_ELEMENTS = 1 << 20
#: How ``map_statistics`` produces the output: "chunked" (from the chunks of the map) or "fused" (from
#: ``scaled_dot_product_attention``); "auto" takes "chunked" on CPU and "fused" on accelerators.
MAP_KERNELS = ("auto", "chunked", "fused")



def exporting() -> bool:
    """Whether ``torch.export`` (hence ``tr.export_onnx``) or TorchScript (OpenVINO's direct conversion) is
    tracing; torch < 2.6 has no ``is_exporting`` flag."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting()) or torch.jit.is_tracing()


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without dispatching an op when ``t`` has that dtype already (the same tensor either way)."""
    return t if t.dtype == dtype else t.to(dtype)


def diagonal_of(probs: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The entries ``(i, i + offset)`` of the last two axes of ``probs`` (``... x rows x N``), as ``... x rows``.

    A view (``Tensor.diagonal``, one op) in eager and compiled code; a gather while exporting: the same values, and
    OpenVINO's TorchScript frontend (its direct conversion of a patched model) has no ``aten::diagonal``.

    >>> diagonal_of(torch.arange(9.0).view(1, 3, 3)).tolist()
    [[0.0, 4.0, 8.0]]
    """
    rows = probs.shape[-2]
    if not exporting():
        return probs.diagonal(offset=offset, dim1=-2, dim2=-1)
    index = torch.arange(offset, offset + rows, device=probs.device).view(rows, 1)
    return probs.gather(-1, index.expand(*probs.shape[:-1], 1)).squeeze(-1)

def _add_bias(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return logits if bias is None else logits + bias


def _maybe(module: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    fn = getattr(module, name, None)
    return t if fn is None else fn(t)


def project(attn: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries from ``x`` (``B x N x C``), keys and values from ``context`` (``B x M x C``; ``x`` when None),
    each ``B x H x tokens x d_head``, after qk-norm.

    >>> from timm.layers import Attention
    >>> attn = Attention(8, num_heads=2)
    >>> x = torch.randn(1, 3, 8)
    >>> q, k, v = project(attn, x)
    >>> q2, k2, v2 = project(attn, x[:, :1], context=x)  # the fused qkv weight split into q and kv
    >>> tuple(q2.shape), tuple(k2.shape), torch.allclose(q2, q[:, :, :1], atol=1e-6)
    ((1, 2, 1, 4), (1, 2, 3, 4), True)
    """
    batch, num_q, _ = x.shape
    heads = attn.num_heads
    qkv = getattr(attn, "qkv", None)
    # Explicit head widths, not -1: an empty batch (0 elements) cannot infer them.
    if qkv is not None and (context is None or context is x):  # self-attention: one fused projection
        head_dim = qkv.out_features // (3 * heads)
        q, k, v = qkv(x).reshape(batch, num_q, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        context = x if context is None else context
        if qkv is not None:
            width = qkv.out_features // 3
            bias_q, bias_kv = (None, None) if qkv.bias is None else (qkv.bias[:width], qkv.bias[width:])
            q, kv = F.linear(x, qkv.weight[:width], bias_q), F.linear(context, qkv.weight[width:], bias_kv)
        else:
            q, kv = attn.q(x), attn.kv(context)
        q = q.reshape(batch, num_q, heads, q.shape[-1] // heads).transpose(1, 2)
        k, v = kv.reshape(batch, context.shape[1], 2, heads, kv.shape[-1] // (2 * heads)).permute(
            2, 0, 3, 1, 4).unbind(0)
    return _maybe(attn, "q_norm", q), _maybe(attn, "k_norm", k), v


def _map_chunk(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """The post-softmax map of some images, float32 (a method reads or thresholds it), with the reference path's
    exact arithmetic; ``bias`` float32 too."""
    with decide(q):
        logits = (at_least_float32(q) * scale) @ at_least_float32(k).transpose(-2, -1)
        if bias is not None:
            logits += bias  # in place: one B x H x N x N buffer less (matmul keeps its inputs only)
        return logits.softmax(dim=-1)


def attention_map(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """The post-softmax map ``softmax(q k^T * scale + bias)`` in float32 whatever the dtype of ``q`` and ``k``
    (autocast off): the map a method reads or thresholds, as every adapter makes it.

    >>> q = k = torch.zeros(1, 1, 2, 4, dtype=torch.bfloat16)
    >>> attention_map(q, k, 0.5).dtype, attention_map(q, k, 0.5)[0, 0, 0].tolist()
    (torch.float32, [0.5, 0.5])
    """
    return _map_chunk(q, k, scale, None if bias is None else at_least_float32(bias))


def map_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    size_bias: torch.Tensor | None = None,
    need: Collection[str] = MAP_STATISTICS,
    kernel: str = "auto",
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The attention output and the map statistics ``"col_sum"`` / ``"diag"`` (``B x H x N`` each) without the
    whole ``B x H x N x N`` map: it is made for a few images at a time (a few query rows of one image when a
    single image's map is larger), at most ``chunk_elements`` entries (default ``MAP_CHUNK_ELEMENTS``).

    ``kernel="chunked"`` takes the output from the same chunks (``probs @ v``, the reference arithmetic);
    ``"fused"`` from ``F.scaled_dot_product_attention``, the chunks then only make the statistics; ``"auto"``:
    chunked on CPU, fused elsewhere. Under ``torch.compile`` or export (``torch.export``, TorchScript tracing) the
    whole batch is one chunk (the compiler fuses it; a loop over the batch would unroll for the example's batch).

    >>> q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    >>> out, stats = map_statistics(q, k, v, 0.5, chunk_elements=50)  # one image (2 x 5 x 5) per chunk
    >>> probs = ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1)
    >>> torch.allclose(stats["col_sum"], probs.sum(-2)), torch.allclose(out, probs @ v, atol=1e-6)
    (True, True)
    """
    if kernel not in MAP_KERNELS:
        raise InputError(f"unknown map kernel {kernel!r}; known: {', '.join(MAP_KERNELS)}")
    if kernel == "auto":
        kernel = "chunked" if q.device.type == "cpu" else "fused"
    batch, heads, num_q, _ = q.shape
    num_k = k.shape[2]
    bias = None if size_bias is None else as_dtype(size_bias, q.dtype)
    bias32 = None if size_bias is None else at_least_float32(size_bias)  # the map's bias, float32 like the map
    budget = MAP_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    if torch.compiler.is_compiling() or exporting() or batch * heads * num_q * num_k <= budget:
        # One chunk: the reference arithmetic as it is (the compiler fuses it; a Python loop would unroll).
        probs = _map_chunk(q, k, scale, bias32)
        out = as_dtype(probs, v.dtype) @ v if kernel == "chunked" else None
        stats = {}
        if "col_sum" in need:
            stats["col_sum"] = probs.sum(dim=-2)
        if "diag" in need:
            stats["diag"] = diagonal_of(probs)
    else:
        # A few images per chunk; when one image's map alone is over the budget (video, large images), a few
        # of its query rows per chunk, the column sums then added up over the row blocks.
        images = max(1, budget // (heads * num_q * num_k))
        query_rows = num_q if images > 1 else max(1, budget // (heads * num_k))
        out = q.new_empty(*q.shape[:3], v.shape[-1]) if kernel == "chunked" else None
        columns = q.new_zeros(batch, heads, num_k, dtype=torch.float32) if "col_sum" in need else None
        diagonal = q.new_empty(batch, heads, num_q, dtype=torch.float32) if "diag" in need else None
        for first in range(0, batch, images):
            part = slice(first, first + images)
            for row in range(0, num_q, query_rows):
                rows = slice(row, row + query_rows)
                probs = _map_chunk(q[part, :, rows], k[part], scale, None if bias32 is None else bias32[part])
                if out is not None:
                    out[part, :, rows] = as_dtype(probs, v.dtype) @ v[part]
                if columns is not None:
                    columns[part] += probs.sum(dim=-2)
                if diagonal is not None:  # the entries (i, i) of these rows: the block's diagonal at offset row
                    diagonal[part, :, rows] = diagonal_of(probs, offset=row)
        stats = {name: t for name, t in (("col_sum", columns), ("diag", diagonal)) if t is not None}
    if out is None:
        default = scale == q.shape[-1] ** -0.5
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=None if default else scale)
    return out, stats


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    size_bias: torch.Tensor | None = None,
    need: Collection[str] = (),
    has_cls: bool = True,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fused: bool = True,
    dropout: float = 0.0,
    attn_drop: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The attention arithmetic on projected heads: ``q`` ``B x H x N x d``, ``k``/``v`` ``B x H x M x d``;
    returns the per-head output ``B x H x N x d`` and the statistics asked for (see the module doc). What every
    model family's adapter calls after its own projections (timm's fused ``qkv``, Hugging Face's separate
    ``query``/``key``/``value``, ``nn.MultiheadAttention``'s ``in_proj``).

    ``fused`` uses ``F.scaled_dot_product_attention`` where no full map is needed (``dropout`` is its dropout
    probability); otherwise the map is computed and ``attn_drop`` (a module or function) applied to it.

    >>> q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    >>> out, stats = attend(q, k, v, 8 ** -0.5, need=("cls_attn",))
    >>> tuple(out.shape), tuple(stats["cls_attn"].shape)
    ((1, 2, 4, 8), (1, 2, 4))
    """
    need = frozenset(need)
    unknown = need - STATISTICS
    if unknown:
        raise InputError(f"unknown attention statistics {sorted(unknown)}; known: {sorted(STATISTICS)}")
    bias = None if size_bias is None else as_dtype(size_bias, q.dtype)
    stats: dict[str, torch.Tensor] = {}
    # The keys the CLS row and the metric rank by, upcast once (k itself in float32; unused otherwise).
    k32 = at_least_float32(k) if "metric" in need or ("cls_attn" in need and has_cls) else k

    # Without a CLS token the "CLS row" is the mean of all rows: the column sums over N, which the map's chunks
    # make (``map_statistics``) with the output, so the B x H x N x N map never exists whole (video: 1,568 tokens).
    mean_row = "cls_attn" in need and not has_cls
    map_need = need & MAP_STATISTICS | ({"col_sum"} if mean_row else set())
    full_map = ("attn" in need or transform is not None or not fused
                or (dropout > 0 and bool(map_need)))  # the chunks apply no dropout
    if full_map:
        # A map a method reads (or thresholds, GTP's sparsification) is made in float32; otherwise in the
        # model's dtype, as the model itself would.
        if bool(need & MAP_DECISIONS) or transform is not None:
            probs = _map_chunk(q, k, scale, None if size_bias is None else at_least_float32(size_bias))
        else:
            logits = (q * scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits += bias  # in place: one B x H x N x N buffer less per block (matmul keeps its inputs only)
            probs = logits.softmax(dim=-1)
        if transform is not None:
            probs = transform(probs)
        if "attn" in need:
            stats["attn"] = probs
        if "col_sum" in need:
            stats["col_sum"] = probs.sum(dim=-2)
        if "diag" in need:
            stats["diag"] = diagonal_of(probs)
        if "cls_attn" in need:
            stats["cls_attn"] = probs[:, :, 0] if has_cls else probs.mean(dim=2)
        out = as_dtype(probs if attn_drop is None else attn_drop(probs), v.dtype) @ v
    else:
        if map_need:
            out, stats = map_statistics(q, k, v, scale, size_bias, map_need)
            if mean_row:  # the mean over the query rows, as probs.mean(dim=2) divides their sum
                column = stats["col_sum"] if "col_sum" in need else stats.pop("col_sum")
                stats["cls_attn"] = column / q.shape[2]
        else:
            # The default scale is passed as None, so the kernel runs exactly as in the models we patch.
            default = scale == q.shape[-1] ** -0.5
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout,
                                                 scale=None if default else scale)
        if "cls_attn" in need and has_cls:
            with decide(q):
                row = _add_bias((at_least_float32(q[:, :, :1]) * scale) @ k32.transpose(-2, -1),
                                None if bias is None else at_least_float32(size_bias))
                stats["cls_attn"] = row.softmax(dim=-1)[:, :, 0]
    if "metric" in need:
        stats["metric"] = k32.mean(dim=1)
    if "value_norm" in need:
        with decide(v):
            stats["value_norm"] = at_least_float32(v).transpose(1, 2).flatten(2).norm(dim=-1)
    return out, stats


def attention(
    attn: nn.Module,
    x: torch.Tensor,
    size_bias: torch.Tensor | None = None,
    need: Collection[str] = (),
    has_cls: bool = True,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    context: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Attention from the queries ``x`` (``B x N x C``) to ``context`` (``B x M x C``; None: ``x`` itself,
    self-attention), with an optional log-size bias on the keys.

    Args:
        attn: the module holding the weights (see the module doc): a timm ``Attention``, or any module with
            ``q`` and ``kv`` Linears (STViT's cross attention).
        size_bias: ``B x 1 x 1 x M`` added to the logits of every query (log of the key tokens' sizes).
        need: names of the statistics to return (see the module doc).
        has_cls: whether query 0 is a CLS token (for ``cls_attn``).
        transform: applied to the full post-softmax map before it is used (e.g. GTP's sparsification);
            implies the unfused path.
        context: the key/value input; None for self-attention.

    Returns:
        The projected attention output (``B x N x C``) and a dict with the statistics asked for.
    """
    batch, num_q, _ = x.shape
    q, k, v = project(attn, x, context)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out, stats = attend(q, k, v, attn.scale, size_bias, need, has_cls, transform,
                        fused=getattr(attn, "fused_attn", True), dropout=dropout, attn_drop=attn.attn_drop)
    out = _maybe(attn, "norm", out.transpose(1, 2).flatten(2))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), stats
