"""The user functions of the compiled ops (``torch.ops.revgnn_ext``, registered by ``revgnn_ext._C``)
and, op by op, their fake kernels, the autograd of their backward ops (the functional ops'
autograd is csrc/autograd.cpp) and autocast (docs/design.md §3)."""
import inspect
import operator
from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the ops)
from .graph import CSRGraph

__all__ = ["spmm", "gen_aggregate", "gat_aggregate"]

_ops = torch.ops.revgnn_ext


# ---------------------------------------------------------------------------- shared
# The kernels check what they see and raise TypeError / ValueError naming the argument; the
# functions below check only what they cannot (docs/design.md, where things live).
def _check_call(where: str, graph: CSRGraph, x: Tensor) -> None:
    if not isinstance(graph, CSRGraph):
        raise TypeError(f"{where}: graph must be a revgnn_ext.CSRGraph (build one with "
                        f"CSRGraph.from_edge_index), got {type(graph).__name__}")
    graph.check_unmodified(where)
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{where}: x must be a 2-D tensor [num_src, channels], got {shape}")
    if x.size(0) != graph.num_src:
        raise ValueError(f"{where}: x has {x.size(0)} rows but the graph has {graph.num_src} source nodes")
    if x.device != graph.device:
        raise ValueError(f"{where}: x is on {x.device} but the graph is on {graph.device} (use graph.to(device))")


def forward_ad_tracks(values) -> bool:
    """Whether forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) tracks a tensor among
    ``values``; without an open dual level (always, outside forward AD) nothing is scanned."""
    if torch.autograd.forward_ad._current_level < 0:
        return False
    return any(isinstance(v, Tensor) and torch.autograd.forward_ad.unpack_dual(v).tangent is not None for v in values)


def refused_by_functorch(err: RuntimeError) -> bool:
    """Whether ``err`` is torch.func's refusal of an autograd.Function it cannot transform."""
    return "functorch transforms" in str(err)


def _differentiable_call(where: str, op, *args):
    """op(*args), for the user functions of the differentiable ops: they have reverse-mode
    autograd only, so forward-mode AD and torch.func transforms raise a clear error instead of
    giving zero tangents or an error that does not name the op."""
    if forward_ad_tracks(args):
        raise NotImplementedError(f"{where}: forward-mode AD is not supported by the fused op; use reverse mode "
                                  "(loss.backward(), torch.autograd.grad) or revgnn_ext.reference's twin of the op")
    try:
        return op(*args)
    except RuntimeError as err:
        if not refused_by_functorch(err):
            raise
        raise NotImplementedError(f"{where}: torch.func transforms (grad, jvp, vjp, jacrev) are not supported by "
                                  "the fused op; use torch.autograd.grad / loss.backward(), or revgnn_ext.reference's "
                                  "twin of the op") from None


def _csr_weight(where: str, graph: CSRGraph, edge_weight: Optional[Tensor]) -> Optional[Tensor]:
    if edge_weight is None:
        return None
    if not isinstance(edge_weight, Tensor) or edge_weight.dim() != 1:
        shape = list(edge_weight.shape) if isinstance(edge_weight, Tensor) else type(edge_weight).__name__
        raise ValueError(f"{where}: edge_weight must be a 1-D tensor [num_edges], got {shape}")
    return graph.edges_to_csr(edge_weight, f"{where}: edge_weight")


def _accumulates(where: str, out: Tensor, shape, *inputs) -> bool:
    """Checks ``out`` (a tensor of ``shape``) and says whether ``out += alpha * op(...)`` may run
    as the op's in-place form: no autograd records any of ``out`` and ``inputs``, no autocast
    applies, and no input is wider than ``out``. Otherwise the caller adds the functional op's
    result, which autograd tracks and autocast casts."""
    if not isinstance(out, Tensor) or out.shape != shape:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{where}: out must have shape {list(shape)}, got {got}")
    tensors = [t for t in (out, *inputs) if isinstance(t, Tensor)]
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and not forward_ad_tracks(
        tensors) and not torch.is_autocast_enabled(out.device.type) and all(
        torch.promote_types(t.dtype, out.dtype) == out.dtype for t in tensors if t.is_floating_point())


def _refuse_double_backward(name: str):
    """The backward of ``name``'s backward op: gradients of gradients are refused, naming the op."""
    def backward(ctx, *grads):
        raise NotImplementedError(f"revgnn_ext.{name}: gradients of gradients (double backward) are not supported; "
                                  f"use revgnn_ext.reference.{name} for them")
    return backward


def _check_transposed(name: str, rowptr_t: Optional[Tensor]) -> None:
    if rowptr_t is None:
        raise RuntimeError(f"revgnn_ext.{name}: the backward needs the transposed CSR (rowptr_t, col_t, perm_t); "
                           "revgnn_ext.ops passes it when gradients are recorded")


def _gradients_like(x: Tensor, rowptr_t: Tensor, others, output_mask):
    """A backward op's fake outputs: grad_x [num_src, D], then one tensor like each of ``others``;
    [0] for an output not in ``output_mask`` (or an absent input)."""
    grad_x = x.new_empty((rowptr_t.shape[0] - 1, x.shape[1]) if output_mask[0] else (0,))
    return (grad_x, *(x.new_empty((0,)) if not wanted or v is None else
                      torch.empty_like(v, memory_format=torch.contiguous_format)
                      for v, wanted in zip(others, output_mask[1:])))


_lib = torch.library.Library("revgnn_ext", "IMPL")


def _register_autocast(name: str, fake, cast, keep=lambda args: False) -> None:
    """Under torch.autocast (CPU or CUDA), op ``name`` casts its arguments named in ``cast`` (the
    parameters of its fake kernel), when float32, float16 or bfloat16, to the autocast dtype, and
    runs with autocast off (docs/design.md §7). A call for which ``keep(args)`` is true runs in
    its inputs' own dtypes."""
    op = getattr(_ops, name).default
    params = list(inspect.signature(fake).parameters)
    positions = {params.index(arg) for arg in cast}

    def kernel_for(device_type):
        def kernel(*args):
            dtype = torch.get_autocast_dtype(device_type)
            args = [a.to(dtype) if i in positions and isinstance(a, Tensor) and a.dtype in _AUTOCAST_CASTS
                    and not keep(args) else a for i, a in enumerate(args)]
            with torch.autocast(device_type, enabled=False):
                return op(*args)
        return kernel

    for device_type in ("cpu", "cuda"):
        _lib.impl(name, kernel_for(device_type), "Autocast" + device_type.upper())


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------- spmm
def _selects(reduce: str) -> bool:
    return reduce in ("max", "min")


def spmm(graph: CSRGraph, x: Tensor, edge_weight: Optional[Tensor] = None, reduce: str = "sum",
         out: Optional[Tensor] = None, alpha: float = 1.0) -> Tensor:
    """out[i] = reduce over in-edges j -> i of w_ji * x[j], reduce in sum | mean | max | min.

    Rows with no in-edges give 0. Differentiable in ``x`` and ``edge_weight``; max/min route the
    gradient to the one selected edge (the first edge that attains the extremum). Deterministic:
    no atomics, forward or backward. Under ``torch.autocast``, x and edge_weight are cast to the
    autocast dtype (the sum runs in float32).

    Args:
        graph: the CSRGraph (rows are destinations).
        x: [num_src, D] source features; may be a column slice of a wider buffer (read in place).
        edge_weight: optional [num_edges] weights, in the caller's edge order.
        reduce: "sum", "mean", "max" or "min".
        out: optional [num_dst, D] tensor (possibly a column slice of a wider buffer, not
            overlapping x) to add the result into, times ``alpha``, in place; returned. Without
            autograd and autocast the kernel adds into it directly (x and edge_weight may then
            have a lower precision than out, summed in out's dtype); otherwise it is
            ``out.add_(spmm(...), alpha=alpha)``, which autograd tracks.
        alpha: the factor of the result added into ``out`` (-1 subtracts it).
    """
    where = "revgnn_ext.ops.spmm"
    _check_call(where, graph, x)
    weight = _csr_weight(where, graph, edge_weight)
    if out is not None and _accumulates(where, out, (graph.num_dst, x.size(1)), x, edge_weight):
        _ops.spmm_accumulate_(out, graph.rowptr, graph.col, weight, x, reduce, float(alpha))
        return out
    transposed = graph.transposed() if (torch.is_grad_enabled() and x.requires_grad) else (None, None, None)
    result = _differentiable_call(where, _ops.spmm, graph.rowptr, graph.col, *transposed, weight, x, reduce)[0]
    return result if out is None else out.add_(result, alpha=alpha)


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


def _backward_setup(ctx, inputs, output):
    """The backward ops' setup: every tensor input saved, the reduce name (the last input) kept."""
    *tensors, ctx.reduce = inputs
    ctx.save_for_backward(*tensors)


def _backward_x_backward(ctx, h):
    # grad_x = A_w^T S grad_out is bilinear in (weight, grad_out).
    *graph, weight, grad_out, arg = ctx.saved_tensors
    d_weight = d_grad_out = None
    if ctx.needs_input_grad[5]:
        d_weight = _ops.spmm_backward_weight(*graph, h, grad_out, arg, ctx.reduce)
    if ctx.needs_input_grad[6]:
        d_grad_out = _apply_fixed(graph, weight, h, arg, ctx.reduce)
    return None, None, None, None, None, d_weight, d_grad_out, None, None


def _backward_weight_backward(ctx, k):
    # grad_w[e] = s <x[col_e], grad_out[i]> is bilinear in (x, grad_out).
    *graph, x, grad_out, arg = ctx.saved_tensors
    d_x = d_grad_out = None
    if ctx.needs_input_grad[5]:
        _check_transposed("spmm_backward_weight", rowptr_t=graph[2])
        d_x = _ops.spmm_backward_x(*graph, k, grad_out, arg, ctx.reduce)
    if ctx.needs_input_grad[6]:
        d_grad_out = _apply_fixed(graph, k, x, arg, ctx.reduce)
    return None, None, None, None, None, d_x, d_grad_out, None, None


torch.library.register_autograd("revgnn_ext::spmm_backward_x", _backward_x_backward, setup_context=_backward_setup)
torch.library.register_autograd("revgnn_ext::spmm_backward_weight", _backward_weight_backward,
                                setup_context=_backward_setup)
# max/min select one message exactly in any precision (as PyG's scatter max does under autocast):
# casting x down would only add ties and move the gradient to other edges.
_register_autocast("spmm", _spmm_fake, ("weight", "x"), keep=lambda args: _selects(args[-1]))


# ---------------------------------------------------------------------------- gen_aggregate
def _per_channel(value, x: Tensor) -> Tensor:
    """t or p (a float, or a tensor of 1 or D values) as a tensor of x's dtype."""
    if not isinstance(value, Tensor):
        return x.new_full((1,), float(value))
    return value.to(x.dtype)


def gen_aggregate(graph: CSRGraph, x: Tensor, edge_attr: Optional[Tensor] = None,
                  edge_weight: Optional[Tensor] = None, edge_bias: Optional[Tensor] = None,
                  aggr: str = "softmax", t=1.0, p=1.0, eps: float = 1e-7) -> Tensor:
    """GENConv's aggregation, fused: for each in-edge j -> i the message
    m = relu(x[j] + e_ji) + eps, then AGG over j of m, without any [num_edges, D] tensor.

    e_ji = edge_attr @ edge_weight.T + edge_bias is computed inside the kernel from the raw edge
    features (``edge_attr`` [num_edges, F] in the caller's edge order, ``edge_weight`` [D, F] as
    an ``nn.Linear(F, D)`` weight); without ``edge_weight``, ``edge_attr`` [num_edges, D] is the
    embedding itself; without ``edge_attr``, e = 0. ``aggr``: softmax (inverse temperature ``t``:
    a float or a tensor of 1 or D values, learnable), max, mean, sum, powermean (power ``p``,
    likewise), as PyG's aggregations compute them: a softmax is finite for any finite messages;
    powermean clamps to [1e-4, 100] as PyG does, except for a plain number ``p == 1``, which PyG
    (and this op) takes as a plain mean; ``p = 0`` gives PyG's values (1, or 0 for a node without
    in-edges) and, as PyG, NaN gradients. Differentiable in x, edge_attr, edge_weight,
    edge_bias, t and p (first order); deterministic. Under ``torch.autocast``, x, edge_attr,
    edge_weight, edge_bias, t and p are cast to the autocast dtype (messages and aggregation in float32).
    """
    where = "revgnn_ext.ops.gen_aggregate"
    if aggr == "powermean" and not isinstance(p, Tensor) and p == 1:
        aggr = "mean"  # PyG's PowerMeanAggregation skips the power and its clamps for a fixed p = 1
    _check_call(where, graph, x)
    if edge_attr is not None:
        edge_attr = graph.edges_to_csr(edge_attr, f"{where}: edge_attr")
    t = _per_channel(t, x) if aggr == "softmax" else None
    p = _per_channel(p, x) if aggr == "powermean" else None
    for name, v in dict(edge_weight=edge_weight, edge_bias=edge_bias, t=t, p=p).items():
        if isinstance(v, Tensor) and v.device != x.device:
            raise ValueError(f"{where}: {name} is on {v.device} but x is on {x.device}")
    grads = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (x, edge_attr, edge_weight, edge_bias, t, p))
    transposed = graph.transposed() if grads else (None, None, None)
    return _differentiable_call(where, _ops.gen_aggregate, graph.rowptr, graph.col, *transposed, x, edge_attr,
                                edge_weight, edge_bias, t, p, aggr, float(eps))[0]


@torch.library.register_fake("revgnn_ext::gen_aggregate")
def _gen_aggregate_fake(rowptr, col, rowptr_t, col_t, perm_t, x, edge_attr, edge_weight, edge_bias, t, p, aggr, eps):
    n = rowptr.shape[0] - 1
    out = x.new_empty((n, x.shape[1]))
    if aggr == "max":
        state = rowptr.new_empty((n, x.shape[1]))
    elif aggr in ("softmax", "powermean"):
        low = x.dtype in (torch.float16, torch.bfloat16)
        state = x.new_empty((n, x.shape[1]), dtype=torch.float32 if low else x.dtype)
    else:
        state = x.new_empty((0,))
    return out, state


@torch.library.register_fake("revgnn_ext::gen_aggregate_backward")
def _gen_aggregate_backward_fake(rowptr, col, rowptr_t, col_t, perm_t, x, edge_attr, edge_weight, edge_bias, t, p,
                                 out, state, grad_out, aggr, eps, output_mask):
    used_t = t if aggr == "softmax" else None
    used_p = p if aggr == "powermean" else None
    return _gradients_like(x, rowptr_t, (edge_attr, edge_weight, edge_bias, used_t, used_p), output_mask)


torch.library.register_autograd("revgnn_ext::gen_aggregate_backward", _refuse_double_backward("gen_aggregate"))
_register_autocast("gen_aggregate", _gen_aggregate_fake, ("x", "edge_attr", "edge_weight", "edge_bias", "t", "p"))


# ---------------------------------------------------------------------------- gat_aggregate
def gat_aggregate(graph: CSRGraph, x: Tensor, src_score: Tensor, dst_score: Optional[Tensor] = None,
                  edge_attr: Optional[Tensor] = None, edge_weight: Optional[Tensor] = None,
                  negative_slope: float = 0.2, edge_keep: Optional[Tensor] = None, attn_dropout: float = 0.0,
                  seed: int = 0, out: Optional[Tensor] = None, alpha: float = 1.0) -> Tensor:
    """GAT's attention and aggregation, fused: per destination i and head h, the softmax over the
    kept in-edges j -> i of leaky_relu(src_score[j, h] + dst_score[i, h] + e_jih), then
    out[i, head h] = sum_j alpha * x[j, head h], in one pass with an online softmax.
    revgnn_ext.reference.gat_aggregate is the contract: the same arguments (their shapes there),
    values, gradients and attention-dropout draw (reference.gat_dropout_keep, which a
    recomputation replays without a stored mask). Saves only an [num_dst, H] log-normalizer
    besides the output; no [num_edges, H*C] nor [num_edges, H] tensor, forward or backward.
    Differentiable in x, src_score, dst_score, edge_attr and edge_weight (first order);
    deterministic (no atomics). Under ``torch.autocast``, x, src_score, dst_score, edge_attr and
    edge_weight are cast to the autocast dtype (scores and softmax in float32).

    ``out`` ([num_dst, H*C], possibly a column slice of a wider buffer, not overlapping x): the
    result times ``alpha`` is added into it in place and it is returned; without autograd and
    autocast the kernel adds into it directly (every tensor of out's dtype), otherwise it is
    ``out.add_(gat_aggregate(...), alpha=alpha)``, which autograd tracks.
    """
    where = "revgnn_ext.ops.gat_aggregate"
    _check_call(where, graph, x)
    if edge_attr is not None:
        edge_attr = graph.edges_to_csr(edge_attr, f"{where}: edge_attr")
    if edge_keep is not None:
        edge_keep = graph.edges_to_csr(edge_keep, f"{where}: edge_keep")
    seed = operator.index(seed) % 2**64
    seed = seed - 2**64 if seed >= 2**63 else seed  # as a signed int64
    perm = graph.perm if attn_dropout > 0 else None  # the caller's edge ids, which the dropout draw hashes
    if out is not None and _accumulates(where, out, (graph.num_dst, x.size(1)), x, src_score, dst_score, edge_attr,
                                        edge_weight):
        _ops.gat_aggregate_accumulate_(out, graph.rowptr, graph.col, perm, x, src_score, dst_score, edge_attr,
                                       edge_weight, edge_keep, float(negative_slope), float(attn_dropout), seed,
                                       float(alpha))
        return out
    grads = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (x, src_score, dst_score, edge_attr, edge_weight))
    transposed = graph.transposed() if grads else (None, None, None)
    result = _differentiable_call(where, _ops.gat_aggregate, graph.rowptr, graph.col, *transposed, perm, x,
                                  src_score, dst_score, edge_attr, edge_weight, edge_keep, float(negative_slope),
                                  float(attn_dropout), seed)[0]
    return result if out is None else out.add_(result, alpha=alpha)


@torch.library.register_fake("revgnn_ext::gat_aggregate")
def _gat_aggregate_fake(rowptr, col, rowptr_t, col_t, perm_t, perm, x, src_score, dst_score, edge_attr, edge_weight,
                        edge_keep, negative_slope, attn_dropout, seed):
    n = rowptr.shape[0] - 1
    low = x.dtype in (torch.float16, torch.bfloat16)
    return x.new_empty((n, x.shape[1])), x.new_empty((n, src_score.shape[1]), dtype=torch.float32 if low else x.dtype)


@torch.library.register_fake("revgnn_ext::gat_aggregate_accumulate_")
def _gat_aggregate_accumulate_fake(out, rowptr, col, perm, x, src_score, dst_score, edge_attr, edge_weight, edge_keep,
                                   negative_slope, attn_dropout, seed, alpha=1.0):
    return None


@torch.library.register_fake("revgnn_ext::gat_aggregate_backward")
def _gat_aggregate_backward_fake(rowptr, col, rowptr_t, col_t, perm_t, perm, x, src_score, dst_score, edge_attr,
                                 edge_weight, edge_keep, out, lse, grad_out, negative_slope, attn_dropout, seed,
                                 output_mask):
    return _gradients_like(x, rowptr_t, (src_score, dst_score, edge_attr, edge_weight), output_mask)


torch.library.register_autograd("revgnn_ext::gat_aggregate_backward", _refuse_double_backward("gat_aggregate"))
_register_autocast("gat_aggregate", _gat_aggregate_fake, ("x", "src_score", "dst_score", "edge_attr", "edge_weight"))
