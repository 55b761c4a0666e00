"""Seeded synthetic graphs with OGB-like shapes, generated on the target device (no downloads).

Degrees are heavy-tailed: every edge draws its destination, and independently its source, from
one Zipf-like distribution over nodes (a Chung-Lu style graph), so in- and out-degrees are both
skewed and hubs are hubs both ways, as in the symmetric OGB graphs. Node ids are shuffled, so
hubs are spread over the id range. Self loops and duplicate edges occur, as in real data.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["PRESETS", "SyntheticGraph", "power_law_graph", "make_graph"]

# exponent: of the degree distribution P(k) ~ k^-exponent; for the OGB shapes it is picked so
# that the largest in-degree over the mean is near the real dataset's (proteins ~13, a wide but
# light tail; products ~350). full_scale: the real sizes, too large for a CPU benchmark.
PRESETS = {
    "issue-2": dict(num_nodes=100_000, num_edges=2_000_000, exponent=2.5, edge_features=0,
                    full_scale=False),
    "issue-3": dict(num_nodes=20_000, num_edges=600_000, exponent=2.5, edge_features=8, full_scale=False),
    "products-like": dict(num_nodes=100_000, num_edges=5_000_000, exponent=3.2, edge_features=0,
                          node_features=100, classes=47, full_scale=False),
    "proteins-like": dict(num_nodes=10_000, num_edges=6_000_000, exponent=5.0, edge_features=8,
                          tasks=112, full_scale=False),
    "products": dict(num_nodes=2_449_029, num_edges=123_718_280, exponent=3.2, edge_features=0,
                     node_features=100, classes=47, full_scale=True),
    "proteins": dict(num_nodes=132_534, num_edges=79_122_504, exponent=5.0, edge_features=8,
                     tasks=112, full_scale=True),
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
    gen = torch.Generator(device=device).manual_seed(seed)
    node_of_rank = torch.randperm(num_nodes, device=device, generator=gen)
    dst = node_of_rank[_zipf_ranks(num_nodes, num_edges, exponent, gen)]
    src = node_of_rank[_zipf_ranks(num_nodes, num_edges, exponent, gen)]
    return torch.stack([src, dst])


@dataclass
class SyntheticGraph:
    name: str
    edge_index: Tensor               # [2, E] int64, row 0 sources, row 1 destinations
    num_nodes: int
    edge_attr: Optional[Tensor]      # [E, edge_features] in [0, 1) (proteins' association scores)


def make_graph(name: str, device="cpu", seed: int = 0, *, with_edge_attr: bool = True) -> SyntheticGraph:
    """The preset `name` on `device`; edge features when the preset has them and
    `with_edge_attr` (callers that ignore them save E x edge_features floats)."""
    if name not in PRESETS:
        raise ValueError(f"unknown graph {name!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    edge_index = power_law_graph(p["num_nodes"], p["num_edges"], exponent=p["exponent"], seed=seed,
                                 device=device)
    edge_attr = None
    if with_edge_attr and p["edge_features"]:
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        edge_attr = torch.rand(p["num_edges"], p["edge_features"], device=device, generator=gen)
    return SyntheticGraph(name, edge_index, p["num_nodes"], edge_attr)
