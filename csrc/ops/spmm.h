// spmm: sparse (CSR) × dense aggregation, its accumulate form and its two backward ops.
//
// Graph (see revgnn_ext/graph.py): CSR by destination.
//   rowptr [num_dst + 1], col [E] (source of each edge, in CSR order); int32 or int64, the
//   same dtype for both: 0 = rowptr[0] <= ... <= rowptr[num_dst] = E, 0 <= col < num_src.
//   CSRGraph validates this when it is built, but its tensors can still be edited in place
//   afterwards, and the raw ops take any arrays: so the ops check shapes and dtypes at the
//   boundary (on CPU also rowptr[0] == 0 and rowptr[-1] == E: two reads), and the kernels check
//   every row they visit (row_ok) and every index they follow (col against num_src, col_t
//   against num_dst, perm_t against E). A malformed graph raises a ValueError on CPU and fails
//   a device assert on CUDA (as PyTorch's own index ops do); no kernel reads out of bounds.
//   Transposed CSR (by source): rowptr_t [num_src + 1], col_t [E] (destination), perm_t [E]
//   (the CSR position of each transposed entry), same index dtype.
//   weight: optional [E] in CSR order, dtype of x.
//   x: [num_src, D], float32, float64, float16 or bfloat16 (ops/common.h); rows may be strided
//   (a column slice of a wider buffer) as long as channels are contiguous (stride(1) == 1);
//   otherwise the op makes a contiguous copy.
//
// Every op takes the graph first (rowptr, col, rowptr_t, col_t, perm_t; the transposed part
// optional where the kernel does not read it: autograd saves it for the backward of x).
//
// spmm(graph, weight?, x, reduce) -> (out, arg)
//   out[i, c] = R over CSR edges e of row i of w_e * x[col_e, c], R in sum | mean | max | min;
//   rows with no edges give 0. arg [num_dst, D] (index dtype) holds the CSR position of the
//   selected edge for max/min (-1 for an empty row): the first edge that attains the extremum
//   (deterministic ties), and a NaN value is selected over numbers so that NaN propagates.
//   arg is empty for sum/mean.
// spmm_accumulate_(out, rowptr, col, weight?, x, reduce, alpha) -> ()
//   out += alpha * spmm(...).out, in place; out may be a column slice of a wider buffer, but
//   must not share elements with x or weight (other column slices of x's buffer are fine).
//   x and weight may have a lower precision than out (bfloat16 into float32: what autocast gives
//   beside a float32 buffer); they are converted to out's dtype, exactly, and summed in it.
// spmm_backward_x(graph, weight?, grad_out, arg, reduce) -> grad_x
//   grad_x[j, c] = sum over transposed entries t of row j (edge e = perm_t[t] into i = col_t[t])
//   of w_e * grad_out[i, c] * s(i, c, e), s = 1 (sum), 1/deg(i) (mean), [arg[i, c] == e]
//   (max/min). A segment sum over the transposed CSR: deterministic, no atomics.
// spmm_backward_weight(graph, x, grad_out, arg, reduce) -> grad_weight [E] (CSR order)
//   grad_weight[e] = sum_c x[col_e, c] * grad_out[i, c] * s(i, c, e) for e in row i.
#pragma once

#include "ops/common.h"

namespace revgnn_ext {

enum class Reduce : int { Sum = 0, Mean = 1, Max = 2, Min = 3 };

// Calls f(std::integral_constant<Reduce, r>{}): the reduction as a compile-time constant.
template <typename F>
void dispatch_reduce(Reduce r, const F& f) {
  dispatch_enum<Reduce, Reduce::Sum, Reduce::Mean, Reduce::Max, Reduce::Min>(r, f);
}

C10_HOST_DEVICE constexpr bool selects_edge(Reduce r) { return r == Reduce::Max || r == Reduce::Min; }

// Max/min selection. `has_best` is false before the row's first edge, which always selects.
// Afterwards a strictly better value wins (ties keep the earlier edge), a NaN wins over a
// number, and once NaN is selected it stays.
template <Reduce R, typename acc_t>
C10_HOST_DEVICE inline bool replaces(acc_t v, acc_t best, bool has_best) {
  if (!has_best) return true;
  if (best != best) return false;
  if (v != v) return true;
  return R == Reduce::Max ? v > best : v < best;
}

// The value a row's accumulator becomes in the output: mean divides by the in-degree; an empty
// row gives 0 whatever the reduction.
template <Reduce R, typename acc_t>
C10_HOST_DEVICE inline acc_t finalize(acc_t acc, int64_t deg) {
  if (deg == 0) return acc_t(0);
  return R == Reduce::Mean ? acc / static_cast<acc_t>(deg) : acc;
}

// Scale of one edge's gradient for sum/mean (max/min gate by arg instead).
template <Reduce R, typename acc_t>
C10_HOST_DEVICE inline acc_t grad_scale(acc_t w, int64_t deg) {
  return R == Reduce::Mean ? w / static_cast<acc_t>(deg) : w;
}

inline Reduce parse_reduce(c10::string_view reduce, const char* op) {
  static constexpr std::pair<const char*, Reduce> names[] = {
      {"sum", Reduce::Sum}, {"mean", Reduce::Mean}, {"max", Reduce::Max}, {"min", Reduce::Min}};
  return parse_enum(std::string(reduce), names, op, "reduce");
}

// The op layer, shared by the devices: argument checks and output allocation. K holds one
// device's kernels (cpu/spmm_cpu.cpp, cuda/spmm_cuda.cu):
//   K::forward(rowptr, col, weight, x, reduce, out, arg, alpha, accumulate)
//     out = result (accumulate false) or out += alpha * result; arg undefined or [n, D].
//   K::backward_x(rowptr, rowptr_t, col_t, perm_t, weight_t, grad_out, arg, reduce, grad_x)
//     weight_t: the weight of each transposed entry (weight[perm_t], read in order), or none.
//   K::backward_weight(rowptr, col, x, grad_out, arg, reduce, grad_weight)
// Kernels check every row they visit and every index they follow (see the contract above).

template <typename K>
std::tuple<at::Tensor, at::Tensor> spmm_op(const at::Tensor& rowptr, const at::Tensor& col,
                                           const c10::optional<at::Tensor>& rowptr_t,
                                           const c10::optional<at::Tensor>& /*col_t*/,
                                           const c10::optional<at::Tensor>& /*perm_t*/,
                                           const c10::optional<at::Tensor>& weight, const at::Tensor& x_in,
                                           c10::string_view reduce) {
  constexpr const char* op = "revgnn_ext.spmm";
  const Reduce r = parse_reduce(reduce, op);
  const at::Tensor x = check_features(x_in, op, "x", x_in.device());
  check_graph(rowptr, col, weight, x, op);
  check_source_rows(x, rowptr_t, op);
  const int64_t n = rowptr.numel() - 1, d = x.size(1);
  at::Tensor out = at::empty({n, d}, x.options());
  at::Tensor arg = selects_edge(r) ? at::empty({n, d}, rowptr.options()) : at::empty({0}, rowptr.options());
  if (n > 0 && d > 0) K::forward(rowptr, col, weight, x, r, out, arg, 1.0, false);
  return {out, arg};
}

template <typename K>
void spmm_accumulate_op(const at::Tensor& out, const at::Tensor& rowptr, const at::Tensor& col,
                        const c10::optional<at::Tensor>& weight, const at::Tensor& x_in,
                        c10::string_view reduce, double alpha) {
  constexpr const char* op = "revgnn_ext.spmm_accumulate_";
  const Reduce r = parse_reduce(reduce, op);
  const at::Tensor x = check_features(x_in, op, "x", x_in.device());
  check_graph(rowptr, col, weight, x, op);
  const int64_t n = rowptr.numel() - 1, d = x.size(1);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == n && out.size(1) == d, op, ": out must have shape [", n,
                    ", ", d, "], got ", out.sizes());
  check_written(out, op, "out", x.device());
  const auto dtype = out.scalar_type();
  TORCH_CHECK_TYPE(at::promoteTypes(x.scalar_type(), dtype) == dtype, op, ": x (", x.scalar_type(),
              ") must have out's dtype ", dtype, " or a lower precision that converts to it exactly");
  TORCH_CHECK(!shares_elements(out, x), op, ": out shares elements with x; they may be column slices of one "
              "buffer, but their columns must not overlap");
  // A lower-precision x (bfloat16 from autocast beside a float32 out) is converted, exactly: the
  // sum runs in out's precision.
  const auto w = weight.has_value() ? c10::optional<at::Tensor>(weight->to(dtype)) : c10::nullopt;
  TORCH_CHECK(!w.has_value() || !shares_elements(out, w->unsqueeze(1)), op, ": out shares elements with weight");
  if (n > 0 && d > 0) K::forward(rowptr, col, w, x.to(dtype), r, out, at::Tensor(), alpha, true);
}

// The selection made by the forward, for the backward ops of max/min.
inline void check_arg(const at::Tensor& arg, Reduce r, const at::Tensor& rowptr, const at::Tensor& grad_out,
                      const char* op) {
  if (!selects_edge(r)) return;
  TORCH_CHECK_VALUE(arg.dim() == 2 && arg.size(0) == grad_out.size(0) && arg.size(1) == grad_out.size(1), op,
                    ": arg must have the shape of grad_out ", grad_out.sizes(), ", got ", arg.sizes());
  TORCH_CHECK_VALUE(arg.is_contiguous(), op, ": arg must be contiguous");
  check_index(arg.view(-1), op, "arg", rowptr.scalar_type(), grad_out.device());
}

template <typename K>
at::Tensor spmm_backward_x_op(const at::Tensor& rowptr, const at::Tensor& /*col*/, const at::Tensor& rowptr_t,
                              const at::Tensor& col_t, const at::Tensor& perm_t,
                              const c10::optional<at::Tensor>& weight,
                              const at::Tensor& grad_out_in, const at::Tensor& arg, c10::string_view reduce) {
  constexpr const char* op = "revgnn_ext.spmm_backward_x";
  const Reduce r = parse_reduce(reduce, op);
  const at::Tensor grad_out = check_features(grad_out_in, op, "grad_out", grad_out_in.device());
  check_graph(rowptr_t, col_t, weight, grad_out, op, "rowptr_t");
  check_index(rowptr, op, "rowptr", rowptr_t.scalar_type(), grad_out.device());
  check_rowptr(rowptr, col_t.numel(), op, "rowptr");
  check_index(perm_t, op, "perm_t", rowptr_t.scalar_type(), grad_out.device());
  TORCH_CHECK_VALUE(perm_t.numel() == col_t.numel(), op, ": perm_t must have one entry per edge (", col_t.numel(),
                    "), got ", perm_t.numel(), kRebuildGraph);
  TORCH_CHECK_VALUE(rowptr.numel() == grad_out.size(0) + 1, op, ": grad_out has ", grad_out.size(0),
                    " rows but the graph has ", rowptr.numel() - 1, " destination nodes");
  check_arg(arg, r, rowptr, grad_out, op);
  c10::optional<at::Tensor> weight_t;
  if (weight.has_value() && grad_out.size(1) > 0) {
    try {
      weight_t = weight->index_select(0, perm_t);
    } catch (const c10::IndexError&) {
      TORCH_CHECK_VALUE(false, op, ": perm_t holds an edge index out of range", kRebuildGraph);
    }
  }
  at::Tensor grad_x = at::empty({rowptr_t.numel() - 1, grad_out.size(1)}, grad_out.options());
  if (grad_x.numel() > 0) K::backward_x(rowptr, rowptr_t, col_t, perm_t, weight_t, grad_out, arg, r, grad_x);
  return grad_x;
}

template <typename K>
at::Tensor spmm_backward_weight_op(const at::Tensor& rowptr, const at::Tensor& col,
                                   const c10::optional<at::Tensor>& /*rowptr_t*/,
                                   const c10::optional<at::Tensor>& /*col_t*/,
                                   const c10::optional<at::Tensor>& /*perm_t*/, const at::Tensor& x_in,
                                   const at::Tensor& grad_out_in, const at::Tensor& arg, c10::string_view reduce) {
  constexpr const char* op = "revgnn_ext.spmm_backward_weight";
  const Reduce r = parse_reduce(reduce, op);
  const at::Tensor x = check_features(x_in, op, "x", x_in.device());
  const at::Tensor grad_out = check_features(grad_out_in, op, "grad_out", x.device());
  check_graph(rowptr, col, c10::nullopt, x, op);
  check_like_x(grad_out, x, op, "grad_out");
  TORCH_CHECK_VALUE(grad_out.size(0) == rowptr.numel() - 1 && grad_out.size(1) == x.size(1), op,
              ": grad_out must have shape [", rowptr.numel() - 1, ", ", x.size(1), "], got ", grad_out.sizes());
  check_arg(arg, r, rowptr, grad_out, op);
  at::Tensor grad_weight = at::empty({col.numel()}, x.options());
  if (col.numel() > 0) K::backward_weight(rowptr, col, x, grad_out, arg, r, grad_weight);
  return grad_weight;
}

// One registration for a device's kernels.
#define REVGNN_REGISTER_SPMM(DEVICE, K)                                              \
  TORCH_LIBRARY_IMPL(REVGNN_LIBRARY, DEVICE, m) {                                        \
    m.impl("spmm", &::revgnn_ext::spmm_op<K>);                                       \
    m.impl("spmm_accumulate_", &::revgnn_ext::spmm_accumulate_op<K>);                \
    m.impl("spmm_backward_x", &::revgnn_ext::spmm_backward_x_op<K>);                 \
    m.impl("spmm_backward_weight", &::revgnn_ext::spmm_backward_weight_op<K>);       \
  }

}  // namespace revgnn_ext
