"""revgnn_ext.nn.GCNConv against PyG's (same state_dict): outputs and gradients over options, adjacency forms."""
import pytest
import torch

pyg = pytest.importorskip("torch_geometric")

from revgnn_ext import CSRGraph  # noqa: E402
from revgnn_ext.nn import GCNConv  # noqa: E402

from conftest import (DEVICES, assert_same_as_pyg, compare_with_pyg, config_id, make_graph,  # noqa: E402
                      max_cpu_allocation, raises, sparse_adj_t)

CONFIGS = [dict(), dict(improved=True), dict(add_self_loops=False), dict(improved=True, add_self_loops=False),
           dict(normalize=False), dict(bias=False)]


def _pair(config, in_channels=12, out_channels=16, device="cpu", dtype=torch.float64):
    ref = pyg.nn.GCNConv(in_channels, out_channels, **config).to(device, dtype)
    ours = GCNConv(in_channels, out_channels, **config).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _check(ours, ref, x, adj_ours, adj_ref, edge_weight=None, tol=1e-10):
    inputs = [t for t in (x, edge_weight) if t is not None and t.requires_grad]
    # PyG keeps a node's last loop weight by an index_put: on CUDA deterministic only with deterministic algorithms.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        out_ref = ref(x, adj_ref, edge_weight)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert_same_as_pyg(ours, ref, ours(x, adj_ours, edge_weight), out_ref, inputs, tol)


def _weighted_loops(shape):
    """A graph whose self loops carry weights, some nodes with two loops, some with none."""
    ei, n = make_graph(shape)
    loops = torch.tensor([[0, 3, 3, 5], [0, 3, 3, 5]])
    return torch.cat([ei, loops], 1), n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", ["power_law", "isolated", "self_loops", "duplicates", "no_edges"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_pyg(device, config, shape, weighted):
    ei, n = _weighted_loops(shape) if shape != "no_edges" else make_graph(shape)
    ei = ei.to(device)
    ours, ref = _pair(config, device=device)
    assert repr(ours) == repr(ref) and list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(n, 12, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.rand(ei.size(1), dtype=torch.float64, device=device, requires_grad=True) if weighted else None
    _check(ours, ref, x, ei, ei, weight)
    _check(ours, ref, x, CSRGraph.from_edge_index(ei, n), ei, weight)  # a CSRGraph is an edge_index, edge order kept


@pytest.mark.parametrize("config", CONFIGS[:-1], ids=config_id)
@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr])
def test_torch_sparse_adjacency_matches_pyg(config, layout):
    """A sparse adj_t's values are the weights, with their gradient; PyG adds fill * I (existing loops included)."""
    ei, n = _weighted_loops("duplicates")
    value = torch.rand(ei.size(1), dtype=torch.float64, requires_grad=True)

    def adjacency(layout):  # built anew for each backward: its construction is part of the autograd graph
        return sparse_adj_t(ei, value, n, n, layout)
    ours, ref = _pair(config)
    x = torch.randn(n, 12, dtype=torch.float64, requires_grad=True)
    _check(ours, ref, x, adjacency(layout), adjacency(layout))
    gout = torch.randn(n, 16, dtype=torch.float64)
    grad_ours, = torch.autograd.grad(ours(x, adjacency(layout)), value, gout)
    grad_pyg, = torch.autograd.grad(ref(x, adjacency(torch.sparse_csr)), value, gout)  # PyG's COO path has none
    torch.testing.assert_close(grad_ours, grad_pyg, rtol=1e-10, atol=1e-10)


def test_float32_output_and_gradients_within_twice_pygs_error():
    ei, n = _weighted_loops("power_law")
    ours, ref = _pair(dict(), dtype=torch.float32)
    compare_with_pyg(ours, ref, (torch.randn(n, 12), ei, torch.rand(ei.size(1))), 1e-6)


def test_cached_reuses_the_first_graph_as_pyg():
    ei, n = make_graph("random")
    other, _ = make_graph("random", seed=1)
    ours, ref = _pair(dict(cached=True))
    x = torch.randn(n, 12, dtype=torch.float64)
    weight = torch.rand(ei.size(1), dtype=torch.float64)
    first = ours(x, ei, weight)
    assert ours._cached_edge_index is not None
    torch.testing.assert_close(ours(x, other), first)  # the cache wins over the graph given, as in PyG
    torch.testing.assert_close(first, ref(x, ei, weight))
    ours.reset_parameters()
    assert ours._cached_edge_index is None


def test_static_graph_batch_sparse_features_and_uncoalesced_adjacency():
    ei, n = make_graph("random")
    ours, ref = _pair(dict())
    x = torch.randn(3, n, 12, dtype=torch.float64, requires_grad=True)
    _check(ours, ref, x, ei, ei)
    for config in (dict(), dict(bias=False)):  # contiguous as PyG's, so that out.view(3, -1) works
        out = _pair(config)[0](x, ei)
        assert out.is_contiguous() and out.view(3, -1).shape == (3, n * 16)
    x_sparse = torch.randn(n, 12, dtype=torch.float64).relu().to_sparse()
    torch.testing.assert_close(ours(x_sparse, ei), ref(x_sparse, ei), rtol=1e-10, atol=1e-10)
    ei, n = make_graph("duplicates")  # an uncoalesced COO adjacency: its duplicates summed, as PyG's
    adj_t = torch.sparse_coo_tensor(ei.flip(0), torch.rand(ei.size(1), dtype=torch.float64), (n, n))
    x = torch.randn(n, 12, dtype=torch.float64)
    torch.testing.assert_close(ours(x, adj_t), ref(x, adj_t.coalesce()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_wider_edge_weights_promote_as_pyg(config):
    # float64 edge weights with float32 features give float64 (PyG's promotion); narrower ones the features' dtype.
    ei, n = make_graph("self_loops")
    ours, ref = _pair(config, dtype=torch.float32)
    x = torch.randn(n, 12, requires_grad=True)
    for dtype in (torch.float64, torch.float16):
        weight = torch.rand(ei.size(1), dtype=dtype, requires_grad=True)
        out = ours(x, ei, weight)
        assert out.dtype == ref(x, ei, weight).dtype
    _check(ours, ref, x, ei, ei, torch.rand(ei.size(1), dtype=torch.float64, requires_grad=True), tol=1e-5)


def test_fallbacks_warn_and_match_pyg():
    ei, n = make_graph("random")
    x = torch.randn(n, 12, dtype=torch.float64)
    for config, reason in ((dict(flow="target_to_source"), "flow='target_to_source'"),
                           (dict(aggr="mean"), "aggregation")):
        ours, ref = _pair(config)
        with pytest.warns(UserWarning, match=reason):
            out = ours(x, ei)
        torch.testing.assert_close(out, ref(x, ei))
    ours, _ = _pair(dict())
    with raises(ValueError, "GCNConv", "bipartite"):
        ours((x, x), ei)


def test_no_edge_by_channel_allocation():
    """The largest allocation of a training step is far below [E, C] (PyG allocates several)."""
    ei = torch.randint(0, 500, (2, 40000))
    ours, _ = _pair(dict(), 128, 128, dtype=torch.float32)
    x = torch.randn(500, 128, requires_grad=True)
    weight = torch.rand(ei.size(1), requires_grad=True)

    def step():
        ours(x, ei, weight).sum().backward()
    step()
    assert max_cpu_allocation(step) < ei.size(1) * 128 * 4 / 8


def test_compiles_without_graph_breaks_on_a_graph():
    """torch.compile(fullgraph=True) on a CSRGraph whose derived forms a first eager call built."""
    ei, n = _weighted_loops("random")
    graph = CSRGraph.from_edge_index(ei, n)
    x = torch.randn(n, 12, dtype=torch.float64)
    weight = torch.rand(ei.size(1), dtype=torch.float64)
    for config in (dict(), dict(add_self_loops=False), dict(normalize=False)):
        ours, ref = _pair(config)
        expected = ours(x, graph, weight)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(ours, backend="eager", fullgraph=True)(x, graph, weight), expected)
        torch.testing.assert_close(expected, ref(x, ei, weight))
