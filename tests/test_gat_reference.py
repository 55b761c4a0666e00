"""revgnn_ext.reference.gat_aggregate (the fused op's contract) against a per-edge loop and PyG's softmax; its
attention-dropout draw against a pure-Python uint32 implementation of the documented hash."""
import math

import pytest
import torch
from torch_geometric.utils import scatter, softmax

from revgnn_ext import CSRGraph, reference

from conftest import SHAPES, grads, make_graph

M32 = 0xFFFFFFFF


def _mix32(v: int) -> int:
    v ^= v >> 16
    v = (v * 0x7FEB352D) & M32
    v ^= v >> 15
    v = (v * 0x846CA68B) & M32
    return v ^ (v >> 16)


def _keep(seed: int, edge: int, head: int, p: float) -> bool:
    """The documented draw, in plain Python integers (uint32 arithmetic by masking)."""
    s = seed % 2**64
    k = _mix32(_mix32(s & M32) ^ (s >> 32))
    r = _mix32(_mix32(_mix32(k ^ (edge & M32)) ^ (edge >> 32)) ^ head)
    return r >= math.floor(p * 2**32)


def _loop(edge_index, num_dst, x, src_score, dst_score=None, edge_score=None, slope=0.2, keep=None, p=0.0, seed=0):
    """The op's definition, one destination, head and in-edge at a time (edges in the caller's order)."""
    heads = src_score.size(1)
    width = x.size(1) // heads
    rows = []
    for i in range(num_dst):
        edges = [k for k in range(edge_index.size(1))
                 if int(edge_index[1, k]) == i and (keep is None or bool(keep[k]))]
        row = []
        for h in range(heads):
            if not edges:
                row.append(x.new_zeros(width))
                continue
            a = []
            for k in edges:
                v = src_score[edge_index[0, k], h]
                if dst_score is not None:
                    v = v + dst_score[i, h]
                if edge_score is not None:
                    v = v + edge_score[k, h]
                a.append(torch.where(v > 0, v, slope * v))
            a = torch.stack(a)
            alpha = (a - a.max().detach()).exp()
            alpha = alpha / alpha.sum()
            acc = x.new_zeros(width)
            for alpha_k, k in zip(alpha, edges):
                scale = 1.0 if p == 0 else (1 / (1 - p) if _keep(seed, k, h, p) else 0.0)
                acc = acc + alpha_k * scale * x[edge_index[0, k], h * width:(h + 1) * width]
            row.append(acc)
        rows.append(torch.cat(row))
    return torch.stack(rows) if rows else x.new_zeros(0, x.size(1))


def _inputs(shape, heads=2, width=3, feat=4, seed=0):
    edge_index, n = make_graph(shape, seed)
    num_src, num_dst = n if isinstance(n, tuple) else (n, n)
    gen = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(edge_index.size(1), generator=gen)
    edge_index = edge_index[:, perm]  # an edge order that is not CSR order

    def rnd(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).requires_grad_()
    return edge_index, num_src, num_dst, {
        "x": rnd(num_src, heads * width), "src_score": rnd(num_src, heads), "dst_score": rnd(num_dst, heads),
        "edge_attr": rnd(edge_index.size(1), feat), "edge_weight": rnd(heads, feat)}


SMALL = [s for s in SHAPES if s != "power_law"]


@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("mode", ["src_only", "src_dst", "edge_features", "edge_scores"])
def test_matches_per_edge_loop_with_gradients(shape, mode):
    edge_index, num_src, num_dst, kw = _inputs(shape)
    g = CSRGraph.from_edge_index(edge_index, (num_src, num_dst))
    call = {"x": kw["x"], "src_score": kw["src_score"], "negative_slope": 0.15}
    loop_kw = {"slope": 0.15}
    if mode != "src_only":
        call["dst_score"] = loop_kw["dst_score"] = kw["dst_score"]
    if mode == "edge_features":
        call.update(edge_attr=kw["edge_attr"], edge_weight=kw["edge_weight"])
        loop_kw["edge_score"] = kw["edge_attr"] @ kw["edge_weight"].T
    if mode == "edge_scores":
        scores = kw["edge_attr"][:, :2]
        call["edge_attr"] = loop_kw["edge_score"] = scores
    out = reference.gat_aggregate(g, **call)
    expected = _loop(edge_index, num_dst, kw["x"], kw["src_score"], **loop_kw)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    inputs = [t for t in kw.values()]
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):  # none where the loop has no edge
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_matches_pyg_softmax_and_scatter():
    """As PyG's GATConv after its projections: leaky_relu, softmax over destinations, alpha-weighted sum."""
    edge_index, num_src, num_dst, kw = _inputs("power_law", heads=3, width=5)
    g = CSRGraph.from_edge_index(edge_index, (num_src, num_dst))
    out = reference.gat_aggregate(g, kw["x"], kw["src_score"], kw["dst_score"], kw["edge_attr"], kw["edge_weight"])
    src, dst = edge_index
    a = kw["src_score"][src] + kw["dst_score"][dst] + kw["edge_attr"] @ kw["edge_weight"].T
    alpha = softmax(torch.nn.functional.leaky_relu(a, 0.2), dst, num_nodes=num_dst)
    expected = scatter(alpha.unsqueeze(-1) * kw["x"].view(num_src, 3, 5)[src], dst, 0, num_dst, "sum")
    torch.testing.assert_close(out, expected.view(num_dst, 15), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, p", [("random", 0.0), ("duplicates", 0.0), ("bipartite", 0.0), ("duplicates", 0.3),
                                      ("duplicates", 0.75)])
def test_edge_keep_and_attention_dropout_as_the_loop(shape, p):
    """Softmax over the kept edges only (a graph without the others); dropout: the documented draw of its seed."""
    edge_index, num_src, num_dst, kw = _inputs(shape)
    g = CSRGraph.from_edge_index(edge_index, (num_src, num_dst))
    keep = torch.rand(edge_index.size(1)) < (0.8 if p else 0.6)
    args, seed = (g, kw["x"], kw["src_score"], kw["dst_score"]), 2**40 + 12345
    out = reference.gat_aggregate(*args, edge_keep=keep, attn_dropout=p, seed=seed)
    expected = _loop(edge_index, num_dst, kw["x"], kw["src_score"], kw["dst_score"], keep=keep, p=p, seed=seed)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if p:
        assert torch.equal(out, reference.gat_aggregate(*args, edge_keep=keep, attn_dropout=p, seed=seed))
        assert not torch.equal(out, reference.gat_aggregate(*args, edge_keep=keep, attn_dropout=p, seed=seed + 1))
        return
    sub = CSRGraph.from_edge_index(edge_index[:, keep], (num_src, num_dst))
    torch.testing.assert_close(out, reference.gat_aggregate(sub, kw["x"], kw["src_score"], kw["dst_score"]))
    none_kept = reference.gat_aggregate(g, kw["x"], kw["src_score"], edge_keep=torch.zeros_like(keep))
    assert none_kept.shape == (num_dst, kw["x"].size(1)) and none_kept.abs().max() == 0


def test_dropout_draw_bit_for_bit_and_its_rate():
    gen = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.randint(0, 2**62, (300,), generator=gen), torch.tensor([0, 1, M32, 2**32, 2**63 - 1])])
    for seed in (0, 1, 2**32 + 5, 2**64 - 1, -1):
        for p in (0.1, 0.5, 0.999):
            got = reference.gat_dropout_keep(seed, ids, 3, p)
            want = torch.tensor([[_keep(seed, int(e), h, p) for h in range(3)] for e in ids])
            assert torch.equal(got, want), (seed, p)
    many = torch.arange(200_000)
    for p in (0.0, 0.3, 0.6):
        keep = reference.gat_dropout_keep(11, many, 2, p)
        assert abs(1 - keep.double().mean().item() - p) < 0.005
        assert not torch.equal(keep[:, 0], keep[:, 1]) or p == 0  # heads draw independently
    assert not reference.gat_dropout_keep(11, many, 2, 1.0).any()


def test_dropout_one_gives_zeros_and_scaling_keeps_the_mean():
    edge_index, num_src, num_dst, kw = _inputs("random")
    g = CSRGraph.from_edge_index(edge_index, (num_src, num_dst))
    assert reference.gat_aggregate(g, kw["x"], kw["src_score"], attn_dropout=1.0).abs().max() == 0
    x = torch.ones(num_src, 2, dtype=torch.float64)
    score = torch.zeros(num_src, 2, dtype=torch.float64)
    mean = torch.stack([reference.gat_aggregate(g, x, score, attn_dropout=0.5, seed=s) for s in range(400)]).mean(0)
    has_edges = g.rowptr.diff() > 0
    assert (mean[has_edges] - 1).abs().max() < 0.2  # E[drop(alpha)] = alpha, so a row's weights sum to 1 on average


def test_accumulate_adds_into_a_column_slice_and_alpha_minus_one_undoes_it():
    edge_index, num_src, num_dst, kw = _inputs("bipartite")
    g = CSRGraph.from_edge_index(edge_index, (num_src, num_dst))
    args = {k: v.detach() for k, v in kw.items()}
    buffer = torch.randn(num_dst, 3 * args["x"].size(1), dtype=torch.float64)
    before = buffer.clone()
    block = buffer[:, args["x"].size(1):2 * args["x"].size(1)]
    agg = reference.gat_aggregate(g, **args, attn_dropout=0.2, seed=5)
    assert reference.gat_aggregate(g, **args, attn_dropout=0.2, seed=5, out=block) is block
    torch.testing.assert_close(block, before[:, 6:12] + agg)
    reference.gat_aggregate(g, **args, attn_dropout=0.2, seed=5, out=block, alpha=-1.0)
    torch.testing.assert_close(buffer, before, rtol=1e-14, atol=1e-14)
