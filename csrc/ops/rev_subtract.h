// rev_subtract_: one step of the grouped reversible block's inversion (design.md §2), in place.
//
// rev_subtract_(y, f, group, num_groups, sum_out?) -> ()
//   y [N, D], floating, D = num_groups * c, num_groups >= 2: the block's output Y = [Y_0 .. Y_{C-1}]
//   (0-based groups of c channels each), read and written in place. Channels contiguous and rows
//   that do not overlap (stride(1) == 1, stride(0) >= D): y may be a column slice of a wider buffer.
//   f [N, c], device of y, any layout (the op copies it when its channels are strided); y's dtype
//   or a lower precision (bfloat16 beside a float32 y: converted to y's dtype, exactly).
//     y[:, group * c : (group + 1) * c] -= f                          (0 <= group < num_groups)
//   sum_out [N, c], optional, dtype and device of y, channels contiguous; only with group >= 1:
//   then, in the same pass over each row,
//     sum_out = y_1 + y_2 + ... + y_{C-1}                             (y_j = y[:, j*c : (j+1)*c])
//   summed in this order, over the values after the subtraction (group's own slice included):
//   X'_0, the input of F_1, once the last of groups C-1 .. 1 has been rebuilt.
//   Neither f (as read) nor sum_out may share elements with y, nor sum_out with f; other column
//   slices of y's buffer are fine.
// float16/bfloat16 are computed in float32 and rounded once per stored value; the sum adds
// the stored (rounded) group values. Every element is computed by one thread in a fixed order:
// results are bitwise identical across runs, thread counts and launch shapes.
#pragma once

#include "ops/common.h"

namespace revgnn_ext {

// The rebuilt value of a channel of the group: X_g = Y_g - F_g. T is a scalar, an
// at::vec::Vectorized register (CPU) or a pack of accumulators (CUDA).
template <typename T>
C10_HOST_DEVICE inline T rev_difference(const T& y, const T& f) {
  return y - f;
}

// y_1 + y_2 + ... + y_{C-1} in this order; group(j) is the (updated) value of group j.
template <typename T, typename Group>
C10_HOST_DEVICE inline T rev_group_sum(int64_t num_groups, const Group& group) {
  T sum = group(1);
  for (int64_t j = 2; j < num_groups; ++j) sum = sum + group(j);
  return sum;
}

// f and sum_out: one group's width of y's rows.
inline void check_group_shape(const at::Tensor& t, const at::Tensor& y, int64_t c, const char* op,
                              const char* name) {
  TORCH_CHECK_VALUE(t.size(0) == y.size(0) && t.size(1) == c, op, ": ", name, " must have shape [", y.size(0), ", ", c,
              "] (y's rows, one group's channels), got ", t.sizes());
}

// The op layer, shared by the devices: argument checks. K holds one device's kernels
// (cpu/rev_subtract_cpu.cpp, cuda/rev_subtract_cuda.cu):
//   K::subtract(y, f, group, num_groups, sum_out)   with n > 0, c > 0; sum_out undefined or [n, c].
template <typename K>
void rev_subtract_op(const at::Tensor& y, const at::Tensor& f_in, int64_t group, int64_t num_groups,
                     const c10::optional<at::Tensor>& sum_out) {
  constexpr const char* op = "revgnn_ext.rev_subtract_";
  TORCH_CHECK_VALUE(num_groups >= 2, op, ": num_groups must be at least 2, got ", num_groups);
  TORCH_CHECK_VALUE(group >= 0 && group < num_groups, op, ": group must be in [0, ", num_groups, "), got ", group);
  check_written(y, op, "y", y.device());
  TORCH_CHECK_VALUE(y.size(1) % num_groups == 0, op, ": y has ", y.size(1), " channels, which do not split into ",
              num_groups, " equal groups");
  const int64_t c = y.size(1) / num_groups;
  const at::Tensor f = check_features(f_in, op, "f", y.device());
  check_group_shape(f, y, c, op, "f");
  TORCH_CHECK_TYPE(at::promoteTypes(f.scalar_type(), y.scalar_type()) == y.scalar_type(), op, ": f (", f.scalar_type(),
              ") must have y's dtype ", y.scalar_type(), " or a lower precision that converts to it exactly");
  TORCH_CHECK(!shares_elements(f, y), op, ": f shares elements with y; it may be a column slice of y's buffer, "
              "but its columns must not overlap y's");
  at::Tensor sum;
  if (sum_out.has_value()) {
    sum = *sum_out;
    TORCH_CHECK_VALUE(group >= 1, op, ": sum_out (the sum of groups 1 .. num_groups - 1) is formed with the "
                "subtraction into a group >= 1, got group 0");
    check_written(sum, op, "sum_out", y.device());
    check_group_shape(sum, y, c, op, "sum_out");
    check_like_x(sum, y, op, "sum_out", "y");
    TORCH_CHECK(!shares_elements(sum, y), op, ": sum_out shares elements with y; it may be a column slice of "
                "y's buffer, but its columns must not overlap y's");
    TORCH_CHECK(!shares_elements(sum, f), op, ": sum_out shares elements with f");
  }
  // A lower-precision f (F run under autocast beside float32 carried activations) is converted,
  // exactly: the subtraction runs in y's precision.
  if (y.size(0) > 0 && c > 0) K::subtract(y, f.to(y.scalar_type()), group, num_groups, sum);
}

// One registration for a device's kernels.
#define REVGNN_REGISTER_REV_SUBTRACT(DEVICE, K)                        \
  TORCH_LIBRARY_IMPL(REVGNN_LIBRARY, DEVICE, m) {                          \
    m.impl("rev_subtract_", &::revgnn_ext::rev_subtract_op<K>);        \
  }

}  // namespace revgnn_ext
