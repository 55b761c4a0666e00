"""Pure-PyTorch versions of every op, with the same signatures as ``revgnn_ext.ops``.

Written for clarity, not speed: they materialize per-edge tensors. They are the oracle the
tests compare the kernels against.
"""
from typing import Optional

import torch
from torch import Tensor

from .graph import CSRGraph

__all__ = ["spmm", "spmm_accumulate_", "gen_aggregate"]

REDUCES = ("sum", "mean", "max", "min")


def spmm(graph: CSRGraph, x: Tensor, edge_weight: Optional[Tensor] = None, reduce: str = "sum") -> Tensor:
    """out[i] = reduce over in-edges j -> i of w_ji * x[j]; rows with no in-edges give 0.
    ``edge_weight`` is in the caller's edge order."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    dst = torch.repeat_interleave(torch.arange(graph.num_dst, device=x.device),
                                  (graph.rowptr[1:] - graph.rowptr[:-1]).long())
    messages = x.index_select(0, graph.col.long())
    if edge_weight is not None:
        messages = messages * graph.edges_to_csr(edge_weight, "edge_weight").unsqueeze(-1)
    out = x.new_zeros(graph.num_dst, x.size(1))
    torch_reduce = {"sum": "sum", "mean": "mean", "max": "amax", "min": "amin"}[reduce]
    index = dst.unsqueeze(-1).expand_as(messages)
    return out.scatter_reduce(0, index, messages, torch_reduce, include_self=False)


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
    powermean follow PyG's SoftmaxAggregation and PowerMeanAggregation (clamps included).
    Per-edge tensors are in the caller's edge order."""
    if aggr not in GEN_AGGRS:
        raise ValueError(f"aggr must be one of {GEN_AGGRS}, got {aggr!r}")
    dst = torch.repeat_interleave(torch.arange(graph.num_dst, device=x.device),
                                  (graph.rowptr[1:] - graph.rowptr[:-1]).long())
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
        return zeros.scatter_reduce(0, index, m, {"sum": "sum", "mean": "mean", "max": "amax"}[aggr],
                                    include_self=False)
    if aggr == "softmax":
        score = m * t
        shift = zeros.scatter_reduce(0, index, score.detach(), "amax", include_self=False)
        weight = (score - shift[dst]).exp()
        weight = weight / (zeros.scatter_add(0, index, weight)[dst] + 1e-16)
        return zeros.scatter_add(0, index, m * weight)
    q = m.clamp(1e-4, 100.0).pow(p)
    r = zeros.scatter_reduce(0, index, q, "mean", include_self=False)
    return r.clamp(1e-4, 100.0).pow(1.0 / p)
