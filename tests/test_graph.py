"""CSRGraph: construction from every accepted format, validation, transpose, devices; clear errors;
inference mode; as_graph's cache."""
import subprocess
import sys
import warnings

import pytest
import torch

from revgnn_ext import CSRGraph
from revgnn_ext import adjacency
from revgnn_ext.adjacency import as_graph
from revgnn_ext.nn import GENConv, RevGNN, SAGEConv

from conftest import SHAPES, make_graph, raises


@pytest.mark.parametrize("shape", SHAPES)
def test_layout_transpose_and_the_callers_edges_back(shape):
    ei, n = make_graph(shape)
    g = CSRGraph.from_edge_index(ei, n)
    num_src, num_dst = n if isinstance(n, tuple) else (n, n)
    assert (g.num_src, g.num_dst, g.num_edges) == (num_src, num_dst, ei.size(1))
    assert g.rowptr.dtype == g.col.dtype == torch.int32
    src, dst = g.col.long(), torch.repeat_interleave(torch.arange(g.num_dst), (g.rowptr[1:] - g.rowptr[:-1]).long())
    perm = g.perm.long()  # CSR edge e is the caller's edge perm[e]: same endpoints
    assert torch.equal(src, ei[0, perm]) and torch.equal(dst, ei[1, perm])
    assert torch.equal(torch.sort(perm).values, torch.arange(ei.size(1)))
    # Rows sorted by destination; within a row, the caller's order (stable).
    assert bool((dst[1:] >= dst[:-1]).all())
    same_row = dst[1:] == dst[:-1]
    assert bool((perm[1:][same_row] > perm[:-1][same_row]).all())
    rowptr_t, col_t, perm_t = g.transposed()
    assert g.transposed()[0] is rowptr_t  # cached
    assert rowptr_t.numel() == g.num_src + 1 and rowptr_t.dtype == g.index_dtype
    src_t = torch.repeat_interleave(torch.arange(g.num_src), (rowptr_t[1:] - rowptr_t[:-1]).long())
    # Transposed entry t is CSR edge perm_t[t], with the same endpoints.
    assert torch.equal(src_t, src[perm_t.long()]) and torch.equal(col_t.long(), dst[perm_t.long()])
    assert torch.equal(torch.sort(perm_t.long()).values, torch.arange(g.num_edges))
    assert torch.equal(g.to_edge_index(), ei)
    csr = g.csr_ordered()  # numbered in CSR order: the caller's edges reordered by edges_to_csr
    assert torch.equal(csr.to_edge_index(), g.edges_to_csr(ei.t()).t())


EDGES, COL, META = torch.tensor([[0, 4], [1, 2]]), torch.tensor([1, 0, 4]), torch.empty(2, 7, dtype=torch.long,
                                                                                            device="meta")
FROM_EDGE_INDEX, FROM_CSR, FROM_SPARSE = "CSRGraph.from_edge_index", "CSRGraph.from_csr", "CSRGraph.from_sparse"
NOT_ONE_ADJACENCY = [torch.ones(2, 3, 3).to_sparse(), torch.ones(2, 3, 3).to_sparse_csr(),  # batches
                     torch.ones(3, 3).to_sparse(1)]  # one sparse dimension


def test_num_nodes_forms_edges_to_csr_and_from_csr():
    g = CSRGraph.from_edge_index(torch.tensor([[0, 1, 2, 0], [2, 2, 0, 1]]))
    assert g.edges_to_csr(torch.tensor([10.0, 11.0, 12.0, 13.0])).tolist() == [12.0, 13.0, 10.0, 11.0]
    assert CSRGraph.from_edge_index(EDGES).num_dst == 5
    g = CSRGraph.from_edge_index(EDGES, 9)
    assert (g.num_src, g.num_dst) == (9, 9)
    g = CSRGraph.from_edge_index(EDGES, (5, 3))
    assert (g.num_src, g.num_dst) == (5, 3)
    g = CSRGraph.from_csr(torch.tensor([0, 2, 2, 3]), COL, num_src=5)
    assert (g.num_src, g.num_dst, g.num_edges) == (5, 3, 3) and g.perm is None


@pytest.mark.parametrize("call, exc, names", [
    (lambda: CSRGraph.from_edge_index(EDGES, (1, 2, 3)), ValueError, [FROM_EDGE_INDEX, "num_nodes"]),
    (lambda: CSRGraph.from_edge_index(torch.tensor([[0, -3], [1, 1]]), 5), ValueError,
     [FROM_EDGE_INDEX, "edge_index[0]", "-3"]),
    (lambda: CSRGraph.from_edge_index(torch.tensor([[0, 1], [1, 7]]), 5), ValueError,
     [FROM_EDGE_INDEX, "edge_index[1]", "7", "num_dst"]),
    (lambda: CSRGraph.from_edge_index(torch.tensor([[9, 1], [1, 1]]), 5), ValueError,
     [FROM_EDGE_INDEX, "edge_index[0]", "9", "num_src"]),
    *[(lambda bad=bad: CSRGraph.from_edge_index(bad, 3), ValueError, [FROM_EDGE_INDEX, "edge_index"])
      for bad in (torch.zeros(3, 4, dtype=torch.long), torch.zeros(4, dtype=torch.long))],
    (lambda: CSRGraph.from_edge_index(torch.zeros(2, 4), 3), TypeError, [FROM_EDGE_INDEX, "edge_index"]),
    (lambda: CSRGraph.from_edge_index([[0, 1], [1, 0]], 3), TypeError, [FROM_EDGE_INDEX, "edge_index"]),
    # a huge node count, given or inferred from a stray index, is refused at once
    (lambda: CSRGraph.from_edge_index(EDGES, num_nodes=10**13), ValueError, [FROM_EDGE_INDEX, "num_nodes"]),
    (lambda: CSRGraph.from_edge_index(torch.tensor([[0, 10**13], [1, 2]])), ValueError, [FROM_EDGE_INDEX, "num_nodes"]),
    (lambda: CSRGraph.from_edge_index(META), ValueError, [FROM_EDGE_INDEX, "meta", "num_nodes"]),
    (lambda: CSRGraph.from_csr(torch.tensor([0, 2, 1, 3]), COL), ValueError, [FROM_CSR, "rowptr"]),
    (lambda: CSRGraph.from_csr(torch.tensor([0, 2, 2, 4]), COL), ValueError, [FROM_CSR, "rowptr"]),
    (lambda: CSRGraph.from_csr(torch.tensor([0, 2, 2, 3]), COL, num_src=4), ValueError, [FROM_CSR, "col", "4"]),
    (lambda: CSRGraph.from_csr(torch.zeros(4, dtype=torch.long, device="meta"), META[0]), ValueError,
     [FROM_CSR, "meta", "num_src"]),
    (lambda: CSRGraph.from_sparse(torch.zeros(3, 3)), TypeError, [FROM_SPARSE]),
    *[(lambda adj=adj: CSRGraph.from_sparse(adj), ValueError, [FROM_SPARSE, "block-diagonal"])
      for adj in NOT_ONE_ADJACENCY],
    *[(lambda adj=adj: as_graph(adj, (3, 3)), ValueError, ["block-diagonal"]) for adj in NOT_ONE_ADJACENCY],
    (lambda: CSRGraph.from_edge_index(EDGES).edges_to_csr(torch.ones(3), "w"), ValueError, ["w"]),
])
def test_bad_input_raises_naming_the_argument(call, exc, names):
    with raises(exc, *names):
        call()


def test_from_sparse_coo_csr_and_hybrid():
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
    hybrid = torch.sparse_coo_tensor(ei.flip(0), torch.randn(ei.size(1), 4), (17, 30, 4))  # values [E, 4]
    assert torch.equal(CSRGraph.from_sparse(hybrid).col, ref.col)


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


def test_to_device_repr_and_meta_graphs():
    ei, n = make_graph("random")
    g = CSRGraph.from_edge_index(ei, n)
    g.transposed()
    m = g.to("meta")
    assert m.device.type == "meta" and m.transposed()[0].device.type == "meta"
    assert g.to("cpu") is g
    assert "num_edges=300" in repr(g) and "int32" in repr(g)
    g = CSRGraph.from_edge_index(META, (5, 3))  # a meta edge_index gives a shape-only graph
    assert (g.num_src, g.num_dst, g.num_edges, g.device.type) == (5, 3, 7, "meta")
    assert g.perm.shape == (7,) and g.transposed()[0].shape == (6,)
    assert as_graph(META, (5, 3)).num_edges == 7
    assert CSRGraph.from_csr(torch.zeros(4, dtype=torch.long, device="meta"), META[0], 9).num_dst == 3


# ---------------------------------------------------------------------------- inference mode
def _train_step(model, x, adj):
    model.zero_grad()
    model(x, adj).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("make", [
    lambda: GENConv(8, 8, aggr="softmax", learn_t=True), lambda: SAGEConv(8, 8), lambda: RevGNN(8, 16, 3, 2, dropout=0.0)],
    ids=["GENConv", "SAGEConv", "RevGNN"])
def test_inference_mode_edge_index_trains_afterwards(make):
    model = make()
    x = torch.randn(20, 8)
    with torch.inference_mode():
        ei = torch.randint(0, 20, (2, 60))  # an inference tensor
        model(x, ei)  # evaluated under inference mode: a cached conversion would be inference tensors
    expected = _train_step(model, x, ei.clone())
    for got, want in zip(_train_step(model, x, ei), expected):
        torch.testing.assert_close(got, want)
    fresh = torch.randint(0, 20, (2, 60))
    with torch.inference_mode():
        model(x, fresh)  # evaluated under inference mode, then trained on the same edge_index
    _train_step(model, x, fresh)


def test_graph_built_under_inference_mode_holds_normal_tensors():
    ei, n = make_graph("random")
    with torch.inference_mode():
        graphs = [CSRGraph.from_edge_index(ei, n), CSRGraph.from_csr(torch.tensor([0, 1, 2]), torch.tensor([1, 0]))]
        graphs[0].transposed()
    for g in graphs:
        assert not any(t.is_inference() for t in (g.rowptr, g.col, *g.transposed()))


# ---------------------------------------------------------------------------- as_graph's cache
def test_as_graph_converts_once_and_again_after_any_edit():
    ei, n = make_graph("random")
    g = as_graph(ei, (n, n))
    assert as_graph(ei, (n, n)) is g  # one conversion for many layers
    assert as_graph(ei, (n, n + 1)) is not g  # node counts are part of the key
    edits = {
        "in_place": lambda: ei[0, 0].fill_((int(ei[0, 0]) + 1) % n),
        "data": lambda: ei.data[1, 3].fill_((int(ei[1, 3]) + 1) % n),  # bypasses the version counter
        "numpy": lambda: ei.numpy().__setitem__((0, 5), (int(ei[0, 5]) + 1) % n),  # likewise
        "swap": lambda: ei.data.copy_(ei[:, torch.cat([torch.tensor([1, 0]), torch.arange(2, ei.size(1))])]),
    }
    for name, edit in edits.items():
        before = as_graph(ei, (n, n))
        edit()
        after = as_graph(ei, (n, n))
        assert after is not before, name
        assert torch.equal(after.to_edge_index(), ei), name


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.float32])
def test_fingerprint_on_cpu_is_the_sum_gpus_compute(dtype):
    """The threaded C++ pass (CPU) and the tensor ops (other devices) give one checksum: values
    and positions across the boundaries of the 4096-wide weight rows, strided input, int64 wrap."""
    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 4095, 4096, 4097, 3 * 4096 + 5):
        t = torch.randint(0, 200, (n,), generator=gen).to(dtype)
        assert adjacency._fingerprint(t) == adjacency._fingerprint_by_tensor_ops(t), n
    wide = torch.randint(-2**62, 2**62, (3, 5000), generator=gen).t()  # not contiguous; products wrap
    assert adjacency._fingerprint(wide) == adjacency._fingerprint_by_tensor_ops(wide)


def test_saved_edge_index_loads_without_revgnn_ext(tmp_path):
    ei, n = make_graph("random")
    GENConv(8, 8)(torch.randn(n, 8), ei)  # converted and cached
    path = tmp_path / "edge_index.pt"
    torch.save(ei, path)
    code = ("import sys, torch; t = torch.load(sys.argv[1], weights_only=True); "
            "assert 'revgnn_ext' not in sys.modules; print(t.sum().item())")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[-1]) == int(ei.sum())


@pytest.mark.parametrize("make", [lambda: GENConv(8, 8), lambda: SAGEConv(8, 8)], ids=["GENConv", "SAGEConv"])
def test_jit_trace_follows_the_edge_index_it_is_given(make):
    conv = make()
    x = torch.randn(20, 8)
    first, second = torch.randint(0, 20, (2, 60)), torch.randint(0, 20, (2, 60))
    conv(x, first)  # an eager call first: its cached conversion must not be baked into the trace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about the conversion's checks
        traced = torch.jit.trace(conv, (x, first))
    torch.testing.assert_close(traced(x, second), conv(x, second))
