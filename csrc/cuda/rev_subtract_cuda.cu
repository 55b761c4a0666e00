// CUDA kernel of rev_subtract_ (contract and shared formulas: csrc/ops/rev_subtract.h).
//
// Thread mapping (cuda/common.cuh): a group of G lanes owns one row at a time, rows visited
// with a grid-stride loop; lane l handles channels [k, k + VEC) of the group width c for
// k = l * VEC, (l + G) * VEC, ... It loads y_group and f there, stores y_group - f, and with
// sum_out adds the row's groups 1 .. C-1 at the same channels, in that order, into sum_out.
// VEC > 1 means 16-byte loads and stores, chosen on the host when y, f and sum_out start on 16
// bytes and their row strides and c are 16-byte multiples (packs_ok). Every element is computed by one lane
// in a fixed order: deterministic. float16/bfloat16 are computed in float32, rounded once per store.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "ops/rev_subtract.h"

namespace revgnn_ext {
namespace {

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
          rev_difference(load_pack<VEC>(yg).template as<acc_t>(), load_pack<VEC>(f + i * ldf + k).template as<acc_t>())
              .template as<scalar_t>();
      store_pack(yg, stored);
      if (sum_out == nullptr) continue;
      const Acc updated = stored.template as<acc_t>();  // the sum adds the stored (rounded) values
      const Acc total = rev_group_sum<Acc>(num_groups, [&](int64_t j) {
        return j == group ? updated : load_pack<VEC>(row + j * c + k).template as<acc_t>();
      });
      store_pack(sum_out + i * lds + k, total.template as<scalar_t>());
    }
  }
}

struct CudaRevSubtract {
  static void subtract(const at::Tensor& y, const at::Tensor& f, int64_t group, int64_t num_groups,
                       const at::Tensor& sum) {
    const simt::DeviceGuard guard(y.device());
    const int64_t n = y.size(0), c = f.size(1);
    const bool packs = packs_ok(f) && packs_ok(y) && (!sum.defined() || packs_ok(sum));
    const auto stream = simt::current_stream();
    constexpr const char* op = "revgnn_ext.rev_subtract_";
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), op, [&] {
      with_vec<scalar_t>(packs, [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        const int lanes = lanes_per_row(c, VEC);
        simt::launch<rev_subtract_kernel<scalar_t, VEC>>(num_blocks(n, lanes), kBlock, 0, stream,
            y.data_ptr<scalar_t>(), y.stride(0), f.data_ptr<scalar_t>(), f.stride(0), ptr_or_null<scalar_t>(sum),
            sum.defined() ? sum.stride(0) : 0, n, c, group, num_groups, lanes);
      });
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_REV_SUBTRACT(SIMT_DISPATCH_KEY, ::revgnn_ext::CudaRevSubtract)
