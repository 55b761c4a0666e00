// gen_aggregate: GENConv's message construction and aggregation, fused, with no [E, D] tensor.
//
// Graph, x and index conventions as in ops/spmm.h (rowptr, col, and the transposed CSR
// rowptr_t, col_t, perm_t; x [num_src, D] with contiguous channels and any row stride).
//
// Edge embedding of CSR edge e, channel c (all edge tensors in CSR order):
//   edge_attr absent:                        emb = 0            (edge_weight/bias absent too)
//   edge_attr [E, F], edge_weight [D, F]:    emb = sum_f edge_weight[c, f] * edge_attr[e, f]
//                                                  + edge_bias[c] (bias optional)
//   edge_attr [E, D], edge_weight absent:    emb = edge_attr[e, c]    (given directly)
// Message:  m = relu(x[col_e, c] + emb) + eps.
// Aggregation over the in-edges of row i, per channel c (deg = in-degree of i):
//   sum:       sum_e m                 mean: sum_e m / deg            max: max_e m
//   softmax:   sum_e a_e m_e, a_e = exp(t_c m_e - L), L = log sum_e exp(t_c m_e)   (PyG's
//              SoftmaxAggregation), computed in one pass with an online max and rescaling.
//   powermean: PyG's PowerMeanAggregation with its clamps to [1e-4, 100]:
//              r = sum_e clamp(m_e)^p_c / deg,  out = clamp(r)^(1 / p_c).
// Rows with no in-edges give 0 — except powermean, which follows PyG: clamp(0)^(1/p).
// t (softmax) and p (powermean) are tensors of 1 (shared) or D (per channel) values.
//
// gen_aggregate(graph, x, edge_attr?, edge_weight?, edge_bias?, t?, p?, aggr, eps) -> (out, state)
//   out [num_dst, D]; state [num_dst, D], what the backward needs besides out:
//   softmax: L (the log-normalizer); powermean: r (the clamped-input mean before its clamp);
//   max: the CSR position of the selected edge (index dtype, -1 for an empty row; ties keep
//   the first edge, NaN is selected over numbers); sum/mean: empty [0].
//   For float16/bfloat16 x, a floating state is float32.
// gen_aggregate_backward(graph, x, edge_attr?, edge_weight?, edge_bias?, t?, p?, out, state,
//                        grad_out, aggr, eps)
//     -> (grad_x, grad_edge_attr, grad_edge_weight, grad_edge_bias, grad_t, grad_p)
//   The gradient of each defined input ([0] for an absent one). Messages are recomputed from
//   edge_attr: two passes, one over the transposed CSR (grad_x, a segment sum per source) and
//   one over the CSR (per-edge grad_edge_attr; grad_edge_weight, grad_edge_bias, grad_t, grad_p
//   summed per fixed block of rows, then over blocks in order). Deterministic, no atomics.
//
// Per (edge, channel) derivative of out_ic with respect to m (times g = grad_out[i, c]):
//   sum: g;  mean: g / deg;  max: g [arg == e];
//   softmax: g a (1 + t (m - out));         d/dt: g a m (m - out)
//   powermean: g [1e-4 <= r <= 100] (1/p) r^(1/p - 1) * [1e-4 <= m <= 100] p m^(p-1) / deg;
//              d/dp: g out (-log(clamp r) / p^2 + [r in range] (sum_e q_e log(clamp m_e) / deg) / (p clamp r)),
//              q_e = clamp(m_e)^p.
// then through the ReLU: d pre = d m [x + emb > 0].
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>

#include "ops/spmm.h"

namespace revgnn_ext {

enum class Aggr : int { Sum = 0, Mean = 1, Max = 2, Softmax = 3, PowerMean = 4 };

// PyG's PowerMeanAggregation clamps its input and its mean to this range.
constexpr double kPowerMin = 1e-4;
constexpr double kPowerMax = 100.0;

// relu(pre) + eps; NaN stays NaN.
template <typename T>
C10_HOST_DEVICE inline T gen_message(T pre, T eps) {
  return (pre < T(0) ? T(0) : pre) + eps;
}

// clamp to [1e-4, 100]; NaN stays NaN.
template <typename T>
C10_HOST_DEVICE inline T power_clamp(T v) {
  return v < T(kPowerMin) ? T(kPowerMin) : (v > T(kPowerMax) ? T(kPowerMax) : v);
}

// torch.clamp's gradient mask (inclusive bounds).
template <typename T>
C10_HOST_DEVICE inline bool power_in_range(T v) {
  return v >= T(kPowerMin) && v <= T(kPowerMax);
}

// Online softmax of one (row, channel): after the row's first edge (max = v, sum = 1, acc = m),
// each further edge with score v = t m arrives with d = exp(-|v - max|), the only exp needed:
// a new maximum rescales what was summed by d, any other value adds with weight d.
template <typename T>
C10_HOST_DEVICE inline void softmax_push(T v, T m, T d, T& max, T& sum, T& acc) {
  if (v > max) {
    sum = sum * d + T(1);
    acc = acc * d + m;
    max = v;
  } else {
    sum += d;
    acc += d * m;
  }
}

}  // namespace revgnn_ext

#ifndef __CUDACC_RTC__
namespace revgnn_ext {

inline Aggr parse_aggr(const std::string& aggr, const char* op) {
  if (aggr == "sum") return Aggr::Sum;
  if (aggr == "mean") return Aggr::Mean;
  if (aggr == "max") return Aggr::Max;
  if (aggr == "softmax") return Aggr::Softmax;
  if (aggr == "powermean") return Aggr::PowerMean;
  TORCH_CHECK(false, op, ": aggr must be one of 'softmax', 'max', 'mean', 'sum', 'powermean', got '", aggr, "'");
}

// The checked inputs of either op, in the form the kernels read them.
struct GenInputs {
  at::Tensor rowptr, col;               // CSR by destination
  at::Tensor rowptr_t, col_t, perm_t;   // transposed CSR (backward only)
  at::Tensor x;                         // [num_src, D], channels contiguous, rows strided
  at::Tensor edge_attr;                 // undefined, or [E, F] contiguous (F = D when direct)
  at::Tensor weight_t;                  // undefined, or the encoder weight transposed: [F, D] contiguous
  at::Tensor bias;                      // undefined, or [D] contiguous
  at::Tensor t, p;                      // undefined, or [D] contiguous (a shared value is expanded)
  Aggr aggr = Aggr::Sum;
  double eps = 0;
  int64_t num_dst = 0, d = 0, f = 0;    // f: edge feature width (0: no edge features)
  bool direct = false;                  // edge_attr is the embedding itself
};

inline at::Tensor per_channel(const c10::optional<at::Tensor>& v, const at::Tensor& x, const char* op,
                              const char* name) {
  TORCH_CHECK(v.has_value(), op, ": ", name, " is required for this aggregation");
  TORCH_CHECK(v->dim() <= 1 && (v->numel() == 1 || v->numel() == x.size(1)), op, ": ", name,
              " must hold 1 or D = ", x.size(1), " values, got shape ", v->sizes());
  TORCH_CHECK(v->scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", v->scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(v->device() == x.device(), op, ": ", name, " is on ", v->device(), ", expected ", x.device());
  return v->reshape({-1}).expand({x.size(1)}).contiguous();
}

inline GenInputs check_gen_inputs(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
                                  const at::Tensor& x_in, const c10::optional<at::Tensor>& edge_attr,
                                  const c10::optional<at::Tensor>& edge_weight,
                                  const c10::optional<at::Tensor>& edge_bias, const c10::optional<at::Tensor>& t,
                                  const c10::optional<at::Tensor>& p, c10::string_view aggr, double eps) {
  GenInputs in;
  in.aggr = parse_aggr(std::string(aggr), op);
  in.eps = eps;
  in.x = check_features(x_in, op, "x", x_in.device());
  check_graph(rowptr, col, c10::nullopt, in.x, op);
  in.rowptr = rowptr;
  in.col = col;
  in.num_dst = rowptr.numel() - 1;
  in.d = in.x.size(1);
  const int64_t num_edges = col.numel();
  const auto dev = in.x.device();
  const auto dtype = in.x.scalar_type();
  if (edge_attr.has_value()) {
    const auto& a = *edge_attr;
    TORCH_CHECK(a.dim() == 2 && a.size(0) == num_edges, op, ": edge_attr must have shape [num_edges = ",
                num_edges, ", F], got ", a.sizes());
    TORCH_CHECK(a.scalar_type() == dtype, op, ": edge_attr dtype ", a.scalar_type(), " differs from x dtype ", dtype);
    TORCH_CHECK(a.device() == dev, op, ": edge_attr is on ", a.device(), ", expected ", dev);
    in.edge_attr = a.contiguous();
    in.f = a.size(1);
    if (edge_weight.has_value()) {
      const auto& w = *edge_weight;
      TORCH_CHECK(w.dim() == 2 && w.size(0) == in.d && w.size(1) == in.f, op, ": edge_weight must have shape [D = ",
                  in.d, ", F = ", in.f, "] (an nn.Linear(F, D) weight), got ", w.sizes());
      TORCH_CHECK(w.scalar_type() == dtype, op, ": edge_weight dtype ", w.scalar_type(), " differs from x dtype ", dtype);
      TORCH_CHECK(w.device() == dev, op, ": edge_weight is on ", w.device(), ", expected ", dev);
      in.weight_t = w.t().contiguous();
    } else {
      TORCH_CHECK(in.f == in.d, op, ": without edge_weight, edge_attr is the edge embedding and must have D = ",
                  in.d, " columns, got ", in.f);
      in.direct = true;
    }
  } else {
    TORCH_CHECK(!edge_weight.has_value(), op, ": edge_weight given without edge_attr");
  }
  if (edge_bias.has_value()) {
    TORCH_CHECK(in.weight_t.defined(), op, ": edge_bias needs edge_attr and edge_weight");
    const auto& b = *edge_bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == in.d, op, ": edge_bias must have shape [D = ", in.d, "], got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == dtype, op, ": edge_bias dtype ", b.scalar_type(), " differs from x dtype ", dtype);
    TORCH_CHECK(b.device() == dev, op, ": edge_bias is on ", b.device(), ", expected ", dev);
    in.bias = b.contiguous();
  }
  if (in.aggr == Aggr::Softmax) in.t = per_channel(t, in.x, op, "t");
  if (in.aggr == Aggr::PowerMean) in.p = per_channel(p, in.x, op, "p");
  return in;
}

inline at::ScalarType gen_state_dtype(const GenInputs& in) {
  if (in.aggr == Aggr::Max) return in.rowptr.scalar_type();
  const auto dtype = in.x.scalar_type();
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

inline bool gen_has_state(Aggr aggr) {
  return aggr == Aggr::Max || aggr == Aggr::Softmax || aggr == Aggr::PowerMean;
}

// K holds one device's kernels (cpu/gen_aggregate_cpu.cpp, cuda/gen_aggregate_cuda.cu):
//   K::check_dtype(dtype, op)
//   K::forward(in, out, state)        out [num_dst, D] and state (as documented above) written
//   K::backward(in, out, state, grad_out, grads)   grads: the six gradients, pre-allocated;
//     grads.x [num_src, D] contiguous, fully written; grads.edge_attr [E, F] or undefined;
//     grads.weight_t [F, D], grads.bias [D], grads.t [D], grads.p [D] or undefined.
struct GenGrads {
  at::Tensor x, edge_attr, weight_t, bias, t, p;
};

template <typename K>
std::tuple<at::Tensor, at::Tensor> gen_aggregate_op(
    const at::Tensor& rowptr, const at::Tensor& col, const c10::optional<at::Tensor>& rowptr_t,
    const c10::optional<at::Tensor>& /*col_t*/, const c10::optional<at::Tensor>& /*perm_t*/, const at::Tensor& x,
    const c10::optional<at::Tensor>& edge_attr, const c10::optional<at::Tensor>& edge_weight,
    const c10::optional<at::Tensor>& edge_bias, const c10::optional<at::Tensor>& t, const c10::optional<at::Tensor>& p,
    c10::string_view aggr, double eps) {
  constexpr const char* op = "revgnn_ext.gen_aggregate";
  K::check_dtype(x.scalar_type(), op);
  GenInputs in = check_gen_inputs(op, rowptr, col, x, edge_attr, edge_weight, edge_bias, t, p, aggr, eps);
  TORCH_CHECK(!rowptr_t.has_value() || rowptr_t->numel() == in.x.size(0) + 1, op, ": x has ", in.x.size(0),
              " rows but the graph has ", rowptr_t.has_value() ? rowptr_t->numel() - 1 : 0, " source nodes");
  at::Tensor out = at::empty({in.num_dst, in.d}, in.x.options());
  at::Tensor state = gen_has_state(in.aggr)
                         ? at::empty({in.num_dst, in.d}, in.x.options().dtype(gen_state_dtype(in)))
                         : at::empty({0}, in.x.options());
  if (in.num_dst > 0 && in.d > 0) K::forward(in, out, state);
  return {out, state};
}

template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gen_aggregate_backward_op(
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& rowptr_t, const at::Tensor& col_t,
    const at::Tensor& perm_t, const at::Tensor& x, const c10::optional<at::Tensor>& edge_attr,
    const c10::optional<at::Tensor>& edge_weight, const c10::optional<at::Tensor>& edge_bias,
    const c10::optional<at::Tensor>& t, const c10::optional<at::Tensor>& p, const at::Tensor& out,
    const at::Tensor& state, const at::Tensor& grad_out_in, c10::string_view aggr, double eps) {
  constexpr const char* op = "revgnn_ext.gen_aggregate_backward";
  K::check_dtype(x.scalar_type(), op);
  GenInputs in = check_gen_inputs(op, rowptr, col, x, edge_attr, edge_weight, edge_bias, t, p, aggr, eps);
  const auto dev = in.x.device();
  check_index(rowptr_t, op, "rowptr_t", rowptr.scalar_type(), dev);
  check_index(col_t, op, "col_t", rowptr.scalar_type(), dev);
  check_index(perm_t, op, "perm_t", rowptr.scalar_type(), dev);
  TORCH_CHECK(rowptr_t.numel() == in.x.size(0) + 1, op, ": x has ", in.x.size(0), " rows but the graph has ",
              rowptr_t.numel() - 1, " source nodes");
  TORCH_CHECK(col_t.numel() == col.numel() && perm_t.numel() == col.numel(), op,
              ": the transposed graph must have as many entries as the graph (", col.numel(), ")");
  in.rowptr_t = rowptr_t;
  in.col_t = col_t;
  in.perm_t = perm_t;
  const at::Tensor grad_out = check_features(grad_out_in, op, "grad_out", dev).contiguous();
  TORCH_CHECK(grad_out.scalar_type() == in.x.scalar_type() && grad_out.size(0) == in.num_dst &&
                  grad_out.size(1) == in.d,
              op, ": grad_out must be [", in.num_dst, ", ", in.d, "] of x's dtype, got ", grad_out.sizes(), " ",
              grad_out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == in.num_dst && out.size(1) == in.d && out.is_contiguous() &&
                  out.scalar_type() == in.x.scalar_type() && out.device() == dev,
              op, ": out must be the contiguous [", in.num_dst, ", ", in.d, "] output of gen_aggregate");
  if (gen_has_state(in.aggr)) {
    TORCH_CHECK(state.dim() == 2 && state.size(0) == in.num_dst && state.size(1) == in.d && state.is_contiguous() &&
                    state.scalar_type() == gen_state_dtype(in) && state.device() == dev,
                op, ": state must be the contiguous [", in.num_dst, ", ", in.d, "] ", gen_state_dtype(in),
                " state returned by gen_aggregate");
  }
  GenGrads grads;
  grads.x = at::empty({in.x.size(0), in.d}, in.x.options());
  const auto none = at::empty({0}, in.x.options());
  grads.edge_attr = in.edge_attr.defined() ? at::empty_like(in.edge_attr) : at::Tensor();
  grads.weight_t = in.weight_t.defined() ? at::empty_like(in.weight_t) : at::Tensor();
  grads.bias = in.bias.defined() ? at::empty_like(in.bias) : at::Tensor();
  grads.t = in.t.defined() ? at::empty_like(in.t) : at::Tensor();
  grads.p = in.p.defined() ? at::empty_like(in.p) : at::Tensor();
  if (in.d > 0) {
    K::backward(in, out, state, grad_out, grads);
  } else {
    for (auto* g : {&grads.x, &grads.edge_attr, &grads.weight_t, &grads.bias, &grads.t, &grads.p})
      if (g->defined()) g->zero_();
  }
  // Back to the callers' shapes: the weight as [D, F], a shared t or p as one value.
  auto shared = [&](const at::Tensor& g, const c10::optional<at::Tensor>& v) {
    if (!g.defined()) return none;
    return v->numel() == 1 && v->dim() <= 1 ? g.sum().reshape(v->sizes()) : g.reshape(v->sizes());
  };
  return {grads.x,
          grads.edge_attr.defined() ? grads.edge_attr : none,
          grads.weight_t.defined() ? grads.weight_t.t().contiguous() : none,
          grads.bias.defined() ? grads.bias : none,
          shared(grads.t, t),
          shared(grads.p, p)};
}

#define REVGNN_REGISTER_GEN_AGGREGATE(DEVICE, K)                                      \
  TORCH_LIBRARY_IMPL(revgnn_ext, DEVICE, m) {                                         \
    m.impl("gen_aggregate", &::revgnn_ext::gen_aggregate_op<K>);                      \
    m.impl("gen_aggregate_backward", &::revgnn_ext::gen_aggregate_backward_op<K>);    \
  }

}  // namespace revgnn_ext
#endif  // __CUDACC_RTC__
