"""revgnn_ext.convert: swap the PyG modules of an existing model for revgnn_ext's drop-ins, in place."""
import dataclasses
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

__all__ = ["ConversionReport", "Left", "Replaced", "convert"]

# The hook tables every torch.nn.Module keeps (forward, backward and state_dict hooks).
_MODULE_HOOKS = tuple(name for name in vars(torch.nn.Module()) if "hook" in name)


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class Replaced(NamedTuple):
    name: str  # qualified name in the model (the first one, for a module shared by several)
    old: type
    new: type
    unfused: Optional[str] = None  # why the new module runs PyG's unfused computation, if it does


class Left(NamedTuple):
    name: str
    type: type
    reason: str


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` replaced and which message-passing modules it left as they were."""
    replaced: List[Replaced] = dataclasses.field(default_factory=list)
    left: List[Left] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"revgnn_ext.convert: {len(self.replaced)} replaced, {len(self.left)} left"]
        for r in self.replaced:
            note = f" (unfused: {r.unfused})" if r.unfused else ""
            lines.append(f"  replaced {r.name}: {_type_name(r.old)} -> {_type_name(r.new)}{note}")
        for r in self.left:
            lines.append(f"  left     {r.name}: {_type_name(r.type)}: {r.reason}")
        return "\n".join(lines)


def _take_place(old: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """`new`, built by its constructor, takes `old`'s place: it gets old's submodules, parameters
    and buffers themselves (an optimizer or hook holding them stays valid; device, dtype and
    requires_grad come along), its training flag and its hooks."""
    for name, _ in list(new.named_children()):
        delattr(new, name)
    for name, child in old.named_children():
        setattr(new, name, child)
    for name, param in old.named_parameters(recurse=False):
        new.register_parameter(name, param)
    buffers = dict(old.named_buffers(recurse=False))
    if buffers:
        persistent = old.state_dict(keep_vars=True)
        for name, buffer in buffers.items():
            new.register_buffer(name, buffer, persistent=name in persistent)
    new.training = old.training
    # PyTorch has no public API to list a module's hooks, and the handle a user holds removes a
    # hook from the very table it was registered in: new shares old's tables.
    for name in _MODULE_HOOKS:
        setattr(new, name, getattr(old, name))
    return new


def _conv(cls: type, old: torch.nn.Module, **args) -> torch.nn.Module:
    """Our drop-in `cls` for the PyG conv `old`, built from old's public attributes on the meta
    device with a stand-in aggregation (nothing allocated or drawn, and old's aggregation, which
    SAGEConv's constructor would reset, left as it is), then given old's own submodules by
    _take_place; ``aggr`` and ``fuse`` are copied as PyG's constructor derived them."""
    with torch.device("meta"):
        new = cls(old.in_channels, old.out_channels, aggr="sum", flow=old.flow,
                  decomposed_layers=old.decomposed_layers, **args)
    new.aggr, new.fuse, new.node_dim = old.aggr, old.fuse, old.node_dim  # GATConv sets node_dim itself
    return _take_place(old, new)


def convert(model: torch.nn.Module) -> ConversionReport:
    """Replaces, in place, every ``torch_geometric.nn.GENConv``, ``SAGEConv``, ``GCNConv``,
    ``GATConv`` and ``GroupAddRev`` inside `model` (at any depth: ModuleList, ModuleDict,
    Sequential, PyG's DeepGCNLayer, a GroupAddRev's ``convs``) by its drop-in from
    :mod:`revgnn_ext.nn`, built with the old one's arguments. The new module takes over the old one's submodules, parameters and buffers
    themselves, its hooks and its training flag, so outputs, gradients, device, dtype, training
    mode and an optimizer built before the conversion are unchanged. A module shared by several
    places becomes one new module shared by the same places.

    Left as they are, and listed in the report's ``left``: subclasses of those PyG classes (their
    own ``forward`` may differ), layers with ``flow="target_to_source"``, in explain mode or with
    PyG propagate/message/aggregate hooks registered (the fused computation does not run them),
    and every other PyG ``MessagePassing`` layer. Modules of revgnn_ext are skipped, so converting
    twice replaces nothing the second time. A replaced layer whose aggregation the kernels do
    not fuse still runs, on PyG's computation; the report names it in ``unfused``.

    Returns a :class:`ConversionReport`; ``print(report)`` gives a summary.
    """
    from torch_geometric import nn as pyg_nn
    from torch_geometric.nn.conv import MessagePassing

    from . import nn as ours
    from .nn._pyg import propagate_hooks

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    builders: Dict[type, Callable[[torch.nn.Module], torch.nn.Module]] = {
        pyg_nn.GENConv: lambda m: _conv(ours.GENConv, m, eps=m.eps),
        pyg_nn.SAGEConv: lambda m: _conv(ours.SAGEConv, m, normalize=m.normalize, root_weight=m.root_weight,
                                         project=m.project),
        pyg_nn.GCNConv: lambda m: _conv(ours.GCNConv, m, improved=m.improved, cached=m.cached,
                                        add_self_loops=m.add_self_loops, normalize=m.normalize,
                                        bias=m.bias is not None),
        pyg_nn.GATConv: lambda m: _conv(ours.GATConv, m, heads=m.heads, concat=m.concat,
                                        negative_slope=m.negative_slope, dropout=m.dropout,
                                        add_self_loops=m.add_self_loops, edge_dim=m.edge_dim,
                                        fill_value=m.fill_value, bias=m.bias is not None, residual=m.residual),
        pyg_nn.GroupAddRev: lambda m: _take_place(m, ours.GroupAddRev(
            m.convs, split_dim=m.split_dim, disable=m.disable, num_bwd_passes=m.num_bwd_passes)),
    }
    if type(model) in builders:
        raise ValueError(f"convert: model is itself a {_type_name(type(model))}, which cannot be replaced in "
                         f"place; pass a model that contains it, or build revgnn_ext.nn.{type(model).__name__}")
    report = ConversionReport()

    def unfused(new: torch.nn.Module) -> Optional[str]:
        if isinstance(new, ours.GroupAddRev) or new._fused_aggregation() is not None:  # warns, as its forward would
            return None
        return f"aggregation {' '.join(repr(new.aggr_module).split())} is not fused"

    def reason_to_leave(module: torch.nn.Module) -> Optional[str]:
        if isinstance(module, (ours.GENConv, ours.SAGEConv, ours.GCNConv, ours.GATConv, ours.GroupAddRev)):
            return None
        base = next((cls for cls in builders if isinstance(module, cls)), None)
        if base is not None and type(module) is not base:
            return f"a subclass of {_type_name(base)}; its forward may differ"
        if not isinstance(module, MessagePassing):
            return None
        if base is None:
            return "not accelerated by revgnn_ext"
        if module.flow != "source_to_target":
            return f"flow={module.flow!r} is not supported"
        if module.explain:
            return "in explain mode (an explainer's edge masks are set); convert the model before explaining it"
        hooks = propagate_hooks(module)
        if hooks:
            return f"has PyG hooks registered ({', '.join(hooks)}), which the fused computation does not run"
        return None

    # Each module met -> the module that stands in its place (keys keep the old modules alive).
    done: Dict[torch.nn.Module, torch.nn.Module] = {}

    def walk(parent: torch.nn.Module, prefix: str) -> None:
        # Through _modules rather than named_children(), which skips repeats of a shared module.
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if child not in done:
                qualified = prefix + name
                reason = reason_to_leave(child)
                if reason is not None:
                    report.left.append(Left(qualified, type(child), reason))
                    done[child] = child
                elif type(child) in builders:
                    done[child] = builders[type(child)](child)
                    report.replaced.append(Replaced(qualified, type(child), type(done[child]), unfused(done[child])))
                else:
                    done[child] = child
                walk(done[child], qualified + ".")
            if done[child] is not child:
                setattr(parent, name, done[child])

    walk(model, "")
    return report
