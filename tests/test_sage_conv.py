"""revgnn_ext.nn.SAGEConv against PyG's SAGEConv with the same state_dict."""

import pytest
import torch

pyg = pytest.importorskip("torch_geometric")

from revgnn_ext import CSRGraph  # noqa: E402
from revgnn_ext.nn import SAGEConv  # noqa: E402

from conftest import (DEVICES, assert_same_as_pyg, compare_with_pyg, config_id, make_graph, raises,  # noqa: E402
                      sparse_adj_t)

CONFIGS = [dict(), dict(aggr="sum"), dict(aggr="max", root_weight=False), dict(aggr="min", bias=False),
           dict(normalize=True), dict(project=True)]


def _pair(config, in_channels, out_channels, device):
    ref = pyg.nn.SAGEConv(in_channels, out_channels, **config).to(device).double()
    ours = SAGEConv(in_channels, out_channels, **config).to(device).double()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _check(ours, ref, x, edge_index, **kw):
    inputs = [t for t in (x if isinstance(x, tuple) else (x,)) if t is not None]
    assert_same_as_pyg(ours, ref, ours(x, edge_index, **kw), ref(x, edge_index, **kw), inputs, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", ["power_law", "isolated", "self_loops"])
def test_matches_pyg(device, config, shape):
    ei, n = make_graph(shape)
    ours, ref = _pair(config, 12, 16, device)
    assert repr(ours) == repr(ref) and list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(n, 12, dtype=torch.float64, device=device, requires_grad=True)
    _check(ours, ref, x, ei.to(device))


@pytest.mark.parametrize("config", [dict(project=True), dict(aggr="max", project=True, normalize=True)], ids=config_id)
def test_autocast_bfloat16(config):
    """bfloat16 autocast (project=True: bfloat16 features reach the aggregation): within twice PyG's error."""
    ei, n = make_graph("power_law")
    ours, ref = (module.float() for module in _pair(config, 12, 16, "cpu"))
    x = torch.randn(n, 12, requires_grad=True)
    out = compare_with_pyg(ours, ref, (x, ei), 4 * torch.finfo(torch.bfloat16).eps, autocast=True)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("config", [dict(), dict(project=True)], ids=config_id)
def test_bipartite_and_graph_inputs(config):
    ei, size = make_graph("bipartite")
    ours, ref = _pair(config, (10, 6), 8, "cpu")
    x_src = torch.randn(size[0], 10, dtype=torch.float64, requires_grad=True)
    x_dst = torch.randn(size[1], 6, dtype=torch.float64, requires_grad=True)
    for x in ((x_src, x_dst), (x_src, None)):
        _check(ours, ref, x, ei, size=size)
        torch.testing.assert_close(ours(x, CSRGraph.from_edge_index(ei, size)), ref(x, ei, size=size))


def test_flow_and_explain_run_pygs_propagate():
    from torch_geometric.explain.algorithm.utils import set_masks
    ei, n = make_graph("random")
    x = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    ours, ref = _pair(dict(flow="target_to_source"), 8, 8, "cpu")
    with pytest.warns(UserWarning, match="flow='target_to_source'"):
        _check(ours, ref, x, ei)
    torch.testing.assert_close(ours(x, CSRGraph.from_edge_index(ei, n)), ref(x, ei))
    ours, ref = _pair(dict(), 8, 8, "cpu")
    mask = torch.randn(ei.size(1), dtype=torch.float64)
    set_masks(ours, mask, ei)
    set_masks(ref, mask, ei)
    with pytest.warns(UserWarning, match="explain mode"):
        _check(ours, ref, x, ei)


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("aggr", ["sum", "mean", "max", "min"])
def test_weighted_sparse_adjacency(layout, aggr):
    """A sparse adj_t's values weight the messages as in PyG (gradients too); it gives (x_src, None) its size."""
    ei, (num_src, num_dst) = make_graph("bipartite")
    ours, ref = _pair(dict(aggr=aggr), (10, 6), 8, "cpu")
    x_src = torch.randn(num_src, 10, dtype=torch.float64, requires_grad=True)
    x_dst = torch.randn(num_dst, 6, dtype=torch.float64, requires_grad=True)
    values = (torch.rand(ei.size(1), dtype=torch.float64) + 0.5).requires_grad_()
    def adj(values):  # a fresh adjacency per backward
        return sparse_adj_t(ei, values, num_src, num_dst, layout)
    for x in ((x_src, x_dst), (x_src, None)):
        out = ours(x, adj(values))
        assert out.shape == (num_dst, 8)
        assert_same_as_pyg(ours, ref, out, ref(x, adj(values)), [t for t in x if t is not None] + [values], 1e-10)
        assert torch.autograd.grad(ours(x, adj(values)).sum(), values)[0].abs().sum() > 0
    assert not torch.allclose(ours((x_src, x_dst), adj(values)), ours((x_src, x_dst), adj(torch.ones_like(values))))


@pytest.mark.parametrize("aggr", ["sum", "mean", "max"])
def test_uncoalesced_sparse_adjacency(aggr):
    """An uncoalesced COO adj_t's duplicates are one edge of summed weight, as in PyG; the values get gradients."""
    ei = torch.tensor([[0, 0, 1, 2, 2], [1, 1, 2, 0, 1]])
    ours, ref = _pair(dict(aggr=aggr), 8, 8, "cpu")
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    values = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0], dtype=torch.float64, requires_grad=True)
    outs = [module(x, torch.sparse_coo_tensor(ei.flip(0), values, (3, 3))) for module in (ours, ref)]
    assert_same_as_pyg(ours, ref, *outs, [x, values], 1e-10)


def test_torch_sparse_values_are_dropped_as_in_pyg():
    torch_sparse = pytest.importorskip("torch_sparse")
    ei, n = make_graph("random")
    ours, ref = _pair(dict(), 8, 8, "cpu")
    x = torch.randn(n, 8, dtype=torch.float64)
    adj_t = torch_sparse.SparseTensor(row=ei[1], col=ei[0], value=torch.rand(ei.size(1), dtype=torch.float64),
                                      sparse_sizes=(n, n))
    torch.testing.assert_close(ours(x, adj_t), ref(x, adj_t))
    torch.testing.assert_close(ours(x, adj_t), ours(x, ei))


def test_lazy_in_channels():
    ei, n = make_graph("random")
    outs = []
    for cls in (pyg.nn.SAGEConv, SAGEConv):
        torch.manual_seed(0)
        conv = cls(-1, 16)
        assert repr(conv) == "SAGEConv(-1, 16, aggr=mean)"
        outs.append(conv(torch.randn(n, 7, generator=torch.Generator().manual_seed(1)), ei))
    torch.testing.assert_close(outs[1], outs[0])
    with raises(ValueError, "SAGEConv", "project"):
        SAGEConv(-1, 16, project=True)


def test_edge_order_does_not_matter():
    ei, n = make_graph("power_law")
    x = torch.randn(n, 8, dtype=torch.float64)
    perm = torch.randperm(ei.size(1))
    for aggr in ("mean", "max"):
        conv = SAGEConv(8, 8, aggr=aggr).double()
        torch.testing.assert_close(conv(x, ei[:, perm]), conv(x, ei), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aggr", ["std", "lstm"])
def test_unfused_aggregation_falls_back_to_pygs(aggr):
    ei, n = make_graph("random") if aggr == "std" else (torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 1, 3]]), 5)
    ours, ref = _pair(dict(aggr=aggr), 8, 8, "cpu")
    x = torch.randn(n, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="falling back"):
        torch.testing.assert_close(ours(x, ei), ref(x, ei))
    if aggr == "lstm":  # PyG's LSTM aggregation needs a sorted index
        with raises(ValueError, "index"):
            ours(x, ei[:, [1, 0, 2, 3, 4]].flip(1))


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of a fused layer on a CSRGraph, an unfused one (PyG's propagate) on edges."""
    ei, n = make_graph("random")
    graph = CSRGraph.from_edge_index(ei, n)
    graph.transposed()
    x = torch.randn(n, 8)
    for conv, adj in ((SAGEConv(8, 16, aggr="max"), graph),
                      (SAGEConv(8, 16, aggr=["mean", "sum", "min", "max", "std"]), ei)):
        expected = conv(x, adj)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(conv, backend="eager", fullgraph=True)(x, adj), expected)
