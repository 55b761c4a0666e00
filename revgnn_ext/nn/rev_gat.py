"""RevGAT, the ogbn-arxiv model of "Training Graph Neural Networks with 1000 Layers" (Li et al.,
ICML 2021): GAT layers with source-only attention and symmetric degree scaling, grouped reversible
blocks in between, BatchNorm, SharedDropout and edge dropout."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..adjacency import as_graph
from ..graph import CSRGraph
from .group_add_rev import GroupAddRev
from .rev_gnn import Presets, ResPlusGroup, SharedDropout

__all__ = ["RevGAT", "RevGATConv"]

class RevGATConv(torch.nn.Module):
    r"""The GAT layer of RevGAT (the paper's arxiv code, itself from the "GAT + norm. adj. + label
    reuse" OGB entry), ``heads`` heads of ``out_channels`` channels, concatenated:

    .. math::
        h_j = W x_j \cdot d^{out}_j{}^{-1/2}, \quad
        \alpha_{ij} = \mathrm{softmax}_{j \to i \text{ kept}}(\mathrm{LeakyReLU}_{0.2}(a \cdot h_j)), \quad
        out_i = d^{in}_i{}^{1/2} \sum_j \alpha_{ij} h_j + R x_i

    per head, with degrees counted on the whole graph (clamped to 1), ``W`` (``lin``) and ``R``
    (``res``) bias-free Linears and ``a`` (``att_src``, [1, heads, out_channels]) the source-side
    attention; there is no destination term. Unlike PyG's GATConv it adds no self loops (the
    paper adds one per node to the graph once), has no bias, and scales by the degrees
    (``symmetric_norm=False`` leaves that out). Initialization: Xavier-normal with ReLU gain.

    ``forward(x, edge_index, edge_keep=None)``: ``edge_keep`` (bool [num_edges], or a column
    [num_edges, 1], which a grouped block passes whole to every group; in ``edge_index``'s edge
    order) drops the other edges from the softmax and the sum, as the paper's edge dropout does
    (a node with no kept in-edge gets only its residual)."""

    def __init__(self, in_channels: int, out_channels: int, heads: int = 1, negative_slope: float = 0.2,
                 symmetric_norm: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.negative_slope, self.symmetric_norm = negative_slope, symmetric_norm
        self.lin = torch.nn.Linear(in_channels, heads * out_channels, bias=False)
        self.att_src = torch.nn.Parameter(torch.empty(1, heads, out_channels))
        self.res = torch.nn.Linear(in_channels, heads * out_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        gain = torch.nn.init.calculate_gain("relu")
        for weight in (self.lin.weight, self.att_src, self.res.weight):
            torch.nn.init.xavier_normal_(weight, gain=gain)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads})"

    def forward(self, x: Tensor, edge_index, edge_keep: Optional[Tensor] = None) -> Tensor:
        graph = as_graph(edge_index, (x.size(0), x.size(0)))
        h = self.lin(x)
        if self.symmetric_norm:
            out_degree = torch.bincount(graph.col.long(), minlength=graph.num_src)
            h = h * out_degree.clamp(min=1).to(h.dtype).rsqrt().unsqueeze(1)
        src_score = (h.view(-1, self.heads, self.out_channels) * self.att_src).sum(-1)
        if edge_keep is not None:
            edge_keep = edge_keep.view(-1)
        out = ops.gat_aggregate(graph, h, src_score, None, negative_slope=self.negative_slope, edge_keep=edge_keep)
        if self.symmetric_norm:
            out = out * graph.rowptr.diff().clamp(min=1).to(out.dtype).sqrt().unsqueeze(1)
        return out + self.res(x)


_PRESETS = {
    # ogbn-arxiv: 128 node features + a 40-class label one-hot (label reuse), 40 classes.
    "arxiv": dict(in_channels=168, hidden_channels=256, out_channels=40, num_layers=5, heads=3, dropout=0.75,
                  input_dropout=0.25, edge_dropout=0.3),
}


class RevGAT(Presets, torch.nn.Module):
    r"""RevGAT: a :class:`RevGATConv` from ``in_channels`` to ``heads`` x ``hidden_channels``
    (width D = heads * hidden_channels), ``num_layers - 2`` grouped reversible blocks
    (:class:`GroupAddRev`, ``num_groups`` groups; each group's F = RevGATConv(D / G,
    hidden_channels / G, heads)(SharedDropout(ReLU(BatchNorm(x))))), then BatchNorm(D) -> ReLU ->
    dropout -> RevGATConv(D, out_channels, 1 head) -> + a bias of ``out_channels``.

    In training mode, besides ``input_dropout`` on the input and ``dropout`` before the last
    layer: one SharedDropout mask (probability ``dropout``) for all blocks per forward, and
    ``edge_dropout``: per layer and forward, a random ``floor(edge_dropout * E)`` of the edges
    are dropped from the attention (the paper's one random permutation per layer). Both are drawn
    by the model, so that a block's groups and its recomputation in backward see the same ones;
    BatchNorm statistics move once per forward (docs/design.md §6).

    :meth:`preset` ``("arxiv")`` is the paper's model (docs/design.md §6); it uses the graph it
    is given (the paper's is bidirected with one self loop per node: ``examples/ogbn_arxiv.py``).
    ``forward(x, edge_index)`` accepts any adjacency our layers do; ``reversible=False`` gives the
    same function with plain autograd."""

    PRESETS = _PRESETS

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, num_layers: int, *, heads: int = 3,
                 num_groups: int = 2, dropout: float = 0.75, input_dropout: float = 0.25, edge_dropout: float = 0.3,
                 negative_slope: float = 0.2, reversible: bool = True):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"RevGAT: num_layers must be >= 2 (a first and a last GAT layer), got {num_layers}")
        width = heads * hidden_channels
        if num_groups < 2 or hidden_channels % num_groups != 0:
            raise ValueError(f"RevGAT: hidden_channels ({hidden_channels}) must split into num_groups "
                             f"({num_groups} >= 2) equal groups")
        if not 0.0 <= edge_dropout < 1.0:
            raise ValueError(f"RevGAT: edge_dropout must be in [0, 1), got {edge_dropout}")
        self.in_channels, self.hidden_channels, self.out_channels = in_channels, hidden_channels, out_channels
        self.num_layers, self.heads, self.num_groups, self.reversible = num_layers, heads, num_groups, reversible
        self.edge_dropout = edge_dropout

        def group() -> ResPlusGroup:
            c = width // num_groups
            return ResPlusGroup(torch.nn.BatchNorm1d(c), RevGATConv(c, hidden_channels // num_groups, heads,
                                                                    negative_slope))

        self.input_dropout = torch.nn.Dropout(input_dropout)
        self.first = RevGATConv(in_channels, hidden_channels, heads, negative_slope)
        self.layers = torch.nn.ModuleList(
            GroupAddRev(torch.nn.ModuleList(group() for _ in range(num_groups)), disable=not reversible)
            for _ in range(num_layers - 2))
        self.dropout = SharedDropout(dropout)
        self.norm = torch.nn.BatchNorm1d(width)
        self.last = RevGATConv(width, out_channels, 1, negative_slope)
        self.bias = torch.nn.Parameter(torch.zeros(out_channels))

    def reset_parameters(self):
        for module in (self.first, *self.layers, self.norm, self.last):
            module.reset_parameters()
        torch.nn.init.zeros_(self.bias)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, {self.out_channels}, "
                f"num_layers={self.num_layers}, heads={self.heads}, num_groups={self.num_groups}, "
                f"dropout={self.dropout.p}, input_dropout={self.input_dropout.p}, "
                f"edge_dropout={self.edge_dropout}, reversible={self.reversible})")

    def edge_keep(self, graph: CSRGraph) -> Optional[Tensor]:
        """One layer's edge dropout for one forward: bool [num_edges], all but a random
        floor(edge_dropout * num_edges) edges True; None in eval mode or at edge_dropout = 0."""
        if not self.training or self.edge_dropout == 0.0:
            return None
        num_edges = graph.num_edges
        keep = torch.ones(num_edges, dtype=torch.bool, device=graph.device)
        keep[torch.randperm(num_edges, device=graph.device)[:int(num_edges * self.edge_dropout)]] = False
        return keep

    def forward(self, x: Tensor, edge_index) -> Tensor:
        graph = as_graph(edge_index, (x.size(0), x.size(0)))
        h = self.first(self.input_dropout(x), graph, self.edge_keep(graph))
        mask = self.dropout.mask(h)
        for block in self.layers:
            keep = self.edge_keep(graph)
            h = block(h, graph, mask, None if keep is None else keep.view(-1, 1))
        h = F.dropout(F.relu(self.norm(h)), self.dropout.p, self.training)
        return self.last(h, graph, self.edge_keep(graph)) + self.bias
