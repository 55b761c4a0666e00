// CUDA kernel of rev_subtract_ (contract and shared formulas: csrc/ops/rev_subtract.h).
//
// Thread mapping (cuda/lane_group.cuh): a group of G lanes owns one row at a time, rows visited
// with a grid-stride loop; lane l handles channels [k, k + VEC) of the group width c for
// k = l * VEC, (l + G) * VEC, ... It loads y_group and f there, stores y_group - f, and with
// sum_out adds the row's groups 1 .. C-1 at the same channels, in that order, into sum_out.
// VEC > 1 means 16-byte loads and stores, chosen on the host when y, f and sum_out start on 16
// bytes and their row strides and c are 16-byte multiples. Every element is computed by one lane
// in a fixed order: deterministic. float16/bfloat16 are computed in float32, rounded once per store.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "cuda/lane_group.cuh"
#include "ops/rev_subtract.h"

namespace revgnn_ext {
namespace {

// N consecutive values: one 16-byte load or store in the storage type when N > 1, and elementwise
// arithmetic in the accumulation type (the shared formulas take it like a scalar).
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

// The N values at p (aligned to the pack), widened to acc_t.
template <typename acc_t, int N, typename scalar_t>
__device__ __forceinline__ Pack<acc_t, N> load_as(const scalar_t* p) {
  return reinterpret_cast<const Pack<scalar_t, N>*>(p)->template as<acc_t>();
}

template <typename scalar_t, int N>
__device__ __forceinline__ void store(scalar_t* p, const Pack<scalar_t, N>& v) {
  *reinterpret_cast<Pack<scalar_t, N>*>(p) = v;
}

// y[:, group] -= f, then (sum_out not null) sum_out = y_1 + ... + y_{C-1}, row by row.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock)
    rev_subtract_kernel(scalar_t* __restrict__ y, int64_t ldy, const scalar_t* __restrict__ f, int64_t ldf,
                        scalar_t* __restrict__ sum_out, int64_t lds, int64_t n, int64_t c, int64_t group,
                        int64_t num_groups, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = Pack<acc_t, VEC>;
  const LaneGroup g(group_size);
  const int64_t chunk = static_cast<int64_t>(g.size) * VEC;
  for (int64_t i = g.first_row(); i < n; i += g.row_stride()) {
    scalar_t* row = y + i * ldy;
    for (int64_t k = static_cast<int64_t>(g.lane) * VEC; k < c; k += chunk) {  // with VEC > 1, c % VEC == 0
      scalar_t* yg = row + group * c + k;
      const Pack<scalar_t, VEC> stored =
          rev_difference(load_as<acc_t, VEC>(yg), load_as<acc_t, VEC>(f + i * ldf + k)).template as<scalar_t>();
      store(yg, stored);
      if (sum_out == nullptr) continue;
      const Acc updated = stored.template as<acc_t>();  // the sum adds the stored (rounded) values
      const Acc total = rev_group_sum<Acc>(
          num_groups, [&](int64_t j) { return j == group ? updated : load_as<acc_t, VEC>(row + j * c + k); });
      store(sum_out + i * lds + k, total.template as<scalar_t>());
    }
  }
}

// Whether every row of t starts on 16 bytes (channels contiguous).
bool rows_aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
         (t.size(0) <= 1 || (t.stride(0) * t.element_size()) % 16 == 0);
}

struct CudaRevSubtract {
  static void check_dtype(at::ScalarType dtype, const char* op) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                ": CUDA kernels support float32, float64, float16 and bfloat16, got ", dtype);
  }

  static void subtract(const at::Tensor& y, const at::Tensor& f, int64_t group, int64_t num_groups,
                       const at::Tensor& sum) {
    const at::cuda::OptionalCUDAGuard guard(y.device());
    const int64_t n = y.size(0), c = f.size(1);
    const bool packs = (c * y.element_size()) % 16 == 0 && rows_aligned16(y) && rows_aligned16(f) &&
                       (!sum.defined() || rows_aligned16(sum));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    constexpr const char* op = "revgnn_ext.rev_subtract_";
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), op, [&] {
      const auto launch = [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        const int lanes = lanes_per_row(c, VEC);
        rev_subtract_kernel<scalar_t, VEC><<<num_blocks(n, lanes), kBlock, 0, stream>>>(
            y.data_ptr<scalar_t>(), y.stride(0), f.data_ptr<scalar_t>(), f.stride(0),
            sum.defined() ? sum.data_ptr<scalar_t>() : nullptr, sum.defined() ? sum.stride(0) : 0, n, c, group,
            num_groups, lanes);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (packs) {
        launch(std::integral_constant<int, static_cast<int>(16 / sizeof(scalar_t))>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_REV_SUBTRACT(CUDA, ::revgnn_ext::CudaRevSubtract)
