"""Seeded synthetic graphs shaped like the OGB datasets RevGNN was trained on, generated on the
target device in seconds (no downloads): for demos, benchmarks, tests, and the examples'
``--synthetic`` mode.

Degrees are heavy-tailed: every edge draws its destination, and independently its source, from
one Zipf-like distribution over nodes (a Chung-Lu style graph), so in- and out-degrees are both
skewed and hubs are hubs both ways, as in the symmetric OGB graphs. Node ids are shuffled, so
hubs are spread over the id range. Self loops and duplicate edges occur, as in real data.
Labels depend on each node's own features and on its neighbourhood, so a GNN can learn them.
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from . import ops
from .graph import CSRGraph

__all__ = ["NodeData", "OGB_SHAPES", "power_law_graph", "synthetic_arxiv", "synthetic_proteins", "synthetic_products"]

# The real datasets' sizes (directed edge counts) and the degree exponent that gives a largest
# in-degree over the mean near the real one (proteins ~13: a wide but light tail; products ~350;
# arxiv ~1900, its most cited paper).
OGB_SHAPES = {
    "ogbn-arxiv": dict(num_nodes=169_343, num_edges=1_166_243, exponent=2.4),
    "ogbn-proteins": dict(num_nodes=132_534, num_edges=79_122_504, exponent=5.0),
    "ogbn-products": dict(num_nodes=2_449_029, num_edges=123_718_280, exponent=3.2),
}


def _zipf_ranks(num_nodes: int, num_samples: int, exponent: float, gen: torch.Generator) -> Tensor:
    """num_samples ranks in [0, num_nodes), rank r drawn with probability ~ (r + 1)^(-1 / (exponent - 1)),
    the weights under which the expected degrees follow P(k) ~ k^-exponent. Inverse-CDF sampling:
    one searchsorted, fast on any device and for any number of nodes."""
    device = gen.device
    weights = torch.arange(1, num_nodes + 1, dtype=torch.float64, device=device).pow(-1.0 / (exponent - 1.0))
    cdf = torch.cumsum(weights, 0)
    u = torch.rand(num_samples, dtype=torch.float64, device=device, generator=gen) * cdf[-1]
    return torch.searchsorted(cdf, u).clamp_(max=num_nodes - 1)


def power_law_graph(num_nodes: int, num_edges: int, *, exponent: float = 2.5, seed: int = 0,
                    device="cpu") -> Tensor:
    """edge_index [2, num_edges] int64 (row 0 sources, row 1 destinations) with in- and
    out-degrees ~ k^-exponent (exponent > 1; smaller is heavier-tailed) over shuffled node ids.
    Deterministic for a seed on a given device."""
    if exponent <= 1:
        raise ValueError(f"power_law_graph: exponent must be > 1, got {exponent}")
    if num_nodes < 1 or num_edges < 0:
        raise ValueError(f"power_law_graph: need num_nodes >= 1 and num_edges >= 0, got {num_nodes}, {num_edges}")
    gen = torch.Generator(device=device).manual_seed(seed)
    node_of_rank = torch.randperm(num_nodes, device=device, generator=gen)
    dst = node_of_rank[_zipf_ranks(num_nodes, num_edges, exponent, gen)]
    src = node_of_rank[_zipf_ranks(num_nodes, num_edges, exponent, gen)]
    return torch.stack([src, dst])


@dataclass
class NodeData:
    """A node-property-prediction graph, with the fields of OGB's PyG datasets."""
    x: Tensor                     # [N, in_channels] float
    edge_index: Tensor            # [2, E] int64
    edge_attr: Optional[Tensor]   # [E, F] float, or None
    y: Tensor                     # [N, tasks] float 0/1 (proteins) or [N, 1] int64 (products)
    split_idx: Dict[str, Tensor]  # "train" / "valid" / "test": node ids

    @property
    def num_nodes(self) -> int:
        return self.x.size(0)

    def to(self, device) -> "NodeData":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NodeData(move(self.x), move(self.edge_index), move(self.edge_attr), move(self.y),
                        {k: v.to(device) for k, v in self.split_idx.items()})


def _power_law(name: str, scale: float, num_nodes: Optional[int], mean_degree: Optional[float], seed: int, device):
    """(n, edge_index): the node count and a power_law_graph shaped like OGB's ``name``."""
    shape = OGB_SHAPES[name]
    if not scale > 0:
        raise ValueError(f"{name}: scale must be > 0, got {scale}")
    n = num_nodes if num_nodes is not None else max(1, round(shape["num_nodes"] * scale))
    degree = mean_degree if mean_degree is not None else shape["num_edges"] / shape["num_nodes"]
    return n, power_law_graph(n, round(n * degree), exponent=shape["exponent"], seed=seed, device=device)


def _split(order: Tensor, fractions) -> Dict[str, Tensor]:
    """The first fractions[0] of ``order`` train, the next fractions[1] valid, the rest test."""
    n = order.numel()
    train, valid = round(fractions[0] * n), round(fractions[1] * n)
    return {"train": order[:train], "valid": order[train:train + valid], "test": order[train + valid:]}


def synthetic_proteins(scale: float = 1.0, *, num_nodes: Optional[int] = None, mean_degree: Optional[float] = None,
                       seed: int = 0, device="cpu") -> NodeData:
    """ogbn-proteins-shaped: x = one-hot of 8 species, 8 edge features in [0, 1), 112 binary
    tasks; ``scale`` multiplies the real node count (132,534) at the real mean degree (597),
    or give ``num_nodes`` / ``mean_degree``. Random 65/16/19% split."""
    n, edge_index = _power_law("ogbn-proteins", scale, num_nodes, mean_degree, seed, device)
    gen = torch.Generator().manual_seed(seed)
    edge_attr = torch.rand(edge_index.size(1), 8, generator=gen).to(device)
    x = torch.eye(8)[torch.randint(0, 8, (n,), generator=gen)].to(device)
    graph = CSRGraph.from_edge_index(edge_index, n)
    # Each task: a random function of the species, the mean neighbour species and the mean
    # in-edge features, thresholded at its median.
    neighbour = ops.spmm(graph, x, None, "mean")
    offsets = graph.rowptr.long()
    edge_sum = torch.segment_reduce(graph.edges_to_csr(edge_attr), "sum", offsets=offsets, axis=0)
    edge_mean = edge_sum / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1)
    features = torch.cat([x, neighbour, edge_mean], dim=1)
    score = features @ torch.randn(24, 112, generator=gen).to(device)
    y = (score > score.median(dim=0).values).float()
    return NodeData(x, edge_index, edge_attr, y, _split(torch.randperm(n, generator=gen).to(device), (0.65, 0.16)))


def synthetic_products(scale: float = 1.0, *, num_nodes: Optional[int] = None,
                       mean_degree: Optional[float] = None, seed: int = 0, device="cpu") -> NodeData:
    """ogbn-products-shaped: 100 node features, 47 classes; ``scale`` multiplies the real node
    count (2,449,029) at the real mean degree (50.5), or give ``num_nodes`` / ``mean_degree``.
    Random 8/2/90% split (as the real one: most nodes are test nodes)."""
    n, edge_index = _power_law("ogbn-products", scale, num_nodes, mean_degree, seed, device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 100, generator=gen).to(device)
    graph = CSRGraph.from_edge_index(edge_index, n)
    features = torch.cat([x, ops.spmm(graph, x, None, "mean")], dim=1)
    y = (features @ torch.randn(200, 47, generator=gen).to(device)).argmax(dim=1, keepdim=True)
    return NodeData(x, edge_index, None, y, _split(torch.randperm(n, generator=gen).to(device), (0.08, 0.02)))


def synthetic_arxiv(scale: float = 1.0, *, num_nodes: Optional[int] = None, mean_degree: Optional[float] = None,
                    seed: int = 0, device="cpu") -> NodeData:
    """ogbn-arxiv-shaped: a directed citation graph (each edge from the newer paper to the older
    one, as ogb gives it; the RevGAT example makes it bidirected), 128 node features, 40 classes;
    ``scale`` multiplies the real node count (169,343) at the real mean degree (6.9, 1,166,243
    edges at scale 1), or give ``num_nodes`` / ``mean_degree``. Time-based split as the real one:
    every paper gets a publication time, the oldest 53.7% train, the next 17.6% valid, the newest
    28.7% test."""
    n, edge_index = _power_law("ogbn-arxiv", scale, num_nodes, mean_degree, seed, device)
    gen = torch.Generator().manual_seed(seed)
    time = torch.randperm(n, generator=gen).to(device)  # node i is the time[i]-th paper published
    newer_first = time[edge_index[0]] >= time[edge_index[1]]
    edge_index = torch.where(newer_first, edge_index, edge_index.flip(0))
    x = torch.randn(n, 128, generator=gen).to(device)
    graph = CSRGraph.from_edge_index(edge_index, n)
    features = torch.cat([x, ops.spmm(graph, x, None, "mean")], dim=1)
    y = (features @ torch.randn(256, 40, generator=gen).to(device)).argmax(dim=1, keepdim=True)
    return NodeData(x, edge_index, None, y, _split(time.argsort(), (0.537, 0.176)))  # oldest first
