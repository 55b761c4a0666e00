"""The graph format of revgnn_ext: CSR by destination, with a lazily built transpose.

Every op aggregates over the in-edges of a destination row, so rows are destinations and
`col` holds sources (PyG's `adj_t`). Indices are int32 whenever they fit. The permutation from
the caller's edge order to CSR order is kept, so that per-edge tensors (edge weights, edge
features) can be given in the order the edges were given. The transposed CSR (rows = sources)
is built once, on first need, for deterministic backward passes (segment sums, no atomics).
Indices are validated once, here; kernels then trust them.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["CSRGraph", "as_graph"]

_INT32_MAX = 2**31 - 1

NumNodes = Union[int, Tuple[int, int], None]


def _index_dtype(*sizes: int) -> torch.dtype:
    return torch.int32 if max(sizes, default=0) <= _INT32_MAX else torch.int64


def _check_range(name: str, index: Tensor, bound: int, what: str) -> None:
    """Raise ValueError naming the first offending value of `index` outside [0, bound)."""
    if index.numel() == 0:
        return
    bad = (index < 0) | (index >= bound)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        value = int(index[pos])
        if value < 0:
            raise ValueError(f"{name} contains the negative index {value} (position {pos})")
        raise ValueError(f"{name} contains the index {value} (position {pos}), out of range for "
                         f"{what} = {bound}")


def _sizes(num_nodes: NumNodes, src: Tensor, dst: Tensor, where: str) -> Tuple[int, int]:
    if num_nodes is None:
        n = int(torch.max(src.max(), dst.max())) + 1 if src.numel() else 0
        return max(n, 0), max(n, 0)
    if isinstance(num_nodes, (tuple, list)):
        if len(num_nodes) != 2:
            raise ValueError(f"{where}: num_nodes must be an int or a (num_src, num_dst) pair, got {num_nodes!r}")
        num_src, num_dst = (int(v) for v in num_nodes)
    else:
        num_src = num_dst = int(num_nodes)
    if num_src < 0 or num_dst < 0:
        raise ValueError(f"{where}: num_nodes must be non-negative, got {num_nodes!r}")
    return num_src, num_dst


def _rowptr(keys: Tensor, num_rows: int, dtype: torch.dtype) -> Tensor:
    counts = torch.bincount(keys, minlength=num_rows)
    rowptr = torch.zeros(num_rows + 1, dtype=torch.int64, device=keys.device)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return rowptr.to(dtype)


class CSRGraph:
    """A directed (possibly bipartite) graph in CSR by destination.

    Attributes:
        rowptr: [num_dst + 1] offsets of each destination's in-edges.
        col: [num_edges] source of each edge, in CSR order.
        perm: [num_edges] caller's edge position of each CSR edge (None: already CSR order),
            so that ``edge_attr[perm]`` is ``edge_attr`` in CSR order.
        num_src, num_dst: node counts (equal unless bipartite).
    """

    def __init__(self, rowptr: Tensor, col: Tensor, num_src: int, perm: Optional[Tensor] = None):
        """Wraps CSR tensors that are already valid; use the from_* constructors for any input
        that has not been validated."""
        self.rowptr = rowptr
        self.col = col
        self.perm = perm
        self.num_src = int(num_src)
        self._transposed: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        self._csr_ordered: Optional["CSRGraph"] = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_edge_index(cls, edge_index: Tensor, num_nodes: NumNodes = None) -> "CSRGraph":
        """From a PyG edge_index [2, E] (row 0 = source, row 1 = destination), or a PyG
        ``EdgeIndex``. ``num_nodes``: an int, a ``(num_src, num_dst)`` pair for bipartite graphs,
        or None to infer ``max index + 1``."""
        where = "CSRGraph.from_edge_index"
        if not isinstance(edge_index, Tensor):
            raise TypeError(f"{where}: edge_index must be a tensor, got {type(edge_index).__name__}")
        if num_nodes is None and hasattr(edge_index, "sparse_size"):  # PyG EdgeIndex
            sizes = edge_index.sparse_size()
            if sizes[0] is not None and sizes[1] is not None:
                num_nodes = (int(sizes[0]), int(sizes[1]))
        if hasattr(edge_index, "as_tensor"):
            edge_index = edge_index.as_tensor()
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"{where}: edge_index must have shape [2, num_edges], got {list(edge_index.shape)}")
        if edge_index.dtype.is_floating_point or edge_index.dtype.is_complex or edge_index.dtype == torch.bool:
            raise TypeError(f"{where}: edge_index must be an integer tensor, got {edge_index.dtype}")
        src, dst = edge_index[0].long(), edge_index[1].long()
        num_src, num_dst = _sizes(num_nodes, src, dst, where)
        _check_range(f"{where}: edge_index[0] (sources)", src, num_src, "num_src")
        _check_range(f"{where}: edge_index[1] (destinations)", dst, num_dst, "num_dst")
        return cls._from_coo(src, dst, num_src, num_dst)

    @classmethod
    def from_csr(cls, rowptr: Tensor, col: Tensor, num_src: Optional[int] = None) -> "CSRGraph":
        """From CSR by destination (``rowptr`` [num_dst + 1], ``col`` [E] sources); per-edge
        tensors are then in this CSR order."""
        where = "CSRGraph.from_csr"
        for name, t in (("rowptr", rowptr), ("col", col)):
            if not isinstance(t, Tensor) or t.dim() != 1:
                raise ValueError(f"{where}: {name} must be a 1-D tensor")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{where}: {name} must be an integer tensor, got {t.dtype}")
        if rowptr.numel() == 0:
            raise ValueError(f"{where}: rowptr must have num_dst + 1 >= 1 entries")
        rp, cl = rowptr.long(), col.long()
        if int(rp[0]) != 0 or int(rp[-1]) != cl.numel():
            raise ValueError(f"{where}: rowptr must start at 0 and end at len(col) = {cl.numel()}, "
                             f"got {int(rp[0])} and {int(rp[-1])}")
        if rp.numel() > 1 and bool((rp[1:] < rp[:-1]).any()):
            pos = int((rp[1:] < rp[:-1]).nonzero()[0, 0])
            raise ValueError(f"{where}: rowptr must be non-decreasing, but rowptr[{pos + 1}] = "
                             f"{int(rp[pos + 1])} < rowptr[{pos}] = {int(rp[pos])}")
        if num_src is None:
            num_src = int(cl.max()) + 1 if cl.numel() else rp.numel() - 1
        _check_range(f"{where}: col", cl, num_src, "num_src")
        dtype = _index_dtype(cl.numel(), num_src, rp.numel())
        return cls(rp.to(dtype).contiguous(), cl.to(dtype).contiguous(), num_src)

    @classmethod
    def from_sparse(cls, adj_t) -> "CSRGraph":
        """From a transposed adjacency (rows = destinations, columns = sources, as PyG's
        ``adj_t``): a ``torch.sparse`` COO or CSR tensor, or a ``torch_sparse.SparseTensor``.
        Per-edge tensors are in the order of the input's stored entries (``values()``)."""
        where = "CSRGraph.from_sparse"
        if isinstance(adj_t, Tensor) and adj_t.layout == torch.sparse_csr:
            num_dst, num_src = adj_t.shape[:2]
            return cls.from_csr(adj_t.crow_indices(), adj_t.col_indices(), num_src)
        if isinstance(adj_t, Tensor) and adj_t.layout == torch.sparse_coo:
            num_dst, num_src = adj_t.shape[:2]
            dst, src = adj_t._indices()
            return cls.from_edge_index(torch.stack([src, dst]), (num_src, num_dst))
        if type(adj_t).__name__ == "SparseTensor" and hasattr(adj_t, "storage"):  # torch_sparse
            rowptr, col, _ = adj_t.csr()
            num_dst, num_src = adj_t.sparse_sizes()
            if rowptr.numel() != num_dst + 1:
                raise ValueError(f"{where}: SparseTensor rowptr does not match its sparse sizes")
            return cls.from_csr(rowptr, col, num_src)
        raise TypeError(f"{where}: expected a torch.sparse COO/CSR tensor or a torch_sparse.SparseTensor, "
                        f"got {type(adj_t).__name__}"
                        + (f" with layout {adj_t.layout}" if isinstance(adj_t, Tensor) else ""))

    @classmethod
    def _from_coo(cls, src: Tensor, dst: Tensor, num_src: int, num_dst: int) -> "CSRGraph":
        """Validated int64 COO -> CSR by destination: a stable sort keeps the caller's order of
        each destination's edges, so the layout is a deterministic function of the input."""
        dtype = _index_dtype(src.numel(), num_src, num_dst)
        perm = torch.sort(dst, stable=True).indices
        rowptr = _rowptr(dst, num_dst, dtype)
        return cls(rowptr, src[perm].to(dtype), num_src, perm.to(dtype))

    # ------------------------------------------------------------------ properties
    @property
    def num_dst(self) -> int:
        return self.rowptr.numel() - 1

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    @property
    def device(self) -> torch.device:
        return self.rowptr.device

    @property
    def index_dtype(self) -> torch.dtype:
        return self.rowptr.dtype

    def transposed(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(rowptr_t, col_t, perm_t): CSR by source; col_t holds destinations and perm_t the CSR
        position of each entry. Built on first use, then cached."""
        if self._transposed is None:
            counts = self.rowptr[1:] - self.rowptr[:-1]
            dst = torch.repeat_interleave(torch.arange(self.num_dst, device=self.device), counts.long(),
                                          output_size=self.num_edges)
            src = self.col.long()
            perm_t = torch.sort(src, stable=True).indices
            rowptr_t = _rowptr(src, self.num_src, self.index_dtype)
            self._transposed = (rowptr_t, dst[perm_t].to(self.index_dtype), perm_t.to(self.index_dtype))
        return self._transposed

    def edges_to_csr(self, edge_tensor: Tensor, name: str = "edge tensor") -> Tensor:
        """A per-edge tensor given in the caller's edge order, reordered to CSR order."""
        if not isinstance(edge_tensor, Tensor) or edge_tensor.dim() == 0 or edge_tensor.size(0) != self.num_edges:
            shape = list(edge_tensor.shape) if isinstance(edge_tensor, Tensor) else type(edge_tensor).__name__
            raise ValueError(f"{name} must have one entry per edge (size(0) == {self.num_edges}), got {shape}")
        if edge_tensor.device != self.device:
            raise ValueError(f"{name} is on {edge_tensor.device}, but the graph is on {self.device}")
        return edge_tensor if self.perm is None else edge_tensor[self.perm]

    def csr_ordered(self) -> "CSRGraph":
        """This graph with its edges numbered in CSR order (``perm`` None), for a caller that
        reorders its edge tensors once with :meth:`edges_to_csr` and hands them to many layers.
        Built once and cached; the two share the transpose when it exists."""
        if self.perm is None:
            return self
        if self._csr_ordered is None:
            self._csr_ordered = CSRGraph(self.rowptr, self.col, self.num_src)
        if self._csr_ordered._transposed is None:  # the transpose does not depend on the numbering
            self._csr_ordered._transposed = self._transposed
        return self._csr_ordered

    def to_edge_index(self) -> Tensor:
        """PyG's edge_index [2, num_edges] int64 (row 0 sources, row 1 destinations), with the
        edges in the caller's order (the order of the edge tensors that go with this graph)."""
        dst = torch.repeat_interleave(torch.arange(self.num_dst, device=self.device),
                                      self.rowptr.diff().long(), output_size=self.num_edges)
        csr = torch.stack([self.col.long(), dst])
        if self.perm is None:
            return csr
        out = torch.empty_like(csr)
        out[:, self.perm.long()] = csr
        return out

    def to(self, device: Union[str, torch.device]) -> "CSRGraph":
        """The same graph on `device` (the cached transpose moves with it)."""
        device = torch.device(device)
        if device == self.device:
            return self
        out = CSRGraph(self.rowptr.to(device), self.col.to(device), self.num_src,
                       None if self.perm is None else self.perm.to(device))
        if self._transposed is not None:
            out._transposed = tuple(t.to(device) for t in self._transposed)
        return out

    def __repr__(self) -> str:
        return (f"CSRGraph(num_src={self.num_src}, num_dst={self.num_dst}, num_edges={self.num_edges}, "
                f"index_dtype={self.index_dtype}, device={self.device})")


def as_graph(adj, num_nodes: Tuple[int, int]) -> CSRGraph:
    """The CSRGraph of any adjacency a PyG layer accepts (a CSRGraph, an edge_index [2, E] or
    PyG EdgeIndex, a ``torch.sparse`` or ``torch_sparse.SparseTensor`` adj_t), converted once:
    the result is cached on the adjacency object itself, so that a deep model passing the same
    edge_index to every layer pays for one conversion. The cache is dropped when the tensor is
    modified in place (its version changes) or the node counts differ."""
    num_src, num_dst = (int(v) for v in num_nodes)
    if isinstance(adj, CSRGraph):
        if (adj.num_src, adj.num_dst) != (num_src, num_dst):
            raise ValueError(f"the graph has (num_src, num_dst) = ({adj.num_src}, {adj.num_dst}) but the node "
                             f"features give ({num_src}, {num_dst})")
        return adj
    key = (getattr(adj, "_version", None), num_src, num_dst)
    cached = getattr(adj, "_revgnn_ext_graph", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if isinstance(adj, Tensor) and adj.layout == torch.strided:
        graph = CSRGraph.from_edge_index(adj, (num_src, num_dst))
    else:
        graph = CSRGraph.from_sparse(adj)
        if (graph.num_src, graph.num_dst) != (num_src, num_dst):
            raise ValueError(f"the sparse adjacency has shape [num_dst, num_src] = [{graph.num_dst}, "
                             f"{graph.num_src}] but the node features give ({num_src}, {num_dst})")
    try:
        adj._revgnn_ext_graph = (key, graph)
    except (AttributeError, TypeError):  # objects that take no attributes: no caching
        pass
    return graph
