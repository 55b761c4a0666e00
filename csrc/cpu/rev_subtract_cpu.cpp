// CPU kernel of rev_subtract_ (contract and shared formulas: csrc/ops/rev_subtract.h). Threaded
// over rows with at::parallel_for; channels one at::vec::Vectorized register at a time (a row's
// last partial register is loaded and stored with a count), in float32 for float16/bfloat16. Each
// output element is computed by one thread in a fixed order, so results do not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/common.h"
#include "ops/rev_subtract.h"

namespace revgnn_ext {
namespace {

// y_g -= f for the rows of y; with sum (not null) then sum = y_1 + ... + y_{C-1} in the same pass,
// over the stored (rounded) values.
template <typename scalar_t>
void subtract_kernel(scalar_t* y, int64_t ldy, const scalar_t* f, int64_t ldf, scalar_t* sum, int64_t lds,
                     int64_t n, int64_t c, int64_t group, int64_t num_groups) {
  using Vec = cpu::AccVec<scalar_t>;
  constexpr int64_t VS = Vec::size();
  at::parallel_for(0, n, cpu::grain_size(n, 0, c * num_groups), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* row = y + i * ldy;
      for (int64_t k = 0; k < c; k += VS) {
        const int64_t count = std::min(VS, c - k);
        scalar_t* yg = row + group * c + k;
        cpu::store_acc(rev_difference(cpu::load_acc(yg, count), cpu::load_acc(f + i * ldf + k, count)), yg, count);
        if (sum == nullptr) continue;
        const Vec total =
            rev_group_sum<Vec>(num_groups, [&](int64_t j) { return cpu::load_acc(row + j * c + k, count); });
        cpu::store_acc(total, sum + i * lds + k, count);
      }
    }
  });
}

struct CpuRevSubtract {
  static void subtract(const at::Tensor& y, const at::Tensor& f, int64_t group, int64_t num_groups,
                       const at::Tensor& sum) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "revgnn_ext.rev_subtract_", [&] {
      subtract_kernel<scalar_t>(y.data_ptr<scalar_t>(), y.stride(0), f.data_ptr<scalar_t>(), f.stride(0),
                                cpu::ptr_or_null<scalar_t>(sum), sum.defined() ? sum.stride(0) : 0, y.size(0),
                                f.size(1), group, num_groups);
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_REV_SUBTRACT(CPU, ::revgnn_ext::CpuRevSubtract)
