"""revgnn_ext.nn.GATConv against PyG's (same state_dict): outputs and gradients over options, adjacency forms and
graph shapes (eval mode); training-mode attention dropout replays from torch's random state."""
import pytest
import torch

pyg = pytest.importorskip("torch_geometric")

from revgnn_ext import CSRGraph  # noqa: E402
from revgnn_ext.graph import CSRGraph as GraphClass  # noqa: E402
from revgnn_ext.nn import GATConv  # noqa: E402

from conftest import (DEVICES, assert_same_as_pyg, compare_with_pyg, config_id, make_graph, raises,  # noqa: E402
                      sparse_adj_t)

CONFIGS = [dict(), dict(heads=3), dict(heads=3, concat=False), dict(add_self_loops=False, heads=2),
           dict(edge_dim=4, heads=2), dict(edge_dim=4, fill_value=0.5), dict(edge_dim=4, fill_value="add", heads=2),
           dict(edge_dim=1, heads=2), dict(residual=True, bias=False, heads=2), dict(negative_slope=0.05, dropout=0.5)]


def _pair(config, in_channels=12, out_channels=8, device="cpu", dtype=torch.float64):
    ref = pyg.nn.GATConv(in_channels, out_channels, **config).to(device, dtype).eval()
    ours = GATConv(in_channels, out_channels, **config).to(device, dtype).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _check(ours, ref, x, adj_ours, adj_ref, edge_attr=None, size=None, tol=1e-10):
    tensors = [t for t in (x if isinstance(x, tuple) else (x,)) + (edge_attr,) if t is not None and t.requires_grad]
    assert_same_as_pyg(ours, ref, ours(x, adj_ours, edge_attr, size=size), ref(x, adj_ref, edge_attr, size=size),
                       tensors, tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", ["power_law", "isolated", "self_loops", "duplicates", "no_edges"])
def test_matches_pyg(device, config, shape):
    ei, n = make_graph(shape)
    ei = ei.to(device)
    ours, ref = _pair(config, device=device)
    assert repr(ours) == repr(ref) and list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(n, 12, dtype=torch.float64, device=device, requires_grad=True)
    dim = config.get("edge_dim")
    size = (ei.size(1),) if dim == 1 else (ei.size(1), dim)  # a 1-D edge_attr is PyG's edge weight form
    edge_attr = None if dim is None else torch.randn(size, dtype=torch.float64, device=device, requires_grad=True)
    _check(ours, ref, x, ei, ei, edge_attr)
    _check(ours, ref, x, CSRGraph.from_edge_index(ei, n), ei, edge_attr)  # edge features in the caller's order


def test_fill_value_tensor_and_lazy_edge_dim():
    ei, n = make_graph("self_loops")
    x = torch.randn(n, 12, dtype=torch.float64, requires_grad=True)
    edge_attr = torch.randn(ei.size(1), 3, dtype=torch.float64, requires_grad=True)
    _check(*_pair(dict(edge_dim=3, fill_value=torch.tensor([0.1, -2.0, 3.0], dtype=torch.float64))), x, ei, ei,
           edge_attr)
    ref = pyg.nn.GATConv(-1, 8, heads=2, edge_dim=-1).double().eval()
    ref(x, ei, edge_attr)  # sizes the lazy layers
    ours = GATConv(-1, 8, heads=2, edge_dim=-1).double().eval()
    ours(x, ei, edge_attr)
    ours.load_state_dict(ref.state_dict())
    _check(ours, ref, x, ei, ei, edge_attr)


@pytest.mark.parametrize("residual", [False, True])
def test_bipartite_inputs(residual):
    ei, (num_src, num_dst) = make_graph("bipartite")
    x_src = torch.randn(num_src, 10, dtype=torch.float64, requires_grad=True)
    x_dst = torch.randn(num_dst, 6, dtype=torch.float64, requires_grad=True)
    ours, ref = _pair(dict(heads=2, residual=residual, edge_dim=3), in_channels=(10, 6))
    edge_attr = torch.randn(ei.size(1), 3, dtype=torch.float64, requires_grad=True)
    _check(ours, ref, (x_src, x_dst), ei, ei, edge_attr)
    _check(ours, ref, (x_src, None), ei, ei, edge_attr, size=(num_src, num_dst))
    graph = CSRGraph.from_edge_index(ei, (num_src, num_dst))
    _check(ours, ref, (x_src, None), graph, ei, edge_attr, size=(num_src, num_dst))
    # a shared projection applied to both sides
    ours, ref = _pair(dict(heads=2), in_channels=10)
    _check(ours, ref, (x_src, x_src[:num_dst]), ei, ei)


def test_torch_sparse_adjacency_bipartite_and_uncoalesced():
    ei, (num_src, num_dst) = make_graph("bipartite")
    adj_t = sparse_adj_t(ei, torch.ones(ei.size(1)), num_src, num_dst)
    x_src = torch.randn(num_src, 12, dtype=torch.float64, requires_grad=True)
    ours, ref = _pair(dict(heads=2))
    _check(ours, ref, (x_src, None), adj_t, adj_t)
    _check(ours, ref, (x_src, None), adj_t.to_sparse_csr(), adj_t.to_sparse_csr())
    ei, n = make_graph("duplicates")  # uncoalesced: coalesced as in PyG (one edge of summed value)
    adj_t = torch.sparse_coo_tensor(ei.flip(0), torch.ones(ei.size(1), dtype=torch.float64), (n, n))
    assert not adj_t.is_coalesced()
    x = torch.randn(n, 12, dtype=torch.float64, requires_grad=True)
    for config in (dict(heads=2), dict(add_self_loops=False)):
        ours, ref = _pair(config)
        _check(ours, ref, x, adj_t, adj_t.coalesce())


def test_float32_output_and_gradients_within_twice_pygs_error():
    ei, n = make_graph("power_law")
    ours, ref = _pair(dict(heads=3, edge_dim=4), dtype=torch.float32)
    compare_with_pyg(ours, ref, (torch.randn(n, 12), ei, torch.randn(ei.size(1), 4)), 1e-6)


def test_the_looped_graph_is_built_once_per_graph_and_an_edited_graph_raises(monkeypatch):
    ei, n = make_graph("random")
    ours, _ = _pair(dict())
    x = torch.randn(n, 12, dtype=torch.float64)
    built = []
    original = GraphClass.from_edge_index.__func__
    monkeypatch.setattr(GraphClass, "from_edge_index", classmethod(lambda cls, *a, **k: built.append(1) or
                                                                   original(cls, *a, **k)))
    first = ours(x, ei)
    count = len(built)
    assert count >= 1
    for _ in range(3):
        torch.testing.assert_close(ours(x, ei), first)
    assert len(built) == count
    graph = CSRGraph.from_edge_index(ei, n)
    ours(x, graph)
    graph.col[0] = (graph.col[0] + 1) % n
    with raises(RuntimeError, "CSRGraph"):  # an edited graph: not its cached looped graph
        ours(x, graph)


def test_training_dropout_replays_from_the_random_state():
    ei, n = make_graph("power_law")
    ours, ref = _pair(dict(heads=2, dropout=0.5))
    x = torch.randn(n, 12, dtype=torch.float64)
    evaluated = ours(x, ei)
    ours.train()
    torch.manual_seed(3)
    first = ours(x, ei)
    torch.manual_seed(3)
    assert torch.equal(ours(x, ei), first)
    assert not torch.equal(ours(x, ei), first)  # a new draw
    assert not torch.allclose(first, evaluated)
    # without dropout, training mode is PyG's
    ours.dropout = ref.dropout = 0.0
    ref.train()
    torch.testing.assert_close(ours(x, ei), ref(x, ei), rtol=1e-10, atol=1e-10)


def test_fallbacks_warn_and_match_pyg():
    ei, n = make_graph("random")
    x = torch.randn(n, 12, dtype=torch.float64)
    ours, ref = _pair(dict(heads=2))
    with pytest.warns(UserWarning, match="return_attention_weights"):
        out, (edges, alpha) = ours(x, ei, return_attention_weights=True)
    out_r, (edges_r, alpha_r) = ref(x, ei, return_attention_weights=True)
    torch.testing.assert_close(out, out_r)
    assert torch.equal(out, ours(x, ei))  # our output with the weights, as PyG's test of this checks (allclose 1e-8)
    assert torch.equal(edges, edges_r)
    torch.testing.assert_close(alpha, alpha_r)
    assert ours(x[:0], ei[:, :0]).shape == (0, 16)  # an empty graph
    ours, ref = _pair(dict(flow="target_to_source"))
    with pytest.warns(UserWarning, match="flow='target_to_source'"):
        out = ours(x, ei)
    torch.testing.assert_close(out, ref(x, ei))
    with raises(ValueError, "GATConv"):
        ours.flow = "source_to_target"
        ours(x.expand(2, -1, -1), ei)
