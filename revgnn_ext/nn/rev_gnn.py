"""RevGNN ("Training Graph Neural Networks with 1000 Layers", Li et al., ICML 2021): deep
grouped-reversible GNNs built from revgnn_ext's GroupAddRev, GENConv and SAGEConv."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adjacency import as_graph
from ..graph import CSRGraph
from .deq import DEQ
from .gen_conv import GENConv
from .group_add_rev import GroupAddRev
from .sage_conv import SAGEConv

__all__ = ["Presets", "ResPlusGroup", "RevGNN", "SharedDropout"]


class SharedDropout(torch.nn.Module):
    """RevGNN's dropout: one mask per forward of the whole model, drawn by :meth:`mask` and
    passed to every layer as an argument, so that a reversible block's recomputation in
    backward applies exactly the mask of the forward (and every layer drops the same units).
    ``mask`` returns None (no dropout) in eval mode or with ``p = 0``."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"SharedDropout: p must be in [0, 1), got {p}")
        self.p = p

    def mask(self, like: Tensor) -> Optional[Tensor]:
        """A fresh mask shaped like ``like``: 0 with probability p, else 1 / (1 - p)."""
        if not self.training or self.p == 0.0:
            return None
        return torch.empty_like(like).bernoulli_(1.0 - self.p).div_(1.0 - self.p)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return x if mask is None else x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ResPlusGroup(torch.nn.Module):
    """One group's function F_i in a RevGNN or RevGAT block, "res+" pre-activation:
    ``conv(SharedDropout(ReLU(norm(x)), mask), graph, *args)``.

    Args:
        norm: the normalization (LayerNorm in RevGNN, BatchNorm1d in RevGAT).
        conv: the layer, called as ``conv(h, graph, *args)``.
    """

    def __init__(self, norm: torch.nn.Module, conv: torch.nn.Module):
        super().__init__()
        self.norm = norm
        self.dropout = SharedDropout(0.0)  # the mask comes from the model
        self.conv = conv

    def reset_parameters(self):
        self.norm.reset_parameters()
        self.conv.reset_parameters()

    def forward(self, x: Tensor, graph: CSRGraph, mask: Optional[Tensor] = None, *args) -> Tensor:
        return self.conv(self.dropout(F.relu(self.norm(x)), mask), graph, *args)


class Presets:
    """``preset(name, **overrides)`` for a model class with a ``PRESETS`` table of constructor
    arguments."""

    PRESETS: dict = {}

    @classmethod
    def preset(cls, name: str, **overrides):
        """The paper's model ``name`` (see the class's PRESETS); ``overrides`` replace any
        constructor argument (e.g. num_layers, hidden_channels)."""
        if name not in cls.PRESETS:
            raise ValueError(f"{cls.__name__}.preset: unknown preset {name!r}; choose from {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})


def _out_edge_sums(graph: CSRGraph, edge_attr: Tensor) -> Tensor:
    """Each source node's sum of its out-edges' rows of ``edge_attr`` (given in CSR order): a
    deterministic segment sum over the transposed CSR."""
    rowptr_t, _, perm_t = graph.transposed()
    return torch.segment_reduce(edge_attr[perm_t.long()], "sum", offsets=rowptr_t.long(), axis=0)


_PRESETS = {
    # ogbn-proteins: 8 species (one-hot) per node, 8 edge features, 112 binary tasks. Dropout as in
    # the paper's training commands (0.1 Deep, 0.2 Wide).
    "proteins-deep": dict(in_channels=8, hidden_channels=80, out_channels=112, num_layers=1001, conv="gen",
                          aggr="max", edge_dim=8, edge_sums=True, dropout=0.1),
    "proteins-wide": dict(in_channels=8, hidden_channels=224, out_channels=112, num_layers=448, conv="gen",
                          aggr="max", edge_dim=8, edge_sums=True, dropout=0.2),
    # ogbn-products: 100 node features, 47 classes.
    "products-112": dict(in_channels=100, hidden_channels=160, out_channels=47, num_layers=112, conv="sage",
                         dropout=0.5),
    # RevGNN-DEQ (the paper's equilibrium variant; its code was never released): the proteins
    # model's GENConv block at its fixed point, 64 channels.
    "proteins-deq": dict(in_channels=8, hidden_channels=64, out_channels=112, num_layers=1, conv="gen",
                         aggr="max", edge_dim=8, edge_sums=True, dropout=0.1, equilibrium=True),
}


class RevGNN(Presets, torch.nn.Module):
    r"""The RevGNN models: a node encoder, ``num_layers`` grouped reversible blocks
    (:class:`GroupAddRev`, ``num_groups`` groups of width c = hidden / num_groups, each group's
    F = conv(SharedDropout(ReLU(LayerNorm(x))))), then LayerNorm -> ReLU -> dropout -> Linear.

    - ``conv="gen"``: GENConv(c, c, aggr, norm="layer", bias=True); with ``edge_dim``, a
      model-level edge encoder Linear(edge_dim, hidden) feeds every group's ``lin_edge``
      Linear(hidden, c), the two composed into one map that the fused kernel applies to the raw
      edge features (docs/design.md §4).
    - ``conv="sage"``: SAGEConv(c, c) (mean aggregation, root weight).
    - ``edge_sums=True`` (ogbn-proteins): the node input is [sum of each node's out-edge
      features, Linear(in, in)(x)], as in the paper, the sums taken over the graph given to
      ``forward`` unless given as its ``edge_sums`` (docs/design.md §6).
    - ``weight_tied=True`` (RevGNN-WT): one block's weights are used at every depth.
    - ``reversible=False``: the same function with plain autograd (every activation stored),
      for comparison.
    - ``equilibrium=True`` (RevGNN-DEQ): each block is a :class:`~revgnn_ext.nn.deq.DEQ` of the
      same groups, solved to its fixed point with the block's input injected (Anderson, 50
      iterations at most, tol 1e-4; change them on ``model.layers[i]``).

    Build the paper's models with :meth:`preset`: ``proteins-deep`` (RevGNN-Deep),
    ``proteins-wide`` (RevGNN-Wide), ``products-112`` (RevGNN-112), ``proteins-deq`` (RevGNN-DEQ;
    docs/design.md §6). ``forward(x, edge_index, edge_attr=None, edge_sums=None)`` accepts any
    adjacency our layers do (edge_index, CSRGraph, torch.sparse, SparseTensor).
    """

    PRESETS = _PRESETS

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, num_layers: int, *,
                 conv: str = "gen", aggr: str = "max", edge_dim: Optional[int] = None, edge_sums: bool = False,
                 num_groups: int = 2, dropout: float = 0.1, weight_tied: bool = False, reversible: bool = True,
                 equilibrium: bool = False):
        super().__init__()
        if conv not in ("gen", "sage"):
            raise ValueError(f"RevGNN: conv must be 'gen' or 'sage', got {conv!r}")
        for name, value in (("in_channels", in_channels), ("hidden_channels", hidden_channels),
                            ("out_channels", out_channels), ("num_layers", num_layers), ("edge_dim", edge_dim)):
            if value is not None and value < 1:
                raise ValueError(f"RevGNN: {name} must be >= 1, got {value}")
        if num_groups < 2 or hidden_channels % num_groups != 0:
            raise ValueError(f"RevGNN: hidden_channels ({hidden_channels}) must split into num_groups "
                             f"({num_groups} >= 2) equal groups")
        if edge_dim is not None and conv != "gen":
            raise ValueError("RevGNN: edge features (edge_dim) need conv='gen'")
        if edge_sums and edge_dim is None:
            raise ValueError("RevGNN: edge_sums needs edge_dim")
        if edge_dim == hidden_channels:
            raise ValueError(f"RevGNN: hidden_channels must differ from edge_dim ({edge_dim}): the reversible blocks "
                             f"split across their groups every argument whose last size is hidden_channels, and the "
                             f"edge features [num_edges, edge_dim] must reach each group whole; choose another "
                             f"multiple of num_groups ({num_groups}), e.g. {hidden_channels + num_groups}")
        self.in_channels, self.hidden_channels, self.out_channels = in_channels, hidden_channels, out_channels
        self.num_layers, self.num_groups, self.conv, self.aggr = num_layers, num_groups, conv, aggr
        self.edge_dim, self.weight_tied, self.reversible = edge_dim, weight_tied, reversible
        c = hidden_channels // num_groups

        self.input_encoder = torch.nn.Linear(in_channels, in_channels) if edge_sums else None
        self.node_encoder = torch.nn.Linear(in_channels + (edge_dim if edge_sums else 0), hidden_channels)
        self.edge_encoder = torch.nn.Linear(edge_dim, hidden_channels) if edge_dim is not None else None

        def group() -> ResPlusGroup:
            if conv == "gen":
                layer = GENConv(c, c, aggr=aggr, norm="layer", bias=True, edge_dim=hidden_channels if edge_dim else None)
            else:
                layer = SAGEConv(c, c)
            return ResPlusGroup(torch.nn.LayerNorm(c), layer)

        def block(groups: torch.nn.ModuleList) -> torch.nn.Module:
            return DEQ(groups) if equilibrium else GroupAddRev(groups, disable=not reversible)

        self.equilibrium = equilibrium
        self.layers = torch.nn.ModuleList(block(torch.nn.ModuleList(group() for _ in range(num_groups)))
                                          for _ in range(1 if weight_tied else num_layers))
        self.dropout = SharedDropout(dropout)
        self.norm = torch.nn.LayerNorm(hidden_channels)
        self.head = torch.nn.Linear(hidden_channels, out_channels)

    def reset_parameters(self):
        for module in (self.input_encoder, self.node_encoder, self.edge_encoder, self.norm, self.head):
            if module is not None:
                module.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()

    def __repr__(self) -> str:
        extra = f", edge_dim={self.edge_dim}" if self.edge_dim is not None else ""
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, {self.out_channels}, "
                f"num_layers={self.num_layers}, conv={self.conv!r}, num_groups={self.num_groups}{extra}, "
                f"dropout={self.dropout.p}, weight_tied={self.weight_tied}, reversible={self.reversible}"
                + (", equilibrium=True)" if self.equilibrium else ")"))

    @staticmethod
    def out_edge_sums(edge_index, edge_attr: Tensor, num_nodes: int) -> Tensor:
        """[num_nodes, F]: each node's sum of the features ``edge_attr`` [E, F] of its out-edges
        (edge_index row 0, the source: the paper's scatter-add over ``edge_index[0]``), the node
        input of an ``edge_sums`` model. Takes any adjacency ``forward`` accepts."""
        graph = as_graph(edge_index, (num_nodes, num_nodes))
        return _out_edge_sums(graph, graph.edges_to_csr(edge_attr, "RevGNN.out_edge_sums: edge_attr"))

    def forward(self, x: Tensor, edge_index, edge_attr: Optional[Tensor] = None,
                edge_sums: Optional[Tensor] = None) -> Tensor:
        """``edge_sums`` [N, edge_dim]: the node-input edge-feature sums of an ``edge_sums=True``
        model, precomputed (e.g. over the whole graph, see :meth:`out_edge_sums`); by default
        they are summed over the edges given here."""
        if edge_sums is not None:
            if self.input_encoder is None:
                raise ValueError("RevGNN: edge_sums is the node input of a model built with edge_sums=True "
                                 "(the proteins presets); this model takes none")
            if edge_sums.shape != (x.size(0), self.edge_dim):
                raise ValueError(f"RevGNN: edge_sums must have shape [num_nodes, edge_dim] = [{x.size(0)}, "
                                 f"{self.edge_dim}], got {list(edge_sums.shape)}")
        graph = as_graph(edge_index, (x.size(0), x.size(0)))
        extra = ()
        if self.edge_dim is not None:
            if edge_attr is None or edge_attr.dim() != 2 or edge_attr.size(1) != self.edge_dim:
                shape = None if edge_attr is None else list(edge_attr.shape)
                raise ValueError(f"RevGNN: edge_attr must have shape [num_edges, {self.edge_dim}], got {shape}")
            # Reordered once for all layers; from here on edges are numbered in CSR order.
            edge_attr = graph.edges_to_csr(edge_attr, "RevGNN: edge_attr")
            graph = graph.csr_ordered()
            # GENConv(h, graph, edge_attr, size, encoder weight, encoder bias), the bias as a column,
            # which the blocks pass whole (they split a tensor whose last size is the channel count)
            extra = (edge_attr, None, self.edge_encoder.weight, self.edge_encoder.bias.unsqueeze(1))
        if self.input_encoder is not None:
            sums = _out_edge_sums(graph, edge_attr) if edge_sums is None else edge_sums
            x = torch.cat([sums, self.input_encoder(x)], dim=-1)
        # The blocks carry the model's dtype (float32 under autocast too: F runs in low precision,
        # the residual stream and the reversible inversion do not).
        h = self.node_encoder(x).to(self.norm.weight.dtype)
        mask = self.dropout.mask(h)
        for i in range(self.num_layers):
            h = self.layers[0 if self.weight_tied else i](h, graph, mask, *extra)
        h = F.dropout(F.relu(self.norm(h)), self.dropout.p, self.training)
        return self.head(h)
