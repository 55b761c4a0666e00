// What every op shares: the graph's row and index checks (host and device), the argument checks
// at the boundary (host), and one way to turn an enum (Reduce, Aggr) into a compile-time constant.
//
// Errors, one exception type per kind, in every op (TORCH_CHECK_TYPE / TORCH_CHECK_VALUE):
//   a bad dtype                                              TypeError
//   a bad shape, device, layout or name                      ValueError
//   a malformed graph (arrays that disagree, an index out
//   of range: the kernels' own checks included)              ValueError, as CSRGraph's validation
//   an in-place output that shares elements with an input    RuntimeError
// and each names the op and the argument.
//
// Floating dtypes: float32, float64, float16 and bfloat16 on both devices; float16/bfloat16 are
// computed in float32 (at::opmath_type) and rounded once per stored value. Index dtypes: int32
// or int64 (AT_DISPATCH_INDEX_TYPES), the same for every index tensor of a call.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

// The op library the kernels register under: revgnn_ext, or revgnn_ext_emu for the emulated build
// of the CUDA kernels (csrc/simt.h).
#ifndef REVGNN_LIBRARY
#define REVGNN_LIBRARY revgnn_ext
#endif

namespace revgnn_ext {

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

// Calls f(std::integral_constant<E, v>{}) for the v among Values that equals value.
template <typename E, E... Values, typename F>
void dispatch_enum(E value, const F& f) {
  const bool found = ((value == Values && (f(std::integral_constant<E, Values>{}), true)) || ...);
  TORCH_CHECK(found, "revgnn_ext: unknown enum value ", static_cast<int>(value));
}

// The enum value named `name` in `names` ({name, value} pairs); else an error listing the names.
template <typename E, size_t N>
E parse_enum(const std::string& name, const std::pair<const char*, E> (&names)[N], const char* op, const char* what) {
  std::string known;
  for (const auto& [text, value] : names) {
    if (name == text) return value;
    known += std::string(known.empty() ? "'" : ", '") + text + "'";
  }
  TORCH_CHECK_VALUE(false, op, ": ", what, " must be one of ", known, ", got '", name, "'");
}

// What the errors of a malformed graph tell the user to do.
constexpr const char* kRebuildGraph =
    "; the graph's tensors disagree (edited after the graph was built?): build graphs with "
    "revgnn_ext.CSRGraph and do not modify their tensors";

// An index a CPU kernel is about to follow, checked against its bound (the CUDA kernels assert).
template <typename index_t>
inline int64_t checked(index_t v, int64_t bound, const char* op, const char* what) {
  TORCH_CHECK_VALUE(static_cast<uint64_t>(v) < static_cast<uint64_t>(bound), op, ": ", what, " index ",
              static_cast<int64_t>(v), " is out of range [0, ", bound, ")", kRebuildGraph);
  return static_cast<int64_t>(v);
}

// Row i of a CPU kernel's CSR (`name`: rowptr or rowptr_t), checked with row_ok.
template <typename index_t>
inline RowRange checked_row(const index_t* rowptr, int64_t i, int64_t n, int64_t num_entries, const char* op,
                            const char* name) {
  const RowRange r{static_cast<int64_t>(rowptr[i]), static_cast<int64_t>(rowptr[i + 1])};
  TORCH_CHECK_VALUE(row_ok(i, n, r, num_entries), op, ": ", name, "[", i, "] = ", r.begin, " and ", name, "[",
                    i + 1, "] = ", r.end, " do not delimit a row of a CSR with ", num_entries, " entries (", name,
                    " must rise from 0 to ", num_entries, ")", kRebuildGraph);
  return r;
}

// A CSR's row pointer (already checked by check_index) against its entries: more than one row
// pointer when there are entries and, on CPU (two reads, no device sync), rowptr[0] == 0 and
// rowptr[-1] == num_entries. The kernels check every row they visit, the first and the last included.
inline void check_rowptr(const at::Tensor& rowptr, int64_t num_entries, const char* op, const char* name) {
  TORCH_CHECK_VALUE(rowptr.numel() >= 1, op, ": ", name, " must have num_rows + 1 >= 1 entries");
  TORCH_CHECK_VALUE(rowptr.numel() > 1 || num_entries == 0, op, ": ", name, " describes no rows but the graph has ",
                    num_entries, " edges", kRebuildGraph);
  if (!rowptr.is_cpu()) return;
  const auto value = [&](int64_t k) -> int64_t {
    return rowptr.scalar_type() == at::kInt ? rowptr.data_ptr<int32_t>()[k] : rowptr.data_ptr<int64_t>()[k];
  };
  const int64_t first = value(0), last = value(rowptr.numel() - 1);
  TORCH_CHECK_VALUE(first == 0 && last == num_entries, op, ": ", name,
                    " must start at 0 and end at the number of edges ", num_entries, ", got ", first, " and ", last,
                    kRebuildGraph);
}

// Index tensors: 1-D, contiguous, int32 or int64, on `device`, of the graph's index dtype.
inline void check_index(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                        const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must have the index dtype ", dtype,
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// x's rows against the graph's source nodes, where the op has the transposed CSR (rowptr_t:
// one entry per source node, and one more).
inline void check_source_rows(const at::Tensor& x, const c10::optional<at::Tensor>& rowptr_t, const char* op) {
  TORCH_CHECK_VALUE(!rowptr_t.has_value() || rowptr_t->numel() == x.size(0) + 1, op, ": x has ", x.size(0),
                    " rows but the graph has ", rowptr_t.has_value() ? rowptr_t->numel() - 1 : 0, " source nodes");
}

// The transposed CSR (rowptr_t, col_t, perm_t) of a graph with num_edges edges and index dtype
// `dtype`, whose sources are x's rows.
inline void check_transposed(const at::Tensor& rowptr_t, const at::Tensor& col_t, const at::Tensor& perm_t,
                             int64_t num_edges, at::ScalarType dtype, const at::Tensor& x, const char* op) {
  check_index(rowptr_t, op, "rowptr_t", dtype, x.device());
  check_index(col_t, op, "col_t", dtype, x.device());
  check_index(perm_t, op, "perm_t", dtype, x.device());
  check_source_rows(x, rowptr_t, op);
  TORCH_CHECK_VALUE(col_t.numel() == num_edges && perm_t.numel() == num_edges, op,
                    ": the transposed graph must have as many entries as the graph (", num_edges, ")",
                    kRebuildGraph);
  check_rowptr(rowptr_t, num_edges, op, "rowptr_t");
}

// A tensor the kernels read or write as values: a supported floating dtype, on `device`.
inline void check_values(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": ", name, " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ", dtype);
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
}

// Whether a 2-D tensor has contiguous channels and rows that do not overlap (a column slice of a
// wider row-major buffer is fine).
inline bool rows_of_channels(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
}

// Feature matrices the kernels read: 2-D [nodes, channels] values. Returns the tensor itself, or
// a contiguous copy when its channels are strided.
inline at::Tensor check_features(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D [nodes, channels], got shape ", t.sizes());
  check_values(t, op, name, device);
  return rows_of_channels(t) ? t : t.contiguous();
}

// Feature matrices the kernels write in place: as check_features, but the layout cannot be copied.
inline void check_written(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D [nodes, channels], got shape ", t.sizes());
  check_values(t, op, name, device);
  TORCH_CHECK_VALUE(rows_of_channels(t), op, ": ", name, " must have contiguous channels and non-overlapping rows "
                    "(a column slice is fine), got strides ", t.strides());
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

// A tensor read alongside x (a per-edge weight, edge features, parameters; `x_name`: the tensor
// it goes with): x's dtype and device.
inline void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name,
                         const char* x_name = "x") {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " differs from ",
                   x_name, " dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", expected ", x.device());
}

// The graph (rowptr, col) and the optional per-edge weight of an op reading x.
inline void check_graph(const at::Tensor& rowptr, const at::Tensor& col, const c10::optional<at::Tensor>& weight,
                        const at::Tensor& x, const char* op, const char* rowptr_name = "rowptr") {
  const auto device = x.device();
  TORCH_CHECK_TYPE(rowptr.scalar_type() == at::kInt || rowptr.scalar_type() == at::kLong, op,
                   ": rowptr must be int32 or int64, got ", rowptr.scalar_type());
  check_index(rowptr, op, "rowptr", rowptr.scalar_type(), device);
  check_index(col, op, "col", rowptr.scalar_type(), device);
  check_rowptr(rowptr, col.numel(), op, rowptr_name);
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == col.size(0), op, ": weight must have shape [",
                      col.size(0), "] (one value per edge), got ", weight->sizes());
    check_like_x(*weight, x, op, "weight");
  }
}

// Edge features and the encoder that the kernel applies to them: edge_attr [num_edges, F] with
// edge_weight [rows, F] (an nn.Linear(F, rows) weight), or edge_attr [num_edges, rows] alone
// (then it is `direct`: what the kernel takes it as), or neither; x's dtype and device.
inline void check_edge_encoder(const c10::optional<at::Tensor>& edge_attr,
                               const c10::optional<at::Tensor>& edge_weight, int64_t num_edges, int64_t rows,
                               const char* rows_name, const char* direct, const at::Tensor& x, const char* op) {
  if (!edge_attr.has_value()) {
    TORCH_CHECK_VALUE(!edge_weight.has_value(), op, ": edge_weight given without edge_attr");
    return;
  }
  const auto& a = *edge_attr;
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == num_edges, op, ": edge_attr must have one entry per edge: "
                    "shape [num_edges = ", num_edges, ", F], got ", a.sizes());
  check_like_x(a, x, op, "edge_attr");
  if (edge_weight.has_value()) {
    const auto& w = *edge_weight;
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == rows && w.size(1) == a.size(1), op, ": edge_weight must have "
                      "shape [", rows_name, " = ", rows, ", F = ", a.size(1), "] (an nn.Linear(F, ", rows_name,
                      ") weight), got ", w.sizes());
    check_like_x(w, x, op, "edge_weight");
  } else {
    TORCH_CHECK_VALUE(a.size(1) == rows, op, ": without edge_weight, edge_attr ", direct, " and must have ",
                      rows_name, " = ", rows, " columns, got ", a.size(1));
  }
}

}  // namespace revgnn_ext
