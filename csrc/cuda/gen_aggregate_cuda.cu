// CUDA kernels of gen_aggregate (contract and shared formulas: csrc/ops/gen_aggregate.h).
//
// Thread mapping, as in spmm_cuda.cu: a group of G lanes (a power of two in [8, 32], just
// enough to cover the channels in one pass) owns one row; lane l handles channel c0 + l of each
// chunk of G channels. The group fetches the row's edges G at a time, one per lane (coalesced),
// checks their indices and broadcasts them with __shfl_sync; kUnroll gathers are issued before
// any is consumed.
//
// The edge embedding is recomputed, never stored. A direct embedding is one coalesced load per
// edge. An encoded one (edge_attr [E, F] times the weight) with F <= kMaxF: the group copies the
// features of its batch of edges into its shared-memory tile (for CSR batches one contiguous
// range of edge_attr), which every lane reads by broadcast, and each lane keeps its channel's F
// weights and its bias in registers. A wider F reads both from global memory.
//
// Kernels: forward, over CSR rows (grid-stride); backward_x, over the rows of the transposed CSR
// (grid-stride); backward_params, over CSR rows in fixed blocks of kRowsPerBlock rows: the
// per-edge grad_edge_attr and one partial sum per block of the weight, bias, t and p gradients,
// which sum_partials adds up in block order.
//
// Determinism, no atomics: every out / grad_x element is one lane's sequential sum in (transposed)
// CSR order. grad_edge_attr of an encoded embedding is a fixed butterfly over the group per
// channel chunk, the chunks added in order (in opmath precision). A parameter gradient is summed
// per lane over its group's rows of the block, in row and edge order; the groups of a block are
// added in group order and the blocks in block order. G depends on D only, and the row blocks on
// kRowsPerBlock only, so the same inputs give the same bits on any GPU and grid.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda/common.cuh"
#include "ops/gen_aggregate.h"

namespace revgnn_ext {
namespace {

constexpr int kUnroll = 4;             // edges whose gathers are issued together
constexpr int kMaxF = 16;              // edge features staged in shared memory / weights in registers
constexpr int64_t kRowsPerBlock = 64;  // rows per partial sum of the parameter gradients
static_assert(kMinGroup % kUnroll == 0, "a batch of edges must hold whole unrolled steps");

enum class EmbMode : int {
  None,    // no edge features: emb = 0
  Direct,  // emb = edge_attr[e, c]
  Staged,  // encoded, F <= kMaxF: features from the group's shared tile, weights from registers
  Global,  // encoded, F > kMaxF: features and weights from global memory
};

// One lane's weights of features [k0, k0 + kMaxF) for its channel (0 past F or without weight)
// and its bias (0 without one).
template <typename acc_t>
struct LaneWeights {
  acc_t w[kMaxF];
  acc_t b;
};

// The edge embedding's inputs, as a kernel argument.
template <typename scalar_t>
struct EdgeEmb {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* attr;      // [E, F] ([E, D] when Direct), or null
  const scalar_t* weight_t;  // [F, D], or null
  const scalar_t* bias;      // [D], or null
  int64_t f, d;
  EmbMode mode;

  __device__ LaneWeights<acc_t> lane_weights(int64_t k0, int64_t c, bool active) const {
    LaneWeights<acc_t> l;
#pragma unroll
    for (int k = 0; k < kMaxF; ++k) {
      l.w[k] = active && weight_t != nullptr && k0 + k < f ? static_cast<acc_t>(weight_t[(k0 + k) * d + c])
                                                            : acc_t(0);
    }
    l.b = active && bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
    return l;
  }

  // edge_attr[e, c] when the embedding is given directly, else 0.
  __device__ __forceinline__ acc_t direct(int64_t e, int64_t c) const {
    return mode == EmbMode::Direct ? static_cast<acc_t>(attr[e * d + c]) : acc_t(0);
  }

  // The encoded embedding of edge e, channel c (0 unless Staged or Global); `a` is the edge's
  // row of the tile, and `l` the lane's weights of features [0, kMaxF).
  __device__ __forceinline__ acc_t encoded(const LaneWeights<acc_t>& l, simt::SharedPtr<const acc_t> a, int64_t e,
                                           int64_t c) const {
    acc_t s = l.b;
    if (mode == EmbMode::Staged) {
#pragma unroll
      for (int k = 0; k < kMaxF; ++k) {
        if (k < f) s += l.w[k] * a[k];
      }
    } else if (mode == EmbMode::Global) {
      for (int64_t k = 0; k < f; ++k) {
        s += static_cast<acc_t>(weight_t[k * d + c]) * static_cast<acc_t>(attr[e * f + k]);
      }
    }
    return s;
  }

  // Features [k0, k0 + kf) of the consecutive CSR edges [base, base + count) into the group's
  // tile (row u: edge base + u, kMaxF wide): one contiguous range of edge_attr when kf == F.
  __device__ void stage_range(const LaneGroup& g, simt::SharedPtr<acc_t> tile, int64_t base, int count, int64_t k0,
                              int kf) const {
    for (int idx = g.lane; idx < count * kf; idx += g.size) {
      const int u = idx / kf, k = idx - u * kf;
      tile[u * kMaxF + k] = static_cast<acc_t>(attr[(base + u) * f + k0 + k]);
    }
  }

  // All features (F <= kMaxF) of edge e into one tile row.
  __device__ void stage_edge(simt::SharedPtr<acc_t> row, int64_t e) const {
    for (int64_t k = 0; k < f; ++k) row[k] = static_cast<acc_t>(attr[e * f + k]);
  }
};

// What the derivative of row i's messages reads, at one channel.
template <typename acc_t>
struct RowVals {
  acc_t g = 0, out = 0, state = 0, deg = 0;  // state: L (softmax) or r (powermean)
  int64_t arg = -1;                          // max: the selected edge
};

template <typename scalar_t, typename index_t>
struct RowSource {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;  // [num_dst, D]
  const scalar_t* out;       // [num_dst, D]
  const acc_t* stat;         // softmax, powermean: [num_dst, D]
  const index_t* arg;        // max: [num_dst, D]
  int64_t d;

  template <Aggr A>
  __device__ __forceinline__ RowVals<acc_t> load(int64_t i, int64_t c, acc_t deg) const {
    RowVals<acc_t> r;
    const int64_t o = i * d + c;
    r.g = static_cast<acc_t>(grad_out[o]);
    r.deg = deg;
    if constexpr (A == Aggr::Softmax || A == Aggr::PowerMean) {
      r.out = static_cast<acc_t>(out[o]);
      r.state = stat[o];
    }
    if constexpr (A == Aggr::Max) r.arg = arg[o];
    return r;
  }
};

// The gradient at the message m of edge e (times grad_out); `extra` gets the edge's term of the
// row sums for d/dt (softmax: a m (m - out)) or d/dp (powermean: q log(clamp m)).
template <Aggr A, typename acc_t>
__device__ __forceinline__ acc_t message_grad(const RowVals<acc_t>& r, int64_t e, acc_t m, acc_t t, acc_t p,
                                              acc_t& extra) {
  acc_t dm = acc_t(0);
  extra = acc_t(0);
  if constexpr (A == Aggr::Sum) {
    dm = r.g;
  } else if constexpr (A == Aggr::Mean) {
    dm = r.g / r.deg;
  } else if constexpr (A == Aggr::Max) {
    dm = r.arg == e ? r.g : acc_t(0);
  } else if constexpr (A == Aggr::Softmax) {
    softmax_grad<acc_t>(r.g, m, t, r.out, r.state, dm, extra);
  } else {
    power_grad<acc_t>(r.g, m, p, r.state, r.deg, dm, extra);
  }
  return dm;
}

// One unrolled step over a batch of a row's edges: the sources of edges k .. k + kUnroll - 1 of
// the batch (broadcast from the lanes that fetched them; -1 past the row or out of range) and
// x[src, c] + the direct edge embedding, every gather issued before any is used.
template <typename scalar_t, typename index_t, typename acc_t>
__device__ __forceinline__ void gather_step(const LaneGroup& g, index_t src, int k, bool active,
                                            const scalar_t* __restrict__ x, int64_t ldx, const EdgeEmb<scalar_t>& emb,
                                            int64_t base, int64_t c, index_t (&js)[kUnroll], acc_t (&xe)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) js[u] = g.shfl(src, k + u);
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    xe[u] = acc_t(0);
    if (active && js[u] >= 0) {
      xe[u] = static_cast<acc_t>(x[static_cast<int64_t>(js[u]) * ldx + c]) + emb.direct(base + k + u, c);
    }
  }
}

// ---------------------------------------------------------------------------------- forward
// out[i, c] and state[i, c] = the aggregation over the CSR edges of row i of their messages.
template <typename scalar_t, typename index_t, Aggr A>
__global__ void __launch_bounds__(kBlock)
    gen_forward_kernel(const index_t* __restrict__ rowptr, const index_t* __restrict__ col, int64_t num_edges,
                       const scalar_t* __restrict__ x, int64_t ldx, int64_t num_src, const EdgeEmb<scalar_t> emb,
                       const scalar_t* __restrict__ t, const scalar_t* __restrict__ p, at::opmath_type<scalar_t> eps,
                       scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ stat,
                       index_t* __restrict__ arg, int64_t n, int64_t d, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = Math<acc_t>;
  SIMT_SHARED(acc_t, smem, kBlock * kMaxF);
  const LaneGroup g(group_size);
  simt::SharedPtr<acc_t> tile = smem + static_cast<int64_t>(g.index) * g.size * kMaxF;
  const bool staged = emb.mode == EmbMode::Staged;
  for (int64_t i = g.first_row(); i < n; i += g.row_stride()) {
    const auto [e0, e1] = row_range(rowptr, i, n, num_edges);
    for (int64_t c0 = 0; c0 < d; c0 += g.size) {
      const int64_t c = c0 + g.lane;
      const bool active = c < d;
      const LaneWeights<acc_t> lw = emb.lane_weights(0, c, active);
      const acc_t tc = A == Aggr::Softmax && active ? static_cast<acc_t>(t[c]) : acc_t(1);
      const acc_t pc = A == Aggr::PowerMean && active ? static_cast<acc_t>(p[c]) : acc_t(1);
      // sum/mean/powermean: the sum; max: the best value; softmax: the weighted mean of messages.
      acc_t acc = acc_t(0), mx = acc_t(0), sum = acc_t(0);
      index_t sel = -1;
      bool seen = false;  // whether an edge has been aggregated
      for (int64_t base = e0; base < e1; base += g.size) {
        // Lane l fetches edge base + l; src = -1 marks an edge past the row or out of range.
        const index_t src = fetch_index(col, base + g.lane, e1, num_src);
        const int count = batch_count(base, e1, g.size);
        if (staged) {
          emb.stage_range(g, tile, base, count, 0, static_cast<int>(emb.f));
          g.sync();
        }
        for (int k = 0; k < count; k += kUnroll) {
          index_t js[kUnroll];
          acc_t xe[kUnroll];  // x[col_e, c] + edge_attr[e, c] (direct)
          gather_step(g, src, k, active, x, ldx, emb, base, c, js, xe);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (!active || js[u] < 0) continue;
            const int64_t edge = base + k + u;
            const acc_t m = gen_message<acc_t>(xe[u] + emb.encoded(lw, tile + (k + u) * kMaxF, edge, c), eps);
            if constexpr (A == Aggr::Sum || A == Aggr::Mean) {
              acc += m;
            } else if constexpr (A == Aggr::Max) {
              if (replaces<Reduce::Max>(m, acc, seen)) {
                acc = m;
                sel = static_cast<index_t>(edge);
              }
            } else if constexpr (A == Aggr::Softmax) {
              if (seen) {
                softmax_push<acc_t>(tc * m, m, mx, sum, acc);
              } else {
                mx = tc * m;
                sum = acc_t(1);
                acc = m;
              }
            } else {
              acc += positive_pow<acc_t>(power_clamp<acc_t>(m), pc);
            }
            seen = true;
          }
        }
        if (staged) g.sync();  // the tile is read before the next batch overwrites it
      }
      if (!active) continue;
      const int64_t o = i * d + c;
      const acc_t deg = static_cast<acc_t>(e1 - e0);
      if constexpr (A == Aggr::Sum) {
        out[o] = static_cast<scalar_t>(acc);
      } else if constexpr (A == Aggr::Mean) {
        out[o] = static_cast<scalar_t>(e1 > e0 ? acc / deg : acc_t(0));
      } else if constexpr (A == Aggr::Max) {
        out[o] = static_cast<scalar_t>(acc);  // 0 when no edge was seen
        arg[o] = sel;
      } else if constexpr (A == Aggr::Softmax) {
        out[o] = static_cast<scalar_t>(seen ? acc : acc_t(0));
        stat[o] = seen ? mx + M::log(sum) : acc_t(0);
      } else {
        const acc_t r = e1 > e0 ? acc / deg : acc_t(0);
        stat[o] = r;
        out[o] = static_cast<scalar_t>(positive_pow<acc_t>(power_clamp<acc_t>(r), acc_t(1) / pc));
      }
    }
  }
}

// ---------------------------------------------------------------------------------- backward
// grad_x[j, c] = sum over transposed entries t of row j (edge e = perm_t[t] into i = col_t[t]) of
// the gradient at x[j, c] + emb[e, c] of edge e's message.
template <typename scalar_t, typename index_t, Aggr A>
__global__ void __launch_bounds__(kBlock)
    gen_backward_x_kernel(const index_t* __restrict__ rowptr, const index_t* __restrict__ rowptr_t,
                          const index_t* __restrict__ col_t, const index_t* __restrict__ perm_t,
                          const scalar_t* __restrict__ x, int64_t ldx, const EdgeEmb<scalar_t> emb,
                          const scalar_t* __restrict__ t, const scalar_t* __restrict__ p,
                          at::opmath_type<scalar_t> eps, const RowSource<scalar_t, index_t> rows, int64_t n_dst,
                          int64_t num_edges, scalar_t* __restrict__ grad_x, int64_t n_src, int64_t d,
                          int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDeg = A == Aggr::Mean || A == Aggr::PowerMean;
  SIMT_SHARED(acc_t, smem, kBlock * kMaxF);
  const LaneGroup g(group_size);
  simt::SharedPtr<acc_t> tile = smem + static_cast<int64_t>(g.index) * g.size * kMaxF;
  const bool staged = emb.mode == EmbMode::Staged;
  for (int64_t j = g.first_row(); j < n_src; j += g.row_stride()) {
    const auto [t0, t1] = row_range(rowptr_t, j, n_src, num_edges);
    for (int64_t c0 = 0; c0 < d; c0 += g.size) {
      const int64_t c = c0 + g.lane;
      const bool active = c < d;
      const LaneWeights<acc_t> lw = emb.lane_weights(0, c, active);
      const acc_t tc = A == Aggr::Softmax && active ? static_cast<acc_t>(t[c]) : acc_t(1);
      const acc_t pc = A == Aggr::PowerMean && active ? static_cast<acc_t>(p[c]) : acc_t(1);
      const acc_t xj = active ? static_cast<acc_t>(x[j * ldx + c]) : acc_t(0);
      acc_t acc = acc_t(0);
      for (int64_t base = t0; base < t1; base += g.size) {
        // Lane l fetches entry base + l: its destination and CSR edge (-1: past the row or out of
        // range) and, for mean/powermean, the destination's in-degree.
        const int64_t tt = base + g.lane;
        index_t dst = -1, edge = -1, deg = 0;
        if (tt < t1) {
          const index_t i = col_t[tt], e = perm_t[tt];
          const bool ok_i = in_range(i, n_dst), ok_e = in_range(e, num_edges);
          CUDA_KERNEL_ASSERT(ok_i && "revgnn_ext.gen_aggregate_backward: col_t index out of range");
          CUDA_KERNEL_ASSERT(ok_e && "revgnn_ext.gen_aggregate_backward: perm_t index out of range");
          if (ok_i && ok_e) {
            dst = i;
            edge = e;
            if (kDeg) {
              const auto [e0, e1] = row_range(rowptr, i, n_dst, num_edges);
              deg = static_cast<index_t>(e1 - e0);
            }
          }
        }
        if (staged) {
          if (edge >= 0) emb.stage_edge(tile + g.lane * kMaxF, edge);
          g.sync();
        }
        const int count = batch_count(base, t1, g.size);
        for (int k = 0; k < count; k += kUnroll) {
          index_t is[kUnroll], es[kUnroll];
          RowVals<acc_t> rv[kUnroll];
          acc_t pre[kUnroll];  // x[j, c] + edge_attr[e, c] (direct)
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            is[u] = g.shfl(dst, k + u);
            es[u] = g.shfl(edge, k + u);
            const index_t deg_u = kDeg ? g.shfl(deg, k + u) : index_t(0);
            pre[u] = xj;
            if (active && is[u] >= 0) {
              rv[u] = rows.template load<A>(is[u], c, static_cast<acc_t>(deg_u));
              pre[u] += emb.direct(es[u], c);
            }
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (!active || is[u] < 0) continue;
            const acc_t v = pre[u] + emb.encoded(lw, tile + (k + u) * kMaxF, es[u], c);
            acc_t extra;
            const acc_t dm = message_grad<A>(rv[u], es[u], gen_message<acc_t>(v, eps), tc, pc, extra);
            acc += relu_grad<acc_t>(v, dm);
          }
        }
        if (staged) g.sync();  // the tile is read before the next batch overwrites it
      }
      if (active) grad_x[j * d + c] = static_cast<scalar_t>(acc);
    }
  }
}

// Over the CSR, block b owning rows [b * kRowsPerBlock, (b + 1) * kRowsPerBlock): the per-edge
// grad_edge_attr (grad_attr_direct [E, D], or grad_attr_enc [E, F] in opmath precision, either
// may be null) and, when `partial` is not null, the block's sums of the parameter gradients in
// partial[b, :], laid out as [fw rows of the weight (fw = F when its gradient is wanted, else 0) |
// bias | t or p], each D wide. Feature chunks [k0, k0 + kMaxF) of the features whose gradients
// are wanted take one pass each (one pass when there are at most kMaxF, or none).
template <typename scalar_t, typename index_t, Aggr A>
__global__ void __launch_bounds__(kBlock)
    gen_backward_params_kernel(const index_t* __restrict__ rowptr, const index_t* __restrict__ col,
                               int64_t num_edges, const scalar_t* __restrict__ x, int64_t ldx, int64_t num_src,
                               const EdgeEmb<scalar_t> emb, const scalar_t* __restrict__ t,
                               const scalar_t* __restrict__ p, at::opmath_type<scalar_t> eps,
                               const RowSource<scalar_t, index_t> rows, int64_t n, int64_t d,
                               scalar_t* __restrict__ grad_attr_direct,
                               at::opmath_type<scalar_t>* __restrict__ grad_attr_enc,
                               at::opmath_type<scalar_t>* __restrict__ partial, int64_t fw, int64_t width,
                               int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kSlots = kMaxF + 2;  // per lane: kMaxF weight sums, the bias sum, the t or p sum
  // The groups' tiles while rows are processed, then the lanes' sums for the block's combination.
  SIMT_SHARED(acc_t, smem, kBlock * kSlots);
  const LaneGroup g(group_size);
  simt::SharedPtr<acc_t> tile = smem + static_cast<int64_t>(g.index) * g.size * kMaxF;
  // The features whose gradients are wanted (theirs or the weight's); the staged embedding
  // reads all F <= kMaxF from the tile, in its one chunk.
  const int64_t fg = fw > 0 || grad_attr_enc != nullptr ? emb.f : 0;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int64_t row1 = n < row0 + kRowsPerBlock ? n : row0 + kRowsPerBlock;
  const int64_t feature_chunks = fg > kMaxF ? (fg + kMaxF - 1) / kMaxF : 1;
  for (int64_t fc = 0; fc < feature_chunks; ++fc) {
    const int64_t k0 = fc * kMaxF;
    const int kf = static_cast<int>(fg - k0 < kMaxF ? fg - k0 : kMaxF);  // features of this chunk
    const int kw = fw > 0 ? kf : 0;                                      // ... whose weights are summed
    const int staged = emb.mode == EmbMode::Staged ? static_cast<int>(emb.f) : kf;  // features in the tile
    for (int64_t c0 = 0; c0 < d; c0 += g.size) {
      const int64_t c = c0 + g.lane;
      const bool active = c < d;
      // The encoded embedding reads lw when Staged (then k0 = 0 and lw holds every weight); the
      // gradient of the chunk's features reads it in any case.
      const LaneWeights<acc_t> lw = emb.lane_weights(k0, c, active);
      const acc_t tc = A == Aggr::Softmax && active ? static_cast<acc_t>(t[c]) : acc_t(1);
      const acc_t pc = A == Aggr::PowerMean && active ? static_cast<acc_t>(p[c]) : acc_t(1);
      acc_t w_sum[kMaxF];
#pragma unroll
      for (int k = 0; k < kMaxF; ++k) w_sum[k] = acc_t(0);
      acc_t b_sum = acc_t(0), param_sum = acc_t(0);
      for (int64_t i = row0 + g.index; i < row1; i += g.count) {
        const auto [e0, e1] = row_range(rowptr, i, n, num_edges);
        const RowVals<acc_t> rv =
            active ? rows.template load<A>(i, c, static_cast<acc_t>(e1 - e0)) : RowVals<acc_t>();
        acc_t s1 = acc_t(0);  // the row's sum for d/dt or d/dp
        for (int64_t base = e0; base < e1; base += g.size) {
          const index_t src = fetch_index(col, base + g.lane, e1, num_src);
          const int count = batch_count(base, e1, g.size);
          if (staged > 0) {
            emb.stage_range(g, tile, base, count, k0, staged);
            g.sync();
          }
          for (int k = 0; k < count; k += kUnroll) {
            index_t js[kUnroll];
            acc_t xe[kUnroll];  // x[col_e, c] + edge_attr[e, c] (direct)
            gather_step(g, src, k, active, x, ldx, emb, base, c, js, xe);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
              if (k + u >= count) continue;  // the same for the whole group
              const int64_t edge = base + k + u;
              const simt::SharedPtr<const acc_t> a = tile + (k + u) * kMaxF;
              // The gradient at x + emb; 0 for an edge whose col is out of range.
              acc_t dpre = acc_t(0);
              if (active && js[u] >= 0) {
                const acc_t v = xe[u] + emb.encoded(lw, a, edge, c);
                const acc_t m = gen_message<acc_t>(v, eps);
                acc_t extra;
                dpre = relu_grad<acc_t>(v, message_grad<A>(rv, edge, m, tc, pc, extra));
                s1 += extra;
#pragma unroll
                for (int kk = 0; kk < kMaxF; ++kk) {
                  if (kk < kw) w_sum[kk] += dpre * a[kk];
                }
                b_sum += dpre;
              }
              if (grad_attr_direct != nullptr && active) grad_attr_direct[edge * d + c] = static_cast<scalar_t>(dpre);
              if (grad_attr_enc != nullptr) {
                // grad_edge_attr[e, k0 + kk] = sum_c dpre_c weight_t[k0 + kk, c]: this chunk's channels
                // by a butterfly, added to the previous chunks' sum by lane kk % G.
#pragma unroll
                for (int kk = 0; kk < kMaxF; ++kk) {
                  if (kk >= kf) continue;
                  const acc_t s = g.sum(dpre * lw.w[kk]);
                  if (g.lane == (kk & (g.size - 1))) {
                    acc_t* dst = grad_attr_enc + edge * emb.f + k0 + kk;
                    *dst = c0 == 0 ? s : *dst + s;
                  }
                }
              }
            }
          }
          if (staged > 0) g.sync();  // the tile is read before the next batch overwrites it
        }
        if (active) {
          if constexpr (A == Aggr::Softmax) param_sum += rv.g * s1;
          if constexpr (A == Aggr::PowerMean) param_sum += power_grad_p<acc_t>(rv.g, rv.out, pc, rv.state, s1, rv.deg);
        }
      }
      if (partial == nullptr) continue;  // the same for the whole block
      // Combine the block's groups in group order: slot s of lane l of group q at
      // smem[s * kBlock + q * G + l].
      __syncthreads();  // every tile is done with
#pragma unroll
      for (int k = 0; k < kMaxF; ++k) smem[k * kBlock + threadIdx.x] = w_sum[k];
      smem[kMaxF * kBlock + threadIdx.x] = b_sum;
      smem[(kMaxF + 1) * kBlock + threadIdx.x] = param_sum;
      __syncthreads();
      for (int idx = threadIdx.x; idx < kSlots * g.size; idx += kBlock) {
        const int s = idx / g.size, l = idx - s * g.size;
        const int64_t cc = c0 + l;
        // Weight slots past the chunk's features hold nothing; bias and t/p once, in chunk 0.
        if (cc >= d || (s < kMaxF && s >= kw) || (s >= kMaxF && k0 != 0)) continue;
        acc_t total = acc_t(0);
        for (int q = 0; q < g.count; ++q) total += smem[s * kBlock + q * g.size + l];
        const int64_t column = s < kMaxF ? (k0 + s) * d + cc : (fw + s - kMaxF) * d + cc;
        partial[static_cast<int64_t>(blockIdx.x) * width + column] = total;
      }
      __syncthreads();  // the sums are read before the next chunk's tiles overwrite them
    }
  }
}

// The blocks' partial sums ([blocks, width], layout of gen_backward_params_kernel) added in block
// order into the weight ([fw, D]), bias and t or p gradients (each may be null).
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    sum_partials_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, int64_t blocks, int64_t width,
                        int64_t weight_columns, int64_t d, scalar_t* __restrict__ grad_weight_t,
                        scalar_t* __restrict__ grad_bias, scalar_t* __restrict__ grad_param) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; column < width;
       column += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t total = acc_t(0);
    for (int64_t b = 0; b < blocks; ++b) total += partial[b * width + column];
    if (column < weight_columns) {
      grad_weight_t[column] = static_cast<scalar_t>(total);
    } else if (column < weight_columns + d) {
      if (grad_bias != nullptr) grad_bias[column - weight_columns] = static_cast<scalar_t>(total);
    } else if (grad_param != nullptr) {
      grad_param[column - weight_columns - d] = static_cast<scalar_t>(total);
    }
  }
}

// ---- host side ----

template <typename scalar_t>
EdgeEmb<scalar_t> edge_emb(const GenInputs& in) {
  EdgeEmb<scalar_t> emb{ptr_or_null<scalar_t>(in.edge_attr), ptr_or_null<scalar_t>(in.weight_t),
                        ptr_or_null<scalar_t>(in.bias), in.f, in.d, EmbMode::None};
  if (in.edge_attr.defined()) {
    emb.mode = in.direct ? EmbMode::Direct : in.f <= kMaxF ? EmbMode::Staged : EmbMode::Global;
  }
  return emb;
}

template <typename scalar_t, typename index_t>
RowSource<scalar_t, index_t> row_source(const GenInputs& in, const at::Tensor& out, const at::Tensor& state,
                                        const at::Tensor& grad_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool floating_state = in.aggr == Aggr::Softmax || in.aggr == Aggr::PowerMean;
  return {grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          floating_state ? state.data_ptr<acc_t>() : nullptr,
          in.aggr == Aggr::Max ? state.data_ptr<index_t>() : nullptr, in.d};
}

struct CudaGen {
  static void forward(const GenInputs& in, const at::Tensor& out, const at::Tensor& state) {
    const simt::DeviceGuard guard(in.x.device());
    const auto stream = simt::current_stream();
    constexpr const char* op = "revgnn_ext.gen_aggregate";
    const int lanes = lanes_per_row(in.d);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      AT_DISPATCH_INDEX_TYPES(in.rowptr.scalar_type(), op, [&] {
        dispatch_aggr(in.aggr, [&](auto aggr) {
          constexpr Aggr A = decltype(aggr)::value;
          constexpr bool kFloatingState = A == Aggr::Softmax || A == Aggr::PowerMean;
          simt::launch<gen_forward_kernel<scalar_t, index_t, A>>(num_blocks(in.num_dst, lanes), kBlock, 0, stream,
              in.rowptr.data_ptr<index_t>(), in.col.data_ptr<index_t>(), in.col.numel(), in.x.data_ptr<scalar_t>(),
              in.x.stride(0), in.x.size(0), edge_emb<scalar_t>(in), ptr_or_null<scalar_t>(in.t),
              ptr_or_null<scalar_t>(in.p),
              static_cast<acc_t>(in.eps), out.data_ptr<scalar_t>(), kFloatingState ? state.data_ptr<acc_t>() : nullptr,
              A == Aggr::Max ? state.data_ptr<index_t>() : nullptr, in.num_dst, in.d, lanes);
        });
      });
    });
  }

  static void backward(const GenInputs& in, const at::Tensor& out, const at::Tensor& state,
                       const at::Tensor& grad_out, const GenGrads& grads) {
    const simt::DeviceGuard guard(in.x.device());
    const auto stream = simt::current_stream();
    constexpr const char* op = "revgnn_ext.gen_aggregate_backward";
    const int lanes = lanes_per_row(in.d);
    const int64_t n_src = in.x.size(0), num_edges = in.col.numel();
    const bool want_params = grads.weight_t.defined() || grads.bias.defined() || grads.t.defined() ||
                             grads.p.defined();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      AT_DISPATCH_INDEX_TYPES(in.rowptr.scalar_type(), op, [&] {
        dispatch_aggr(in.aggr, [&](auto aggr) {
          constexpr Aggr A = decltype(aggr)::value;
          const EdgeEmb<scalar_t> emb = edge_emb<scalar_t>(in);
          const RowSource<scalar_t, index_t> rows = row_source<scalar_t, index_t>(in, out, state, grad_out);
          const acc_t eps = static_cast<acc_t>(in.eps);
          if (n_src > 0 && grads.x.defined()) {
            simt::launch<gen_backward_x_kernel<scalar_t, index_t, A>>(num_blocks(n_src, lanes), kBlock, 0, stream,
                in.rowptr.data_ptr<index_t>(), in.rowptr_t.data_ptr<index_t>(), in.col_t.data_ptr<index_t>(),
                in.perm_t.data_ptr<index_t>(), in.x.data_ptr<scalar_t>(), in.x.stride(0), emb,
                ptr_or_null<scalar_t>(in.t), ptr_or_null<scalar_t>(in.p), eps, rows, in.num_dst, num_edges,
                grads.x.data_ptr<scalar_t>(), n_src, in.d, lanes);
          }
          if (!want_params && !grads.edge_attr.defined()) return;
          // grad_edge_attr of an encoded embedding is summed over channel chunks in opmath
          // precision: in place for float32/float64, in a float32 buffer copied back otherwise.
          at::Tensor grad_attr_enc;
          if (grads.edge_attr.defined() && !in.direct) {
            grad_attr_enc = std::is_same_v<scalar_t, acc_t>
                                ? grads.edge_attr
                                : at::empty(grads.edge_attr.sizes(), grads.edge_attr.options().dtype(at::kFloat));
          }
          const int64_t fw = grads.weight_t.defined() ? in.f : 0, width = (fw + 2) * in.d;
          const int64_t blocks = (in.num_dst + kRowsPerBlock - 1) / kRowsPerBlock;
          const at::Tensor partial =
              want_params ? at::empty({blocks, width}, in.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value))
                          : at::Tensor();
          if (blocks > 0) {
            simt::launch<gen_backward_params_kernel<scalar_t, index_t, A>>(
                static_cast<unsigned int>(blocks), kBlock, 0, stream,
                in.rowptr.data_ptr<index_t>(), in.col.data_ptr<index_t>(), num_edges, in.x.data_ptr<scalar_t>(),
                in.x.stride(0), n_src, emb, ptr_or_null<scalar_t>(in.t), ptr_or_null<scalar_t>(in.p), eps, rows,
                in.num_dst, in.d,
                in.direct ? ptr_or_null<scalar_t>(grads.edge_attr) : nullptr, ptr_or_null<acc_t>(grad_attr_enc),
                ptr_or_null<acc_t>(partial), fw, width, lanes);
          }
          if (want_params) {  // with no row block, the sums are 0
            const int64_t grid = std::min<int64_t>((width + kBlock - 1) / kBlock, std::numeric_limits<int32_t>::max());
            simt::launch<sum_partials_kernel<scalar_t>>(static_cast<unsigned int>(grid), kBlock, 0, stream,
                partial.data_ptr<acc_t>(), blocks, width, fw * in.d, in.d, ptr_or_null<scalar_t>(grads.weight_t),
                ptr_or_null<scalar_t>(grads.bias),
                ptr_or_null<scalar_t>(A == Aggr::Softmax ? grads.t : grads.p));
          }
          if (grad_attr_enc.defined() && !grad_attr_enc.is_same(grads.edge_attr)) grads.edge_attr.copy_(grad_attr_enc);
        });
      });
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_GEN_AGGREGATE(SIMT_DISPATCH_KEY, ::revgnn_ext::CudaGen)
