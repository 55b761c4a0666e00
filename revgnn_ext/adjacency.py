"""Any adjacency a PyG layer accepts (an edge_index [2, E] or PyG EdgeIndex, a ``torch.sparse``
or ``torch_sparse.SparseTensor`` adj_t, a CSRGraph) as a CSRGraph, converted once per adjacency
object and cached apart from it."""
from typing import Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _C
from .graph import CSRGraph, refuse_under_export

__all__ = ["adjacency_tensors", "as_graph"]

# An adjacency object -> ((fingerprint, num_src, num_dst), its CSRGraph). Held by weak references,
# keyed by identity: the cache neither keeps an edge_index alive nor travels with it (torch.save).
_GRAPHS = WeakIdKeyDictionary()

_fingerprint_weights: dict = {}  # device -> _C.fingerprint_weights() there


def _index_tensors(adj) -> Tuple[Tensor, ...]:
    """The tensors that hold an adjacency's structure."""
    if isinstance(adj, Tensor):
        if adj.layout == torch.sparse_coo:
            return (adj._indices(),)
        if adj.layout == torch.sparse_csr:
            return (adj.crow_indices(), adj.col_indices())
        return (adj.as_tensor() if hasattr(adj, "as_tensor") else adj,)  # edge_index or PyG EdgeIndex
    rowptr, col, _ = adj.csr()  # torch_sparse.SparseTensor
    return (rowptr, col)


def adjacency_tensors(adj) -> Tuple[Tensor, ...]:
    """The tensors that hold an adjacency of any form a layer accepts (its indices and stored
    values; a CSRGraph's tensors, its transpose included once built), which an in-place edit of
    the graph changes. A value that is no adjacency gives ()."""
    if isinstance(adj, CSRGraph):
        return tuple(t for t, _ in adj._versions)
    if isinstance(adj, Tensor) and adj.layout == torch.sparse_coo:
        return adj._indices(), adj._values()
    if isinstance(adj, Tensor) and adj.layout == torch.sparse_csr:
        return adj.crow_indices(), adj.col_indices(), adj.values()
    if isinstance(adj, Tensor):
        return (adj,)
    if hasattr(adj, "storage") and hasattr(adj, "csr"):  # torch_sparse.SparseTensor
        value = adj.storage.value()
        return _index_tensors(adj) + (() if value is None else (value,))
    return ()


def _fingerprint(t: Tensor) -> int:
    """A checksum of the values of an index tensor that depends on their positions (see
    ``_C.fingerprint``), for a cache key that sees every edit of edge_index, including those that
    bypass its version counter (``.data``, numpy). One threaded pass on CPU (its cost:
    docs/design.md §3); on other devices, tensor ops computing the same sum."""
    return _C.fingerprint(t) if t.is_cpu else _fingerprint_by_tensor_ops(t)


def _fingerprint_by_tensor_ops(t: Tensor) -> int:
    flat = t.reshape(-1).long()
    weights = _fingerprint_weights.get(flat.device)
    if weights is None:
        weights = _fingerprint_weights[flat.device] = _C.fingerprint_weights().to(flat.device)
    width = weights.numel()
    rows = flat.numel() // width  # whole rows of the weights; the rest is row `rows`
    tail = flat[rows * width:]
    total = (tail * weights[:tail.numel()]).sum() * (2 * rows + 1)
    if rows:
        per_row = (flat[:rows * width].view(rows, width) * weights).sum(1)
        total += (per_row * torch.arange(1, 2 * rows, 2, device=flat.device)).sum()
    return int(total)


def _convert(adj, num_src: int, num_dst: int) -> CSRGraph:
    if isinstance(adj, Tensor) and adj.layout == torch.strided:
        return CSRGraph.from_edge_index(adj, (num_src, num_dst))
    graph = CSRGraph.from_sparse(adj)
    if (graph.num_src, graph.num_dst) != (num_src, num_dst):
        raise ValueError(f"the sparse adjacency has shape [num_dst, num_src] = [{graph.num_dst}, "
                         f"{graph.num_src}] but the node features give ({num_src}, {num_dst})")
    return graph


def as_graph(adj, num_nodes: Tuple[int, int]) -> CSRGraph:
    """The CSRGraph of any adjacency a PyG layer accepts (a CSRGraph, an edge_index [2, E] or
    PyG EdgeIndex, a ``torch.sparse`` or ``torch_sparse.SparseTensor`` adj_t), converted once:
    a deep model passing the same edge_index to every layer pays for one conversion.

    The conversion is cached by the adjacency object's identity, in a table of weak references
    (not on the object: a saved edge_index loads with plain ``torch.load``, and the cache dies
    with it), under a key of the node counts and a fingerprint of its index values (one cheap
    pass, see ``_fingerprint``): any edit of the tensor, in place, through ``.data`` or through
    numpy, gives a new conversion. Under torch.jit.trace nothing is cached: the conversion is
    part of the traced code, so that a traced model follows the edge_index it is given. Under
    torch.compile the conversion runs eagerly (one graph break): it reads the index values (their
    range, the count per row), which no graph knows ahead; a CSRGraph passes through the graph."""
    num_src, num_dst = (int(v) for v in num_nodes)
    if isinstance(adj, CSRGraph):
        if (adj.num_src, adj.num_dst) != (num_src, num_dst):
            raise ValueError(f"the graph has (num_src, num_dst) = ({adj.num_src}, {adj.num_dst}) but the node "
                             f"features give ({num_src}, {num_dst})")
        return adj
    return _cached_conversion(adj, num_src, num_dst)


@torch.compiler.disable
def _cached_conversion(adj, num_src: int, num_dst: int) -> CSRGraph:
    refuse_under_export(f"the conversion of a {type(adj).__name__} adjacency to a CSRGraph")
    if torch.jit.is_tracing():
        return _convert(adj, num_src, num_dst)
    indices = _index_tensors(adj) if isinstance(adj, Tensor) or hasattr(adj, "csr") else ()
    if not indices or any(t.device.type == "meta" for t in indices):  # unknown type or no values: no cache
        return _convert(adj, num_src, num_dst)
    key = (tuple(_fingerprint(t) for t in indices), num_src, num_dst)
    cached = _GRAPHS.get(adj)
    if cached is not None and cached[0] == key:
        return cached[1]
    graph = _convert(adj, num_src, num_dst)
    _GRAPHS[adj] = (key, graph)
    return graph
