"""spmm and its accumulate form against revgnn_ext.reference, over devices x dtypes x reductions
x graph shapes x widths; gradients, opcheck, torch.compile, determinism and bad inputs."""
import pytest
import torch

from revgnn_ext import CSRGraph, ops, reference

from conftest import (DEVICES, HAS_CUDA, SHAPES, assert_compiles_as_eager, assert_error_within_twice,
                      assert_same_across_thread_counts, csr_graph, device_dtype_params, grads, raises)

REDUCES = ["sum", "mean", "max", "min"]
WIDTHS = [1, 37, 64, 257]


def _inputs(g, width, dtype, weighted, device, slice_offset=0):
    """x as a column slice of a wider buffer when slice_offset > 0 (read in place)."""
    buf = torch.randn(g.num_src, width + 2 * slice_offset, dtype=torch.float64, device=device).to(dtype)
    x = buf[:, slice_offset:slice_offset + width]
    w = torch.rand(g.num_edges, dtype=torch.float64, device=device).add(0.5).to(dtype) if weighted else None
    return x, w


def assert_close_to_reference(ours, fn, inputs, dtype):
    """float64: to 1e-10. Lower precision: error against float64 within 2x the same-dtype reference's (+ 4 eps)."""
    exact = fn(*[t.double() if t is not None else None for t in inputs])
    if dtype == torch.float64:
        torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-10)
        return
    assert_error_within_twice(ours, fn(*inputs), exact, 4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_forward(device, dtype, reduce, shape, width, weighted):
    g = csr_graph(shape, device)
    x, w = _inputs(g, width, dtype, weighted, device)
    out = ops.spmm(g, x, w, reduce)
    assert out.shape == (g.num_dst, width) and out.dtype == dtype and out.is_contiguous()
    assert_close_to_reference(out, lambda x, w: reference.spmm(g, x, w, reduce), (x, w), dtype)


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("reduce", REDUCES)
def test_column_slice_and_accumulate(device, dtype, reduce):
    g = csr_graph("power_law", device)
    x, w = _inputs(g, 37, dtype, True, device, slice_offset=5)
    assert x.stride(0) == 47 and not x.is_contiguous()
    assert_close_to_reference(ops.spmm(g, x, w, reduce), lambda x, w: reference.spmm(g, x, w, reduce), (x, w), dtype)
    # Accumulate into a column slice: the rest of the buffer is untouched.
    buf = torch.randn(g.num_dst, 50, device=device).to(dtype)
    before = buf.clone()
    out = buf[:, 3:40]
    assert ops.spmm(g, x, w, reduce, out=out, alpha=-0.5) is out
    torch.testing.assert_close(buf[:, :3], before[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(buf[:, 40:], before[:, 40:], rtol=0, atol=0)
    assert_close_to_reference(out, lambda b, x, w: b - 0.5 * reference.spmm(g, x, w, reduce), (before[:, 3:40], x, w),
                              dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_backward_matches_reference(device, reduce, shape, weighted):
    if reduce in ("max", "min") and shape == "duplicates" and not weighted:
        pytest.skip("duplicate edges tie; the tie rule is tested in test_ties_route_to_first_edge")
    g = csr_graph(shape, device)
    x, w = _inputs(g, 37, torch.float64, weighted, device)
    x, w = x.detach().requires_grad_(), (w.detach().requires_grad_() if weighted else None)
    out = ops.spmm(g, x, w, reduce)
    gout = torch.randn_like(out)
    params = [t for t in (x, w) if t is not None]
    ours = torch.autograd.grad(out, params, gout, allow_unused=True)
    ref = torch.autograd.grad(reference.spmm(g, x, w, reduce), params, gout, allow_unused=True)
    for a, b in zip(ours, ref):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device, dtype", [p for p in device_dtype_params() if p.values[1] != torch.float64])
@pytest.mark.parametrize("reduce", REDUCES)
def test_backward_low_precision(device, dtype, reduce):
    g = csr_graph("power_law", device)
    x, w = (t.requires_grad_() for t in _inputs(g, 64, dtype, True, device))
    out = ops.spmm(g, x, w, reduce)
    gout = torch.randn_like(out)
    gx, gw = grads(out, [x, w], gout)
    # Each gradient against float64, with the same 2x rule as the forward.
    for i, ours in enumerate((gx, gw)):
        def fn(x, w, gout, i=i):
            x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
            return torch.autograd.grad(reference.spmm(g, x, w, reduce), (x, w), gout)[i]
        assert_close_to_reference(ours, fn, (x, w, gout), dtype)


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("shape", ["power_law", "bipartite", "isolated", "self_loops"])
def test_gradcheck_float64(reduce, shape):
    g = csr_graph(shape, "cpu")
    x, w = _inputs(g, 5, torch.float64, True, "cpu")
    x, w = x.requires_grad_(), w.requires_grad_()
    fn = lambda x, w: ops.spmm(g, x, w, reduce)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_ties_route_to_first_edge():
    # Three copies of the edge 0 -> 1 tie on every channel: the whole gradient goes to the first (caller's order).
    ei = torch.tensor([[2, 0, 0, 0], [1, 1, 1, 1]])
    g = CSRGraph.from_edge_index(ei, 3)
    x = torch.tensor([[5.0, -1.0], [0.0, 0.0], [1.0, 2.0]], requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    out = ops.spmm(g, x, w, "max")
    assert out[1].tolist() == [5.0, 2.0]
    out.sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    assert w.grad.tolist() == [2.0, 5.0, 0.0, 0.0]  # edge 0 (from 2) wins ch 1, edge 1 (first 0->1) ch 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduce", REDUCES)
def test_nan_propagates(device, reduce):
    g = csr_graph("random", device)
    x, w = _inputs(g, 8, torch.float32, True, device)
    x[3, 2] = float("nan")
    out = ops.spmm(g, x, w, reduce)
    ref = reference.spmm(g, x, w, reduce)
    has_nan_source = torch.zeros(g.num_dst, dtype=torch.bool, device=device)
    dst = torch.repeat_interleave(torch.arange(g.num_dst, device=device), (g.rowptr[1:] - g.rowptr[:-1]).long())
    has_nan_source[dst[g.col.long() == 3]] = True
    assert bool(torch.isnan(out[has_nan_source, 2]).all())
    assert not bool(torch.isnan(out[~has_nan_source]).any())
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduce", REDUCES)
def test_deterministic(device, reduce):
    g = csr_graph("power_law", device)
    x, w = _inputs(g, 64, torch.float32, True, device)
    gout = torch.randn(g.num_dst, 64, device=device)

    def step():
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = ops.spmm(g, xr, wr, reduce)
        return (out, *torch.autograd.grad(out, (xr, wr), gout))
    assert_same_across_thread_counts(step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduce", REDUCES)
def test_opcheck(device, reduce):
    g = csr_graph("power_law", device)
    x, w = _inputs(g, 6, torch.float64, True, device)
    graph = (g.rowptr, g.col, *g.transposed())
    lib = torch.ops.revgnn_ext
    out, arg = lib.spmm(*graph, w, x, reduce)
    gout = torch.randn_like(out)
    x.requires_grad_()
    w.requires_grad_()
    torch.library.opcheck(lib.spmm.default, (*graph, w, x, reduce))
    torch.library.opcheck(lib.spmm.default, (g.rowptr, g.col, None, None, None, None, x.detach(), reduce))
    torch.library.opcheck(lib.spmm_backward_x.default, (*graph, w, gout.requires_grad_(), arg, reduce))
    torch.library.opcheck(lib.spmm_backward_weight.default, (*graph, x, gout, arg, reduce))
    buf = torch.randn(g.num_dst, 6, dtype=x.dtype, device=device)
    torch.library.opcheck(lib.spmm_accumulate_.default, (buf, g.rowptr, g.col, w.detach(), x.detach(), reduce, 0.5))


def test_torch_compile_fullgraph():
    g = csr_graph("power_law", "cpu")
    g.transposed()
    x, w = _inputs(g, 16, torch.float32, True, "cpu")

    def f(x, w):
        h = ops.spmm(g, x, w, "mean").relu() + ops.spmm(g, x, None, "max")
        out = torch.zeros_like(h)
        ops.spmm(g, h, None, "sum", out=out, alpha=0.5)
        return out

    assert_compiles_as_eager(f, lambda: {"x": x.clone().requires_grad_(), "w": w.clone().requires_grad_()}, ["x", "w"])


def test_accumulate_under_autograd_is_tracked():
    g = csr_graph("random", "cpu")
    x, w = _inputs(g, 8, torch.float64, True, "cpu")
    x.requires_grad_()
    base = torch.randn(g.num_dst, 8, dtype=torch.float64, requires_grad=True)
    out = ops.spmm(g, x, w, "mean", out=base.clone(), alpha=2.0)
    ref = base + 2.0 * reference.spmm(g, x, w, "mean")
    torch.testing.assert_close(out, ref)
    gout = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (x, base), gout), torch.autograd.grad(ref, (x, base), gout))


# ------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("call, exc, names", [
    (lambda g, x, w: ops.spmm(g, x[:-1], w), ValueError, ["x", "39", "40"]),
    (lambda g, x, w: ops.spmm(g, x[:, 0]), ValueError, ["x"]),
    (lambda g, x, w: ops.spmm(g, x.long()), TypeError, ["x"]),
    (lambda g, x, w: ops.spmm(g, x, w[:-1]), ValueError, ["edge_weight"]),
    (lambda g, x, w: ops.spmm(g, x, w[:, None]), ValueError, ["edge_weight"]),
    (lambda g, x, w: ops.spmm(g, x, w.double()), TypeError, ["weight", "x"]),
    (lambda g, x, w: ops.spmm(g, x, reduce="prod"), ValueError, ["reduce", "prod"]),
    (lambda g, x, w: ops.spmm(torch.zeros(2, 3, dtype=torch.long), x), TypeError, ["graph", "CSRGraph"]),
    (lambda g, x, w: ops.spmm(g, x.to("meta")), ValueError, ["x", "meta"]),
])
def test_bad_input_raises_naming_the_argument(call, exc, names):
    g = csr_graph()
    with raises(exc, "spmm", *names):
        call(g, *_inputs(g, 8, torch.float32, True, "cpu"))


def _set(t, index, value):
    """A copy of t with t[index] = value."""
    t = t.clone()
    t[index] = value
    return t


LIB = torch.ops.revgnn_ext


@pytest.mark.parametrize("call, exc, names", [
    (lambda g, x, w, out, arg: LIB.spmm(g.rowptr, _set(g.col, 5, 1000), None, None, None, w, x, "sum"),
     ValueError, ["revgnn_ext.spmm", "col", "1000"]),
    (lambda g, x, w, out, arg: LIB.spmm(g.rowptr, _set(g.col, 5, -2), None, None, None, w, x, "max"),
     ValueError, ["revgnn_ext.spmm", "col", "-2"]),
    (lambda g, x, w, out, arg: LIB.spmm(g.rowptr, g.col.long(), None, None, None, w, x, "sum"), TypeError,
     ["revgnn_ext.spmm"]),
    (lambda g, x, w, out, arg: LIB.spmm(g.rowptr, g.col, None, None, None, w[:3], x, "sum"), ValueError,
     ["revgnn_ext.spmm", "weight"]),
    (lambda g, x, w, out, arg: LIB.spmm(g.rowptr, g.col, None, None, None, w, x[0], "sum"), ValueError,
     ["revgnn_ext.spmm", "x"]),
    (lambda g, x, w, out, arg: LIB.spmm(g.rowptr, g.col, None, None, None, None, x.int(), "sum"), TypeError,
     ["revgnn_ext.spmm", "x", "Int"]),
    (lambda g, x, w, out, arg: LIB.spmm(g.rowptr, g.col, None, None, None, w, x, "avg"), ValueError,
     ["revgnn_ext.spmm", "reduce", "avg"]),
    (lambda g, x, w, out, arg: LIB.spmm_backward_x(g.rowptr, g.col, *g.transposed()[:2],
                                                   _set(g.transposed()[2], 0, g.num_edges), w, out, arg, "max"),
     ValueError, ["revgnn_ext.spmm_backward_x", "perm_t"]),
    (lambda g, x, w, out, arg: LIB.spmm_backward_x(g.rowptr, g.col, *g.transposed(), w, out, arg[:2], "max"),
     ValueError, ["revgnn_ext.spmm_backward_x", "arg"]),
    (lambda g, x, w, out, arg: LIB.spmm_accumulate_(torch.zeros(8, g.num_dst).t(), g.rowptr, g.col, w, x, "sum"),
     ValueError, ["revgnn_ext.spmm_accumulate_", "out"]),
    (lambda g, x, w, out, arg: LIB.spmm_accumulate_(  # weight overlapping out's elements
        (buf := torch.zeros(g.num_dst * 8 + g.num_edges))[:g.num_dst * 8].view(g.num_dst, 8), g.rowptr, g.col,
        buf[8:8 + g.num_edges], x, "sum"), RuntimeError, ["revgnn_ext.spmm_accumulate_", "out", "weight"]),
    (lambda g, x, w, out, arg: ops.spmm(g, x, out=torch.zeros(3, 8)), ValueError, ["spmm", "out"]),
    (lambda g, x, w, out, arg: ops.spmm(g, (buf := torch.randn(40, 20))[:, :8], out=buf[:, 4:12]), RuntimeError,
     ["revgnn_ext.spmm_accumulate_", "out", "x"]),  # columns of one buffer that overlap
])
def test_raw_ops_and_out_check_their_arguments(call, exc, names):
    """Called directly with malformed tensors, the ops raise (never read out of bounds); so does a bad ``out``."""
    g = csr_graph("random", "cpu")
    x, w = _inputs(g, 8, torch.float32, True, "cpu")
    out, arg = LIB.spmm(g.rowptr, g.col, None, None, None, w, x, "max")
    with raises(exc, *names):
        call(g, x, w, out, arg)


def test_out_may_be_another_column_slice_of_xs_buffer():
    g = csr_graph("random", "cpu")
    buf = torch.randn(g.num_src, 20)
    ops.spmm(g, buf[:, :8], out=buf[:, 8:16])


@pytest.mark.skipif(not HAS_CUDA, reason="no GPU")
def test_cuda_device_mismatch():
    g = csr_graph("random", "cuda")
    x = torch.randn(g.num_src, 4)
    with raises(ValueError, "revgnn_ext.ops.spmm", "x", "cpu"):
        ops.spmm(g, x)
    with raises(ValueError, "revgnn_ext.spmm"):
        torch.ops.revgnn_ext.spmm(g.rowptr, g.col, None, None, None, None, x, "sum")
