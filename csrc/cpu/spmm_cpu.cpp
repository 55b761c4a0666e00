// CPU kernels of the spmm family (contract: csrc/ops/spmm.h). Threaded over output rows with
// at::parallel_for; channels in blocks of at::vec::Vectorized registers. Every row is reduced
// sequentially in CSR order, so results are bitwise identical across runs and thread counts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/spmm.h"

namespace revgnn_ext {
namespace {

using at::vec::Vectorized;

// Rows per task: about 64k multiply-adds each, so short rows are not scheduled one by one.
int64_t grain_size(int64_t rows, int64_t entries, int64_t d) {
  const int64_t per_row = std::max<int64_t>(1, (entries / std::max<int64_t>(rows, 1) + 1) * d);
  return std::max<int64_t>(1, (int64_t{1} << 16) / per_row);
}

// Channels are processed in blocks of kVecs SIMD vectors, which stay in registers while a
// row's edges stream by; a block's last partial vector is handled by a scalar tail.
template <typename scalar_t>
struct Block {
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t kVecs = 8;
  static constexpr int64_t kWidth = kVecs * Vec::size();
};

// Rows are gathered at random: ask for the row kPrefetch edges ahead while this one is summed.
// Its index is not yet checked, but a prefetch of any address is harmless.
constexpr int64_t kPrefetch = 8;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* p, int64_t width) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t c = 0; c < width; c += kLine) __builtin_prefetch(p + c);
}

// out[i] (= or += alpha *) reduce_e w_e x[col_e] for sum/mean: vectorized over channels.
template <typename scalar_t, typename index_t, Reduce R>
void forward_sum(const index_t* rowptr, const index_t* col, int64_t num_edges, const scalar_t* w,
                 const scalar_t* x, int64_t ldx, int64_t num_src, scalar_t* out, int64_t ldo, int64_t n, int64_t d,
                 scalar_t alpha, bool accumulate) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t VS = Vec::size(), NV = Block<scalar_t>::kVecs, BW = Block<scalar_t>::kWidth;
  at::parallel_for(0, n, grain_size(n, num_edges, d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [e0, e1] = checked_row(rowptr, i, n, num_edges, "revgnn_ext.spmm", "rowptr");
      scalar_t* o = out + i * ldo;
      for (int64_t cb = 0; cb < d; cb += BW) {
        const int64_t width = std::min(BW, d - cb), nv = width / VS, rem = width % VS;
        Vec acc[NV];
        scalar_t tail[VS];
        for (int64_t k = 0; k < NV; ++k) acc[k] = Vec(scalar_t(0));
        for (int64_t k = 0; k < VS; ++k) tail[k] = scalar_t(0);
        for (int64_t e = e0; e < e1; ++e) {
          const scalar_t* xr = x + checked(col[e], num_src, "revgnn_ext.spmm", "col") * ldx + cb;
          if (e + kPrefetch < e1) prefetch_row(x + static_cast<int64_t>(col[e + kPrefetch]) * ldx + cb, width);
          const Vec we(w ? w[e] : scalar_t(1));
          if (nv == NV) {
            for (int64_t k = 0; k < NV; ++k) acc[k] = at::vec::fmadd(we, Vec::loadu(xr + k * VS), acc[k]);
          } else {
            for (int64_t k = 0; k < nv; ++k) acc[k] = at::vec::fmadd(we, Vec::loadu(xr + k * VS), acc[k]);
            const scalar_t ws = w ? w[e] : scalar_t(1);
            for (int64_t k = 0; k < rem; ++k) tail[k] += ws * xr[nv * VS + k];
          }
        }
        scalar_t res[BW];
        for (int64_t k = 0; k < nv; ++k) acc[k].store(res + k * VS);
        std::copy(tail, tail + rem, res + nv * VS);
        scalar_t* ob = o + cb;
        for (int64_t c = 0; c < width; ++c) {
          const scalar_t v = finalize<R, scalar_t>(res[c], e1 - e0);
          ob[c] = accumulate ? ob[c] + alpha * v : v;
        }
      }
    }
  });
}

// Max/min: per channel selection with its CSR edge position (see `replaces`).
template <typename scalar_t, typename index_t, Reduce R>
void forward_select(const index_t* rowptr, const index_t* col, int64_t num_edges, const scalar_t* w,
                    const scalar_t* x, int64_t ldx, int64_t num_src, scalar_t* out, int64_t ldo, index_t* arg, int64_t n,
                    int64_t d, scalar_t alpha, bool accumulate) {
  constexpr int64_t BW = Block<scalar_t>::kWidth;
  at::parallel_for(0, n, grain_size(n, num_edges, d), [&](int64_t begin, int64_t end) {
    scalar_t best[BW];
    index_t sel[BW];
    for (int64_t i = begin; i < end; ++i) {
      const auto [e0, e1] = checked_row(rowptr, i, n, num_edges, "revgnn_ext.spmm", "rowptr");
      for (int64_t cb = 0; cb < d; cb += BW) {
        const int64_t width = std::min(BW, d - cb);
        for (int64_t c = 0; c < width; ++c) {
          best[c] = scalar_t(0);
          sel[c] = index_t(-1);
        }
        for (int64_t e = e0; e < e1; ++e) {
          const scalar_t* xr = x + checked(col[e], num_src, "revgnn_ext.spmm", "col") * ldx + cb;
          const scalar_t we = w ? w[e] : scalar_t(1);
          const bool first = e == e0;
          for (int64_t c = 0; c < width; ++c) {
            const scalar_t v = we * xr[c];
            if (replaces<R>(v, best[c], !first)) {
              best[c] = v;
              sel[c] = static_cast<index_t>(e);
            }
          }
        }
        scalar_t* ob = out + i * ldo + cb;
        for (int64_t c = 0; c < width; ++c) {
          const scalar_t v = finalize<R, scalar_t>(best[c], e1 - e0);
          ob[c] = accumulate ? ob[c] + alpha * v : v;
        }
        if (arg) std::copy(sel, sel + width, arg + i * d + cb);
      }
    }
  });
}

// grad_x[j] = sum over transposed entries of the edge's share of grad_out[dst].
template <typename scalar_t, typename index_t, Reduce R>
void backward_x_kernel(const index_t* rowptr, const index_t* rowptr_t, const index_t* col_t, const index_t* perm_t,
                       const scalar_t* w, const scalar_t* g, int64_t ldg, const index_t* arg, int64_t n_dst,
                       int64_t num_edges, scalar_t* gx, int64_t n_src, int64_t d) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t VS = Vec::size(), NV = Block<scalar_t>::kVecs, BW = Block<scalar_t>::kWidth;
  constexpr const char* op = "revgnn_ext.spmm_backward_x";
  at::parallel_for(0, n_src, grain_size(n_src, num_edges, d), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const auto [t0, t1] = checked_row(rowptr_t, j, n_src, num_edges, op, "rowptr_t");
      for (int64_t cb = 0; cb < d; cb += BW) {
        const int64_t width = std::min(BW, d - cb);
        scalar_t* out = gx + j * d + cb;
        if constexpr (selects_edge<R>()) {
          for (int64_t c = 0; c < width; ++c) out[c] = scalar_t(0);
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t i = checked(col_t[t], n_dst, op, "col_t");
            const int64_t e = checked(perm_t[t], num_edges, op, "perm_t");
            const scalar_t we = w ? w[e] : scalar_t(1);
            const scalar_t* gr = g + i * ldg + cb;
            const index_t* ar = arg + i * d + cb;
            for (int64_t c = 0; c < width; ++c) out[c] += ar[c] == e ? we * gr[c] : scalar_t(0);
          }
        } else {
          const int64_t nv = width / VS, rem = width % VS;
          Vec acc[NV];
          scalar_t tail[VS];
          for (int64_t k = 0; k < NV; ++k) acc[k] = Vec(scalar_t(0));
          for (int64_t k = 0; k < VS; ++k) tail[k] = scalar_t(0);
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t i = checked(col_t[t], n_dst, op, "col_t");
            const int64_t e = checked(perm_t[t], num_edges, op, "perm_t");
            const auto [e0, e1] = checked_row(rowptr, i, n_dst, num_edges, op, "rowptr");
            const scalar_t s = grad_scale<R, scalar_t>(w ? w[e] : scalar_t(1), e1 - e0);
            const scalar_t* gr = g + i * ldg + cb;
            const Vec sv(s);
            if (nv == NV) {
              for (int64_t k = 0; k < NV; ++k) acc[k] = at::vec::fmadd(sv, Vec::loadu(gr + k * VS), acc[k]);
            } else {
              for (int64_t k = 0; k < nv; ++k) acc[k] = at::vec::fmadd(sv, Vec::loadu(gr + k * VS), acc[k]);
              for (int64_t k = 0; k < rem; ++k) tail[k] += s * gr[nv * VS + k];
            }
          }
          for (int64_t k = 0; k < nv; ++k) acc[k].store(out + k * VS);
          std::copy(tail, tail + rem, out + nv * VS);
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
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t VS = Vec::size();
  at::parallel_for(0, n, grain_size(n, num_edges, d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [e0, e1] = checked_row(rowptr, i, n, num_edges, "revgnn_ext.spmm_backward_weight", "rowptr");
      const scalar_t* gr = g + i * ldg;
      for (int64_t e = e0; e < e1; ++e) {
        const scalar_t* xr = x + checked(col[e], num_src, "revgnn_ext.spmm_backward_weight", "col") * ldx;
        scalar_t dot = 0;
        if constexpr (selects_edge<R>()) {
          const index_t* ar = arg + i * d;
          for (int64_t c = 0; c < d; ++c) dot += ar[c] == e ? xr[c] * gr[c] : scalar_t(0);
        } else {
          Vec acc(scalar_t(0));
          int64_t c = 0;
          for (; c + VS <= d; c += VS) acc = at::vec::fmadd(Vec::loadu(xr + c), Vec::loadu(gr + c), acc);
          scalar_t buf[VS];
          acc.store(buf);
          for (int64_t l = 0; l < VS; ++l) dot += buf[l];
          for (; c < d; ++c) dot += xr[c] * gr[c];
          dot = grad_scale<R, scalar_t>(dot, e1 - e0);
        }
        gw[e] = dot;
      }
    }
  });
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

struct CpuSpmm {
  static void check_dtype(at::ScalarType dtype, const char* op) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
                ": CPU kernels support float32 and float64, got ", dtype);
  }

  static void forward(const at::Tensor& rowptr, const at::Tensor& col, const c10::optional<at::Tensor>& weight,
                      const at::Tensor& x, Reduce reduce, const at::Tensor& out, const at::Tensor& arg,
                      double alpha, bool accumulate) {
    const auto w = weight.has_value() ? c10::optional<at::Tensor>(weight->contiguous()) : c10::nullopt;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "revgnn_ext.spmm", [&] {
      REVGNN_DISPATCH_INDEX(rowptr.scalar_type(), "revgnn_ext.spmm", [&] {
        REVGNN_DISPATCH_REDUCE(reduce, [&] {
          const auto* rp = rowptr.data_ptr<index_t>();
          const auto* cl = col.data_ptr<index_t>();
          const int64_t n = rowptr.numel() - 1, d = x.size(1);
          if constexpr (selects_edge<REDUCE>()) {
            forward_select<scalar_t, index_t, REDUCE>(rp, cl, col.numel(), ptr_or_null<scalar_t>(w), x.data_ptr<scalar_t>(),
                                                      x.stride(0), x.size(0), out.data_ptr<scalar_t>(), out.stride(0),
                                                      arg.defined() ? arg.data_ptr<index_t>() : nullptr, n, d,
                                                      static_cast<scalar_t>(alpha), accumulate);
          } else {
            forward_sum<scalar_t, index_t, REDUCE>(rp, cl, col.numel(), ptr_or_null<scalar_t>(w), x.data_ptr<scalar_t>(),
                                                   x.stride(0), x.size(0), out.data_ptr<scalar_t>(), out.stride(0),
                                                   n, d, static_cast<scalar_t>(alpha), accumulate);
          }
        });
      });
    });
  }

  static void backward_x(const at::Tensor& rowptr, const at::Tensor& rowptr_t, const at::Tensor& col_t,
                         const at::Tensor& perm_t, const c10::optional<at::Tensor>& weight,
                         const at::Tensor& grad_out, const at::Tensor& arg, Reduce reduce, const at::Tensor& grad_x) {
    const auto w = weight.has_value() ? c10::optional<at::Tensor>(weight->contiguous()) : c10::nullopt;
    AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "revgnn_ext.spmm_backward_x", [&] {
      REVGNN_DISPATCH_INDEX(rowptr.scalar_type(), "revgnn_ext.spmm_backward_x", [&] {
        REVGNN_DISPATCH_REDUCE(reduce, [&] {
          backward_x_kernel<scalar_t, index_t, REDUCE>(
              rowptr.data_ptr<index_t>(), rowptr_t.data_ptr<index_t>(), col_t.data_ptr<index_t>(),
              perm_t.data_ptr<index_t>(), ptr_or_null<scalar_t>(w), grad_out.data_ptr<scalar_t>(),
              grad_out.stride(0), selects_edge<REDUCE>() ? arg.data_ptr<index_t>() : nullptr, grad_out.size(0),
              col_t.numel(), grad_x.data_ptr<scalar_t>(), grad_x.size(0), grad_x.size(1));
        });
      });
    });
  }

  static void backward_weight(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& x,
                              const at::Tensor& grad_out, const at::Tensor& arg, Reduce reduce,
                              const at::Tensor& grad_weight) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "revgnn_ext.spmm_backward_weight", [&] {
      REVGNN_DISPATCH_INDEX(rowptr.scalar_type(), "revgnn_ext.spmm_backward_weight", [&] {
        REVGNN_DISPATCH_REDUCE(reduce, [&] {
          backward_weight_kernel<scalar_t, index_t, REDUCE>(
              rowptr.data_ptr<index_t>(), col.data_ptr<index_t>(), col.numel(), x.data_ptr<scalar_t>(), x.stride(0),
              x.size(0),
              grad_out.data_ptr<scalar_t>(), grad_out.stride(0),
              selects_edge<REDUCE>() ? arg.data_ptr<index_t>() : nullptr, rowptr.numel() - 1, x.size(1),
              grad_weight.data_ptr<scalar_t>());
        });
      });
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_SPMM(CPU, ::revgnn_ext::CpuSpmm)
