"""The benchmarks' graph presets: seeded synthetic graphs with OGB-like shapes, generated on the
target device (no downloads) by revgnn_ext.datasets.power_law_graph (see there for the model).
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from revgnn_ext.datasets import OGB_SHAPES, power_law_graph

__all__ = ["PRESETS", "SyntheticGraph", "power_law_graph", "make_graph"]

# exponent: of the degree distribution P(k) ~ k^-exponent; for the OGB shapes it is picked so
# that the largest in-degree over the mean is near the real dataset's (proteins ~13, a wide but
# light tail; products ~350). Named by shape: <degree model>-<nodes>-d<mean degree>; the OGB
# datasets' full sizes keep their names (too large for a CPU benchmark; make_graph's scale shrinks
# them). bidirected: each generated edge is also added reversed (num_edges counts one direction).
PRESETS = {
    "powerlaw-100k-d20": dict(num_nodes=100_000, num_edges=2_000_000, exponent=2.5, edge_features=0),
    "powerlaw-20k-d15": dict(num_nodes=20_000, num_edges=300_000, exponent=2.5, edge_features=0),  # issue 13 target
    "powerlaw-20k-d30": dict(num_nodes=20_000, num_edges=600_000, exponent=2.5, edge_features=8),
    "products-100k-d50": dict(num_nodes=100_000, num_edges=5_000_000, exponent=3.2, edge_features=0,
                              node_features=100),
    "proteins-10k-d600": dict(num_nodes=10_000, num_edges=6_000_000, exponent=5.0, edge_features=8, tasks=112),
    "arxiv": dict(**OGB_SHAPES["ogbn-arxiv"], edge_features=0, node_features=128, bidirected=True),
    "products": dict(**OGB_SHAPES["ogbn-products"], edge_features=0, node_features=100),
    "proteins": dict(**OGB_SHAPES["ogbn-proteins"], edge_features=8, tasks=112),
}


@dataclass
class SyntheticGraph:
    name: str
    edge_index: Tensor               # [2, E] int64, row 0 sources, row 1 destinations
    num_nodes: int
    edge_attr: Optional[Tensor]      # [E, edge_features] in [0, 1) (proteins' association scores)


def make_graph(name: str, device="cpu", seed: int = 0, *, with_edge_attr: bool = True,
               scale: float = 1.0) -> SyntheticGraph:
    """The preset `name` on `device`, its nodes and edges times `scale` (the mean degree kept);
    edge features when the preset has them and `with_edge_attr` (callers that ignore them save
    E x edge_features floats)."""
    if name not in PRESETS:
        raise ValueError(f"unknown graph {name!r}; presets: {', '.join(PRESETS)}")
    if not 0 < scale <= 1:
        raise ValueError(f"make_graph: scale must be in (0, 1], got {scale}")
    p = PRESETS[name]
    num_nodes, num_edges = max(1, round(p["num_nodes"] * scale)), round(p["num_edges"] * scale)
    edge_index = power_law_graph(num_nodes, num_edges, exponent=p["exponent"], seed=seed, device=device)
    edge_attr = None
    if with_edge_attr and p["edge_features"]:
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        edge_attr = torch.rand(num_edges, p["edge_features"], device=device, generator=gen)
    if p.get("bidirected"):
        edge_index = torch.cat([edge_index, edge_index.flip(0)], 1)
        edge_attr = None if edge_attr is None else torch.cat([edge_attr, edge_attr], 0)
    return SyntheticGraph(name, edge_index, num_nodes, edge_attr)
