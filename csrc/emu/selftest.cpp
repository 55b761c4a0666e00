// Kernels with the faults the emulator must report (tests/test_emulator.py): each launch of
// selftest(name) fails where a GPU would hang, fault or be undefined; "synced_shared" must pass.
#include <torch/extension.h>

#include <string>

#include "simt.h"

namespace {

// Lane 0 leaves before a shuffle that names it.
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 0) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

// Odd lanes skip the first shuffle and meet the others at the second.
__global__ void diverged_shuffle_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 2 == 0) v = __shfl_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = __shfl_sync(0xffffffffu, v, 2);
}

// Thread 3 skips the barrier.
__global__ void skipped_barrier_kernel(int* out) {
  if (threadIdx.x != 3) __syncthreads();
  out[threadIdx.x] = static_cast<int>(threadIdx.x);
}

// Each thread reads what a thread of the other warp wrote, with no __syncthreads in between.
__global__ void unsynced_read_kernel(int* out) {
  SIMT_SHARED(int, tile, 64);
  tile[threadIdx.x] = static_cast<int>(threadIdx.x);
  out[threadIdx.x] = tile[63 - threadIdx.x];
}

// Each thread overwrites its element, which a thread of the other warp read, with no
// __syncthreads in between.
__global__ void unsynced_write_kernel(int* out) {
  SIMT_SHARED(int, tile, 64);
  tile[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = tile[63 - threadIdx.x];
  tile[threadIdx.x] = 0;
}

// Each lane stages its element and reads its neighbour's with no __syncwarp in between; the
// shuffle between them orders execution (here, and often on a GPU), not memory.
__global__ void unsynced_staging_kernel(int* out) {
  SIMT_SHARED(int, tile, 32);
  tile[threadIdx.x] = static_cast<int>(threadIdx.x);
  const int v = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
  out[threadIdx.x] = v + tile[threadIdx.x ^ 1u];
}

// The correct kernel: each half-warp stages, __syncwarp of its lanes, reads its neighbours,
// __syncwarp, overwrites; then __syncthreads between the other warp's write and the reads.
__global__ void synced_shared_kernel(int* out) {
  SIMT_SHARED(int, tile, 64);
  const unsigned half = 0xffffu << (threadIdx.x & 16u);
  tile[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncwarp(half);
  int v = tile[threadIdx.x ^ 1u];
  __syncwarp(half);
  tile[threadIdx.x] = v;
  __syncthreads();
  v += tile[63 - threadIdx.x];
  __syncthreads();
  tile[63 - threadIdx.x] = v;
  out[threadIdx.x] = tile[63 - threadIdx.x];
}

// Thread 63 writes one element past the array.
__global__ void shared_out_of_bounds_kernel(int*) {
  SIMT_SHARED(int, tile, 64);
  tile[threadIdx.x + 1] = 0;
}

// A 16-byte access 4 bytes past an aligned address.
__global__ void misaligned_pack_kernel(int* out) { simt::check_aligned(out + 1, 16); }

__global__ void assert_kernel(int* out) { CUDA_KERNEL_ASSERT(out[threadIdx.x] >= 0 && "selftest: negative entry"); }

// 64 KB of static shared memory.
__global__ void large_shared_kernel(int* out) {
  SIMT_SHARED(double, big, 8192);
  big[threadIdx.x] = 1.0;
  out[threadIdx.x] = static_cast<int>(big[threadIdx.x]);
}

__global__ void empty_kernel(int*) {}

}  // namespace

// Runs the named faulty kernel on a [64] int buffer (entries -1); returns normally only if the
// emulator let it pass.
void selftest(const std::string& name) {
  at::Tensor buffer = at::full({64}, -1, at::kInt);
  int* out = buffer.data_ptr<int>();
  const auto stream = simt::current_stream();
  if (name == "exited_lane") {
    simt::launch<exited_lane_kernel>(1u, 32, 0, stream, out);
  } else if (name == "diverged_shuffle") {
    simt::launch<diverged_shuffle_kernel>(1u, 32, 0, stream, out);
  } else if (name == "skipped_barrier") {
    simt::launch<skipped_barrier_kernel>(1u, 64, 0, stream, out);
  } else if (name == "unsynced_read") {
    simt::launch<unsynced_read_kernel>(1u, 64, 0, stream, out);
  } else if (name == "unsynced_write") {
    simt::launch<unsynced_write_kernel>(1u, 64, 0, stream, out);
  } else if (name == "unsynced_staging") {
    simt::launch<unsynced_staging_kernel>(1u, 32, 0, stream, out);
  } else if (name == "synced_shared") {
    simt::launch<synced_shared_kernel>(1u, 64, 0, stream, out);
  } else if (name == "shared_out_of_bounds") {
    simt::launch<shared_out_of_bounds_kernel>(1u, 64, 0, stream, out);
  } else if (name == "misaligned_pack") {
    simt::launch<misaligned_pack_kernel>(1u, 1, 0, stream, out);
  } else if (name == "assert") {
    simt::launch<assert_kernel>(1u, 64, 0, stream, out);
  } else if (name == "large_shared") {
    simt::launch<large_shared_kernel>(1u, 64, 0, stream, out);
  } else if (name == "block_too_large") {
    simt::launch<empty_kernel>(1u, 2048, 0, stream, out);
  } else if (name == "empty_grid") {
    simt::launch<empty_kernel>(0u, 32, 0, stream, out);
  } else {
    TORCH_CHECK_VALUE(false, "selftest: unknown case ", name);
  }
}
