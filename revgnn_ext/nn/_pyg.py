"""What our drop-in convs share with PyG: its calling conventions (node counts, adjacencies,
edge values), its propagate() for the features only it has, and one warning per fallback."""
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch_geometric.nn import MessagePassing
from torch_geometric.nn import aggr as pyg_aggr

from ..adjacency import as_graph
from ..graph import CSRGraph

_warned = set()
# PyG's message-passing hooks, which only its own propagate() calls.
_PROPAGATE_HOOKS = tuple(f"_{step}_forward{kind}_hooks" for step in
                         ("propagate", "message", "aggregate", "message_and_aggregate", "edge_update")
                         for kind in ("_pre", ""))


def warn_once(reason: str) -> None:
    """Warns, once per process and reason, that a layer falls back to PyG's computation."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"revgnn_ext.nn: {reason}; falling back to PyG's (unfused) computation", stacklevel=3)


def propagate_hooks(module: MessagePassing) -> List[str]:
    """The names of the kinds of PyG message-passing hooks registered on `module`."""
    return [name for name in _PROPAGATE_HOOKS if getattr(module, name, None)]


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


def coalesced(adj):
    """``adj`` with a ``torch.sparse`` COO adjacency coalesced: PyG multiplies by its CSR form, in
    which duplicate entries are one edge of summed value."""
    if isinstance(adj, Tensor) and adj.layout == torch.sparse_coo and not adj.is_coalesced():
        return adj.coalesce()
    return adj


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


def added(out: Optional[Tensor], result: Tensor) -> Tensor:
    """``result``, or ``out += result`` in place (and ``out``) where the caller passed an ``out``."""
    return result if out is None else out.add_(result)


def pyg_adjacency(edge_index, x, size: Optional[Tuple[int, int]]):
    """(edge_index, size) as PyG's own propagate() takes them: a CSRGraph becomes its edge_index
    in the caller's edge order (the order of its edge features) and gives the size."""
    if isinstance(edge_index, CSRGraph):
        x_src, x_dst = x if isinstance(x, tuple) else (x, None)
        graph = as_graph(edge_index, node_counts(x_src, x_dst, size, edge_index))  # checks the node counts
        return graph.to_edge_index(), (graph.num_src, graph.num_dst)
    return edge_index, size


class PygFallback:
    """Mixin of our subclasses of PyG layers: when a layer needs PyG's propagate() (``runs_fused``
    says when), that propagate behaves as in PyG's own class."""

    # The generic propagate, so that PyG's explain mode applies edge masks (docs/design.md §7).
    propagate = MessagePassing.propagate
    # The aggregation modules the layer's kernel fuses, and its reduce for each.
    _fused_reduces = {pyg_aggr.SumAggregation: "sum"}

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
            warn_once(f"{name} with flow={self.flow!r}")
        elif self.explain:
            warn_once(f"{name} in explain mode (edge masks)")
        elif propagate_hooks(self):
            warn_once(f"{name} with message-passing hooks")
        else:
            return True
        return False

    def _fused_aggregation(self) -> Optional[str]:
        """The reduce the layer's kernel computes, or None, with the one-time warning that says
        why, where PyG's computation runs instead."""
        if not self.runs_fused():
            return None
        reduce = self._fused_reduces.get(type(self.aggr_module))
        if reduce is None:
            warn_once(f"{type(self).__name__} aggregation {self.aggr_module!r} is not fused")
        return reduce
