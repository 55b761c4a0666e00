// CUDA kernels of gat_aggregate (contract and shared formulas: csrc/ops/gat_aggregate.h).
//
// Thread mapping (cuda/common.cuh): a group of G lanes owns one (row, head), or for backward_dst
// one row and all its heads; lane l holds channels c0 + l + k * G, k < kPer, of each pass over a
// head's C channels (one pass for C <= kPer * G). The group fetches a row's edges G at a time, one
// per lane: its index, mask and dropout hash, and in the forward and backward_src its score
// (GatEdges, shared with the CPU kernels), then broadcasts them with __shfl_sync; every lane runs
// the same scalar softmax steps in the same order, so they agree bit for bit. backward_dst's
// blocks own fixed runs of kBlock / G rows, one per group; the others' loops are grid-stride.
//
// Determinism, no atomics: out, grad_x, grad_src_score and grad_dst_score are sequential sums of
// one group in (transposed) CSR order, dot products fixed butterflies over the group (channel
// slots in order); a grad_edge_attr element is one lane's sum over the heads in order, written
// once. The edge_weight gradient is summed in float64 by each lane over its row's edges, then over
// the groups of its block in order, one partial per block; sum_partials adds the partials in block
// order. G depends on C only, so the bits do not depend on the grid or the GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cuda/common.cuh"
#include "ops/gat_aggregate.h"

namespace revgnn_ext {
namespace {

constexpr int kPer = 4;    // channels per lane and pass
constexpr int kSlots = 8;  // values per lane and pass of backward_dst (of each of its three outputs)
static_assert(kSlots * 32 <= kBlock, "a pass's edge_weight sums are added up by one thread each");

// What one lane fetched of an edge of a batch: the other end of the edge (-1: past the row, dropped,
// or out of range), its CSR position, its score z before the activation, its dropout hash.
template <typename acc_t>
struct Fetched {
  int64_t node = -1;
  int64_t edge = -1;
  acc_t z = 0;
  uint32_t hash = 0;
};

// Lane's fetch of CSR edge e of row i (e < end), head h: for the forward.
template <typename scalar_t, typename index_t>
__device__ __forceinline__ Fetched<at::opmath_type<scalar_t>> fetch_in_edge(const GatEdges<scalar_t, index_t>& ed,
                                                                             const index_t* col, int64_t i, int64_t e,
                                                                             int64_t end, int64_t num_src, int64_t h) {
  Fetched<at::opmath_type<scalar_t>> f;
  const index_t j = fetch_index(col, e, end, num_src);
  if (j < 0 || !ed.kept(e)) return f;
  f.node = j;
  f.edge = e;
  f.z = ed.z(i, j, e, h);
  f.hash = ed.hash(e);
  return f;
}

template <typename acc_t>
__device__ __forceinline__ Fetched<acc_t> shfl_fetched(const LaneGroup& g, const Fetched<acc_t>& f,
                                                       int u SIMT_CALL_SITE) {
  Fetched<acc_t> r;
  r.node = g.shfl(f.node, u SIMT_PASS_SITE);
  r.edge = g.shfl(f.edge, u SIMT_PASS_SITE);
  r.z = g.shfl(f.z, u SIMT_PASS_SITE);
  r.hash = g.shfl(f.hash, u SIMT_PASS_SITE);
  return r;
}

// <a[0..C), b[0..C)> over the group: each lane its channels in order, then a butterfly.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t group_dot(const LaneGroup& g, const scalar_t* a, const scalar_t* b, int64_t c) {
  acc_t s = acc_t(0);
  for (int64_t k = g.lane; k < c; k += g.size) s += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  return g.sum(s);
}

// ---------------------------------------------------------------------------------- forward
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock)
    gat_forward_kernel(const index_t* __restrict__ rowptr, const index_t* __restrict__ col, int64_t num_edges,
                       const scalar_t* __restrict__ x, int64_t ldx, int64_t num_src,
                       const GatEdges<scalar_t, index_t> ed,
                       scalar_t* __restrict__ out, int64_t ldo, at::opmath_type<scalar_t>* __restrict__ lse,
                       at::opmath_type<scalar_t> alpha, int64_t n, int64_t c, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaneGroup g(group_size);
  const int64_t heads = ed.heads;
  for (int64_t item = g.first_row(); item < n * heads; item += g.row_stride()) {
    const int64_t i = item / heads, h = item - i * heads;
    const auto [e0, e1] = row_range(rowptr, i, n, num_edges);
    for (int64_t c0 = 0; c0 < c; c0 += kPer * g.size) {
      acc_t mean[kPer] = {};
      acc_t mx = -std::numeric_limits<acc_t>::infinity(), sum = acc_t(0);
      bool any = false;
      for (int64_t base = e0; base < e1; base += g.size) {
        const auto mine = fetch_in_edge(ed, col, i, base + g.lane, e1, num_src, h);
        const int count = batch_count(base, e1, g.size);
        for (int u = 0; u < count; ++u) {
          const auto f = shfl_fetched(g, mine, u);
          if (f.node < 0) continue;
          any = true;
          const acc_t w = gat_softmax_join(gat_leaky(f.z, ed.slope), mx, sum);
          const acc_t drop = ed.drop(f.hash, h);
          const scalar_t* xr = x + f.node * ldx + h * c;
#pragma unroll
          for (int k = 0; k < kPer; ++k) {
            const int64_t ch = c0 + k * g.size + g.lane;
            if (ch < c) mean[k] += (static_cast<acc_t>(xr[ch]) * drop - mean[k]) * w;
          }
        }
      }
      if (lse != nullptr && c0 == 0 && g.lane == 0) lse[item] = any ? mx + std::log(sum) : acc_t(0);
      if (lse == nullptr && !any) continue;
      scalar_t* o = out + i * ldo + h * c;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int64_t ch = c0 + k * g.size + g.lane;
        if (ch >= c) continue;
        o[ch] = static_cast<scalar_t>(lse != nullptr ? mean[k] : static_cast<acc_t>(o[ch]) + alpha * mean[k]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------- backward
// r[i, h] = <grad_out[i, head h], out[i, head h]>.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    gat_row_dot_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                       at::opmath_type<scalar_t>* __restrict__ r, int64_t items, int64_t c, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaneGroup g(group_size);
  for (int64_t item = g.first_row(); item < items; item += g.row_stride()) {
    const acc_t s = group_dot<scalar_t, acc_t>(g, grad_out + item * c, out + item * c, c);
    if (g.lane == 0) r[item] = s;
  }
}

// grad_x[j, head h] and grad_src_score[j, h], over j's out-edges (the transposed CSR).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock)
    gat_backward_src_kernel(const index_t* __restrict__ rowptr_t, const index_t* __restrict__ col_t,
                            const index_t* __restrict__ perm_t, int64_t num_edges, int64_t n_dst,
                            const scalar_t* __restrict__ x, int64_t ldx, int64_t n_src,
                            const GatEdges<scalar_t, index_t> ed, const scalar_t* __restrict__ grad_out,
                            const at::opmath_type<scalar_t>* __restrict__ lse,
                            const at::opmath_type<scalar_t>* __restrict__ r, scalar_t* __restrict__ grad_x,
                            scalar_t* __restrict__ grad_src, int64_t c, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaneGroup g(group_size);
  const int64_t heads = ed.heads, d = heads * c;
  for (int64_t item = g.first_row(); item < n_src * heads; item += g.row_stride()) {
    const int64_t j = item / heads, h = item - j * heads;
    const auto [t0, t1] = row_range(rowptr_t, j, n_src, num_edges);
    const scalar_t* xr = x + j * ldx + h * c;
    for (int64_t c0 = 0; c0 < c; c0 += kPer * g.size) {
      acc_t acc[kPer] = {};
      acc_t gs = acc_t(0);
      for (int64_t base = t0; base < t1; base += g.size) {
        // Lane l fetches entry base + l: its destination i (node) and CSR edge.
        Fetched<acc_t> mine;
        const index_t i = fetch_index(col_t, base + g.lane, t1, n_dst);
        const index_t e = fetch_index(perm_t, base + g.lane, t1, num_edges);
        if (i >= 0 && e >= 0 && ed.kept(e)) {
          mine.node = i;
          mine.edge = e;
          mine.z = ed.z(i, j, e, h);
          mine.hash = ed.hash(e);
        }
        const int count = batch_count(base, t1, g.size);
        for (int u = 0; u < count; ++u) {
          const auto f = shfl_fetched(g, mine, u);
          if (f.node < 0) continue;
          const scalar_t* go = grad_out + f.node * d + h * c;
          const int64_t ih = f.node * heads + h;
          acc_t w;
          gs += gat_score_grad(f.z, ed.slope, lse[ih], ed.drop(f.hash, h), group_dot<scalar_t, acc_t>(g, go, xr, c),
                               r[ih], w);
#pragma unroll
          for (int k = 0; k < kPer; ++k) {
            const int64_t ch = c0 + k * g.size + g.lane;
            if (ch < c) acc[k] += w * static_cast<acc_t>(go[ch]);
          }
        }
      }
      if (grad_src != nullptr && c0 == 0 && g.lane == 0) grad_src[item] = static_cast<scalar_t>(gs);
      if (grad_x == nullptr) continue;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int64_t ch = c0 + k * g.size + g.lane;
        if (ch < c) grad_x[j * d + h * c + ch] = static_cast<scalar_t>(acc[k]);
      }
    }
  }
}

// grad_dst_score, grad_edge_attr and the edge_weight partials, over the CSR: block b owns rows
// [b R, (b + 1) R), R = kBlock / G, one group per row (a row's heads stay together, so that an
// edge's grad_edge_attr row, a sum over the heads, is written once from registers). For each
// in-edge, in CSR order, the group computes every head's dz, then writes the edge's grad_edge_attr
// row (0 for a dropped edge). Lane l keeps, in slots m < kSlots, the values of index
// s = s0 + l + m G of: grad_dst_score (head s), the edge's grad_edge_attr (column s: head s, or
// feature s when encoded, summed over the heads in opmath precision and rounded once) and the
// edge_weight sums (entry s of the flattened [H, F], float64). A pass covers kSlots G indices
// (s0 = pass kSlots G) and runs over the row's edges; the host asks for as many passes as the
// widest of the three needs (one unless it exceeds kSlots G). At the end of a pass the block's
// groups add their edge_weight sums in group order into partial[b].
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock)
    gat_backward_dst_kernel(const index_t* __restrict__ rowptr, const index_t* __restrict__ col, int64_t num_edges,
                            const scalar_t* __restrict__ x, int64_t ldx, int64_t num_src,
                            const GatEdges<scalar_t, index_t> ed, const scalar_t* __restrict__ grad_out,
                            const at::opmath_type<scalar_t>* __restrict__ lse,
                            const at::opmath_type<scalar_t>* __restrict__ r, scalar_t* __restrict__ grad_dst,
                            scalar_t* __restrict__ grad_attr, double* __restrict__ partial, int64_t n, int64_t c,
                            int64_t passes, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  // The lanes' edge_weight sums of a pass, slot m of thread t at sums[m * kBlock + t].
  SIMT_SHARED(double, sums, kSlots * kBlock);
  const LaneGroup g(group_size);
  const int64_t heads = ed.heads, d = heads * c, f = ed.f, span = kSlots * g.size;
  const bool direct = ed.weight == nullptr;
  const int64_t i = g.first_row();  // past the last row in the last block: no edges
  const auto [e0, e1] = i < n ? row_range(rowptr, i, n, num_edges) : RowRange{0, 0};
  for (int64_t s0 = 0; s0 < passes * span; s0 += span) {
    acc_t gd[kSlots] = {};
    double gw[kSlots] = {};
    for (int64_t base = e0; base < e1; base += g.size) {
      // Lane l fetches edge base + l: its source (-1: past the row, dropped or out of range) and hash.
      index_t j = fetch_index(col, base + g.lane, e1, num_src);
      if (j >= 0 && !ed.kept(base + g.lane)) j = -1;
      const uint32_t hash = j >= 0 ? ed.hash(base + g.lane) : 0u;
      const int count = batch_count(base, e1, g.size);
      for (int u = 0; u < count; ++u) {
        const int64_t e = base + u;
        const int64_t src = g.shfl(j, u);
        const uint32_t edge_hash = g.shfl(hash, u);
        acc_t ga[kSlots] = {};
        for (int64_t h = 0; src >= 0 && h < heads; ++h) {
          const int64_t ih = i * heads + h;
          acc_t w;
          const acc_t dz = gat_score_grad(ed.z(i, src, e, h), ed.slope, lse[ih], ed.drop(edge_hash, h),
                                          group_dot<scalar_t, acc_t>(g, grad_out + i * d + h * c,
                                                                     x + src * ldx + h * c, c),
                                          r[ih], w);
#pragma unroll
          for (int m = 0; m < kSlots; ++m) {
            const int64_t s = s0 + g.lane + m * g.size, k = s - h * f;  // k: s's feature if s is in head h's row
            if (s == h) gd[m] += dz;
            if (direct) {
              if (s == h) ga[m] = dz;
            } else if (s < f) {
              ga[m] += dz * static_cast<acc_t>(ed.weight[h * f + s]);
            }
            if (partial != nullptr && k >= 0 && k < f)
              gw[m] += static_cast<double>(dz) * static_cast<double>(ed.attr[e * f + k]);
          }
        }
        if (grad_attr == nullptr) continue;
#pragma unroll
        for (int m = 0; m < kSlots; ++m) {
          const int64_t s = s0 + g.lane + m * g.size;
          if (s < f) grad_attr[e * f + s] = static_cast<scalar_t>(ga[m]);
        }
      }
    }
    if (grad_dst != nullptr && i < n) {
#pragma unroll
      for (int m = 0; m < kSlots; ++m) {
        const int64_t s = s0 + g.lane + m * g.size;
        if (s < heads) grad_dst[i * heads + s] = static_cast<scalar_t>(gd[m]);
      }
    }
    if (partial == nullptr) continue;  // the same for the whole block
#pragma unroll
    for (int m = 0; m < kSlots; ++m) sums[m * kBlock + threadIdx.x] = gw[m];
    __syncthreads();
    // Thread t < kSlots G sums index s0 + t (lane t % G, slot t / G) over the block's groups in order.
    const int64_t s = s0 + threadIdx.x, hf = heads * f;
    if (threadIdx.x < span && s < hf) {
      const int m = threadIdx.x / g.size, l = threadIdx.x - m * g.size;
      double total = 0;
      for (int q = 0; q < g.count; ++q) total += sums[m * kBlock + q * g.size + l];
      partial[static_cast<int64_t>(blockIdx.x) * hf + s] = total;
    }
    __syncthreads();  // the sums are read before the next pass overwrites them
  }
}

struct CudaGat {
  static void forward(const GatInputs& in, const at::Tensor& out, const at::Tensor& lse, double alpha) {
    const simt::DeviceGuard guard(in.x.device());
    const auto stream = simt::current_stream();
    const int lanes = lanes_per_row(in.c, kPer);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "revgnn_ext.gat_aggregate", [&] {
      AT_DISPATCH_INDEX_TYPES(in.rowptr.scalar_type(), "revgnn_ext.gat_aggregate", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        simt::launch<gat_forward_kernel<scalar_t, index_t>>(num_blocks(in.num_dst * in.heads, lanes), kBlock, 0, stream,
            in.rowptr.data_ptr<index_t>(), in.col.data_ptr<index_t>(), in.num_edges, in.x.data_ptr<scalar_t>(),
            in.x.stride(0), in.x.size(0), GatEdges<scalar_t, index_t>(in), out.data_ptr<scalar_t>(), out.stride(0),
            ptr_or_null<acc_t>(lse), static_cast<acc_t>(alpha), in.num_dst, in.c, lanes);
      });
    });
  }

  static void backward(const GatInputs& in, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out,
                       const GatGrads& grads) {
    const simt::DeviceGuard guard(in.x.device());
    const auto stream = simt::current_stream();
    const int lanes = lanes_per_row(in.c, kPer);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "revgnn_ext.gat_aggregate_backward",
                                    [&] {
      AT_DISPATCH_INDEX_TYPES(in.rowptr.scalar_type(), "revgnn_ext.gat_aggregate_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const GatEdges<scalar_t, index_t> ed(in);
        const int64_t items = in.num_dst * in.heads;
        at::Tensor r = at::empty({items}, lse.options());
        simt::launch<gat_row_dot_kernel<scalar_t>>(num_blocks(items, lanes), kBlock, 0, stream,
            grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), r.data_ptr<acc_t>(), items, in.c, lanes);
        if (grads.x.defined() || grads.src.defined()) {
          simt::launch<gat_backward_src_kernel<scalar_t, index_t>>(
              num_blocks(in.x.size(0) * in.heads, lanes), kBlock, 0, stream,
              in.rowptr_t.data_ptr<index_t>(), in.col_t.data_ptr<index_t>(), in.perm_t.data_ptr<index_t>(),
              in.num_edges, in.num_dst, in.x.data_ptr<scalar_t>(), in.x.stride(0), in.x.size(0), ed,
              grad_out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), r.data_ptr<acc_t>(),
              ptr_or_null<scalar_t>(grads.x), ptr_or_null<scalar_t>(grads.src), in.c, lanes);
        }
        if (grads.dst.defined() || grads.edge_attr.defined() || grads.weight.defined()) {
          const int64_t rows = kBlock / lanes, blocks = (in.num_dst + rows - 1) / rows, span = kSlots * lanes;
          const int64_t indices = std::max({grads.dst.defined() ? in.heads : 0, grads.edge_attr.defined() ? in.f : 0,
                                            grads.weight.defined() ? in.heads * in.f : 0});
          // Every block writes all of its H * F sums (passes * span >= H * F): no zero fill.
          const at::Tensor partial = grads.weight.defined()
                                         ? at::empty({blocks, in.heads * in.f}, in.x.options().dtype(at::kDouble))
                                         : at::Tensor();
          simt::launch<gat_backward_dst_kernel<scalar_t, index_t>>(static_cast<unsigned int>(blocks), kBlock, 0,
              stream, in.rowptr.data_ptr<index_t>(), in.col.data_ptr<index_t>(), in.num_edges,
              in.x.data_ptr<scalar_t>(), in.x.stride(0), in.x.size(0), ed, grad_out.data_ptr<scalar_t>(),
              lse.data_ptr<acc_t>(), r.data_ptr<acc_t>(), ptr_or_null<scalar_t>(grads.dst),
              ptr_or_null<scalar_t>(grads.edge_attr), ptr_or_null<double>(partial), in.num_dst, in.c,
              (indices + span - 1) / span, lanes);
          if (partial.defined()) {  // grads.weight: [H, F] contiguous (gat_aggregate.h)
            sum_partials<scalar_t>(partial, in.heads * in.f, 0, grads.weight.data_ptr<scalar_t>(), nullptr, nullptr,
                                   stream);
          }
        }
      });
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_GAT_AGGREGATE(SIMT_DISPATCH_KEY, ::revgnn_ext::CudaGat)
