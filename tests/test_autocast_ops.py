"""The ops in float16/bfloat16 on every device (within twice the reference's error on the same rounded inputs)
and under torch.autocast, forward and backward; the in-place ops take a lower-precision operand beside float32."""
import pytest
import torch

from revgnn_ext import ops, reference
from revgnn_ext.nn import GENConv, SAGEConv

from conftest import DEVICES, assert_error_within_twice, csr_graph, make_graph, raises

LOW = [torch.float16, torch.bfloat16]
AGGRS = ["softmax", "max", "mean", "sum", "powermean"]
REDUCES = ["sum", "mean", "max", "min"]


def _spmm_case(device, reduce):
    """max/min without ties in any dtype (the reference splits a tie's gradient): no duplicate edges, no
    weights, distinct integers per channel (exact in bfloat16)."""
    if reduce in ("max", "min"):
        g = csr_graph("power_law", device, unique=True)
        x = torch.stack([torch.randperm(g.num_src) for _ in range(37)], 1).float() - g.num_src // 2
        return g, {"x": x.to(device), "reduce": reduce}
    g = csr_graph("power_law", device)
    return g, {"x": torch.randn(g.num_src, 37, device=device),
               "edge_weight": torch.rand(g.num_edges, device=device) + 0.5, "reduce": reduce}


def _gen_inputs(g, device, aggr):
    kw = {"x": torch.randn(g.num_src, 37, device=device), "edge_attr": torch.randn(g.num_edges, 5, device=device),
          "edge_weight": torch.randn(37, 5, device=device) * 0.5, "edge_bias": torch.randn(37, device=device) * 0.5,
          "aggr": aggr}
    if aggr == "softmax":
        kw["t"] = torch.rand(37, device=device) * 2 + 0.2
    if aggr == "powermean":
        kw["p"] = torch.rand(37, device=device) * 2 + 0.5
    return kw


def _op_case(device, op, variant):
    """(our op, the reference, graph, keyword inputs) of spmm with reduce `variant`, or gen_aggregate with aggr."""
    if op == "spmm":
        return (ops.spmm, reference.spmm, *_spmm_case(device, variant))
    g = csr_graph("power_law", device)
    return ops.gen_aggregate, reference.gen_aggregate, g, _gen_inputs(g, device, variant)


OP_CASES = [("spmm", r) for r in REDUCES] + [("gen_aggregate", a) for a in AGGRS]


def _run(fn, g, kw, cast=None):
    """fn's output and the gradients of its tensor inputs (cast first if `cast`), as float64."""
    leaves = {k: v.detach().requires_grad_() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    args = {k: (v.to(cast) if cast is not None else v) for k, v in leaves.items()}
    out = fn(g, **{**kw, **args})
    grad_out = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(1))
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return out.double(), {name: grad.double() for name, grad in zip(leaves, grads)}


def _compare(fn_ours, fn_ref, g, kw, dtype, autocast_device=None):
    """The op on inputs cast to `dtype` (or under autocast) against the reference on the same rounded inputs
    (a rounding can move a max's selection), in float64 and in `dtype`, forward and backward."""
    rounded = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if autocast_device is None:
        out, grads = _run(fn_ours, g, kw, cast=dtype)
    else:
        with torch.autocast(autocast_device, dtype=dtype):
            out, grads = _run(fn_ours, g, kw)
    exact_out, exact_grads = _run(fn_ref, g, rounded, cast=torch.float64)
    same_out, same_grads = _run(fn_ref, g, rounded)
    rtol = 2 * torch.finfo(dtype).eps
    assert_error_within_twice(out, same_out, exact_out, rtol)
    for name in exact_grads:
        assert_error_within_twice(grads[name], same_grads[name], exact_grads[name], rtol, name=name)


# ------------------------------------------------------------------------------ low precision
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("op, variant", OP_CASES)
def test_low_precision(device, dtype, op, variant):
    _compare(*_op_case(device, op, variant), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_in_place_ops_low_precision(device, dtype):
    g = csr_graph("power_law", device)
    x, w = torch.randn(g.num_src, 37, device=device).to(dtype), (torch.rand(g.num_edges, device=device) + 0.5).to(dtype)
    out = torch.randn(g.num_dst, 37, device=device).to(dtype)
    exact = out.double() + 0.5 * reference.spmm(g, x.double(), w.double(), "mean")
    same_dtype = out + 0.5 * reference.spmm(g, x, w, "mean")
    ops.spmm(g, x, w, "mean", out=out, alpha=0.5)
    assert_error_within_twice(out, same_dtype, exact, 2 * torch.finfo(dtype).eps)


# ------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduce", ["max", "min"])
def test_spmm_selection_keeps_its_dtype_under_autocast(device, reduce):
    """max/min select exactly in any precision (as PyG's scatter max): x is not cast to bfloat16."""
    g = csr_graph("power_law", device, unique=True)
    x = torch.randn(g.num_src, 37, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ops.spmm(g, x, reduce=reduce)
    assert out.dtype == torch.float32
    expected = reference.spmm(g, x, reduce=reduce)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad_out)[0], torch.autograd.grad(expected, x, grad_out)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, variant", OP_CASES)
def test_under_autocast(device, op, variant):
    fn, ref, g, kw = _op_case(device, op, variant)
    _compare(fn, ref, g, kw, torch.bfloat16, autocast_device=device)
    with torch.autocast(device, dtype=torch.bfloat16):  # float64 stays float64, as autocast leaves it
        assert fn(g, torch.randn(g.num_src, 8, device=device)).dtype == torch.bfloat16
        assert fn(g, torch.randn(g.num_src, 8, device=device, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_gen_aggregate_takes_float32_edge_features_beside_bfloat16_x(device):
    """What autocast gives a GENConv: bfloat16 x, float32 edge features and parameters."""
    g = csr_graph("power_law", device)
    kw = _gen_inputs(g, device, "softmax")
    kw["x"] = kw["x"].bfloat16()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ops.gen_aggregate(g, **kw)
    assert out.dtype == torch.bfloat16
    with raises(TypeError, "gen_aggregate", "edge_attr", "x"):
        ops.gen_aggregate(g, **kw)  # outside autocast, mixed dtypes are an error


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_takes_bfloat16_beside_float32(device):
    """spmm(out=) takes bfloat16 x beside a float32 out (float32 math); under autocast it adds the autocast result."""
    g = csr_graph("power_law", device)
    x = torch.randn(g.num_src, 37, device=device).bfloat16()
    out = torch.randn(g.num_dst, 37, device=device)
    expected = out + reference.spmm(g, x.float(), None, "sum")
    ops.spmm(g, x, out=out)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = out + ops.spmm(g, x)
        ops.spmm(g, x, out=out)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv", ["gen", "sage"])
def test_convs_train_under_autocast(device, conv):
    """GENConv (edge features) and SAGEConv under bfloat16 autocast: within a few roundings of the float32 run."""
    torch.manual_seed(0)
    ei, n = make_graph("power_law")
    ei = ei.to(device)
    module = (GENConv(16, 16, edge_dim=8) if conv == "gen" else SAGEConv(16, 16)).to(device)
    x = torch.randn(n, 16, device=device)
    args = (torch.randn(ei.size(1), 8, device=device),) if conv == "gen" else ()

    def step(autocast):
        module.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = module(x, ei, *args)
        out.float().square().mean().backward()
        return out.float(), [p.grad.clone() for p in module.parameters()]

    out, grads = step(True)
    exp_out, exp_grads = step(False)
    for ours, expected in zip([out] + grads, [exp_out] + exp_grads):
        tol = 8 * torch.finfo(torch.bfloat16).eps * (1 + expected.abs().max().item())
        torch.testing.assert_close(ours, expected, rtol=0, atol=tol)
