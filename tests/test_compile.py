"""torch.compile of whole models: eager's training, frames independent of depth, graph breaks only where the
docs say (graph building, each reversible block); torch.export for a fixed graph, loaded in a fresh process."""
import contextlib
import copy
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torch_geometric")
from torch._dynamo.utils import counters  # noqa: E402

from revgnn_ext import CSRGraph  # noqa: E402
from revgnn_ext.nn import GATConv, GCNConv, GENConv, GroupAddRev, RevGNN, SAGEConv  # noqa: E402

from conftest import check_compiled_training, make_graph, raises  # noqa: E402
from test_rev_gnn import proteins_like  # noqa: E402


def train(model, inputs, steps=2, seed=10):
    """Losses and final parameters of `steps` Adam steps; the same dropout draws for every model."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        torch.manual_seed(seed + step)
        loss = model(*inputs).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def compiled_frames(model, inputs, tol=(1e-12, 1e-10, 1e-12), **kwargs):
    """A compiled copy trains as `model` (losses to rtol tol[0], parameters to tol[1:]); (frames, graph breaks)."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(copy.deepcopy(model), **kwargs)
    (loss, params), (loss_c, params_c) = train(model, inputs), train(compiled, inputs)
    torch.testing.assert_close(loss_c, loss, rtol=tol[0], atol=0)
    for p, q in zip(params_c, params):
        torch.testing.assert_close(p, q, rtol=tol[1], atol=tol[2])
    return counters["frames"]["ok"], sum(counters["graph_break"].values())


@pytest.mark.parametrize("reversible, depths", [(True, (4, 100)), (False, (4, 12))])
def test_revgnn_trains_as_eager_and_compiles_once_for_any_depth(reversible, depths):
    """Two steps (dropout on) as in eager mode; as many frames at 100 (plain: 12) layers as at 4."""
    x, edge_index, edge_attr = proteins_like(num_nodes=24, num_edges=120)
    frames = {}
    for depth in depths:
        torch.manual_seed(0)
        model = RevGNN.preset("proteins-deep", num_layers=depth, hidden_channels=12, reversible=reversible).double()
        frames[depth], breaks = compiled_frames(model, (x, edge_index, edge_attr), backend="aot_eager")
        assert breaks <= 3, breaks  # graph building from edge_index; each reversible block
    assert frames[depths[1]] == frames[depths[0]], frames


def test_revgnn_with_inductor():
    torch.manual_seed(0)
    model = RevGNN.preset("proteins-deep", num_layers=3, hidden_channels=16).double()
    compiled_frames(model, proteins_like(num_nodes=40, num_edges=300), tol=(1e-10, 1e-8, 1e-10))


class DropoutF(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.lin = torch.nn.Linear(channels, channels)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x, edge_index):
        return self.dropout(torch.tanh(self.lin(x)))


class UserNet(torch.nn.Module):
    def __init__(self, depth, reversible=True):
        super().__init__()
        self.encoder = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(GroupAddRev(DropoutF(8), num_groups=2, disable=not reversible)
                                          for _ in range(depth))

    def forward(self, x, edge_index):
        h = self.encoder(x)
        for block in self.blocks:
            h = block(h, edge_index)
        return h


def test_dropout_inside_f_replays_under_inductor():
    """Inductor draws its own random numbers: F runs eagerly in the block, each input rebuilt from the exact mask."""
    torch.manual_seed(0)
    compiled_frames(UserNet(depth=3).double(), (torch.randn(20, 8, dtype=torch.float64), None))


def test_plain_blocks_compile_whole():
    """disable=True blocks are plain autograd: no graph break at all in a user's model."""
    model = UserNet(depth=4, reversible=False).double().eval()
    explanation = torch._dynamo.explain(model)(torch.randn(20, 8, dtype=torch.float64), None)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


class GenUser(torch.nn.Module):
    """A user's model around our GENConv: an encoder, the conv with edge features, a head."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(6, 8)
        self.conv = GENConv(8, 8, aggr="softmax", learn_t=True, edge_dim=3, norm="layer")
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x, edge_index, edge_attr):
        return self.head(self.conv(self.encoder(x), edge_index, edge_attr).relu())


class SageUser(torch.nn.Module):
    """A user's GraphSAGE: two of our SAGEConv (mean, then max with normalization)."""

    def __init__(self):
        super().__init__()
        self.conv1 = SAGEConv(6, 8)
        self.conv2 = SAGEConv(8, 4, aggr="max", normalize=True)

    def forward(self, x, edge_index):
        return self.conv2(self.conv1(x, edge_index).relu(), edge_index)


@pytest.mark.compile
@pytest.mark.parametrize("user", [GenUser, SageUser])
def test_compiled_user_model_trains_as_eager(user):
    """Eager's training from edge_indexes (each its own graph) and a CSRGraph, no recompiles; graph breaks only
    in adjacency.py and graph.py, which read index values (an edge_index's conversion, a transpose's build)."""
    ei, n = make_graph("random")
    x = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    extra = (torch.randn(ei.size(1), 3, dtype=torch.float64, requires_grad=True),) if user is GenUser else ()
    other = ei[:, torch.randperm(ei.size(1))].flip(0)
    graph = CSRGraph.from_edge_index(other, n)
    model = user().double()
    check_compiled_training(model, [(x, adj, *extra) for adj in (ei, ei, other, graph, graph)])
    expected = {"adjacency.py", "graph.py"} if user is GenUser else {"adjacency.py"}
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(model)(x, ei.clone(), *extra).break_reasons
    assert {reason.user_stack[-1].filename.rsplit("/", 1)[-1] for reason in breaks} == expected


class OnGraph(torch.nn.Module):
    """A model for one fixed graph (and edge features) held as attributes: node features the only input."""

    def __init__(self, model, graph, *extra):
        super().__init__()
        self.model, self.graph, self.extra = model, graph, extra

    def forward(self, x):
        return self.model(x, self.graph, *self.extra)


LOAD = ("import sys, torch, revgnn_ext; program = torch.export.load(sys.argv[1]); "
        "torch.save(program.module()(torch.load(sys.argv[2])), sys.argv[3])")


def _layer(name):
    torch.manual_seed(0)
    return dict(revgnn=lambda: RevGNN.preset("proteins-deep", num_layers=3, hidden_channels=16),
                gen=lambda: GENConv(8, 8, aggr="softmax", learn_t=True, edge_dim=8),
                gat=lambda: GATConv(8, 4, heads=2, edge_dim=8),
                gcn=lambda: GCNConv(8, 8))[name]().double().eval()


@pytest.mark.parametrize("name", ["revgnn", "gen", "gat", "gcn"])
@pytest.mark.parametrize("trained", [False, True])
def test_export_for_a_fixed_graph_loads_in_a_fresh_process(name, trained, tmp_path):
    """Exported on a CSRGraph it ran on (under no_grad) or trained on (with grad), loaded fresh: same outputs."""
    x, edge_index, edge_attr = proteins_like()
    graph = CSRGraph.from_edge_index(edge_index, x.size(0))
    model = OnGraph(_layer(name), graph, *(() if name == "gcn" else (edge_attr,)))
    if trained:
        model(x).sum().backward()
    expected = model(x).detach()
    with torch.no_grad() if not trained else contextlib.nullcontext():
        program = torch.export.export(model, (x,))
    torch.export.save(program, tmp_path / "model.pt2")
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "model.pt2"), str(tmp_path / "x.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    # (a reversible block exports its plain computation: the same function, rounded otherwise)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt").detach(), expected, rtol=1e-12, atol=1e-12)


def test_export_that_would_build_a_graph_is_refused():
    """An edge_index, a graph not built yet or gradients needing its transpose: an error that says what to do."""
    x, edge_index, edge_attr = proteins_like()
    layer = _layer("gat")
    cases = [OnGraph(layer, edge_index, edge_attr),
             OnGraph(layer, CSRGraph.from_edge_index(edge_index, x.size(0)), edge_attr),  # not run on it yet
             OnGraph(_layer("gen"), CSRGraph.from_edge_index(edge_index, x.size(0)), edge_attr)]  # with grad
    for model in cases:
        with raises(RuntimeError, "torch.export", "CSRGraph", "no_grad"):
            torch.export.export(model, (x,))
