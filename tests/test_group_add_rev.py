"""GroupAddRev: gradients equal plain autograd, inversion, one F per group in backward, RNG
replay, BatchNorm statistics, released activations, PyG compatibility."""
import copy

import pytest
import torch

pyg = pytest.importorskip("torch_geometric")

import revgnn_ext  # noqa: E402
from revgnn_ext.nn import GENConv, GroupAddRev  # noqa: E402

from conftest import make_graph  # noqa: E402


class Block(torch.nn.Module):
    """res+ F: Norm -> ReLU -> Dropout -> conv, counting its calls."""

    def __init__(self, channels, conv, norm=None, dropout=0.3):
        super().__init__()
        self.norm = norm if norm is not None else torch.nn.LayerNorm(channels)
        self.conv = conv
        self.dropout = torch.nn.Dropout(dropout)
        self.calls = 0

    def reset_parameters(self):
        self.norm.reset_parameters()
        self.conv.reset_parameters()

    def forward(self, x, edge_index, *args):
        self.calls += 1
        return self.conv(self.dropout(torch.relu(self.norm(x))), edge_index, *args)


def gen_block(c):
    return Block(c, GENConv(c, c, aggr="softmax", learn_t=True, edge_dim=4, norm="layer"))


def _run(blocks, x0, edge_index, edge_attr, seed=3):
    """Output (copied before backward), and the gradients of x0, edge_attr and every parameter."""
    torch.manual_seed(seed)
    x = x0.detach().requires_grad_()
    e = edge_attr.detach().requires_grad_() if edge_attr is not None else None
    h = x * 1.0  # an activation, as inside a model
    for b in blocks:
        h = b(h, edge_index, *([e] if e is not None else []))
    out = h.detach().clone()
    h.backward(torch.ones_like(h) * torch.linspace(-1, 1, h.size(1), dtype=h.dtype))
    return out, x.grad, (e.grad if e is not None else None), [p.grad for p in blocks.parameters()]


@pytest.mark.parametrize("depth", [1, 8, 64])
def test_gradients_equal_plain_autograd(depth):
    ei, n = make_graph("random")
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(GroupAddRev(gen_block(4), num_groups=2) for _ in range(depth)).double()
    plain = copy.deepcopy(blocks)
    for b in plain:
        b.disable = True
    x0 = torch.randn(n, 8, dtype=torch.float64)
    edge_attr = torch.randn(ei.size(1), 4, dtype=torch.float64)
    ours, ref = _run(blocks, x0, ei, edge_attr), _run(plain, x0, ei, edge_attr)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-9, atol=1e-9)
    for a, b in zip(ours[3], ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("groups", [2, 3])
def test_pyg_conv_inside_and_three_groups(groups, monkeypatch):
    """A conv without a final Linear: each X_i is rebuilt by the fused op rev_subtract_, which
    also forms X'_0 (3 groups) in the same pass."""
    calls = []
    fused = revgnn_ext.ops.rev_subtract_
    monkeypatch.setattr(revgnn_ext.ops, "rev_subtract_", lambda *a: calls.append(a[4] is not None) or fused(*a))
    ei, n = make_graph("power_law")
    torch.manual_seed(0)
    c = 4
    blocks = torch.nn.ModuleList(GroupAddRev(Block(c, pyg.nn.SAGEConv(c, c), dropout=0.0), num_groups=groups)
                                 for _ in range(3)).double()
    plain = copy.deepcopy(blocks)
    for b in plain:
        b.disable = True
    x0 = torch.randn(n, c * groups, dtype=torch.float64)
    ours, ref = _run(blocks, x0, ei, None), _run(plain, x0, ei, None)
    for a, b in zip([ours[0], ours[1]] + ours[3], [ref[0], ref[1]] + ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert calls == 3 * ([False] * (groups - 2) + [groups > 2, False])  # per block: groups C-1 .. 0


def test_subtraction_folded_into_a_final_linear():
    """Our GENConv exposes its MLP's final Linear (forward_split): forward adds and backward
    subtracts F_i through an in-place addmm into the group's slice; gradients equal plain
    autograd, and the float32 rebuild of the input is within rounding of the original."""
    ei, n = make_graph("power_law")
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(
        GroupAddRev(GENConv(4, 4, aggr="max", edge_dim=4, norm="layer", bias=True), num_groups=2) for _ in range(8))
    plain = copy.deepcopy(blocks)
    for b in plain:
        b.disable = True
    calls = []
    for conv in (c for b in blocks for c in b.convs):
        split = conv.forward_split
        conv.forward_split = lambda *a, _split=split, **k: calls.append(1) or _split(*a, **k)
    x0, edge_attr = torch.randn(n, 8, dtype=torch.float64), torch.randn(ei.size(1), 4, dtype=torch.float64)
    ours, ref = _run(blocks.double(), x0, ei, edge_attr), _run(plain.double(), x0, ei, edge_attr)
    assert len(calls) == 2 * 8 * 2  # every group, forward and backward, went through the split
    for a, b in zip([ours[0], ours[1], ours[2]] + ours[3], [ref[0], ref[1], ref[2]] + ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    block = blocks[0].float()
    x = torch.randn(n, 8)
    h = x * 1.0
    y = block(h, ei, edge_attr.float())
    y.sum().backward()
    torch.testing.assert_close(h, x, rtol=1e-6, atol=1e-6)  # h was rebuilt in y's storage


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_rng_state_kept_only_for_groups_that_draw(dropout):
    """A 5 KB CPU generator state per group and layer would grow with depth: it is kept only
    for a group whose function drew random numbers (here: dropout)."""
    ei, n = make_graph("random")
    block = GroupAddRev(Block(4, GENConv(4, 4, edge_dim=4, norm="layer"), dropout=dropout), num_groups=2)
    with torch.no_grad():
        _, states = block._forward_groups(torch.randn(n, 8), ei, (torch.randn(ei.size(1), 4),))
    if dropout > 0:
        assert [s is not None for s in states] == [True, True]
    else:
        assert states == ()  # nothing kept, not even a list


def test_one_evaluation_of_each_group_in_backward():
    ei, n = make_graph("random")
    block = GroupAddRev(gen_block(4), num_groups=2)
    h = torch.randn(n, 8, requires_grad=True) * 1.0
    y = block(h, ei, torch.randn(ei.size(1), 4))
    assert [f.calls for f in block.convs] == [1, 1]
    y.sum().backward()
    assert [f.calls for f in block.convs] == [2, 2]  # PyG's evaluates each F three times in total


def test_inverse_recovers_the_input_and_state_dict_matches_pyg():
    ei, n = make_graph("random")
    torch.manual_seed(0)
    ours = GroupAddRev(Block(4, pyg.nn.SAGEConv(4, 4)), num_groups=2).double().eval()
    # disable=True: PyG's reversible path releases the caller's x even under no_grad.
    theirs = pyg.nn.GroupAddRev(Block(4, pyg.nn.SAGEConv(4, 4)), num_groups=2, disable=True).double().eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(n, 8, dtype=torch.float64)
    with torch.no_grad():
        y = ours(x, ei)
        torch.testing.assert_close(y, theirs(x, ei))
        torch.testing.assert_close(ours.inverse(y, ei), x, rtol=1e-12, atol=1e-12)
    assert repr(ours).startswith("GroupAddRev(") and "num_groups=2" in repr(ours)


def test_batchnorm_statistics_move_once_per_step():
    ei, n = make_graph("random")
    torch.manual_seed(0)
    block = GroupAddRev(Block(4, pyg.nn.SAGEConv(4, 4), norm=torch.nn.BatchNorm1d(4), dropout=0.0), num_groups=2)
    plain = copy.deepcopy(block)
    plain.disable = True
    x = torch.randn(n, 8)
    for b in (block, plain):
        b(x * 1.0, ei).sum().backward()
    for m_ours, m_plain in zip(block.modules(), plain.modules()):
        if isinstance(m_ours, torch.nn.BatchNorm1d):
            torch.testing.assert_close(m_ours.running_mean, m_plain.running_mean)
            assert int(m_ours.num_batches_tracked) == 1


def test_no_grad_and_inference_mode():
    ei, n = make_graph("random")
    block = GroupAddRev(gen_block(4), num_groups=2).eval()
    x = torch.randn(n, 8)
    e = torch.randn(ei.size(1), 4)
    with torch.no_grad():
        a = block(x, ei, e)
    with torch.inference_mode():
        b = block(x, ei, e)
    torch.testing.assert_close(a, b)
    assert x.numel() == n * 8  # the caller's tensor is left alone


def test_multiple_backward_passes():
    ei, n = make_graph("random")
    torch.manual_seed(0)
    block = GroupAddRev(Block(4, pyg.nn.SAGEConv(4, 4), dropout=0.0), num_groups=2, num_bwd_passes=2).double()
    x = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    y = block(x * 1.0, ei)
    loss = y.square().sum()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, retain_graph=True)
    torch.testing.assert_close(g1, g2)
    with pytest.raises(RuntimeError):  # a third pass: the output is gone
        torch.autograd.grad(loss, x)
    y = block(x * 1.0, ei)
    loss = y.sum()
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="num_bwd_passes"):
        loss.backward()


def test_released_activation_and_emptied_output_fail_loudly():
    ei, n = make_graph("random")
    block = GroupAddRev(Block(4, pyg.nn.SAGEConv(4, 4)), num_groups=2)
    x = torch.randn(n, 8, requires_grad=True)
    h = x * 2.0
    y = block(h, ei)
    assert h.numel() == 0  # released until backward
    y.sum().backward()
    assert h.shape == (n, 8) and torch.allclose(h, x.detach() * 2.0, atol=1e-5)  # rebuilt
    assert y.numel() == 0  # its storage became h's
    with pytest.raises(RuntimeError):
        y + h


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_groups is required"):
        GroupAddRev(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        GroupAddRev(torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
    block = GroupAddRev(Block(3, pyg.nn.SAGEConv(3, 3)), num_groups=2)
    with pytest.raises(ValueError, match="do not split into 2 equal groups"):
        block(torch.randn(5, 7), torch.zeros(2, 0, dtype=torch.long))


def test_parameters_changed_between_forward_and_backward_raise():
    ei, n = make_graph("random")
    block = GroupAddRev(gen_block(4), num_groups=2)
    y = block(torch.randn(n, 8, requires_grad=True) * 1.0, ei, torch.randn(ei.size(1), 4))
    next(block.parameters()).requires_grad_(False)
    with pytest.raises(RuntimeError, match="changed between forward and backward"):
        y.sum().backward()
