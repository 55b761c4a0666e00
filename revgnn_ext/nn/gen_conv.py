"""GENConv (DeeperGCN) on the fused gen_aggregate op: no [num_edges, channels] tensor."""
import warnings
from typing import Optional, Tuple, Union

import torch
import torch_geometric.nn as pyg_nn
from torch import Tensor
from torch_geometric.nn import aggr as pyg_aggr
from torch_geometric.typing import OptPairTensor, OptTensor

from .. import ops
from ..graph import CSRGraph, as_graph

_warned = set()
# PyG's message-passing hooks, which only its own propagate() calls.
_PROPAGATE_HOOKS = tuple(f"_{step}_forward{kind}_hooks" for step in
                         ("propagate", "message", "aggregate", "message_and_aggregate", "edge_update")
                         for kind in ("_pre", ""))


def node_counts(x_src: Tensor, x_dst: Optional[Tensor], size: Optional[Tuple[int, int]], adj=None) -> Tuple[int, int]:
    """(num_src, num_dst) of a layer call, by PyG's rules: size= wins, else the features' rows;
    a missing destination side comes from the adjacency ``adj`` where it states one (a sparse
    adjacency's rows, a CSRGraph, a sized PyG EdgeIndex), else from the source side."""
    if size is not None:
        return int(size[0]), int(size[1])
    if x_dst is not None:
        return x_src.size(0), x_dst.size(0)
    num_dst = _stated_num_dst(adj)
    return x_src.size(0), (x_src.size(0) if num_dst is None else int(num_dst))


def _stated_num_dst(adj) -> Optional[int]:
    """The number of destinations an adjacency states itself; None for a plain edge_index."""
    if isinstance(adj, CSRGraph):
        return adj.num_dst
    if isinstance(adj, Tensor):
        if adj.layout != torch.strided:  # torch.sparse adj_t: rows are destinations
            return adj.size(0)
        return adj.sparse_size(1) if hasattr(adj, "sparse_size") else None  # PyG EdgeIndex (size may be unset)
    return adj.sparse_size(0) if hasattr(adj, "sparse_size") else None  # torch_sparse.SparseTensor adj_t


def edge_values(adj) -> Optional[Tensor]:
    """The values stored with a sparse adjacency (a ``torch.sparse`` COO or CSR tensor, a
    ``torch_sparse.SparseTensor``) in the order of its stored entries, which is the edge order of
    its CSRGraph; None for any other adjacency or a SparseTensor without values."""
    if isinstance(adj, Tensor) and adj.layout == torch.sparse_coo:
        if adj.is_coalesced():
            return adj.values()
        if adj.requires_grad:  # the stored values of an uncoalesced tensor are detached
            raise ValueError("revgnn_ext.nn: the values of an uncoalesced sparse COO adjacency that requires grad "
                             "would get no gradient; pass adj_t.coalesce() (or a sparse CSR tensor)")
        return adj._values()
    if isinstance(adj, Tensor) and adj.layout == torch.sparse_csr:
        return adj.values()
    if not isinstance(adj, (Tensor, CSRGraph)) and hasattr(adj, "storage"):  # torch_sparse.SparseTensor
        return adj.storage.value()
    return None


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"revgnn_ext.nn: {reason}; falling back to PyG's (unfused) computation", stacklevel=3)


class PygFallback:
    """Mixin of our subclasses of PyG layers: when a layer needs PyG's propagate() (``runs_fused``
    says when), that propagate behaves as in PyG's own class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # PyG compiles a propagate per class and keeps the generic one for explain mode as the
        # class's propagate at its first instance: for a subclass of an already compiled PyG
        # class that is the parent's compiled one, which ignores edge masks.
        type(self)._orig_propagate = pyg_nn.MessagePassing.propagate

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it is given or finds inside one.
        raise RuntimeError(f"revgnn_ext.nn.{type(self).__name__}: TorchScript (torch.jit.script) is not supported "
                           "(it is deprecated in current PyTorch); use torch.compile instead, or PyG's own "
                           f"torch_geometric.nn.{type(self).__name__} where a scripted model is required")

    def runs_fused(self) -> bool:
        """Whether the layer may skip PyG's propagate() for a fused kernel; if not, warns once
        with why: the kernels aggregate at edge_index[1] (flow 'source_to_target') and do not
        apply an explainer's edge mask or call message-passing hooks."""
        name = type(self).__name__
        if self.flow != "source_to_target":
            _warn_once(f"{name} with flow={self.flow!r}")
        elif self.explain:
            _warn_once(f"{name} in explain mode (edge masks)")
        elif any(getattr(self, hooks, None) for hooks in _PROPAGATE_HOOKS):
            _warn_once(f"{name} with message-passing hooks")
        else:
            return True
        return False


def pyg_adjacency(edge_index, x, size: Optional[Tuple[int, int]]):
    """(edge_index, size) as PyG's own propagate() takes them: a CSRGraph becomes its edge_index
    in the caller's edge order (the order of its edge features) and gives the size."""
    if isinstance(edge_index, CSRGraph):
        x_src, x_dst = x if isinstance(x, tuple) else (x, None)
        graph = as_graph(edge_index, node_counts(x_src, x_dst, size, edge_index))  # checks the node counts
        return graph.to_edge_index(), (graph.num_src, graph.num_dst)
    return edge_index, size


class GENConv(PygFallback, pyg_nn.GENConv):
    """A drop-in for ``torch_geometric.nn.GENConv`` (same arguments, defaults, submodules,
    parameters, ``state_dict`` and ``repr``) whose message construction and aggregation run
    in revgnn_ext's fused ``gen_aggregate``: the edge embedding ``lin_edge(edge_attr)`` is
    applied inside the kernel to the raw edge features, and softmax, max, mean, sum and
    powermean aggregations keep O(num_nodes x channels) memory, forward and backward.

    ``edge_index`` may be a ``revgnn_ext.CSRGraph``, an edge_index tensor or PyG ``EdgeIndex``,
    a ``torch.sparse`` adjacency or a ``torch_sparse.SparseTensor`` (both as ``adj_t``: rows are
    destinations); it is converted once and cached on the object. Configurations the kernel
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
        _warn_once(f"GENConv aggregation {module!r} is not fused")
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
