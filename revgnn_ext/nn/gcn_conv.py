"""GCNConv on the fused spmm op: the normalized propagation without a [num_edges, channels] tensor."""
from typing import Optional, Tuple

import torch
import torch_geometric.nn as pyg_nn
from torch import Tensor
from torch_geometric.typing import OptTensor

from .. import ops
from ..adjacency import as_graph
from ..graph import CSRGraph
from ._pyg import PygFallback, added, coalesced, edge_values, pyg_adjacency, warn_once


def _last_loop_weight(slots: Tensor, weight: Tensor, fill: float, num_nodes: int) -> Tensor:
    """[num_nodes]: the weight of each node's last loop edge (slots[e]: the node of loop edge e,
    num_nodes for the other edges), ``fill`` where it has none. Taken by position, so the same on
    every device (an index_put with repeated indices keeps an arbitrary one on CUDA); the gradient
    reaches every loop edge of the node, as through PyG's index_put."""
    positions = torch.arange(1, weight.numel() + 1, device=weight.device)
    last = torch.zeros(num_nodes + 1, dtype=torch.long, device=weight.device).scatter_reduce(0, slots, positions,
                                                                                              "amax")
    value = torch.cat([weight.new_full((1,), fill), weight.detach()]).index_select(0, last[:num_nodes])
    each_loop = weight.new_zeros(num_nodes + 1).index_add(0, slots, weight)[:num_nodes]
    return value + (each_loop - each_loop.detach())


class GCNConv(PygFallback, pyg_nn.GCNConv):
    """A drop-in for ``torch_geometric.nn.GCNConv`` (same arguments, submodules, ``state_dict``,
    ``repr``, cache attribute) whose propagation runs in revgnn_ext's ``spmm``: no per-edge
    message tensor, deterministic. The normalization is PyG's ``gcn_norm``, computed on the CSR
    form of the adjacency (converted once per adjacency object; docs/design.md §7). With
    ``cached=True`` the normalized graph of the first call is reused, as in PyG.

    ``flow='target_to_source'``, aggregations other than a sum, an explainer's edge masks,
    message-passing hooks and ``torch_sparse.SparseTensor`` adjacencies fall back to PyG's
    computation with a one-time warning."""

    # The arguments of PyG's propagate(), which PyG otherwise reads off the source of forward().
    propagate_type = {"x": Tensor, "edge_weight": OptTensor}

    def forward(self, x: Tensor, edge_index, edge_weight: Optional[Tensor] = None, *,
                out: Optional[Tensor] = None) -> Tensor:
        """PyG's GCNConv.forward, and one argument more.

        Args:
            x: node features [num_nodes, in_channels].
            edge_index: the graph (see the class docstring).
            edge_weight: [num_edges] weights in edge_index's edge order.
            out: a tensor of the output's shape to add the output into, in place (and return);
                without autograd and autocast, the propagation goes into it through spmm's
                accumulate form, and the output is never formed (GroupAddRev passes a group's slice).
        """
        if isinstance(x, (tuple, list)):
            return added(out, super().forward(x, edge_index, edge_weight))  # PyG's error: no bipartite passing
        if not isinstance(edge_index, (Tensor, CSRGraph)):
            warn_once(f"GCNConv with a {type(edge_index).__name__} adjacency")
        if not isinstance(edge_index, (Tensor, CSRGraph)) or self._fused_aggregation() is None:
            return added(out, super().forward(x, pyg_adjacency(edge_index, x, None)[0], edge_weight))
        num_nodes = x.size(self.node_dim)
        x = self.lin(x)
        edge_index = coalesced(edge_index)
        # A torch.sparse adjacency's values are its weights, as in PyG (which ignores edge_weight then).
        given = edge_values(edge_index) if isinstance(edge_index, Tensor) else None
        given = edge_weight if given is None else given  # the weights used from here on
        if given is not None and given.is_floating_point():  # wider edge weights widen the result, as in PyG
            x = x.to(torch.promote_types(x.dtype, given.dtype))
        if self.normalize:
            cache = self._cached_edge_index
            if cache is None:
                cache = self._normalized(edge_index, given, num_nodes, x.dtype)
                if self.cached:
                    self._cached_edge_index = cache
            graph, weight, loop_weight = cache
        else:
            graph = as_graph(edge_index, (num_nodes, num_nodes))
            weight, loop_weight = (None if given is None else given.to(x.dtype)), None
        return self._propagate(graph, x, weight, loop_weight, out)

    def _normalized(self, adj, edge_weight: Optional[Tensor], num_nodes: int,
                    dtype: torch.dtype) -> Tuple[CSRGraph, Tensor, Optional[Tensor]]:
        """(graph, weight, loop_weight): PyG's gcn_norm of ``adj`` with its edges numbered in CSR
        order (``weight`` [num_edges] in that order, an existing self loop's weight 0) and the self
        loops as a per-node weight ``loop_weight`` [num_nodes] (None without add_self_loops).
        ``edge_weight``: the weights in the caller's edge order (a sparse adjacency's values)."""
        sparse = isinstance(adj, Tensor) and adj.layout != torch.strided
        graph = as_graph(adj, (num_nodes, num_nodes))
        if edge_weight is None:
            weight = torch.ones(graph.num_edges, dtype=dtype, device=graph.device)
        else:
            weight = graph.edges_to_csr(edge_weight, "GCNConv: edge_weight").to(dtype)
        dst = graph.destinations()
        loop_weight = None
        if self.add_self_loops:
            # without edge weights PyG's loops weigh 1, even when improved
            fill = 2.0 if self.improved and (sparse or edge_weight is not None) else 1.0
            is_loop = graph.col.long() == dst
            # Each loop edge writes its node's slot, every other edge the spare slot num_nodes (static shapes).
            slots = torch.where(is_loop, dst, num_nodes)
            if sparse:  # PyG adds fill * I to the sparse adjacency
                loop_weight = weight.new_full((num_nodes + 1,), fill).index_add(0, slots, weight)[:num_nodes]
            else:  # PyG's add_remaining_self_loops: a node's loop keeps its weight (the last loop's), others get fill
                loop_weight = _last_loop_weight(slots, weight, fill, num_nodes)
            weight = weight.masked_fill(is_loop, 0.0)
        graph = graph.csr_ordered()
        degree = ops.spmm(graph, weight.new_ones(num_nodes, 1), weight).squeeze(1)
        if loop_weight is not None:
            degree = degree + loop_weight
        scale = degree.pow(-0.5)
        scale = scale.masked_fill(scale == float("inf"), 0.0)
        weight = scale.index_select(0, graph.col.long()) * weight * scale.index_select(0, dst)
        return graph, weight, None if loop_weight is None else scale * loop_weight * scale

    def _propagate(self, graph: CSRGraph, x: Tensor, weight: Optional[Tensor], loop_weight: Optional[Tensor],
                   out: Optional[Tensor]) -> Tensor:
        """sum over in-edges j -> i of weight * x[j], plus loop_weight[i] * x[i], plus the bias;
        the node dimension is ``node_dim`` (a batch of feature sets on one graph is one spmm over
        their channels). With a 2-D ``out``, added into it in place."""
        if out is not None and x.dim() == 2:
            if loop_weight is not None:
                out.addcmul_(x, loop_weight.unsqueeze(-1))
            ops.spmm(graph, x, weight, out=out)
            return out if self.bias is None else out.add_(self.bias)
        nodes_first = x.movedim(self.node_dim, 0)
        flat = nodes_first.reshape(nodes_first.size(0), -1)
        loop_term = None if loop_weight is None else flat * loop_weight.unsqueeze(-1)
        result = ops.spmm(graph, flat, weight, out=loop_term)
        result = result.view(nodes_first.shape).movedim(0, self.node_dim).contiguous()  # contiguous, as PyG's
        return added(out, result if self.bias is None else result + self.bias)
