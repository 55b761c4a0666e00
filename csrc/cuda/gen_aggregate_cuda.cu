// CUDA kernels of gen_aggregate (contract and shared formulas: csrc/ops/gen_aggregate.h).
//
// Thread mapping (cuda/common.cuh): a group of G lanes owns one row; lane l holds channels
// c0 + l + k * G, k < kPer, of each pass over the channels, G the smallest power of two in [8, 32]
// with kPer * G >= D, so that one pass covers up to 128 channels (wider rows take one pass per 128).
// The group fetches the row's edges G at a time, one per lane (coalesced), checks their indices
// and broadcasts them with __shfl_sync; the gathers of kUnroll edges (kParamsUnroll in
// backward_params) are issued before any is consumed.
//
// The edge embedding is recomputed, never stored. A direct embedding is one coalesced load per
// edge and channel. An encoded one (edge_attr [E, F] times the weight) with F <= kMaxF: the group
// copies the features of its batch of edges into its shared-memory tile (for CSR batches one
// contiguous range of edge_attr), which every lane reads by broadcast, and each lane keeps its
// channels' F weights and biases in registers (backward_params: the weights in shared memory, for
// the whole block). A wider F reads both from global memory.
//
// Kernels: forward, over CSR rows (grid-stride); backward_x, over the rows of the transposed CSR
// (grid-stride); backward_params, over CSR rows in fixed blocks of kRowsPerBlock rows: the
// per-edge grad_edge_attr and one float64 partial sum per block of the weight, bias, t and p
// gradients, which sum_partials adds up in block order.
//
// Determinism, no atomics: every out / grad_x element is one lane's sequential sum in (transposed)
// CSR order. grad_edge_attr of an encoded embedding is, per pass, each lane's channels in order and
// then a fixed butterfly over the group, the passes added in order (in opmath precision). A
// parameter gradient is summed in float64 per lane over its group's rows of the block, in row and
// edge order; the groups of a block are added in group order and the blocks in block order. G
// depends on D only, and the row blocks on kRowsPerBlock only, so the same inputs give the same
// bits on any GPU and grid.
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

constexpr int kPer = 4;                // channels per lane and pass
constexpr int kMaxPass = kPer * 32;    // channels per pass, at most
constexpr int kUnroll = 4;             // edges whose gathers are issued together
constexpr int kParamsUnroll = 1;       // ... in backward_params, whose registers hold float64 sums
constexpr int kMaxF = 16;              // edge features staged in shared memory / weights in registers
constexpr int64_t kRowsPerBlock = 64;  // rows per partial sum of the parameter gradients
static_assert(kMinGroup % kUnroll == 0 && kMinGroup % kParamsUnroll == 0,
              "a batch of edges must hold whole unrolled steps");

enum class EmbMode : int {
  None,    // no edge features: emb = 0
  Direct,  // emb = edge_attr[e, c]
  Staged,  // encoded, F <= kMaxF: features from the group's shared tile, weights from registers
           // (backward_params: from the block's shared memory)
  Global,  // encoded, F > kMaxF: features and weights from global memory
};

// A lane's channels of the pass that starts at channel c0: ch(k) = c0 + k * G + lane for k < kPer
// (the group's k-th channels are consecutive, so its loads coalesce); those at or past D are off.
struct Channels {
  int64_t c0, d;
  int lane, size;

  __device__ Channels(const LaneGroup& g, int64_t c0_, int64_t d_) : c0(c0_), d(d_), lane(g.lane), size(g.size) {}
  __device__ __forceinline__ int64_t operator()(int k) const { return c0 + k * size + lane; }
  __device__ __forceinline__ bool on(int k) const { return (*this)(k) < d; }
};

// v[c] at the lane's channels where `read` (t or p), else 1.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void lane_values(const scalar_t* v, bool read, const Channels& ch, acc_t (&out)[kPer]) {
#pragma unroll
  for (int j = 0; j < kPer; ++j) out[j] = read && ch.on(j) ? static_cast<acc_t>(v[ch(j)]) : acc_t(1);
}

// The edge embedding's inputs, as a kernel argument.
template <typename scalar_t>
struct EdgeEmb {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* attr;      // [E, F] ([E, D] when Direct), or null
  const scalar_t* weight_t;  // [F, D], or null
  const scalar_t* bias;      // [D], or null
  int64_t f, d;
  EmbMode mode;

  // The weight of feature k at channel c (0 past F or D, or without weight), and the bias at c
  // (0 past D or without one).
  __device__ __forceinline__ acc_t weight_at(int64_t k, int64_t c) const {
    return weight_t != nullptr && k < f && c < d ? static_cast<acc_t>(weight_t[k * d + c]) : acc_t(0);
  }
  __device__ __forceinline__ acc_t bias_at(int64_t c) const {
    return bias != nullptr && c < d ? static_cast<acc_t>(bias[c]) : acc_t(0);
  }

  // edge_attr[e, c] when the embedding is given directly, else 0.
  __device__ __forceinline__ acc_t direct(int64_t e, int64_t c) const {
    return mode == EmbMode::Direct ? static_cast<acc_t>(attr[e * d + c]) : acc_t(0);
  }

  // The encoded embedding of edge e at the lane's channels (0 unless Staged or Global), each
  // summed in feature order; `a` is the edge's row of the tile, `w` the lane's weights of features
  // [0, kMaxF) (LaneWeights or SharedWeights).
  template <typename Weights, typename TileRow>
  __device__ __forceinline__ void encoded(const Weights& w, TileRow a, int64_t e, const Channels& ch,
                                          acc_t (&s)[kPer]) const {
#pragma unroll
    for (int j = 0; j < kPer; ++j) s[j] = w.bias_at(j);
    if (mode == EmbMode::Staged) {
#pragma unroll
      for (int k = 0; k < kMaxF; ++k) {
        if (k >= f) continue;
        const acc_t ak = static_cast<acc_t>(a[k]);
#pragma unroll
        for (int j = 0; j < kPer; ++j) s[j] += w.weight(k, j) * ak;
      }
    } else if (mode == EmbMode::Global) {
      for (int64_t k = 0; k < f; ++k) {
        const acc_t ak = static_cast<acc_t>(attr[e * f + k]);
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          if (ch.on(j)) s[j] += static_cast<acc_t>(weight_t[k * d + ch(j)]) * ak;
        }
      }
    }
  }

  // Features [k0, k0 + kf) of the consecutive CSR edges [base, base + count) into the group's
  // tile (row u: edge base + u, kMaxF wide): one contiguous range of edge_attr when kf == F.
  template <typename Tile>
  __device__ void stage_range(const LaneGroup& g, Tile tile, int64_t base, int count, int64_t k0, int kf) const {
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

// One lane's weights of features [0, kMaxF) at its channels (0 past F or D) and their biases, in
// registers.
template <typename acc_t>
struct LaneWeights {
  acc_t w[kMaxF][kPer];
  acc_t b[kPer];

  template <typename scalar_t>
  __device__ LaneWeights(const EdgeEmb<scalar_t>& emb, const Channels& ch) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
#pragma unroll
      for (int k = 0; k < kMaxF; ++k) w[k][j] = emb.weight_at(k, ch(j));
      b[j] = emb.bias_at(ch(j));
    }
  }
  __device__ __forceinline__ acc_t weight(int k, int j) const { return w[k][j]; }
  __device__ __forceinline__ acc_t bias_at(int j) const { return b[j]; }
};

// The weights of features [k0, k0 + kMaxF) at a pass's channels, staged in shared memory by the
// block (row k: channels c0 .. c0 + kMaxPass - 1, as double: exact), and the lane's biases in
// registers.
template <typename acc_t>
struct SharedWeights {
  simt::SharedPtr<const double> w;
  acc_t b[kPer];
  int lane, size;

  template <typename scalar_t>
  __device__ SharedWeights(simt::SharedPtr<const double> staged, const EdgeEmb<scalar_t>& emb, const Channels& ch)
      : w(staged), lane(ch.lane), size(ch.size) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) b[j] = emb.bias_at(ch(j));
  }
  __device__ __forceinline__ acc_t weight(int k, int j) const {
    return static_cast<acc_t>(w[k * kMaxPass + j * size + lane]);
  }
  __device__ __forceinline__ acc_t bias_at(int j) const { return b[j]; }
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

// One unrolled step over a batch of a row's edges: the sources of edges k .. k + U - 1 of
// the batch (broadcast from the lanes that fetched them; -1 past the row or out of range) and
// x[src, c] + the direct edge embedding at the lane's channels, every gather issued before any
// is used.
template <int U, typename scalar_t, typename index_t, typename acc_t>
__device__ __forceinline__ void gather_step(const LaneGroup& g, index_t src, int k, const Channels& ch,
                                            const scalar_t* __restrict__ x, int64_t ldx, const EdgeEmb<scalar_t>& emb,
                                            int64_t base, index_t (&js)[U], acc_t (&xe)[U][kPer]) {
#pragma unroll
  for (int u = 0; u < U; ++u) js[u] = g.shfl(src, k + u);
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      xe[u][j] = acc_t(0);
      if (js[u] >= 0 && ch.on(j)) {
        xe[u][j] = static_cast<acc_t>(x[static_cast<int64_t>(js[u]) * ldx + ch(j)]) + emb.direct(base + k + u, ch(j));
      }
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
    for (int64_t c0 = 0; c0 < d; c0 += kPer * g.size) {
      const Channels ch(g, c0, d);
      const LaneWeights<acc_t> lw(emb, ch);
      acc_t tc[kPer], pc[kPer];
      lane_values(t, A == Aggr::Softmax, ch, tc);
      lane_values(p, A == Aggr::PowerMean, ch, pc);
      // sum/mean/powermean: the sum; max: the best value; softmax: the weighted mean of messages.
      acc_t acc[kPer] = {}, mx[kPer] = {}, sum[kPer] = {};
      index_t sel[kPer];
#pragma unroll
      for (int c = 0; c < kPer; ++c) sel[c] = -1;
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
          acc_t xe[kUnroll][kPer];  // x[col_e, c] + edge_attr[e, c] (direct)
          gather_step(g, src, k, ch, x, ldx, emb, base, js, xe);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (js[u] < 0) continue;
            const int64_t edge = base + k + u;
            acc_t enc[kPer];
            emb.encoded(lw, tile + (k + u) * kMaxF, edge, ch, enc);
#pragma unroll
            for (int c = 0; c < kPer; ++c) {
              if (!ch.on(c)) continue;
              const acc_t m = gen_message<acc_t>(xe[u][c] + enc[c], eps);
              if constexpr (A == Aggr::Sum || A == Aggr::Mean) {
                acc[c] += m;
              } else if constexpr (A == Aggr::Max) {
                if (replaces<Reduce::Max>(m, acc[c], seen)) {
                  acc[c] = m;
                  sel[c] = static_cast<index_t>(edge);
                }
              } else if constexpr (A == Aggr::Softmax) {
                if (seen) {
                  softmax_push<acc_t>(tc[c] * m, m, mx[c], sum[c], acc[c]);
                } else {
                  mx[c] = tc[c] * m;
                  sum[c] = acc_t(1);
                  acc[c] = m;
                }
              } else {
                acc[c] += positive_pow<acc_t>(power_clamp<acc_t>(m), pc[c]);
              }
            }
            seen = true;
          }
        }
        if (staged) g.sync();  // the tile is read before the next batch overwrites it
      }
      const acc_t deg = static_cast<acc_t>(e1 - e0);
#pragma unroll
      for (int c = 0; c < kPer; ++c) {
        if (!ch.on(c)) continue;
        const int64_t o = i * d + ch(c);
        if constexpr (A == Aggr::Sum) {
          out[o] = static_cast<scalar_t>(acc[c]);
        } else if constexpr (A == Aggr::Mean) {
          out[o] = static_cast<scalar_t>(e1 > e0 ? acc[c] / deg : acc_t(0));
        } else if constexpr (A == Aggr::Max) {
          out[o] = static_cast<scalar_t>(acc[c]);  // 0 when no edge was seen
          arg[o] = sel[c];
        } else if constexpr (A == Aggr::Softmax) {
          out[o] = static_cast<scalar_t>(seen ? acc[c] : acc_t(0));
          stat[o] = seen ? mx[c] + M::log(sum[c]) : acc_t(0);
        } else {
          const acc_t r = e1 > e0 ? acc[c] / deg : acc_t(0);
          stat[o] = r;
          out[o] = static_cast<scalar_t>(positive_pow<acc_t>(power_clamp<acc_t>(r), acc_t(1) / pc[c]));
        }
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
    for (int64_t c0 = 0; c0 < d; c0 += kPer * g.size) {
      const Channels ch(g, c0, d);
      const LaneWeights<acc_t> lw(emb, ch);
      acc_t tc[kPer], pc[kPer], xj[kPer], acc[kPer] = {};
      lane_values(t, A == Aggr::Softmax, ch, tc);
      lane_values(p, A == Aggr::PowerMean, ch, pc);
#pragma unroll
      for (int c = 0; c < kPer; ++c) xj[c] = ch.on(c) ? static_cast<acc_t>(x[j * ldx + ch(c)]) : acc_t(0);
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
          RowVals<acc_t> rv[kUnroll][kPer];
          acc_t pre[kUnroll][kPer];  // x[j, c] + edge_attr[e, c] (direct)
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            is[u] = g.shfl(dst, k + u);
            es[u] = g.shfl(edge, k + u);
            const index_t deg_u = kDeg ? g.shfl(deg, k + u) : index_t(0);
#pragma unroll
            for (int c = 0; c < kPer; ++c) {
              pre[u][c] = xj[c];
              if (is[u] >= 0 && ch.on(c)) {
                rv[u][c] = rows.template load<A>(is[u], ch(c), static_cast<acc_t>(deg_u));
                pre[u][c] += emb.direct(es[u], ch(c));
              }
            }
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (is[u] < 0) continue;
            acc_t enc[kPer];
            emb.encoded(lw, tile + (k + u) * kMaxF, es[u], ch, enc);
#pragma unroll
            for (int c = 0; c < kPer; ++c) {
              if (!ch.on(c)) continue;
              const acc_t v = pre[u][c] + enc[c];
              acc_t extra;
              const acc_t dm = message_grad<A>(rv[u][c], es[u], gen_message<acc_t>(v, eps), tc[c], pc[c], extra);
              acc[c] += relu_grad<acc_t>(v, dm);
            }
          }
        }
        if (staged) g.sync();  // the tile is read before the next batch overwrites it
      }
#pragma unroll
      for (int c = 0; c < kPer; ++c) {
        if (ch.on(c)) grad_x[j * d + ch(c)] = static_cast<scalar_t>(acc[c]);
      }
    }
  }
}

// Over the CSR, block b owning rows [b * kRowsPerBlock, (b + 1) * kRowsPerBlock): the per-edge
// grad_edge_attr (grad_attr_direct [E, D], or grad_attr_enc [E, F] in opmath precision, either
// may be null) and, when `partial` is not null, the block's float64 sums of the parameter
// gradients in partial[b, :], laid out as [fw rows of the weight (fw = F when its gradient is
// wanted, else 0) | bias | t or p], each D wide. Feature chunks [k0, k0 + kMaxF) of the features
// whose gradients are wanted take one pass each (one pass when there are at most kMaxF, or none).
template <typename scalar_t, typename index_t, Aggr A>
__global__ void __launch_bounds__(kBlock)
    gen_backward_params_kernel(const index_t* __restrict__ rowptr, const index_t* __restrict__ col,
                               int64_t num_edges, const scalar_t* __restrict__ x, int64_t ldx, int64_t num_src,
                               const EdgeEmb<scalar_t> emb, const scalar_t* __restrict__ t,
                               const scalar_t* __restrict__ p, at::opmath_type<scalar_t> eps,
                               const RowSource<scalar_t, index_t> rows, int64_t n, int64_t d,
                               scalar_t* __restrict__ grad_attr_direct,
                               at::opmath_type<scalar_t>* __restrict__ grad_attr_enc, double* __restrict__ partial,
                               int64_t fw, int64_t width, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kSlots = kMaxF + 2;  // per lane and channel: kMaxF weight sums, the bias sum, the t or p sum
  constexpr int kTiles = kBlock * kMaxF;
  static_assert(kBlock * kSlots <= kTiles + kMaxF * kMaxPass, "the sums fit where the tiles and weights were");
  // While rows are processed: the groups' tiles (features, as double: exact) and the pass's
  // weights (SharedWeights); then the lanes' sums for the block's combination. (The registers
  // hold the float64 sums, not the weights.)
  SIMT_SHARED(double, smem, kTiles + kMaxF * kMaxPass);
  const LaneGroup g(group_size);
  simt::SharedPtr<double> tile = smem + static_cast<int64_t>(g.index) * g.size * kMaxF;
  simt::SharedPtr<double> weights = smem + kTiles;
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
    for (int64_t c0 = 0; c0 < d; c0 += kPer * g.size) {
      const Channels ch(g, c0, d);
      // The pass's weights of the chunk's features, for every group of the block: the encoded
      // embedding reads them when Staged (then k0 = 0 and they are every weight), the gradient of
      // the chunk's features in any case.
      __syncthreads();  // the previous pass is done with shared memory
      for (int idx = threadIdx.x; idx < kMaxF * kMaxPass; idx += kBlock) {
        weights[idx] = emb.weight_at(k0 + idx / kMaxPass, c0 + idx % kMaxPass);
      }
      __syncthreads();
      const SharedWeights<acc_t> w(weights, emb, ch);
      acc_t tc[kPer], pc[kPer];
      lane_values(t, A == Aggr::Softmax, ch, tc);
      lane_values(p, A == Aggr::PowerMean, ch, pc);
      double w_sum[kMaxF][kPer] = {}, b_sum[kPer] = {}, param_sum[kPer] = {};
      for (int64_t i = row0 + g.index; i < row1; i += g.count) {
        const auto [e0, e1] = row_range(rowptr, i, n, num_edges);
        RowVals<acc_t> rv[kPer];
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          if (ch.on(c)) rv[c] = rows.template load<A>(i, ch(c), static_cast<acc_t>(e1 - e0));
        }
        acc_t s1[kPer] = {};  // the row's sums for d/dt or d/dp
        for (int64_t base = e0; base < e1; base += g.size) {
          const index_t src = fetch_index(col, base + g.lane, e1, num_src);
          const int count = batch_count(base, e1, g.size);
          if (staged > 0) {
            emb.stage_range(g, tile, base, count, k0, staged);
            g.sync();
          }
          for (int k = 0; k < count; k += kParamsUnroll) {
            index_t js[kParamsUnroll];
            acc_t xe[kParamsUnroll][kPer];  // x[col_e, c] + edge_attr[e, c] (direct)
            gather_step(g, src, k, ch, x, ldx, emb, base, js, xe);
#pragma unroll
            for (int u = 0; u < kParamsUnroll; ++u) {
              if (k + u >= count) continue;  // the same for the whole group
              const int64_t edge = base + k + u;
              const simt::SharedPtr<const double> a = tile + (k + u) * kMaxF;
              // The gradient at x + emb; 0 for an edge whose col is out of range.
              acc_t dpre[kPer] = {};
              if (js[u] >= 0) {
                acc_t enc[kPer];
                emb.encoded(w, a, edge, ch, enc);
#pragma unroll
                for (int c = 0; c < kPer; ++c) {
                  if (!ch.on(c)) continue;
                  const acc_t v = xe[u][c] + enc[c];
                  acc_t extra;
                  dpre[c] = relu_grad<acc_t>(v, message_grad<A>(rv[c], edge, gen_message<acc_t>(v, eps), tc[c],
                                                                pc[c], extra));
                  s1[c] += extra;
                  b_sum[c] += static_cast<double>(dpre[c]);
                }
#pragma unroll
                for (int kk = 0; kk < kMaxF; ++kk) {
                  if (kk >= kw) continue;
                  const double ak = a[kk];
#pragma unroll
                  for (int c = 0; c < kPer; ++c) w_sum[kk][c] += static_cast<double>(dpre[c]) * ak;
                }
              }
              if (grad_attr_direct != nullptr) {
#pragma unroll
                for (int c = 0; c < kPer; ++c) {
                  if (ch.on(c)) grad_attr_direct[edge * d + ch(c)] = static_cast<scalar_t>(dpre[c]);
                }
              }
              if (grad_attr_enc != nullptr) {
                // grad_edge_attr[e, k0 + kk] = sum_c dpre_c weight_t[k0 + kk, c]: this pass's channels,
                // each lane's in order, then a butterfly; added to the previous passes' sum by lane kk % G.
#pragma unroll
                for (int kk = 0; kk < kMaxF; ++kk) {
                  if (kk >= kf) continue;
                  acc_t s = acc_t(0);
#pragma unroll
                  for (int c = 0; c < kPer; ++c) s += dpre[c] * w.weight(kk, c);
                  s = g.sum(s);
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
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          if (!ch.on(c)) continue;
          if constexpr (A == Aggr::Softmax) param_sum[c] += static_cast<double>(rv[c].g * s1[c]);
          if constexpr (A == Aggr::PowerMean) {
            param_sum[c] += static_cast<double>(power_grad_p<acc_t>(rv[c].g, rv[c].out, pc[c], rv[c].state, s1[c],
                                                                    rv[c].deg));
          }
        }
      }
      if (partial == nullptr) continue;  // the same for the whole block
      // Combine the block's groups in group order, one channel slot c of the lanes at a time: slot
      // s of lane l of group q at smem[s * kBlock + q * G + l].
#pragma unroll
      for (int c = 0; c < kPer; ++c) {
        if (c0 + c * g.size >= d) break;  // the same for the whole block
        __syncthreads();  // every tile, or the previous slot's sums, is done with
#pragma unroll
        for (int k = 0; k < kMaxF; ++k) smem[k * kBlock + threadIdx.x] = w_sum[k][c];
        smem[kMaxF * kBlock + threadIdx.x] = b_sum[c];
        smem[(kMaxF + 1) * kBlock + threadIdx.x] = param_sum[c];
        __syncthreads();
        for (int idx = threadIdx.x; idx < kSlots * g.size; idx += kBlock) {
          const int s = idx / g.size, l = idx - s * g.size;
          const int64_t cc = c0 + c * g.size + l;
          // Weight slots past the chunk's features hold nothing; bias and t/p once, in chunk 0.
          if (cc >= d || (s < kMaxF && s >= kw) || (s >= kMaxF && k0 != 0)) continue;
          double total = 0;
          for (int q = 0; q < g.count; ++q) total += smem[s * kBlock + q * g.size + l];
          const int64_t column = s < kMaxF ? (k0 + s) * d + cc : (fw + s - kMaxF) * d + cc;
          partial[static_cast<int64_t>(blockIdx.x) * width + column] = total;
        }
      }
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
    const int lanes = lanes_per_row(in.d, kPer);
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
    const int lanes = lanes_per_row(in.d, kPer);
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
          // grad_edge_attr of an encoded embedding is summed over passes of channels in opmath
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
              want_params ? at::empty({blocks, width}, in.x.options().dtype(at::kDouble)) : at::Tensor();
          if (blocks > 0) {
            simt::launch<gen_backward_params_kernel<scalar_t, index_t, A>>(
                static_cast<unsigned int>(blocks), kBlock, 0, stream,
                in.rowptr.data_ptr<index_t>(), in.col.data_ptr<index_t>(), num_edges, in.x.data_ptr<scalar_t>(),
                in.x.stride(0), n_src, emb, ptr_or_null<scalar_t>(in.t), ptr_or_null<scalar_t>(in.p), eps, rows,
                in.num_dst, in.d,
                in.direct ? ptr_or_null<scalar_t>(grads.edge_attr) : nullptr, ptr_or_null<acc_t>(grad_attr_enc),
                ptr_or_null<double>(partial), fw, width, lanes);
          }
          if (want_params) {  // with no row block, the sums are 0
            sum_partials<scalar_t>(partial, fw * in.d, in.d, ptr_or_null<scalar_t>(grads.weight_t),
                                   ptr_or_null<scalar_t>(grads.bias),
                                   ptr_or_null<scalar_t>(A == Aggr::Softmax ? grads.t : grads.p), stream);
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
