"""GENConv (DeeperGCN) on the fused gen_aggregate op: no [num_edges, channels] tensor."""
from typing import Optional, Tuple, Union

import torch
import torch_geometric.nn as pyg_nn
from torch import Tensor
from torch_geometric.nn import aggr as pyg_aggr
from torch_geometric.typing import OptPairTensor, OptTensor

from .. import ops
from ..graph import CSRGraph, as_graph
from ._pyg import PygFallback, edge_values, node_counts, pyg_adjacency, warn_once


class GENConv(PygFallback, pyg_nn.GENConv):
    """A drop-in for ``torch_geometric.nn.GENConv`` (same arguments, defaults, submodules,
    parameters, ``state_dict`` and ``repr``) whose message construction and aggregation run
    in revgnn_ext's fused ``gen_aggregate``: the edge embedding ``lin_edge(edge_attr)`` is
    applied inside the kernel to the raw edge features, and softmax, max, mean, sum and
    powermean aggregations keep O(num_nodes x channels) memory, forward and backward.

    ``edge_index`` may be a ``revgnn_ext.CSRGraph``, an edge_index tensor or PyG ``EdgeIndex``,
    a ``torch.sparse`` adjacency or a ``torch_sparse.SparseTensor`` (both as ``adj_t``: rows are
    destinations); it is converted once per adjacency object (see ``revgnn_ext.graph.as_graph``). Configurations the kernel
    does not cover (multi-aggregations, ``softmax_sg``, a custom aggregation module,
    ``flow='target_to_source'``, an explainer's edge masks, message-passing hooks) fall back to
    PyG's computation with a one-time warning.
    """

    # The arguments of PyG's propagate(), which PyG otherwise reads off the source of forward().
    propagate_type = {"x": OptPairTensor, "edge_attr": OptTensor}

    def _fused_aggregation(self) -> Optional[Tuple[str, dict]]:
        """(aggr, kwargs) for gen_aggregate, or None with a warning when it cannot run fused."""
        if not self.runs_fused():
            return None
        module = self.aggr_module
        if type(module) is pyg_aggr.SumAggregation:
            return "sum", {}
        if type(module) is pyg_aggr.MeanAggregation:
            return "mean", {}
        if type(module) is pyg_aggr.MaxAggregation:
            return "max", {}
        if type(module) is pyg_aggr.SoftmaxAggregation and not (module.semi_grad and not module.learn):
            return "softmax", {"t": module.t}
        if type(module) is pyg_aggr.PowerMeanAggregation and (module.min_value, module.max_value) == (1e-4, 100.0):
            return "powermean", {"p": module.p}
        warn_once(f"GENConv aggregation {module!r} is not fused")
        return None

    def forward(self, x: Union[Tensor, Tuple[Tensor, Optional[Tensor]]], edge_index,
                edge_attr: Optional[Tensor] = None, size: Optional[Tuple[int, int]] = None) -> Tensor:
        h, last = self.forward_split(x, edge_index, edge_attr, size=size)
        return h if last is None else last(h)

    def forward_split(self, x: Union[Tensor, Tuple[Tensor, Optional[Tensor]]], edge_index,
                      edge_attr: Optional[Tensor] = None, encoder: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
                      size: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Optional[torch.nn.Module]]:
        """``(h, last)`` with ``forward(...) == last(h)``: ``last`` is the MLP's final Linear and
        ``h`` its input, so that a caller can fold its own work into that product (GroupAddRev
        subtracts it in place when it rebuilds a block's input); ``(output, None)`` where the
        computation falls back to PyG's.

        ``encoder = (weight [out_channels, F], bias [out_channels] or None)`` replaces ``lin_edge``:
        ``edge_attr`` then holds raw features and the embedding ``edge_attr @ weight.T + bias`` is
        computed inside the kernel. RevGNN composes its model-level Linear(F, hidden) with each
        group's lin_edge into one such map, so that the [num_edges, hidden] embedding never exists.
        """
        fused = self._fused_aggregation()
        if fused is None:
            if encoder is not None:
                raise ValueError("GENConv: an edge encoder needs the fused computation (see the warning)")
            adj, size = pyg_adjacency(edge_index, x, size)
            return super().forward(x, adj, edge_attr, size), None
        if edge_attr is None and not isinstance(edge_index, CSRGraph) and edge_index.dim() > 2:
            edge_attr = edge_values(edge_index)  # a hybrid sparse adjacency's values are edge features, as in PyG
        aggr, kwargs = fused
        if isinstance(x, Tensor):
            x = (x, x)
        x_src, x_dst = x
        if hasattr(self, "lin_src"):
            x_src = self.lin_src(x_src)
        if encoder is None and edge_attr is not None and hasattr(self, "lin_edge"):
            if isinstance(self.lin_edge.weight, torch.nn.UninitializedParameter):  # edge_dim=-1: sized on first use
                self.lin_edge.initialize_parameters(self.lin_edge, (edge_attr,))
            encoder = (self.lin_edge.weight, self.lin_edge.bias)
        graph = as_graph(edge_index, node_counts(x_src, x_dst, size, edge_index))
        weight, bias = encoder if encoder is not None else (None, None)
        out = ops.gen_aggregate(graph, x_src, edge_attr, weight, bias, aggr, eps=self.eps, **kwargs)
        if hasattr(self, "msg_norm"):
            out = self.msg_norm(x_dst if x_dst is not None else x_src, out)
        if x_dst is not None:
            out = out + (self.lin_dst(x_dst) if hasattr(self, "lin_dst") else x_dst)
        *body, last = self.mlp
        for module in body:
            out = module(out)
        return out, last
