"""Python face of the compiled ops: fake kernels, autograd, and the user-level functions.

The ops themselves are registered by ``revgnn_ext._C`` under ``torch.ops.revgnn_ext``; their
schemas are in csrc/revgnn_ext.cpp and their contracts in csrc/ops/<op>.h. Every op, backward
ops included, has a fake kernel (for torch.compile / meta tensors) and an autograd formula made
of ops that have one too, so gradients of any order are available.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the ops)
from .graph import CSRGraph

__all__ = ["spmm", "spmm_accumulate_"]

REDUCES = ("sum", "mean", "max", "min")
_ops = torch.ops.revgnn_ext


def _selects(reduce: str) -> bool:
    return reduce in ("max", "min")


# ---------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("revgnn_ext::spmm")
def _spmm_fake(rowptr, col, rowptr_t, col_t, perm_t, weight, x, reduce):
    n = rowptr.shape[0] - 1
    out = x.new_empty((n, x.shape[1]))
    arg = rowptr.new_empty((n, x.shape[1]) if _selects(reduce) else (0,))
    return out, arg


@torch.library.register_fake("revgnn_ext::spmm_accumulate_")
def _spmm_accumulate_fake(out, rowptr, col, weight, x, reduce, alpha=1.0):
    return None


@torch.library.register_fake("revgnn_ext::spmm_backward_x")
def _spmm_backward_x_fake(rowptr, col, rowptr_t, col_t, perm_t, weight, grad_out, arg, reduce):
    return grad_out.new_empty((rowptr_t.shape[0] - 1, grad_out.shape[1]))


@torch.library.register_fake("revgnn_ext::spmm_backward_weight")
def _spmm_backward_weight_fake(rowptr, col, rowptr_t, col_t, perm_t, x, grad_out, arg, reduce):
    return x.new_empty((col.shape[0],))


# ---------------------------------------------------------------------------- autograd
def _gather_selected(col: Tensor, weight: Optional[Tensor], x: Tensor, arg: Tensor) -> Tensor:
    """out[i, c] = w_a * x[col[a], c] with a = arg[i, c] the edge a max/min selected (0 for an
    empty row): the linear map that max/min apply once the selection is fixed. O(N * D)."""
    if col.numel() == 0 or x.size(0) == 0:
        return x.new_zeros(arg.shape)
    edge = arg.long().clamp(min=0)
    out = torch.gather(x, 0, col.long()[edge])
    if weight is not None:
        out = out * weight[edge]
    return torch.where(arg >= 0, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _apply_fixed(graph, weight, x, arg, reduce):
    """The forward with the max/min selection fixed: linear in `weight` and in `x`."""
    if _selects(reduce):
        return _gather_selected(graph[1], weight, x, arg)
    return _ops.spmm(*graph, weight, x, reduce)[0]


def _spmm_setup(ctx, inputs, output):
    rowptr, col, rowptr_t, col_t, perm_t, weight, x, reduce = inputs
    ctx.reduce = reduce
    ctx.has_transpose = rowptr_t is not None
    keep_x = x if ctx.needs_input_grad[5] else None
    ctx.save_for_backward(rowptr, col, rowptr_t, col_t, perm_t, weight, keep_x, output[1])


def _spmm_backward(ctx, grad_out, _grad_arg):
    rowptr, col, rowptr_t, col_t, perm_t, weight, x, arg = ctx.saved_tensors
    graph = (rowptr, col, rowptr_t, col_t, perm_t)
    grad_w = grad_x = None
    if ctx.needs_input_grad[6]:
        if not ctx.has_transpose:
            raise RuntimeError("revgnn_ext.spmm: the gradient of x needs the transposed CSR (rowptr_t, col_t, "
                               "perm_t); revgnn_ext.ops.spmm passes it when x requires grad")
        grad_x = _ops.spmm_backward_x(*graph, weight, grad_out, arg, ctx.reduce)
    if ctx.needs_input_grad[5]:
        grad_w = _ops.spmm_backward_weight(*graph, x, grad_out, arg, ctx.reduce)
    return None, None, None, None, None, grad_w, grad_x, None


def _backward_x_setup(ctx, inputs, output):
    rowptr, col, rowptr_t, col_t, perm_t, weight, grad_out, arg, reduce = inputs
    ctx.reduce = reduce
    ctx.save_for_backward(rowptr, col, rowptr_t, col_t, perm_t, weight, grad_out, arg)


def _backward_x_backward(ctx, h):
    # grad_x = A_w^T S grad_out is bilinear in (weight, grad_out).
    rowptr, col, rowptr_t, col_t, perm_t, weight, grad_out, arg = ctx.saved_tensors
    graph = (rowptr, col, rowptr_t, col_t, perm_t)
    d_weight = d_grad_out = None
    if ctx.needs_input_grad[5]:
        d_weight = _ops.spmm_backward_weight(*graph, h, grad_out, arg, ctx.reduce)
    if ctx.needs_input_grad[6]:
        d_grad_out = _apply_fixed(graph, weight, h, arg, ctx.reduce)
    return None, None, None, None, None, d_weight, d_grad_out, None, None


def _backward_weight_setup(ctx, inputs, output):
    rowptr, col, rowptr_t, col_t, perm_t, x, grad_out, arg, reduce = inputs
    ctx.reduce = reduce
    ctx.save_for_backward(rowptr, col, rowptr_t, col_t, perm_t, x, grad_out, arg)


def _backward_weight_backward(ctx, k):
    # grad_w[e] = s <x[col_e], grad_out[i]> is bilinear in (x, grad_out).
    rowptr, col, rowptr_t, col_t, perm_t, x, grad_out, arg = ctx.saved_tensors
    graph = (rowptr, col, rowptr_t, col_t, perm_t)
    d_x = d_grad_out = None
    if ctx.needs_input_grad[5]:
        if rowptr_t is None:
            raise RuntimeError("revgnn_ext.spmm_backward_weight: its gradient for x needs the transposed CSR")
        d_x = _ops.spmm_backward_x(*graph, k, grad_out, arg, ctx.reduce)
    if ctx.needs_input_grad[6]:
        d_grad_out = _apply_fixed(graph, k, x, arg, ctx.reduce)
    return None, None, None, None, None, d_x, d_grad_out, None, None


torch.library.register_autograd("revgnn_ext::spmm", _spmm_backward, setup_context=_spmm_setup)
torch.library.register_autograd("revgnn_ext::spmm_backward_x", _backward_x_backward,
                                setup_context=_backward_x_setup)
torch.library.register_autograd("revgnn_ext::spmm_backward_weight", _backward_weight_backward,
                                setup_context=_backward_weight_setup)


# ---------------------------------------------------------------------------- user functions
def _check_call(where: str, graph: CSRGraph, x: Tensor, reduce: str) -> None:
    if not isinstance(graph, CSRGraph):
        raise TypeError(f"{where}: graph must be a revgnn_ext.CSRGraph (build one with "
                        f"CSRGraph.from_edge_index), got {type(graph).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{where}: x must be a 2-D tensor [num_src, channels], got {shape}")
    if x.size(0) != graph.num_src:
        raise ValueError(f"{where}: x has {x.size(0)} rows but the graph has {graph.num_src} source nodes")
    if x.device != graph.device:
        raise ValueError(f"{where}: x is on {x.device} but the graph is on {graph.device} (use graph.to(device))")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{where}: x must be a floating-point tensor, got {x.dtype}")
    if reduce not in REDUCES:
        raise ValueError(f"{where}: reduce must be one of {REDUCES}, got {reduce!r}")


def _csr_weight(where: str, graph: CSRGraph, x: Tensor, edge_weight: Optional[Tensor]) -> Optional[Tensor]:
    if edge_weight is None:
        return None
    if not isinstance(edge_weight, Tensor) or edge_weight.dim() != 1:
        shape = list(edge_weight.shape) if isinstance(edge_weight, Tensor) else type(edge_weight).__name__
        raise ValueError(f"{where}: edge_weight must be a 1-D tensor [num_edges], got {shape}")
    if edge_weight.dtype != x.dtype:
        raise TypeError(f"{where}: edge_weight dtype {edge_weight.dtype} differs from x dtype {x.dtype}")
    return graph.edges_to_csr(edge_weight, f"{where}: edge_weight")


def spmm(graph: CSRGraph, x: Tensor, edge_weight: Optional[Tensor] = None, reduce: str = "sum") -> Tensor:
    """out[i] = reduce over in-edges j -> i of w_ji * x[j], reduce in sum | mean | max | min.

    Rows with no in-edges give 0. ``edge_weight`` ([num_edges], caller's edge order) is optional.
    ``x`` may be a column slice of a wider buffer; it is read in place. Differentiable in ``x``
    and ``edge_weight``; max/min route the gradient to the one selected edge (the first edge
    that attains the extremum). Deterministic: no atomics, forward or backward.
    """
    where = "revgnn_ext.ops.spmm"
    _check_call(where, graph, x, reduce)
    weight = _csr_weight(where, graph, x, edge_weight)
    transposed = graph.transposed() if (torch.is_grad_enabled() and x.requires_grad) else (None, None, None)
    return _ops.spmm(graph.rowptr, graph.col, *transposed, weight, x, reduce)[0]


def _shares_elements(a: Tensor, b: Tensor) -> bool:
    """Whether two 2-D tensors may share elements. Column slices of one row-major buffer with
    disjoint column ranges do not; any other storage sharing is reported as overlap."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.dtype != b.dtype or a.stride(0) != b.stride(0) or a.stride(-1) != 1 or b.stride(-1) != 1:
        return True
    s = a.stride(0)
    ca, cb = a.storage_offset() % s, b.storage_offset() % s
    return not (ca + a.size(1) <= cb or cb + b.size(1) <= ca) or ca + a.size(1) > s or cb + b.size(1) > s


def spmm_accumulate_(out: Tensor, graph: CSRGraph, x: Tensor, edge_weight: Optional[Tensor] = None,
                     reduce: str = "sum", alpha: float = 1.0) -> Tensor:
    """out += alpha * spmm(graph, x, edge_weight, reduce), written into ``out`` (which may be a
    column slice of a wider buffer) without allocating an [N, D] temporary. Returns ``out``.
    ``out`` may be another column slice of ``x``'s buffer, but must not overlap ``x``.

    The fused in-place op has no autograd (PyTorch registers autograd for functional ops
    only); when gradients are being recorded for any input, this computes the same result as
    ``out.add_(spmm(...), alpha=alpha)``, which autograd tracks.
    """
    where = "revgnn_ext.ops.spmm_accumulate_"
    _check_call(where, graph, x, reduce)
    weight = _csr_weight(where, graph, x, edge_weight)
    if not isinstance(out, Tensor) or out.shape != (graph.num_dst, x.size(1)):
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{where}: out must have shape [{graph.num_dst}, {x.size(1)}], got {shape}")
    if _shares_elements(out, x):
        raise ValueError(f"{where}: out shares elements with x; they may be column slices of one buffer, "
                         "but the columns must not overlap")
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (out, x, edge_weight))
    if tracked:
        return out.add_(spmm(graph, x, edge_weight, reduce), alpha=alpha)
    _ops.spmm_accumulate_(out, graph.rowptr, graph.col, weight, x, reduce, float(alpha))
    return out
