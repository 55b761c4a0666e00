"""revgnn_ext.nn.SAGEConv against PyG's SAGEConv with the same state_dict."""
import pytest
import torch

pyg = pytest.importorskip("torch_geometric")

from revgnn_ext import CSRGraph  # noqa: E402
from revgnn_ext.nn import SAGEConv  # noqa: E402

from conftest import DEVICES, make_graph  # noqa: E402

CONFIGS = [dict(), dict(aggr="sum"), dict(aggr="max", root_weight=False), dict(aggr="min", bias=False),
           dict(normalize=True), dict(project=True)]


def _pair(config, in_channels, out_channels, device):
    ref = pyg.nn.SAGEConv(in_channels, out_channels, **config).to(device).double()
    ours = SAGEConv(in_channels, out_channels, **config).to(device).double()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _check(ours, ref, x, edge_index, **kw):
    inputs = [t for t in (x if isinstance(x, tuple) else (x,)) if t is not None]
    out_o, out_r = ours(x, edge_index, **kw), ref(x, edge_index, **kw)
    torch.testing.assert_close(out_o, out_r, rtol=1e-10, atol=1e-10)
    gout = torch.randn_like(out_o)
    g_o = torch.autograd.grad(out_o, inputs + list(ours.parameters()), gout)
    g_r = torch.autograd.grad(out_r, inputs + list(ref.parameters()), gout)
    for a, b in zip(g_o, g_r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("shape", ["power_law", "isolated", "self_loops"])
def test_matches_pyg(device, config, shape):
    ei, n = make_graph(shape)
    ours, ref = _pair(config, 12, 16, device)
    assert repr(ours) == repr(ref) and list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(n, 12, dtype=torch.float64, device=device, requires_grad=True)
    _check(ours, ref, x, ei.to(device))


def test_bipartite_and_graph_inputs():
    ei, (num_src, num_dst) = make_graph("bipartite")
    ours, ref = _pair(dict(), (10, 6), 8, "cpu")
    x_src = torch.randn(num_src, 10, dtype=torch.float64, requires_grad=True)
    x_dst = torch.randn(num_dst, 6, dtype=torch.float64, requires_grad=True)
    _check(ours, ref, (x_src, x_dst), ei)
    graph = CSRGraph.from_edge_index(ei, (num_src, num_dst))
    torch.testing.assert_close(ours((x_src, x_dst), graph), ref((x_src, x_dst), ei))


def test_unfused_aggregation_falls_back():
    ei, n = make_graph("random")
    ours, ref = _pair(dict(aggr="std"), 8, 8, "cpu")
    x = torch.randn(n, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="falling back"):
        out = ours(x, ei)
    torch.testing.assert_close(out, ref(x, ei))


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
