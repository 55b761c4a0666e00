// CPU kernels of gen_aggregate (contract: csrc/ops/gen_aggregate.h). Threaded over rows with
// at::parallel_for; per row, channels in blocks of kWidth held in small arrays: plain loops over
// them vectorize, and exp/log go through at::vec (SIMD) a block at a time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/gen_aggregate.h"

namespace revgnn_ext {
namespace {

using at::vec::Vectorized;

constexpr int64_t kWidth = 64;      // channels per block
constexpr int64_t kRowBlock = 64;   // rows per partial sum of the parameter gradients

template <typename T>
void vexp(T* v, int64_t n) {
  at::vec::map([](Vectorized<T> a) { return a.exp(); }, v, v, n);
}

template <typename T>
void vlog(T* v, int64_t n) {
  at::vec::map([](Vectorized<T> a) { return a.log(); }, v, v, n);
}

// base^power, elementwise, as exp(power * log(base)) for base > 0 (all callers clamp first).
template <typename T>
void vpow(T* out, const T* base, const T* power, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = base[c];
  vlog(out, n);
  for (int64_t c = 0; c < n; ++c) out[c] *= power[c];
  vexp(out, n);
}

template <typename index_t>
inline int64_t checked(index_t v, int64_t bound, const char* op, const char* what) {
  TORCH_CHECK(static_cast<uint64_t>(v) < static_cast<uint64_t>(bound), op, ": ", what, " index ",
              static_cast<int64_t>(v), " is out of range [0, ", bound, "); build graphs with revgnn_ext.CSRGraph");
  return static_cast<int64_t>(v);
}

// Read-only views of the inputs, for one channel block [cb, cb + w).
template <typename scalar_t>
struct Edges {
  const scalar_t* attr;      // [E, F] or null
  const scalar_t* weight_t;  // [F, D] or null (direct or no edge features)
  const scalar_t* bias;      // [D] or null
  int64_t f, d;
  bool direct;

  // pre[c] = x_row[c] + emb(e)[c] for the block.
  void pre(int64_t e, const scalar_t* x_row, int64_t cb, int64_t w, scalar_t* out) const {
    for (int64_t c = 0; c < w; ++c) out[c] = x_row[cb + c];
    if (attr == nullptr) return;
    const scalar_t* a = attr + e * f;
    if (direct) {
      for (int64_t c = 0; c < w; ++c) out[c] += a[cb + c];
      return;
    }
    if (bias != nullptr)
      for (int64_t c = 0; c < w; ++c) out[c] += bias[cb + c];
    for (int64_t k = 0; k < f; ++k) {
      const scalar_t ak = a[k];
      const scalar_t* wk = weight_t + k * d + cb;
      for (int64_t c = 0; c < w; ++c) out[c] += ak * wk[c];
    }
  }
};

template <typename scalar_t>
Edges<scalar_t> edges_of(const GenInputs& in) {
  return {in.edge_attr.defined() ? in.edge_attr.data_ptr<scalar_t>() : nullptr,
          in.weight_t.defined() ? in.weight_t.data_ptr<scalar_t>() : nullptr,
          in.bias.defined() ? in.bias.data_ptr<scalar_t>() : nullptr, in.f, in.d, in.direct};
}

// ---------------------------------------------------------------------------------- forward
template <typename scalar_t, typename index_t, Aggr A>
void forward_kernel(const GenInputs& in, const at::Tensor& out_t, const at::Tensor& state_t) {
  constexpr const char* op = "revgnn_ext.gen_aggregate";
  const index_t* rowptr = in.rowptr.data_ptr<index_t>();
  const index_t* col = in.col.data_ptr<index_t>();
  const scalar_t* x = in.x.data_ptr<scalar_t>();
  const int64_t ldx = in.x.stride(0), num_src = in.x.size(0), d = in.d, n = in.num_dst;
  const scalar_t eps = static_cast<scalar_t>(in.eps);
  const scalar_t* t = in.t.defined() ? in.t.data_ptr<scalar_t>() : nullptr;
  const scalar_t* p = in.p.defined() ? in.p.data_ptr<scalar_t>() : nullptr;
  scalar_t* out = out_t.data_ptr<scalar_t>();
  const Edges<scalar_t> edges = edges_of<scalar_t>(in);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / ((rowptr[n] / std::max<int64_t>(n, 1) + 1) * d));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    scalar_t m[kWidth], acc[kWidth], mx[kWidth], sum[kWidth], tmp[kWidth], inv_p[kWidth];
    index_t sel[kWidth];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e0 = rowptr[i], e1 = rowptr[i + 1], deg = e1 - e0;
      for (int64_t cb = 0; cb < d; cb += kWidth) {
        const int64_t w = std::min(kWidth, d - cb);
        for (int64_t c = 0; c < w; ++c) acc[c] = scalar_t(0);
        for (int64_t e = e0; e < e1; ++e) {
          const scalar_t* xr = x + checked(col[e], num_src, op, "col") * ldx;
          edges.pre(e, xr, cb, w, m);
          for (int64_t c = 0; c < w; ++c) m[c] = gen_message(m[c], eps);
          if constexpr (A == Aggr::Sum || A == Aggr::Mean) {
            for (int64_t c = 0; c < w; ++c) acc[c] += m[c];
          } else if constexpr (A == Aggr::Max) {
            for (int64_t c = 0; c < w; ++c) {
              if (replaces<Reduce::Max>(m[c], acc[c], e != e0)) {
                acc[c] = m[c];
                sel[c] = static_cast<index_t>(e);
              }
            }
          } else if constexpr (A == Aggr::Softmax) {
            if (e == e0) {
              for (int64_t c = 0; c < w; ++c) {
                mx[c] = t[cb + c] * m[c];
                sum[c] = scalar_t(1);
                acc[c] = m[c];
              }
              continue;
            }
            for (int64_t c = 0; c < w; ++c) tmp[c] = -std::abs(t[cb + c] * m[c] - mx[c]);
            vexp(tmp, w);
            for (int64_t c = 0; c < w; ++c) softmax_push(t[cb + c] * m[c], m[c], tmp[c], mx[c], sum[c], acc[c]);
          } else {  // PowerMean
            for (int64_t c = 0; c < w; ++c) m[c] = power_clamp(m[c]);
            vpow(tmp, m, p + cb, w);
            for (int64_t c = 0; c < w; ++c) acc[c] += tmp[c];
          }
        }
        scalar_t* o = out + i * d + cb;
        if constexpr (A == Aggr::Sum || A == Aggr::Mean) {
          for (int64_t c = 0; c < w; ++c) o[c] = finalize<A == Aggr::Sum ? Reduce::Sum : Reduce::Mean>(acc[c], deg);
        } else if constexpr (A == Aggr::Max) {
          index_t* s = state_t.data_ptr<index_t>() + i * d + cb;
          for (int64_t c = 0; c < w; ++c) {
            o[c] = deg ? acc[c] : scalar_t(0);
            s[c] = deg ? sel[c] : index_t(-1);
          }
        } else if constexpr (A == Aggr::Softmax) {
          scalar_t* s = state_t.data_ptr<scalar_t>() + i * d + cb;
          for (int64_t c = 0; c < w; ++c) tmp[c] = deg ? sum[c] : scalar_t(1);
          vlog(tmp, w);
          for (int64_t c = 0; c < w; ++c) {
            o[c] = deg ? acc[c] / sum[c] : scalar_t(0);
            s[c] = deg ? mx[c] + tmp[c] : scalar_t(0);
          }
        } else {
          scalar_t* s = state_t.data_ptr<scalar_t>() + i * d + cb;
          for (int64_t c = 0; c < w; ++c) {
            s[c] = deg ? acc[c] / static_cast<scalar_t>(deg) : scalar_t(0);
            tmp[c] = power_clamp(s[c]);
            inv_p[c] = scalar_t(1) / p[cb + c];
          }
          vpow(o, tmp, inv_p, w);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------- backward
// The per-row values the derivative of an edge's message needs.
template <typename scalar_t, typename index_t>
struct RowView {
  const scalar_t* g;      // grad_out row
  const scalar_t* out;    // out row
  const scalar_t* state;  // L (softmax) or r (powermean) row
  const index_t* arg;     // max: selected edge per channel
  int64_t deg;
};

// dpre[c] (the gradient at x + emb) of edge e for a block of w channels at cb, given its
// pre-activation `pre`. Also fills `extra` per aggregation: softmax: g a m (m - out) (d/dt);
// powermean: q log(clamp m) (its row sum enters d/dp). Scratch `m`, `tmp` of kWidth.
template <typename scalar_t, typename index_t, Aggr A>
void edge_grad(const RowView<scalar_t, index_t>& row, int64_t e, const scalar_t* pre, const scalar_t* t,
               const scalar_t* p, scalar_t eps, int64_t w, scalar_t* m, scalar_t* tmp, scalar_t* dpre,
               scalar_t* extra) {
  for (int64_t c = 0; c < w; ++c) m[c] = gen_message(pre[c], eps);
  if constexpr (A == Aggr::Sum) {
    for (int64_t c = 0; c < w; ++c) dpre[c] = row.g[c];
  } else if constexpr (A == Aggr::Mean) {
    for (int64_t c = 0; c < w; ++c) dpre[c] = row.g[c] / static_cast<scalar_t>(row.deg);
  } else if constexpr (A == Aggr::Max) {
    for (int64_t c = 0; c < w; ++c) dpre[c] = row.arg[c] == e ? row.g[c] : scalar_t(0);
  } else if constexpr (A == Aggr::Softmax) {
    for (int64_t c = 0; c < w; ++c) tmp[c] = t[c] * m[c] - row.state[c];
    vexp(tmp, w);  // the attention weight a
    for (int64_t c = 0; c < w; ++c) {
      const scalar_t ga = row.g[c] * tmp[c], centered = m[c] - row.out[c];
      dpre[c] = ga * (scalar_t(1) + t[c] * centered);
      extra[c] = ga * m[c] * centered;
    }
  } else {  // PowerMean: dm = g dout/dr dr/dm
    scalar_t pm1[kWidth], base[kWidth];
    for (int64_t c = 0; c < w; ++c) {
      base[c] = power_clamp(m[c]);
      pm1[c] = p[c] - scalar_t(1);
    }
    vpow(tmp, base, pm1, w);  // clamp(m)^(p-1)
    for (int64_t c = 0; c < w; ++c) {
      extra[c] = tmp[c] * base[c];  // q = clamp(m)^p
      dpre[c] = power_in_range(m[c]) ? p[c] * tmp[c] / static_cast<scalar_t>(row.deg) : scalar_t(0);
      base[c] = power_clamp(row.state[c]);
      pm1[c] = scalar_t(1) / p[c] - scalar_t(1);
    }
    vpow(tmp, base, pm1, w);  // clamp(r)^(1/p - 1)
    for (int64_t c = 0; c < w; ++c) {
      const scalar_t dr = power_in_range(row.state[c]) ? tmp[c] / p[c] : scalar_t(0);
      dpre[c] *= row.g[c] * dr;
      base[c] = power_clamp(m[c]);
    }
    vlog(base, w);
    for (int64_t c = 0; c < w; ++c) extra[c] *= base[c];  // q log(clamp m)
  }
  for (int64_t c = 0; c < w; ++c) dpre[c] = pre[c] > scalar_t(0) ? dpre[c] : scalar_t(0);
}

template <typename scalar_t, typename index_t, Aggr A>
RowView<scalar_t, index_t> row_view(const GenInputs& in, const at::Tensor& out, const at::Tensor& state,
                                    const at::Tensor& grad_out, int64_t i, int64_t cb) {
  const index_t* rowptr = in.rowptr.data_ptr<index_t>();
  RowView<scalar_t, index_t> r{grad_out.data_ptr<scalar_t>() + i * in.d + cb, out.data_ptr<scalar_t>() + i * in.d + cb,
                               nullptr, nullptr, static_cast<int64_t>(rowptr[i + 1] - rowptr[i])};
  if constexpr (A == Aggr::Max) r.arg = state.data_ptr<index_t>() + i * in.d + cb;
  if constexpr (A == Aggr::Softmax || A == Aggr::PowerMean) r.state = state.data_ptr<scalar_t>() + i * in.d + cb;
  return r;
}

// grad_x[j] = sum over out-edges of j of dpre, over the transposed CSR.
template <typename scalar_t, typename index_t, Aggr A>
void backward_x_kernel(const GenInputs& in, const at::Tensor& out, const at::Tensor& state,
                       const at::Tensor& grad_out, const at::Tensor& grad_x) {
  constexpr const char* op = "revgnn_ext.gen_aggregate_backward";
  const index_t* rowptr_t = in.rowptr_t.data_ptr<index_t>();
  const index_t* col_t = in.col_t.data_ptr<index_t>();
  const index_t* perm_t = in.perm_t.data_ptr<index_t>();
  const scalar_t* x = in.x.data_ptr<scalar_t>();
  const int64_t ldx = in.x.stride(0), num_src = in.x.size(0), d = in.d, num_edges = in.col.numel();
  const scalar_t eps = static_cast<scalar_t>(in.eps);
  const scalar_t* t = in.t.defined() ? in.t.data_ptr<scalar_t>() : nullptr;
  const scalar_t* p = in.p.defined() ? in.p.data_ptr<scalar_t>() : nullptr;
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  const Edges<scalar_t> edges = edges_of<scalar_t>(in);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / ((num_edges / std::max<int64_t>(num_src, 1) + 1) * d));
  at::parallel_for(0, num_src, grain, [&](int64_t begin, int64_t end) {
    scalar_t pre[kWidth], m[kWidth], tmp[kWidth], dpre[kWidth], extra[kWidth];
    for (int64_t j = begin; j < end; ++j) {
      const scalar_t* xr = x + j * ldx;
      for (int64_t cb = 0; cb < d; cb += kWidth) {
        const int64_t w = std::min(kWidth, d - cb);
        scalar_t* acc = gx + j * d + cb;
        for (int64_t c = 0; c < w; ++c) acc[c] = scalar_t(0);
        for (int64_t k = rowptr_t[j]; k < rowptr_t[j + 1]; ++k) {
          const int64_t i = checked(col_t[k], in.num_dst, op, "col_t");
          const int64_t e = checked(perm_t[k], num_edges, op, "perm_t");
          edges.pre(e, xr, cb, w, pre);
          const auto row = row_view<scalar_t, index_t, A>(in, out, state, grad_out, i, cb);
          edge_grad<scalar_t, index_t, A>(row, e, pre, t ? t + cb : nullptr, p ? p + cb : nullptr, eps, w, m, tmp,
                                          dpre, extra);
          for (int64_t c = 0; c < w; ++c) acc[c] += dpre[c];
        }
      }
    }
  });
}

// Per-edge grad_edge_attr and the parameter gradients, over the CSR: each fixed block of
// kRowBlock rows writes its own partial sums; they are added over blocks in order.
template <typename scalar_t, typename index_t, Aggr A>
void backward_params_kernel(const GenInputs& in, const at::Tensor& out, const at::Tensor& state,
                            const at::Tensor& grad_out, const GenGrads& grads) {
  constexpr const char* op = "revgnn_ext.gen_aggregate_backward";
  const index_t* rowptr = in.rowptr.data_ptr<index_t>();
  const index_t* col = in.col.data_ptr<index_t>();
  const scalar_t* x = in.x.data_ptr<scalar_t>();
  const int64_t ldx = in.x.stride(0), num_src = in.x.size(0), d = in.d, f = in.f, n = in.num_dst;
  const scalar_t eps = static_cast<scalar_t>(in.eps);
  const scalar_t* t = in.t.defined() ? in.t.data_ptr<scalar_t>() : nullptr;
  const scalar_t* p = in.p.defined() ? in.p.data_ptr<scalar_t>() : nullptr;
  const Edges<scalar_t> edges = edges_of<scalar_t>(in);
  scalar_t* ga = grads.edge_attr.defined() ? grads.edge_attr.data_ptr<scalar_t>() : nullptr;
  const bool want_w = grads.weight_t.defined(), want_b = grads.bias.defined();
  const bool want_param = (A == Aggr::Softmax && grads.t.defined()) || (A == Aggr::PowerMean && grads.p.defined());
  // Partial layout per block: [F * D weight | D bias | D t-or-p].
  const int64_t stride = f * d + 2 * d, blocks = (n + kRowBlock - 1) / kRowBlock;
  std::vector<scalar_t> partial(static_cast<size_t>(blocks * stride), scalar_t(0));
  at::parallel_for(0, blocks, 1, [&](int64_t bb, int64_t be) {
    scalar_t pre[kWidth], m[kWidth], tmp[kWidth], dpre[kWidth], extra[kWidth], s[kWidth];
    for (int64_t b = bb; b < be; ++b) {
      scalar_t* pw = partial.data() + b * stride;
      scalar_t* pb = pw + f * d;
      scalar_t* pp = pb + d;
      for (int64_t i = b * kRowBlock; i < std::min(n, (b + 1) * kRowBlock); ++i) {
        const int64_t e0 = rowptr[i], e1 = rowptr[i + 1];
        if (ga != nullptr) std::fill(ga + e0 * f, ga + e1 * f, scalar_t(0));
        for (int64_t cb = 0; cb < d; cb += kWidth) {
          const int64_t w = std::min(kWidth, d - cb);
          const auto row = row_view<scalar_t, index_t, A>(in, out, state, grad_out, i, cb);
          for (int64_t c = 0; c < w; ++c) s[c] = scalar_t(0);
          for (int64_t e = e0; e < e1; ++e) {
            const scalar_t* xr = x + checked(col[e], num_src, op, "col") * ldx;
            edges.pre(e, xr, cb, w, pre);
            edge_grad<scalar_t, index_t, A>(row, e, pre, t ? t + cb : nullptr, p ? p + cb : nullptr, eps, w, m, tmp,
                                            dpre, extra);
            if (ga != nullptr) {
              scalar_t* ge = ga + e * f;
              if (in.direct) {
                for (int64_t c = 0; c < w; ++c) ge[cb + c] = dpre[c];
              } else {
                const scalar_t* wt = in.weight_t.data_ptr<scalar_t>();
                for (int64_t k = 0; k < f; ++k) {
                  scalar_t dot = 0;
                  for (int64_t c = 0; c < w; ++c) dot += dpre[c] * wt[k * d + cb + c];
                  ge[k] += dot;
                }
              }
            }
            if (want_w) {
              const scalar_t* a = in.edge_attr.data_ptr<scalar_t>() + e * f;
              for (int64_t k = 0; k < f; ++k)
                for (int64_t c = 0; c < w; ++c) pw[k * d + cb + c] += a[k] * dpre[c];
            }
            if (want_b)
              for (int64_t c = 0; c < w; ++c) pb[cb + c] += dpre[c];
            if (want_param)
              for (int64_t c = 0; c < w; ++c) s[c] += extra[c];
          }
          if (!want_param) continue;
          if constexpr (A == Aggr::Softmax) {
            for (int64_t c = 0; c < w; ++c) pp[cb + c] += s[c];
          } else if constexpr (A == Aggr::PowerMean) {
            // d out / d p = out (-log(clamp r) / p^2 + [r in range] (s / deg) / (p clamp r)).
            for (int64_t c = 0; c < w; ++c) tmp[c] = power_clamp(row.state[c]);
            for (int64_t c = 0; c < w; ++c) m[c] = tmp[c];
            vlog(m, w);
            for (int64_t c = 0; c < w; ++c) {
              const scalar_t pc = p[cb + c];
              scalar_t dp = -m[c] / (pc * pc);
              if (power_in_range(row.state[c]) && e1 > e0)
                dp += s[c] / static_cast<scalar_t>(e1 - e0) / (pc * tmp[c]);
              pp[cb + c] += row.g[c] * row.out[c] * dp;
            }
          }
        }
      }
    }
  });
  // Sum the blocks' partials in block order.
  std::vector<scalar_t> total(static_cast<size_t>(stride), scalar_t(0));
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t k = 0; k < stride; ++k) total[k] += partial[b * stride + k];
  if (want_w) std::copy(total.begin(), total.begin() + f * d, grads.weight_t.data_ptr<scalar_t>());
  if (want_b) std::copy(total.begin() + f * d, total.begin() + f * d + d, grads.bias.data_ptr<scalar_t>());
  const at::Tensor& gparam = A == Aggr::Softmax ? grads.t : grads.p;
  if (want_param) std::copy(total.begin() + f * d + d, total.end(), gparam.data_ptr<scalar_t>());
}

#define REVGNN_DISPATCH_AGGR(AGGR, ...)                                                   \
  [&] {                                                                                   \
    switch (AGGR) {                                                                       \
      case Aggr::Sum: { constexpr Aggr AG = Aggr::Sum; return __VA_ARGS__(); }             \
      case Aggr::Mean: { constexpr Aggr AG = Aggr::Mean; return __VA_ARGS__(); }           \
      case Aggr::Max: { constexpr Aggr AG = Aggr::Max; return __VA_ARGS__(); }             \
      case Aggr::Softmax: { constexpr Aggr AG = Aggr::Softmax; return __VA_ARGS__(); }     \
      default: { constexpr Aggr AG = Aggr::PowerMean; return __VA_ARGS__(); }              \
    }                                                                                     \
  }()

struct CpuGen {
  static void check_dtype(at::ScalarType dtype, const char* op) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": CPU kernels support float32 and float64, got ",
                dtype);
  }

  static void forward(const GenInputs& in, const at::Tensor& out, const at::Tensor& state) {
    AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "revgnn_ext.gen_aggregate", [&] {
      REVGNN_DISPATCH_INDEX(in.rowptr.scalar_type(), "revgnn_ext.gen_aggregate", [&] {
        REVGNN_DISPATCH_AGGR(in.aggr, [&] { forward_kernel<scalar_t, index_t, AG>(in, out, state); });
      });
    });
  }

  static void backward(const GenInputs& in, const at::Tensor& out, const at::Tensor& state,
                       const at::Tensor& grad_out, const GenGrads& grads) {
    AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "revgnn_ext.gen_aggregate_backward", [&] {
      REVGNN_DISPATCH_INDEX(in.rowptr.scalar_type(), "revgnn_ext.gen_aggregate_backward", [&] {
        REVGNN_DISPATCH_AGGR(in.aggr, [&] {
          backward_x_kernel<scalar_t, index_t, AG>(in, out, state, grad_out, grads.x);
          const bool any = grads.edge_attr.defined() || grads.weight_t.defined() || grads.bias.defined() ||
                           grads.t.defined() || grads.p.defined();
          if (any) backward_params_kernel<scalar_t, index_t, AG>(in, out, state, grad_out, grads);
        });
      });
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_GEN_AGGREGATE(CPU, ::revgnn_ext::CpuGen)
