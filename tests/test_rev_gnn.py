"""RevGNN and SharedDropout: the paper's parameter counts, the composed edge encoder against the explicit
embedding, reversible against plain autograd, weight tying, float32 drift of a 1001-layer stack."""
import pytest
import torch

pytest.importorskip("torch_geometric")
import torch_geometric  # noqa: E402

from revgnn_ext import CSRGraph  # noqa: E402
from revgnn_ext.nn import GroupAddRev, RevGNN, SharedDropout  # noqa: E402

from conftest import DEVICES, raises  # noqa: E402


def proteins_like(num_nodes=120, num_edges=1500, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=gen)
    edge_attr = torch.rand(num_edges, 8, generator=gen, dtype=dtype)
    species = torch.eye(8, dtype=dtype)[torch.randint(0, 8, (num_nodes,), generator=gen)]
    return species, edge_index, edge_attr


def small(name, **overrides):
    torch.manual_seed(0)
    return RevGNN.preset(name, **overrides).double()


def grads(model, *inputs, seed=3):
    model.zero_grad()
    torch.manual_seed(seed)  # the dropout mask
    out = model(*inputs)
    out.square().sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name, count", [("proteins-deep", 20_031_384), ("proteins-wide", 68_471_608),
                                         ("products-112", 2_945_007)])
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):
        model = RevGNN.preset(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_weight_tied_holds_one_block():
    with torch.device("meta"):
        deep = RevGNN.preset("proteins-deep")
        tied = RevGNN.preset("proteins-deep", weight_tied=True)
    block = sum(p.numel() for p in deep.layers[0].parameters())
    assert sum(p.numel() for p in tied.parameters()) == 20_031_384 - 1000 * block
    assert len(tied.layers) == 1 and tied.num_layers == 1001 and "num_layers=1001" in repr(tied)
    assert all(isinstance(layer, GroupAddRev) and layer.num_groups == 2 for layer in deep.layers)


def paper_edge_sums(edge_index, edge_attr, num_nodes):
    """The paper's node input (ogb_eff/ogbn_proteins/dataset.py): edge features scatter-added over edge_index[0]."""
    return torch.zeros(num_nodes, edge_attr.size(1), dtype=edge_attr.dtype).index_add_(0, edge_index[0], edge_attr)


def explicit_forward(model, x, edge_index, edge_attr, sums=None):
    """The proteins model unfused: the [E, hidden] edge embedding through PyG's GENConv in every group;
    plain residual groups; the given edges' sums unless ``sums`` is given."""
    if sums is None:
        sums = paper_edge_sums(edge_index, edge_attr, x.size(0))
    h = model.node_encoder(torch.cat([sums, model.input_encoder(x)], dim=-1))
    emb = model.edge_encoder(edge_attr)
    for i in range(model.num_layers):
        layer = model.layers[0 if model.weight_tied else i]
        xs = torch.chunk(h, model.num_groups, dim=-1)
        inp, ys = sum(xs[1:]), []
        for x_i, group in zip(xs, layer.convs):
            f = torch_geometric.nn.GENConv.forward(group.conv, torch.relu(group.norm(inp)), edge_index, emb)
            inp = x_i + f
            ys.append(inp)
        h = torch.cat(ys, dim=-1)
    return model.head(torch.relu(model.norm(h)))


def assert_matches_explicit(model, x, edge_index, edge_attr, sums=None):
    """The model's output and parameter gradients (for sum(out^2)) are explicit_forward's; returns both."""
    out, ours = grads(model, x, edge_index, edge_attr, *(() if sums is None else (sums,)))
    model.zero_grad()
    ref = explicit_forward(model, x, edge_index, edge_attr, sums)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, p in model.named_parameters():  # both layers of the composed encoder included
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-10, msg=name)
    return out, ours


@pytest.mark.parametrize("weight_tied", [False, True])
def test_composed_edge_encoder_matches_explicit_embedding(weight_tied):
    model = small("proteins-deep", num_layers=3, hidden_channels=16, weight_tied=weight_tied).eval()
    x, edge_index, edge_attr = proteins_like()
    _, ours = assert_matches_explicit(model, x, edge_index, edge_attr)
    assert ours["edge_encoder.weight"].abs().sum() > 0
    with torch.no_grad():  # a CSRGraph gives the edge_index's result
        torch.testing.assert_close(model(x, CSRGraph.from_edge_index(edge_index, x.size(0)), edge_attr),
                                   model(x, edge_index, edge_attr))


@pytest.mark.parametrize("name, overrides", [
    ("proteins-deep", dict(num_layers=8, hidden_channels=16)),
    ("proteins-deep", dict(num_layers=1, hidden_channels=24, num_groups=3)),
    ("proteins-deep", dict(num_layers=4, hidden_channels=16, weight_tied=True, aggr="softmax")),
    ("products-112", dict(num_layers=8, in_channels=12, hidden_channels=16, out_channels=5)),
])
@pytest.mark.parametrize("device", DEVICES)
def test_reversible_equals_plain_autograd(name, overrides, device):
    """Training mode, dropout on: the shared mask and the recomputation line up."""
    x, edge_index, edge_attr = proteins_like()
    inputs = (x, edge_index, edge_attr) if name.startswith("proteins") else \
        (torch.randn(x.size(0), overrides["in_channels"], dtype=torch.float64), edge_index)
    inputs = tuple(t.to(device) for t in inputs)
    rev, plain = small(name, **overrides).to(device), small(name, reversible=False, **overrides).to(device)
    out_rev, g_rev = grads(rev, *inputs)
    out_plain, g_plain = grads(plain, *inputs)
    torch.testing.assert_close(out_rev, out_plain, rtol=1e-12, atol=1e-12)
    for key in g_plain:
        torch.testing.assert_close(g_rev[key], g_plain[key], rtol=1e-9, atol=1e-12, msg=key)


def test_partition_looks_up_whole_graph_edge_sums():
    """The paper's recipe: a partition's nodes look up their whole-graph edge sums; against the unfused model."""
    model = small("proteins-deep", num_layers=3, hidden_channels=16).eval()
    x, edge_index, edge_attr = proteins_like()
    sums = paper_edge_sums(edge_index, edge_attr, x.size(0))
    torch.testing.assert_close(RevGNN.out_edge_sums(edge_index, edge_attr, x.size(0)), sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(RevGNN.out_edge_sums(CSRGraph.from_edge_index(edge_index, x.size(0)), edge_attr,
                                                    x.size(0)), sums, rtol=1e-12, atol=1e-12)
    nodes = torch.randperm(x.size(0), generator=torch.Generator().manual_seed(1))[:40]
    sub_index, sub_attr = torch_geometric.utils.subgraph(nodes, edge_index, edge_attr, relabel_nodes=True,
                                                         num_nodes=x.size(0))
    out, _ = assert_matches_explicit(model, x[nodes], sub_index, sub_attr, sums[nodes])
    with torch.no_grad():
        # The partition's own sums (about a third of the edges here) are a different input...
        assert not torch.allclose(model(x[nodes], sub_index, sub_attr), out)
        # ...and on the whole graph the looked-up sums are the default ones.
        torch.testing.assert_close(model(x, edge_index, edge_attr, edge_sums=sums), model(x, edge_index, edge_attr))


def test_shared_dropout():
    drop = SharedDropout(0.25)
    like = torch.empty(1000, 8, dtype=torch.float64)
    mask = drop.mask(like)
    assert mask.shape == like.shape and set(mask.unique().tolist()) <= {0.0, 1 / 0.75}
    x = torch.randn(1000, 8, dtype=torch.float64)
    torch.testing.assert_close(drop(x, mask), x * mask)
    assert drop.eval().mask(like) is None and SharedDropout(0.0).mask(like) is None


X, EDGE_INDEX, EDGE_ATTR = proteins_like()


@pytest.mark.parametrize("call, names", [
    (lambda: RevGNN.preset("arxiv"), ["RevGNN.preset", "arxiv"]),
    (lambda: RevGNN(8, 15, 2, 2), ["RevGNN", "hidden_channels", "num_groups"]),
    (lambda: RevGNN(8, 16, 2, 2, edge_dim=16), ["RevGNN", "hidden_channels", "edge_dim"]),
    *[(lambda i=i: RevGNN(*[0 if j == i else v for j, v in enumerate((8, 16, 2, 2))]), ["RevGNN", name])
      for i, name in enumerate(("in_channels", "hidden_channels", "out_channels", "num_layers"))],
    (lambda: RevGNN(8, 16, 2, 2, edge_dim=0), ["RevGNN", "edge_dim"]),
    (lambda: RevGNN(8, 16, 2, 2, conv="sage", edge_dim=4), ["RevGNN", "edge_dim", "conv"]),
    (lambda: small("proteins-deep", num_layers=1, hidden_channels=16)(X, EDGE_INDEX, EDGE_ATTR[:, :4]),
     ["RevGNN", "edge_attr", "8"]),
    (lambda: small("proteins-deep", num_layers=1, hidden_channels=16)(X, EDGE_INDEX, EDGE_ATTR[:-1]), ["edge_attr"]),
    (lambda: small("proteins-deep", num_layers=1, hidden_channels=16)(X, EDGE_INDEX, EDGE_ATTR,
                                                                       edge_sums=torch.zeros(119, 8, dtype=X.dtype)),
     ["RevGNN", "edge_sums", "120"]),
    (lambda: small("products-112", num_layers=1, in_channels=8, hidden_channels=16)(
        X, EDGE_INDEX, edge_sums=torch.zeros(120, 8, dtype=X.dtype)), ["RevGNN", "edge_sums"]),
    (lambda: SharedDropout(1.0), ["SharedDropout", "p"]),
])
def test_bad_arguments_raise_naming_them(call, names):
    with raises(ValueError, *names):
        call()


def test_float32_drift_of_1001_reversible_blocks():
    """Block inputs rebuilt through 1001 float32 inversions, against the forward's: measured 3.8e-5, bound 1e-3."""
    x, edge_index, edge_attr = proteins_like(num_nodes=200, num_edges=2000, dtype=torch.float32)
    torch.manual_seed(1)
    model = RevGNN.preset("proteins-deep", hidden_channels=16).eval()
    graph = CSRGraph.from_edge_index(edge_index, x.size(0))
    attr = graph.edges_to_csr(edge_attr)
    graph = graph.csr_ordered()
    args = (None, attr, None, model.edge_encoder.weight, model.edge_encoder.bias.unsqueeze(1))
    with torch.no_grad():
        inputs = [torch.randn(x.size(0), 16)]
        for layer in model.layers:
            inputs.append(layer(inputs[-1], graph, *args))
        y = inputs.pop()
        errors = []
        for layer, expected in zip(reversed(model.layers), reversed(inputs)):
            y = layer.inverse(y, graph, *args)
            errors.append(((y - expected).norm() / expected.norm()).item())
    assert len(errors) == 1001
    assert max(errors) < 1e-3, max(errors)


def test_reversible_float32_gradients():
    """At 101 layers, float32 gradients' error against float64 within 3x plain autograd's (3.4e-7 vs 1.9e-7)."""
    x, edge_index, edge_attr = proteins_like(num_nodes=200, num_edges=2000)
    result = {}
    for name, reversible, dtype in (("rev32", True, torch.float32), ("plain32", False, torch.float32),
                                    ("plain64", False, torch.float64)):
        torch.manual_seed(1)
        model = RevGNN.preset("proteins-deep", num_layers=101, hidden_channels=16,
                              reversible=reversible).to(dtype).eval()
        result[name] = torch.cat([g.double().flatten() for g in
                                  grads(model, x.to(dtype), edge_index, edge_attr.to(dtype))[1].values()])
    error = {k: ((result[k] - result["plain64"]).norm() / result["plain64"].norm()).item() for k in ("rev32", "plain32")}
    assert error["rev32"] <= max(3 * error["plain32"], 1e-6), error


def test_bfloat16_autocast_gradients_of_101_layers():
    """RevGNN-Deep (hidden 80, 101 layers) under bfloat16 autocast: gradient error within 2x the plain model's."""
    x, edge_index, edge_attr = proteins_like(num_nodes=200, num_edges=2000, dtype=torch.float32)
    target = torch.rand(200, 112, generator=torch.Generator().manual_seed(2)).round()

    def gradients(reversible, autocast):
        torch.manual_seed(1)
        model = RevGNN.preset("proteins-deep", num_layers=101, reversible=reversible).eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x, edge_index, edge_attr)
        torch.nn.functional.binary_cross_entropy_with_logits(out.float(), target).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact = gradients(reversible=False, autocast=False)
    error = {rev: ((gradients(rev, True) - exact).norm() / exact.norm()).item() for rev in (True, False)}
    assert 0 < error[False] and error[True] <= 2 * error[False], error
