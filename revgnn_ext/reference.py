"""Pure-PyTorch versions of every op, with the same signatures as ``revgnn_ext.ops``.

Written for clarity, not speed: they materialize per-edge tensors. They are the oracle the
tests compare the kernels against.
"""
from typing import Optional

import torch
from torch import Tensor

from .graph import CSRGraph

__all__ = ["spmm", "spmm_accumulate_", "gen_aggregate", "rev_subtract_"]

REDUCES = ("sum", "mean", "max", "min")


def _destinations(graph: CSRGraph) -> Tensor:
    """The destination of each CSR edge."""
    return torch.repeat_interleave(torch.arange(graph.num_dst, device=graph.device),
                                   (graph.rowptr[1:] - graph.rowptr[:-1]).long())


def spmm(graph: CSRGraph, x: Tensor, edge_weight: Optional[Tensor] = None, reduce: str = "sum") -> Tensor:
    """out[i] = reduce over in-edges j -> i of w_ji * x[j]; rows with no in-edges give 0.
    ``edge_weight`` is in the caller's edge order."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    dst = _destinations(graph)
    messages = x.index_select(0, graph.col.long())
    if edge_weight is not None:
        messages = messages * graph.edges_to_csr(edge_weight, "edge_weight").unsqueeze(-1)
    torch_reduce = {"sum": "sum", "mean": "mean", "max": "amax", "min": "amin"}[reduce]
    return _scatter(messages, dst, graph.num_dst, torch_reduce)


def _scatter(messages: Tensor, dst: Tensor, num_dst: int, reduce: str) -> Tensor:
    """out[i] = reduce over the messages of destination i; 0 for a destination with none. The
    untouched start value of amax/amin is +-inf, so that its gradient never ties with a message."""
    start = {"amax": float("-inf"), "amin": float("inf")}.get(reduce, 0.0)
    out = messages.new_full((num_dst, messages.size(1)), start)
    index = dst.unsqueeze(-1).expand_as(messages)
    out = out.scatter_reduce(0, index, messages, reduce, include_self=False)
    if reduce in ("amax", "amin"):
        has_edge = torch.zeros(num_dst, dtype=torch.bool, device=out.device)
        has_edge[dst] = True
        out = torch.where(has_edge.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def spmm_accumulate_(out: Tensor, graph: CSRGraph, x: Tensor, edge_weight: Optional[Tensor] = None,
                     reduce: str = "sum", alpha: float = 1.0) -> Tensor:
    """out += alpha * spmm(graph, x, edge_weight, reduce), in place; returns out."""
    return out.add_(spmm(graph, x, edge_weight, reduce), alpha=alpha)


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
    dst = _destinations(graph)
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
        return _scatter(m, dst, graph.num_dst, {"sum": "sum", "mean": "mean", "max": "amax"}[aggr])
    if aggr == "softmax":
        score = m * t
        shift = zeros.scatter_reduce(0, index, score.detach(), "amax", include_self=False)
        weight = (score - shift[dst]).exp()
        weight = weight / (zeros.scatter_add(0, index, weight)[dst] + 1e-16)
        return zeros.scatter_add(0, index, m * weight)
    q = m.clamp(1e-4, 100.0).pow(p)
    r = zeros.scatter_reduce(0, index, q, "mean", include_self=False)
    return r.clamp(1e-4, 100.0).pow(1.0 / p)


def rev_subtract_(y: Tensor, f: Tensor, group: int, num_groups: int, sum_out: Optional[Tensor] = None) -> None:
    """y_group -= f in place (y_j = y[:, j*c:(j+1)*c], c = D // num_groups); then, with sum_out,
    sum_out = y_1 + ... + y_{C-1} over the updated values, added in this order in float32 for
    float16/bfloat16 and rounded once."""
    c = y.size(1) // num_groups
    groups = [y[:, j * c:(j + 1) * c] for j in range(num_groups)]
    groups[group].sub_(f)
    if sum_out is not None:
        total = groups[1].to(torch.promote_types(y.dtype, torch.float32))
        for j in range(2, num_groups):
            total = total + groups[j]
        sum_out.copy_(total)
