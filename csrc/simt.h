// What the CUDA kernels (csrc/cuda/*.cu) take from CUDA, in one place: the kernel qualifiers, the
// built-in thread coordinates, shared memory, barriers and warp shuffles, device asserts, the
// current stream, the device guard, kernel launches and the dispatch key the ops register under.
//
// Under nvcc this is CUDA itself. Compiled by the host compiler with SIMT_EMULATE defined (the
// emulated build, revgnn_ext._emu), the same .cu files run on the CPU: each block's threads are
// cooperative fibers, a barrier or *_sync intrinsic suspends a lane until every lane it names
// has arrived at the same call, and what a GPU would hang on or leave undefined is an error that
// names the kernel, the block and the lanes (csrc/emu/simt_emu.cpp; docs/design.md, testing).
#pragma once

#include <c10/core/Device.h>
#include <c10/macros/Macros.h>

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#define SIMT_SHARED(T, name, count) __shared__ T name[count]
#define SIMT_DISPATCH_KEY CUDA
// The call site a wrapper of *_sync intrinsics passes on (emulation only: see below).
#define SIMT_CALL_SITE
#define SIMT_CALL_SITE_ONLY
#define SIMT_PASS_SITE

namespace simt {

// A pointer into shared memory (emulation: a handle whose accesses the race detector sees).
template <typename T>
using SharedPtr = T*;

using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::OptionalCUDAGuard;

inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }

// Kernel<<<grid, block, shared_bytes, stream>>>(args...), then the launch error check.
template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, Stream stream, Args... args) {
  Kernel<<<grid, block, shared_bytes, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A 16-byte pack access at p: aligned on a GPU by the host's choice of pack width (unchecked).
__device__ __forceinline__ void check_aligned(const void*, size_t) {}

}  // namespace simt

#elif defined(SIMT_EMULATE)

#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

// Shared memory: one copy per OS thread, which runs a block's fibers; poisoned at the start of
// each block and counted against the 48 KB static limit when a fiber first declares it. `name`
// is a simt::SharedPtr<T>: each access through it is checked for bounds and races (below).
#define SIMT_SHARED(T, name, count)                 \
  static thread_local T name##_simt_storage[count]; \
  const ::simt::SharedPtr<T> name = ::simt::shared_array(name##_simt_storage, #name)
#define SIMT_DISPATCH_KEY CPU

// A *_sync call is identified by its source line and how many times the lane has made it, so
// that the compiler's copies of a loop (unswitching, unrolling) do not split one call in two. A
// device function that wraps the intrinsics takes its caller's site as a defaulted last parameter
// (SIMT_CALL_SITE, or SIMT_CALL_SITE_ONLY as its only parameter) and passes it on (SIMT_PASS_SITE).
// (__builtin_FILE/LINE give the caller's position only as default arguments themselves.)
#define SIMT_CALL_SITE , const char *simt_file = __builtin_FILE(), int simt_line = __builtin_LINE()
#define SIMT_CALL_SITE_ONLY const char *simt_file = __builtin_FILE(), int simt_line = __builtin_LINE()
#define SIMT_PASS_SITE , simt_file, simt_line

namespace simt {

struct Site {
  const char* file;
  int line;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct Coordinates {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};

// The running fiber's coordinates.
const Coordinates& current();

struct Stream {};
inline Stream current_stream() { return {}; }

// Emulated kernels take CPU tensors.
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device& device);
};

enum class Sync : int { kSyncthreads, kSyncwarp, kShflIdx, kShflXor };

// The scheduling seed of the launches that follow (their order of blocks and lanes).
void configure(uint64_t seed);

// The runtime (csrc/emu/simt_emu.cpp). A lane's *_sync call: suspends it until every lane of
// `mask` has made the same call; `value` (bytes <= 16) is replaced by the lane's result.
void warp_sync(Sync kind, unsigned mask, void* value, size_t bytes, int arg, int width, Site site);
void syncthreads(Site site);
[[noreturn]] void kernel_assert_failed(const char* condition, const char* file, int line);
void check_aligned(const void* p, size_t bytes);

// Shared memory: SIMT_SHARED gives a handle that reports each access to the runtime.
// The runtime's record of one shared array of the running launch.
struct SharedArray;
// Registers (or finds) the array at p (`bytes`, elements of `element_bytes`) for the launch.
const SharedArray* shared_declared(void* p, size_t bytes, size_t element_bytes, const char* name);
// A read or write of the element at p by the running fiber, made at `site`: fails on an index
// outside the array, or on an access that races with another thread's (csrc/emu/simt_emu.cpp).
void shared_access(const SharedArray* array, const void* p, bool write, Site site);

// A subscript, with the source position of the expression that made it (the implicit
// conversion takes its default arguments there).
struct SharedIndex {
  std::ptrdiff_t i;
  Site site;
  SharedIndex(std::ptrdiff_t i_, const char* file = __builtin_FILE(), int line = __builtin_LINE())
      : i(i_), site{file, line} {}
};

// One element of shared memory, as an lvalue: reading it or assigning to it is an access.
template <typename T>
class SharedRef {
 public:
  using Value = std::remove_const_t<T>;
  SharedRef(T* p, const SharedArray* array, Site site) : p_(p), array_(array), site_(site) {}

  operator Value() const {
    shared_access(array_, p_, false, site_);
    return *p_;
  }
  const SharedRef& operator=(Value v) const {
    shared_access(array_, p_, true, site_);
    *p_ = v;
    return *this;
  }
  const SharedRef& operator=(const SharedRef& other) const { return *this = static_cast<Value>(other); }

 private:
  T* p_;
  const SharedArray* array_;
  Site site_;
};

// A pointer into a shared array: offsets and subscripts (under nvcc, a plain T*).
template <typename T>
class SharedPtr {
 public:
  SharedPtr(T* p, const SharedArray* array) : p_(p), array_(array) {}
  // A pointer to const from a pointer to mutable elements, as T* converts to const T*.
  template <typename U>
    requires std::is_same_v<const U, T> && (!std::is_const_v<U>)
  SharedPtr(const SharedPtr<U>& other) : p_(other.p_), array_(other.array_) {}

  SharedPtr operator+(std::ptrdiff_t n) const { return {p_ + n, array_}; }
  SharedRef<T> operator[](SharedIndex i) const { return {p_ + i.i, array_, i.site}; }

 private:
  template <typename>
  friend class SharedPtr;
  T* p_;
  const SharedArray* array_;
};

// SIMT_SHARED's handle on its array `name`, registered for the running launch.
template <typename T, size_t N>
SharedPtr<T> shared_array(T (&storage)[N], const char* name) {
  return {storage, shared_declared(storage, sizeof(storage), sizeof(T), name)};
}

// Runs body once per thread of the grid, as the emulator's fibers; throws what went wrong.
void run(const std::string& kernel, dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);

// The kernel's name with its template arguments, from this function's own signature.
template <auto Kernel>
std::string kernel_name() {
  const std::string f = __PRETTY_FUNCTION__;
  const auto begin = f.find("Kernel = ");
  if (begin == std::string::npos) return f;
  const auto end = f.find_first_of(";]", begin);
  return f.substr(begin + 9, end - begin - 9);
}

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, Stream, Args... args) {
  run(kernel_name<Kernel>(), grid, block, shared_bytes, [&] { Kernel(args...); });
}

template <typename T>
__forceinline__ T shuffle(Sync kind, unsigned mask, T v, int arg, int width, Site site) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shuffled values: at most 16 bytes");
  warp_sync(kind, mask, &v, sizeof(T), arg, width, site);
  return v;
}

}  // namespace simt

using simt::dim3;
using cudaStream_t = simt::Stream;

#define threadIdx (::simt::current().thread_idx)
#define blockIdx (::simt::current().block_idx)
#define blockDim (::simt::current().block_dim)
#define gridDim (::simt::current().grid_dim)
#define __syncthreads() ::simt::syncthreads(::simt::Site{__FILE__, __LINE__})

__forceinline__ void __syncwarp(unsigned mask = 0xffffffffu SIMT_CALL_SITE) {
  ::simt::warp_sync(::simt::Sync::kSyncwarp, mask, nullptr, 0, 0, 32, ::simt::Site{simt_file, simt_line});
}
template <typename T>
__forceinline__ T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32 SIMT_CALL_SITE) {
  return ::simt::shuffle(::simt::Sync::kShflIdx, mask, v, src_lane, width, ::simt::Site{simt_file, simt_line});
}
template <typename T>
__forceinline__ T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32 SIMT_CALL_SITE) {
  return ::simt::shuffle(::simt::Sync::kShflXor, mask, v, lane_mask, width, ::simt::Site{simt_file, simt_line});
}

// torch defines it on the host as __assert_fail, which would end the process.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  ((cond) ? static_cast<void>(0) : ::simt::kernel_assert_failed(#cond, __FILE__, __LINE__))

#else
#error "csrc/simt.h: compile with nvcc, or with SIMT_EMULATE defined for the emulated build"
#endif
