"""DEQ (RevGNN-DEQ): fixed point, implicit gradients equal the unrolled iteration's, gradcheck, one dropout mask
per solve, BatchNorm, non-convergence and non-finite values reported, memory independent of iterations."""
import warnings

import pytest
import torch

pytest.importorskip("torch_geometric")

from revgnn_ext.nn import GENConv, SAGEConv  # noqa: E402
from revgnn_ext.nn.deq import DEQ, anderson, broyden  # noqa: E402
from revgnn_ext.nn.rev_gnn import ResPlusGroup  # noqa: E402

from conftest import fresh_process_json, grads, random_edges, raises  # noqa: E402

SOLVERS = ["anderson", "broyden"]


class Tanh(torch.nn.Module):
    """F(h) = tanh(conv(dropout(h))), the conv's weights scaled by ``scale``: a contraction for small scales."""

    def __init__(self, conv, scale=0.3, dropout=0.0, norm=None):
        super().__init__()
        self.conv, self.dropout, self.norm = conv, torch.nn.Dropout(dropout), norm
        with torch.no_grad():
            for p in conv.parameters():
                p.mul_(scale)

    def forward(self, h, edge_index):
        if self.norm is not None:
            h = self.norm(h)
        return torch.tanh(self.conv(self.dropout(h), edge_index))


def _sage_deq(channels=8, groups=2, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    c = channels // groups
    convs = torch.nn.ModuleList(Tanh(SAGEConv(c, c), **kw.pop("group", {})) for _ in range(groups))
    return DEQ(convs, **kw).to(dtype)


def _unrolled(deq, x, *args, steps=200):
    """The plain iteration z <- f(z; x) from 0, with autograd through every step."""
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = deq.f(z, x, *args)
    return z


def _assert_close_relative(actual, expected, rtol):
    for a, b in zip(actual, expected):
        assert ((a - b).norm() / b.norm()).item() <= rtol


def _gen_case(solver):
    """RevGNN's res+ groups around our fused GENConv (softmax, learnable t, edge features): (deq, x, args)."""
    torch.manual_seed(0)
    ei = random_edges(30, 150)
    edge_attr = torch.rand(150, 4, dtype=torch.float64)
    groups = torch.nn.ModuleList(
        ResPlusGroup(torch.nn.LayerNorm(4),
                     GENConv(4, 4, aggr="softmax", learn_t=True, edge_dim=4, norm="layer", bias=True))
        for _ in range(2))
    deq = DEQ(groups, solver=solver, tol=1e-12, max_iter=200).double()
    x = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    return deq, x, (ei, torch.ones(30, 8, dtype=torch.float64), edge_attr)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("f", ["sage-1", "sage-2", "sage-3", "gen"])
def test_implicit_gradients_equal_unrolled(solver, f):
    if f == "gen":
        deq, x, args = _gen_case(solver)
    else:
        deq = _sage_deq(channels=6, groups=int(f[-1]), solver=solver, tol=1e-12, max_iter=100)
        args = (random_edges(40, 200),)
        x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    out = deq(x, *args)
    assert deq.forward_trace.converged and deq.forward_trace.residual < 1e-12
    assert ((deq.f(out, x, *args) - out).norm() / out.norm()).item() < 1e-11  # f(out) = out
    inputs = [x, *deq.parameters()]
    weight = torch.randn_like(out)
    implicit = grads(out, inputs, weight)
    assert deq.backward_trace.converged
    unrolled_out = _unrolled(deq, x, *args)
    assert torch.allclose(out, unrolled_out, rtol=1e-10, atol=1e-12)
    _assert_close_relative(implicit, grads(unrolled_out, inputs, weight), 1e-6)


def test_gradcheck():
    deq = _sage_deq(channels=4, tol=1e-14, max_iter=100)
    ei = random_edges(12, 40)
    x = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    weight = deq.convs[0].conv.lin_l.weight
    assert torch.autograd.gradcheck(lambda x, w: deq(x, ei), (x, weight), eps=1e-6, atol=1e-7)


def test_solvers_on_a_linear_system():
    """z = A z + b with ||A|| < 1: both solvers reach the exact solution (I - A)^-1 b."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, dtype=torch.float64, generator=gen) * 0.9 / 30 ** 0.5
    b = torch.randn(30, dtype=torch.float64, generator=gen)
    exact = torch.linalg.solve(torch.eye(30, dtype=torch.float64) - a, b)
    for solve in (anderson, broyden):
        z, fz, trace = solve(lambda z: a @ z + b, torch.zeros(30, dtype=torch.float64), 100, 1e-13)
        assert trace.converged
        assert torch.allclose(z, exact, atol=1e-10) and torch.allclose(fz, a @ z + b)


def test_no_grad_and_eval_give_the_fixed_point():
    deq = _sage_deq()
    ei = random_edges(40, 200)
    x = torch.randn(40, 8, dtype=torch.float64)
    with torch.no_grad():
        plain = deq(x, ei)
    assert torch.allclose(deq(x.requires_grad_(), ei), plain, rtol=1e-6)


def test_dropout_one_mask_per_solve():
    """One dropout mask per forward: the solve converges, the generators end where one evaluation of f leaves
    them, and the gradients are the unrolled iteration's under that mask."""
    deq = _sage_deq(tol=1e-12, max_iter=100, group={"dropout": 0.5}).train()
    ei = random_edges(40, 200)
    x = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    out = deq(x, ei)
    after = torch.rand(3)
    assert deq.forward_trace.converged
    weight = torch.randn_like(out)
    implicit = grads(out, [x, *deq.parameters()], weight)

    torch.manual_seed(5)
    deq.f(torch.zeros_like(x), x, ei)
    assert torch.equal(torch.rand(3), after)

    z = torch.zeros_like(x)
    for _ in range(200):
        torch.manual_seed(5)  # the same mask at every step
        z = deq.f(z, x, ei)
    assert torch.allclose(out, z, rtol=1e-10)
    _assert_close_relative(implicit, grads(z, [x, *deq.parameters()], weight), 1e-6)

    with torch.no_grad():  # fresh masks at every step never settle
        z = _unrolled(deq, x, ei, steps=50)
        assert ((deq.f(z, x, ei) - z).norm() / z.norm()).item() > 1e-2


def test_batch_norm_statistics_moved_once_per_forward():
    torch.manual_seed(0)
    convs = torch.nn.ModuleList(Tanh(SAGEConv(4, 4), norm=torch.nn.BatchNorm1d(4)) for _ in range(2))
    deq = DEQ(convs, tol=1e-10, max_iter=100).double().train()
    x = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    out = deq(x, random_edges(40, 200))
    assert deq.forward_trace.iterations > 3
    norms = [conv.norm for conv in deq.convs]
    assert [n.num_batches_tracked.item() for n in norms] == [1, 1]
    out.sum().backward()
    assert [n.num_batches_tracked.item() for n in norms] == [1, 1]


@pytest.mark.parametrize("solver", SOLVERS)
def test_non_convergence_is_reported(solver):
    deq = _sage_deq(solver=solver, tol=1e-14, max_iter=3)
    x = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=rf"{solver} solver of the forward solve did not converge in 3 "
                                            r"iterations: relative residual [\d.e-]+ > tol 1e-14"):
        out = deq(x, random_edges(40, 200))
    assert deq.forward_trace.iterations == 3 and not deq.forward_trace.converged
    with pytest.warns(RuntimeWarning, match="backward \\(adjoint\\) solve did not converge"):
        out.sum().backward()
    assert x.grad.isfinite().all()


class Exploding(torch.nn.Module):
    """Finite at 0 only."""

    def forward(self, h, edge_index):
        return torch.where(h == 0, 0.0, float("inf"))


def test_non_finite_values_never_pass_silently():
    deq = DEQ(Exploding(), max_iter=50)
    x = torch.ones(5, 2, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="stopped at a non-finite residual"):
        out = deq(x, None)
    assert out.isfinite().all()
    broken = _sage_deq()
    with torch.no_grad():
        broken.convs[0].conv.lin_l.weight.fill_(float("nan"))
    with raises(RuntimeError, "DEQ", "f"):
        broken(torch.randn(40, 8, dtype=torch.float64), random_edges(40, 200))


def test_arguments_are_checked():
    with raises(ValueError, "DEQ", "solver", "newton"):
        DEQ(Exploding(), solver="newton")
    for name in ("tol", "backward_tol"):  # checked where given, not warned about at every forward
        for value in (-1e-4, float("nan")):
            with raises(ValueError, "DEQ", name):
                _sage_deq(**{name: value})
    with raises(ValueError, "DEQ", "7", "2"):
        _sage_deq()(torch.randn(40, 7, dtype=torch.float64), random_edges(40, 200))


def test_saved_tensors_do_not_grow_with_iterations():
    """What a training step keeps for backward is one evaluation of f, whatever the iterations."""
    ei = random_edges(200, 2000)

    def saved_bytes(iterations):
        deq = _sage_deq(dtype=torch.float32, tol=0.0, max_iter=iterations)
        x = torch.randn(200, 8, requires_grad=True)
        total = []

        def pack(t):
            total.append(t.untyped_storage().nbytes())
            return t
        with warnings.catch_warnings(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            warnings.simplefilter("ignore")
            deq(x, ei)
        assert deq.forward_trace.iterations == iterations
        return sum(total)

    assert saved_bytes(40) == saved_bytes(2) > 0


# A training step's resident-set peak in a fresh process (with revgnn_ext.memory's thresholds), after a first step.
SCRIPT = """
import json, sys, warnings
from revgnn_ext.memory import PeakMemory, set_malloc_thresholds
if not set_malloc_thresholds():
    sys.exit(3)
import torch
from revgnn_ext import CSRGraph
from revgnn_ext.nn.deq import DEQ
from revgnn_ext.nn import GENConv
from revgnn_ext.nn.rev_gnn import ResPlusGroup
warnings.simplefilter("ignore")
iterations, nodes, hidden = map(int, sys.argv[1:])
torch.manual_seed(0)
graph = CSRGraph.from_edge_index(torch.randint(0, nodes, (2, 5 * nodes)), nodes)
c = hidden // 2
deq = DEQ(torch.nn.ModuleList(ResPlusGroup(torch.nn.LayerNorm(c), GENConv(c, c, aggr="softmax", norm="layer"))
                              for _ in range(2)),
          tol=0.0, max_iter=iterations)
x = torch.randn(nodes, hidden, requires_grad=True)
peaks = []
for step in range(2):
    with PeakMemory("cpu") as memory:
        deq(x, graph).square().mean().backward()
    peaks.append(memory.peak)
print(json.dumps([peaks[-1], deq.forward_trace.iterations, deq.backward_trace.iterations]))
"""


def test_step_memory_independent_of_iterations():
    """A step's resident peak at 30 iterations within 10% (+ 1 MB) of that at 5 (an [N, D] each would add 25 MB)."""
    def peak(iterations):
        value, forward, backward = fresh_process_json(SCRIPT, iterations, 4000, 64)
        assert forward == backward == iterations
        print(f"step peak at {iterations} iterations: {value / 2**20:.1f} MB")
        return value

    few, many = peak(5), peak(30)
    assert many <= 1.1 * few + 2**20, (few, many)


def test_revgnn_proteins_deq_preset():
    """RevGNN.preset("proteins-deq"): one DEQ block converges, every parameter (edge encoder too) gets a gradient."""
    from revgnn_ext.datasets import synthetic_proteins
    from revgnn_ext.nn import RevGNN

    torch.manual_seed(0)
    data = synthetic_proteins(num_nodes=200, mean_degree=8, seed=0)
    model = RevGNN.preset("proteins-deq", hidden_channels=16)
    assert isinstance(model.layers[0], DEQ) and len(model.layers) == 1
    out = model(data.x, data.edge_index, data.edge_attr)
    torch.nn.functional.binary_cross_entropy_with_logits(out, data.y.float()).backward()
    block = model.layers[0]
    assert block.forward_trace.converged and block.backward_trace.converged
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
