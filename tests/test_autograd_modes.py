"""Forward-mode AD, torch.func's differentiating transforms and double backward raise naming the op (never zero or
None tangents); vmap gives the per-sample results; reverse mode gives each input its gradient when it alone is asked."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from revgnn_ext import CSRGraph, ops

from conftest import raises

OPS = {
    "spmm": lambda g, t: ops.spmm(g, t, reduce="mean"),
    "gen_aggregate": lambda g, t: ops.gen_aggregate(g, t, aggr="softmax"),
    "gat_aggregate": lambda g, t: ops.gat_aggregate(g, t, t[:, :2]),
}
ACCUMULATE_FORMS = {  # in place, no autograd of their own: they hand a tracked input to the functional op
    "spmm": lambda g, t: ops.spmm(g, t, out=torch.zeros_like(t)),
    "gat_aggregate": lambda g, t: ops.gat_aggregate(g, t, t[:, :2], out=torch.zeros_like(t)),
}


@pytest.fixture
def graph():
    torch.manual_seed(0)
    return CSRGraph.from_edge_index(torch.randint(0, 10, (2, 40)), 10)


@pytest.mark.parametrize("name", OPS)
def test_forward_mode_ad_raises(name, graph):
    fn = OPS[name]
    x = torch.randn(10, 4, dtype=torch.float64)
    with fwAD.dual_level(), raises(NotImplementedError, f"revgnn_ext.ops.{name}", "forward-mode AD"):
        fn(graph, fwAD.make_dual(x, torch.randn_like(x)))
    with raises(NotImplementedError, f"revgnn_ext.ops.{name}", "forward-mode AD"):
        torch.func.jvp(lambda t: fn(graph, t), (x,), (torch.randn_like(x),))


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("name", ACCUMULATE_FORMS)
def test_accumulate_forms_raise_under_forward_ad(name, grad_enabled, graph):
    """A dual input, even without autograd: an error, not an accumulation that drops the tangent."""
    x = torch.randn(10, 4, dtype=torch.float64)
    with fwAD.dual_level(), torch.set_grad_enabled(grad_enabled), \
            pytest.raises(NotImplementedError, match=f"revgnn_ext.ops.{name}: forward-mode AD"):
        ACCUMULATE_FORMS[name](graph, fwAD.make_dual(x, torch.randn_like(x)))


@pytest.mark.parametrize("name", OPS)
def test_func_grad_raises_and_vmap_works(name, graph):
    fn = OPS[name]
    x = torch.randn(10, 4, dtype=torch.float64)
    with raises(NotImplementedError, f"revgnn_ext.ops.{name}", "torch.func"):
        torch.func.grad(lambda t: fn(graph, t).sum())(x)
    xs = torch.randn(3, 10, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(lambda t: fn(graph, t))(xs), torch.stack([fn(graph, t) for t in xs]))


@pytest.mark.parametrize("name", ["gen_aggregate", "gat_aggregate"])  # (spmm's backward ops are differentiable)
def test_double_backward_is_refused_clearly(name, graph):
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(OPS[name](graph, x).square().sum(), x, create_graph=True)
    with raises(NotImplementedError, f"revgnn_ext.{name}", "double backward"):
        gx.sum().backward()


def test_modules_name_the_op_under_forward_ad(graph):
    pytest.importorskip("torch_geometric")
    from revgnn_ext.nn import GENConv, GroupAddRev
    block = GroupAddRev(GENConv(4, 4), num_groups=2).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    with raises(NotImplementedError, "revgnn_ext.ops.gen_aggregate", "forward-mode AD"):
        torch.func.jvp(lambda t: block(t, graph), (x,), (torch.randn_like(x),))


# Each op with every differentiable input and absent optionals among them: (inputs, call).
PARTS = {
    "spmm": (lambda: {"x": torch.randn(10, 4), "edge_weight": torch.rand(40)},
             lambda g, a: ops.spmm(g, a["x"], a["edge_weight"], reduce="max")),
    "gen_aggregate": (lambda: {"x": torch.randn(10, 4), "edge_attr": torch.randn(40, 3), "edge_weight": torch.randn(4, 3),
                               "t": torch.rand(4)},  # edge_bias absent
                      lambda g, a: ops.gen_aggregate(g, a["x"], a["edge_attr"], a["edge_weight"], t=a["t"])),
    "gat_aggregate": (lambda: {"x": torch.randn(10, 4), "src_score": torch.randn(10, 2), "edge_attr": torch.randn(40, 2)},
                      lambda g, a: ops.gat_aggregate(g, a["x"], a["src_score"], edge_attr=a["edge_attr"])),
}


@pytest.mark.parametrize("name", PARTS)
def test_each_input_alone_gets_the_gradient_it_gets_among_all(name, graph):
    """Autograd numbers only the tensors a call passes: with optionals absent before and between
    the differentiable inputs, each input that alone requires grad gets its gradient, the others none."""
    make, call = PARTS[name]
    inputs = {k: v.double() for k, v in make().items()}
    for v in inputs.values():
        v.requires_grad_()
    grad_out = torch.randn_like(call(graph, inputs))
    full = torch.autograd.grad(call(graph, inputs), list(inputs.values()), grad_out)
    for (key, expected) in zip(inputs, full):
        alone = {k: v.detach().requires_grad_(k == key) for k, v in inputs.items()}
        call(graph, alone).backward(grad_out)
        assert all(v.grad is None for k, v in alone.items() if k != key), key
        torch.testing.assert_close(alone[key].grad, expected, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", ["spmm", "gen_aggregate", "gat_aggregate"])
def test_raw_op_without_the_transposed_csr_refuses_the_gradient_of_x(name, graph):
    """revgnn_ext.ops passes the transposed CSR when x needs a gradient; a raw call without it
    raises in backward, naming the op, instead of a wrong or missing gradient."""
    x = torch.randn(10, 4, requires_grad=True)
    lib, none = torch.ops.revgnn_ext, (None, None, None)
    out = {"spmm": lambda: lib.spmm(graph.rowptr, graph.col, *none, None, x, "sum"),
           "gen_aggregate": lambda: lib.gen_aggregate(graph.rowptr, graph.col, *none, x, None, None, None,
                                                      torch.ones(1), None, "softmax", 1e-7),
           "gat_aggregate": lambda: lib.gat_aggregate(graph.rowptr, graph.col, *none, None, x, torch.randn(10, 2),
                                                      None, None, None, None, 0.2, 0.0, 0)}[name]()[0]
    with raises(RuntimeError, f"revgnn_ext.{name}", "transposed CSR"):
        out.sum().backward()
