// gat_aggregate: GAT's attention softmax and aggregation, fused, with no [E, H*C] nor [E, H] tensor.
//
// The contract is revgnn_ext.reference.gat_aggregate (values, gradients and the attention-dropout
// draw, bit for bit); this op takes its per-edge tensors in CSR order. Graph and x conventions as in
// ops/spmm.h (rowptr, col; the transposed CSR rowptr_t, col_t, perm_t; x rows may be strided).
//   perm      undefined, or [E] index dtype: the caller's id of each CSR edge (CSRGraph.perm); the
//             dropout draw hashes the id (the CSR position itself when perm is undefined).
//   x         [num_src, H*C], head h in columns h*C .. (h+1)*C.
//   src_score [num_src, H]; dst_score [num_dst, H] or undefined.
//   edge_attr [E, F] with edge_weight [H, F] (e = edge_attr @ edge_weight.T, computed in the kernel),
//             or [E, H] (the edge scores) without edge_weight, or undefined (e = 0).
//   edge_keep bool [E] or undefined (all kept).
// Per destination i and head h, over the kept in-edges k = (j -> i):
//   z_kh = src_score[j, h] + dst_score[i, h] + e_kh,  a = leaky_relu(z, slope),
//   alpha = exp(a - L_ih), L_ih = log sum_k exp(a_kh)   (one pass: gat_softmax_join)
//   out[i, h*C + c] = sum_k alpha_kh drop_kh x[j, h*C + c]
// drop = 1 when p = attn_dropout is 0; else keep(seed, id, h) / (1 - p) (0 at p = 1), the draw of
// reference.gat_dropout_keep (gat_dropout_key, gat_edge_hash, gat_keeps below). Rows with no kept
// in-edge give 0 (and L = 0).
//
// gat_aggregate(graph, perm?, x, src_score, dst_score?, edge_attr?, edge_weight?, edge_keep?, slope, p,
//               seed) -> (out [num_dst, H*C], lse [num_dst, H] in opmath precision: L)
// gat_aggregate_accumulate_(out, rowptr, col, perm?, x, ..., seed, alpha) -> ()
//   out += alpha * gat_aggregate(...).out, in place, without a temporary; out [num_dst, H*C] of x's
//   dtype may be a column slice of a wider buffer but must not share elements with x.
// gat_aggregate_backward(graph, perm?, x, ..., out, lse, grad_out, slope, p, seed, output_mask[5])
//     -> (grad_x, grad_src_score, grad_dst_score, grad_edge_attr, grad_edge_weight), [0] where the
//   mask is false or the input undefined. With g = grad_out[i, head h], q_k = <g, x[j, head h]>,
//   r_ih = <g, out[i, head h]> (= sum_k alpha drop q):
//     grad_x[j, head h]  += alpha_kh drop_kh g            (over the transposed CSR: no atomics)
//     dz_kh = leaky'(z_kh) alpha_kh (drop_kh q_k - r_ih)  (softmax's backward, gat_score_grad)
//     grad_src_score[j, h] = sum over j's out-edges of dz  (transposed CSR);
//     grad_dst_score[i, h] = sum over i's in-edges of dz   (CSR);
//     grad_edge_attr[k] = dz_k @ edge_weight (or dz_k itself; 0 for a dropped edge);
//     grad_edge_weight = sum_k dz_k^T edge_attr[k], one partial sum per fixed block of rows, the
//     blocks then added in order. alpha is recomputed from L; nothing per edge is stored.
#pragma once

#include <ATen/OpMathType.h>

#include <array>
#include <cmath>
#include <cstdint>

#include "ops/common.h"

namespace revgnn_ext {

// ------------------------------------------------------------------ the attention-dropout draw
// The bijective 32-bit mixer of reference._mix32.
C10_HOST_DEVICE inline uint32_t gat_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// The per-call key of a seed (taken mod 2^64).
C10_HOST_DEVICE inline uint32_t gat_dropout_key(uint64_t seed) {
  return gat_mix32(gat_mix32(static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(seed >> 32));
}

// The per-edge hash of the caller's edge id.
C10_HOST_DEVICE inline uint32_t gat_edge_hash(uint32_t key, uint64_t id) {
  return gat_mix32(gat_mix32(key ^ static_cast<uint32_t>(id)) ^ static_cast<uint32_t>(id >> 32));
}

// Whether head h of an edge with hash `edge_hash` is kept: its draw at or above floor(p * 2^32).
C10_HOST_DEVICE inline bool gat_keeps(uint32_t edge_hash, int64_t head, uint64_t threshold) {
  return gat_mix32(edge_hash ^ static_cast<uint32_t>(head)) >= threshold;
}

// The factor of head h of an edge in out: 1 without dropout, else scale = 1 / (1 - p) if kept, 0 if not.
template <typename T>
C10_HOST_DEVICE inline T gat_drop(bool dropout, uint32_t edge_hash, int64_t head, uint64_t threshold, T scale) {
  return !dropout ? T(1) : gat_keeps(edge_hash, head, threshold) ? scale : T(0);
}

// ------------------------------------------------------------------ scores and the softmax
template <typename T>
C10_HOST_DEVICE inline T gat_leaky(T z, T slope) {
  return z > T(0) ? z : z * slope;
}

// One kept edge with score a joins its row's running softmax (max; sum = sum_k exp(a_k - max)),
// started at max = -inf, sum = 0. Returns the edge's weight in the running weighted mean of the
// messages: mean += (m - mean) * weight; at the row's end mean = sum_k softmax_k m_k and
// L = max + log(sum). One exp per edge and head; a new maximum rescales the sum, not the mean.
// NaN scores give NaN.
template <typename T>
C10_HOST_DEVICE inline T gat_softmax_join(T a, T& max, T& sum) {
  const bool bigger = a > max;
  const T d = std::exp(bigger ? max - a : a - max);
  sum = bigger ? sum * d + T(1) : sum + d;
  max = bigger ? a : max;
  return (bigger ? T(1) : d) / sum;
}

// The gradient at the pre-activation score z of one kept edge and head (softmax's backward:
// dz = leaky'(z) alpha (drop q - r)); `weight` gets the edge's weight alpha * drop in out.
template <typename T>
C10_HOST_DEVICE inline T gat_score_grad(T z, T slope, T lse, T drop, T q, T r, T& weight) {
  const T alpha = std::exp(gat_leaky(z, slope) - lse);
  weight = alpha * drop;
  return (z > T(0) ? T(1) : slope) * alpha * (drop * q - r);
}

// ------------------------------------------------------------------ checked inputs
struct GatInputs {
  at::Tensor rowptr, col, perm;        // CSR by destination; perm undefined or [E]
  at::Tensor rowptr_t, col_t, perm_t;  // transposed CSR (backward only)
  at::Tensor x;                        // [num_src, H*C], channels contiguous, rows strided
  at::Tensor src, dst;                 // [num_src, H], [num_dst, H] (dst undefined) contiguous
  at::Tensor edge_attr, weight;        // [E, F] and [H, F] contiguous, or [E, H] and undefined, or neither
  at::Tensor keep;                     // bool [E] contiguous, or undefined
  double slope = 0.2, p = 0;
  uint32_t key = 0;                    // gat_dropout_key(seed)
  uint64_t threshold = 0;              // floor(p * 2^32)
  double drop_scale = 1;               // 1 / (1 - p) (0 at p = 1)
  int64_t num_dst = 0, heads = 1, c = 0, f = 0, num_edges = 0;
};

// A [rows, H] score matrix of x's dtype and device, made contiguous.
inline at::Tensor check_scores(const at::Tensor& s, int64_t rows, int64_t heads, const at::Tensor& x, const char* op,
                               const char* name, const char* rows_name) {
  TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == rows && s.size(1) == heads, op, ": ", name, " must have shape [",
                    rows_name, " = ", rows, ", heads = ", heads, "], got ", s.sizes());
  check_like_x(s, x, op, name);
  return s.contiguous();
}

inline GatInputs check_gat_inputs(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
                                  const c10::optional<at::Tensor>& perm, const at::Tensor& x_in,
                                  const at::Tensor& src_score, const c10::optional<at::Tensor>& dst_score,
                                  const c10::optional<at::Tensor>& edge_attr,
                                  const c10::optional<at::Tensor>& edge_weight,
                                  const c10::optional<at::Tensor>& edge_keep, double slope, double p, int64_t seed) {
  GatInputs in;
  in.x = check_features(x_in, op, "x", x_in.device());
  check_graph(rowptr, col, c10::nullopt, in.x, op);
  in.rowptr = rowptr;
  in.col = col;
  in.num_dst = rowptr.numel() - 1;
  in.num_edges = col.numel();
  const auto dev = in.x.device();
  if (perm.has_value()) {
    check_index(*perm, op, "perm", rowptr.scalar_type(), dev);
    TORCH_CHECK_VALUE(perm->numel() == in.num_edges, op, ": perm must have one entry per edge (", in.num_edges,
                      "), got ", perm->numel());
    in.perm = *perm;
  }
  TORCH_CHECK_VALUE(src_score.dim() == 2 && src_score.size(1) >= 1, op,
                    ": src_score must be a 2-D tensor [num_src, heads] with heads >= 1, got shape ", src_score.sizes());
  in.heads = src_score.size(1);
  TORCH_CHECK_VALUE(in.x.size(1) % in.heads == 0, op, ": x has ", in.x.size(1), " channels, which do not split into ",
                    in.heads, " heads (src_score's columns)");
  in.c = in.x.size(1) / in.heads;
  in.src = check_scores(src_score, in.x.size(0), in.heads, in.x, op, "src_score", "num_src");
  if (dst_score.has_value()) in.dst = check_scores(*dst_score, in.num_dst, in.heads, in.x, op, "dst_score", "num_dst");
  check_edge_encoder(edge_attr, edge_weight, in.num_edges, in.heads, "heads", "holds the edge scores", in.x, op);
  if (edge_attr.has_value()) {
    in.edge_attr = edge_attr->contiguous();
    in.f = edge_attr->size(1);
    if (edge_weight.has_value()) in.weight = edge_weight->contiguous();
  }
  if (edge_keep.has_value()) {
    const auto& k = *edge_keep;
    TORCH_CHECK_TYPE(k.scalar_type() == at::kBool, op, ": edge_keep must be a bool tensor, got ", k.scalar_type());
    TORCH_CHECK_VALUE(k.dim() == 1 && k.numel() == in.num_edges, op, ": edge_keep must have one entry per edge (",
                      in.num_edges, "), got shape ", k.sizes());
    TORCH_CHECK_VALUE(k.device() == dev, op, ": edge_keep is on ", k.device(), ", expected ", dev);
    in.keep = k.contiguous();
  }
  TORCH_CHECK_VALUE(std::isfinite(slope), op, ": negative_slope must be finite, got ", slope);
  TORCH_CHECK_VALUE(p >= 0 && p <= 1, op, ": attn_dropout must be in [0, 1], got ", p);
  in.slope = slope;
  in.p = p;
  in.key = gat_dropout_key(static_cast<uint64_t>(seed));
  in.threshold = static_cast<uint64_t>(p * 4294967296.0);
  in.drop_scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
  return in;
}

inline at::ScalarType gat_state_dtype(const GatInputs& in) { return at::toOpMathType(in.x.scalar_type()); }

// The raw pointers the kernels read an edge's score, mask and draw from, shared by CPU and CUDA.
template <typename scalar_t, typename index_t>
struct GatEdges {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* src;     // [num_src, H]
  const scalar_t* dst;     // [num_dst, H] or null
  const scalar_t* attr;    // [E, F] or [E, H], or null
  const scalar_t* weight;  // [H, F] or null
  const bool* keep;        // [E] or null
  const index_t* perm;     // [E] or null
  int64_t heads, f;
  acc_t slope, drop_scale;
  uint32_t key;
  uint64_t threshold;
  bool dropout;

  explicit GatEdges(const GatInputs& in)
      : src(in.src.data_ptr<scalar_t>()), dst(in.dst.defined() ? in.dst.data_ptr<scalar_t>() : nullptr),
        attr(in.edge_attr.defined() ? in.edge_attr.data_ptr<scalar_t>() : nullptr),
        weight(in.weight.defined() ? in.weight.data_ptr<scalar_t>() : nullptr),
        keep(in.keep.defined() ? in.keep.data_ptr<bool>() : nullptr),
        perm(in.perm.defined() ? in.perm.data_ptr<index_t>() : nullptr), heads(in.heads), f(in.f),
        slope(static_cast<acc_t>(in.slope)), drop_scale(static_cast<acc_t>(in.drop_scale)), key(in.key),
        threshold(in.threshold), dropout(in.p > 0) {}

  C10_HOST_DEVICE bool kept(int64_t e) const { return keep == nullptr || keep[e]; }

  // The draw's hash of CSR edge e (its caller's id: perm[e], or e itself).
  C10_HOST_DEVICE uint32_t hash(int64_t e) const {
    return dropout ? gat_edge_hash(key, static_cast<uint64_t>(perm != nullptr ? static_cast<int64_t>(perm[e]) : e))
                   : 0u;
  }

  C10_HOST_DEVICE acc_t drop(uint32_t edge_hash, int64_t h) const {
    return gat_drop<acc_t>(dropout, edge_hash, h, threshold, drop_scale);
  }

  // z = src_score[j, h] + dst_score[i, h] + e_h of CSR edge e = (j -> i).
  C10_HOST_DEVICE acc_t z(int64_t i, int64_t j, int64_t e, int64_t h) const {
    acc_t v = static_cast<acc_t>(src[j * heads + h]);
    if (dst != nullptr) v += static_cast<acc_t>(dst[i * heads + h]);
    if (attr != nullptr) {
      if (weight == nullptr) {
        v += static_cast<acc_t>(attr[e * heads + h]);
      } else {
        acc_t s = acc_t(0);
        for (int64_t k = 0; k < f; ++k)
          s += static_cast<acc_t>(attr[e * f + k]) * static_cast<acc_t>(weight[h * f + k]);
        v += s;
      }
    }
    return v;
  }
};

// The five gradients, allocated where wanted (undefined otherwise); grads.x [num_src, H*C] contiguous.
struct GatGrads {
  at::Tensor x, src, dst, edge_attr, weight;
};

// K holds one device's kernels (cpu/gat_aggregate_cpu.cpp, cuda/gat_aggregate_cuda.cu):
//   K::forward(in, out, lse, alpha)   out[i] = agg_i (lse defined: also L) or out[i] += alpha agg_i
//                                     (lse undefined: the accumulate form); num_dst > 0, H*C > 0
//   K::backward(in, out, lse, grad_out, grads)  every defined gradient fully written
template <typename K>
std::tuple<at::Tensor, at::Tensor> gat_aggregate_op(
    const at::Tensor& rowptr, const at::Tensor& col, const c10::optional<at::Tensor>& rowptr_t,
    const c10::optional<at::Tensor>& /*col_t*/, const c10::optional<at::Tensor>& /*perm_t*/,
    const c10::optional<at::Tensor>& perm, const at::Tensor& x, const at::Tensor& src_score,
    const c10::optional<at::Tensor>& dst_score, const c10::optional<at::Tensor>& edge_attr,
    const c10::optional<at::Tensor>& edge_weight, const c10::optional<at::Tensor>& edge_keep, double slope,
    double p, int64_t seed) {
  constexpr const char* op = "revgnn_ext.gat_aggregate";
  const GatInputs in =
      check_gat_inputs(op, rowptr, col, perm, x, src_score, dst_score, edge_attr, edge_weight, edge_keep, slope, p,
                       seed);
  check_source_rows(in.x, rowptr_t, op);
  at::Tensor out = at::empty({in.num_dst, in.x.size(1)}, in.x.options());
  at::Tensor lse = at::empty({in.num_dst, in.heads}, in.x.options().dtype(gat_state_dtype(in)));
  if (in.num_dst > 0 && in.c > 0) K::forward(in, out, lse, 1.0);
  return {out, lse};
}

template <typename K>
void gat_aggregate_accumulate_op(const at::Tensor& out, const at::Tensor& rowptr, const at::Tensor& col,
                                 const c10::optional<at::Tensor>& perm, const at::Tensor& x,
                                 const at::Tensor& src_score, const c10::optional<at::Tensor>& dst_score,
                                 const c10::optional<at::Tensor>& edge_attr,
                                 const c10::optional<at::Tensor>& edge_weight,
                                 const c10::optional<at::Tensor>& edge_keep, double slope, double p, int64_t seed,
                                 double alpha) {
  constexpr const char* op = "revgnn_ext.gat_aggregate_accumulate_";
  const GatInputs in =
      check_gat_inputs(op, rowptr, col, perm, x, src_score, dst_score, edge_attr, edge_weight, edge_keep, slope, p,
                       seed);
  check_written(out, op, "out", in.x.device());
  TORCH_CHECK_VALUE(out.size(0) == in.num_dst && out.size(1) == in.x.size(1), op, ": out must have shape [",
                    in.num_dst, ", ", in.x.size(1), "], got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == in.x.scalar_type(), op, ": out dtype ", out.scalar_type(),
                   " differs from x dtype ", in.x.scalar_type());
  TORCH_CHECK(!shares_elements(out, in.x), op, ": out must not share elements with x (other column slices of one "
              "buffer are fine)");
  for (const auto* t : {&in.src, &in.dst, &in.edge_attr, &in.weight})
    TORCH_CHECK(!t->defined() || !shares_elements(out, *t), op,
                ": out must not share elements with the scores or edge tensors");
  if (in.num_dst > 0 && in.c > 0) K::forward(in, out, at::Tensor(), alpha);
}

template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gat_aggregate_backward_op(
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& rowptr_t, const at::Tensor& col_t,
    const at::Tensor& perm_t, const c10::optional<at::Tensor>& perm, const at::Tensor& x, const at::Tensor& src_score,
    const c10::optional<at::Tensor>& dst_score, const c10::optional<at::Tensor>& edge_attr,
    const c10::optional<at::Tensor>& edge_weight, const c10::optional<at::Tensor>& edge_keep, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_out_in, double slope, double p, int64_t seed,
    std::array<bool, 5> output_mask) {
  constexpr const char* op = "revgnn_ext.gat_aggregate_backward";
  GatInputs in = check_gat_inputs(op, rowptr, col, perm, x, src_score, dst_score, edge_attr, edge_weight, edge_keep,
                                  slope, p, seed);
  check_transposed(rowptr_t, col_t, perm_t, in.num_edges, in.rowptr.scalar_type(), in.x, op);
  in.rowptr_t = rowptr_t;
  in.col_t = col_t;
  in.perm_t = perm_t;
  const auto dev = in.x.device();
  const int64_t d = in.x.size(1);
  const at::Tensor grad_out = check_features(grad_out_in, op, "grad_out", dev).contiguous();
  check_like_x(grad_out, in.x, op, "grad_out");
  TORCH_CHECK_VALUE(grad_out.size(0) == in.num_dst && grad_out.size(1) == d, op, ": grad_out must be [", in.num_dst,
                    ", ", d, "], got ", grad_out.sizes());
  check_like_x(out, in.x, op, "out");
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == in.num_dst && out.size(1) == d && out.is_contiguous(), op,
                    ": out must be the contiguous [", in.num_dst, ", ", d, "] output of gat_aggregate");
  TORCH_CHECK_TYPE(lse.scalar_type() == gat_state_dtype(in), op, ": lse must be the ", gat_state_dtype(in),
                   " state returned by gat_aggregate, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == in.num_dst && lse.size(1) == in.heads && lse.is_contiguous() &&
                        lse.device() == dev,
                    op, ": lse must be the contiguous [", in.num_dst, ", ", in.heads, "] state returned by "
                    "gat_aggregate");
  GatGrads grads;
  if (output_mask[0]) grads.x = at::zeros({in.x.size(0), d}, in.x.options());
  if (output_mask[1]) grads.src = at::zeros_like(in.src);
  if (output_mask[2] && in.dst.defined()) grads.dst = at::zeros_like(in.dst);
  if (output_mask[3] && in.edge_attr.defined()) grads.edge_attr = at::zeros_like(in.edge_attr);
  if (output_mask[4] && in.weight.defined()) grads.weight = at::zeros_like(in.weight);
  if (in.num_edges > 0 && in.c > 0) K::backward(in, out, lse, grad_out, grads);
  auto or_none = [&](const at::Tensor& g) { return g.defined() ? g : at::empty({0}, in.x.options()); };
  return {or_none(grads.x), or_none(grads.src), or_none(grads.dst), or_none(grads.edge_attr), or_none(grads.weight)};
}

#define REVGNN_REGISTER_GAT_AGGREGATE(DEVICE, K)                                                   \
  TORCH_LIBRARY_IMPL(REVGNN_LIBRARY, DEVICE, m) {                                                      \
    m.impl("gat_aggregate", &::revgnn_ext::gat_aggregate_op<K>);                                   \
    m.impl("gat_aggregate_accumulate_", &::revgnn_ext::gat_aggregate_accumulate_op<K>);           \
    m.impl("gat_aggregate_backward", &::revgnn_ext::gat_aggregate_backward_op<K>);                 \
  }

}  // namespace revgnn_ext
