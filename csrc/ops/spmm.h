// spmm: sparse (CSR) × dense aggregation, its accumulate form and its two backward ops.
//
// Graph (see revgnn_ext/graph.py): CSR by destination.
//   rowptr [num_dst + 1], col [E] (source of each edge, in CSR order); int32 or int64, the
//   same dtype for both: 0 = rowptr[0] <= ... <= rowptr[num_dst] = E, 0 <= col < num_src.
//   CSRGraph validates this when it is built, but its tensors can still be edited in place
//   afterwards, and the raw ops take any arrays: so the ops check shapes and dtypes at the
//   boundary (on CPU also rowptr[0] == 0 and rowptr[-1] == E: two reads), and the kernels check
//   every row they visit (row_ok) and every index they follow (col against num_src, col_t
//   against num_dst, perm_t against E). A malformed graph raises a RuntimeError on CPU and fails
//   a device assert on CUDA (as PyTorch's own index ops do); no kernel reads out of bounds.
//   Transposed CSR (by source): rowptr_t [num_src + 1], col_t [E] (destination), perm_t [E]
//   (the CSR position of each transposed entry), same index dtype.
//   weight: optional [E] in CSR order, dtype of x.
//   x: [num_src, D], floating; rows may be strided (a column slice of a wider buffer) as long
//   as channels are contiguous (stride(1) == 1); otherwise the op makes a contiguous copy.
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
// spmm_backward_x(graph, weight?, grad_out, arg, reduce) -> grad_x
//   grad_x[j, c] = sum over transposed entries t of row j (edge e = perm_t[t] into i = col_t[t])
//   of w_e * grad_out[i, c] * s(i, c, e), s = 1 (sum), 1/deg(i) (mean), [arg[i, c] == e]
//   (max/min). A segment sum over the transposed CSR: deterministic, no atomics.
// spmm_backward_weight(graph, x, grad_out, arg, reduce) -> grad_weight [E] (CSR order)
//   grad_weight[e] = sum_c x[col_e, c] * grad_out[i, c] * s(i, c, e) for e in row i.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

#ifndef __CUDACC_RTC__
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <string>
#endif

namespace revgnn_ext {

enum class Reduce : int { Sum = 0, Mean = 1, Max = 2, Min = 3 };

template <Reduce R>
C10_HOST_DEVICE constexpr bool selects_edge() {
  return R == Reduce::Max || R == Reduce::Min;
}

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

// Row i's entries [begin, end) = [rowptr[i], rowptr[i + 1]) of a CSR with n rows and num_entries entries.
struct RowRange {
  int64_t begin, end;
};

// Whether a row is well formed: inside [0, num_entries], not decreasing, starting at 0 for the
// first row and ending at num_entries for the last. A compare per row, in every kernel's loop.
C10_HOST_DEVICE inline bool row_ok(int64_t i, int64_t n, const RowRange& r, int64_t num_entries) {
  return 0 <= r.begin && r.begin <= r.end && r.end <= num_entries && (i > 0 || r.begin == 0) &&
         (i < n - 1 || r.end == num_entries);
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

#ifndef __CUDACC_RTC__

inline Reduce parse_reduce(const std::string& reduce, const char* op) {
  if (reduce == "sum") return Reduce::Sum;
  if (reduce == "mean") return Reduce::Mean;
  if (reduce == "max") return Reduce::Max;
  if (reduce == "min") return Reduce::Min;
  TORCH_CHECK(false, op, ": reduce must be one of 'sum', 'mean', 'max', 'min', got '", reduce, "'");
}

// What the errors of a malformed graph tell the user to do.
constexpr const char* kRebuildGraph =
    "; the graph's tensors disagree (edited after the graph was built?): build graphs with "
    "revgnn_ext.CSRGraph and do not modify their tensors";

// An index a CPU kernel is about to follow, checked against its bound (the CUDA kernels assert).
template <typename index_t>
inline int64_t checked(index_t v, int64_t bound, const char* op, const char* what) {
  TORCH_CHECK(static_cast<uint64_t>(v) < static_cast<uint64_t>(bound), op, ": ", what, " index ",
              static_cast<int64_t>(v), " is out of range [0, ", bound, ")", kRebuildGraph);
  return static_cast<int64_t>(v);
}

// Row i of a CPU kernel's CSR (`name`: rowptr or rowptr_t), checked with row_ok.
template <typename index_t>
inline RowRange checked_row(const index_t* rowptr, int64_t i, int64_t n, int64_t num_entries, const char* op,
                            const char* name) {
  const RowRange r{static_cast<int64_t>(rowptr[i]), static_cast<int64_t>(rowptr[i + 1])};
  TORCH_CHECK(row_ok(i, n, r, num_entries), op, ": ", name, "[", i, "] = ", r.begin, " and ", name, "[", i + 1,
              "] = ", r.end, " do not delimit a row of a CSR with ", num_entries, " entries (", name,
              " must rise from 0 to ", num_entries, ")", kRebuildGraph);
  return r;
}

// A CSR's row pointer (already checked by check_index) against its entries: more than one row
// pointer when there are entries and, on CPU (two reads, no device sync), rowptr[0] == 0 and
// rowptr[-1] == num_entries. The kernels check every row they visit, the first and the last included.
inline void check_rowptr(const at::Tensor& rowptr, int64_t num_entries, const char* op, const char* name) {
  TORCH_CHECK(rowptr.numel() >= 1, op, ": ", name, " must have num_rows + 1 >= 1 entries");
  TORCH_CHECK(rowptr.numel() > 1 || num_entries == 0, op, ": ", name, " describes no rows but the graph has ",
              num_entries, " edges", kRebuildGraph);
  if (!rowptr.is_cpu()) return;
  const auto value = [&](int64_t k) -> int64_t {
    return rowptr.scalar_type() == at::kInt ? rowptr.data_ptr<int32_t>()[k] : rowptr.data_ptr<int64_t>()[k];
  };
  const int64_t first = value(0), last = value(rowptr.numel() - 1);
  TORCH_CHECK(first == 0 && last == num_entries, op, ": ", name, " must start at 0 and end at the number of edges ",
              num_entries, ", got ", first, " and ", last, kRebuildGraph);
}

// Index tensors: 1-D, contiguous, int32 or int64, on `device`, of the graph's index dtype.
inline void check_index(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                        const at::Device& device) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have the index dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Feature matrices: 2-D, floating, on `device`; channels contiguous (a column slice is fine).
// Returns the tensor itself, or a contiguous copy when its channels are strided.
inline at::Tensor check_features(const at::Tensor& t, const char* op, const char* name,
                                 const at::Device& device) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [nodes, channels], got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
  if (t.size(1) > 1 && t.stride(1) != 1) return t.contiguous();
  if (t.size(0) > 1 && t.stride(0) < t.size(1)) return t.contiguous();
  return t;
}

// The graph and the optional per-edge weight of any spmm op.
inline void check_graph(const at::Tensor& rowptr, const at::Tensor& col,
                        const c10::optional<at::Tensor>& weight, const at::Tensor& x, const char* op,
                        const char* rowptr_name = "rowptr") {
  const auto device = x.device();
  TORCH_CHECK(rowptr.scalar_type() == at::kInt || rowptr.scalar_type() == at::kLong, op,
              ": rowptr must be int32 or int64, got ", rowptr.scalar_type());
  check_index(rowptr, op, "rowptr", rowptr.scalar_type(), device);
  check_index(col, op, "col", rowptr.scalar_type(), device);
  check_rowptr(rowptr, col.numel(), op, rowptr_name);
  if (weight.has_value()) {
    const auto& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == col.size(0), op, ": weight must have shape [",
                col.size(0), "] (one value per edge), got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": weight dtype ", w.scalar_type(),
                " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(w.device() == device, op, ": weight is on ", w.device(), ", expected ", device);
  }
}

#endif  // __CUDACC_RTC__

}  // namespace revgnn_ext

#define REVGNN_DISPATCH_INDEX(TYPE, NAME, ...)                                         \
  [&] {                                                                                \
    if ((TYPE) == at::kInt) {                                                          \
      using index_t = int32_t;                                                         \
      return __VA_ARGS__();                                                            \
    }                                                                                  \
    TORCH_CHECK((TYPE) == at::kLong, NAME, ": index dtype must be int32 or int64");    \
    using index_t = int64_t;                                                           \
    return __VA_ARGS__();                                                              \
  }()

#define REVGNN_DISPATCH_REDUCE(R, ...)                          \
  [&] {                                                         \
    switch (R) {                                                \
      case ::revgnn_ext::Reduce::Sum: {                         \
        constexpr auto REDUCE = ::revgnn_ext::Reduce::Sum;      \
        return __VA_ARGS__();                                   \
      }                                                         \
      case ::revgnn_ext::Reduce::Mean: {                        \
        constexpr auto REDUCE = ::revgnn_ext::Reduce::Mean;     \
        return __VA_ARGS__();                                   \
      }                                                         \
      case ::revgnn_ext::Reduce::Max: {                         \
        constexpr auto REDUCE = ::revgnn_ext::Reduce::Max;      \
        return __VA_ARGS__();                                   \
      }                                                         \
      default: {                                                \
        constexpr auto REDUCE = ::revgnn_ext::Reduce::Min;      \
        return __VA_ARGS__();                                   \
      }                                                         \
    }                                                           \
  }()

#ifndef __CUDACC_RTC__
namespace revgnn_ext {

inline bool selects_edge(Reduce r) { return r == Reduce::Max || r == Reduce::Min; }

// The op layer, shared by the devices: argument checks and output allocation. K holds one
// device's kernels (cpu/spmm_cpu.cpp, cuda/spmm_cuda.cu):
//   K::check_dtype(dtype, op)
//   K::forward(rowptr, col, weight, x, reduce, out, arg, alpha, accumulate)
//     out = result (accumulate false) or out += alpha * result; arg undefined or [n, D].
//   K::backward_x(rowptr, rowptr_t, col_t, perm_t, weight, grad_out, arg, reduce, grad_x)
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
  const Reduce r = parse_reduce(std::string(reduce), op);
  const at::Tensor x = check_features(x_in, op, "x", x_in.device());
  K::check_dtype(x.scalar_type(), op);
  check_graph(rowptr, col, weight, x, op);
  TORCH_CHECK(!rowptr_t.has_value() || rowptr_t->numel() == x.size(0) + 1, op, ": x has ", x.size(0),
              " rows but the graph has ", rowptr_t.has_value() ? rowptr_t->numel() - 1 : 0, " source nodes");
  const int64_t n = rowptr.numel() - 1, d = x.size(1);
  at::Tensor out = at::empty({n, d}, x.options());
  at::Tensor arg = selects_edge(r) ? at::empty({n, d}, rowptr.options()) : at::empty({0}, rowptr.options());
  if (n > 0 && d > 0) K::forward(rowptr, col, weight, x, r, out, arg, 1.0, false);
  return {out, arg};
}

// Whether two 2-D tensors with contiguous channels may share elements. Column slices of one
// row-major buffer with disjoint column ranges do not; any other sharing of storage counts.
inline bool shares_elements(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      a.storage().data() != b.storage().data())
    return false;
  if (a.dtype() != b.dtype() || a.stride(0) != b.stride(0)) return true;
  const int64_t s = a.stride(0);
  if (s <= 0) return true;
  const int64_t ca = a.storage_offset() % s, cb = b.storage_offset() % s;
  const bool disjoint = ca + a.size(1) <= cb || cb + b.size(1) <= ca;
  return !disjoint || ca + a.size(1) > s || cb + b.size(1) > s;
}

template <typename K>
void spmm_accumulate_op(const at::Tensor& out, const at::Tensor& rowptr, const at::Tensor& col,
                        const c10::optional<at::Tensor>& weight, const at::Tensor& x_in,
                        c10::string_view reduce, double alpha) {
  constexpr const char* op = "revgnn_ext.spmm_accumulate_";
  const Reduce r = parse_reduce(std::string(reduce), op);
  const at::Tensor x = check_features(x_in, op, "x", x_in.device());
  K::check_dtype(x.scalar_type(), op);
  check_graph(rowptr, col, weight, x, op);
  const int64_t n = rowptr.numel() - 1, d = x.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == n && out.size(1) == d, op, ": out must have shape [", n,
              ", ", d, "], got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out dtype ", out.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(out.device() == x.device(), op, ": out is on ", out.device(), ", expected ", x.device());
  TORCH_CHECK((d <= 1 || out.stride(1) == 1) && (n <= 1 || out.stride(0) >= d), op,
              ": out must have contiguous channels and non-overlapping rows (a column slice is fine), "
              "got strides ", out.strides());
  TORCH_CHECK(!shares_elements(out, x), op, ": out shares elements with x; they may be column slices of one "
              "buffer, but their columns must not overlap");
  if (n > 0 && d > 0) K::forward(rowptr, col, weight, x, r, out, at::Tensor(), alpha, true);
}

// The selection made by the forward, for the backward ops of max/min.
inline void check_arg(const at::Tensor& arg, Reduce r, const at::Tensor& rowptr, const at::Tensor& grad_out,
                      const char* op) {
  if (!selects_edge(r)) return;
  TORCH_CHECK(arg.dim() == 2 && arg.size(0) == grad_out.size(0) && arg.size(1) == grad_out.size(1), op,
              ": arg must have the shape of grad_out ", grad_out.sizes(), ", got ", arg.sizes());
  check_index(arg.view(-1), op, "arg", rowptr.scalar_type(), grad_out.device());
  TORCH_CHECK(arg.is_contiguous(), op, ": arg must be contiguous");
}

template <typename K>
at::Tensor spmm_backward_x_op(const at::Tensor& rowptr, const at::Tensor& /*col*/, const at::Tensor& rowptr_t,
                              const at::Tensor& col_t, const at::Tensor& perm_t,
                              const c10::optional<at::Tensor>& weight,
                              const at::Tensor& grad_out_in, const at::Tensor& arg, c10::string_view reduce) {
  constexpr const char* op = "revgnn_ext.spmm_backward_x";
  const Reduce r = parse_reduce(std::string(reduce), op);
  const at::Tensor grad_out = check_features(grad_out_in, op, "grad_out", grad_out_in.device());
  K::check_dtype(grad_out.scalar_type(), op);
  check_graph(rowptr_t, col_t, weight, grad_out, op, "rowptr_t");
  check_index(rowptr, op, "rowptr", rowptr_t.scalar_type(), grad_out.device());
  check_rowptr(rowptr, col_t.numel(), op, "rowptr");
  check_index(perm_t, op, "perm_t", rowptr_t.scalar_type(), grad_out.device());
  TORCH_CHECK(perm_t.numel() == col_t.numel(), op, ": perm_t must have one entry per edge (", col_t.numel(),
              "), got ", perm_t.numel());
  TORCH_CHECK(rowptr.numel() == grad_out.size(0) + 1, op, ": grad_out has ", grad_out.size(0),
              " rows but the graph has ", rowptr.numel() - 1, " destination nodes");
  check_arg(arg, r, rowptr, grad_out, op);
  at::Tensor grad_x = at::empty({rowptr_t.numel() - 1, grad_out.size(1)}, grad_out.options());
  if (grad_x.numel() > 0) K::backward_x(rowptr, rowptr_t, col_t, perm_t, weight, grad_out, arg, r, grad_x);
  return grad_x;
}

template <typename K>
at::Tensor spmm_backward_weight_op(const at::Tensor& rowptr, const at::Tensor& col,
                                   const c10::optional<at::Tensor>& /*rowptr_t*/,
                                   const c10::optional<at::Tensor>& /*col_t*/,
                                   const c10::optional<at::Tensor>& /*perm_t*/, const at::Tensor& x_in,
                                   const at::Tensor& grad_out_in, const at::Tensor& arg, c10::string_view reduce) {
  constexpr const char* op = "revgnn_ext.spmm_backward_weight";
  const Reduce r = parse_reduce(std::string(reduce), op);
  const at::Tensor x = check_features(x_in, op, "x", x_in.device());
  const at::Tensor grad_out = check_features(grad_out_in, op, "grad_out", x.device());
  K::check_dtype(x.scalar_type(), op);
  check_graph(rowptr, col, c10::nullopt, x, op);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out dtype ", grad_out.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(grad_out.size(0) == rowptr.numel() - 1 && grad_out.size(1) == x.size(1), op,
              ": grad_out must have shape [", rowptr.numel() - 1, ", ", x.size(1), "], got ", grad_out.sizes());
  check_arg(arg, r, rowptr, grad_out, op);
  at::Tensor grad_weight = at::empty({col.numel()}, x.options());
  if (col.numel() > 0) K::backward_weight(rowptr, col, x, grad_out, arg, r, grad_weight);
  return grad_weight;
}

// One registration for a device's kernels.
#define REVGNN_REGISTER_SPMM(DEVICE, K)                                              \
  TORCH_LIBRARY_IMPL(revgnn_ext, DEVICE, m) {                                        \
    m.impl("spmm", &::revgnn_ext::spmm_op<K>);                                       \
    m.impl("spmm_accumulate_", &::revgnn_ext::spmm_accumulate_op<K>);                \
    m.impl("spmm_backward_x", &::revgnn_ext::spmm_backward_x_op<K>);                 \
    m.impl("spmm_backward_weight", &::revgnn_ext::spmm_backward_weight_op<K>);       \
  }

}  // namespace revgnn_ext
#endif  // __CUDACC_RTC__
