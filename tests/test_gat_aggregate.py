"""gat_aggregate against revgnn_ext.reference over score modes, edge_keep, attention dropout, graphs, dtypes and
devices: gradients, gradcheck, the accumulate form, opcheck, compile, determinism, allocations, bad inputs."""
import pytest
import torch

from revgnn_ext import CSRGraph, emulator, ops, reference

from conftest import (DEVICES, MARKS, SHAPES, assert_compiles_as_eager, assert_error_within_twice,
                      assert_same_across_thread_counts, csr_graph, device_dtype_params, max_cpu_allocation, raises)

# Graphs whose caller's edge order is not CSR order (csr_graph(shuffled=True)): edge ids and CSR positions differ.
MODES = ["src_only", "src_dst", "edge_features", "edge_scores"]
NAMES = ["x", "src_score", "dst_score", "edge_attr", "edge_weight"]
# (graph shape, heads, channels per head, edge features) of the gradient cases. The CUDA kernel of
# the per-row gradients gives all heads of a row to one group of lanes (8 of them up to 32 channels,
# 32 from 65) and holds 8 heads, features or (head, feature) entries per lane and pass: 65 features
# (and 2 * 65 entries) or 70 heads take more than one pass.
GRADIENT_CASES = [(shape, 2, 7, 3) for shape in ["random", "isolated", "self_loops", "bipartite", "power_law"]] + [
    ("power_law", 4, 70, 5), ("power_law", 2, 3, 65), ("isolated", 70, 1, 2)]


def _case(g, mode, heads, width, dtype, device, feat=3, keep=0.0):
    """Random keyword arguments of gat_aggregate (float64 drawn, then cast)."""
    gen = torch.Generator().manual_seed(heads * 1000 + width)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    kw = {"x": rnd(g.num_src, heads * width), "src_score": rnd(g.num_src, heads)}
    if mode != "src_only":
        kw["dst_score"] = rnd(g.num_dst, heads)
    if mode == "edge_features":
        kw.update(edge_attr=rnd(g.num_edges, feat), edge_weight=rnd(heads, feat))
    if mode == "edge_scores":
        kw["edge_attr"] = rnd(g.num_edges, heads)
    if keep:
        kw["edge_keep"] = (torch.rand(g.num_edges, generator=gen) < keep).to(device)
    return kw


def _differentiable(kw):
    return {k: v.detach().requires_grad_() if k in NAMES else v for k, v in kw.items()}


def _as(kw, dtype):
    return {k: v.to(dtype) if k in NAMES else v for k, v in kw.items()}


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_forward_matches_reference(device, dtype, shape, mode):
    g = csr_graph(shape, device, shuffled=True)
    kw = _case(g, mode, 3, 5, dtype, device, keep=0.7 if shape == "duplicates" else 0.0)
    out = ops.gat_aggregate(g, negative_slope=0.15, **kw)
    exact = reference.gat_aggregate(g, negative_slope=0.15, **_as(kw, torch.float64))
    if dtype == torch.float64:
        torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)
    else:
        assert_error_within_twice(out, reference.gat_aggregate(g, negative_slope=0.15, **kw), exact, 4e-7)


@pytest.mark.parametrize("dtype, autocast", [(torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_half_types_on_cpu_within_twice_torchs_error(dtype, autocast):
    """float16 and bfloat16 inputs, or float32 ones under bfloat16 autocast (cast, then computed in float32)."""
    g = csr_graph("power_law", "cpu", shuffled=True)
    kw = _case(g, "edge_features", 2, 8, torch.float32 if autocast else dtype, "cpu", keep=0.8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ops.gat_aggregate(g, **kw)
    assert out.dtype == dtype
    low = _as(kw, dtype)
    exact = reference.gat_aggregate(g, **_as(low, torch.float64))
    assert_error_within_twice(out, reference.gat_aggregate(g, **low), exact, 4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, heads, width, feat", GRADIENT_CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradients_match_reference(device, shape, heads, width, feat, mode, p):
    g = csr_graph(shape, device, shuffled=True)
    kw = _differentiable(_case(g, mode, heads, width, torch.float64, device, feat=feat, keep=0.75))
    call = dict(negative_slope=0.3, attn_dropout=p, seed=2**63 + 99)
    tensors = [kw[k] for k in NAMES if k in kw]
    out = ops.gat_aggregate(g, **kw, **call)
    ref = reference.gat_aggregate(g, **kw, **call)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gout = torch.randn_like(out)
    ours = torch.autograd.grad(out, tensors, gout, allow_unused=True)
    want = torch.autograd.grad(ref, tensors, gout, allow_unused=True)
    for name, a, b, t in zip([k for k in NAMES if k in kw], ours, want, tensors):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("mode", ["edge_features", "edge_scores"])
def test_gradients_in_each_dtype(device, dtype, mode):
    """Every gradient in each dtype against the float64 truth (float16 and bfloat16 computed in
    float32 and rounded once per value): within twice the error of the reference computed in the
    same dtype. Three heads, a hub row, dropped edges and attention dropout."""
    g = csr_graph("power_law", device, shuffled=True)
    kw = _differentiable(_case(g, mode, 3, 8, dtype, device, feat=6, keep=0.8))
    call = dict(attn_dropout=0.2, seed=9)
    names = [k for k in NAMES if k in kw]
    out = ops.gat_aggregate(g, **kw, **call)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    ours = torch.autograd.grad(out, [kw[k] for k in names], gout.to(dtype))
    same = torch.autograd.grad(reference.gat_aggregate(g, **kw, **call), [kw[k] for k in names], gout.to(dtype))
    wide = _differentiable(_as(kw, torch.float64))
    exact = torch.autograd.grad(reference.gat_aggregate(g, **wide, **call), [wide[k] for k in names], gout)
    for name, a, b, e in zip(names, ours, same, exact):
        if dtype == torch.float64:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-11, msg=lambda m: f"{name}: {m}")
        else:
            assert_error_within_twice(a, b, e, 4 * torch.finfo(dtype).eps, name)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    g = csr_graph("duplicates", "cpu", shuffled=True)
    kw = _differentiable(_case(g, mode, 2, 3, torch.float64, "cpu", feat=2, keep=0.8))
    names = [k for k in NAMES if k in kw]

    def fn(*args):
        return ops.gat_aggregate(g, **{**kw, **dict(zip(names, args))}, attn_dropout=0.3, seed=5)
    assert torch.autograd.gradcheck(fn, tuple(kw[k] for k in names))


@pytest.mark.parametrize("p", [0.25, 0.9, 1.0])
def test_attention_dropout_is_the_references_draw_and_replays(p):
    """Dropped (edge, head) pairs are the reference's draw (by caller's edge id), replayed; other seeds differ."""
    g = csr_graph("power_law", "cpu", shuffled=True)
    kw = _case(g, "src_dst", 4, 2, torch.float64, "cpu")
    kw["x"] = torch.ones_like(kw["x"])
    for seed in (0, 7, -3, 2**64 - 1):
        out = ops.gat_aggregate(g, **kw, attn_dropout=p, seed=seed)
        torch.testing.assert_close(out, reference.gat_aggregate(g, **kw, attn_dropout=p, seed=seed % 2**64),
                                   rtol=1e-12, atol=1e-12)
        assert torch.equal(out, ops.gat_aggregate(g, **kw, attn_dropout=p, seed=seed))  # replayed, no stored mask
    if p < 1:
        assert not torch.equal(ops.gat_aggregate(g, **kw, attn_dropout=p, seed=1),
                               ops.gat_aggregate(g, **kw, attn_dropout=p, seed=2))


def test_edge_keep_drops_edges_and_rows_without_kept_edges_give_zero():
    g = csr_graph("random", "cpu", shuffled=True)
    kw = _case(g, "edge_features", 2, 4, torch.float64, "cpu", keep=0.5)
    dst = g.to_edge_index()[1]
    kw["edge_keep"] &= dst != 3  # row 3 keeps no in-edge
    out = ops.gat_aggregate(g, **kw)
    torch.testing.assert_close(out, reference.gat_aggregate(g, **kw), rtol=1e-12, atol=1e-12)
    assert (dst == 3).any() and out[3].abs().max() == 0
    none = ops.gat_aggregate(g, **{**kw, "edge_keep": torch.zeros(g.num_edges, dtype=torch.bool)})
    assert none.shape == out.shape and none.abs().max() == 0


@pytest.mark.parametrize("width", [1, 37, 257])
def test_odd_widths_and_a_strided_x(width):
    g = csr_graph("power_law", "cpu", shuffled=True)
    kw = _case(g, "edge_features", 2, width, torch.float64, "cpu")
    buf = torch.randn(g.num_src, 2 * width + 5, dtype=torch.float64)
    kw["x"] = buf[:, 3:3 + 2 * width]
    torch.testing.assert_close(ops.gat_aggregate(g, **kw), reference.gat_aggregate(g, **kw), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.5])
def test_accumulate_into_a_column_slice(device, alpha):
    g = csr_graph("power_law", device, shuffled=True)
    kw = _case(g, "edge_features", 3, 4, torch.float64, device, keep=0.8)
    buf = torch.randn(g.num_dst, 30, dtype=torch.float64, device=device)
    before = buf.clone()
    out = buf[:, 5:17]
    assert ops.gat_aggregate(g, **kw, attn_dropout=0.2, seed=3, out=out, alpha=alpha) is out
    expected = before[:, 5:17] + alpha * reference.gat_aggregate(g, **kw, attn_dropout=0.2, seed=3)
    torch.testing.assert_close(buf[:, 5:17], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(buf[:, :5], before[:, :5]) and torch.equal(buf[:, 17:], before[:, 17:])
    # add then subtract: the reversible inversion gets its input back
    ops.gat_aggregate(g, **kw, attn_dropout=0.2, seed=3, out=out, alpha=-alpha)
    torch.testing.assert_close(buf, before, rtol=1e-12, atol=1e-12)


def test_accumulate_under_autograd_is_tracked():
    g = csr_graph("random", "cpu", shuffled=True)
    kw = _differentiable(_case(g, "src_dst", 2, 3, torch.float64, "cpu"))
    base = torch.randn(g.num_dst, 6, dtype=torch.float64)
    out = ops.gat_aggregate(g, **kw, out=base.clone(), alpha=-1.0)
    ref = base - reference.gat_aggregate(g, **kw)
    gout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, list(kw.values()), gout),
                    torch.autograd.grad(ref, list(kw.values()), gout)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["src_only", "edge_features", "edge_scores"])
def test_opcheck(device, mode):
    g = csr_graph("power_law", device, shuffled=True)
    kw = _case(g, mode, 2, 3, torch.float64, device, keep=0.8)
    args = (g.rowptr, g.col, *g.transposed(), g.perm, kw["x"], kw["src_score"], kw.get("dst_score"),
            g.edges_to_csr(kw["edge_attr"]) if "edge_attr" in kw else None, kw.get("edge_weight"),
            g.edges_to_csr(kw["edge_keep"]), 0.2, 0.3, 11)
    lib = torch.ops.revgnn_ext
    torch.library.opcheck(lib.gat_aggregate.default, args, test_utils=(
        "test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"))
    out, lse = lib.gat_aggregate(*args)
    bargs = args[:12] + (out, lse, torch.randn_like(out)) + args[12:] + ([True, True, True, True, True],)
    torch.library.opcheck(lib.gat_aggregate_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    acc = (torch.randn_like(out),) + args[:2] + args[5:]
    torch.library.opcheck(lib.gat_aggregate_accumulate_.default, acc + (-1.0,),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    g = csr_graph("power_law", "cpu", shuffled=True)
    g.transposed()
    kw = _case(g, "edge_features", 2, 8, torch.float32, "cpu", keep=0.9)

    def f(x, src_score, dst_score, edge_attr, edge_weight, edge_keep):
        h = ops.gat_aggregate(g, x, src_score, dst_score, edge_attr, edge_weight, edge_keep=edge_keep,
                              attn_dropout=0.2, seed=4)
        return h.relu()

    assert_compiles_as_eager(f, lambda: _differentiable(kw), NAMES)


def test_deterministic_across_runs_and_threads():
    g = csr_graph("power_law", "cpu", shuffled=True)
    kw = _case(g, "edge_features", 3, 16, torch.float32, "cpu", keep=0.9)
    gout = torch.randn(g.num_dst, 48)

    def step():
        dk = _differentiable(kw)
        out = ops.gat_aggregate(g, **dk, attn_dropout=0.1, seed=1)
        return [out, *torch.autograd.grad(out, [dk[k] for k in NAMES], gout)]
    assert_same_across_thread_counts(step)


def test_no_edge_by_head_allocation():
    """Forward and backward allocate at most [E, F] edge features (F = 2 < H = 4) or an index, never [E, H]."""
    ei = torch.randint(0, 300, (2, 30000))
    g = CSRGraph.from_edge_index(ei, 300)
    g.transposed()
    kw = _differentiable(_case(g, "edge_features", 4, 32, torch.float32, "cpu", feat=2, keep=0.9))

    def step():
        ops.gat_aggregate(g, **kw, attn_dropout=0.1).sum().backward()
    step()
    edge_by_head = g.num_edges * 4 * 4
    assert max_cpu_allocation(step) <= g.num_edges * 2 * 4 < edge_by_head
    # The reference allocates [E_kept, H*C] (E_kept ~ 0.9 E, C = 32).
    assert max_cpu_allocation(lambda: reference.gat_aggregate(g, **kw).sum().backward()) >= edge_by_head * 16


LIB = torch.ops.revgnn_ext


@pytest.mark.parametrize("call, exc, names", [
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, torch.randn(g.num_src, 3)), ValueError,
     ["gat_aggregate", "x", "8", "3"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, s[1:]), ValueError, ["gat_aggregate", "src_score"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, s, d[:, :1]), ValueError, ["gat_aggregate", "dst_score"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, s, d.double()), TypeError, ["gat_aggregate", "dst_score"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, s, d, a[1:], w), ValueError, ["gat_aggregate", "edge_attr"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, s, d, a, w[:, :2]), ValueError, ["gat_aggregate", "edge_weight"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, s, d, a), ValueError,
     ["gat_aggregate", "edge_weight", "edge_attr"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, s, d, None, w), ValueError,
     ["gat_aggregate", "edge_weight", "edge_attr"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, s, d, edge_keep=torch.ones(g.num_edges)), TypeError,
     ["gat_aggregate", "edge_keep"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, s, d, attn_dropout=1.5), ValueError,
     ["gat_aggregate", "attn_dropout"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x[1:], s), ValueError, ["gat_aggregate", "x", "39", "40"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, s, out=torch.zeros(g.num_dst, 9)), ValueError,
     ["gat_aggregate", "out"]),
    (lambda g, x, s, d, a, w: ops.gat_aggregate(g, x, s, out=x), RuntimeError,
     ["revgnn_ext.gat_aggregate_accumulate_", "out", "x"]),
    (lambda g, x, s, d, a, w: LIB.gat_aggregate(g.rowptr, g.col.clone().index_fill_(0, torch.tensor(3), 999), None,
                                                None, None, None, x, s, None, None, None, None, 0.2, 0.0, 0),
     ValueError, ["revgnn_ext.gat_aggregate", "col", "999"]),
    (lambda g, x, s, d, a, w: LIB.gat_aggregate_backward(
        g.rowptr, g.col, *g.transposed()[:2], g.transposed()[2].clone().index_fill_(0, torch.tensor(0), -1), None, x,
        s, None, None, None, None, *LIB.gat_aggregate(g.rowptr, g.col, None, None, None, None, x, s, None, None, None,
                                                      None, 0.2, 0.0, 0), torch.ones(g.num_dst, 8), 0.2, 0.0, 0,
        [True] * 5), ValueError, ["revgnn_ext.gat_aggregate_backward", "perm_t", "-1"]),
])
def test_bad_input_raises_naming_the_argument(call, exc, names):
    g = csr_graph("random", "cpu", shuffled=True)
    kw = _case(g, "edge_features", 2, 4, torch.float32, "cpu")
    with raises(exc, *names):
        call(g, *(kw[k] for k in NAMES))


@pytest.mark.parametrize("target", [  # the CPU twin runs in the same test: no autouse emulation
    pytest.param("emu", marks=pytest.mark.skipif(not emulator.available(), reason="emulated CUDA kernels not built")),
    pytest.param("cuda", marks=MARKS["cuda"])])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_edge_feature_gradient_rounds_once(target, dtype):
    """The gradient of edge features encoded per head: the CUDA kernel sums the heads in float32
    and rounds once, as the CPU kernel does, so the two agree within one unit in the last place
    (rounding after each head drifts further with every head)."""
    def grad(device):
        g = csr_graph("power_law", device, shuffled=True)
        kw = _differentiable(_case(g, "edge_features", 8, 4, dtype, device, feat=5))
        out = ops.gat_aggregate(g, negative_slope=0.2, **kw)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        return torch.autograd.grad(out, kw["edge_attr"], gout.to(device, dtype))[0].double().cpu()
    twin = grad("cpu")
    if target == "emu":
        with emulator.emulated():
            ours = grad("cpu")
    else:
        ours = grad("cuda")
    info = torch.finfo(dtype)
    ulp = info.eps * torch.exp2(torch.floor(torch.log2(twin.abs().clamp_min(info.tiny))))
    err = (ours - twin).abs()
    assert (err <= ulp).all(), f"up to {(err / ulp).max().item():.0f} ulps from the CPU kernel's gradient"
