"""GroupAddRev: gradients equal plain autograd, inversion, RNG replay, BatchNorm, released activations, errors."""
import collections
import contextlib
import copy

import pytest
import torch

pyg = pytest.importorskip("torch_geometric")

import revgnn_ext  # noqa: E402
from revgnn_ext.nn import GENConv, GroupAddRev  # noqa: E402

from conftest import DEVICES, make_graph, plain_copy  # noqa: E402


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
    """[output (copied before backward), the gradients of x0, edge_attr (if any) and every parameter]."""
    device = next(blocks.parameters()).device
    torch.manual_seed(seed)
    edge_index = edge_index.to(device)
    x = x0.detach().to(device).requires_grad_()
    e = [edge_attr.detach().to(device).requires_grad_()] if edge_attr is not None else []
    h = x * 1.0  # an activation, as inside a model
    for b in blocks:
        h = b(h, edge_index, *e)
    out = h.detach().clone()
    h.backward(torch.ones_like(h) * torch.linspace(-1, 1, h.size(1), dtype=h.dtype, device=h.device))
    return [out, x.grad] + [t.grad for t in e] + [p.grad for p in blocks.parameters()]


def _assert_runs_equal(blocks, plain, x0, ei, edge_attr=None):
    for a, b in zip(_run(blocks, x0, ei, edge_attr), _run(plain, x0, ei, edge_attr)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _same_gradients_as_plain(block, x, ei, *args, prepare=lambda leaf: leaf * 1.0):
    """One backward of sum(block(prepare(x))^2) through block and its plain copy: the same gradients of x (if it
    requires grad) and every parameter (None where plain's is None). Returns the plain copy."""
    plain = plain_copy(block)
    grads = []
    for b in (block, plain):
        leaf = x.detach().clone().requires_grad_(x.requires_grad)
        b(prepare(leaf), ei, *args).square().sum().backward()
        grads.append([leaf.grad] + [p.grad for p in b.parameters()])
    for g, h in zip(*grads):
        assert (g is None) == (h is None)
        if h is not None:
            torch.testing.assert_close(g, h)
    return plain


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv, groups, depth", [("gen", 2, 1), ("gen", 2, 8), ("gen", 2, 64), ("sage", 2, 3),
                                                 ("sage", 3, 3)])
def test_gradients_equal_plain_autograd(conv, groups, depth, device):
    """GENConv with edge features; a PyG conv in 2 or 3 groups (X'_0 = X_2 + X_3 formed after X_1 is rebuilt)."""
    ei, n = make_graph("random" if conv == "gen" else "power_law")
    torch.manual_seed(0)
    make = gen_block if conv == "gen" else lambda c: Block(c, pyg.nn.SAGEConv(c, c), dropout=0.0)
    blocks = torch.nn.ModuleList(GroupAddRev(make(4), num_groups=groups) for _ in range(depth)).double().to(device)
    plain = plain_copy(blocks)
    x0 = torch.randn(n, 4 * groups, dtype=torch.float64)
    edge_attr = torch.randn(ei.size(1), 4, dtype=torch.float64) if conv == "gen" else None
    _assert_runs_equal(blocks, plain, x0, ei, edge_attr)


class _CountingOps:
    """Stands for torch.ops.revgnn_ext in revgnn_ext.ops, counting the calls of each op."""

    def __init__(self, ops):
        self.ops, self.calls = ops, collections.Counter()

    def __getattr__(self, name):
        op = getattr(self.ops, name)

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return op(*args, **kwargs)
        return counted


AGGREGATING_CONVS = {
    "gat": lambda c: revgnn_ext.nn.GATConv(c, c // 2, heads=2, edge_dim=4, dropout=0.2),
    "gat-one-head": lambda c: revgnn_ext.nn.GATConv(c, c, concat=False, bias=False),
    "gcn": lambda c: revgnn_ext.nn.GCNConv(c, c),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv", list(AGGREGATING_CONVS))
@pytest.mark.parametrize("groups", [2, 3])
def test_final_aggregation_added_in_place(monkeypatch, conv, groups, device):
    """Our GATConv/GCNConv add F into the group's slice through the op's accumulate form (no autograd);
    float64 gradients (attention dropout replayed) equal plain autograd; the float32 rebuild is within rounding."""
    counting = _CountingOps(revgnn_ext.ops._ops)
    monkeypatch.setattr(revgnn_ext.ops, "_ops", counting)
    accumulate, functional = ("gat_aggregate_accumulate_", "gat_aggregate") if conv.startswith("gat") else (
        "spmm_accumulate_", "spmm")
    ei, n = make_graph("power_law")
    c = 4
    torch.manual_seed(0)
    # no normalization between the blocks: depth 3 keeps the rebuilt inputs' rounding (float64) within 1e-9
    blocks = torch.nn.ModuleList(GroupAddRev(AGGREGATING_CONVS[conv](c), num_groups=groups)
                                 for _ in range(3)).to(device)
    plain = plain_copy(blocks)
    edge_attr = torch.randn(ei.size(1), 4, dtype=torch.float64) if conv == "gat" else None
    x0 = torch.randn(n, c * groups, dtype=torch.float64)
    with torch.no_grad():
        h = x0.to(device)
        for b in blocks.double():
            h = b(h, ei.to(device), *([edge_attr.to(device)] if edge_attr is not None else []))
    assert counting.calls[accumulate] == 3 * groups
    assert counting.calls[functional] == (3 * groups if conv == "gcn" else 0)
    _assert_runs_equal(blocks, plain.double(), x0, ei, edge_attr)
    block = blocks[0].float()
    x = torch.randn(n, c * groups, device=device)
    h = x * 1.0
    block(h, ei.to(device), *([edge_attr.float().to(device)] if edge_attr is not None else [])).sum().backward()
    torch.testing.assert_close(h, x, rtol=1e-6, atol=1e-6)  # h was rebuilt in y's storage


def test_residual_gat_is_added_formed():
    """A GATConv with a residual (or averaged heads) adds its formed output into ``out``; as plain autograd."""
    ei, n = make_graph("random")
    for conv in (revgnn_ext.nn.GATConv(4, 2, heads=2, residual=True),
                 revgnn_ext.nn.GATConv(4, 4, heads=2, concat=False)):
        block = GroupAddRev(conv, num_groups=2).double()
        x = torch.randn(n, 8, dtype=torch.float64)
        with torch.no_grad():
            y0 = x[:, :4] + conv(x[:, 4:], ei)
            torch.testing.assert_close(block(x, ei), torch.cat([y0, x[:, 4:] + block.convs[1](y0, ei)], 1))
        _same_gradients_as_plain(block, x, ei)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_rng_state_kept_only_for_groups_that_draw(dropout):
    """A (5 KB) generator state is kept only for a group whose function drew random numbers (dropout)."""
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
    with torch.inference_mode():
        torch.testing.assert_close(ours(x, ei), y)
    assert repr(ours).startswith("GroupAddRev(") and "num_groups=2" in repr(ours)


def test_batchnorm_statistics_move_once_per_step():
    ei, n = make_graph("random")
    torch.manual_seed(0)
    block = GroupAddRev(Block(4, pyg.nn.SAGEConv(4, 4), norm=torch.nn.BatchNorm1d(4), dropout=0.0), num_groups=2)
    plain = _same_gradients_as_plain(block, torch.randn(n, 8), ei)
    for m_ours, m_plain in zip(block.modules(), plain.modules()):
        if isinstance(m_ours, torch.nn.BatchNorm1d):
            torch.testing.assert_close(m_ours.running_mean, m_plain.running_mean)
            assert int(m_ours.num_batches_tracked) == 1


@pytest.mark.parametrize("num_bwd_passes, inference", [(1, False), (2, False), (1, True)],
                         ids=["1", "2", "graph-made-under-inference-mode"])
def test_backward_with_retain_graph_runs_again(num_bwd_passes, inference):
    """Each backward(retain_graph=True) pass gives plain autograd's gradients; the last one frees the graph.
    An inference-mode graph (no version counter to watch) trains as well."""
    with torch.inference_mode(inference):
        ei, n = make_graph("random")
        ei = ei.clone()
    torch.manual_seed(0)
    block = GroupAddRev(gen_block(4), num_groups=2, num_bwd_passes=num_bwd_passes).double()
    plain = plain_copy(block)
    e = torch.randn(ei.size(1), 4, dtype=torch.float64)
    x = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for b in (block, plain):
        torch.manual_seed(1)
        loss = b(x * 1.0, ei, e).square().sum()  # the square keeps the block's output for its backward
        grads.append([torch.autograd.grad(loss, x, retain_graph=k < 2)[0] for k in range(3)])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref)
    with pytest.raises(RuntimeError):  # the graph is freed, as plain autograd's
        torch.autograd.grad(loss, x)


def test_released_activation_and_emptied_output_fail_loudly():
    ei, n = make_graph("random")
    block = GroupAddRev(Block(4, pyg.nn.SAGEConv(4, 4), dropout=0.0), num_groups=2)
    x = torch.randn(n, 8, requires_grad=True)
    h = x * 2.0
    y = block(h, ei)
    # released until backward: every read names GroupAddRev instead of giving 0, NaN or nothing
    for read in (lambda: h.sum(), lambda: torch.cat([h, y]), lambda: h.numel(), lambda: h + 1, lambda: print(h),
                 lambda: h.numpy(), lambda: h[0]):
        with pytest.raises(RuntimeError, match="GroupAddRev: this tensor is the input of a reversible block"):
            read()
    assert h.untyped_storage().size() == 0 and h.requires_grad  # what PyG's own test checks
    plain = plain_copy(block)
    (g,) = torch.autograd.grad(y.sum(), h)  # a released input can still be differentiated
    torch.testing.assert_close(g, torch.autograd.grad(plain(x * 2.0, ei).sum(), x)[0] / 2)
    assert h.shape == (n, 8) and torch.allclose(h, x.detach() * 2.0, atol=1e-5)  # rebuilt
    with pytest.raises(RuntimeError, match="output of a reversible block after its last backward"):
        y + h  # its storage became h's
    with pytest.raises(RuntimeError, match="output of a reversible block after its last backward"):
        y.sum()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_groups is required"):
        GroupAddRev(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        GroupAddRev(torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
    block = GroupAddRev(Block(3, pyg.nn.SAGEConv(3, 3)), num_groups=2)
    with pytest.raises(ValueError, match="do not split into 2 equal groups"):
        block(torch.randn(5, 7), torch.zeros(2, 0, dtype=torch.long))


class ScaledLinear(torch.nn.Module):
    """A conv-shaped F with a float64 parameter beside float32 ones (two parameter tokens)."""

    def __init__(self, c):
        super().__init__()
        self.lin = torch.nn.Linear(c, c)
        self.scale = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x, edge_index):
        return self.lin(x) * self.scale.float()


@pytest.mark.parametrize("make", [gen_block, ScaledLinear], ids=["one-dtype", "two-dtypes"])
def test_gradients_over_several_steps_equal_plain_autograd(make):
    """Parameters of two dtypes, several steps, through .backward() and torch.autograd.grad."""
    ei, n = make_graph("random")
    torch.manual_seed(0)
    block = GroupAddRev(make(4), num_groups=2)
    plain = plain_copy(block)
    args = (torch.randn(ei.size(1), 4),) if make is gen_block else ()
    x = torch.randn(n, 8)
    for step in range(2):
        for b in (block, plain):
            torch.manual_seed(step)  # the same dropout masks
            b(x * 1.0, ei, *args).square().sum().backward()
        for p, q in zip(block.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad)

    def grads(b):
        torch.manual_seed(2)
        return torch.autograd.grad(b(x * 1.0, ei, *args).square().sum(), list(b.parameters()))

    for g, h in zip(grads(block), grads(plain)):
        torch.testing.assert_close(g, h)


def test_replaced_frozen_or_converted_parameters_are_seen_at_the_next_forward():
    ei, n = make_graph("random")
    torch.manual_seed(0)
    block = GroupAddRev(Block(4, pyg.nn.SAGEConv(4, 4), dropout=0.0), num_groups=2)
    x = torch.randn(n, 8)
    block(x * 1.0, ei).sum().backward()
    frozen = block.convs[0].norm.weight.requires_grad_(False)
    replaced = block.convs[1].conv.lin_l.weight = torch.nn.Parameter(block.convs[1].conv.lin_l.weight.detach() * 2)
    frozen.grad = None
    block(x * 1.0, ei).sum().backward()
    assert frozen.grad is None and replaced.grad is not None
    block.zero_grad()
    _same_gradients_as_plain(block, x, ei)
    block.double().zero_grad()  # each parameter's data converted in place (the same Parameter objects)
    _same_gradients_as_plain(block, x.double(), ei)
    assert all(p.grad.dtype == torch.float64 for p in block.parameters() if p is not frozen)


def test_copy_pickle_and_functional_call_after_a_step():
    import io
    ei, n = make_graph("random")
    block = GroupAddRev(Block(4, GENConv(4, 4, edge_dim=4, norm="layer"), dropout=0.0), num_groups=2)
    e = torch.randn(ei.size(1), 4)
    x = torch.randn(n, 8)
    block(x * 1.0, ei, e).sum().backward()
    copied = copy.deepcopy(block)
    torch.save(block, io.BytesIO())
    torch.testing.assert_close(copied(x, ei, e), block(x, ei, e))
    # Parameters given by torch.func.functional_call (non-leaf, other values): backward uses them.
    plain = plain_copy(block)

    def grads(b):
        leaves = {k: (v.detach() * 2).requires_grad_() for k, v in block.named_parameters()}
        torch.func.functional_call(b, {k: v * 1.0 for k, v in leaves.items()}, (x * 1.0, ei, e)).square().sum().backward()
        return leaves

    for (k, g), h in zip(grads(block).items(), grads(plain).values()):
        torch.testing.assert_close(g.grad, h.grad)


class WithUnused(torch.nn.Module):
    """F that leaves one of its parameters (and, with `all_unused`, all of them) unused."""

    def __init__(self, c, all_unused=False):
        super().__init__()
        self.lin, self.spare = torch.nn.Linear(c, c), torch.nn.Linear(c, c)
        self.all_unused = all_unused

    def forward(self, x, edge_index):
        return x * 0.5 if self.all_unused else self.lin(x)


def _shared_by_three_groups():
    shared = pyg.nn.SAGEConv(4, 4)
    return GroupAddRev(torch.nn.ModuleList([Block(4, shared, dropout=0.0) for _ in range(3)]))


@pytest.mark.parametrize("make, unused", [(lambda: GroupAddRev(WithUnused(4), num_groups=2), 4),
                                          (lambda: GroupAddRev(WithUnused(4, True), num_groups=2), 8),
                                          (_shared_by_three_groups, 0)], ids=["unused", "all-unused", "shared"])
def test_unused_parameters_get_none_and_shared_ones_the_sum(make, unused):
    ei, n = make_graph("random")
    torch.manual_seed(0)
    block = make()
    _same_gradients_as_plain(block, torch.randn(n, 4 * len(block.convs), requires_grad=True), ei)
    assert sum(p.grad is None for p in block.parameters()) == unused


# ---------------------------------------------------------------------------- never silently wrong
def _block_and_plain():
    torch.manual_seed(0)
    block = GroupAddRev(Block(4, pyg.nn.SAGEConv(4, 4), dropout=0.0), num_groups=2).double()
    return block, plain_copy(block)


@pytest.mark.parametrize("modify", [lambda y: y.relu_(), lambda y: torch.nn.ReLU(inplace=True)(y),
                                    lambda y: y.mul_(torch.rand_like(y) > 0.5)], ids=["relu_", "ReLU(inplace)", "mul_"])
def test_output_modified_in_place_before_backward_raises(modify):
    ei, n = make_graph("random")
    block, _ = _block_and_plain()
    y = modify(block(torch.randn(n, 8, dtype=torch.float64, requires_grad=True) * 1.0, ei))
    with pytest.raises(RuntimeError, match="GroupAddRev: the block's output was modified in place"):
        y.sum().backward()


@pytest.mark.parametrize("what", ["parameter", "argument", "kept input", "frozen parameter"])
def test_tensors_modified_between_forward_and_backward_raise(what):
    ei, n = make_graph("random")
    torch.manual_seed(0)
    block = GroupAddRev(gen_block(4), num_groups=2)
    e = torch.randn(ei.size(1), 4, requires_grad=True)
    x = torch.randn(n, 8, requires_grad=True)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    h = x * 1.0 if what != "kept input" else x  # a leaf is kept, not released
    y = block(h, ei, e)
    if what == "parameter":
        for p in block.parameters():
            p.grad = torch.ones_like(p)
        opt.step()  # before backward
    elif what == "argument":
        with torch.no_grad():
            e.mul_(2)
    elif what == "kept input":
        with torch.no_grad():
            x.add_(1)
    else:
        next(block.parameters()).requires_grad_(False)
    with pytest.raises(RuntimeError, match="stopped requiring grad between forward and backward" if what == "frozen "
                       "parameter" else "was modified in place between the block.s forward and its backward"):
        y.square().sum().backward()


@pytest.mark.parametrize("conv", ["gat", "gcn", "gen"])
@pytest.mark.parametrize("form", ["edge_index", "CSRGraph", "sparse values", "edge_index in a tuple argument"])
def test_graph_modified_between_forward_and_backward_raises(conv, form):
    """A graph refilled before backward (F's recomputation would run on another graph): backward raises."""
    from revgnn_ext.nn import GATConv, GCNConv
    ei, n = make_graph("random")
    torch.manual_seed(0)
    make = dict(gat=lambda: GATConv(4, 4), gcn=lambda: GCNConv(4, 4), gen=lambda: GENConv(4, 4))[conv]
    if form == "edge_index in a tuple argument":  # F reads the graph from an argument the block passes whole
        class F(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = make()

            def forward(self, x, _, graphs):
                return self.conv(x, graphs[0])
        block = GroupAddRev(F(), num_groups=2)
    else:
        block = GroupAddRev(make(), num_groups=2)
    if form == "CSRGraph":
        adj = revgnn_ext.CSRGraph.from_edge_index(ei, n)
        edit = adj.col
    elif form == "sparse values":
        adj = torch.sparse_coo_tensor(ei.flip(0), torch.rand(ei.size(1)), (n, n)).coalesce()
        edit = adj._values()
    else:
        adj = ei.clone()
        edit = adj[0]
    args = (None, (adj,)) if form == "edge_index in a tuple argument" else (adj,)
    x = torch.randn(n, 8, requires_grad=True)
    y = block(x * 1.0, *args)
    with torch.no_grad():
        edit.copy_(edit.flip(0))  # the same values in another order: a valid graph, another one
    with pytest.raises(RuntimeError, match="was modified in place between the block.s forward and its backward"):
        y.square().sum().backward()


def test_wider_edge_weights_in_a_block_train_in_the_blocks_dtype():
    """GCNConv with float64 edge weights returns float64 (PyG's promotion); a float32 block stays float32."""
    from revgnn_ext.nn import GCNConv
    ei, n = make_graph("random")
    torch.manual_seed(0)
    block = GroupAddRev(GCNConv(4, 4), num_groups=2)
    w = torch.rand(ei.size(1), dtype=torch.float64)
    x = torch.randn(n, 8, requires_grad=True)
    outs, grads = [], []
    for weight in (w, w.float()):
        y = block(x * 1.0, ei, weight)
        outs.append(y.detach().clone())
        grads.append(torch.autograd.grad(y.square().sum(), x)[0])
        with torch.no_grad():
            torch.testing.assert_close(block(x, ei, weight), outs[-1])
    assert outs[0].dtype == torch.float32
    torch.testing.assert_close(*outs)
    torch.testing.assert_close(*grads)


def test_input_also_saved_by_another_operation_trains_with_plain_gradients():
    """h saved by ReLU's backward and a parallel branch: the block keeps h (warning once); plain gradients.
    Likewise an input of which the user keeps a view."""
    import revgnn_ext.nn.group_add_rev as gar
    ei, n = make_graph("random")
    block, plain = _block_and_plain()
    lin, lin2 = torch.nn.Linear(8, 8).double(), torch.nn.Linear(8, 8).double()
    x = torch.randn(n, 8, dtype=torch.float64)
    grads = []
    for b in (block, plain):
        gar._warned_kept = False
        with pytest.warns(UserWarning, match="also held by another operation") if b is block else \
                contextlib.nullcontext():
            h = torch.relu(lin(x))
            out = b(h, ei) + lin2(h)
            h2 = lin(x)
            skip = lin2(h2)
            out = out + b(h2, ei) * skip
        grads.append(torch.autograd.grad(out.square().sum(), [*b.parameters(), *lin.parameters(),
                                                             *lin2.parameters()]))
        assert h.shape == (n, 8)  # kept, readable
    for g, h in zip(*grads):
        torch.testing.assert_close(g, h)
    h = x.requires_grad_() * 1.0
    first_row = h[0]  # a view the user keeps: the block keeps h too
    gar._warned_kept = False
    with pytest.warns(UserWarning, match="also held by another operation"):
        y = block(h, ei)
    torch.testing.assert_close(first_row, x[0].detach())
    y.sum().backward()


class DrawingF(torch.nn.Module):
    """F with dropout that records the mask of every call (forward, then the replay in backward)."""

    def __init__(self, c, extra_draw_in_forward=False):
        super().__init__()
        self.lin = torch.nn.Linear(c, c)
        self.masks = []
        self.extra = extra_draw_in_forward

    def forward(self, x, edge_index):
        mask = torch.rand_like(x) > 0.3
        if self.extra and len(self.masks) % 2 == 0:  # as if another thread drew meanwhile
            torch.rand(3)
        self.masks.append(mask)
        return self.lin(x * mask)


def test_dropout_replay_from_two_threads():
    """Two threads train one block with dropout in F: each step replays its forward's mask or refuses clearly."""
    import threading
    ei, n = make_graph("random")
    block = GroupAddRev(torch.nn.ModuleList([DrawingF(4), DrawingF(4)]))
    refused, failures = [], []

    def train(steps):
        for _ in range(steps):
            try:
                block(torch.randn(n, 8, requires_grad=True) * 1.0, ei).square().sum().backward()
            except RuntimeError as err:
                (refused if "GroupAddRev" in str(err) and "thread" in str(err) else failures).append(err)

    threads = [threading.Thread(target=train, args=(15,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    # After the threads: one thread trains as usual, and every replayed mask is its forward's.
    for f in block.convs:
        f.masks.clear()
    train(3)
    assert not failures and all(torch.equal(f.masks[k], f.masks[k + 1]) for f in block.convs for k in (0, 2, 4))


def test_replay_that_draws_other_numbers_raises():
    ei, n = make_graph("random")
    block = GroupAddRev(torch.nn.ModuleList([DrawingF(4, extra_draw_in_forward=True), DrawingF(4)]))
    y = block(torch.randn(n, 8, requires_grad=True) * 1.0, ei)
    with pytest.raises(RuntimeError, match="drew other random numbers than its forward"):
        y.sum().backward()


def test_forward_mode_ad_and_torch_func_equal_plain_and_jit_trace_says_what_to_do():
    import torch.autograd.forward_ad as fwAD
    ei, n = make_graph("random")
    block, plain = _block_and_plain()
    x = torch.randn(n, 8, dtype=torch.float64)
    v = torch.randn_like(x)
    tangents = []
    for b in (block, plain):
        with fwAD.dual_level():
            out = b(fwAD.make_dual(x * 1.0, v), ei)
            tangents.append(fwAD.unpack_dual(out).tangent)
    torch.testing.assert_close(tangents[0], tangents[1])
    with fwAD.dual_level(), torch.no_grad():  # no autograd, yet tangents: not the in-place path
        torch.testing.assert_close(fwAD.unpack_dual(block(fwAD.make_dual(x * 1.0, v), ei)).tangent, tangents[1])
    _, t_func = torch.func.jvp(lambda t: block(t, ei), (x,), (v,))
    torch.testing.assert_close(t_func, tangents[1])
    g = torch.func.grad(lambda t: block(t, ei).square().sum())(x)
    g_plain = torch.func.grad(lambda t: plain(t, ei).square().sum())(x)
    torch.testing.assert_close(g, g_plain)
    xs = torch.randn(3, n, 8, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(lambda t: block(t, ei))(xs),
                               torch.stack([plain(t, ei) for t in xs]))
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record"):  # a transform it cannot support
        torch.jit.trace(lambda t: block(t * 1.0, ei), (x.requires_grad_(),))


class Identity(torch.nn.Module):
    def forward(self, x, edge_index):
        return x


class Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = GroupAddRev(Block(2, pyg.nn.SAGEConv(2, 2), dropout=0.0), num_groups=2)

    def forward(self, x, edge_index):
        return self.inner(x, edge_index)


@pytest.mark.parametrize("make, prepare", [
    (lambda: Block(4, pyg.nn.SAGEConv(4, 4), dropout=0.0), lambda x: x.t().contiguous().t()),
    (Identity, lambda x: x * 1.0), (Nested, lambda x: x * 1.0)], ids=["column-major", "identity-F", "nested"])
def test_column_major_input_identity_f_and_nested_blocks(make, prepare):
    ei, n = make_graph("random")
    torch.manual_seed(0)
    block = GroupAddRev(make(), num_groups=2).double()
    _same_gradients_as_plain(block, torch.randn(n, 8, dtype=torch.float64, requires_grad=True), ei, prepare=prepare)


class TanhLinear(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.lin = torch.nn.Linear(channels, channels)

    def forward(self, x, edge_index):
        return torch.tanh(self.lin(x))


def _autocast_stack(depth, reversible, seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleList([torch.nn.Linear(12, 32)] + [
        GroupAddRev(TanhLinear(16), num_groups=2, disable=not reversible) for _ in range(depth)])


def _autocast_gradients(stack, inp, autocast):
    """Parameter gradients of sum(out * w), the forward under bfloat16 autocast (or not), backward outside it."""
    stack.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = stack[0](inp).float()
        for block in stack[1:]:
            h = block(h, None)
    (h * torch.linspace(-1, 1, h.size(1))).sum().backward()
    return torch.cat([p.grad.flatten() for p in stack.parameters()])


def test_autocast_state_replayed_in_backward():
    """Backward outside the forward's bfloat16 autocast replays it: the input is rebuilt to float32 rounding."""
    block = GroupAddRev(TanhLinear(16), num_groups=2)
    encoder = torch.nn.Linear(12, 32)
    inp = torch.randn(50, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = encoder(inp).float()  # a float32 activation held by nothing else: released
        expected = x.detach().clone()
        y = block(x, None)
    assert y.dtype == torch.float32
    with pytest.raises(RuntimeError, match="released its memory"):
        x.sum()
    y.sum().backward()
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("depth", [8, 64])
def test_autocast_gradients_as_close_as_plain_autograd(depth):
    """Under bfloat16 autocast: gradient error against float32 within 2x the plain stack's."""
    inp = torch.randn(60, 12)
    exact = _autocast_gradients(_autocast_stack(depth, reversible=False), inp, autocast=False)
    error = {}
    for reversible in (True, False):
        grads = _autocast_gradients(_autocast_stack(depth, reversible), inp, autocast=True)
        error[reversible] = ((grads - exact).norm() / exact.norm()).item()
    assert 0 < error[False] and error[True] <= 2 * error[False], error
