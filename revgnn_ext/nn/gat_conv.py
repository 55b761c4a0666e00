"""GATConv on revgnn_ext's fused GAT attention op, gat_aggregate: no per-edge tensor."""
from typing import Optional, Tuple, Union

import torch
import torch_geometric.nn as pyg_nn
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary
from torch_geometric.typing import OptPairTensor, OptTensor
from torch_geometric.utils import add_self_loops

from .. import ops
from ..adjacency import as_graph
from ..graph import CSRGraph, refuse_under_export
from ._pyg import PygFallback, added, coalesced, node_counts, pyg_adjacency, warn_once

# A graph -> (number of self loops, the graph without its loops and with that many added), so that
# a model that passes one edge_index to every layer builds the looped graph once.
_LOOPED = WeakIdKeyDictionary()


@torch.compiler.disable  # builds a graph (eager, once per graph; then read from the cache)
def _with_self_loops(graph: CSRGraph, num_loops: int) -> Tuple[CSRGraph, Tensor, Tensor]:
    """(looped, kept, kept_edge_index): ``graph`` without its self loops and with one loop at each
    node i < num_loops, its edges numbered as PyG's remove_self_loops + add_self_loops number
    them (the kept edges in the caller's order, then the loops by node); ``kept`` [E'] the
    caller's positions of the kept edges and ``kept_edge_index`` [2, E'] those edges. Built
    once per graph and number of loops."""
    graph.check_unmodified("GATConv")  # an edited graph raises rather than find its old edges' loops
    cached = _LOOPED.get(graph)
    if cached is not None and cached[0] == num_loops:
        return cached[1]
    refuse_under_export("GATConv's self-loop graph")
    edge_index = graph.to_edge_index()
    kept = (edge_index[0] != edge_index[1]).nonzero().view(-1)
    kept_edge_index = edge_index[:, kept]
    loops = torch.arange(num_loops, device=graph.device).repeat(2, 1)
    looped = CSRGraph.from_edge_index(torch.cat([kept_edge_index, loops], 1), (graph.num_src, graph.num_dst))
    if not torch.jit.is_tracing():
        _LOOPED[graph] = (num_loops, (looped, kept, kept_edge_index))
    return looped, kept, kept_edge_index


class GATConv(PygFallback, pyg_nn.GATConv):
    """A drop-in for ``torch_geometric.nn.GATConv`` (same arguments, submodules, parameters,
    ``state_dict``, ``repr``) whose attention and aggregation run in revgnn_ext's
    ``gat_aggregate``, on the raw edge features and a graph with PyG's self loops built in once
    per adjacency object (docs/design.md §7).

    ``edge_index`` may be an edge_index tensor or PyG ``EdgeIndex``, a ``revgnn_ext.CSRGraph`` or
    a ``torch.sparse`` adj_t; ``edge_attr`` is in its edge order. In eval mode (or with
    ``dropout=0``) outputs and gradients are PyG's. In training mode the attention dropout is the
    op's counter-based draw from a seed taken from torch's random generator (so
    ``torch.manual_seed`` and an RNG replay reproduce it), not ``F.dropout``'s: the same
    distribution of masks, not the same masks as PyG's for a given seed.
    ``return_attention_weights`` (the weights from PyG's computation beside our output; PyG's output
    too under attention dropout), ``flow='target_to_source'``, aggregations other than a sum, an
    explainer's edge masks, message-passing hooks and ``torch_sparse.SparseTensor`` adjacencies
    fall back to PyG's computation with a one-time warning."""

    # The arguments of PyG's propagate() and edge_updater(), which PyG otherwise reads off the source of forward().
    propagate_type = {"x": OptPairTensor, "alpha": Tensor}
    edge_updater_type = {"alpha": OptPairTensor, "edge_attr": OptTensor}

    def forward(self, x: Union[Tensor, Tuple[Tensor, Optional[Tensor]]], edge_index, edge_attr: Optional[Tensor] = None,
                size: Optional[Tuple[int, int]] = None, return_attention_weights: Optional[bool] = None, *,
                out: Optional[Tensor] = None):
        """PyG's GATConv.forward, and one argument more.

        Args:
            x: node features [num_nodes, in_channels], or a (source, destination) pair.
            edge_index: the graph (see the class docstring).
            edge_attr: edge features in edge_index's edge order.
            size: (num_src, num_dst) where the features do not give them.
            return_attention_weights: as in PyG (the weights from PyG's computation).
            out: a tensor of the output's shape to add the output into, in place (and return);
                without autograd and autocast, where the layer ends in its aggregation (heads
                concatenated or one head, no residual), the aggregation goes into it through
                gat_aggregate's accumulate form and the output is never formed (GroupAddRev
                passes a group's slice).
        """
        if return_attention_weights is not None:
            # The weights come from PyG's computation; the output is ours (the same as without
            # them, bit for bit) except under attention dropout, where PyG's masks must make both.
            warn_once("GATConv with return_attention_weights")
            adj, pyg_size = pyg_adjacency(edge_index, x, size)
            result = super().forward(x, adj, edge_attr, pyg_size, return_attention_weights)
            if not isinstance(result, tuple) or (self.training and self.dropout > 0):
                return result
            return self.forward(x, edge_index, edge_attr, size), result[1]
        if not isinstance(edge_index, (Tensor, CSRGraph)):
            warn_once(f"GATConv with a {type(edge_index).__name__} adjacency")
        if not isinstance(edge_index, (Tensor, CSRGraph)) or self._fused_aggregation() is None:
            adj, size = pyg_adjacency(edge_index, x, size)
            return added(out, super().forward(x, adj, edge_attr, size))
        heads, channels = self.heads, self.out_channels
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else x
        if x_src.dim() != 2:
            raise ValueError(f"GATConv: node features must be 2-D [num_nodes, channels], got {list(x_src.shape)} "
                             "(static graphs are not supported, as in PyG)")
        res = None if self.res is None or x_dst is None else self.res(x_dst)
        if self.lin is not None:
            h_src = self.lin(x_src)
            h_dst = h_src if x_dst is x_src else (None if x_dst is None else self.lin(x_dst))
        else:
            h_src, h_dst = self.lin_src(x_src), (None if x_dst is None else self.lin_dst(x_dst))
        src_score = (h_src.view(-1, heads, channels) * self.att_src).sum(-1)
        dst_score = None if h_dst is None else (h_dst.view(-1, heads, channels) * self.att_dst).sum(-1)

        edge_index = coalesced(edge_index)
        graph = as_graph(edge_index, node_counts(x_src, None if x_dst is x_src else x_dst, size, edge_index))
        if self.lin_edge is None:
            edge_attr = None  # as PyG: edge features weigh in only with edge_dim
        if self.add_self_loops:
            num_loops = min(graph.num_src, graph.num_dst)
            graph, kept, kept_edge_index = _with_self_loops(graph, num_loops)
            if edge_attr is not None:  # PyG's own loop features (fill_value: a value, a tensor or a reduction)
                edge_attr = add_self_loops(kept_edge_index, edge_attr.index_select(0, kept), self.fill_value,
                                           num_loops)[1]
        edge_weight = None
        if edge_attr is not None:
            edge_attr = edge_attr.view(-1, 1) if edge_attr.dim() == 1 else edge_attr
            if isinstance(self.lin_edge.weight, torch.nn.UninitializedParameter):  # edge_dim=-1: sized on first use
                self.lin_edge.initialize_parameters(self.lin_edge, (edge_attr,))
            # lin_edge then att_edge, folded into one [heads, edge_dim] map of the raw edge features
            edge_weight = (self.lin_edge.weight.view(heads, channels, -1) * self.att_edge.view(heads, channels, 1)).sum(1)
        dropout = self.dropout if self.training else 0.0
        seed = int(torch.randint(2**62, ())) if dropout > 0 else 0
        attend = dict(edge_attr=edge_attr, edge_weight=edge_weight, negative_slope=self.negative_slope,
                      attn_dropout=dropout, seed=seed)
        if out is not None and (self.concat or heads == 1) and res is None:
            ops.gat_aggregate(graph, h_src, src_score, dst_score, **attend, out=out)
            return out if self.bias is None else out.add_(self.bias)
        result = ops.gat_aggregate(graph, h_src, src_score, dst_score, **attend)
        if not self.concat:
            result = result.view(-1, heads, channels).mean(1)
        if res is not None:
            result = result + res
        return added(out, result if self.bias is None else result + self.bias)
