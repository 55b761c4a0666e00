"""CSRGraph: construction from every accepted format, validation, transpose, devices."""
import pytest
import torch

from revgnn_ext import CSRGraph

from conftest import SHAPES, make_graph


def _edges_from_csr(g):
    """Set-free check helper: (src, dst) per CSR edge."""
    dst = torch.repeat_interleave(torch.arange(g.num_dst), (g.rowptr[1:] - g.rowptr[:-1]).long())
    return g.col.long(), dst


@pytest.mark.parametrize("shape", SHAPES)
def test_from_edge_index_layout(shape):
    ei, n = make_graph(shape)
    g = CSRGraph.from_edge_index(ei, n)
    num_src, num_dst = n if isinstance(n, tuple) else (n, n)
    assert (g.num_src, g.num_dst, g.num_edges) == (num_src, num_dst, ei.size(1))
    assert g.rowptr.dtype == g.col.dtype == torch.int32
    src, dst = _edges_from_csr(g)
    # CSR edge e is the caller's edge perm[e]: same endpoints.
    perm = g.perm.long()
    assert torch.equal(src, ei[0, perm]) and torch.equal(dst, ei[1, perm])
    assert torch.equal(torch.sort(perm).values, torch.arange(ei.size(1)))
    # Rows sorted by destination; within a row, the caller's order (stable).
    assert bool((dst[1:] >= dst[:-1]).all())
    same_row = dst[1:] == dst[:-1]
    assert bool((perm[1:][same_row] > perm[:-1][same_row]).all())


@pytest.mark.parametrize("shape", SHAPES)
def test_transposed(shape):
    ei, n = make_graph(shape)
    g = CSRGraph.from_edge_index(ei, n)
    rowptr_t, col_t, perm_t = g.transposed()
    assert g.transposed()[0] is rowptr_t  # cached
    assert rowptr_t.numel() == g.num_src + 1 and rowptr_t.dtype == g.index_dtype
    src, dst = _edges_from_csr(g)
    src_t = torch.repeat_interleave(torch.arange(g.num_src), (rowptr_t[1:] - rowptr_t[:-1]).long())
    # Transposed entry t is CSR edge perm_t[t], with the same endpoints.
    assert torch.equal(src_t, src[perm_t.long()]) and torch.equal(col_t.long(), dst[perm_t.long()])
    assert torch.equal(torch.sort(perm_t.long()).values, torch.arange(g.num_edges))


@pytest.mark.parametrize("shape", SHAPES)
def test_to_edge_index_gives_the_callers_edges_back(shape):
    ei, n = make_graph(shape)
    g = CSRGraph.from_edge_index(ei, n)
    assert torch.equal(g.to_edge_index(), ei)
    csr = g.csr_ordered()  # numbered in CSR order: the caller's edges reordered by edges_to_csr
    assert torch.equal(csr.to_edge_index(), g.edges_to_csr(ei.t()).t())


def test_edges_to_csr_and_errors():
    ei = torch.tensor([[0, 1, 2, 0], [2, 2, 0, 1]])
    g = CSRGraph.from_edge_index(ei)
    w = torch.tensor([10.0, 11.0, 12.0, 13.0])
    assert g.edges_to_csr(w).tolist() == [12.0, 13.0, 10.0, 11.0]
    with pytest.raises(ValueError, match="one entry per edge"):
        g.edges_to_csr(torch.ones(3))


def test_num_nodes_forms():
    ei = torch.tensor([[0, 4], [1, 2]])
    assert CSRGraph.from_edge_index(ei).num_dst == 5
    g = CSRGraph.from_edge_index(ei, 9)
    assert (g.num_src, g.num_dst) == (9, 9)
    g = CSRGraph.from_edge_index(ei, (5, 3))
    assert (g.num_src, g.num_dst) == (5, 3)
    with pytest.raises(ValueError, match="num_nodes"):
        CSRGraph.from_edge_index(ei, (1, 2, 3))


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[0, -3], [1, 1]]), "negative index -3"),
    (torch.tensor([[0, 1], [1, 7]]), r"index 7 .*num_dst = 5"),
    (torch.tensor([[9, 1], [1, 1]]), r"index 9 .*num_src = 5"),
])
def test_out_of_range_indices(bad, match):
    with pytest.raises(ValueError, match=match):
        CSRGraph.from_edge_index(bad, 5)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.zeros(3, 4, dtype=torch.long), ValueError, r"shape \[2, num_edges\]"),
    (torch.zeros(4, dtype=torch.long), ValueError, r"shape \[2, num_edges\]"),
    (torch.zeros(2, 4), TypeError, "integer"),
    ([[0, 1], [1, 0]], TypeError, "tensor"),
])
def test_bad_edge_index(bad, exc, match):
    with pytest.raises(exc, match=match):
        CSRGraph.from_edge_index(bad, 3)


def test_from_csr_validation():
    g = CSRGraph.from_csr(torch.tensor([0, 2, 2, 3]), torch.tensor([1, 0, 4]), num_src=5)
    assert (g.num_src, g.num_dst, g.num_edges) == (5, 3, 3) and g.perm is None
    with pytest.raises(ValueError, match="non-decreasing"):
        CSRGraph.from_csr(torch.tensor([0, 2, 1, 3]), torch.tensor([1, 0, 4]))
    with pytest.raises(ValueError, match="end at len"):
        CSRGraph.from_csr(torch.tensor([0, 2, 2, 4]), torch.tensor([1, 0, 4]))
    with pytest.raises(ValueError, match="index 4"):
        CSRGraph.from_csr(torch.tensor([0, 2, 2, 3]), torch.tensor([1, 0, 4]), num_src=4)


def test_from_sparse_coo_and_csr():
    ei, n = make_graph("bipartite")
    values = torch.randn(ei.size(1))
    coo = torch.sparse_coo_tensor(ei.flip(0), values, (17, 30))  # adj_t: rows = destinations
    g = CSRGraph.from_sparse(coo)
    ref = CSRGraph.from_edge_index(ei, n)
    assert torch.equal(g.rowptr, ref.rowptr) and torch.equal(g.col, ref.col)
    assert torch.equal(g.edges_to_csr(values), ref.edges_to_csr(values))
    csr = coo.coalesce().to_sparse_csr()
    g = CSRGraph.from_sparse(csr)
    assert (g.num_src, g.num_dst, g.num_edges) == (30, 17, csr.values().numel())
    assert torch.equal(g.rowptr.long(), csr.crow_indices()) and torch.equal(g.col.long(), csr.col_indices())
    with pytest.raises(TypeError, match="torch.sparse"):
        CSRGraph.from_sparse(torch.zeros(3, 3))


def test_from_pyg_edge_index():
    pyg = pytest.importorskip("torch_geometric")
    if not hasattr(pyg, "EdgeIndex"):
        pytest.skip("this torch_geometric has no EdgeIndex")
    ei, _ = make_graph("random")
    g = CSRGraph.from_edge_index(pyg.EdgeIndex(ei, sparse_size=(50, 60)))
    assert (g.num_src, g.num_dst) == (50, 60)
    ref = CSRGraph.from_edge_index(ei, (50, 60))
    assert torch.equal(g.col, ref.col) and torch.equal(g.perm, ref.perm)


def test_from_torch_sparse_tensor():
    torch_sparse = pytest.importorskip("torch_sparse")
    ei, _ = make_graph("random")
    adj_t = torch_sparse.SparseTensor(row=ei[1], col=ei[0], sparse_sizes=(40, 40))
    g = CSRGraph.from_sparse(adj_t)
    rowptr, col, _ = adj_t.csr()
    assert torch.equal(g.rowptr.long(), rowptr) and torch.equal(g.col.long(), col)


def test_to_device_and_repr():
    ei, n = make_graph("random")
    g = CSRGraph.from_edge_index(ei, n)
    g.transposed()
    m = g.to("meta")
    assert m.device.type == "meta" and m.transposed()[0].device.type == "meta"
    assert g.to("cpu") is g
    assert "num_edges=300" in repr(g) and "int32" in repr(g)
