"""Drop-in torch.nn modules for PyTorch Geometric models, backed by revgnn_ext's fused ops.

They subclass PyG's own modules, so constructor arguments, submodule and parameter names,
``state_dict``, ``repr`` and ``reset_parameters`` are PyG's; only the computation is ours.
"""
try:
    import torch_geometric  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("revgnn_ext.nn provides drop-ins for PyTorch Geometric modules and needs torch_geometric "
                      "(pip install torch_geometric, a pure-Python package); revgnn_ext.ops works without it") from err

from .deq import DEQ, SolverTrace
from .gat_conv import GATConv
from .gcn_conv import GCNConv
from .gen_conv import GENConv
from .group_add_rev import GroupAddRev
from .rev_gat import RevGAT
from .rev_gnn import RevGNN, SharedDropout
from .sage_conv import SAGEConv

__all__ = ["DEQ", "GATConv", "GCNConv", "GENConv", "GroupAddRev", "RevGAT", "RevGNN", "SAGEConv", "SharedDropout",
           "SolverTrace"]
