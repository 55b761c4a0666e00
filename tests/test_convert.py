"""revgnn_ext.convert on PyG models: the converted model computes the same outputs and gradients
(float64, 1e-10) with the same parameter objects, and the report says what was replaced and left."""
import copy
import subprocess
import sys

import pytest
import torch

pyg = pytest.importorskip("torch_geometric")

import revgnn_ext  # noqa: E402
from revgnn_ext import convert, nn as ours  # noqa: E402
from revgnn_ext.convert import Left, Replaced  # noqa: E402
from revgnn_ext.nn import _pyg  # noqa: E402

from conftest import DEVICES, config_id, graph_inputs, module_grads, raises  # noqa: E402
from test_group_add_rev import Block  # noqa: E402

GEN_CONFIGS = [
    dict(aggr="softmax", learn_t=True, edge_dim=4),
    dict(aggr="softmax", t=0.5, msg_norm=True, learn_msg_scale=True),
    dict(aggr="max", norm="layer", num_layers=3, expansion=3, edge_dim=8),
    dict(aggr="mean", bias=True, eps=1e-5),
    dict(aggr="add", edge_dim=4, norm=None),
    dict(aggr="powermean", learn_p=True, p=1.5, edge_dim=4),
    dict(aggr="softmax_sg"),
    dict(aggr=["max", "mean"], edge_dim=4),
]
UNFUSED = {"softmax_sg", "['max', 'mean']", "std"}
SAGE_CONFIGS = [dict(), dict(aggr="sum", normalize=True), dict(aggr="max", root_weight=False),
                dict(aggr="min", bias=False), dict(project=True), dict(aggr="std")]


@pytest.fixture(autouse=True)
def _own_fallback_warnings(monkeypatch):
    # The modules warn once per process about an unfused configuration: a record of these tests' own.
    monkeypatch.setattr(_pyg, "_warned", set())


class Wrapper(torch.nn.Module):
    """A user's model around one conv."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x, edge_index, *args):
        return self.conv(x, edge_index, *args)


def _convert_and_compare(model, *args):
    """Converts `model`: the same function of the same parameter objects, modules in the same mode; the report."""
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    modes = {n: m.training for n, m in model.named_modules()}
    report = convert(model)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    out, grads = module_grads(model, args)
    out_ref, grads_ref = module_grads(reference, args)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        if g is not None or grads_ref[name] is not None:
            torch.testing.assert_close(g, grads_ref[name], rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    return report


@pytest.mark.parametrize("cls, config, in_channels", [
    *[pytest.param(pyg.nn.GENConv, c, i, id=f"GENConv-{config_id(c)}-{i}") for c in GEN_CONFIGS for i in (16, 12)],
    *[pytest.param(pyg.nn.SAGEConv, c, 12, id=f"SAGEConv-{config_id(c)}") for c in SAGE_CONFIGS]])
def test_conv(cls, config, in_channels):
    conv = cls(in_channels, 16, **config).double()
    expected_repr, new = repr(conv), getattr(ours, cls.__name__)
    model = Wrapper(conv)
    report = _convert_and_compare(model, *graph_inputs("power_law", in_channels, config.get("edge_dim")))
    assert type(model.conv) is new and repr(model.conv) == expected_repr
    unfused = report.replaced[0].unfused
    assert report.replaced == [Replaced("conv", cls, new, unfused)] and report.left == []
    assert (unfused is not None) == (str(config.get("aggr")) in UNFUSED)


def test_aggregation_state_extra_tensors_and_submodule_hooks_carried():
    """A trained aggregation's values, a user's parameter and non-persistent buffer, the same submodules (hooks
    still fire) carried; converting draws no random numbers."""
    conv = pyg.nn.SAGEConv(12, 16, aggr=pyg.nn.aggr.SoftmaxAggregation(learn=True)).double()
    with torch.no_grad():
        conv.aggr_module.t.fill_(3.0)
    conv.register_parameter("scale", torch.nn.Parameter(torch.ones(1, dtype=torch.float64)))
    conv.register_buffer("counter", torch.zeros(1), persistent=False)
    calls = []
    conv.lin_l.register_forward_hook(lambda module, inputs, out: calls.append(module))
    model = Wrapper(conv)
    rng = torch.get_rng_state()
    convert(copy.deepcopy(model))
    assert torch.equal(torch.get_rng_state(), rng)
    _convert_and_compare(model, *graph_inputs("power_law", 12))
    assert model.conv.aggr_module.t.item() == 3.0 and model.conv.aggr == conv.aggr
    assert model.conv.lin_l is conv.lin_l and calls[0] is conv.lin_l  # the converted model runs first
    assert model.conv.counter is conv.counter and "counter" not in model.conv.state_dict()


def test_explaining_model_is_left():
    from torch_geometric.explain.algorithm.utils import set_masks
    x, ei = graph_inputs("power_law", 8)
    model = Wrapper(pyg.nn.GENConv(8, 8))
    set_masks(model, torch.ones(ei.size(1)), ei)
    report = convert(model)
    assert type(model.conv) is pyg.nn.GENConv and report.replaced == []
    assert report.left == [Left("conv", pyg.nn.GENConv, "in explain mode (an explainer's edge masks are set); "
                                                        "convert the model before explaining it")]


class Lazy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gen = pyg.nn.GENConv(-1, 16, aggr="softmax", learn_t=True, edge_dim=-1)
        self.sage = pyg.nn.SAGEConv(-1, 16)

    def forward(self, x, edge_index, edge_attr):
        return self.gen(x, edge_index, edge_attr) + self.sage(x, edge_index)


def test_lazy_modules():
    # in_channels=-1, edge_dim=-1: the uninitialized parameters are carried and materialize in our forward.
    report = _convert_and_compare(Lazy().double(), *graph_inputs("power_law", 12, 4))
    assert [r.name for r in report.replaced] == ["gen", "sage"]


def test_sparse_adjacency_values():
    """A torch.sparse adj_t: hybrid values are GENConv's edge features, plain ones SAGEConv's weights, as PyG's."""
    x, ei = graph_inputs("power_law", 12)
    n = x.size(0)
    features = torch.sparse_coo_tensor(ei.flip(0), torch.randn(ei.size(1), 4, dtype=torch.float64),
                                       (n, n, 4)).coalesce()
    _convert_and_compare(Wrapper(pyg.nn.GENConv(12, 16, edge_dim=4).double()), x, features)
    weights = torch.sparse_coo_tensor(ei.flip(0), torch.rand(ei.size(1), dtype=torch.float64), (n, n))
    _convert_and_compare(Wrapper(pyg.nn.SAGEConv(12, 16).double()), x, weights.coalesce().to_sparse_csr())


@pytest.mark.parametrize("conv", [ours.GENConv(8, 8, edge_dim=4), ours.SAGEConv(8, 8), ours.GCNConv(8, 8),
                                  ours.GATConv(8, 8)], ids=lambda conv: type(conv).__name__)
def test_our_convs_refuse_torchscript(conv):
    """(PyG's script.) Scripting ours, alone or inside a model, raises naming the layer and torch.compile."""
    for module in (conv, torch.nn.Sequential(torch.nn.Linear(8, 8), conv)):
        with raises(RuntimeError, type(conv).__name__, "TorchScript", "torch.compile"):
            torch.jit.script(module)


class DeeperGCN(torch.nn.Module):
    """PyG's ogbn-proteins DeeperGCN example: DeepGCNLayer res+ blocks around GENConv."""

    def __init__(self, hidden, num_layers):
        super().__init__()
        self.node_encoder = torch.nn.Linear(6, hidden)
        self.edge_encoder = torch.nn.Linear(4, hidden)
        self.layers = torch.nn.ModuleList()
        for _ in range(num_layers):
            conv = pyg.nn.GENConv(hidden, hidden, aggr="softmax", t=1.0, learn_t=True, num_layers=2, norm="layer")
            self.layers.append(pyg.nn.DeepGCNLayer(conv, torch.nn.LayerNorm(hidden), torch.nn.ReLU(inplace=True),
                                                   block="res+", dropout=0.1))
        self.lin = torch.nn.Linear(hidden, 3)

    def forward(self, x, edge_index, edge_attr):
        x = self.node_encoder(x)
        edge_attr = self.edge_encoder(edge_attr)
        x = self.layers[0].conv(x, edge_index, edge_attr)
        for layer in self.layers[1:]:
            x = layer(x, edge_index, edge_attr)
        return self.lin(torch.relu(self.layers[0].norm(x)))


def test_deep_gcn_layer_stack():
    model = DeeperGCN(8, 4).double()
    report = _convert_and_compare(model, *graph_inputs("power_law", 6, 4))
    assert [(r.name, r.old, r.new) for r in report.replaced] == [
        (f"layers.{i}.conv", pyg.nn.GENConv, ours.GENConv) for i in range(4)]
    assert all(type(layer.conv) is ours.GENConv for layer in model.layers) and report.left == []


class RevModel(torch.nn.Module):
    """PyG's GroupAddRev blocks: two groups of GENConv with edge features, three of SAGEConv."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(6, 12)
        self.blocks = torch.nn.ModuleList(
            pyg.nn.GroupAddRev(Block(6, pyg.nn.GENConv(6, 6, aggr="softmax", learn_t=True, edge_dim=4), dropout=0.0),
                               num_groups=2, num_bwd_passes=2) for _ in range(3))
        self.blocks.append(pyg.nn.GroupAddRev(Block(4, pyg.nn.SAGEConv(4, 4), dropout=0.0), num_groups=3))
        self.head = torch.nn.Linear(12, 2)

    def forward(self, x, edge_index, edge_attr):
        h = self.encoder(x)
        for block in self.blocks[:3]:
            h = block(h, edge_index, edge_attr)
        return self.head(self.blocks[3](h, edge_index))


def test_group_add_rev_model():
    model = RevModel().double()
    report = _convert_and_compare(model, *graph_inputs("power_law", 6, 4))
    expected = []
    for i in range(4):
        conv = pyg.nn.SAGEConv if i == 3 else pyg.nn.GENConv
        expected.append((f"blocks.{i}", pyg.nn.GroupAddRev, ours.GroupAddRev))
        expected += [(f"blocks.{i}.convs.{g}.conv", conv, getattr(ours, conv.__name__)) for g in range(2 + (i == 3))]
    assert [(r.name, r.old, r.new) for r in report.replaced] == expected
    assert [(b.num_groups, b.num_bwd_passes, b.split_dim, b.disable) for b in model.blocks] == \
        [(2, 2, -1, False)] * 3 + [(3, 1, -1, False)]


class UserConv(pyg.nn.GENConv):
    """A user's subclass: its forward is its own."""

    def forward(self, x, edge_index, edge_attr=None, size=None):
        return 2 * super().forward(x, edge_index, edge_attr, size)


class Mixed(torch.nn.Module):
    """ModuleDict, Sequential, a shared conv, GCN/GATConv, GraphConv (not ours), a subclass, one of ours already,
    an unsupported flow and a conv with PyG hooks."""

    def __init__(self):
        super().__init__()
        shared = pyg.nn.SAGEConv(8, 8)
        self.convs = torch.nn.ModuleDict({"gen": pyg.nn.GENConv(8, 8, aggr="max", edge_dim=3), "sage": shared})
        self.seq = torch.nn.Sequential(torch.nn.Linear(8, 8), shared)
        self.gcn = pyg.nn.GCNConv(8, 8)
        self.gat = pyg.nn.GATConv(8, 4, heads=2)
        self.graph_conv = pyg.nn.GraphConv(8, 8)
        self.user = UserConv(8, 8, edge_dim=3)
        self.ours = ours.SAGEConv(8, 8)
        self.reverse = pyg.nn.SAGEConv(8, 8, flow="target_to_source")
        self.hooked = pyg.nn.SAGEConv(8, 8)
        self.hooked.register_message_forward_hook(lambda module, inputs, out: out * 1.5)

    def forward(self, x, edge_index, edge_attr):
        h = self.convs["gen"](x, edge_index, edge_attr).relu()
        h = self.convs["sage"](h, edge_index) + self.gcn(h, edge_index) + self.gat(h, edge_index)
        h = h + self.graph_conv(h, edge_index)
        h = self.seq[1](self.seq[0](h), edge_index)  # the shared conv again
        h = self.user(h, edge_index, edge_attr) + self.ours(h, edge_index)
        return self.reverse(h, edge_index) + self.hooked(h, edge_index)


def test_user_model_report_and_idempotence(capsys):
    model = Mixed().double().train()
    model.gcn.eval()
    report = _convert_and_compare(model, *graph_inputs("power_law", 8, 3))
    assert capsys.readouterr() == ("", "")
    assert report.replaced == [Replaced("convs.gen", pyg.nn.GENConv, ours.GENConv),
                               Replaced("convs.sage", pyg.nn.SAGEConv, ours.SAGEConv),
                               Replaced("gcn", pyg.nn.GCNConv, ours.GCNConv),
                               Replaced("gat", pyg.nn.GATConv, ours.GATConv)]
    assert model.seq[1] is model.convs["sage"]  # still one module, shared
    assert report.left == [
        Left("graph_conv", pyg.nn.GraphConv, "not accelerated by revgnn_ext"),
        Left("user", UserConv, "a subclass of torch_geometric.nn.conv.gen_conv.GENConv; its forward may differ"),
        Left("reverse", pyg.nn.SAGEConv, "flow='target_to_source' is not supported"),
        Left("hooked", pyg.nn.SAGEConv, "has PyG hooks registered (_message_forward_hooks), which the fused "
                                        "computation does not run")]
    lines = str(report).splitlines()
    assert lines[:3] == [
        "revgnn_ext.convert: 4 replaced, 4 left",
        "  replaced convs.gen: torch_geometric.nn.conv.gen_conv.GENConv -> revgnn_ext.nn.gen_conv.GENConv",
        "  replaced convs.sage: torch_geometric.nn.conv.sage_conv.SAGEConv -> revgnn_ext.nn.sage_conv.SAGEConv"]
    assert lines[5] == ("  left     graph_conv: torch_geometric.nn.conv.graph_conv.GraphConv: not accelerated by "
                        "revgnn_ext")
    assert len(lines) == 9
    again = convert(model)
    assert again.replaced == [] and again.left == report.left


@pytest.mark.parametrize("device", DEVICES)
def test_device_dtype_mode_and_hooks_carried(device):
    model = Wrapper(pyg.nn.GENConv(8, 8, aggr="softmax", learn_t=True, edge_dim=2)).to(device, torch.float64).eval()
    calls = []
    handle = model.conv.register_forward_hook(lambda module, inputs, out: calls.append(type(module)))
    model.conv.mlp[0].weight.requires_grad_(False)
    report = convert(model)
    assert len(report.replaced) == 1 and type(model.conv) is ours.GENConv
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {(torch.device(device).type, torch.float64)}
    assert not any(m.training for m in model.modules()) and not model.conv.mlp[0].weight.requires_grad
    x, ei, e = graph_inputs("power_law", 8, 2, device=device)
    model(x, ei, e)
    handle.remove()
    model(x, ei, e)
    assert calls == [ours.GENConv]


def test_bad_arguments():
    with raises(TypeError, "convert", "model"):
        convert([pyg.nn.GENConv(4, 4)])
    with raises(ValueError, "convert", "model", "GENConv"):
        convert(pyg.nn.GENConv(4, 4))


def test_import_without_torch_geometric():
    code = ("import sys; sys.modules['torch_geometric'] = None\n"
            "import revgnn_ext, torch\n"
            "try:\n    revgnn_ext.convert(torch.nn.Linear(2, 2))\n"
            "except ImportError:\n    print('ImportError')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout == "ImportError\n", result.stderr
    assert revgnn_ext.convert is convert
