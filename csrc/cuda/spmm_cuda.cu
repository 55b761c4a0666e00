// CUDA kernels of the spmm family (contract: csrc/ops/spmm.h).
//
// Thread mapping, shared by the three kernels: a group of G lanes (a power of two in [8, 32],
// just enough to cover the channels in one pass) owns one row (a destination row, or a source
// row for backward_x); rows are visited with a grid-stride loop. Lane l of a group handles
// channels [c0 + l * VEC, c0 + (l + 1) * VEC) of each chunk of G * VEC channels. The group
// fetches the row's edges G at a time, one per lane (coalesced), checks their indices, and
// broadcasts them with __shfl_sync; kUnroll gathered rows are loaded before any is consumed,
// to keep several loads in flight. VEC > 1 means 16-byte loads, chosen on the host when the
// base pointer, the row stride and the width of the gathered matrices are 16-byte multiples.
//
// Determinism, no atomics: in forward and backward_x every output element is reduced by one
// lane, sequentially in (transposed) CSR order, whatever the launch shape. In backward_weight
// each lane sums its channels in order, then a fixed butterfly combines the group; G and VEC
// depend only on the width, the dtype and the alignment of x and grad_out, so the same inputs
// give the same bits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "ops/spmm.h"

namespace revgnn_ext {
namespace {

constexpr int kUnroll = 8;    // gathered rows loaded together, before any is consumed
static_assert(kMinGroup % kUnroll == 0, "a batch of edges must hold whole unrolled steps");

// out[i, c] (= or += alpha *) R over CSR edges e of row i of w_e * x[col_e, c]; arg for max/min.
template <typename scalar_t, typename index_t, Reduce R, int VEC>
__global__ void __launch_bounds__(kBlock)
    spmm_forward_kernel(const index_t* __restrict__ rowptr, const index_t* __restrict__ col,
                        int64_t num_edges, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ x,
                        int64_t ldx, int64_t num_src, scalar_t* __restrict__ out, int64_t ldo,
                        index_t* __restrict__ arg, int64_t n, int64_t d, at::opmath_type<scalar_t> alpha,
                        bool accumulate, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaneGroup g(group_size);
  const int64_t chunk = static_cast<int64_t>(g.size) * VEC;
  for (int64_t i = g.first_row(); i < n; i += g.row_stride()) {
    const auto [e0, e1] = row_range(rowptr, i, n, num_edges);
    for (int64_t c0 = 0; c0 < d; c0 += chunk) {
      const int64_t c = c0 + static_cast<int64_t>(g.lane) * VEC;
      const bool active = c < d;  // with VEC > 1, d % VEC == 0: the whole pack is in range
      acc_t acc[VEC];
      index_t sel[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        acc[v] = acc_t(0);
        sel[v] = index_t(-1);
      }
      bool has_best = false;  // max/min: whether an edge has been seen (see `replaces`)
      for (int64_t base = e0; base < e1; base += g.size) {
        // Lane l fetches edge base + l; src = -1 marks an edge past the row or out of range.
        const int64_t e = base + g.lane;
        const index_t src = fetch_index(col, e, e1, num_src);
        const acc_t w = src >= 0 && weight != nullptr ? static_cast<acc_t>(weight[e]) : acc_t(1);
        const int count = batch_count(base, e1, g.size);
        for (int k = 0; k < count; k += kUnroll) {
          index_t js[kUnroll];
          acc_t ws[kUnroll];
          Pack<scalar_t, VEC> xs[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            js[u] = g.shfl(src, k + u);
            ws[u] = weight != nullptr ? g.shfl(w, k + u) : acc_t(1);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (active && js[u] >= 0) xs[u] = load_pack<VEC>(x + static_cast<int64_t>(js[u]) * ldx + c);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (!active || js[u] < 0) continue;
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              const acc_t val = ws[u] * static_cast<acc_t>(xs[u].v[v]);
              if constexpr (selects_edge(R)) {
                if (replaces<R>(val, acc[v], has_best)) {
                  acc[v] = val;
                  sel[v] = static_cast<index_t>(base + k + u);
                }
              } else {
                acc[v] += val;
              }
            }
            has_best = true;
          }
        }
      }
      if (active) {
        scalar_t* o = out + i * ldo + c;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const acc_t r = finalize<R>(acc[v], e1 - e0);
          o[v] = accumulate ? static_cast<scalar_t>(static_cast<acc_t>(o[v]) + alpha * r) : static_cast<scalar_t>(r);
        }
        if constexpr (selects_edge(R)) {
          if (arg != nullptr) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) arg[i * d + c + v] = sel[v];
          }
        }
      }
    }
  }
}

// grad_x[j, c] = sum over transposed entries t of row j (edge e = perm_t[t] into i = col_t[t])
// of the edge's share of grad_out[i, c]; weight_t: the weight of each transposed entry.
template <typename scalar_t, typename index_t, Reduce R, int VEC>
__global__ void __launch_bounds__(kBlock)
    spmm_backward_x_kernel(const index_t* __restrict__ rowptr, const index_t* __restrict__ rowptr_t,
                           const index_t* __restrict__ col_t, const index_t* __restrict__ perm_t,
                           const scalar_t* __restrict__ weight_t, const scalar_t* __restrict__ grad_out, int64_t ldg,
                           const index_t* __restrict__ arg, int64_t n_dst, int64_t num_edges,
                           scalar_t* __restrict__ grad_x, int64_t n_src, int64_t d, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaneGroup g(group_size);
  const int64_t chunk = static_cast<int64_t>(g.size) * VEC;
  for (int64_t j = g.first_row(); j < n_src; j += g.row_stride()) {
    const auto [t0, t1] = row_range(rowptr_t, j, n_src, num_edges);
    for (int64_t c0 = 0; c0 < d; c0 += chunk) {
      const int64_t c = c0 + static_cast<int64_t>(g.lane) * VEC;
      const bool active = c < d;
      acc_t acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = acc_t(0);
      for (int64_t base = t0; base < t1; base += g.size) {
        // Lane l fetches entry base + l: its destination (-1: past the row or out of range),
        // its CSR edge (max/min compare it with arg) and its scale (w, or w / deg for mean).
        const int64_t t = base + g.lane;
        index_t dst = -1, edge = -1;
        acc_t s = acc_t(0);
        if (t < t1) {
          const index_t i = col_t[t], e = perm_t[t];
          const bool ok_i = in_range(i, n_dst), ok_e = in_range(e, num_edges);
          CUDA_KERNEL_ASSERT(ok_i && "revgnn_ext.spmm_backward_x: col_t index out of range");
          CUDA_KERNEL_ASSERT(ok_e && "revgnn_ext.spmm_backward_x: perm_t index out of range");
          if (ok_i && ok_e) {
            dst = i;
            edge = e;
            const acc_t w = weight_t != nullptr ? static_cast<acc_t>(weight_t[t]) : acc_t(1);
            if constexpr (selects_edge(R)) {
              s = w;
            } else {
              int64_t deg = 1;
              if constexpr (R == Reduce::Mean) {
                const auto [e0, e1] = row_range(rowptr, i, n_dst, num_edges);
                deg = e1 - e0;
              }
              s = grad_scale<R>(w, deg);
            }
          }
        }
        const int count = batch_count(base, t1, g.size);
        for (int k = 0; k < count; k += kUnroll) {
          index_t is[kUnroll], es[kUnroll];
          acc_t ss[kUnroll];
          Pack<scalar_t, VEC> gs[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            is[u] = g.shfl(dst, k + u);
            ss[u] = g.shfl(s, k + u);
            if constexpr (selects_edge(R)) es[u] = g.shfl(edge, k + u);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (active && is[u] >= 0) gs[u] = load_pack<VEC>(grad_out + static_cast<int64_t>(is[u]) * ldg + c);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (!active || is[u] < 0) continue;
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              const acc_t gv = static_cast<acc_t>(gs[u].v[v]);
              if constexpr (selects_edge(R)) {
                acc[v] += arg[static_cast<int64_t>(is[u]) * d + c + v] == es[u] ? ss[u] * gv : acc_t(0);
              } else {
                acc[v] += ss[u] * gv;
              }
            }
          }
        }
      }
      if (active) {
        Pack<scalar_t, VEC> res;
#pragma unroll
        for (int v = 0; v < VEC; ++v) res.v[v] = static_cast<scalar_t>(acc[v]);
        store_pack(grad_x + j * d + c, res);
      }
    }
  }
}

// grad_weight[e] = sum_c x[col_e, c] * grad_out[i, c] * s for each CSR edge e of row i; the
// group reduces kUnroll edges at a time, each lane summing its channels, then a butterfly.
template <typename scalar_t, typename index_t, Reduce R, int VEC>
__global__ void __launch_bounds__(kBlock)
    spmm_backward_weight_kernel(const index_t* __restrict__ rowptr, const index_t* __restrict__ col,
                                int64_t num_edges, const scalar_t* __restrict__ x, int64_t ldx, int64_t num_src,
                                const scalar_t* __restrict__ grad_out, int64_t ldg, const index_t* __restrict__ arg,
                                int64_t n, int64_t d, scalar_t* __restrict__ grad_weight, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaneGroup g(group_size);
  const int64_t chunk = static_cast<int64_t>(g.size) * VEC;
  for (int64_t i = g.first_row(); i < n; i += g.row_stride()) {
    const auto [e0, e1] = row_range(rowptr, i, n, num_edges);
    const scalar_t* grad_row = grad_out + i * ldg;
    for (int64_t base = e0; base < e1; base += g.size) {
      const index_t src = fetch_index(col, base + g.lane, e1, num_src);
      const int count = batch_count(base, e1, g.size);
      for (int k = 0; k < count; k += kUnroll) {
        index_t js[kUnroll];
        acc_t dot[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          js[u] = g.shfl(src, k + u);
          dot[u] = acc_t(0);
        }
        for (int64_t c0 = 0; c0 < d; c0 += chunk) {
          const int64_t c = c0 + static_cast<int64_t>(g.lane) * VEC;
          if (c >= d) continue;  // no shuffles in this loop: lanes may leave it early
          const Pack<scalar_t, VEC> gp = load_pack<VEC>(grad_row + c);
          index_t sel[VEC];
          if constexpr (selects_edge(R)) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) sel[v] = arg[i * d + c + v];
          }
          Pack<scalar_t, VEC> xs[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (js[u] >= 0) xs[u] = load_pack<VEC>(x + static_cast<int64_t>(js[u]) * ldx + c);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (js[u] < 0) continue;
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              const acc_t prod = static_cast<acc_t>(xs[u].v[v]) * static_cast<acc_t>(gp.v[v]);
              if constexpr (selects_edge(R)) {
                dot[u] += static_cast<int64_t>(sel[v]) == base + k + u ? prod : acc_t(0);
              } else {
                dot[u] += prod;
              }
            }
          }
        }
        // Every lane ends with the same sums; lane u writes edge base + k + u (an edge whose
        // col was out of range gets 0).
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const acc_t total = g.sum(dot[u]);
          if (g.lane == u && k + u < count) {
            grad_weight[base + k + u] =
                static_cast<scalar_t>(selects_edge(R) ? total : grad_scale<R>(total, e1 - e0));
          }
        }
      }
    }
  }
}

// ---- host side ----

struct CudaSpmm {
  static void forward(const at::Tensor& rowptr, const at::Tensor& col, const c10::optional<at::Tensor>& weight,
                      const at::Tensor& x, Reduce reduce, const at::Tensor& out, const at::Tensor& arg,
                      double alpha, bool accumulate) {
    const simt::DeviceGuard guard(x.device());
    const int64_t n = rowptr.numel() - 1, d = x.size(1);
    if (n <= 0 || d == 0) return;
    const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
    const bool packs = packs_ok(x);
    const auto stream = simt::current_stream();
    constexpr const char* op = "revgnn_ext.spmm";
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      AT_DISPATCH_INDEX_TYPES(rowptr.scalar_type(), op, [&] {
        dispatch_reduce(reduce, [&](auto r) {
          constexpr Reduce REDUCE = decltype(r)::value;
          with_vec<scalar_t>(packs, [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            const int lanes = lanes_per_row(d, VEC);
            simt::launch<spmm_forward_kernel<scalar_t, index_t, REDUCE, VEC>>(num_blocks(n, lanes), kBlock, 0, stream,
                rowptr.data_ptr<index_t>(), col.data_ptr<index_t>(), col.numel(), ptr_or_null<scalar_t>(w),
                x.data_ptr<scalar_t>(),
                x.stride(0), x.size(0), out.data_ptr<scalar_t>(), out.stride(0),
                selects_edge(REDUCE) && arg.defined() ? arg.data_ptr<index_t>() : nullptr, n, d,
                static_cast<acc_t>(alpha), accumulate, lanes);
          });
        });
      });
    });
  }

  static void backward_x(const at::Tensor& rowptr, const at::Tensor& rowptr_t, const at::Tensor& col_t,
                         const at::Tensor& perm_t, const c10::optional<at::Tensor>& weight_t,
                         const at::Tensor& grad_out, const at::Tensor& arg, Reduce reduce, const at::Tensor& grad_x) {
    const simt::DeviceGuard guard(grad_out.device());
    const int64_t n_src = rowptr_t.numel() - 1, d = grad_out.size(1);
    if (n_src <= 0 || d == 0) return;
    const at::Tensor w = weight_t.has_value() ? weight_t->contiguous() : at::Tensor();
    const bool packs = packs_ok(grad_out) && packs_ok(grad_x);
    const auto stream = simt::current_stream();
    constexpr const char* op = "revgnn_ext.spmm_backward_x";
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), op, [&] {
      AT_DISPATCH_INDEX_TYPES(rowptr_t.scalar_type(), op, [&] {
        dispatch_reduce(reduce, [&](auto r) {
          constexpr Reduce REDUCE = decltype(r)::value;
          with_vec<scalar_t>(packs, [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            const int lanes = lanes_per_row(d, VEC);
            simt::launch<spmm_backward_x_kernel<scalar_t, index_t, REDUCE, VEC>>(
                num_blocks(n_src, lanes), kBlock, 0, stream,
                rowptr.data_ptr<index_t>(), rowptr_t.data_ptr<index_t>(), col_t.data_ptr<index_t>(),
                perm_t.data_ptr<index_t>(), ptr_or_null<scalar_t>(w), grad_out.data_ptr<scalar_t>(),
                grad_out.stride(0), selects_edge(REDUCE) ? arg.data_ptr<index_t>() : nullptr, grad_out.size(0),
                col_t.numel(), grad_x.data_ptr<scalar_t>(), n_src, d, lanes);
          });
        });
      });
    });
  }

  static void backward_weight(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& x,
                              const at::Tensor& grad_out, const at::Tensor& arg, Reduce reduce,
                              const at::Tensor& grad_weight) {
    const simt::DeviceGuard guard(x.device());
    const int64_t n = rowptr.numel() - 1, d = x.size(1);
    if (grad_weight.numel() == 0 || n <= 0) return;
    if (d == 0) {  // every dot product is empty
      grad_weight.zero_();
      return;
    }
    const bool packs = packs_ok(x) && packs_ok(grad_out);
    const auto stream = simt::current_stream();
    constexpr const char* op = "revgnn_ext.spmm_backward_weight";
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      AT_DISPATCH_INDEX_TYPES(rowptr.scalar_type(), op, [&] {
        dispatch_reduce(reduce, [&](auto r) {
          constexpr Reduce REDUCE = decltype(r)::value;
          with_vec<scalar_t>(packs, [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            const int lanes = lanes_per_row(d, VEC);
            simt::launch<spmm_backward_weight_kernel<scalar_t, index_t, REDUCE, VEC>>(
                num_blocks(n, lanes), kBlock, 0, stream,
                rowptr.data_ptr<index_t>(), col.data_ptr<index_t>(), col.numel(), x.data_ptr<scalar_t>(), x.stride(0),
                x.size(0),
                grad_out.data_ptr<scalar_t>(), grad_out.stride(0),
                selects_edge(REDUCE) ? arg.data_ptr<index_t>() : nullptr, n, d, grad_weight.data_ptr<scalar_t>(),
                lanes);
          });
        });
      });
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_SPMM(SIMT_DISPATCH_KEY, ::revgnn_ext::CudaSpmm)
