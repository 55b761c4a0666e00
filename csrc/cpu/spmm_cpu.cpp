// CPU kernels of the spmm family (contract: csrc/ops/spmm.h). Threaded over output rows with
// at::parallel_for; channels in blocks of at::vec::Vectorized registers, computed in float32 for
// float16/bfloat16 (cpu/common.h). Every row is reduced sequentially in CSR order, so results are
// bitwise identical across runs and thread counts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/common.h"
#include "ops/spmm.h"

namespace revgnn_ext {
namespace {

using cpu::AccVec;
using cpu::load_acc;
using cpu::store_acc;

// Channels are processed in blocks of kVecs SIMD vectors, which stay in registers while a row's
// edges stream by; a block's last partial vector is handled by a scalar tail.
constexpr int64_t kVecs = 8;

// Rows are gathered at random: ask for the row kPrefetch edges ahead while this one is summed.
// Its index is not yet checked, but a prefetch of any address is harmless.
constexpr int64_t kPrefetch = 8;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* p, int64_t width) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t c = 0; c < width; c += kLine) __builtin_prefetch(p + c);
}

// The weight of edge e (1 without weights), widened.
template <typename scalar_t>
inline at::opmath_type<scalar_t> edge_weight(const scalar_t* w, int64_t e) {
  return w ? static_cast<at::opmath_type<scalar_t>>(w[e]) : at::opmath_type<scalar_t>(1);
}

// out = v, or out += alpha * v, rounded once.
template <typename scalar_t, typename acc_t>
inline void write(scalar_t& out, acc_t v, acc_t alpha, bool accumulate) {
  out = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(out) + alpha * v : v);
}

// out[i] (= or += alpha *) reduce_e w_e x[col_e] for sum/mean: vectorized over channels.
template <typename scalar_t, typename index_t, Reduce R>
void forward_sum(const index_t* rowptr, const index_t* col, int64_t num_edges, const scalar_t* w,
                 const scalar_t* x, int64_t ldx, int64_t num_src, scalar_t* out, int64_t ldo, int64_t n, int64_t d,
                 at::opmath_type<scalar_t> alpha, bool accumulate) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VS = Vec::size(), BW = kVecs * VS;
  at::parallel_for(0, n, cpu::grain_size(n, num_edges, d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [e0, e1] = checked_row(rowptr, i, n, num_edges, "revgnn_ext.spmm", "rowptr");
      for (int64_t cb = 0; cb < d; cb += BW) {
        const int64_t width = std::min(BW, d - cb), nv = width / VS, rem = width % VS;
        Vec acc[kVecs];
        acc_t tail[VS];
        for (int64_t k = 0; k < kVecs; ++k) acc[k] = Vec(acc_t(0));
        for (int64_t k = 0; k < VS; ++k) tail[k] = acc_t(0);
        for (int64_t e = e0; e < e1; ++e) {
          const scalar_t* xr = x + checked(col[e], num_src, "revgnn_ext.spmm", "col") * ldx + cb;
          if (e + kPrefetch < e1) prefetch_row(x + static_cast<int64_t>(col[e + kPrefetch]) * ldx + cb, width);
          const acc_t ws = edge_weight(w, e);
          const Vec we(ws);
          if (nv == kVecs) {
            for (int64_t k = 0; k < kVecs; ++k) acc[k] = at::vec::fmadd(we, load_acc(xr + k * VS), acc[k]);
          } else {
            for (int64_t k = 0; k < nv; ++k) acc[k] = at::vec::fmadd(we, load_acc(xr + k * VS), acc[k]);
            for (int64_t k = 0; k < rem; ++k) tail[k] += ws * static_cast<acc_t>(xr[nv * VS + k]);
          }
        }
        acc_t res[BW];
        for (int64_t k = 0; k < nv; ++k) acc[k].store(res + k * VS);
        std::copy(tail, tail + rem, res + nv * VS);
        scalar_t* ob = out + i * ldo + cb;
        for (int64_t c = 0; c < width; ++c) write(ob[c], finalize<R, acc_t>(res[c], e1 - e0), alpha, accumulate);
      }
    }
  });
}

// Max/min: per channel selection with its CSR edge position (see `replaces`).
template <typename scalar_t, typename index_t, Reduce R>
void forward_select(const index_t* rowptr, const index_t* col, int64_t num_edges, const scalar_t* w,
                    const scalar_t* x, int64_t ldx, int64_t num_src, scalar_t* out, int64_t ldo, index_t* arg,
                    int64_t n, int64_t d, at::opmath_type<scalar_t> alpha, bool accumulate) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t BW = kVecs * AccVec<scalar_t>::size();
  at::parallel_for(0, n, cpu::grain_size(n, num_edges, d), [&](int64_t begin, int64_t end) {
    acc_t best[BW];
    index_t sel[BW];
    for (int64_t i = begin; i < end; ++i) {
      const auto [e0, e1] = checked_row(rowptr, i, n, num_edges, "revgnn_ext.spmm", "rowptr");
      for (int64_t cb = 0; cb < d; cb += BW) {
        const int64_t width = std::min(BW, d - cb);
        for (int64_t c = 0; c < width; ++c) {
          best[c] = acc_t(0);
          sel[c] = index_t(-1);
        }
        for (int64_t e = e0; e < e1; ++e) {
          const scalar_t* xr = x + checked(col[e], num_src, "revgnn_ext.spmm", "col") * ldx + cb;
          const acc_t we = edge_weight(w, e);
          for (int64_t c = 0; c < width; ++c) {
            const acc_t v = we * static_cast<acc_t>(xr[c]);
            if (replaces<R>(v, best[c], e != e0)) {
              best[c] = v;
              sel[c] = static_cast<index_t>(e);
            }
          }
        }
        scalar_t* ob = out + i * ldo + cb;
        for (int64_t c = 0; c < width; ++c) write(ob[c], finalize<R, acc_t>(best[c], e1 - e0), alpha, accumulate);
        if (arg) std::copy(sel, sel + width, arg + i * d + cb);
      }
    }
  });
}

// grad_x[j] = sum over transposed entries of the edge's share of grad_out[dst]; w_t: the weight of
// each transposed entry (in transposed order).
template <typename scalar_t, typename index_t, Reduce R>
void backward_x_kernel(const index_t* rowptr, const index_t* rowptr_t, const index_t* col_t, const index_t* perm_t,
                       const scalar_t* w_t, const scalar_t* g, int64_t ldg, const index_t* arg, int64_t n_dst,
                       int64_t num_edges, scalar_t* gx, int64_t n_src, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VS = Vec::size(), BW = kVecs * VS;
  constexpr const char* op = "revgnn_ext.spmm_backward_x";
  at::parallel_for(0, n_src, cpu::grain_size(n_src, num_edges, d), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const auto [t0, t1] = checked_row(rowptr_t, j, n_src, num_edges, op, "rowptr_t");
      for (int64_t cb = 0; cb < d; cb += BW) {
        const int64_t width = std::min(BW, d - cb);
        scalar_t* out = gx + j * d + cb;
        if constexpr (selects_edge(R)) {
          acc_t acc[BW] = {};
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t i = checked(col_t[t], n_dst, op, "col_t");
            const int64_t e = checked(perm_t[t], num_edges, op, "perm_t");
            const acc_t we = edge_weight(w_t, t);
            const scalar_t* gr = g + i * ldg + cb;
            const index_t* ar = arg + i * d + cb;
            for (int64_t c = 0; c < width; ++c) acc[c] += ar[c] == e ? we * static_cast<acc_t>(gr[c]) : acc_t(0);
          }
          for (int64_t c = 0; c < width; ++c) out[c] = static_cast<scalar_t>(acc[c]);
        } else {
          const int64_t nv = width / VS, rem = width % VS;
          Vec acc[kVecs];
          acc_t tail[VS];
          for (int64_t k = 0; k < kVecs; ++k) acc[k] = Vec(acc_t(0));
          for (int64_t k = 0; k < VS; ++k) tail[k] = acc_t(0);
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t i = checked(col_t[t], n_dst, op, "col_t");
            const auto [e0, e1] = checked_row(rowptr, i, n_dst, num_edges, op, "rowptr");
            const acc_t s = grad_scale<R, acc_t>(edge_weight(w_t, t), e1 - e0);
            const scalar_t* gr = g + i * ldg + cb;
            const Vec sv(s);
            if (nv == kVecs) {
              for (int64_t k = 0; k < kVecs; ++k) acc[k] = at::vec::fmadd(sv, load_acc(gr + k * VS), acc[k]);
            } else {
              for (int64_t k = 0; k < nv; ++k) acc[k] = at::vec::fmadd(sv, load_acc(gr + k * VS), acc[k]);
              for (int64_t k = 0; k < rem; ++k) tail[k] += s * static_cast<acc_t>(gr[nv * VS + k]);
            }
          }
          for (int64_t k = 0; k < nv; ++k) store_acc(acc[k], out + k * VS);
          for (int64_t k = 0; k < rem; ++k) out[nv * VS + k] = static_cast<scalar_t>(tail[k]);
        }
      }
    }
  });
}

// grad_w[e] = <x[col_e], grad_out[i]> (scaled for mean, gated by arg for max/min).
template <typename scalar_t, typename index_t, Reduce R>
void backward_weight_kernel(const index_t* rowptr, const index_t* col, int64_t num_edges, const scalar_t* x,
                            int64_t ldx, int64_t num_src, const scalar_t* g, int64_t ldg, const index_t* arg, int64_t n,
                            int64_t d, scalar_t* gw) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VS = Vec::size();
  constexpr const char* op = "revgnn_ext.spmm_backward_weight";
  at::parallel_for(0, n, cpu::grain_size(n, num_edges, d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [e0, e1] = checked_row(rowptr, i, n, num_edges, op, "rowptr");
      const scalar_t* gr = g + i * ldg;
      for (int64_t e = e0; e < e1; ++e) {
        const scalar_t* xr = x + checked(col[e], num_src, op, "col") * ldx;
        acc_t dot = 0;
        if constexpr (selects_edge(R)) {
          const index_t* ar = arg + i * d;
          for (int64_t c = 0; c < d; ++c)
            dot += ar[c] == e ? static_cast<acc_t>(xr[c]) * static_cast<acc_t>(gr[c]) : acc_t(0);
        } else {
          Vec acc(acc_t(0));
          int64_t c = 0;
          for (; c + VS <= d; c += VS) acc = at::vec::fmadd(load_acc(xr + c), load_acc(gr + c), acc);
          dot = cpu::lane_sum(acc);
          for (; c < d; ++c) dot += static_cast<acc_t>(xr[c]) * static_cast<acc_t>(gr[c]);
          dot = grad_scale<R, acc_t>(dot, e1 - e0);
        }
        gw[e] = static_cast<scalar_t>(dot);
      }
    }
  });
}

struct CpuSpmm {
  static void forward(const at::Tensor& rowptr, const at::Tensor& col, const c10::optional<at::Tensor>& weight,
                      const at::Tensor& x, Reduce reduce, const at::Tensor& out, const at::Tensor& arg,
                      double alpha, bool accumulate) {
    const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "revgnn_ext.spmm", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      AT_DISPATCH_INDEX_TYPES(rowptr.scalar_type(), "revgnn_ext.spmm", [&] {
        dispatch_reduce(reduce, [&](auto r) {
          constexpr Reduce R = decltype(r)::value;
          const auto* rp = rowptr.data_ptr<index_t>();
          const auto* cl = col.data_ptr<index_t>();
          const int64_t n = rowptr.numel() - 1, d = x.size(1);
          if constexpr (selects_edge(R)) {
            forward_select<scalar_t, index_t, R>(rp, cl, col.numel(), cpu::ptr_or_null<scalar_t>(w),
                                                 x.data_ptr<scalar_t>(), x.stride(0), x.size(0),
                                                 out.data_ptr<scalar_t>(), out.stride(0),
                                                 cpu::ptr_or_null<index_t>(arg), n, d, static_cast<acc_t>(alpha),
                                                 accumulate);
          } else {
            forward_sum<scalar_t, index_t, R>(rp, cl, col.numel(), cpu::ptr_or_null<scalar_t>(w),
                                              x.data_ptr<scalar_t>(), x.stride(0), x.size(0),
                                              out.data_ptr<scalar_t>(), out.stride(0), n, d,
                                              static_cast<acc_t>(alpha), accumulate);
          }
        });
      });
    });
  }

  static void backward_x(const at::Tensor& rowptr, const at::Tensor& rowptr_t, const at::Tensor& col_t,
                         const at::Tensor& perm_t, const c10::optional<at::Tensor>& weight_t,
                         const at::Tensor& grad_out, const at::Tensor& arg, Reduce reduce, const at::Tensor& grad_x) {
    const at::Tensor w = weight_t.has_value() ? weight_t->contiguous() : at::Tensor();
    constexpr const char* op = "revgnn_ext.spmm_backward_x";
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), op, [&] {
      AT_DISPATCH_INDEX_TYPES(rowptr.scalar_type(), op, [&] {
        dispatch_reduce(reduce, [&](auto r) {
          constexpr Reduce R = decltype(r)::value;
          backward_x_kernel<scalar_t, index_t, R>(
              rowptr.data_ptr<index_t>(), rowptr_t.data_ptr<index_t>(), col_t.data_ptr<index_t>(),
              perm_t.data_ptr<index_t>(), cpu::ptr_or_null<scalar_t>(w), grad_out.data_ptr<scalar_t>(),
              grad_out.stride(0), selects_edge(R) ? arg.data_ptr<index_t>() : nullptr, grad_out.size(0),
              col_t.numel(), grad_x.data_ptr<scalar_t>(), grad_x.size(0), grad_x.size(1));
        });
      });
    });
  }

  static void backward_weight(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& x,
                              const at::Tensor& grad_out, const at::Tensor& arg, Reduce reduce,
                              const at::Tensor& grad_weight) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "revgnn_ext.spmm_backward_weight", [&] {
      AT_DISPATCH_INDEX_TYPES(rowptr.scalar_type(), "revgnn_ext.spmm_backward_weight", [&] {
        dispatch_reduce(reduce, [&](auto r) {
          constexpr Reduce R = decltype(r)::value;
          backward_weight_kernel<scalar_t, index_t, R>(
              rowptr.data_ptr<index_t>(), col.data_ptr<index_t>(), col.numel(), x.data_ptr<scalar_t>(), x.stride(0),
              x.size(0), grad_out.data_ptr<scalar_t>(), grad_out.stride(0),
              selects_edge(R) ? arg.data_ptr<index_t>() : nullptr, rowptr.numel() - 1, x.size(1),
              grad_weight.data_ptr<scalar_t>());
        });
      });
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_SPMM(CPU, ::revgnn_ext::CpuSpmm)
