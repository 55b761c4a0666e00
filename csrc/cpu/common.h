// What the CPU kernels share: the work per task, optional pointers, and SIMD loads and stores that
// widen float16/bfloat16 to float32 (at::opmath_type), in which every kernel computes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace revgnn_ext {
namespace cpu {

// Rows per at::parallel_for task over a CSR with `entries` entries in `rows` rows of d channels:
// about 32k multiply-adds per task, so that short rows are not scheduled one by one.
inline int64_t grain_size(int64_t rows, int64_t entries, int64_t d) {
  const int64_t per_row = (entries / std::max<int64_t>(rows, 1) + 1) * std::max<int64_t>(d, 1);
  return std::max<int64_t>(1, (int64_t{1} << 15) / per_row);
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The SIMD register the kernels compute in for scalar_t values.
template <typename scalar_t>
using AccVec = at::vec::Vectorized<at::opmath_type<scalar_t>>;

// `count` (<= AccVec::size()) values at p, widened; the lanes past count are 0.
template <typename scalar_t>
inline AccVec<scalar_t> load_acc(const scalar_t* p, int64_t count = AccVec<scalar_t>::size()) {
  using V = AccVec<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, typename V::value_type>) {
    return count == V::size() ? V::loadu(p) : V::loadu(p, count);
  } else {
    typename V::value_type buf[V::size()] = {};
    at::vec::convert(p, buf, count);
    return V::loadu(buf);
  }
}

// The first `count` lanes of v, rounded to scalar_t, stored at p.
template <typename scalar_t>
inline void store_acc(const AccVec<scalar_t>& v, scalar_t* p, int64_t count = AccVec<scalar_t>::size()) {
  using V = AccVec<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, typename V::value_type>) {
    if (count == V::size()) v.store(p);
    else v.store(p, count);
  } else {
    typename V::value_type buf[V::size()];
    v.store(buf);
    at::vec::convert(buf, p, count);
  }
}

// The sum of v's lanes, in lane order.
template <typename T>
inline T lane_sum(const at::vec::Vectorized<T>& v) {
  T buf[at::vec::Vectorized<T>::size()];
  v.store(buf);
  T total = 0;
  for (int64_t l = 0; l < at::vec::Vectorized<T>::size(); ++l) total += buf[l];
  return total;
}

}  // namespace cpu
}  // namespace revgnn_ext
