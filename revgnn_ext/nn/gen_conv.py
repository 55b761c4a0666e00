"""GENConv (DeeperGCN) on the fused gen_aggregate op: no [num_edges, channels] tensor."""
from typing import Optional, Tuple, Union

import torch
import torch_geometric.nn as pyg_nn
from torch import Tensor
from torch_geometric.nn import aggr as pyg_aggr
from torch_geometric.typing import OptPairTensor, OptTensor

from .. import ops
from ..adjacency import as_graph
from ..graph import CSRGraph
from ._pyg import PygFallback, edge_values, node_counts, pyg_adjacency, warn_once


class GENConv(PygFallback, pyg_nn.GENConv):
    """A drop-in for ``torch_geometric.nn.GENConv`` (same arguments, defaults, submodules,
    parameters, ``state_dict`` and ``repr``) whose message construction and aggregation run
    in revgnn_ext's fused ``gen_aggregate``: the edge embedding ``lin_edge(edge_attr)`` is
    applied inside the kernel to the raw edge features, and softmax, max, mean, sum and
    powermean aggregations keep O(num_nodes x channels) memory, forward and backward.

    ``edge_index`` may be anything ``revgnn_ext.adjacency.as_graph`` accepts (a sparse adjacency
    as ``adj_t``: rows are destinations); it is converted once per adjacency object.
    Configurations the kernel does not cover (multi-aggregations, ``softmax_sg``, a custom
    aggregation module, ``flow='target_to_source'``, an explainer's edge masks, message-passing
    hooks) fall back to PyG's computation with a one-time warning.
    """

    # The arguments of PyG's propagate(), which PyG otherwise reads off the source of forward().
    propagate_type = {"x": OptPairTensor, "edge_attr": OptTensor}
    _fused_reduces = {pyg_aggr.SumAggregation: "sum", pyg_aggr.MeanAggregation: "mean",
                      pyg_aggr.MaxAggregation: "max"}

    def _fused_aggregation(self) -> Optional[Tuple[str, dict]]:
        """(aggr, kwargs) for gen_aggregate, or None with a warning when it cannot run fused."""
        if not self.runs_fused():
            return None
        module = self.aggr_module
        if type(module) in self._fused_reduces:
            return self._fused_reduces[type(module)], {}
        if type(module) is pyg_aggr.SoftmaxAggregation and not (module.semi_grad and not module.learn):
            return "softmax", {"t": module.t}
        if type(module) is pyg_aggr.PowerMeanAggregation and (module.min_value, module.max_value) == (1e-4, 100.0):
            return "powermean", {"p": module.p}
        warn_once(f"GENConv aggregation {module!r} is not fused")
        return None

    def forward(self, x: Union[Tensor, Tuple[Tensor, Optional[Tensor]]], edge_index,
                edge_attr: Optional[Tensor] = None, size: Optional[Tuple[int, int]] = None,
                edge_encoder_weight: Optional[Tensor] = None, edge_encoder_bias: Optional[Tensor] = None) -> Tensor:
        """PyG's GENConv.forward, and an edge encoder.

        Args:
            x: node features [num_nodes, in_channels], or a (source, destination) pair.
            edge_index: the graph (see the class docstring).
            edge_attr: edge features [num_edges, edge_dim] in edge_index's edge order.
            size: (num_src, num_dst) where the features do not give them.
            edge_encoder_weight: [edge_dim, F], with ``edge_encoder_bias`` ([edge_dim] or
                [edge_dim, 1], optional), a Linear(F, edge_dim) that ``edge_attr`` (then raw
                features [num_edges, F]) goes through before ``lin_edge``; the two are composed
                into one map that the kernel applies, so that the [num_edges, edge_dim] embedding
                never exists (RevGNN's model-level edge encoder).
        """
        fused = self._fused_aggregation()
        if fused is None:
            if edge_encoder_weight is not None:
                raise ValueError("GENConv: an edge encoder needs the fused computation (see the warning)")
            adj, size = pyg_adjacency(edge_index, x, size)
            return super().forward(x, adj, edge_attr, size)
        if edge_attr is None and not isinstance(edge_index, CSRGraph) and edge_index.dim() > 2:
            edge_attr = edge_values(edge_index)  # a hybrid sparse adjacency's values are edge features, as in PyG
        aggr, kwargs = fused
        if isinstance(x, Tensor):
            x = (x, x)
        x_src, x_dst = x
        if hasattr(self, "lin_src"):
            x_src = self.lin_src(x_src)
        weight = edge_encoder_weight
        bias = None if weight is None or edge_encoder_bias is None else edge_encoder_bias.reshape(-1)
        if edge_attr is not None and hasattr(self, "lin_edge"):
            lin = self.lin_edge
            if isinstance(lin.weight, torch.nn.UninitializedParameter):  # edge_dim=-1: sized on first use
                lin.initialize_parameters(lin, (edge_attr,))
            if weight is None:
                weight, bias = lin.weight, lin.bias
            else:  # lin_edge after the given Linear: one map
                weight, bias = lin.weight @ weight, (None if bias is None else lin.weight @ bias)
                bias = lin.bias if bias is None else (bias if lin.bias is None else bias + lin.bias)
        graph = as_graph(edge_index, node_counts(x_src, x_dst, size, edge_index))
        out = ops.gen_aggregate(graph, x_src, edge_attr, weight, bias, aggr, eps=self.eps, **kwargs)
        if hasattr(self, "msg_norm"):
            out = self.msg_norm(x_dst if x_dst is not None else x_src, out)
        if x_dst is not None:
            out = out + (self.lin_dst(x_dst) if hasattr(self, "lin_dst") else x_dst)
        return self.mlp(out)
