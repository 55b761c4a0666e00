"""rev_subtract_ (one in-place step of the reversible block's inversion) against
revgnn_ext.reference, over devices x dtypes x group counts x groups x widths x row counts x
layouts; determinism, opcheck, torch.compile, the inversion of a block, and bad inputs.

The op subtracts and adds in a fixed order (in float32 for float16/bfloat16, as the reference
does), so it matches the reference bit for bit."""
import pytest
import torch

from revgnn_ext import ops, reference

from conftest import DEVICES, HAS_CUDA, assert_same_across_thread_counts, device_dtype_params

WIDTHS = [1, 37, 64, 129]
ROWS = [0, 1, 1000]
# (num_groups, group, with sum_out): every group of C in {2, 3, 4}; sum_out only for group >= 1.
STEPS = [(num_groups, group, with_sum) for num_groups in (2, 3, 4) for group in range(num_groups)
         for with_sum in (False, True) if group >= 1 or not with_sum]


def _step_id(step):
    num_groups, group, with_sum = step
    return f"C{num_groups}-g{group}" + ("-sum" if with_sum else "")


def _random(rows, cols, dtype, device):
    return torch.randn(rows, cols, dtype=torch.float64, device=device).to(dtype)


def _buffers(n, width, num_groups, dtype, device, layout):
    """The tensors that a case's operands are views of (see _operands)."""
    d = num_groups * width
    if layout == "slices":  # y and sum_out side by side in a wider buffer, f in one of its own
        y, f = _random(n, 3 + d + width + 2, dtype, device), _random(n, 2 + width + 1, dtype, device)
    elif layout == "transposed":
        y, f = _random(n, d, dtype, device), _random(width, n, dtype, device).t()
    else:
        y, f = _random(n, d, dtype, device), _random(n, width, dtype, device)
    return {"y": y, "f": f, "sum": _random(n, width, dtype, device)}


def _operands(buffers, width, num_groups, with_sum, layout):
    """(y, f, sum_out). "contiguous": the buffers themselves. "slices": y, f and sum_out are column
    slices of wider buffers, sum_out in other columns of y's buffer. "transposed": f is the
    transpose of a [width, n] tensor (the op copies it)."""
    if layout != "slices":
        return buffers["y"], buffers["f"], buffers["sum"] if with_sum else None
    d, y_buf = num_groups * width, buffers["y"]
    return y_buf[:, 3:3 + d], buffers["f"][:, 2:2 + width], y_buf[:, 3 + d:3 + d + width] if with_sum else None


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("step", STEPS, ids=_step_id)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("layout", ["contiguous", "slices", "transposed"])
def test_matches_reference(device, dtype, step, width, n, layout):
    num_groups, group, with_sum = step
    ours = _buffers(n, width, num_groups, dtype, device, layout)
    expected = {name: t.clone() for name, t in ours.items()}
    for fn, buffers in ((ops.rev_subtract_, ours), (reference.rev_subtract_, expected)):
        y, f, sum_out = _operands(buffers, width, num_groups, with_sum, layout)
        fn(y, f, group, num_groups, sum_out)
    # Whole buffers: the written slices match, every other column (and f) is untouched.
    for name in ours:
        assert torch.equal(ours[name], expected[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_sum_is_of_updated_groups_in_order(device):
    # y_2 = 5 - 4 = 1, then sum = (y_1 + y_2) + y_3 = (1e8 + 1) - 1e8 = 0 in float32 (1e8 + 1
    # rounds to 1e8). Adding y_1 + y_3 first would give 1; the value before the update, 5, would
    # give 8 (1e8 + 5 rounds to 1e8 + 8).
    y = torch.tensor([[7.0, 1e8, 5.0, -1e8]], device=device)
    f = torch.tensor([[4.0]], device=device)
    sum_out = torch.empty(1, 1, device=device)
    ops.rev_subtract_(y, f, 2, 4, sum_out)
    assert y.tolist() == [[7.0, 1e8, 1.0, -1e8]]
    assert sum_out.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_inverts_a_grouped_block(device):
    # Forward of a 3-group block with linear F_i, then its inversion with the op, as RevGNN's
    # backward does it: groups 2, 1 (forming X'_0 = X_1 + X_2), then 0 from F_0(X'_0).
    n, c, num_groups = 50, 16, 3
    x = torch.randn(n, num_groups * c, dtype=torch.float64, device=device)
    weights = [torch.randn(c, c, dtype=torch.float64, device=device) / c for _ in range(num_groups)]
    xs = x.split(c, dim=1)
    inp, ys = xs[1] + xs[2], []
    for i in range(num_groups):
        inp = inp @ weights[i] + xs[i]
        ys.append(inp)
    y = torch.cat(ys, dim=1)
    with torch.no_grad():
        ops.rev_subtract_(y, y[:, c:2 * c] @ weights[2], 2, num_groups)
        x0_in = torch.empty(n, c, dtype=y.dtype, device=device)
        ops.rev_subtract_(y, y[:, :c] @ weights[1], 1, num_groups, x0_in)
        ops.rev_subtract_(y, x0_in @ weights[0], 0, num_groups)
    torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    y0 = torch.randn(4000, 4 * 37, device=device)
    f = torch.randn(4000, 37, device=device)

    def step():
        y, sum_out = y0.clone(), torch.empty_like(f)
        ops.rev_subtract_(y, f, 1, 4, sum_out)
        return y, sum_out
    assert_same_across_thread_counts(step)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    op = torch.ops.revgnn_ext.rev_subtract_.default
    buf = torch.randn(20, 30, dtype=torch.float64, device=device)
    f = torch.randn(20, 9, dtype=torch.float64, device=device)
    torch.library.opcheck(op, (buf[:, 1:28], f, 1, 3, torch.empty_like(f)))
    torch.library.opcheck(op, (buf[:, 1:28], f, 2, 3, None))
    torch.library.opcheck(op, (buf[:, :18], torch.randn(9, 20, dtype=f.dtype, device=device).t(), 1, 2,
                               torch.empty(20, 9, dtype=f.dtype, device=device)))


def test_torch_compile_fullgraph():
    def f(y, a, b):
        x0_in = torch.empty_like(a)
        ops.rev_subtract_(y, a, 1, 2, x0_in)
        ops.rev_subtract_(y, b * x0_in, 0, 2)
        return y

    y, a, b = torch.randn(30, 16), torch.randn(30, 8), torch.randn(30, 8)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(y.clone(), a, b), f(y.clone(), a, b))


# ------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise_naming_the_argument():
    """The op checks its arguments (TypeError for a dtype, ValueError for a shape, device, layout
    or group); the Python function adds only the grad-mode check. Nothing is written on an error."""
    y, f, sum_out = torch.randn(10, 12), torch.randn(10, 4), torch.empty(10, 4)
    before = y.clone()
    for fn in (ops.rev_subtract_, torch.ops.revgnn_ext.rev_subtract_):
        with pytest.raises(ValueError, match="rev_subtract_: y must be 2-D"):
            fn(y[0], f, 1, 3, None)
        with pytest.raises(TypeError, match="rev_subtract_: y must be a floating-point"):
            fn(y.long(), f, 1, 3, None)
        with pytest.raises(ValueError, match="rev_subtract_: num_groups must be at least 2, got 1"):
            fn(y, torch.randn(10, 12), 0, 1, None)
        for group in (-1, 3):
            with pytest.raises(ValueError, match=rf"rev_subtract_: group must be in \[0, 3\), got {group}"):
                fn(y, f, group, 3, None)
        with pytest.raises(ValueError, match="y has 12 channels, which do not split into 5"):
            fn(y, f, 1, 5, None)
        with pytest.raises(ValueError, match=r"f must have shape \[10, 4\]"):
            fn(y, f[:, :3], 1, 3, None)
        with pytest.raises(ValueError, match=r"f must have shape \[10, 4\]"):
            fn(y, f[:9], 1, 3, None)
        with pytest.raises(TypeError, match=r"f \(Double\) must have y's dtype Float or a lower precision"):
            fn(y, f.double(), 1, 3, None)
        with pytest.raises(ValueError, match="sum_out .* got group 0"):
            fn(y, f, 0, 3, sum_out)
        with pytest.raises(ValueError, match=r"sum_out must have shape \[10, 4\]"):
            fn(y, f, 1, 3, sum_out[:, :2])
        with pytest.raises(TypeError, match="sum_out dtype Double differs from y dtype Float"):
            fn(y, f, 1, 3, sum_out.double())
        with pytest.raises(ValueError, match="rev_subtract_: y must have contiguous channels"):
            fn(torch.randn(12, 10).t(), f, 1, 3, None)
        with pytest.raises(ValueError, match="rev_subtract_: y must have contiguous channels and non-overlapping"):
            fn(torch.randn(1, 12).expand(10, 12), f, 1, 3, None)
        with pytest.raises(ValueError, match="rev_subtract_: sum_out must have contiguous channels"):
            fn(y, f, 1, 3, torch.empty(4, 10).t())
    # What the op cannot see: a meta argument sends the call to the fake kernel; grad mode.
    with pytest.raises(ValueError, match="f is on meta but y is on cpu"):
        ops.rev_subtract_(y, f.to("meta"), 1, 3)
    with pytest.raises(ValueError, match="sum_out is on meta but y is on cpu"):
        ops.rev_subtract_(y, f, 1, 3, sum_out.to("meta"))
    with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor' for argument 'y'"):
        ops.rev_subtract_(y.tolist(), f, 1, 3)
    with pytest.raises(RuntimeError, match="Expected a value of type 'int' for argument 'group'"):
        ops.rev_subtract_(y, f, 1.0, 3)
    for name, args in (("y", (y.clone().requires_grad_(), f)), ("f", (y, f.clone().requires_grad_())),
                       ("sum_out", (y, f, torch.zeros(10, 4, requires_grad=True)))):
        with pytest.raises(RuntimeError, match="has no autograd.*torch.no_grad"):
            ops.rev_subtract_(args[0], args[1], 1, 3, *args[2:])
    with torch.no_grad():  # the same arguments are fine without grad mode
        ops.rev_subtract_(y.clone().requires_grad_(), f.clone().requires_grad_(), 1, 3,
                          torch.zeros(10, 4, requires_grad=True))
    assert torch.equal(y, before)  # the refused calls wrote nothing


def test_overlaps_are_refused():
    """f or sum_out in y's columns, or sum_out in f's, are refused; disjoint column slices of one
    buffer are fine."""
    op = torch.ops.revgnn_ext.rev_subtract_
    f = torch.randn(10, 4)
    buf = torch.randn(10, 24)
    y = buf[:, :12]
    with pytest.raises(RuntimeError, match="rev_subtract_: f shares elements with y"):
        op(y, buf[:, 4:8], 0, 3, None)
    with pytest.raises(RuntimeError, match="rev_subtract_: f shares elements with y"):
        op(y, buf[:, 10:14], 0, 3, None)
    with pytest.raises(RuntimeError, match="rev_subtract_: sum_out shares elements with y"):
        op(y, f, 1, 3, buf[:, 8:12])
    with pytest.raises(RuntimeError, match="rev_subtract_: sum_out shares elements with f"):
        op(y, buf[:, 12:16], 1, 3, buf[:, 14:18])
    with pytest.raises(RuntimeError, match="rev_subtract_: sum_out shares elements with y"):
        op(buf[:, :12], f, 1, 3, buf.view(-1)[4:44].view(10, 4))  # another row stride, same memory
    before = buf.clone()
    op(y, buf[:, 12:16], 1, 3, buf[:, 16:20])
    assert torch.equal(buf[:, 4:8], before[:, 4:8] - before[:, 12:16])
    assert torch.equal(buf[:, 16:20], buf[:, 4:8] + buf[:, 8:12])


@pytest.mark.skipif(not HAS_CUDA, reason="no GPU")
def test_cuda_device_mismatch():
    y, f = torch.randn(10, 12, device="cuda"), torch.randn(10, 4)
    with pytest.raises(ValueError, match="rev_subtract_: f is on cpu but y is on cuda"):
        ops.rev_subtract_(y, f, 1, 3)
    with pytest.raises(ValueError, match="rev_subtract_: f is on cpu, expected cuda"):
        torch.ops.revgnn_ext.rev_subtract_(y, f, 1, 3, None)
    with pytest.raises(ValueError, match="rev_subtract_: sum_out is on cpu"):
        torch.ops.revgnn_ext.rev_subtract_(y, f.cuda(), 1, 3, torch.empty(10, 4))
