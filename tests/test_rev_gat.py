"""RevGAT (the paper's ogbn-arxiv model): parameter count, its GAT layer per edge, reversible against plain
autograd, shared edge dropout, BatchNorm; examples/ogbn_arxiv.py's loss, label reuse and self-distillation."""
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch_geometric.utils import softmax

from revgnn_ext.datasets import synthetic_arxiv
from revgnn_ext.nn import RevGAT
from revgnn_ext.nn.rev_gat import RevGATConv

from conftest import DEVICES, plain_copy, random_edges


def graph():
    return torch.cat([random_edges(40, 240), torch.arange(40).repeat(2, 1)], 1)  # self loops, as the paper's graph


def tiny(**overrides) -> RevGAT:
    """A small RevGAT in float64 (3 heads x 8 channels, 2 groups)."""
    args = {**dict(in_channels=12, hidden_channels=8, out_channels=5, num_layers=4, heads=3), **overrides}
    return RevGAT(**args).double()


def test_arxiv_preset_is_the_papers_model():
    with torch.device("meta"):
        model = RevGAT.preset("arxiv")
    assert sum(p.numel() for p in model.parameters()) == 2_098_256
    assert len(model.layers) == 3 and all(block.num_groups == 2 for block in model.layers)
    group = model.layers[0].convs[0]
    assert group.norm.num_features == 384 and (group.conv.in_channels, group.conv.heads, group.conv.out_channels) == (
        384, 3, 128)
    assert (model.first.in_channels, model.first.heads * model.first.out_channels) == (168, 768)
    assert (model.last.in_channels, model.last.heads, model.last.out_channels) == (768, 1, 40)
    for conv in (model.first, model.last, group.conv):  # bias-free projection and residual, no destination term
        assert conv.lin.bias is None and conv.res.bias is None
        assert {name for name, _ in conv.named_parameters()} == {"lin.weight", "att_src", "res.weight"}


def per_edge(conv: RevGATConv, x, edge_index, keep=None):
    """The paper's GAT layer per edge: h_j / sqrt(out-degree), LeakyReLU(a . h_j) softmaxed over the kept
    in-edges, the sum times sqrt(in-degree), plus the residual."""
    n, heads, c = x.size(0), conv.heads, conv.out_channels
    src, dst = edge_index
    out_deg = torch.zeros(n, dtype=x.dtype).index_add_(0, src, torch.ones_like(src, dtype=x.dtype)).clamp(min=1)
    in_deg = torch.zeros(n, dtype=x.dtype).index_add_(0, dst, torch.ones_like(dst, dtype=x.dtype)).clamp(min=1)
    h = (x @ conv.lin.weight.T).view(n, heads, c) / out_deg.sqrt().view(n, 1, 1)
    if keep is not None:
        src, dst = src[keep], dst[keep]
    score = torch.nn.functional.leaky_relu((h[src] * conv.att_src).sum(-1), 0.2)  # [E, heads]
    alpha = softmax(score, dst, num_nodes=n)
    out = torch.zeros(n, heads, c, dtype=x.dtype).index_add_(0, dst, alpha.unsqueeze(-1) * h[src])
    return (out * in_deg.sqrt().view(n, 1, 1)).view(n, heads * c) + x @ conv.res.weight.T


@pytest.mark.parametrize("drop", [False, True])
def test_conv_is_the_papers_gat_layer(drop):
    torch.manual_seed(0)
    edge_index = graph()
    conv = RevGATConv(12, 7, heads=3).double()
    x = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
    keep = None
    if drop:
        keep = torch.rand(edge_index.size(1)) > 0.3
        keep[edge_index[1] == 0] = False  # node 0 keeps no in-edge: its residual alone
    out = conv(x, edge_index, keep)
    expected = per_edge(conv, x, edge_index, keep)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if drop:
        torch.testing.assert_close(out[0], x[0] @ conv.res.weight.T, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    params = [x, *conv.parameters()]
    for ours, theirs in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_reversible_equals_plain_autograd_depth_8(device):
    """Training mode, every dropout on (8 blocks): plain autograd's outputs, gradients and BatchNorm statistics,
    moved once per step."""
    edge_index = graph().to(device)
    torch.manual_seed(0)
    reversible = tiny(num_layers=10).to(device)
    plain = plain_copy(reversible)
    x = torch.randn(40, 12, dtype=torch.float64, device=device)
    outs, grads = [], []
    for model in (reversible, plain):
        torch.manual_seed(1)
        out = model(x, edge_index)
        out.backward(torch.ones_like(out))
        outs.append(out)
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
    norms = [m for m in reversible.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 2 * 8 + 1 and all(m.num_batches_tracked == 1 for m in norms)
    for (name, ours), theirs in zip(reversible.named_buffers(), plain.buffers()):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=name)


def test_edge_dropout_is_shared_by_groups_and_recomputation():
    """One keep mask per layer and forward, shared by the groups and the recomputation; floor(0.3 E) dropped."""
    edge_index = graph()
    num_edges = edge_index.size(1)
    torch.manual_seed(0)
    model = tiny(num_layers=5)
    seen = {}  # block index -> the keep masks its groups' convs received

    def record(index):
        return lambda conv, args: seen.setdefault(index, []).append(args[2].view(-1).clone())

    for i, block in enumerate(model.layers):
        for group in block.convs:
            group.conv.register_forward_pre_hook(record(i))
    first = []
    model.first.register_forward_pre_hook(lambda conv, args: first.append(args[2].clone()))
    out = model(torch.randn(40, 12, dtype=torch.float64), edge_index)
    assert all(len(keeps) == 2 for keeps in seen.values())  # forward: one per group
    out.sum().backward()
    assert all(len(keeps) == 4 for keeps in seen.values())  # and one per group in the recomputation
    masks = [keeps[0] for keeps in seen.values()] + first
    for keeps in seen.values():
        assert all(torch.equal(k, keeps[0]) for k in keeps)
    for mask in masks:
        assert mask.shape == (num_edges,) and (~mask).sum() == int(0.3 * num_edges)
    assert len({tuple(mask.tolist()) for mask in masks}) == len(masks)  # a fresh draw per layer


def test_eval_uses_every_edge_and_running_statistics():
    edge_index = graph()
    torch.manual_seed(0)
    model = tiny().eval()
    kept = []
    model.first.register_forward_pre_hook(lambda conv, args: kept.append(args[2]))
    x = torch.randn(40, 12, dtype=torch.float64)
    with torch.no_grad():
        first, second = model(x, edge_index), model(x, edge_index)
    assert kept == [None, None] and torch.equal(first, second)


def test_synthetic_arxiv_shape():
    data = synthetic_arxiv(0.01, seed=0)
    n = round(169_343 * 0.01)
    assert data.x.shape == (n, 128) and data.edge_index.shape == (2, round(n * 1_166_243 / 169_343))
    assert data.y.shape == (n, 1) and 0 <= data.y.min() and data.y.max() < 40
    sizes = [data.split_idx[s].numel() for s in ("train", "valid", "test")]
    assert sizes == [round(0.537 * n), round(0.176 * n), n - round(0.537 * n) - round(0.176 * n)]
    assert torch.equal(torch.cat(list(data.split_idx.values())).sort().values, torch.arange(n))


# ---------------------------------------------------------------------------- examples/ogbn_arxiv.py
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ARXIV = [sys.executable, str(EXAMPLES / "ogbn_arxiv.py"), "--device", "cpu", "--num-layers", "3",
         "--hidden-channels", "8", "--epochs", "2"]


@pytest.fixture
def example(monkeypatch):
    """The example's module, and test_examples' subprocess helpers."""
    pytest.importorskip("ogb")
    pytest.importorskip("tqdm")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import ogbn_arxiv
    import test_examples
    return ogbn_arxiv, test_examples


def test_paper_loss_and_distillation(example):
    ogbn_arxiv, _ = example
    torch.manual_seed(0)
    out, teacher, y = torch.randn(30, 40), torch.randn(30, 40), torch.randint(0, 40, (30, 1))
    eps = 1 - math.log(2)
    ce = torch.stack([-torch.log_softmax(out[i], 0)[y[i, 0]] for i in range(30)])
    torch.testing.assert_close(ogbn_arxiv.paper_loss(out, y), (torch.log(eps + ce) - math.log(eps)).sum())
    t = 0.7
    p, q = torch.softmax(teacher / t, 1), torch.softmax(out / t, 1)
    kl = (p * (p.log() - q.log())).mean() * t * t  # the mean over nodes and classes, as nn.KLDivLoss()'s default
    torch.testing.assert_close(ogbn_arxiv.distillation(out, teacher, t), kl)


def test_label_reuse_feeds_labels_then_predictions(example):
    """Pass 1 sees the known nodes' one-hot labels (zeros elsewhere); pass 2 pass 1's predictions on the unknown."""
    ogbn_arxiv, _ = example
    data = synthetic_arxiv(num_nodes=50, seed=0)
    seen = []

    def model(inputs, edge_index):
        seen.append(inputs.clone())
        return inputs[:, :40] * 3.0  # some logits

    known, unknown = torch.arange(0, 10), torch.arange(20, 50)
    ogbn_arxiv.label_reuse(model, data, known, unknown)
    first, second = seen
    assert torch.equal(first[:, :128], data.x) and torch.equal(second[:, :128], data.x)
    assert torch.equal(first[known, 128:], torch.nn.functional.one_hot(data.y[known, 0], 40).float())
    assert not first[10:, 128:].any()
    torch.testing.assert_close(second[unknown, 128:], torch.softmax(data.x[unknown, :40] * 3.0, 1))
    assert torch.equal(second[:20], first[:20])


def test_synthetic_teacher_then_student(example, tmp_path):
    _, helpers = example
    teacher = tmp_path / "teacher.pt"
    out = helpers.run(ARXIV + ["--synthetic", "--scale", "0.002", "--predictions", str(teacher)])
    assert "ogbn-arxiv (synthetic, scale 0.002): 339 nodes" in out
    assert "label reuse (mask rate 0.5, 1 label iteration)" in out
    assert re.search(r"^epoch 2 \| loss \d+\.\d+ \| train acc 0\.\d+ \| valid acc 0\.\d+ \| test acc 0\.\d+ \| "
                     r"valid loss \d+\.\d+ \|", out, re.MULTILINE), out
    helpers.final_metric(out, "acc")
    assert torch.load(teacher, weights_only=True).shape == (339, 40)
    out = helpers.run(ARXIV + ["--synthetic", "--scale", "0.002", "--mode", "student", "--teacher", str(teacher)])
    assert f"self-distillation from {teacher} (alpha 0.95, T 0.7)" in out
    helpers.final_metric(out, "acc")
    message, _ = helpers.fails(ARXIV + ["--synthetic", "--scale", "0.001", "--mode", "student", "--teacher",
                                        str(teacher)])
    assert message == (f"--teacher {teacher} holds [339, 40], not the [169, 40] predictions of a run with "
                       "--predictions on this graph"), message
