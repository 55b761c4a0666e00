// What the CUDA kernels share: lane groups, the thread mapping (a group of G lanes, a power of
// two in [kMinGroup, 32], owns one row at a time; rows are visited with grid-stride loops), the
// graph's index checks on the device, 16-byte packs and the choice of their width.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "ops/common.h"
#include "simt.h"

namespace revgnn_ext {
namespace {

constexpr int kBlock = 256;   // threads per block
constexpr int kMinGroup = 8;  // fewest lanes per row
static_assert(kBlock % 32 == 0, "blocks are made of whole warps");

// 0 <= v < bound; a negative index fails as a huge unsigned one.
template <typename index_t>
__device__ __forceinline__ bool in_range(index_t v, int64_t bound) {
  return static_cast<uint64_t>(static_cast<int64_t>(v)) < static_cast<uint64_t>(bound);
}

// A lane's fetch of idx[e] for e < end: the index if it lies in [0, bound), else -1 (past the
// row's end; or out of range, which also fails an assert). -1 entries are skipped by the kernels.
template <typename index_t>
__device__ __forceinline__ index_t fetch_index(const index_t* idx, int64_t e, int64_t end, int64_t bound) {
  if (e >= end) return index_t(-1);
  const index_t v = idx[e];
  const bool ok = in_range(v, bound);
  CUDA_KERNEL_ASSERT(ok && "revgnn_ext: graph index out of range (build graphs with revgnn_ext.CSRGraph)");
  return ok ? v : index_t(-1);
}

// Row i of a CSR with n rows and num_entries entries; a malformed row (see row_ok) fails an
// assert and reads as empty, so that no kernel follows it out of bounds.
template <typename index_t>
__device__ __forceinline__ RowRange row_range(const index_t* rowptr, int64_t i, int64_t n, int64_t num_entries) {
  const RowRange r{static_cast<int64_t>(rowptr[i]), static_cast<int64_t>(rowptr[i + 1])};
  const bool ok = row_ok(i, n, r, num_entries);
  CUDA_KERNEL_ASSERT(ok && "revgnn_ext: malformed row pointer (build graphs with revgnn_ext.CSRGraph)");
  return ok ? r : RowRange{0, 0};
}

__device__ __forceinline__ int batch_count(int64_t begin, int64_t end, int size) {
  return static_cast<int>(end - begin < size ? end - begin : size);
}

// The lanes that share a row: lanes [index * size, (index + 1) * size) of the block. All lanes of
// a group follow the same control flow (row, edge batches, chunks), so the group's own mask is a
// valid mask for the *_sync intrinsics even when the other groups of the warp have diverged.
struct LaneGroup {
  int size;       // lanes per group: a power of two in [kMinGroup, 32]
  int lane;       // this thread's lane within the group
  int index;      // this group within the block
  int count;      // groups per block
  unsigned mask;  // the group's lanes within the warp

  __device__ explicit LaneGroup(int group_size)
      : size(group_size), lane(threadIdx.x & (group_size - 1)), index(threadIdx.x / group_size),
        count(blockDim.x / group_size) {
    const int warp_lane = threadIdx.x & 31;
    mask = size == 32 ? 0xffffffffu : ((1u << size) - 1u) << (warp_lane & ~(size - 1));
  }

  // Grid-stride loops over rows: this group's first row and the distance to its next.
  __device__ int64_t first_row() const { return static_cast<int64_t>(blockIdx.x) * count + index; }
  __device__ int64_t row_stride() const { return static_cast<int64_t>(gridDim.x) * count; }

  // The value held by lane `src` of the group.
  template <typename T>
  __device__ __forceinline__ T shfl(T v, int src SIMT_CALL_SITE) const {
    return __shfl_sync(mask, v, src, size SIMT_PASS_SITE);
  }

  // The sum over the group by a butterfly: a fixed order, and every lane gets the same bits.
  template <typename T>
  __device__ __forceinline__ T sum(T v SIMT_CALL_SITE) const {
    for (int offset = size / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset, size SIMT_PASS_SITE);
    return v;
  }

  __device__ __forceinline__ void sync(SIMT_CALL_SITE_ONLY) const { __syncwarp(mask SIMT_PASS_SITE); }
};

// Lanes per row: enough to cover ceil(d / vec) channel packs in one pass, a power of two in
// [kMinGroup, 32].
inline int lanes_per_row(int64_t d, int vec = 1) {
  const int64_t packs = (d + vec - 1) / vec;
  int lanes = kMinGroup;
  while (lanes < 32 && lanes < packs) lanes *= 2;
  return lanes;
}

// One group per row while the grid allows it (the hardware balances rows of uneven degree
// across blocks); the kernels' grid-stride loops cover the rest.
inline unsigned int num_blocks(int64_t rows, int lanes) {
  const int64_t per_block = kBlock / lanes;
  const int64_t blocks = (rows + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max()));
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// N consecutive values, loaded or stored with one instruction (16 bytes when N > 1); elementwise
// arithmetic, so that the shared formulas take a pack of accumulators like a scalar.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];

  template <typename U>
  C10_HOST_DEVICE Pack<U, N> as() const {
    Pack<U, N> r;
#pragma unroll
    for (int k = 0; k < N; ++k) r.v[k] = static_cast<U>(v[k]);
    return r;
  }
  C10_HOST_DEVICE Pack operator-(const Pack& o) const {
    Pack r;
#pragma unroll
    for (int k = 0; k < N; ++k) r.v[k] = v[k] - o.v[k];
    return r;
  }
  C10_HOST_DEVICE Pack operator+(const Pack& o) const {
    Pack r;
#pragma unroll
    for (int k = 0; k < N; ++k) r.v[k] = v[k] + o.v[k];
    return r;
  }
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  if constexpr (N > 1) simt::check_aligned(p, sizeof(Pack<T, N>));
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  if constexpr (N > 1) simt::check_aligned(p, sizeof(Pack<T, N>));
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Whether every row of the 2-D matrix t (channels contiguous) can be read in 16-byte packs: its
// start, its row stride and its width are 16-byte multiples.
inline bool packs_ok(const at::Tensor& t) {
  const int64_t bytes = t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.size(1) * bytes) % 16 == 0 &&
         (t.size(0) <= 1 || (t.stride(0) * bytes) % 16 == 0);
}

// Calls f(std::integral_constant<int, VEC>{}) with VEC = 16 / sizeof(scalar_t) (16-byte packs)
// when `packs`, else VEC = 1.
template <typename scalar_t, typename F>
void with_vec(bool packs, const F& f) {
  if (packs) {
    f(std::integral_constant<int, static_cast<int>(16 / sizeof(scalar_t))>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Per-block float64 partial sums [blocks, width] of parameter gradients, added in block order (the
// same bits whatever the GPU) and split by column: [0, weight_columns) into grad_weight, the next d
// into grad_bias, the rest into grad_param (each may be null, its columns then dropped).
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    sum_partials_kernel(const double* __restrict__ partial, int64_t blocks, int64_t width, int64_t weight_columns,
                        int64_t d, scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias,
                        scalar_t* __restrict__ grad_param) {
  for (int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; column < width;
       column += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double total = 0;
    for (int64_t b = 0; b < blocks; ++b) total += partial[b * width + column];
    if (column < weight_columns) {
      grad_weight[column] = static_cast<scalar_t>(total);
    } else if (column < weight_columns + d) {
      if (grad_bias != nullptr) grad_bias[column - weight_columns] = static_cast<scalar_t>(total);
    } else if (grad_param != nullptr) {
      grad_param[column - weight_columns - d] = static_cast<scalar_t>(total);
    }
  }
}

// Launches sum_partials_kernel over partial [blocks, width] (float64, contiguous).
template <typename scalar_t>
void sum_partials(const at::Tensor& partial, int64_t weight_columns, int64_t d, scalar_t* grad_weight,
                  scalar_t* grad_bias, scalar_t* grad_param, simt::Stream stream) {
  const int64_t width = partial.size(1);
  const int64_t grid = std::min<int64_t>((width + kBlock - 1) / kBlock, std::numeric_limits<int32_t>::max());
  simt::launch<sum_partials_kernel<scalar_t>>(static_cast<unsigned int>(grid), kBlock, 0, stream,
                                              partial.data_ptr<double>(), partial.size(0), width, weight_columns, d,
                                              grad_weight, grad_bias, grad_param);
}

}  // namespace
}  // namespace revgnn_ext
