"""revgnn_ext.nn.GENConv against PyG's GENConv with the same state_dict: outputs and every
gradient, over aggregations, options, input forms and devices."""
import copy
import warnings

import pytest
import torch

pyg = pytest.importorskip("torch_geometric")

from revgnn_ext import CSRGraph  # noqa: E402
from revgnn_ext.nn import GENConv  # noqa: E402

from conftest import (DEVICES, assert_error_within_twice, assert_same_as_pyg, compare_with_pyg, config_id,  # noqa: E402
                      graph_inputs, make_graph, module_grads, raises, sparse_adj_t)

CONFIGS = [
    dict(aggr="softmax", learn_t=True),
    dict(aggr="softmax", t=0.5),
    dict(aggr="softmax", learn_t=True, msg_norm=True, learn_msg_scale=True),
    dict(aggr="max"),
    dict(aggr="mean", norm="layer"),
    dict(aggr="add", num_layers=3),
    dict(aggr="powermean", learn_p=True, p=1.5),
    dict(aggr="powermean", p=2.0),
    dict(aggr="powermean"),
]
# Beside twice PyG's error, at the result's scale (float32 gradients of t, p sum over every edge and channel).
SLACK = {torch.float32: 1e-5, torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps}


def _pair(config, in_channels, out_channels, edge_dim, dtype, device, bias=True):
    ref = pyg.nn.GENConv(in_channels, out_channels, edge_dim=edge_dim, bias=bias, **config).to(device, dtype)
    ours = GENConv(in_channels, out_channels, edge_dim=edge_dim, bias=bias, **config).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_pyg(device, dtype, config):
    ours, ref = _pair(config, 16, 16, 8, dtype, device)
    compare_with_pyg(ours, ref, graph_inputs("power_law", 16, 8, dtype, device), SLACK.get(dtype))


@pytest.mark.parametrize("config", [dict(aggr="softmax", learn_t=True, msg_norm=True, learn_msg_scale=True), dict(aggr="max"),
                                    dict(aggr="powermean", p=1.5)],
                         ids=config_id)
def test_autocast_bfloat16(config):
    """bfloat16 autocast, float32 GENConv with lin_src: every result within twice PyG's error under autocast
    (no learned p: its gradient mostly cancels, and no seed-independent 2x rule holds)."""
    ours, ref = _pair(config, 12, 16, 8, torch.float32, "cpu")
    args = graph_inputs("power_law", 12, 8, torch.float32)
    assert compare_with_pyg(ours, ref, args, SLACK[torch.bfloat16], autocast=True).dtype == torch.bfloat16


@pytest.mark.parametrize("config", [dict(aggr="softmax", learn_t=True),
                                    dict(aggr="softmax", learn_t=True, msg_norm=True, learn_msg_scale=True)],
                         ids=config_id)
def test_autocast_bfloat16_errors_over_seeds(config):
    """README's bfloat16 autocast claim over 20 seeds: the output within twice PyG's error for every seed, each
    gradient (learned t included) at the median (a single seed's gradient ratio has no bound)."""
    ratios = {}
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        ei = torch.randint(0, 40, (2, 300), generator=gen)
        torch.manual_seed(seed)
        ours, ref = _pair(config, 12, 16, 8, torch.float32, "cpu")
        x = torch.randn(40, 12, requires_grad=True)
        edge_attr = torch.randn(300, 8, requires_grad=True)
        args = (x, ei, edge_attr)
        out_o, grads_o = module_grads(ours, args, autocast=True)
        out_r, grads_r = module_grads(ref, args, autocast=True)
        out_x, truth = module_grads(copy.deepcopy(ref).double(), (x.detach().double().requires_grad_(), ei,
                                                                  edge_attr.detach().double().requires_grad_()))
        assert_error_within_twice(out_o, out_r, out_x, SLACK[torch.bfloat16], name="output")
        for name in ("input0", "input1", "aggr_module.t"):
            err, err_ref = ((g[name].double() - truth[name]).abs().max().item() for g in (grads_o, grads_r))
            ratios.setdefault(name, []).append(err / err_ref)
    for name, r in ratios.items():
        assert torch.tensor(r).median() <= 2, f"{name}: median error ratio {torch.tensor(r).median():.2f}"


@pytest.mark.parametrize("config", CONFIGS[:4], ids=config_id)
def test_channel_change_and_no_edge_features(config):
    # in != out adds lin_src / lin_dst; no edge_dim: edge features absent, or given at width out.
    ours, ref = _pair(config, 12, 20, None, torch.float64, "cpu")
    x, ei = graph_inputs("isolated", 12)
    compare_with_pyg(ours, ref, (x, ei))
    e = torch.randn(ei.size(1), 20, dtype=torch.float64, requires_grad=True)
    compare_with_pyg(ours, ref, (x, ei, e))


def test_state_dict_both_ways_repr_and_reset():
    ours, ref = _pair(dict(aggr="softmax", learn_t=True), 16, 16, 8, torch.float32, "cpu")
    assert repr(ours) == repr(ref) == "GENConv(16, 16, aggr=softmax)"
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.reset_parameters()
    ref.load_state_dict(ours.state_dict())
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


def test_adjacency_forms():
    ei, n = make_graph("power_law")
    ours, ref = _pair(dict(aggr="softmax", learn_t=True), 8, 8, 2, torch.float64, "cpu")
    x = torch.randn(n, 8, dtype=torch.float64)
    edge_attr = torch.randn(ei.size(1), 2, dtype=torch.float64)
    expected = ref(x, ei, edge_attr)
    graph = CSRGraph.from_edge_index(ei, n)
    torch.testing.assert_close(ours(x, graph, edge_attr), expected)
    perm = torch.randperm(ei.size(1))  # the edges in another order
    torch.testing.assert_close(ours(x, ei[:, perm], edge_attr[perm]), ours(x, ei, edge_attr), rtol=1e-12, atol=1e-12)
    # torch.sparse adj_t: edge features follow its stored entries.
    coo = torch.sparse_coo_tensor(ei.flip(0), torch.ones(ei.size(1)), (n, n))
    torch.testing.assert_close(ours(x, coo, edge_attr), expected)
    if hasattr(pyg, "EdgeIndex"):
        torch.testing.assert_close(ours(x, pyg.EdgeIndex(ei, sparse_size=(n, n)), edge_attr), expected)


def test_torch_sparse_adjacency():
    torch_sparse = pytest.importorskip("torch_sparse")
    ei, n = make_graph("random")
    ours, ref = _pair(dict(aggr="max"), 8, 8, None, torch.float64, "cpu")
    x = torch.randn(n, 8, dtype=torch.float64)
    adj_t = torch_sparse.SparseTensor(row=ei[1], col=ei[0], sparse_sizes=(n, n))
    torch.testing.assert_close(ours(x, adj_t), ref(x, adj_t))


def test_unfused_configurations_fall_back_with_one_warning():
    ei, n = make_graph("random")
    x = torch.randn(n, 8)
    for config in (dict(aggr=["mean", "max"]), dict(aggr="softmax_sg")):
        ours, ref = _pair(config, 8, 8, None, torch.float32, "cpu")
        with pytest.warns(UserWarning, match="falling back"):
            out = ours(x, ei)
        torch.testing.assert_close(out, ref(x, ei))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours(x, ei)  # said once


def test_pyg_only_features_run_pygs_propagate():
    """flow='target_to_source', explainer masks, message hooks: PyG's propagate() (from a CSRGraph too), and
    the fused kernel again once they are gone."""
    from torch_geometric.explain.algorithm.utils import clear_masks, set_masks
    ei, n = make_graph("random")
    x = torch.randn(n, 8, dtype=torch.float64)
    edge_attr = torch.randn(ei.size(1), 4, dtype=torch.float64)
    graph = CSRGraph.from_edge_index(ei, n)
    ours, ref = _pair(dict(aggr="softmax", flow="target_to_source"), 8, 8, 4, torch.float64, "cpu")
    with pytest.warns(UserWarning, match="flow='target_to_source'.*falling back"):
        out = ours(x, ei, edge_attr)
    torch.testing.assert_close(out, ref(x, ei, edge_attr), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours(x, graph, edge_attr), out, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, _pair(dict(aggr="softmax"), 8, 8, 4, torch.float64, "cpu")[1](x, ei, edge_attr))

    ours, ref = _pair(dict(aggr="softmax", learn_t=True), 8, 8, 4, torch.float64, "cpu")
    fused = ours(x, ei, edge_attr)
    mask = torch.randn(ei.size(1), dtype=torch.float64, requires_grad=True)
    set_masks(ours, mask, ei)
    set_masks(ref, mask, ei)
    with pytest.warns(UserWarning, match="explain mode"):
        out = ours(x, graph, edge_attr)
    expected = ref(x, ei, edge_attr)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, fused)
    gout = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, mask, gout)[0], torch.autograd.grad(expected, mask, gout)[0],
                               rtol=1e-10, atol=1e-10)
    clear_masks(ours)
    torch.testing.assert_close(ours(x, ei, edge_attr), fused, rtol=0, atol=0)

    seen = []
    handle = ours.register_message_forward_hook(lambda module, inputs, msg: seen.append(msg.shape))
    with pytest.warns(UserWarning, match="message-passing hooks"):
        torch.testing.assert_close(ours(x, ei, edge_attr), fused, rtol=1e-12, atol=1e-12)
    assert seen == [(ei.size(1), 8)]
    handle.remove()
    torch.testing.assert_close(ours(x, ei, edge_attr), fused, rtol=0, atol=0)
    assert len(seen) == 1


def test_torch_compile_fullgraph():
    ei, n = make_graph("power_law")
    graph = CSRGraph.from_edge_index(ei, n)
    graph.transposed()
    ours, _ = _pair(dict(aggr="softmax", learn_t=True, norm="layer"), 16, 16, 8, torch.float32, "cpu")
    x = torch.randn(n, 16)
    edge_attr = torch.randn(ei.size(1), 8)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    torch.testing.assert_close(compiled(x, graph, edge_attr), ours(x, graph, edge_attr))


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("bipartite", [False, True], ids=["square", "bipartite"])
def test_hybrid_sparse_adjacency_values_are_edge_attr(layout, bipartite):
    """A sparse adj_t's [E, F] values are edge_attr (an explicit edge_attr wins), gradients included, as PyG's."""
    ei, n = make_graph("bipartite" if bipartite else "power_law")
    num_src, num_dst = n if bipartite else (n, n)
    in_channels = (10, 6) if bipartite else 10
    ours, ref = _pair(dict(aggr="softmax", learn_t=True), in_channels, 8, 3, torch.float64, "cpu")
    x_src = torch.randn(num_src, 10, dtype=torch.float64, requires_grad=True)
    x_dst = torch.randn(num_dst, 6, dtype=torch.float64, requires_grad=True)
    values = torch.randn(ei.size(1), 3, dtype=torch.float64, requires_grad=True)
    layout_values = sparse_adj_t(ei, values.detach(), num_src, num_dst, layout).values()

    def make_adj():  # the same structure, with values that lead back to the leaf `values`
        adj = sparse_adj_t(ei, values, num_src, num_dst, layout)
        assert torch.equal(adj.values().detach(), layout_values)
        return adj

    for x in ([(x_src, x_dst), (x_src, None)] if bipartite else [x_src]):
        out = ours(x, make_adj())  # a fresh adjacency per backward: both modules backpropagate into `values`
        assert out.shape == (num_dst, 8)
        inputs = [t for t in (x if bipartite else (x,)) if t is not None] + [values]
        assert_same_as_pyg(ours, ref, out, ref(x, make_adj()), inputs, 1e-10)
        assert torch.autograd.grad(ours(x, make_adj()).sum(), values)[0].abs().sum() > 0
    # The coalesced entries as edge_index and edge_attr agree; an explicit edge_attr wins over the values.
    x = (x_src, x_dst) if bipartite else x_src
    coalesced = sparse_adj_t(ei, values.detach(), num_src, num_dst, "coo")
    torch.testing.assert_close(ours(x, coalesced.indices().flip(0), coalesced.values()), ours(x, make_adj()),
                               rtol=1e-12, atol=1e-12)
    other = torch.randn(coalesced.values().shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x, make_adj(), other), ref(x, make_adj(), other), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ours(x, make_adj(), other), ours(x, make_adj()))


def test_bipartite_node_counts_from_the_adjacency():
    """(x_src, None): the destination count from size= or an adjacency that states it (torch.sparse, CSRGraph)."""
    ei, (num_src, num_dst) = make_graph("bipartite")
    ours, ref = _pair(dict(aggr="max"), (10, 6), 8, None, torch.float64, "cpu")
    x_src = torch.randn(num_src, 10, dtype=torch.float64)
    expected = ref((x_src, None), ei, size=(num_src, num_dst))
    assert expected.shape == (num_dst, 8)
    torch.testing.assert_close(ours((x_src, None), ei, size=(num_src, num_dst)), expected, rtol=1e-10, atol=1e-10)
    adj_t = sparse_adj_t(ei, torch.ones(ei.size(1), dtype=torch.float64), num_src, num_dst, "coo")
    torch.testing.assert_close(ref((x_src, None), adj_t), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours((x_src, None), adj_t), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours((x_src, None), adj_t.to_sparse_csr()), expected, rtol=1e-10, atol=1e-10)
    graph = CSRGraph.from_edge_index(ei, (num_src, num_dst))
    torch.testing.assert_close(ours((x_src, None), graph), expected, rtol=1e-10, atol=1e-10)
    with raises(ValueError, "num_src"):
        ours((x_src[:-1], None), adj_t)


@pytest.mark.parametrize("aggr", ["softmax", "powermean", "max"])
def test_lazy_edge_dim(aggr):
    """GENConv((-1, -1), out, edge_dim=-1) sizes its layers on the first call with PyG's initial weights."""
    ei, (num_src, num_dst) = make_graph("bipartite")
    x_src = torch.randn(num_src, 5)
    x_dst = torch.randn(num_dst, 7)
    edge_attr = torch.randn(ei.size(1), 3)
    outs = []
    for cls in (pyg.nn.GENConv, GENConv):
        torch.manual_seed(0)
        conv = cls((-1, -1), 16, aggr, edge_dim=-1)
        assert repr(conv) == f"GENConv((-1, -1), 16, aggr={aggr})"
        outs.append((conv, conv((x_src, x_dst), ei, edge_attr)))
    (ref, expected), (ours, out) = outs
    assert ours.lin_edge.weight.shape == (16, 3)
    torch.testing.assert_close(out, expected)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), name
    adj_t = sparse_adj_t(ei, edge_attr, num_src, num_dst, "coo")
    torch.testing.assert_close(ours((x_src, None), adj_t), ref((x_src, None), adj_t))
