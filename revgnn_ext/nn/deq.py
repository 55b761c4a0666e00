"""RevGNN-DEQ: one weight-tied grouped block iterated to its fixed point (a deep equilibrium
model), solved by Anderson or Broyden, differentiated implicitly (docs/design.md §2)."""
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .grouped import GroupedBlock, rng_state, set_rng_state, statistics_frozen

__all__ = ["DEQ", "SolverTrace", "anderson", "broyden"]

_TINY = 1e-30


@dataclass
class SolverTrace:
    """One solve: ``residuals[k]`` is the relative residual ||f(z_k) - z_k|| / ||f(z_k)|| at the
    k-th evaluation of f; the solve stops when one falls below ``tol``, and the solver returns
    the iterate of the lowest residual."""
    solver: str
    tol: float
    residuals: List[float] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return len(self.residuals)

    @property
    def residual(self) -> float:
        return min(self.residuals, default=math.inf)

    @property
    def converged(self) -> bool:
        return self.residual < self.tol


class _Best:
    """The solver's bookkeeping: the trace, and the iterate z (with f(z)) of the lowest residual."""

    def __init__(self, solver: str, tol: float):
        self.trace = SolverTrace(solver, tol)
        self.z = self.fz = None

    def done(self, z: Tensor, fz: Tensor) -> bool:
        """Records the residual of z; True when the solve should stop (converged or non-finite)."""
        res = ((fz - z).norm() / fz.norm().clamp_min(_TINY)).item()
        self.trace.residuals.append(res)
        if not math.isfinite(res):
            return True
        if self.z is None or res <= self.trace.residual:
            self.z, self.fz = z, fz
        return res < self.trace.tol


def anderson(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int = 50, tol: float = 1e-4, memory: int = 5,
             reg: float = 1e-8) -> Tuple[Tensor, Tensor, SolverTrace]:
    """Anderson acceleration of z = f(z) over the flattened tensor (all nodes are one system), in
    the Walker-Ni form: with the differences dR of the last ``memory`` residuals r = f(z) - z and
    dF of the f values, gamma = argmin ||r - dR gamma|| (ridge ``reg`` relative to dR's scale)
    and z' = f(z) - dF gamma. ``max_iter`` evaluations of f at most. Returns (z, f(z), trace) at
    the lowest residual; keeps 2 * memory tensors like z, whatever the number of iterations."""
    best = _Best("anderson", tol)
    z = z0.reshape(-1)
    fz = f(z)
    dR = z.new_zeros(memory, z.numel())
    dF = z.new_zeros(memory, z.numel())
    for k in range(max_iter):
        if best.done(z, fz) or k == max_iter - 1:
            break
        r = fz - z
        m = min(k, memory)
        if m:
            gram = (dR[:m] @ dR[:m].t()).double()
            gram.diagonal().add_(reg * gram.diagonal().max() + _TINY)
            gamma = torch.linalg.solve(gram, (dR[:m] @ r).double()).to(z.dtype)
            z_next = fz - gamma @ dF[:m]
        else:
            z_next = fz
        fz_next = f(z_next)
        dR[k % memory] = (fz_next - z_next) - r
        dF[k % memory] = fz_next - fz
        z, fz = z_next, fz_next
    return _result(best, z0)


def broyden(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int = 50, tol: float = 1e-4,
            memory: int = 20) -> Tuple[Tensor, Tensor, SolverTrace]:
    """Broyden's ("good") method for the root of g(z) = f(z) - z over the flattened tensor: the
    inverse Jacobian H = -I + U V^T (starting at -I, so the first step is z' = f(z)) takes one
    Sherman-Morrison update per step, back to -I after ``memory`` of them; step z' = z - H g(z).
    ``max_iter`` evaluations of f at most. Returns (z, f(z), trace) at the lowest residual; keeps
    2 * memory tensors like z, whatever the number of iterations."""
    best = _Best("broyden", tol)
    z = z0.reshape(-1)
    fz = f(z)
    U = z.new_zeros(memory, z.numel())
    V = z.new_zeros(memory, z.numel())
    updates = 0

    def h(v: Tensor) -> Tensor:  # H v
        return U.t() @ (V @ v) - v

    for k in range(max_iter):
        if best.done(z, fz) or k == max_iter - 1:
            break
        g = fz - z
        s = -h(g)
        z_next = z + s
        fz_next = f(z_next)
        if updates == memory:  # full: restart from H = -I (dropping only the oldest update breaks H)
            U.zero_()
            V.zero_()
            updates = 0
        h_dg = h(fz_next - z_next - g)
        denom = s @ h_dg
        if denom.abs() > _TINY:
            U[updates] = (s - h_dg) / denom
            V[updates] = V.t() @ (U @ s) - s  # H^T s
            updates += 1
        z, fz = z_next, fz_next
    return _result(best, z0)


def _result(best: _Best, z0: Tensor) -> Tuple[Tensor, Tensor, SolverTrace]:
    if best.z is None:
        raise RuntimeError(f"DEQ: f returned non-finite values at the solver's first evaluation (residual "
                           f"{best.trace.residuals[0]}): check the block's weights and input")
    return best.z.view_as(z0), best.fz.view_as(z0), best.trace


SOLVERS = {"anderson": anderson, "broyden": broyden}


def _warn_unconverged(trace: SolverTrace, what: str, max_iter: int) -> None:
    if trace.converged:
        return
    stop = (f"stopped at a non-finite residual after {trace.iterations - 1} evaluations" if
            not math.isfinite(trace.residuals[-1]) else f"did not converge in {max_iter} iterations")
    warnings.warn(f"DEQ: the {trace.solver} solver of the {what} {stop}: relative residual {trace.residual:.3g} "
                  f"> tol {trace.tol:g} (the best iterate is used). Raise max_iter, try the other solver, or make "
                  "the block more contractive (smaller weights, normalization).", RuntimeWarning, stacklevel=4)


class _DrawReplay:
    """The random generators' state at the start of a solve: every evaluation of f starts from
    it, so that dropout inside f draws one mask per solve; afterwards the generators stand where
    one evaluation leaves them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = rng_state(device)
        self.after = None

    def __call__(self, f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def replayed(z: Tensor) -> Tensor:
            set_rng_state(self.start, self.device)
            out = f(z)
            if self.after is None:
                self.after = rng_state(self.device)
            return out
        return replayed

    def finish(self) -> None:
        if self.after is not None:
            set_rng_state(self.after, self.device)


class _ImplicitBackward(torch.autograd.Function):
    """Identity on fz = f(z*) in forward; backward turns the gradient v of the output into the
    solution g of the adjoint fixed point g = J^T g + v (J = df/dz at z*, vector-Jacobian
    products through the graph of fz's one evaluation), which autograd then sends through that
    graph to the parameters, the input and the arguments."""

    @staticmethod
    def forward(ctx, deq: "DEQ", z: Tensor, fz: Tensor) -> Tensor:
        ctx.deq = deq
        ctx.save_for_backward(z, fz)
        return fz.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        z, fz = ctx.saved_tensors
        deq = ctx.deq

        def adjoint(g: Tensor) -> Tensor:
            vjp, = torch.autograd.grad(fz, z, g.view_as(fz), retain_graph=True)
            return vjp.reshape(-1) + grad.reshape(-1)

        g, _, trace = SOLVERS[deq.solver](adjoint, grad.contiguous(), deq.backward_max_iter, deq.backward_tol,
                                          memory=deq.memory)
        deq.backward_trace = trace
        _warn_unconverged(trace, "backward (adjoint) solve", deq.backward_max_iter)
        return None, None, g


class DEQ(GroupedBlock):
    r"""RevGNN-DEQ: a weight-tied grouped block at its fixed point z* = f(z*; x).

    f has GroupAddRev's group structure with the input x injected through the skip connections:
    z's channels are split into C groups, f_0 = z_2 + ... + z_C (z_1 itself for C = 1) and
    f_i = F_i(f_{i-1}) + x_i, f(z; x) = [f_1 .. f_C]. Each F_i is any module GroupAddRev accepts,
    called F_i(h, edge_index, *args); arguments are split across groups as GroupAddRev splits
    them. The output is f(z*; x) (docs/design.md §2).

    - forward solves z = f(z; x) from z = 0 with ``solver`` ("anderson" or "broyden") under
      ``torch.no_grad`` (at most ``max_iter`` evaluations of f, stop at relative residual
      ``tol``), then evaluates f(z*) once with autograd;
    - backward solves the adjoint fixed point g = (df/dz)^T g + dL/dz* with the same solver
      (``backward_max_iter``, ``backward_tol``; by default the forward's) through that one
      evaluation's graph, keeping 2 * ``memory`` tensors of z's size whatever the iterations;
    - ``forward_trace`` and ``backward_trace`` (:class:`SolverTrace`) hold the last solves'
      residuals; a solve that does not reach ``tol`` warns and uses its best iterate; non-finite
      values stop it at its best finite iterate (an error if there is none);
    - dropout inside F draws one mask per forward (every evaluation of f starts from the same
      generator state; not safe while other threads draw);
    - BatchNorm running statistics move once per step, in the final evaluation with autograd.

    Double backward is not supported.
    """

    def __init__(self, conv: Union[torch.nn.Module, torch.nn.ModuleList], split_dim: int = -1,
                 num_groups: Optional[int] = None, *, solver: str = "anderson", max_iter: int = 50,
                 tol: float = 1e-4, backward_max_iter: Optional[int] = None, backward_tol: Optional[float] = None,
                 memory: int = 5):
        if solver not in SOLVERS:
            raise ValueError(f"DEQ: solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if max_iter < 1 or memory < 1 or (backward_max_iter is not None and backward_max_iter < 1):
            raise ValueError(f"DEQ: max_iter, backward_max_iter and memory must be >= 1, got {max_iter}, "
                             f"{backward_max_iter}, {memory}")
        for name, value in (("tol", tol), ("backward_tol", backward_tol)):
            if value is not None and not value >= 0:  # NaN fails too
                raise ValueError(f"DEQ: {name} must be a relative residual >= 0 (0 runs every iteration), "
                                 f"got {value!r}")
        super().__init__(conv, split_dim, 1 if num_groups is None else num_groups)
        self.solver, self.memory = solver, memory
        self.max_iter, self.tol = max_iter, tol
        self.backward_max_iter = max_iter if backward_max_iter is None else backward_max_iter
        self.backward_tol = tol if backward_tol is None else backward_tol
        self.forward_trace: Optional[SolverTrace] = None
        self.backward_trace: Optional[SolverTrace] = None

    def extra_repr(self) -> str:
        return (f"num_groups={self.num_groups}, solver={self.solver!r}, max_iter={self.max_iter}, tol={self.tol:g}, "
                f"memory={self.memory}")

    def f(self, z: Tensor, x: Tensor, edge_index, *args) -> Tensor:
        """One evaluation of the block: f(z; x).

        Args:
            z: the current iterate, shaped like x.
            x: the block's input, injected into every group.
            edge_index: the graph.
            *args: further arguments of the groups' modules (split as GroupAddRev splits them).
        """
        xs, group_args = self.split(x, args)
        return self._f(z, xs, edge_index, group_args)

    def _f(self, z: Tensor, xs: Sequence[Tensor], edge_index, group_args) -> Tensor:
        zs = torch.chunk(z, self.num_groups, dim=self.split_dim)
        h = sum(zs[1:]) if self.num_groups > 1 else zs[0]
        out = []
        for conv, x_i, a in zip(self.convs, xs, group_args):
            h = conv(h, edge_index, *a) + x_i
            out.append(h)
        return torch.cat(out, dim=self.split_dim)

    def forward(self, x: Tensor, edge_index, *args) -> Tensor:
        xs, group_args = self.split(x, args)
        replay = _DrawReplay(x.device)

        def f(z: Tensor) -> Tensor:
            return self._f(z, xs, edge_index, group_args)

        with torch.no_grad(), statistics_frozen(self.modules()):
            flat = replay(lambda z: f(z.view_as(x)).reshape(-1))
            z, fz, self.forward_trace = SOLVERS[self.solver](flat, torch.zeros_like(x), self.max_iter, self.tol,
                                                             memory=self.memory)
        _warn_unconverged(self.forward_trace, "forward solve", self.max_iter)
        inputs = (x, *args, *self.parameters())
        if not torch.is_grad_enabled() or not any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
            replay.finish()
            return fz
        z = z.detach().requires_grad_()
        fz = replay(f)(z)
        replay.finish()
        return _ImplicitBackward.apply(self, z, fz)
