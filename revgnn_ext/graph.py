"""The graph format of revgnn_ext: CSR by destination (rows are destinations, ``col`` holds
sources: PyG's ``adj_t``), int32 indices whenever they fit, the permutation from the caller's edge
order kept for per-edge tensors, and a transpose built on first need for deterministic backward
passes. Indices are validated when a graph is built (docs/design.md, where things live)."""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["CSRGraph"]

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


def _given_sizes(num_nodes: NumNodes, where: str) -> Optional[Tuple[int, int]]:
    """(num_src, num_dst) from an int or a pair; None for None."""
    if num_nodes is None:
        return None
    if isinstance(num_nodes, (tuple, list)):
        if len(num_nodes) != 2:
            raise ValueError(f"{where}: num_nodes must be an int or a (num_src, num_dst) pair, got {num_nodes!r}")
        num_src, num_dst = (int(v) for v in num_nodes)
    else:
        num_src = num_dst = int(num_nodes)
    if num_src < 0 or num_dst < 0:
        raise ValueError(f"{where}: num_nodes must be non-negative, got {num_nodes!r}")
    return num_src, num_dst


def _sizes(num_nodes: NumNodes, src: Tensor, dst: Tensor, where: str) -> Tuple[int, int]:
    sizes = _given_sizes(num_nodes, where)
    if sizes is None:
        n = int(torch.max(src.max(), dst.max())) + 1 if src.numel() else 0
        sizes = (max(n, 0), max(n, 0))
    _check_fits(where, sizes, src.device)
    return sizes


def _check_fits(where: str, sizes: Tuple[int, int], device: torch.device) -> None:
    """Raise ValueError when the row pointers of a graph with these node counts (the CSR's and its
    transpose's, int64 while being built) would not fit in this machine's memory: such a count is
    a mistake, which would otherwise end in an allocation failure or a very long wait."""
    if device.type != "cpu":
        return  # a device allocation fails fast, with torch's out-of-memory error
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf on this platform
        return
    needed = 8 * (sizes[0] + sizes[1] + 2)
    if needed > memory:
        raise ValueError(f"{where}: (num_src, num_dst) = {sizes} would need {needed / 2**30:.1f} GiB for the row "
                         f"pointers alone, more than this machine's {memory / 2**30:.1f} GiB; num_nodes must be "
                         "the number of nodes (e.g. x.size(0)), and node indices must be below it")


def _rowptr(keys: Tensor, num_rows: int, dtype: torch.dtype) -> Tensor:
    counts = torch.bincount(keys, minlength=num_rows)
    rowptr = torch.zeros(num_rows + 1, dtype=torch.int64, device=keys.device)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return rowptr.to(dtype)


def refuse_under_export(what: str) -> None:
    """Raises a RuntimeError under ``torch.export``, where ``what``, a graph-building step, would
    run: it reads index values, which an exported program cannot (see docs/design.md)."""
    if torch.compiler.is_exporting():
        raise RuntimeError(f"revgnn_ext: torch.export cannot trace {what}, which reads the graph's index values. "
                           "Export for a fixed graph: build its CSRGraph before export (CSRGraph.from_edge_index), "
                           "hold it in the model (an attribute, not an export input), run the model on it once, "
                           "and export under torch.no_grad()")


def _normal_tensor(t: Optional[Tensor]) -> Optional[Tensor]:
    """t, or a normal copy of an inference tensor (made under torch.inference_mode), which autograd
    cannot save for backward and whose in-place edits cannot be detected."""
    if t is None or not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


class CSRGraph:
    """A directed (possibly bipartite) graph in CSR by destination.

    Attributes (read-only):
        rowptr: [num_dst + 1] offsets of each destination's in-edges.
        col: [num_edges] source of each edge, in CSR order.
        perm: [num_edges] caller's edge position of each CSR edge (None: already CSR order),
            so that ``edge_attr[perm]`` is ``edge_attr`` in CSR order.
        num_src, num_dst: node counts (equal unless bipartite).

    A graph is immutable (it caches what it derives: its transpose, its CSR-numbered twin): each
    op raises a RuntimeError if its tensors were modified in place since it was built, and the
    kernels check each row pointer and index they follow, so an edit that bypasses the version
    counter (``.data``, numpy) never reads out of bounds. Its tensors are normal tensors even
    when built under ``torch.inference_mode()``, so a graph made for inference trains later.
    """

    def __init__(self, rowptr: Tensor, col: Tensor, num_src: int, perm: Optional[Tensor] = None):
        """Wraps CSR tensors that are already valid; use the from_* constructors for any input
        that has not been validated."""
        self._rowptr = _normal_tensor(rowptr)
        self._col = _normal_tensor(col)
        self._perm = _normal_tensor(perm)
        self._num_src = int(num_src)
        self._transposed: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        self._csr_ordered: Optional["CSRGraph"] = None
        self._versions: list = []  # (tensor, its version when the graph took it)
        self._track(self._rowptr, self._col, self._perm)

    def _track(self, *tensors: Optional[Tensor]) -> None:
        self._versions.extend((t, t._version) for t in tensors if t is not None)

    def check_unmodified(self, where: str) -> None:
        """Raise a RuntimeError naming ``where`` if one of the graph's tensors (its transpose's
        included) was modified in place since the graph was built. Skipped while torch.compile
        traces (the compiled code keeps no Python check)."""
        if torch.compiler.is_compiling():
            return
        for t, version in self._versions:
            if t._version != version:
                raise RuntimeError(f"{where}: the graph's tensors were modified in place after it was built; a "
                                   "CSRGraph is immutable: build a new one (CSRGraph.from_edge_index, from_csr, "
                                   "from_sparse) for the edited edges")

    @property
    def rowptr(self) -> Tensor:
        return self._rowptr

    @property
    def col(self) -> Tensor:
        return self._col

    @property
    def perm(self) -> Optional[Tensor]:
        return self._perm

    @property
    def num_src(self) -> int:
        return self._num_src

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_edge_index(cls, edge_index: Tensor, num_nodes: NumNodes = None) -> "CSRGraph":
        """From a PyG edge_index [2, E] (row 0 = source, row 1 = destination), or a PyG
        ``EdgeIndex``. ``num_nodes``: an int, a ``(num_src, num_dst)`` pair for bipartite graphs,
        or None to infer ``max index + 1``."""
        where = "CSRGraph.from_edge_index"
        refuse_under_export(where)
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
        if edge_index.device.type == "meta":
            return cls._shape_only(where, num_nodes, edge_index.size(1), with_perm=True)
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
        refuse_under_export(where)
        for name, t in (("rowptr", rowptr), ("col", col)):
            if not isinstance(t, Tensor) or t.dim() != 1:
                raise ValueError(f"{where}: {name} must be a 1-D tensor")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{where}: {name} must be an integer tensor, got {t.dtype}")
        if rowptr.numel() == 0:
            raise ValueError(f"{where}: rowptr must have num_dst + 1 >= 1 entries")
        if rowptr.device.type == "meta" or col.device.type == "meta":
            sizes = None if num_src is None else (num_src, rowptr.numel() - 1)
            return cls._shape_only(where, sizes, col.numel(), with_perm=False)
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
        if isinstance(adj_t, Tensor) and adj_t.layout in (torch.sparse_csr, torch.sparse_coo):
            sparse_dim = adj_t.sparse_dim() + (adj_t.crow_indices().dim() - 1 if adj_t.layout == torch.sparse_csr else 0)
            if sparse_dim != 2:
                raise ValueError(f"{where}: expected a 2-D adjacency [num_dst, num_src] (its values may carry "
                                 f"per-edge features), got a sparse tensor of shape {list(adj_t.shape)} with "
                                 f"{sparse_dim} sparse dimensions; for a batch of graphs, make one block-diagonal "
                                 "graph (as PyG's Batch does) and give that")
            num_dst, num_src = adj_t.shape[:2]
            if adj_t.layout == torch.sparse_csr:
                return cls.from_csr(adj_t.crow_indices(), adj_t.col_indices(), num_src)
            dst, src = adj_t._indices()  # in the stored order, which the per-edge values follow
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
        with torch.inference_mode(False):  # normal tensors even under inference_mode
            perm = torch.sort(dst, stable=True).indices
            rowptr = _rowptr(dst, num_dst, dtype)
            return cls(rowptr, src[perm].to(dtype), num_src, perm.to(dtype))

    @classmethod
    def _shape_only(cls, where: str, num_nodes: NumNodes, num_edges: int, with_perm: bool) -> "CSRGraph":
        """A graph on the meta device (shapes without values, e.g. to trace shapes): meta
        tensors hold no indices, so the node counts must be given."""
        sizes = _given_sizes(num_nodes, where)
        if sizes is None:
            raise ValueError(f"{where}: meta tensors hold no index values, so the node counts cannot be inferred; "
                             "pass num_nodes (num_src for from_csr) to build a shape-only graph on the meta device")
        num_src, num_dst = sizes
        dtype = _index_dtype(num_edges, num_src, num_dst)
        meta = dict(dtype=dtype, device="meta")
        perm = torch.empty(num_edges, **meta) if with_perm else None
        return cls(torch.empty(num_dst + 1, **meta), torch.empty(num_edges, **meta), num_src, perm)

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
            self._transpose()
        return self._transposed

    @torch.compiler.disable  # data-dependent (the count per source): eager, once per graph
    def _transpose(self) -> None:
        refuse_under_export("the graph's transpose (built for gradients)")
        if self.device.type == "meta":  # a shape-only graph
            meta = dict(dtype=self.index_dtype, device="meta")
            self._transposed = (torch.empty(self.num_src + 1, **meta), torch.empty(self.num_edges, **meta),
                                torch.empty(self.num_edges, **meta))
            return
        with torch.inference_mode(False):  # autograd saves the transpose for backward
            dst = self.destinations()
            src = self.col.long()
            perm_t = torch.sort(src, stable=True).indices
            rowptr_t = _rowptr(src, self.num_src, self.index_dtype)
            self._transposed = (rowptr_t, dst[perm_t].to(self.index_dtype), perm_t.to(self.index_dtype))
        self._track(*self._transposed)

    def destinations(self) -> Tensor:
        """[num_edges] int64: the destination (row) of each edge, in CSR order."""
        return torch.repeat_interleave(torch.arange(self.num_dst, device=self.device), self.rowptr.diff().long(),
                                       output_size=self.num_edges)

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
        if self._csr_ordered is None or (self._csr_ordered._transposed is None and self._transposed is not None):
            self._order()
        return self._csr_ordered

    @torch.compiler.disable  # builds a graph (eager, once; then read from the cache)
    def _order(self) -> None:
        refuse_under_export("CSRGraph.csr_ordered")
        if self._csr_ordered is None:
            self._csr_ordered = CSRGraph(self.rowptr, self.col, self.num_src)
            self._csr_ordered._versions = [(t, v) for t, v in self._versions if t is not self.perm]
        if self._csr_ordered._transposed is None and self._transposed is not None:
            self._csr_ordered._transposed = self._transposed  # the transpose does not depend on the numbering
            self._csr_ordered._track(*self._transposed)

    def to_edge_index(self) -> Tensor:
        """PyG's edge_index [2, num_edges] int64 (row 0 sources, row 1 destinations), with the
        edges in the caller's order (the order of the edge tensors that go with this graph)."""
        csr = torch.stack([self.col.long(), self.destinations()])
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
            out._track(*out._transposed)
        return out

    def __repr__(self) -> str:
        return (f"CSRGraph(num_src={self.num_src}, num_dst={self.num_dst}, num_edges={self.num_edges}, "
                f"index_dtype={self.index_dtype}, device={self.device})")
