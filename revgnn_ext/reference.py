"""Pure-PyTorch versions of every op, with the same signatures as ``revgnn_ext.ops``.

Written for clarity, not speed: they materialize per-edge tensors. They are the oracle the
tests compare the kernels against.
"""
from typing import Optional

import torch
from torch import Tensor

from .graph import CSRGraph

__all__ = ["spmm", "spmm_accumulate_"]

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
