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
//              SoftmaxAggregation), computed in one pass with an online max and rescaling
//              (softmax_push) that keeps the weighted mean itself, never a sum of messages that
//              could overflow: finite for any finite messages (float32 near 3e38 included), as PyG.
//   powermean: PyG's PowerMeanAggregation with its clamps to [1e-4, 100]:
//              r = sum_e clamp(m_e)^p_c / deg,  out = clamp(r)^(1 / p_c), the powers as
//              torch.pow takes them at the edges of the domain (positive_pow): exact for an
//              exponent of 1, 1^y = 1 (so p = 0 gives 1, and 0 for an empty row, as PyG).
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
//                        grad_out, aggr, eps, output_mask)
//     -> (grad_x, grad_edge_attr, grad_edge_weight, grad_edge_bias, grad_t, grad_p)
//   The gradient of each defined input that output_mask asks for ([0] for an absent or unwanted
//   one, neither allocated nor computed: autograd's needs_input_grad). Messages are recomputed from
//   edge_attr: two passes, one over the transposed CSR (grad_x, a segment sum per source) and
//   one over the CSR (per-edge grad_edge_attr; grad_edge_weight, grad_edge_bias, grad_t, grad_p
//   summed per fixed block of rows, then over blocks in order; grad_t and grad_p from per-row sums
//   over the row's edges). Deterministic, no atomics.
//
// Per (edge, channel) derivative of out_ic with respect to m (times g = grad_out[i, c]):
//   sum: g;  mean: g / deg;  max: g [arg == e];
//   softmax: g a (1 + t (m - out));         d/dt (per row): g sum_e a m (m - out)
//   powermean: g [1e-4 < r < 100] (1/p) r^(1/p - 1) * [1e-4 < m < 100] p m^(p-1) / deg (the clamps pass no
//              gradient at their bounds, as torch.clamp's backward; 0 at p = 0, as torch.pow's);
//              d/dp: g out (-log(clamp r) / p^2 + [r in range] (sum_e q_e log(clamp m_e) / deg) / (p clamp r)),
//              q_e = clamp(m_e)^p.
// then through the ReLU: d pre = d m [x + emb > 0].
#pragma once

#include <ATen/OpMathType.h>

#include <array>
#include <cmath>

#include "ops/spmm.h"

namespace revgnn_ext {

enum class Aggr : int { Sum = 0, Mean = 1, Max = 2, Softmax = 3, PowerMean = 4 };

// PyG's PowerMeanAggregation clamps its input and its mean to this range.
constexpr double kPowerMin = 1e-4;
constexpr double kPowerMax = 100.0;

// The elementwise operations the formulas below are written in. This is the scalar version
// (the CUDA kernels' and the reference for the CPU's): the CPU kernels specialize Math for
// at::vec::Vectorized, so that one formula serves a GPU thread and a CPU SIMD register alike.
// Comparisons give a Mask; select(mask, a, b) = mask ? a : b.
template <typename T>
struct Math {
  using Mask = bool;
  static C10_HOST_DEVICE T select(Mask c, T a, T b) { return c ? a : b; }
  static C10_HOST_DEVICE Mask lt(T a, T b) { return a < b; }
  static C10_HOST_DEVICE Mask gt(T a, T b) { return a > b; }
  static C10_HOST_DEVICE Mask eq(T a, T b) { return a == b; }
  static C10_HOST_DEVICE Mask in_open(T v, T lo, T hi) { return v > lo && v < hi; }
  static C10_HOST_DEVICE T abs(T v) { return v < T(0) ? -v : v; }
  static C10_HOST_DEVICE T exp(T v) { return std::exp(v); }
  static C10_HOST_DEVICE T log(T v) { return std::log(v); }
};

// relu(pre) + eps; NaN stays NaN.
template <typename T, typename M = Math<T>>
C10_HOST_DEVICE inline T gen_message(T pre, T eps) {
  return M::select(M::lt(pre, T(0)), T(0), pre) + eps;
}

// The gradient at pre = x + emb from the gradient at the message (ReLU's: 0 where pre <= 0).
template <typename T, typename M = Math<T>>
C10_HOST_DEVICE inline T relu_grad(T pre, T dm) {
  return M::select(M::gt(pre, T(0)), dm, T(0));
}

// clamp to [1e-4, 100]; NaN stays NaN.
template <typename T, typename M = Math<T>>
C10_HOST_DEVICE inline T power_clamp(T v) {
  return M::select(M::lt(v, T(kPowerMin)), T(kPowerMin), M::select(M::gt(v, T(kPowerMax)), T(kPowerMax), v));
}

// base^e for base > 0, as exp(e log(base)), except where torch.pow (and so PyG) is exact and
// that formula is not: e = 1 gives base itself (at p = 1 a clamped message stays exactly on the
// clamp's bound, which decides the gradient of the mean's clamp), and base = 1 gives 1 for any e
// (p = 0 makes every q = 1 and the exponent 1/p infinite, where exp(inf * 0) would be NaN).
template <typename T, typename M = Math<T>>
C10_HOST_DEVICE inline T positive_pow(T base, T e) {
  return M::select(M::eq(e, T(1)), base, M::select(M::eq(base, T(1)), T(1), M::exp(e * M::log(base))));
}

// Online softmax of one (row, channel): after the row's first edge (max = v, sum = 1, mean = m),
// each further edge with score v = t m arrives with d = exp(-|v - max|), the only exp needed:
// a new maximum scales what was summed by d and enters with weight 1; any other value enters
// with weight d. `mean` is the weighted mean of the messages so far (the output at the row's
// end), updated as mean + (m - mean) w / sum: it never exceeds the largest message, where a
// weighted sum of messages overflows near the dtype's maximum. Branch-free.
template <typename T, typename M = Math<T>>
C10_HOST_DEVICE inline void softmax_push(T v, T m, T& max, T& sum, T& mean) {
  const T d = M::exp(-M::abs(v - max));
  const auto bigger = M::gt(v, max);
  const T old_scale = M::select(bigger, d, T(1)), new_weight = M::select(bigger, T(1), d);
  sum = sum * old_scale + new_weight;
  mean = mean + (m - mean) * (new_weight / sum);
  max = M::select(bigger, v, max);
}

// Softmax: with a = exp(t m - L) the edge's weight and g the output gradient, the gradient at m
// (dm) and the edge's term a m (m - out) of the row's d/dt = g sum_e a m (m - out) (as autograd
// through PyG's softmax computes it; summed per edge, not as sum a m^2 - out^2, which cancels
// and overflows).
template <typename T, typename M = Math<T>>
C10_HOST_DEVICE inline void softmax_grad(T g, T m, T t, T out, T lse, T& dm, T& dt_term) {
  const T a = M::exp(t * m - lse);
  const T dev = m - out;
  dm = g * a * (T(1) + t * dev);
  dt_term = a * m * dev;
}

// Power mean: the gradient at m of out = clamp(r)^(1/p), r = mean_e clamp(m_e)^p, and the
// edge's term q log(clamp m) of d/dp's row sum (q = clamp(m)^p).
template <typename T, typename M = Math<T>>
C10_HOST_DEVICE inline void power_grad(T g, T m, T p, T r, T deg, T& dm, T& qlog) {
  const T mc = power_clamp<T, M>(m), rc = power_clamp<T, M>(r);
  const T log_mc = M::log(mc);
  const T q_over_m = M::exp((p - T(1)) * log_mc);  // clamp(m)^(p - 1)
  qlog = q_over_m * mc * log_mc;
  // In autograd's order through PyG's formula: each clamp passes no gradient outside (and at)
  // its bounds, and torch.pow none to a base raised to the exponent 0, whatever arrives (at p = 0
  // the gradient at r is infinite, and the gradient at m is 0, as PyG's).
  const T dr = M::select(M::in_open(r, T(kPowerMin), T(kPowerMax)), g * positive_pow<T, M>(rc, T(1) / p - T(1)) / p,
                         T(0));
  dm = M::select(M::eq(p, T(0)), T(0),
                 M::select(M::in_open(m, T(kPowerMin), T(kPowerMax)), dr / deg * (p * q_over_m), T(0)));
}

// Power mean: d out / d p for one (row, channel), from s = sum_e q_e log(clamp m_e).
template <typename T, typename M = Math<T>>
C10_HOST_DEVICE inline T power_grad_p(T g, T out, T p, T r, T s, T deg) {
  const T rc = power_clamp<T, M>(r);
  const T through_r = M::select(M::in_open(r, T(kPowerMin), T(kPowerMax)), s / (deg * p * rc), T(0));
  return g * out * (through_r - M::log(rc) / (p * p));
}

inline Aggr parse_aggr(c10::string_view aggr, const char* op) {
  static constexpr std::pair<const char*, Aggr> names[] = {{"softmax", Aggr::Softmax},
                                                           {"max", Aggr::Max},
                                                           {"mean", Aggr::Mean},
                                                           {"sum", Aggr::Sum},
                                                           {"powermean", Aggr::PowerMean}};
  return parse_enum(std::string(aggr), names, op, "aggr");
}

// Calls f(std::integral_constant<Aggr, aggr>{}): the aggregation as a compile-time constant.
template <typename F>
void dispatch_aggr(Aggr aggr, const F& f) {
  dispatch_enum<Aggr, Aggr::Sum, Aggr::Mean, Aggr::Max, Aggr::Softmax, Aggr::PowerMean>(aggr, f);
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
  TORCH_CHECK_VALUE(v.has_value(), op, ": ", name, " is required for this aggregation");
  TORCH_CHECK_VALUE(v->dim() <= 1 && (v->numel() == 1 || v->numel() == x.size(1)), op, ": ", name,
              " must hold 1 or D = ", x.size(1), " values, got shape ", v->sizes());
  check_like_x(*v, x, op, name);
  return v->reshape({-1}).expand({x.size(1)}).contiguous();
}

inline GenInputs check_gen_inputs(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
                                  const at::Tensor& x_in, const c10::optional<at::Tensor>& edge_attr,
                                  const c10::optional<at::Tensor>& edge_weight,
                                  const c10::optional<at::Tensor>& edge_bias, const c10::optional<at::Tensor>& t,
                                  const c10::optional<at::Tensor>& p, c10::string_view aggr, double eps) {
  GenInputs in;
  in.aggr = parse_aggr(aggr, op);
  in.eps = eps;
  in.x = check_features(x_in, op, "x", x_in.device());
  check_graph(rowptr, col, c10::nullopt, in.x, op);
  in.rowptr = rowptr;
  in.col = col;
  in.num_dst = rowptr.numel() - 1;
  in.d = in.x.size(1);
  const int64_t num_edges = col.numel();
  check_edge_encoder(edge_attr, edge_weight, num_edges, in.d, "D", "is the edge embedding", in.x, op);
  if (edge_attr.has_value()) {
    in.edge_attr = edge_attr->contiguous();
    in.f = edge_attr->size(1);
    if (edge_weight.has_value()) in.weight_t = edge_weight->t().contiguous();
    in.direct = !edge_weight.has_value();
  }
  if (edge_bias.has_value()) {
    TORCH_CHECK_VALUE(in.weight_t.defined(), op, ": edge_bias needs edge_attr and edge_weight");
    const auto& b = *edge_bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == in.d, op, ": edge_bias must have shape [D = ", in.d, "], got ",
                      b.sizes());
    check_like_x(b, in.x, op, "edge_bias");
    in.bias = b.contiguous();
  }
  if (in.aggr == Aggr::Softmax) in.t = per_channel(t, in.x, op, "t");
  if (in.aggr == Aggr::PowerMean) in.p = per_channel(p, in.x, op, "p");
  return in;
}

inline at::ScalarType gen_state_dtype(const GenInputs& in) {
  return in.aggr == Aggr::Max ? in.rowptr.scalar_type() : at::toOpMathType(in.x.scalar_type());
}

inline bool gen_has_state(Aggr aggr) {
  return aggr == Aggr::Max || aggr == Aggr::Softmax || aggr == Aggr::PowerMean;
}

// K holds one device's kernels (cpu/gen_aggregate_cpu.cpp, cuda/gen_aggregate_cuda.cu):
//   K::forward(in, out, state)        out [num_dst, D] and state (as documented above) written
//   K::backward(in, out, state, grad_out, grads)   grads: the six gradients, allocated where
//     wanted, undefined otherwise (and then not computed); each defined one is fully written:
//     grads.x [num_src, D] contiguous, grads.edge_attr [E, F], grads.weight_t [F, D],
//     grads.bias [D], grads.t [D], grads.p [D].
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
  GenInputs in = check_gen_inputs(op, rowptr, col, x, edge_attr, edge_weight, edge_bias, t, p, aggr, eps);
  check_source_rows(in.x, rowptr_t, op);
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
    const at::Tensor& state, const at::Tensor& grad_out_in, c10::string_view aggr, double eps,
    std::array<bool, 6> output_mask) {
  constexpr const char* op = "revgnn_ext.gen_aggregate_backward";
  GenInputs in = check_gen_inputs(op, rowptr, col, x, edge_attr, edge_weight, edge_bias, t, p, aggr, eps);
  const auto dev = in.x.device();
  check_transposed(rowptr_t, col_t, perm_t, col.numel(), rowptr.scalar_type(), in.x, op);
  in.rowptr_t = rowptr_t;
  in.col_t = col_t;
  in.perm_t = perm_t;
  const at::Tensor grad_out = check_features(grad_out_in, op, "grad_out", dev).contiguous();
  check_like_x(grad_out, in.x, op, "grad_out");
  TORCH_CHECK_VALUE(grad_out.size(0) == in.num_dst && grad_out.size(1) == in.d, op, ": grad_out must be [",
                    in.num_dst, ", ", in.d, "], got ", grad_out.sizes());
  check_like_x(out, in.x, op, "out");
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == in.num_dst && out.size(1) == in.d && out.is_contiguous(), op,
                    ": out must be the contiguous [", in.num_dst, ", ", in.d, "] output of gen_aggregate");
  if (gen_has_state(in.aggr)) {
    TORCH_CHECK_TYPE(state.scalar_type() == gen_state_dtype(in), op, ": state must be the ", gen_state_dtype(in),
                     " state returned by gen_aggregate, got ", state.scalar_type());
    TORCH_CHECK_VALUE(state.dim() == 2 && state.size(0) == in.num_dst && state.size(1) == in.d &&
                          state.is_contiguous() && state.device() == dev,
                      op, ": state must be the contiguous [", in.num_dst, ", ", in.d, "] state returned by "
                      "gen_aggregate");
  }
  GenGrads grads;
  auto wanted = [](bool want, const at::Tensor& v) { return want && v.defined() ? at::empty_like(v) : at::Tensor(); };
  if (output_mask[0]) grads.x = at::empty({in.x.size(0), in.d}, in.x.options());
  grads.edge_attr = wanted(output_mask[1], in.edge_attr);
  grads.weight_t = wanted(output_mask[2], in.weight_t);
  grads.bias = wanted(output_mask[3], in.bias);
  grads.t = wanted(output_mask[4], in.t);
  grads.p = wanted(output_mask[5], in.p);
  auto none = [&] { return at::empty({0}, in.x.options()); };  // a fresh one per output: no aliasing
  if (in.d > 0) {
    K::backward(in, out, state, grad_out, grads);
  } else {
    for (auto* g : {&grads.x, &grads.edge_attr, &grads.weight_t, &grads.bias, &grads.t, &grads.p})
      if (g->defined()) g->zero_();
  }
  // Back to the callers' shapes: the weight as [D, F], a shared t or p as one value.
  auto shared = [&](const at::Tensor& g, const c10::optional<at::Tensor>& v) {
    if (!g.defined()) return none();
    return v->numel() == 1 && v->dim() <= 1 ? g.sum().reshape(v->sizes()) : g.reshape(v->sizes());
  };
  return {grads.x.defined() ? grads.x : none(),
          grads.edge_attr.defined() ? grads.edge_attr : none(),
          grads.weight_t.defined() ? grads.weight_t.t().contiguous() : none(),
          grads.bias.defined() ? grads.bias : none(),
          shared(grads.t, t),
          shared(grads.p, p)};
}

#define REVGNN_REGISTER_GEN_AGGREGATE(DEVICE, K)                                      \
  TORCH_LIBRARY_IMPL(REVGNN_LIBRARY, DEVICE, m) {                                         \
    m.impl("gen_aggregate", &::revgnn_ext::gen_aggregate_op<K>);                      \
    m.impl("gen_aggregate_backward", &::revgnn_ext::gen_aggregate_backward_op<K>);    \
  }

}  // namespace revgnn_ext
