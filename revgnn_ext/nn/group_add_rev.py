"""Grouped reversible block (RevGNN) whose backward evaluates each group's function once."""
import contextlib
import copy
import functools
import weakref
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _C, ops

__all__ = ["GroupAddRev"]


def _batch_norms(module: torch.nn.Module) -> List[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]


class _RngState:
    """The CPU and (if used) CUDA generator states before a group's function, so that its
    recomputation in backward draws the same random numbers (dropout, edge dropping)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def drawn(self) -> bool:
        """Whether any random number was drawn since: if not, the state need not be kept (the
        CPU state is 5 KB, per group and layer, which would otherwise grow with depth)."""
        return not torch.equal(torch.get_rng_state(), self.cpu) or (
            self.cuda is not None and not torch.equal(torch.cuda.get_rng_state(self.device), self.cuda))

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _replay(states: Sequence[Optional[_RngState]], i: int):
    """Replays the draws of group i's function (states empty, or its entry None: nothing drawn)."""
    state = states[i] if states else None
    return contextlib.nullcontext() if state is None else state.replay()


@contextlib.contextmanager
def _statistics_frozen(module: torch.nn.Module):
    """BatchNorm running statistics stay as they are (the recomputation must not move them a
    second time in one step)."""
    norms = _batch_norms(module)
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, v in m.named_buffers(recurse=False):
                    v.copy_(buffers[k])


def _releasable(x: Tensor) -> bool:
    """Whether the block may release x until backward: an activation computed inside the model
    (a user's leaf tensor is left alone) that is the only view of its storage."""
    return (x.grad_fn is not None and x.is_contiguous() and x.storage_offset() == 0
            and x.untyped_storage().nbytes() == x.numel() * x.element_size())


class _Gather(torch.autograd.Function):
    """params -> a token: an [n] tensor over one zero (no storage of its own), whose gradient is
    the n values of the params' gradients, flattened and concatenated, which backward splits. The
    block's backward names the parameters that got no gradient (`unused`: F did not use them),
    which get none here either, as under plain autograd."""

    @staticmethod
    def forward(ctx, *params: Tensor) -> Tensor:
        ctx.shapes = [p.shape for p in params]
        ctx.unused = ()
        ctx.set_materialize_grads(False)
        return params[0].new_zeros(()).expand(sum(p.numel() for p in params))

    @staticmethod
    def backward(ctx, flat: Optional[Tensor]):
        if flat is None:
            return (None,) * len(ctx.shapes)
        grads = [g.view(shape) for g, shape in zip(flat.split([s.numel() for s in ctx.shapes]), ctx.shapes)]
        for i in ctx.unused:
            grads[i] = None
        return tuple(grads)


def _layout(params: Sequence[Tensor]) -> Tuple[Any, ...]:
    return tuple((p.device, p.dtype, p.shape) for p in params)


class _Parameters:
    """A block's trainable parameters as autograd inputs of the block's function: one token (see
    _Gather) per (device, dtype) instead of one input per parameter. Each input of an autograd
    node costs about 100 bytes until backward (its edge and recorded shape): 2.3 KB per block of
    22 parameter tensors, which a 1001-layer model would hold at every step. The tokens' gather
    nodes are made once per parameter set and reused by every step, like autograd's own
    per-parameter gradient accumulators; each forward renews their sequence numbers (`tokens`),
    so that backward runs each of them right after its block (see csrc/revgnn_ext.cpp)."""

    def __init__(self, named: Tuple[Tuple[str, Tensor], ...]):
        self.names = tuple(name for name, _ in named)
        self.params = params = tuple(p for _, p in named)
        self.layout = _layout(params)
        groups = {}
        for k, p in enumerate(params):
            groups.setdefault((p.device, p.dtype), []).append(k)
        self.groups = list(groups.values())
        self._tokens = tuple(_Gather.apply(*(params[k] for k in ks)) for ks in self.groups)

    def tokens(self) -> Tuple[Tensor, ...]:
        """The tokens, their gather nodes renewed as if made now."""
        for token in self._tokens:
            _C.renew_sequence_nr(token)
        return self._tokens

    def matches(self, named: Tuple[Tuple[str, Tensor], ...]) -> bool:
        """Whether these are still the block's parameters: the same tensors, with the same device,
        dtype and shape (`.to()` changes a parameter's data in place, and autograd then gives it
        a new gradient accumulator)."""
        params = tuple(p for _, p in named)
        return (len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))
                and _layout(params) == self.layout)

    def flat_grads(self, grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
        """Per token, its gradient from the parameters' (None where none of them has one); tells
        its gather node which parameters have none."""
        out = []
        for ks, token in zip(self.groups, self._tokens):
            token.grad_fn.unused = unused = tuple(i for i, k in enumerate(ks) if grads[k] is None)
            if len(unused) == len(ks):
                out.append(None)
                continue
            out.append(torch.cat([(grads[k] if grads[k] is not None else torch.zeros_like(self.params[k])).reshape(-1)
                                  for k in ks]))
        return out


# block -> its _Parameters, made again when the block's trainable parameters are other tensors.
# Outside the module so that deepcopy and pickling of a block do not meet the (non-leaf) tokens.
_PARAMETERS: "weakref.WeakKeyDictionary[torch.nn.Module, _Parameters]" = weakref.WeakKeyDictionary()


def _parameters(block: "GroupAddRev") -> _Parameters:
    """The block's trainable parameters (none at all: no tokens)."""
    named = tuple((name, p) for name, p in block.named_parameters() if p.requires_grad)
    cached = _PARAMETERS.get(block)
    if cached is not None and cached.matches(named):
        return cached
    made = _Parameters(named)
    if all(isinstance(p, torch.nn.Parameter) and p.is_leaf for _, p in named):
        _PARAMETERS[block] = made  # a non-leaf (functional_call) belongs to this call's graph only
    return made


@contextlib.contextmanager
def _parameters_of_forward(block: torch.nn.Module, params: _Parameters):
    """The block holds the tensors it ran with in forward while backward recomputes; they differ
    from its own when forward ran under torch.func.functional_call, which has returned since."""
    current = dict(block.named_parameters())
    swapped = []
    try:
        for name, p in zip(params.names, params.params):
            if current.get(name) is not p:
                module_name, _, attr = name.rpartition(".")
                module = block.get_submodule(module_name)
                swapped.append((module, attr, module._parameters[attr]))
                module._parameters[attr] = p
        yield
    finally:
        for module, attr, p in reversed(swapped):
            module._parameters[attr] = p


class _GroupAddRevFunction(torch.autograd.Function):
    """y = block(x). x (an activation: see _releasable) is released after the forward: it becomes
    an empty tensor, so that a stray read fails with a shape error rather than reading freed
    memory; backward rebuilds it from y, in y's own storage, group by group, and gives it back."""

    @staticmethod
    def forward(ctx, block: "GroupAddRev", edge_index, num_args: int, params: _Parameters, x: Tensor,
                *rest):
        # The context holds as little as it can: a 1001-layer model keeps 1001 of them until
        # backward.
        args = rest[:num_args]
        ctx.block, ctx.edge_index, ctx.args, ctx.params = block, edge_index, args, params
        ctx.passes_left = block.num_bwd_passes
        with torch.no_grad():
            y, ctx.rng = block._forward_groups(x.detach(), edge_index, args, rng=None)
        ctx.x, ctx.y = x, y
        ctx.freed = _releasable(x)
        if ctx.freed:
            x.set_(torch.empty(0, dtype=x.dtype, device=x.device))
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        if ctx.passes_left == 0:
            raise RuntimeError("GroupAddRev: backward ran more often than num_bwd_passes allows; raise "
                               "num_bwd_passes")
        ctx.passes_left -= 1
        block, x, y, params = ctx.block, ctx.x, ctx.y, ctx.params
        if not all(p.requires_grad for p in params.params):
            raise RuntimeError("GroupAddRev: a parameter of the block stopped requiring grad between forward and "
                               "backward")
        with _parameters_of_forward(block, params):
            if x.numel() > 0:  # x is intact (a later pass, or not released): recompute y
                with torch.no_grad(), _statistics_frozen(block):
                    y, _ = block._forward_groups(x.detach(), ctx.edge_index, ctx.args, rng=ctx.rng)
            elif ctx.passes_left > 0:  # y stays as it is for the passes still to come
                y = y.clone()
            grad_x, grad_args, grad_params = block._backward_groups(
                y, grad_y, ctx.edge_index, ctx.args, params.params, ctx.rng)
        if ctx.freed and x.numel() == 0:  # y's storage now holds x: hand it over
            with torch.no_grad():
                x.set_(y.untyped_storage(), y.storage_offset(), y.size(), y.stride())
        if ctx.passes_left == 0:
            # The output's storage now holds the input: leave the output tensor empty, so that a
            # read after the last backward fails loudly instead of seeing the input's values.
            with torch.no_grad():
                ctx.y.set_(torch.empty(0, dtype=y.dtype, device=y.device))
            ctx.y = ctx.x = None
        return (None, None, None, None, grad_x, *grad_args, *params.flat_grads(grad_params))


class GroupAddRev(torch.nn.Module):
    r"""A drop-in for ``torch_geometric.nn.GroupAddRev``: the grouped reversible block of
    RevGNN. Channels are split into C groups, X'_0 = sum_{i>=2} X_i and
    X'_i = F_i(X'_{i-1}) + X_i; only the block's output is kept, and backward rebuilds its input.

    Same arguments, ``convs`` ModuleList (``state_dict`` layout), argument splitting (a tensor
    argument whose size along ``split_dim`` equals the channel count is split across groups,
    anything else is passed whole), ``inverse()`` and ``reset_parameters()``. Differences:

    - backward evaluates each F_i once (it both rebuilds X_i = X'_i - F_i and back-propagates
      through F_i); PyG's evaluates it twice;
    - the input is rebuilt in place in the output's storage (no new [N, D] buffer); where F_i
      ends in a Linear and says so through ``forward_split`` (our GENConv and RevGNN groups),
      the addition X'_i = X_i + F_i and the subtraction that undoes it are folded into that
      product (an in-place addmm into the group's slice), so F_i's output is never formed;
    - random draws inside F (dropout) are replayed in the recomputation from the saved RNG
      state; BatchNorm running statistics are updated once per step, not once per evaluation;
    - under ``torch.no_grad()`` / ``inference_mode`` it runs without any bookkeeping;
    - what a training step keeps per block until backward does not grow with the block's number
      of parameter tensors: they reach autograd through one input per (device, dtype), whose
      gather node is made once and reused by every step (2.3 KB per block in all, 4.6 KB with
      one input per parameter tensor, for the 22 of a 2-group GENConv block).
    """

    def __init__(self, conv: Union[torch.nn.Module, torch.nn.ModuleList], split_dim: int = -1,
                 num_groups: Optional[int] = None, disable: bool = False, num_bwd_passes: int = 1):
        super().__init__()
        self.split_dim = split_dim
        self.disable = disable
        self.num_bwd_passes = num_bwd_passes
        if isinstance(conv, torch.nn.ModuleList):
            self.convs = conv
        else:
            if num_groups is None:
                raise ValueError("GroupAddRev: num_groups is required when conv is a single module")
            self.convs = torch.nn.ModuleList([conv])
            for _ in range(num_groups - 1):
                copy_ = copy.deepcopy(conv)
                if hasattr(copy_, "reset_parameters"):
                    copy_.reset_parameters()
                self.convs.append(copy_)
        if len(self.convs) < 2:
            raise ValueError(f"GroupAddRev: the number of groups must be at least 2, got {len(self.convs)}")
        if num_bwd_passes < 1:
            raise ValueError(f"GroupAddRev: num_bwd_passes must be >= 1, got {num_bwd_passes}")

    @property
    def num_groups(self) -> int:
        return len(self.convs)

    def reset_parameters(self):
        for conv in self.convs:
            conv.reset_parameters()

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.convs[0]}, num_groups={self.num_groups})"

    # ------------------------------------------------------------------ helpers
    def _chunk(self, value: Any, channels: int) -> Sequence[Any]:
        if isinstance(value, Tensor) and value.dim() > 0:
            dim = self.split_dim if self.split_dim >= 0 else value.dim() + self.split_dim
            if 0 <= dim < value.dim() and value.size(dim) == channels:
                return torch.chunk(value, self.num_groups, dim=self.split_dim)
        return [value] * self.num_groups

    def _group_args(self, args: Sequence[Any], channels: int) -> List[Tuple[Any, ...]]:
        split = [self._chunk(a, channels) for a in args]
        return [tuple(s[i] for s in split) for i in range(self.num_groups)]

    def _check(self, x: Tensor) -> int:
        channels = x.size(self.split_dim)
        if channels % self.num_groups != 0:
            raise ValueError(f"GroupAddRev: {channels} channels do not split into {self.num_groups} equal groups")
        return channels

    def _evaluate(self, conv: torch.nn.Module, inp: Tensor, edge_index, group_args) -> Tuple[Tensor, Any]:
        """F_i(inp) as (h, last) with F_i = last(h) when F_i exposes its final Linear through
        ``forward_split(x, edge_index, *args)`` (our GENConv and RevGNN groups do) and the block
        splits the channels of a 2-D tensor; else (F_i(inp), None)."""
        split = getattr(conv, "forward_split", None)
        if split is not None and inp.dim() == 2 and self.split_dim in (-1, 1):
            return split(inp, edge_index, *group_args)
        return conv(inp, edge_index, *group_args), None

    @staticmethod
    def _add(out: Tensor, f: Tensor, last) -> None:
        """out += F_i in place, F_i = last(f) or f. With a final Linear the bias is added, then
        the product goes straight into out's column slice (addmm_): F_i's output is never formed."""
        if last is None:
            out.add_(f)
            return
        if last.bias is not None:
            out.add_(last.bias)
        out.addmm_(f, last.weight.t())

    def _rebuild(self, y: Tensor, ys: Sequence[Tensor], i: int, f: Tensor, last) -> Optional[Tensor]:
        """X_i = Y_i - F_i in place in y's slice i (``_add`` undone: its two steps in reverse
        order, against the same bitwise operands, so each rounding is undone where it was made).
        For i = 1 of more than 2 groups, also returns X'_0 = X_1 + ... + X_{C-1}. A plain F_i's
        output is subtracted by the fused op rev_subtract_, which forms X'_0 in the same pass."""
        total = i == 1 and self.num_groups > 2
        if last is not None:
            y_i = ys[i]
            y_i.addmm_(f, last.weight.t(), alpha=-1.0)
            if last.bias is not None:
                y_i.sub_(last.bias)
        elif y.dim() == 2 and self.split_dim in (-1, 1) and (y.is_cuda or y.dtype in (torch.float32, torch.float64)):
            sum_out = torch.empty_like(ys[i], memory_format=torch.contiguous_format) if total else None
            ops.rev_subtract_(y, f, i, self.num_groups, sum_out)
            return sum_out
        else:
            ys[i].sub_(f)
        return functools.reduce(torch.add, ys[1:]) if total else None

    def _forward_groups(self, x: Tensor, edge_index, args, rng=None):
        """y = [X'_1 .. X'_C] in one new buffer, and the RNG state before each F_i that drew
        random numbers (an empty tuple if none did); recorded when `rng` is None, else replayed
        from it."""
        channels = self._check(x)
        xs = torch.chunk(x, self.num_groups, dim=self.split_dim)
        group_args = self._group_args(args, channels)
        y = torch.empty_like(x)
        ys = torch.chunk(y, self.num_groups, dim=self.split_dim)
        record = rng is None
        states = []
        inp = functools.reduce(torch.add, xs[1:])  # X'_0; for 2 groups X_1 itself
        for i, conv in enumerate(self.convs):
            if record:  # first evaluation: draw as usual, remember where any draws started
                state = _RngState(x.device)
                f, last = self._evaluate(conv, inp, edge_index, group_args[i])
                states.append(state if state.drawn() else None)
            else:
                with _replay(rng, i):
                    f, last = self._evaluate(conv, inp, edge_index, group_args[i])
            self._add(ys[i].copy_(xs[i]), f, last)
            inp = ys[i]
        return y, ((states if any(states) else ()) if record else rng)

    def _backward_groups(self, y: Tensor, grad_y: Tensor, edge_index, args, params, rng):
        """One evaluation of each F_i, with grad, for C down to 1: back-propagate through it,
        then rebuild X_i = X'_i - F_i in place in y's storage. Returns (grad_x, grads of args,
        grads of params)."""
        channels = y.size(self.split_dim)
        ys = torch.chunk(y, self.num_groups, dim=self.split_dim)
        gys = list(torch.chunk(grad_y, self.num_groups, dim=self.split_dim))
        leaves = [a.detach().requires_grad_() if isinstance(a, Tensor) and a.requires_grad else a for a in args]
        leaf_tensors = [a for a in leaves if isinstance(a, Tensor) and a.requires_grad]
        arg_grads: List[Optional[Tensor]] = [None] * len(leaf_tensors)
        param_index = {id(p): k for k, p in enumerate(params)}
        param_grads: List[Optional[Tensor]] = [None] * len(params)

        x0 = None

        def add(total, g):
            return g if total is None else (total if g is None else total + g)

        for i in range(self.num_groups - 1, -1, -1):
            conv = self.convs[i]
            if i > 0:
                inp = ys[i - 1].detach().requires_grad_()
            else:  # X'_0, formed when X_1 was rebuilt; for 2 groups X_1 itself: no copy
                inp = (ys[1] if x0 is None else x0).detach().requires_grad_()
            conv_params = [p for p in conv.parameters() if id(p) in param_index]
            with _statistics_frozen(conv):  # restored after the gradient, which may read them
                with torch.enable_grad(), _replay(rng, i):
                    f, last = self._evaluate(conv, inp, edge_index, self._group_args(leaves, channels)[i])
                if last is None:
                    grads = list(torch.autograd.grad(f, [inp] + leaf_tensors + conv_params, gys[i], allow_unused=True))
                else:  # f is the input of F's final Linear: back-propagate through that by hand
                    grads = list(torch.autograd.grad(f, [inp] + leaf_tensors + conv_params, gys[i] @ last.weight,
                                                     allow_unused=True))
                    g = gys[i].reshape(-1, gys[i].size(-1))
                    by_hand = {id(last.weight): g.t() @ f.detach().reshape(-1, f.size(-1))}
                    if last.bias is not None:
                        by_hand[id(last.bias)] = g.sum(0)
                    for k, p in enumerate(conv_params):
                        grads[1 + len(leaf_tensors) + k] = by_hand.get(id(p), grads[1 + len(leaf_tensors) + k])
            with torch.no_grad():
                x0 = self._rebuild(y, ys, i, f.detach(), last)  # X_i in place (and X'_0 after X_1)
            for k, g in enumerate(grads[1:1 + len(leaf_tensors)]):
                arg_grads[k] = add(arg_grads[k], g)
            for p, g in zip(conv_params, grads[1 + len(leaf_tensors):]):
                param_grads[param_index[id(p)]] = add(param_grads[param_index[id(p)]], g)
            grad_inp = grads[0]
            if grad_inp is None:
                continue
            if i > 0:
                gys[i - 1] = gys[i - 1] + grad_inp
            else:
                for j in range(1, self.num_groups):
                    gys[j] = gys[j] + grad_inp
        grad_x = torch.cat(gys, dim=self.split_dim)
        it = iter(arg_grads)
        grad_args = [next(it) if isinstance(a, Tensor) and a.requires_grad else None for a in leaves]
        return grad_x, grad_args, param_grads

    # ------------------------------------------------------------------ public
    def forward(self, x: Tensor, edge_index, *args) -> Tensor:
        if self.disable or not torch.is_grad_enabled():
            return self._plain(x, edge_index, args)
        params = _parameters(self)
        return _GroupAddRevFunction.apply(self, edge_index, len(args), params, x, *args, *params.tokens())

    def _plain(self, x: Tensor, edge_index, args) -> Tensor:
        channels = self._check(x)
        xs = torch.chunk(x, self.num_groups, dim=self.split_dim)
        group_args = self._group_args(args, channels)
        ys = []
        inp = functools.reduce(torch.add, xs[1:])
        for i, conv in enumerate(self.convs):
            inp = xs[i] + conv(inp, edge_index, *group_args[i])
            ys.append(inp)
        return torch.cat(ys, dim=self.split_dim)

    def inverse(self, y: Tensor, edge_index, *args) -> Tensor:
        """The block's input from its output (no autograd)."""
        with torch.no_grad():
            channels = self._check(y)
            ys = torch.chunk(y, self.num_groups, dim=self.split_dim)
            group_args = self._group_args(args, channels)
            x = y.clone()
            xs = torch.chunk(x, self.num_groups, dim=self.split_dim)
            x0 = None
            for i in range(self.num_groups - 1, -1, -1):  # the arithmetic of backward's rebuild
                inp = ys[i - 1] if i > 0 else (xs[1] if x0 is None else x0)
                x0 = self._rebuild(x, xs, i, *self._evaluate(self.convs[i], inp, edge_index, group_args[i]))
            return x
