"""Pure-PyTorch versions of every op, with the same signatures as ``revgnn_ext.ops``.

Written for clarity, not speed: they materialize per-edge tensors. They are the oracle the
tests compare the kernels against.
"""
from typing import Optional

import torch
from torch import Tensor

from .graph import CSRGraph

__all__ = ["spmm", "gen_aggregate", "gat_aggregate", "gat_dropout_keep"]

REDUCES = ("sum", "mean", "max", "min")


def spmm(graph: CSRGraph, x: Tensor, edge_weight: Optional[Tensor] = None, reduce: str = "sum",
         out: Optional[Tensor] = None, alpha: float = 1.0) -> Tensor:
    """result[i] = reduce over in-edges j -> i of w_ji * x[j]; rows with no in-edges give 0.
    ``edge_weight`` is in the caller's edge order. With ``out``: out += alpha * result, in place,
    and out is returned."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    dst = graph.destinations()
    messages = x.index_select(0, graph.col.long())
    if edge_weight is not None:
        messages = messages * graph.edges_to_csr(edge_weight, "edge_weight").unsqueeze(-1)
    return _added(out, _scatter(messages, dst, graph.num_dst, reduce), alpha)


def _added(out: Optional[Tensor], result: Tensor, alpha: float) -> Tensor:
    return result if out is None else out.add_(result, alpha=alpha)


def _scatter(messages: Tensor, dst: Tensor, num_dst: int, reduce: str) -> Tensor:
    """out[i] = reduce (sum, mean, max, min) over the messages of destination i; 0 for one with
    none. The untouched start of max/min is -+inf, so that its gradient never ties with a message."""
    start = {"max": float("-inf"), "min": float("inf")}.get(reduce, 0.0)
    out = messages.new_full((num_dst, messages.size(1)), start)
    index = dst.unsqueeze(-1).expand_as(messages)
    out = out.scatter_reduce(0, index, messages, {"max": "amax", "min": "amin"}.get(reduce, reduce), include_self=False)
    if reduce in ("max", "min"):
        has_edge = torch.zeros(num_dst, dtype=torch.bool, device=out.device)
        has_edge[dst] = True
        out = torch.where(has_edge.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


GEN_AGGRS = ("softmax", "max", "mean", "sum", "powermean")


def gen_aggregate(graph: CSRGraph, x: Tensor, edge_attr: Optional[Tensor] = None,
                  edge_weight: Optional[Tensor] = None, edge_bias: Optional[Tensor] = None,
                  aggr: str = "softmax", t=1.0, p=1.0, eps: float = 1e-7) -> Tensor:
    """GENConv's aggregation, as PyG computes it: per in-edge j -> i, the message
    m = relu(x[j] + e_ji) + eps with e = edge_attr @ edge_weight.T + edge_bias (or edge_attr
    itself without edge_weight, or 0 without edge_attr), then AGG over j of m. Softmax and
    powermean follow PyG's SoftmaxAggregation and PowerMeanAggregation (clamps included, and a
    plain number p == 1 taken as a plain mean).
    Per-edge tensors are in the caller's edge order."""
    if aggr not in GEN_AGGRS:
        raise ValueError(f"aggr must be one of {GEN_AGGRS}, got {aggr!r}")
    if aggr == "powermean" and not isinstance(p, Tensor) and p == 1:
        aggr = "mean"  # as PyG's PowerMeanAggregation: no power and no clamps for a fixed p = 1
    dst = graph.destinations()
    msg = x.index_select(0, graph.col.long())
    if edge_attr is not None:
        emb = graph.edges_to_csr(edge_attr, "edge_attr")
        if edge_weight is not None:
            emb = torch.nn.functional.linear(emb, edge_weight, edge_bias)
        msg = msg + emb
    m = msg.relu() + eps
    index = dst.unsqueeze(-1).expand_as(m)
    zeros = x.new_zeros(graph.num_dst, x.size(1))
    if aggr in ("sum", "mean", "max"):
        return _scatter(m, dst, graph.num_dst, aggr)
    if aggr == "softmax":
        score = m * t
        shift = zeros.scatter_reduce(0, index, score.detach(), "amax", include_self=False)
        weight = (score - shift[dst]).exp()
        weight = weight / (zeros.scatter_add(0, index, weight)[dst] + 1e-16)
        return zeros.scatter_add(0, index, m * weight)
    q = m.clamp(1e-4, 100.0).pow(p)
    r = zeros.scatter_reduce(0, index, q, "mean", include_self=False)
    return r.clamp(1e-4, 100.0).pow(1.0 / p)


# ---------------------------------------------------------------------------- GAT attention
_MASK32 = 0xFFFFFFFF


def _mul32(a: Tensor, c: int) -> Tensor:
    """(a * c) mod 2^32 for int64 ``a`` in [0, 2^32) and a constant c < 2^32, without int64
    overflow: a = hi * 2^16 + lo, so a * c = lo * c + ((hi * c) mod 2^16) * 2^16 (mod 2^32)."""
    return ((a & 0xFFFF) * c + (((a >> 16) * c & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer mixer (C: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
    x *= 0x846ca68b; x ^= x >> 16, in uint32_t), on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gat_dropout_keep(seed: int, edge_ids: Tensor, heads: int, p: float) -> Tensor:
    """The attention-dropout draw of ``gat_aggregate``: keep[k, h] (bool [len(edge_ids), heads])
    for edge ``edge_ids[k]`` (its position in the caller's edge order) and head h, a pure function
    of (seed, edge id, head, p), so that any recomputation replays it without a stored mask.

    In uint32 arithmetic (wrapping; mix32 as in ``_mix32``), with s = seed mod 2^64 and e the edge id:

        k = mix32(mix32(s & 0xffffffff) ^ (s >> 32))                  (once per call)
        r = mix32(mix32(mix32(k ^ (e & 0xffffffff)) ^ (e >> 32)) ^ h)  (per edge and head)
        keep  <=>  r >= floor(p * 2^32)   (p * 2^32 evaluated in double, exact)

    so a fraction p of the (edge, head) pairs is dropped (all of them at p = 1)."""
    seed &= 2**64 - 1
    words = torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64, device=edge_ids.device)
    key = _mix32(_mix32(words[:1]) ^ words[1:])
    e = edge_ids.long()
    r = _mix32(_mix32(key ^ (e & _MASK32)) ^ (e >> 32))
    r = _mix32(r.unsqueeze(-1) ^ torch.arange(heads, device=e.device))
    return r >= int(p * 4294967296.0)


def gat_aggregate(graph: CSRGraph, x: Tensor, src_score: Tensor, dst_score: Optional[Tensor] = None,
                  edge_attr: Optional[Tensor] = None, edge_weight: Optional[Tensor] = None,
                  negative_slope: float = 0.2, edge_keep: Optional[Tensor] = None, attn_dropout: float = 0.0,
                  seed: int = 0, out: Optional[Tensor] = None, alpha: float = 1.0) -> Tensor:
    """GAT's attention and aggregation (PyG's GATConv after its projections), H heads of C channels.

    Inputs: x [num_src, H*C] (head h in columns h*C .. (h+1)*C, PyG's ``view(-1, H, C)``);
    src_score [num_src, H]; dst_score [num_dst, H] or None (no destination term); edge_attr
    [num_edges, F] raw edge features with edge_weight [H, F] (PyG's lin_edge weight [H*C, F] and
    att_edge [1, H, C] folded into one map: edge_weight[h] = sum_c att_edge[0, h, c] *
    lin_edge.weight[h*C + c]), or edge_attr [num_edges, H] edge scores themselves without
    edge_weight, or None; edge_keep: bool [num_edges] or None (all kept). Per-edge tensors are in
    the caller's edge order. Per destination i and head h, over the kept in-edges j -> i (edge id k):

        a_kh  = leaky_relu(src_score[j, h] + dst_score[i, h] + e_kh, negative_slope),
                e = edge_attr @ edge_weight.T  (edge_attr itself without edge_weight; 0 without edge_attr)
        alpha = softmax over the kept in-edges of i of a_kh
        out[i, h*C:(h+1)*C] = sum_j drop(alpha_kh) * x[j, h*C:(h+1)*C]

    Rows with no kept in-edge give 0. drop(alpha) = alpha * keep_kh / (1 - p) with keep =
    ``gat_dropout_keep(seed, k, H, p)``, p = attn_dropout (drop(alpha) = alpha at p = 0; 0 at
    p = 1), k the edge's position in the caller's order (edge ids do not change when edge_keep
    drops edges). Returns [num_dst, H*C] of x's dtype; with ``out`` (possibly a column slice of a
    wider buffer), out += alpha * that, in place, and out."""
    heads = src_score.size(1)
    dst = graph.destinations()
    src = graph.col.long()
    edge_ids = graph.perm.long() if graph.perm is not None else torch.arange(graph.num_edges, device=graph.device)
    score = src_score.index_select(0, src)
    if dst_score is not None:
        score = score + dst_score.index_select(0, dst)
    if edge_attr is not None:
        e = graph.edges_to_csr(edge_attr, "edge_attr")
        score = score + (e if edge_weight is None else e @ edge_weight.T)
    score = torch.nn.functional.leaky_relu(score, negative_slope)
    if edge_keep is not None:
        kept = graph.edges_to_csr(edge_keep, "edge_keep")
        dst, src, edge_ids, score = dst[kept], src[kept], edge_ids[kept], score[kept]
    shift = _scatter(score.detach(), dst, graph.num_dst, "max")
    weight = (score - shift.index_select(0, dst)).exp()
    weight = weight / _scatter(weight, dst, graph.num_dst, "sum").index_select(0, dst)
    if attn_dropout > 0:
        keep = gat_dropout_keep(seed, edge_ids, heads, attn_dropout)
        weight = weight * keep / (1 - attn_dropout) if attn_dropout < 1 else weight * 0
    messages = weight.unsqueeze(-1) * x.reshape(x.size(0), heads, x.size(1) // heads).index_select(0, src)
    return _added(out, _scatter(messages.reshape(messages.size(0), x.size(1)), dst, graph.num_dst, "sum"), alpha)
