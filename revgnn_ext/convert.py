"""revgnn_ext.convert: swap the PyG modules of an existing model for revgnn_ext's drop-ins, in place."""
import dataclasses
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

__all__ = ["ConversionReport", "Left", "Replaced", "convert"]

# The instance state every torch.nn.Module has (parameters, buffers, submodules, hooks, mode).
_MODULE_STATE = frozenset(vars(torch.nn.Module()))


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


def _take_over(old: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """`new` takes over `old`'s instance state: the same parameter, buffer and submodule objects
    (an optimizer or hook holding them stays valid; device, dtype and requires_grad come along),
    hooks, training flag and attributes. PyG's ``inspector`` is bound to the class, so `new`
    keeps the one its own constructor built."""
    new.__dict__.update((k, v) for k, v in vars(old).items() if k != "inspector")
    return new


def convert(model: torch.nn.Module) -> ConversionReport:
    """Replaces, in place, every ``torch_geometric.nn.GENConv``, ``SAGEConv`` and ``GroupAddRev``
    inside `model` (at any depth: ModuleList, ModuleDict, Sequential, PyG's DeepGCNLayer, a
    GroupAddRev's ``convs``) by its drop-in from :mod:`revgnn_ext.nn`. The new module takes over
    the old one's parameters, buffers and submodules themselves, so outputs, gradients, device,
    dtype, training mode and an optimizer built before the conversion are unchanged. A module
    shared by several places becomes one new module shared by the same places.

    Left as they are, and listed in the report's ``left``: subclasses of those PyG classes (their
    own ``forward`` may differ), layers with ``flow="target_to_source"`` or with PyG
    propagate/message/aggregate hooks registered (the fused computation does not run them), and
    every other PyG ``MessagePassing`` layer. Modules of revgnn_ext are skipped, so converting
    twice replaces nothing the second time. A replaced layer whose aggregation the kernels do
    not fuse still runs, on PyG's computation; the report names it in ``unfused``.

    Returns a :class:`ConversionReport`; ``print(report)`` gives a summary.
    """
    from torch_geometric import nn as pyg_nn
    from torch_geometric.nn.conv import MessagePassing

    from . import nn as ours
    from .nn.sage_conv import _REDUCES

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    # Each runs our class's constructor (PyG's per-class setup) with arguments it accepts;
    # _take_over then gives the new module the old one's state.
    builders: Dict[type, Callable[[torch.nn.Module], torch.nn.Module]] = {
        pyg_nn.GENConv: lambda m: ours.GENConv(m.in_channels, m.out_channels, aggr=m.aggr_module),
        pyg_nn.SAGEConv: lambda m: ours.SAGEConv(m.in_channels, m.out_channels, aggr=m.aggr_module),
        pyg_nn.GroupAddRev: lambda m: ours.GroupAddRev(m.convs),
    }
    if type(model) in builders:
        raise ValueError(f"convert: model is itself a {_type_name(type(model))}, which cannot be replaced in "
                         f"place; pass a model that contains it, or build revgnn_ext.nn.{type(model).__name__}")
    report = ConversionReport()

    def unfused(new: torch.nn.Module) -> Optional[str]:
        if isinstance(new, ours.GENConv):
            fused = new._fused_aggregation() is not None  # warns once, as the module's forward would
        elif isinstance(new, ours.SAGEConv):
            fused = type(new.aggr_module) in _REDUCES
        else:
            return None
        return None if fused else f"aggregation {' '.join(repr(new.aggr_module).split())} is not fused"

    def reason_to_leave(module: torch.nn.Module) -> Optional[str]:
        if isinstance(module, (ours.GENConv, ours.SAGEConv, ours.GroupAddRev)):
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
        hooks = sorted(k for k, v in vars(module).items() if k.endswith("_hooks") and v and k not in _MODULE_STATE)
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
                    done[child] = _take_over(child, builders[type(child)](child))
                    report.replaced.append(Replaced(qualified, type(child), type(done[child]), unfused(done[child])))
                else:
                    done[child] = child
                walk(done[child], qualified + ".")
            if done[child] is not child:
                setattr(parent, name, done[child])

    walk(model, "")
    return report
