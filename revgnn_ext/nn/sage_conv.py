"""SAGEConv on the fused spmm op (no [num_edges, channels] message tensor)."""
from typing import Optional, Tuple, Union

import torch.nn.functional as F
import torch_geometric.nn as pyg_nn
from torch import Tensor
from torch_geometric.nn import aggr as pyg_aggr
from torch_geometric.typing import OptPairTensor

from .. import ops
from ..adjacency import as_graph
from ._pyg import PygFallback, coalesced, edge_values, node_counts, pyg_adjacency


class SAGEConv(PygFallback, pyg_nn.SAGEConv):
    """A drop-in for ``torch_geometric.nn.SAGEConv`` (same arguments, submodules, ``state_dict``,
    ``repr``) whose neighbourhood aggregation runs in revgnn_ext's ``spmm`` (sum, mean, max,
    min; deterministic, no per-edge tensor). ``edge_index`` may be anything
    ``revgnn_ext.adjacency.as_graph`` accepts; it is converted once per adjacency object. Other
    aggregations, ``flow='target_to_source'``, an explainer's edge masks and message-passing hooks
    fall back to PyG's computation with a one-time warning."""

    # The arguments of PyG's propagate(), which PyG otherwise reads off the source of forward().
    propagate_type = {"x": OptPairTensor}
    _fused_reduces = {pyg_aggr.SumAggregation: "sum", pyg_aggr.MeanAggregation: "mean",
                      pyg_aggr.MaxAggregation: "max", pyg_aggr.MinAggregation: "min"}

    def forward(self, x: Union[Tensor, Tuple[Tensor, Optional[Tensor]]], edge_index,
                size: Optional[Tuple[int, int]] = None) -> Tensor:
        reduce = self._fused_aggregation()
        if reduce is None:
            adj, size = pyg_adjacency(edge_index, x, size)
            return super().forward(x, adj, size)
        if isinstance(x, Tensor):
            x = (x, x)
        x_src, x_dst = x
        if self.project and hasattr(self, "lin"):
            x_src = self.lin(x_src).relu()
        edge_index = coalesced(edge_index)
        graph = as_graph(edge_index, node_counts(x_src, x_dst, size, edge_index))
        # A torch.sparse adjacency's values weight the messages, as in PyG (which drops a SparseTensor's).
        weight = edge_values(edge_index) if isinstance(edge_index, Tensor) else None
        out = self.lin_l(ops.spmm(graph, x_src, None if weight is None else weight.to(x_src.dtype), reduce))
        if self.root_weight and x_dst is not None:
            out = out + self.lin_r(x_dst)
        if self.normalize:
            out = F.normalize(out, p=2.0, dim=-1)
        return out
