"""Grouped reversible block (RevGNN) whose backward evaluates each group's function once."""
import contextlib
import functools
import inspect
import threading
import warnings
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _C, ops
from ..adjacency import adjacency_tensors
from .grouped import GroupedBlock, autocast_state, rng_state, set_rng_state, statistics_frozen

__all__ = ["GroupAddRev"]


# The random generators are global, so recordings and replays of F's draws are serialized, and a
# thread's pending replays make another thread's recording refuse (docs/design.md §2).
_RNG_LOCK = threading.RLock()
_PENDING_DRAWS: dict = {}  # thread id -> number of its blocks whose F drew, backward pending


class _PendingDraws:
    """Counts one block of this thread whose F drew, until backward drops it (or its graph goes)."""

    def __init__(self):
        self.thread = None
        thread = threading.get_ident()
        with _RNG_LOCK:
            alive = {t.ident for t in threading.enumerate()}
            others = [t for t, n in _PENDING_DRAWS.items() if n and t != thread and t in alive]
            if others:
                raise RuntimeError(
                    "GroupAddRev: F drew random numbers (e.g. dropout inside F) while another thread has reversible "
                    "blocks whose F drew and whose backward has not run yet. The recomputation in backward replays "
                    "F's draws from the global random generators, which threads share, so the model cannot be "
                    "trained from several threads at once: train it from one thread, or draw the masks outside F "
                    "and pass them as arguments (as RevGNN's SharedDropout does).")
            _PENDING_DRAWS[thread] = _PENDING_DRAWS.get(thread, 0) + 1
            self.thread = thread

    def __del__(self):
        if self.thread is not None:
            with _RNG_LOCK:
                _PENDING_DRAWS[self.thread] -= 1


def _fingerprint(state) -> Tuple[int, Optional[int]]:
    return tuple(None if t is None else hash(t.numpy().tobytes()) for t in state)


class _RngState:
    """The generator states before a group's function, replayed by its recomputation, and a
    fingerprint of those after it: a replay that drew other numbers raises."""

    def __init__(self, device: torch.device):
        self.device = device
        self.before = rng_state(device)
        self.after = None

    def drawn(self) -> bool:
        """Whether any random number was drawn since (then records the fingerprint of the states
        now); if not, the caller drops this state."""
        now = rng_state(self.device)
        drawn = any(a is not None and not torch.equal(a, b) for a, b in zip(now, self.before))
        if drawn:
            self.after = _fingerprint(now)
        return drawn

    @contextlib.contextmanager
    def replay(self):
        with _RNG_LOCK, torch.random.fork_rng(devices=[self.device] if self.before[1] is not None else []):
            set_rng_state(self.before, self.device)
            start = _fingerprint(rng_state(self.device))
            yield
            end = _fingerprint(rng_state(self.device))
            if end != start and end != self.after:
                raise RuntimeError(
                    "GroupAddRev: the recomputation of F in backward drew other random numbers than its forward "
                    "(another thread drew from the global random generators while this block's F ran). Random "
                    "draws inside F cannot be replayed when the model runs in several threads at once: run it from "
                    "one thread, or draw the masks outside F and pass them as arguments (as RevGNN's SharedDropout "
                    "does).")


def _replay(states: Sequence[Optional[_RngState]], i: int):
    """Replays the draws of group i's function (states empty, or its entry None: nothing drawn)."""
    state = states[i] if states else None
    return contextlib.nullcontext() if state is None else state.replay()


class _Released(torch.Tensor):
    """The class of a tensor whose memory GroupAddRev holds: a read of its data raises
    `message`; autograd calls that take it as an input work."""

    message = ""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in _NOT_READS:
            raise RuntimeError(cls.message)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class _ReleasedInput(_Released):
    message = ("GroupAddRev: this tensor is the input of a reversible block, which released its memory until "
               "backward (backward rebuilds it from the block's output). Read it before the block runs, or give the "
               "block a copy (block(x.clone(), ...)) or construct the block with disable=True.")


class _SpentOutput(_Released):
    message = ("GroupAddRev: this tensor is the output of a reversible block after its last backward pass: its "
               "memory now holds the block's input. Read the output before backward (or copy it), or run the "
               "earlier backward passes with retain_graph=True (or raise num_bwd_passes).")


_NOT_READS = {torch.autograd.grad, torch.autograd.backward, Tensor.untyped_storage, Tensor.__hash__,
              *(getattr(Tensor, name).__get__ for name in ("grad", "grad_fn", "requires_grad", "is_leaf"))}


def _release(t: Tensor, kind: type) -> None:
    """Frees t's memory (its version counter is left as it is) and makes every later use raise."""
    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    t.__class__ = kind


def _restore(t: Tensor, cls: type, data: Tensor) -> None:
    """Undoes _release: t becomes a tensor of class cls over data's memory."""
    t.__class__ = cls
    t.data = data


_KEEP_INPUTS = threading.local()  # depth > 0: inside a plain block's F, whose inputs the block reads again
_SOLE = None  # ownership() of a tensor held by its Python object alone (measured once)
_warned_kept = False


def _releasable(x: Tensor) -> bool:
    """Whether the block may release x until backward: an activation (not a user's leaf) over
    its whole storage that nothing else holds (a saved tensor, a view); else kept, warned once."""
    global _SOLE, _warned_kept
    if x.grad_fn is None or type(x) is not torch.Tensor or getattr(_KEEP_INPUTS, "depth", 0):
        return False
    if _SOLE is None:
        _SOLE = _C.ownership(torch.empty(1))
    owners = _C.ownership(x)
    if owners == _SOLE:
        return True
    if owners[2] and not _warned_kept:  # a whole-storage activation that something else holds
        _warned_kept = True
        warnings.warn("GroupAddRev: a block's input is also held by another operation (saved for its backward, e.g. "
                      "by a ReLU or a Linear that read it, or a view of it), so the block keeps it until backward "
                      "instead of releasing it: memory grows by one input per such block. Feed the block a tensor "
                      "that nothing else uses to get the memory saving. (Warned once.)", stacklevel=4)
    return False


_X = 5  # the position of x among _GroupAddRevFunction's inputs; its arguments, then parameters follow


def _graph_tensors(values: Sequence[Any]) -> Tuple[Tensor, ...]:
    """The tensors behind F's arguments (adjacencies' index and value tensors included, inside
    tuples and lists too), whose edits change F's recomputation; inference tensors, which have
    no version counter, left out."""
    tensors = []
    for value in values:
        if isinstance(value, (tuple, list)):
            tensors.extend(_graph_tensors(value))
        else:
            tensors.extend(t for t in adjacency_tensors(value) if not t.is_inference())
    return tuple(tensors)


def _version(ctx) -> int:
    """The sum of the version counters of what backward reads as it was in forward: parameters,
    graph and argument tensors, and the input unless released."""
    kept = (ctx.x,) if ctx.x_class is None else ()
    return sum(t._version for t in (*ctx.params, *ctx.graph_tensors, *kept))


class _GroupAddRevFunction(torch.autograd.Function):
    """y = block(x). x (see _releasable) is released after the forward; backward rebuilds it
    in y's storage and gives it back. The block's parameters are inputs after the arguments."""

    @staticmethod
    def forward(ctx, block: "GroupAddRev", edge_index, structure, num_args: int, release: bool, x: Tensor, *rest):
        args, params = rest[:num_args], rest[num_args:]
        ctx.block, ctx.edge_index, ctx.args, ctx.params = block, edge_index, args, params
        ctx.slots, ctx.modules = structure
        ctx.graph_tensors = _graph_tensors((edge_index, *args))
        ctx.passes_left = block.num_bwd_passes
        ctx.autocast = autocast_state(x.device.type)  # backward recomputes F in the forward's precision
        with torch.no_grad(), _RNG_LOCK:
            y, ctx.rng = block._forward_groups(x.detach(), edge_index, args, rng=None)
            ctx.pending = _PendingDraws() if ctx.rng else None
        ctx.x, ctx.y = x, y
        ctx.x_class = type(x) if release else None  # x's class while it is released, else None
        if release:
            _release(x, _ReleasedInput)
        ctx.version = _version(ctx)
        ctx.y_version = y._version
        return y

    @staticmethod
    def _check_unchanged(ctx) -> None:
        """Raises, as plain autograd does, when a tensor backward needs was modified in place."""
        if ctx.y._version != ctx.y_version:
            raise RuntimeError("GroupAddRev: the block's output was modified in place before backward (e.g. by "
                               "ReLU(inplace=True) or y.mul_(...) after the block); backward rebuilds the block's "
                               "input from its output, so its gradients would be wrong. Use the out-of-place op "
                               "(torch.relu(y), y * mask) on a reversible block's output.")
        if _version(ctx) != ctx.version:
            raise RuntimeError("GroupAddRev: a parameter, the graph (edge_index), a tensor argument or the kept input "
                               "of the block was modified in place between the block's forward and its backward (e.g. "
                               "optimizer.step() before loss.backward(), or an edge_index buffer refilled for the next "
                               "batch); the gradients would be wrong. Run backward before modifying them.")
        for p, need in zip(ctx.params, ctx.needs_input_grad[_X + 1 + len(ctx.args):]):
            if need and not p.requires_grad:
                raise RuntimeError("GroupAddRev: a parameter of the block stopped requiring grad between forward and "
                                   "backward")

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        if ctx.passes_left == 0:
            raise RuntimeError("GroupAddRev: backward ran more often than num_bwd_passes allows; raise "
                               "num_bwd_passes")
        try:
            return _GroupAddRevFunction._backward(ctx, grad_y)
        except BaseException:
            ctx.pending = None  # a failed backward leaves no pending draws behind
            raise

    @staticmethod
    def _backward(ctx, grad_y: Tensor):
        block = ctx.block
        _GroupAddRevFunction._check_unchanged(ctx)
        # A pass that keeps autograd's graph (retain_graph=True) leaves the block ready for another.
        ctx.passes_left = max(ctx.passes_left - 1, 1 if _graph_retained() else 0)
        x, y = ctx.x, ctx.y
        num_args = len(ctx.args)
        # Each group's parameters that need a gradient; a shared one in each group.
        needed = {id(p) for p, need in zip(ctx.params, ctx.needs_input_grad[_X + 1 + num_args:]) if need}
        trainable = [list({id(p): p for _, _, p in group if id(p) in needed}.values()) for group in ctx.slots]
        device_type, enabled, dtype, cache = ctx.autocast
        with _parameters_of_forward(ctx.slots), torch.autocast(device_type, dtype, enabled, cache), \
                statistics_frozen(ctx.modules):
            if ctx.x_class is None:  # x is intact (not released, or a later pass): recompute y
                with torch.no_grad():
                    y, _ = block._forward_groups(x.detach(), ctx.edge_index, ctx.args, rng=ctx.rng)
            elif ctx.passes_left > 0:  # y stays as it is for the passes still to come
                y = y.detach().clone()
            grad_x, grad_args, grad_trainable = block._backward_groups(
                y, grad_y, ctx.edge_index, ctx.args, trainable, ctx.rng)
        if ctx.x_class is not None:  # y's storage now holds x: hand it over
            _restore(x, ctx.x_class, y.detach())
            ctx.x_class = None
            ctx.version = _version(ctx)  # now with x's
        if ctx.passes_left == 0:
            # The output's storage now holds the input: a read of the output fails loudly instead
            # of seeing the input's values.
            if y is ctx.y:
                _release(ctx.y, _SpentOutput)
            ctx.y = ctx.x = ctx.pending = None
        grad_params = [grad_trainable.get(id(p)) for p in ctx.params]
        return (None,) * _X + (grad_x, *grad_args, *grad_params)


def _graph_retained() -> bool:
    """Whether the running backward pass keeps autograd's graph (retain_graph / create_graph);
    where PyTorch lacks the engine's flag, every pass counts against num_bwd_passes."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and keep_graph()


@contextlib.contextmanager
def _parameters_of_forward(slots: Sequence[Sequence[Tuple[torch.nn.Module, str, Tensor]]]):
    """Each module holds the parameters it ran with in forward (torch.func.functional_call's, which
    has returned since) while backward recomputes."""
    swapped = []
    try:
        for group in slots:
            for module, name, p in group:
                own = module._parameters[name]
                if own is not p:
                    swapped.append((module, name, own))
                    module._parameters[name] = p
        yield
    finally:
        for module, name, own in reversed(swapped):
            module._parameters[name] = own


def _structure(block: "GroupAddRev"):
    """(per group, the (module, name, parameter) of each parameter of F_i; F's modules)."""
    modules = [list(conv.modules()) for conv in block.convs]
    slots = [[(m, name, p) for m in group for name, p in m._parameters.items() if p is not None]
             for group in modules]
    return slots, [m for group in modules for m in group]


class GroupAddRev(GroupedBlock):
    r"""A drop-in for ``torch_geometric.nn.GroupAddRev``, the grouped reversible block of
    RevGNN: X'_0 = sum_{i>=2} X_i, X'_i = F_i(X'_{i-1}) + X_i; only the output is kept and
    backward rebuilds the input (docs/design.md §2). PyG's arguments, ``convs`` layout,
    argument splitting, ``inverse()`` and ``reset_parameters()``; unlike PyG's:

    - backward evaluates each F_i once, rebuilding the input in place in the output's storage;
      an F_i that takes ``out`` (our GATConv, GCNConv) is added into its group's slice without
      autograd through the op's accumulate form;
    - random draws inside F, the autocast state and BatchNorm statistics are replayed or kept, so
      the recomputation is F of the forward (statistics move once per step);
    - no bookkeeping under ``torch.no_grad()`` / ``inference_mode``; forward-mode AD, torch.func
      and ``torch.export`` run the plain computation;
    - the input is released only when nothing else holds it (else kept, with a warning); reading a
      released input, or the output after its last backward, raises;
    - an in-place edit of the output, a parameter, the graph or an argument between forward and
      backward raises, as plain autograd does; ``retain_graph=True`` keeps the block ready for
      another pass (``num_bwd_passes`` counts the passes that do not retain it);
    - under ``torch.compile`` the block runs eagerly (one graph break); ``disable=True`` compiles.

    Args:
        conv: F of each group (a ModuleList), or one module copied into ``num_groups`` groups.
        split_dim: the dimension of the channels.
        num_groups: the number of groups when ``conv`` is one module.
        disable: run as a plain (non-reversible) block.
        num_bwd_passes: how many backward passes that free autograd's graph may run.
    """


    def __init__(self, conv: Union[torch.nn.Module, torch.nn.ModuleList], split_dim: int = -1,
                 num_groups: Optional[int] = None, disable: bool = False, num_bwd_passes: int = 1):
        super().__init__(conv, split_dim, num_groups)
        self.disable = disable
        self.num_bwd_passes = num_bwd_passes
        if len(self.convs) < 2:
            raise ValueError(f"GroupAddRev: the number of groups must be at least 2, got {len(self.convs)}")
        if num_bwd_passes < 1:
            raise ValueError(f"GroupAddRev: num_bwd_passes must be >= 1, got {num_bwd_passes}")

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.convs[0]}, num_groups={self.num_groups})"

    def _add_into(self, out: Tensor, i: int, inp: Tensor, edge_index, args) -> None:
        """out += F_i(inp) in place, without autograd; through F_i's own ``out`` where it takes one."""
        conv = self.convs[i]
        if inp.dim() == 2 and self.split_dim in (-1, 1) and _takes_out(type(conv)):
            conv(inp, edge_index, *args, out=out)
        else:
            out.add_(conv(inp, edge_index, *args))

    def _subtract(self, ys: Sequence[Tensor], i: int, f: Tensor) -> Optional[Tensor]:
        """X_i = X'_i - F_i in place in slice i; after X_1 of 3+ groups returns X'_0, F_0's input."""
        if f.untyped_storage().data_ptr() == ys[i].untyped_storage().data_ptr():  # F returned a view of y
            f = f.clone()
        ys[i].sub_(f)
        return functools.reduce(torch.add, ys[1:]) if i == 1 and self.num_groups > 2 else None

    def _forward_groups(self, x: Tensor, edge_index, args, rng=None):
        """y = [X'_1 .. X'_C] in one new buffer, and the RNG states before the F_i that drew (()
        if none did): recorded when `rng` is None, else replayed from it."""
        xs, group_args = self.split(x, args)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # row-major, whatever x's layout
        ys = torch.chunk(y, self.num_groups, dim=self.split_dim)
        states = []
        inp = functools.reduce(torch.add, xs[1:])  # X'_0; for 2 groups X_1 itself
        for i in range(self.num_groups):
            if rng is None:  # first evaluation: draw as usual, remember where any draws started
                state = _RngState(x.device)
                self._add_into(ys[i].copy_(xs[i]), i, inp, edge_index, group_args[i])
                states.append(state if state.drawn() else None)
            else:
                with _replay(rng, i):
                    self._add_into(ys[i].copy_(xs[i]), i, inp, edge_index, group_args[i])
            inp = ys[i]
        return y, ((states if any(states) else ()) if rng is None else rng)

    def _backward_groups(self, y: Tensor, grad_y: Tensor, edge_index, args, params, rng):
        """One evaluation of each F_i, with grad, for C down to 1: back-propagate through it,
        then rebuild X_i = X'_i - F_i in place in y's storage. ``params[i]``: group i's parameters
        that need a gradient. Returns (grad_x, grads of args, {id(parameter): its gradient})."""
        num_groups = self.num_groups
        ys = torch.chunk(y, num_groups, dim=self.split_dim)
        grad_x = grad_y.clone(memory_format=torch.contiguous_format)  # the groups' gradients, summed in place
        gxs = torch.chunk(grad_x, num_groups, dim=self.split_dim)
        leaves = [a.detach().requires_grad_() if isinstance(a, Tensor) and a.requires_grad else a for a in args]
        leaf_tensors = [a for a in leaves if isinstance(a, Tensor) and a.requires_grad]
        group_args = self.split(y, leaves)[1]
        grads_of = {}
        x0 = None
        for i in range(num_groups - 1, -1, -1):
            # F_i's input: X'_{i-1}; for i = 0, X'_0, formed when X_1 was rebuilt (for 2 groups X_1 itself)
            inp = (ys[i - 1] if i > 0 else ys[1] if x0 is None else x0).detach().requires_grad_()
            wrt = [inp, *leaf_tensors, *params[i]]
            with torch.enable_grad(), _replay(rng, i):
                f = self.convs[i](inp, edge_index, *group_args[i])
            grads = torch.autograd.grad(f, wrt, gxs[i], allow_unused=True)
            with torch.no_grad():
                x0 = self._subtract(ys, i, f.detach())
                for t, g in zip(wrt[1:], grads[1:]):
                    if g is not None:
                        total = grads_of.get(id(t))
                        grads_of[id(t)] = g if total is None else total + g
                if grads[0] is not None:
                    for j in (i - 1,) if i > 0 else range(1, num_groups):
                        gxs[j].add_(grads[0])
        grad_args = [grads_of.get(id(a)) if isinstance(a, Tensor) and a.requires_grad else None for a in leaves]
        return grad_x, grad_args, grads_of

    def forward(self, x: Tensor, edge_index, *args) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"GroupAddRev: x must be a tensor, got {type(x).__name__}")
        if torch.jit.is_tracing():
            raise RuntimeError("GroupAddRev: torch.jit.trace cannot record a reversible block's backward (it runs in "
                               "Python); trace the model with disable=True on its GroupAddRev blocks (the same "
                               "outputs and gradients with plain autograd), or use torch.compile")
        # Forward-mode AD: the plain computation, which autograd differentiates in both modes;
        # torch.export: the plain computation, the same function for the exported program.
        if (self.disable or not torch.is_grad_enabled() or ops.forward_ad_tracks((x, *args))
                or torch.compiler.is_exporting()):
            return self._plain(x, edge_index, args)
        return self._reversible(x, edge_index, args)

    @torch.compiler.disable  # the inversion needs F of the forward bit for bit (docs/design.md §2)
    def _reversible(self, x: Tensor, edge_index, args) -> Tensor:
        structure = _structure(self)
        params = {id(p): p for group in structure[0] for _, _, p in group}.values()
        try:
            return _GroupAddRevFunction.apply(self, edge_index, structure, len(args), _releasable(x), x, *args,
                                              *params)
        except RuntimeError as err:  # torch.func.grad / vmap / jvp: the plain computation, which they transform
            if not ops.refused_by_functorch(err):
                raise
        return self._plain(x, edge_index, args)

    def _plain(self, x: Tensor, edge_index, args) -> Tensor:
        xs, group_args = self.split(x, args)
        ys = []
        inp = functools.reduce(torch.add, xs[1:])
        _KEEP_INPUTS.depth = getattr(_KEEP_INPUTS, "depth", 0) + 1  # a nested block must not release ys[i]
        try:
            for i, conv in enumerate(self.convs):
                if torch.is_grad_enabled():
                    inp = xs[i] + conv(inp, edge_index, *group_args[i])
                else:
                    out = xs[i].clone(memory_format=torch.contiguous_format)
                    self._add_into(out, i, inp, edge_index, group_args[i])
                    inp = out
                ys.append(inp)
        finally:
            _KEEP_INPUTS.depth -= 1
        return torch.cat(ys, dim=self.split_dim)

    def inverse(self, y: Tensor, edge_index, *args) -> Tensor:
        """The block's input from its output (no autograd).

        Args:
            y: the block's output.
            edge_index: the graph the block ran on.
            *args: the further arguments the block ran with.
        """
        with torch.no_grad():
            ys, group_args = self.split(y, args)
            x = y.clone()
            xs = torch.chunk(x, self.num_groups, dim=self.split_dim)
            x0 = None
            for i in range(self.num_groups - 1, -1, -1):  # the arithmetic of backward's rebuild
                inp = ys[i - 1] if i > 0 else (xs[1] if x0 is None else x0)
                x0 = self._subtract(xs, i, self.convs[i](inp, edge_index, *group_args[i]))
            return x


@functools.lru_cache(maxsize=None)
def _takes_out(conv_type: type) -> bool:
    """Whether a module's forward takes ``out``, a tensor to add its output into in place."""
    return "out" in inspect.signature(conv_type.forward).parameters
