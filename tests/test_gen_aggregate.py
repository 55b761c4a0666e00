"""gen_aggregate against revgnn_ext.reference over aggregations, edge-feature modes, t/p, graphs, devices, dtypes;
gradients; opcheck; no [E, D] allocation; determinism; bad inputs; edge numerics against PyG."""
import pytest
import torch

from revgnn_ext import CSRGraph, ops, reference

from conftest import (DEVICES, SHAPES, assert_compiles_as_eager, assert_error_within_twice,
                      assert_same_across_thread_counts, csr_graph, device_dtype_params, make_graph,
                      max_cpu_allocation, raises)

AGGRS = ["softmax", "max", "mean", "sum", "powermean"]
# encoded_wide: more edge features (20) than the CUDA kernels stage in shared memory (16)
EDGE_MODES = ["none", "encoded", "encoded_nobias", "encoded_wide", "direct"]


def _case(g, aggr, mode, width, dtype, device, per_channel=False, feat=5):
    """Random inputs (float64 drawn, then cast) as keyword arguments of gen_aggregate."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, device=device) * scale).to(dtype)
    feat = 20 if mode == "encoded_wide" else feat
    kw = {"x": rnd(g.num_src, width)}
    if mode != "none":
        kw["edge_attr"] = rnd(g.num_edges, feat if mode != "direct" else width)
    if mode.startswith("encoded"):
        kw["edge_weight"] = rnd(width, feat, scale=0.5)
        if mode != "encoded_nobias":
            kw["edge_bias"] = rnd(width, scale=0.5)
    n = width if per_channel else 1
    if aggr == "softmax":
        kw["t"] = (torch.rand(n, dtype=torch.float64, device=device) * 2 + 0.2).to(dtype)
    if aggr == "powermean":
        kw["p"] = (torch.rand(n, dtype=torch.float64, device=device) * 2 + 0.5).to(dtype)
    return kw


def _differentiable(kw):
    return {k: v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("aggr", AGGRS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", EDGE_MODES)
def test_forward(device, dtype, aggr, shape, mode):
    g = csr_graph(shape, device)
    kw = _case(g, aggr, mode, 37, dtype, device, per_channel=shape == "power_law")
    out = ops.gen_aggregate(g, aggr=aggr, **kw)
    exact = reference.gen_aggregate(g, aggr=aggr, **{k: v.double() for k, v in kw.items()})
    if dtype == torch.float64:
        torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)
        return
    assert_error_within_twice(out, reference.gen_aggregate(g, aggr=aggr, **kw), exact, 8 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [1, 64, 257])
@pytest.mark.parametrize("aggr", AGGRS)
def test_widths_and_column_slice(device, width, aggr):
    g = csr_graph("power_law", device)
    kw = _case(g, aggr, "encoded", width, torch.float64, device, per_channel=True)
    buf = torch.randn(g.num_src, width + 9, dtype=torch.float64, device=device)
    kw["x"] = buf[:, 4:4 + width]
    torch.testing.assert_close(ops.gen_aggregate(g, aggr=aggr, **kw), reference.gen_aggregate(g, aggr=aggr, **kw),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggr", AGGRS)
# The CUDA kernels' lanes hold up to 4 channels each, in one pass of up to 128 channels: widths 8
# (1 channel per lane), 19 and 40 (2 or 3), 112 (3 or 4), 128 (4) and 200 (two passes, which share
# the block's shared memory between them)
@pytest.mark.parametrize("shape, width", [(shape, 19) for shape in ["random", "isolated", "bipartite", "power_law",
                                                                     "self_loops"]] +
                         [("power_law", width) for width in [8, 40, 112, 128, 200]])
@pytest.mark.parametrize("mode", EDGE_MODES)
def test_backward_matches_reference(device, aggr, shape, width, mode):
    g = csr_graph(shape, device)
    kw = _differentiable(_case(g, aggr, mode, width, torch.float64, device, per_channel=mode == "encoded"))
    inputs = [v for v in kw.values() if isinstance(v, torch.Tensor)]
    out = ops.gen_aggregate(g, aggr=aggr, **kw)
    gout = torch.randn_like(out)
    ours = torch.autograd.grad(out, inputs, gout, allow_unused=True)
    ref = torch.autograd.grad(reference.gen_aggregate(g, aggr=aggr, **kw), inputs, gout, allow_unused=True)
    for name, a, b in zip(kw, ours, ref):
        b = torch.zeros_like(inputs[list(kw).index(name)]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("aggr", AGGRS)
def test_gradcheck_float64(aggr):
    g = csr_graph("random", "cpu")
    kw = _differentiable(_case(g, aggr, "encoded", 3, torch.float64, "cpu", per_channel=True, feat=2))
    names = list(kw)

    def fn(*args):
        return ops.gen_aggregate(g, aggr=aggr, **dict(zip(names, args)))
    assert torch.autograd.gradcheck(fn, tuple(kw.values()))


def test_t_and_p_as_python_floats():
    # (A shared t or p of shape [1]: test_backward_matches_reference, every mode but "encoded".)
    g = csr_graph("random", "cpu")
    for aggr, name in (("softmax", "t"), ("powermean", "p")):
        kw = {**_case(g, aggr, "encoded", 6, torch.float64, "cpu"), name: 0.8}
        torch.testing.assert_close(ops.gen_aggregate(g, aggr=aggr, **kw), reference.gen_aggregate(g, aggr=aggr, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggr", AGGRS)
def test_opcheck(device, aggr):
    g = csr_graph("power_law", device)
    kw = _case(g, aggr, "encoded", 6, torch.float64, device, per_channel=True, feat=3)
    args = (g.rowptr, g.col, *g.transposed(), kw["x"], g.edges_to_csr(kw["edge_attr"]), kw["edge_weight"],
            kw["edge_bias"], kw.get("t"), kw.get("p"), aggr, 1e-7)
    lib = torch.ops.revgnn_ext
    torch.library.opcheck(lib.gen_aggregate.default, args, test_utils=(
        "test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"))
    out, state = lib.gen_aggregate(*args)
    for mask in ([True] * 6, [False, False, True, False, True, True]):
        bargs = args[:11] + (out, state, torch.randn_like(out), aggr, 1e-7, mask)
        torch.library.opcheck(lib.gen_aggregate_backward.default, bargs,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("aggr", AGGRS)
def test_no_edge_by_channel_allocation(aggr):
    """Forward and backward allocate at most the [E, F] edge features (F = 8 << D = 128), never [E, D]."""
    ei = torch.randint(0, 300, (2, 30000))
    g = CSRGraph.from_edge_index(ei, 300)
    g.transposed()
    kw = _differentiable(_case(g, aggr, "encoded", 128, torch.float32, "cpu", feat=8))

    def step():
        ops.gen_aggregate(g, aggr=aggr, **kw).sum().backward()
    step()
    edge_by_channel = g.num_edges * 128 * 4
    assert max_cpu_allocation(step) <= g.num_edges * 8 * 4 < edge_by_channel / 8
    # The reference does allocate [E, D] tensors: the probe can see them.
    assert max_cpu_allocation(lambda: reference.gen_aggregate(g, aggr=aggr, **kw).sum().backward()) >= edge_by_channel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggr", AGGRS)
@pytest.mark.parametrize("mode, feat", [("encoded", 5), ("encoded", 20), ("direct", None)])
def test_output_mask_computes_only_the_wanted_gradients_bit_for_bit(device, aggr, mode, feat):
    """Each gradient asked for alone, and all but one: the bits of the call that asks for all
    six; the others come back empty. (F = 20 exceeds what the CUDA kernel stages in shared memory.)"""
    g = csr_graph("power_law", device)
    kw = _case(g, aggr, mode, 19, torch.float32, device, per_channel=True, feat=feat)
    args = (g.rowptr, g.col, *g.transposed(), kw["x"], g.edges_to_csr(kw["edge_attr"]), kw.get("edge_weight"),
            kw.get("edge_bias"), kw.get("t"), kw.get("p"))
    lib = torch.ops.revgnn_ext
    out, state = lib.gen_aggregate(*args, aggr, 1e-7)
    rest = (out, state, torch.randn_like(out), aggr, 1e-7)
    full = lib.gen_aggregate_backward(*args, *rest, [True] * 6)
    learnable = aggr in ("softmax", "powermean")  # t or p
    assert sum(grad.numel() > 0 for grad in full) == (4 if mode == "encoded" else 2) + learnable
    for k in range(6):
        for mask in ([i == k for i in range(6)], [i != k for i in range(6)]):
            grads = lib.gen_aggregate_backward(*args, *rest, mask)
            for i, (grad, expected) in enumerate(zip(grads, full)):
                assert torch.equal(grad, expected) if mask[i] else grad.numel() == 0, (mask, i)


def test_rev_gnn_step_allocates_no_gradient_of_the_edge_features():
    """A proteins-deep step's backward allocates nothing as large as the [E, F] edge features, which need no
    gradient (the probe sees it when they do)."""
    from revgnn_ext.nn import RevGNN
    num_nodes, num_edges, feat = 200, 6000, 8
    ei = torch.randint(0, num_nodes, (2, num_edges))
    edge_attr = torch.rand(num_edges, feat)
    x = torch.nn.functional.one_hot(torch.randint(0, 8, (num_nodes,)), 8).float()
    model = RevGNN.preset("proteins-deep", num_layers=3, hidden_channels=16)
    edge_by_feature = num_edges * feat * 4

    def backward_peak(attr):
        loss = model(x, ei, attr).square().mean()
        return max_cpu_allocation(loss.backward)
    backward_peak(edge_attr)  # builds and caches the graph
    assert backward_peak(edge_attr) < edge_by_feature
    assert model.edge_encoder.weight.grad.abs().sum() > 0
    assert backward_peak(edge_attr.clone().requires_grad_()) >= edge_by_feature


@pytest.mark.parametrize("aggr", AGGRS)
def test_deterministic_across_runs_and_threads(aggr):
    g = csr_graph("power_law", "cpu")
    kw = _case(g, aggr, "encoded", 64, torch.float32, "cpu", per_channel=True)
    gout = torch.randn(g.num_dst, 64)

    def step():
        dk = _differentiable(kw)
        out = ops.gen_aggregate(g, aggr=aggr, **dk)
        return [out, *torch.autograd.grad(out, list(dk.values()), gout)]
    assert_same_across_thread_counts(step)


@pytest.mark.parametrize("aggr", AGGRS)
def test_non_finite_inputs_give_nan_not_a_crash(aggr):
    g = csr_graph("random", "cpu")
    kw = _case(g, aggr, "encoded", 8, torch.float32, "cpu")
    kw["x"][2, 3] = float("nan")
    out = ops.gen_aggregate(g, aggr=aggr, **kw)
    ref = reference.gen_aggregate(g, aggr=aggr, **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    dst = torch.repeat_interleave(torch.arange(g.num_dst), (g.rowptr[1:] - g.rowptr[:-1]).long())
    hit = dst[g.col.long() == 2].unique()
    assert hit.numel() > 0 and bool(torch.isnan(out[hit, 3]).all())


LIB = torch.ops.revgnn_ext


@pytest.mark.parametrize("call, exc, names", [
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x, a[:-1], w, b), ValueError, ["edge_attr"]),
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x, a[:, :4], w, b), ValueError, ["edge_weight", "8", "4", "5"]),
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x, a), ValueError, ["edge_weight", "edge_attr", "8"]),
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x, a.double(), w, b), TypeError, ["edge_attr", "x"]),
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x, a, w.double(), b), TypeError, ["edge_weight", "x"]),
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x, a, w[:3], b), ValueError, ["edge_weight"]),
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x, a, w, b[:3]), ValueError, ["edge_bias"]),
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x, None, w), ValueError, ["edge_weight", "edge_attr"]),
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x, a, w, b, t=torch.ones(3)), ValueError, ["t", "8"]),
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x, aggr="median"), ValueError, ["aggr", "median"]),
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x[1:], a, w, b), ValueError, ["x", "39", "40"]),
    (lambda g, x, a, w, b: ops.gen_aggregate(g, x.to("meta"), a, w, b), ValueError, ["x", "meta"]),
    (lambda g, x, a, w, b: LIB.gen_aggregate(g.rowptr, g.col.clone().index_fill_(0, torch.tensor(3), 999), None,
                                             None, None, x, None, None, None, torch.ones(1), None, "softmax", 0.0),
     ValueError, ["revgnn_ext.gen_aggregate", "col", "999"]),
    (lambda g, x, a, w, b: LIB.gen_aggregate(g.rowptr, g.col, None, None, None, x, None, None, None, None, None,
                                             "softmax", 0.0), ValueError, ["revgnn_ext.gen_aggregate", "t"]),
    (lambda g, x, a, w, b: LIB.gen_aggregate(g.rowptr, g.col, None, None, None, x.int(), None, None, None, None, None,
                                             "sum", 0.0), TypeError, ["revgnn_ext.gen_aggregate", "x", "Int"]),
])
def test_bad_input_raises_naming_the_argument(call, exc, names):
    g = csr_graph()
    kw = _case(g, "softmax", "encoded", 8, torch.float32, "cpu")
    with raises(exc, "gen_aggregate", *names):
        call(g, kw["x"], kw["edge_attr"], kw["edge_weight"], kw["edge_bias"])


def test_torch_compile_fullgraph():
    g = csr_graph("power_law", "cpu")
    g.transposed()
    kw = _case(g, "softmax", "encoded", 16, torch.float32, "cpu", per_channel=True)

    def f(x, edge_attr, edge_weight, edge_bias, t):
        h = ops.gen_aggregate(g, x, edge_attr, edge_weight, edge_bias, "softmax", t=t)
        return ops.gen_aggregate(g, h, aggr="max").relu()

    assert_compiles_as_eager(f, lambda: _differentiable(kw), kw)


# ---------------------------------------------------------------------------- edge numerics, against PyG
def _pyg_aggregate(aggregation, g, x, eps=1e-7):
    """PyG's aggregation module over the messages relu(x_j) + eps of g's edges (CSR order)."""
    dst = torch.repeat_interleave(torch.arange(g.num_dst), g.rowptr.diff().long())
    return aggregation(x[g.col.long()].relu() + eps, dst, dim_size=g.num_dst)


@pytest.mark.parametrize("p", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("shape", ["random", "isolated"])
def test_powermean_matches_pyg_values_and_gradients(p, shape):
    # Clamped messages (relu gives 0): at p = 1 on the clamp's bound (no gradient); p = 0 gives 1 and NaN gradients.
    aggr_mod = pytest.importorskip("torch_geometric.nn.aggr")
    g = csr_graph(shape, "cpu")
    pyg = aggr_mod.PowerMeanAggregation(p=p, learn=True, channels=5).double()
    x_pyg = torch.randn(g.num_src, 5, dtype=torch.float64, requires_grad=True)
    x_ours = x_pyg.detach().clone().requires_grad_()
    p_ours = pyg.p.detach().clone().requires_grad_()
    expected = _pyg_aggregate(pyg, g, x_pyg)
    out = ops.gen_aggregate(g, x_ours, aggr="powermean", p=p_ours)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    gout = torch.randn_like(out)
    got = torch.autograd.grad(out, (x_ours, p_ours), gout)
    want = torch.autograd.grad(expected, (x_pyg, pyg.p), gout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_powermean_fixed_p_one_is_a_plain_mean_as_in_pyg():
    aggr_mod = pytest.importorskip("torch_geometric.nn.aggr")
    g = csr_graph("random", "cpu")
    x = torch.randn(g.num_src, 4, dtype=torch.float64)
    expected = _pyg_aggregate(aggr_mod.PowerMeanAggregation(p=1.0), g, x)  # no clamps for a fixed p = 1
    torch.testing.assert_close(ops.gen_aggregate(g, x, aggr="powermean", p=1.0), expected)
    torch.testing.assert_close(reference.gen_aggregate(g, x, aggr="powermean", p=1.0), expected)


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0])
def test_genconv_learnable_p_matches_pyg(p):
    pyg_nn = pytest.importorskip("torch_geometric.nn")
    from revgnn_ext.nn import GENConv
    ei, n = make_graph("random")
    theirs = pyg_nn.GENConv(6, 6, aggr="powermean", p=p, learn_p=True).double()
    ours = GENConv(6, 6, aggr="powermean", p=p, learn_p=True).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(n, 6, dtype=torch.float64)
    outs = [m(x, ei) for m in (theirs, ours)]
    torch.testing.assert_close(outs[1], outs[0], equal_nan=True)
    for m, out in zip((theirs, ours), outs):
        out.sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("scale", [1e38, 3e38, 1e19])
def test_softmax_of_huge_float32_messages_is_finite_as_in_pyg(scale):
    # The online softmax keeps a weighted mean, never a weighted sum that overflows.
    aggr_mod = pytest.importorskip("torch_geometric.nn.aggr")
    g = csr_graph("random", "cpu")
    x = (torch.rand(g.num_src, 8, dtype=torch.float64) + 0.1).mul(scale / 1.1).float()
    x_pyg, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = _pyg_aggregate(aggr_mod.SoftmaxAggregation(t=1.0), g, x_pyg)
    out = ops.gen_aggregate(g, x_ours, aggr="softmax", t=1.0)
    assert bool(expected.isfinite().all()) and bool(out.isfinite().all())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=0.0)
    (gx_pyg,) = torch.autograd.grad(expected.sum(), x_pyg)
    (gx,) = torch.autograd.grad(out.sum(), x_ours)
    assert bool(gx.isfinite().all())
    # d out / d m = a (1 + t (m - out)), m - out known to a rounding of m in both: agreement to t * eps * |m|.
    torch.testing.assert_close(gx, gx_pyg, rtol=1e-4, atol=4 * torch.finfo(torch.float32).eps * scale)
