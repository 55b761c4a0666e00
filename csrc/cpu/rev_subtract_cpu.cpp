// CPU kernel of rev_subtract_ (contract and shared formulas: csrc/ops/rev_subtract.h). Threaded
// over rows with at::parallel_for; channels one at::vec::Vectorized register at a time (a row's
// last partial register is loaded and stored with a count). Each output element is computed by
// one thread in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/rev_subtract.h"

namespace revgnn_ext {
namespace {

using at::vec::Vectorized;

// Rows per task: about 64k elements of y each.
int64_t grain_size(int64_t d) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(d, 1)); }

// y_g -= f for the rows of y; with sum (not null) then sum = y_1 + ... + y_{C-1} in the same pass.
template <typename scalar_t>
void subtract_kernel(scalar_t* y, int64_t ldy, const scalar_t* f, int64_t ldf, scalar_t* sum, int64_t lds,
                     int64_t n, int64_t c, int64_t group, int64_t num_groups) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t VS = Vec::size();
  at::parallel_for(0, n, grain_size(c * num_groups), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* row = y + i * ldy;
      for (int64_t k = 0; k < c; k += VS) {
        const int64_t count = std::min(VS, c - k);
        scalar_t* yg = row + group * c + k;
        const Vec updated = rev_difference(Vec::loadu(yg, count), Vec::loadu(f + i * ldf + k, count));
        updated.store(yg, count);
        if (sum == nullptr) continue;
        const Vec total = rev_group_sum<Vec>(num_groups, [&](int64_t j) {
          return j == group ? updated : Vec::loadu(row + j * c + k, count);
        });
        total.store(sum + i * lds + k, count);
      }
    }
  });
}

struct CpuRevSubtract {
  static void check_dtype(at::ScalarType dtype, const char* op) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
                ": CPU kernels support float32 and float64, got ", dtype);
  }

  static void subtract(const at::Tensor& y, const at::Tensor& f, int64_t group, int64_t num_groups,
                       const at::Tensor& sum) {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "revgnn_ext.rev_subtract_", [&] {
      subtract_kernel<scalar_t>(y.data_ptr<scalar_t>(), y.stride(0), f.data_ptr<scalar_t>(), f.stride(0),
                                sum.defined() ? sum.data_ptr<scalar_t>() : nullptr,
                                sum.defined() ? sum.stride(0) : 0, y.size(0), f.size(1), group, num_groups);
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_REV_SUBTRACT(CPU, ::revgnn_ext::CpuRevSubtract)
