// CPU kernels of gen_aggregate (contract and shared formulas: csrc/ops/gen_aggregate.h).
// Threaded over rows with at::parallel_for. Channels go one SIMD vector (at::vec::Vectorized) at
// a time, in float32 for float16/bfloat16 (cpu/common.h): the shared formulas are instantiated for
// vectors through the Math specialization below, so exp, log, max and FMA run in SIMD and a
// (row, vector) state stays in registers while the row's edges stream by. The edge embedding is
// recomputed from the raw edge features.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/common.h"
#include "ops/gen_aggregate.h"

namespace revgnn_ext {

template <typename scalar_t>
struct Math<at::vec::Vectorized<scalar_t>> {
  using V = at::vec::Vectorized<scalar_t>;
  using Mask = V;  // all bits set where true
  static V select(const Mask& c, const V& a, const V& b) { return V::blendv(b, a, c); }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static Mask eq(const V& a, const V& b) { return a == b; }
  static Mask in_open(const V& v, const V& lo, const V& hi) { return (v > lo) & (v < hi); }
  static V abs(const V& v) { return v.abs(); }
  // exp_u20 is the fast SIMD exp (about 2x the cost of a multiply-add per lane, within float
  // accuracy); it does not propagate NaN by itself.
  static V exp(const V& v) { return V::blendv(v.exp_u20(), v, v.isnan()); }
  static V log(const V& v) { return v.log(); }
};

namespace {

using cpu::AccVec;
using cpu::load_acc;
using cpu::store_acc;

constexpr int64_t kRowBlock = 64;  // rows per partial sum of the parameter gradients
constexpr int64_t kFlush = 16;     // edges summed in the working precision before a float64 add

// Per-channel parameters, copied once per call into arrays padded to whole vectors (padding:
// weight 0, bias 0, t 1, p 1), so that every vector load of them is in bounds and harmless.
template <typename scalar_t>
struct Params {
  using V = AccVec<scalar_t>;
  using acc_t = typename V::value_type;
  int64_t d, dpad, f;
  bool direct, has_attr;
  const scalar_t* attr;  // [E, F] (F = D when direct)
  std::vector<acc_t> wt, bias, t, p;

  explicit Params(const GenInputs& in)
      : d(in.d), dpad((in.d + V::size() - 1) / V::size() * V::size()), f(in.f), direct(in.direct),
        has_attr(in.edge_attr.defined()), attr(has_attr ? in.edge_attr.data_ptr<scalar_t>() : nullptr) {
    auto padded = [&](const at::Tensor& src, int64_t rows, acc_t fill) {
      std::vector<acc_t> out(static_cast<size_t>(rows * dpad), fill);
      if (src.defined()) {
        const scalar_t* s = src.data_ptr<scalar_t>();
        for (int64_t r = 0; r < rows; ++r) std::copy(s + r * d, s + (r + 1) * d, out.begin() + r * dpad);
      }
      return out;
    };
    wt = padded(in.weight_t, in.weight_t.defined() ? f : 0, acc_t(0));
    bias = padded(in.bias, 1, acc_t(0));
    t = padded(in.t, 1, acc_t(1));
    p = padded(in.p, 1, acc_t(1));
  }

  // x + emb for channels [v0, v0 + count) of edge e, given x's vector.
  V pre(int64_t e, const V& x, int64_t v0, int64_t count) const {
    if (!has_attr) return x;
    if (direct) return x + load_acc(attr + e * d + v0, count);
    // Two independent multiply-add chains: half the latency of one.
    V even = x + V::loadu(bias.data() + v0), odd(0);
    const scalar_t* a = attr + e * f;
    const acc_t* w = wt.data() + v0;
    int64_t k = 0;
    for (; k + 1 < f; k += 2) {
      even = at::vec::fmadd(V(static_cast<acc_t>(a[k])), V::loadu(w + k * dpad), even);
      odd = at::vec::fmadd(V(static_cast<acc_t>(a[k + 1])), V::loadu(w + (k + 1) * dpad), odd);
    }
    if (k < f) even = at::vec::fmadd(V(static_cast<acc_t>(a[k])), V::loadu(w + k * dpad), even);
    return even + odd;
  }
};

// ---------------------------------------------------------------------------------- forward
template <typename scalar_t, typename index_t, Aggr A>
void forward_kernel(const GenInputs& in, const at::Tensor& out_t, const at::Tensor& state_t) {
  using V = AccVec<scalar_t>;
  using acc_t = typename V::value_type;
  using M = Math<V>;
  constexpr int64_t VS = V::size();
  constexpr const char* op = "revgnn_ext.gen_aggregate";
  const Params<scalar_t> prm(in);
  const index_t* rowptr = in.rowptr.data_ptr<index_t>();
  const index_t* col = in.col.data_ptr<index_t>();
  const scalar_t* x = in.x.data_ptr<scalar_t>();
  const int64_t ldx = in.x.stride(0), num_src = in.x.size(0), d = in.d, n = in.num_dst, num_edges = in.col.numel();
  const V eps(static_cast<acc_t>(in.eps));
  scalar_t* out = out_t.data_ptr<scalar_t>();
  at::parallel_for(0, n, cpu::grain_size(n, num_edges, d), [&](int64_t begin, int64_t end) {
    acc_t lanes[VS];
    for (int64_t i = begin; i < end; ++i) {
      const auto [e0, e1] = checked_row(rowptr, i, n, num_edges, op, "rowptr");
      const int64_t deg = e1 - e0;
      for (int64_t v0 = 0; v0 < d; v0 += VS) {
        const int64_t cnt = std::min(VS, d - v0);
        const V t = V::loadu(prm.t.data() + v0), p = V::loadu(prm.p.data() + v0);
        V acc(0), mx(0), sum(0);
        acc_t best[VS];
        index_t sel[VS];
        for (int64_t e = e0; e < e1; ++e) {
          const scalar_t* xr = x + checked(col[e], num_src, op, "col") * ldx + v0;
          const V m = gen_message<V, M>(prm.pre(e, load_acc(xr, cnt), v0, cnt), eps);
          if constexpr (A == Aggr::Sum || A == Aggr::Mean) {
            acc = acc + m;
          } else if constexpr (A == Aggr::Softmax) {
            if (e == e0) {
              mx = t * m;
              sum = V(1);
              acc = m;
            } else {
              softmax_push<V, M>(t * m, m, mx, sum, acc);
            }
          } else if constexpr (A == Aggr::PowerMean) {
            acc = acc + positive_pow<V, M>(power_clamp<V, M>(m), p);
          } else {  // Max: per lane, with the selected edge
            m.store(lanes);
            for (int64_t l = 0; l < cnt; ++l) {
              if (replaces<Reduce::Max>(lanes[l], best[l], e != e0)) {
                best[l] = lanes[l];
                sel[l] = static_cast<index_t>(e);
              }
            }
          }
        }
        scalar_t* o = out + i * d + v0;
        const V degv(static_cast<acc_t>(deg));
        if constexpr (A == Aggr::Sum) {
          store_acc(acc, o, cnt);
        } else if constexpr (A == Aggr::Mean) {
          store_acc(deg ? acc / degv : V(0), o, cnt);
        } else if constexpr (A == Aggr::Softmax) {
          acc_t* s = state_t.data_ptr<acc_t>() + i * d + v0;
          store_acc(deg ? acc : V(0), o, cnt);
          store_acc(deg ? mx + M::log(sum) : V(0), s, cnt);
        } else if constexpr (A == Aggr::PowerMean) {
          acc_t* s = state_t.data_ptr<acc_t>() + i * d + v0;
          const V r = deg ? acc / degv : V(0);
          store_acc(r, s, cnt);
          store_acc(positive_pow<V, M>(power_clamp<V, M>(r), V(1) / p), o, cnt);
        } else {
          index_t* s = state_t.data_ptr<index_t>() + i * d + v0;
          for (int64_t l = 0; l < cnt; ++l) {
            o[l] = static_cast<scalar_t>(deg ? best[l] : acc_t(0));
            s[l] = deg ? sel[l] : index_t(-1);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------- backward
// Row i's values that the derivative of its edges' messages reads, for one channel vector.
template <typename scalar_t, typename index_t>
struct RowGrad {
  using V = AccVec<scalar_t>;
  V g, out, state, deg;      // state: L (softmax) or r (powermean)
  const index_t* arg;        // max: the selected edge per channel (row i, from v0)
  int64_t cnt;
};

// Raw pointers to what row_grad reads, taken once per kernel (data_ptr checks its dtype).
template <typename scalar_t, typename index_t>
struct RowSource {
  const index_t* rowptr;
  const scalar_t* grad_out;
  const scalar_t* out;
  const at::opmath_type<scalar_t>* state;  // softmax, powermean
  const index_t* arg;         // max
  int64_t d, num_dst, num_edges;

  RowSource(const GenInputs& in, const at::Tensor& out_t, const at::Tensor& state_t, const at::Tensor& grad_out_t)
      : rowptr(in.rowptr.data_ptr<index_t>()), grad_out(grad_out_t.data_ptr<scalar_t>()),
        out(out_t.data_ptr<scalar_t>()),
        state(in.aggr == Aggr::Softmax || in.aggr == Aggr::PowerMean ? state_t.data_ptr<at::opmath_type<scalar_t>>()
                                                                      : nullptr),
        arg(in.aggr == Aggr::Max ? state_t.data_ptr<index_t>() : nullptr),
        d(in.d), num_dst(in.num_dst), num_edges(in.col.numel()) {}

  int64_t degree(int64_t i) const {
    const auto [e0, e1] = checked_row(rowptr, i, num_dst, num_edges, "revgnn_ext.gen_aggregate_backward", "rowptr");
    return e1 - e0;
  }
};

template <typename scalar_t, typename index_t, Aggr A>
inline RowGrad<scalar_t, index_t> row_grad(const RowSource<scalar_t, index_t>& src, int64_t i, int64_t v0,
                                           int64_t cnt) {
  using V = AccVec<scalar_t>;
  const int64_t off = i * src.d + v0;
  RowGrad<scalar_t, index_t> r{load_acc(src.grad_out + off, cnt), V(0), V(0),
                               V(static_cast<typename V::value_type>(src.degree(i))),
                               nullptr, cnt};
  if constexpr (A == Aggr::Softmax || A == Aggr::PowerMean) {
    r.out = load_acc(src.out + off, cnt);
    r.state = load_acc(src.state + off, cnt);
  }
  if constexpr (A == Aggr::Max) r.arg = src.arg + off;
  return r;
}

// The gradient at m of edge e's message m; `extra` gets the edge's term of the row sums that
// give the t or p gradient (softmax: a m (m - out); powermean: q log(clamp m)).
template <typename scalar_t, typename index_t, Aggr A>
inline AccVec<scalar_t> message_grad(const RowGrad<scalar_t, index_t>& row, int64_t e, const AccVec<scalar_t>& m,
                                     const AccVec<scalar_t>& t, const AccVec<scalar_t>& p, AccVec<scalar_t>& extra) {
  using V = AccVec<scalar_t>;
  using acc_t = typename V::value_type;
  using M = Math<V>;
  if constexpr (A == Aggr::Sum) return row.g;
  if constexpr (A == Aggr::Mean) return row.g / row.deg;
  V dm;
  if constexpr (A == Aggr::Softmax) softmax_grad<V, M>(row.g, m, t, row.out, row.state, dm, extra);
  if constexpr (A == Aggr::PowerMean) power_grad<V, M>(row.g, m, p, row.state, row.deg, dm, extra);
  if constexpr (A == Aggr::Max) {
    acc_t gate[V::size()] = {};
    for (int64_t l = 0; l < row.cnt; ++l) gate[l] = row.arg[l] == e ? acc_t(1) : acc_t(0);
    dm = row.g * V::loadu(gate);
  }
  return dm;
}

// grad_x[j] = sum over the out-edges of j of the gradient at x + emb, over the transposed CSR.
template <typename scalar_t, typename index_t, Aggr A>
void backward_x_kernel(const GenInputs& in, const at::Tensor& out_t, const at::Tensor& state,
                       const at::Tensor& grad_out, const at::Tensor& grad_x) {
  using V = AccVec<scalar_t>;
  using acc_t = typename V::value_type;
  using M = Math<V>;
  constexpr int64_t VS = V::size();
  constexpr const char* op = "revgnn_ext.gen_aggregate_backward";
  const Params<scalar_t> prm(in);
  const index_t* rowptr_t = in.rowptr_t.data_ptr<index_t>();
  const index_t* col_t = in.col_t.data_ptr<index_t>();
  const index_t* perm_t = in.perm_t.data_ptr<index_t>();
  const scalar_t* x = in.x.data_ptr<scalar_t>();
  const RowSource<scalar_t, index_t> rows(in, out_t, state, grad_out);
  const int64_t ldx = in.x.stride(0), num_src = in.x.size(0), d = in.d, num_edges = in.col.numel();
  const V eps(static_cast<acc_t>(in.eps));
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  at::parallel_for(0, num_src, cpu::grain_size(num_src, num_edges, d), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t v0 = 0; v0 < d; v0 += VS) {
        const int64_t cnt = std::min(VS, d - v0);
        const V t = V::loadu(prm.t.data() + v0), p = V::loadu(prm.p.data() + v0);
        const V xv = load_acc(x + j * ldx + v0, cnt);
        V acc(0), extra;
        const auto [t0, t1] = checked_row(rowptr_t, j, num_src, num_edges, op, "rowptr_t");
        for (int64_t k = t0; k < t1; ++k) {
          const int64_t i = checked(col_t[k], in.num_dst, op, "col_t");
          const int64_t e = checked(perm_t[k], num_edges, op, "perm_t");
          const V pre = prm.pre(e, xv, v0, cnt);
          const auto row = row_grad<scalar_t, index_t, A>(rows, i, v0, cnt);
          const V dm = message_grad<scalar_t, index_t, A>(row, e, gen_message<V, M>(pre, eps), t, p, extra);
          acc = acc + relu_grad<V, M>(pre, dm);
        }
        store_acc(acc, gx + j * d + v0, cnt);
      }
    }
  });
}

// Per-edge grad_edge_attr and the parameter gradients, those that `grads` holds, over the CSR.
// Terms are summed in a small buffer that is added in float64, every kFlush edges and at each
// row's end, to the partial of the row's fixed block of kRowBlock rows; the blocks' partials are
// then added in order. Deterministic, and no float sum runs over more than kFlush terms.
template <typename scalar_t, typename index_t, Aggr A>
void backward_params_kernel(const GenInputs& in, const at::Tensor& out_t, const at::Tensor& state,
                            const at::Tensor& grad_out, const GenGrads& grads) {
  using V = AccVec<scalar_t>;
  using acc_t = typename V::value_type;
  using M = Math<V>;
  constexpr int64_t VS = V::size();
  constexpr const char* op = "revgnn_ext.gen_aggregate_backward";
  constexpr bool kParam = A == Aggr::Softmax || A == Aggr::PowerMean;
  const Params<scalar_t> prm(in);
  const index_t* rowptr = in.rowptr.data_ptr<index_t>();
  const index_t* col = in.col.data_ptr<index_t>();
  const scalar_t* x = in.x.data_ptr<scalar_t>();
  const RowSource<scalar_t, index_t> rows(in, out_t, state, grad_out);
  const int64_t ldx = in.x.stride(0), num_src = in.x.size(0), d = in.d, dpad = prm.dpad, f = in.f, n = in.num_dst;
  const V eps(static_cast<acc_t>(in.eps));
  scalar_t* ga = grads.edge_attr.defined() ? grads.edge_attr.data_ptr<scalar_t>() : nullptr;
  const bool want_w = grads.weight_t.defined(), want_b = grads.bias.defined();
  const bool want_param = kParam && (grads.t.defined() || grads.p.defined());
  // The encoded edge features, read only for their own gradient or the weight's.
  const bool read_attr = prm.has_attr && !prm.direct && (ga != nullptr || want_w);
  // Partials per block: [F rows of the weight | bias | t or p], each dpad wide.
  const int64_t stride = (f + 2) * dpad, blocks = (n + kRowBlock - 1) / kRowBlock;
  std::vector<double> partial(static_cast<size_t>(blocks * stride), 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t bb, int64_t be) {
    std::vector<V> ga_acc(static_cast<size_t>(read_attr && ga != nullptr ? f : 0));
    // Per-row sums of the edges' terms for d/dt (sum a m (m - out)) or d/dp (sum q log m).
    std::vector<acc_t> s1(static_cast<size_t>(dpad));
    std::vector<acc_t> row_sum(static_cast<size_t>(stride));
    acc_t* pw = row_sum.data();
    acc_t* pb = pw + f * dpad;
    acc_t* pp = pb + dpad;
    for (int64_t b = bb; b < be; ++b) {
      double* block_sum = partial.data() + b * stride;
      auto flush = [&] {
        for (int64_t k = 0; k < stride; ++k) block_sum[k] += static_cast<double>(row_sum[k]);
        std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      };
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      for (int64_t i = b * kRowBlock; i < std::min(n, (b + 1) * kRowBlock); ++i) {
        std::fill(s1.begin(), s1.end(), acc_t(0));
        const auto [e0, e1] = checked_row(rowptr, i, n, in.col.numel(), op, "rowptr");
        for (int64_t e = e0; e < e1; ++e) {
          const scalar_t* xr = x + checked(col[e], num_src, op, "col") * ldx;
          const scalar_t* a = read_attr ? prm.attr + e * f : nullptr;
          for (auto& v : ga_acc) v = V(0);
          for (int64_t v0 = 0; v0 < d; v0 += VS) {
            const int64_t cnt = std::min(VS, d - v0);
            const V t = V::loadu(prm.t.data() + v0), p = V::loadu(prm.p.data() + v0);
            const V pre = prm.pre(e, load_acc(xr + v0, cnt), v0, cnt);
            const auto row = row_grad<scalar_t, index_t, A>(rows, i, v0, cnt);
            V extra;
            const V m = gen_message<V, M>(pre, eps);
            const V dpre = relu_grad<V, M>(pre, message_grad<scalar_t, index_t, A>(row, e, m, t, p, extra));
            if (ga != nullptr && prm.direct) store_acc(dpre, ga + e * d + v0, cnt);
            if (a != nullptr) {
              if (ga != nullptr)
                for (int64_t k = 0; k < f; ++k)
                  ga_acc[k] = at::vec::fmadd(dpre, V::loadu(prm.wt.data() + k * dpad + v0), ga_acc[k]);
              if (want_w) {
                for (int64_t k = 0; k < f; ++k) {
                  acc_t* pwk = pw + k * dpad + v0;
                  at::vec::fmadd(V(static_cast<acc_t>(a[k])), dpre, V::loadu(pwk)).store(pwk);
                }
              }
            }
            if (want_b) (V::loadu(pb + v0) + dpre).store(pb + v0);
            if (want_param) (V::loadu(s1.data() + v0) + extra).store(s1.data() + v0);
          }
          if (ga != nullptr && a != nullptr)
            for (int64_t k = 0; k < f; ++k) ga[e * f + k] = static_cast<scalar_t>(cpu::lane_sum(ga_acc[k]));
          if ((e - e0 + 1) % kFlush == 0) flush();
        }
        if (want_param) {  // every row, empty ones included
          for (int64_t v0 = 0; v0 < d; v0 += VS) {
            const int64_t cnt = std::min(VS, d - v0);
            const auto row = row_grad<scalar_t, index_t, A>(rows, i, v0, cnt);
            const V r1 = V::loadu(s1.data() + v0);
            const V dparam = A == Aggr::Softmax
                                 ? row.g * r1
                                 : power_grad_p<V, M>(row.g, row.out, V::loadu(prm.p.data() + v0), row.state, r1,
                                                      row.deg);
            (V::loadu(pp + v0) + dparam).store(pp + v0);
          }
        }
        flush();
      }
    }
  });
  // Sum the blocks' partials in block order, then drop the padding.
  std::vector<double> total(static_cast<size_t>(stride), 0.0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t k = 0; k < stride; ++k) total[k] += partial[b * stride + k];
  auto copy_rows = [&](const at::Tensor& dst, int64_t first_row, int64_t rows) {
    scalar_t* o = dst.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < d; ++c) o[r * d + c] = static_cast<scalar_t>(total[(first_row + r) * dpad + c]);
  };
  if (want_w) copy_rows(grads.weight_t, 0, f);
  if (want_b) copy_rows(grads.bias, f, 1);
  if (want_param) copy_rows(A == Aggr::Softmax ? grads.t : grads.p, f + 1, 1);
}

struct CpuGen {
  static void forward(const GenInputs& in, const at::Tensor& out, const at::Tensor& state) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "revgnn_ext.gen_aggregate", [&] {
      AT_DISPATCH_INDEX_TYPES(in.rowptr.scalar_type(), "revgnn_ext.gen_aggregate", [&] {
        dispatch_aggr(in.aggr, [&](auto aggr) {
          forward_kernel<scalar_t, index_t, decltype(aggr)::value>(in, out, state);
        });
      });
    });
  }

  static void backward(const GenInputs& in, const at::Tensor& out, const at::Tensor& state,
                       const at::Tensor& grad_out, const GenGrads& grads) {
    constexpr const char* op = "revgnn_ext.gen_aggregate_backward";
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), op, [&] {
      AT_DISPATCH_INDEX_TYPES(in.rowptr.scalar_type(), op, [&] {
        dispatch_aggr(in.aggr, [&](auto aggr) {
          constexpr Aggr AG = decltype(aggr)::value;
          if (grads.x.defined()) backward_x_kernel<scalar_t, index_t, AG>(in, out, state, grad_out, grads.x);
          if (grads.edge_attr.defined() || grads.weight_t.defined() || grads.bias.defined() || grads.t.defined() ||
              grads.p.defined())
            backward_params_kernel<scalar_t, index_t, AG>(in, out, state, grad_out, grads);
        });
      });
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_GEN_AGGREGATE(CPU, ::revgnn_ext::CpuGen)
