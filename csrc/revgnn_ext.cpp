// revgnn_ext._C: the op schemas (csrc/ops/schemas.h). Contracts: csrc/ops/<op>.h; kernels:
// csrc/cpu/<op>_cpu.cpp and csrc/cuda/<op>_cuda.cu; autograd and fake kernels: revgnn_ext/ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include <cstring>
#include <functional>
#include <vector>

#include "ops/schemas.h"

#ifndef REVGNN_EXT_TORCH_VERSION
#error "REVGNN_EXT_TORCH_VERSION must be defined by the build (setup.py / CMakeLists.txt)"
#endif

TORCH_LIBRARY(revgnn_ext, m) { ::revgnn_ext::define_ops(m); }

// Whether a tensor is the sole owner of all of its memory: (references to its TensorImpl,
// references to its storage, whether it spans the whole storage). GroupAddRev releases its input
// until backward only when nothing else holds it (no operation that saved it for backward, no view
// of it), which a tensor held by its Python object alone shows (revgnn_ext/nn/group_add_rev.py).
// Computed here, not from Python: a Python storage object, once made, holds the storage for the
// tensor's life.
static std::tuple<int64_t, int64_t, bool> ownership(const at::Tensor& tensor) {
  const auto& storage = tensor.storage();
  const bool whole = tensor.is_contiguous() && tensor.storage_offset() == 0 &&
                     static_cast<size_t>(tensor.numel()) * tensor.element_size() == storage.nbytes();
  return {static_cast<int64_t>(tensor.use_count()), static_cast<int64_t>(storage.use_count()), whole};
}

// The weights of fingerprint(): odd 64-bit mixes (splitmix64's finalizer) of their positions.
static constexpr int64_t kFingerprintWidth = 4096;

static const std::vector<uint64_t>& fingerprint_table() {
  static const std::vector<uint64_t> table = [] {
    std::vector<uint64_t> w(kFingerprintWidth);
    for (int64_t j = 0; j < kFingerprintWidth; ++j) {
      uint64_t z = static_cast<uint64_t>(j) + 0x9e3779b97f4a7c15ull;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      w[j] = (z ^ (z >> 31)) | 1u;
    }
    return w;
  }();
  return table;
}

static at::Tensor fingerprint_weights() {
  const auto& table = fingerprint_table();
  at::Tensor w = at::empty({kFingerprintWidth}, at::kLong);
  std::memcpy(w.data_ptr<int64_t>(), table.data(), sizeof(uint64_t) * table.size());
  return w;
}

// A checksum of a CPU tensor's values that depends on their positions: the sum over k of
// t_k * w[k mod 4096] * (2 * floor(k / 4096) + 1) mod 2^64, w = fingerprint_weights(); values as
// int64. One threaded pass over the tensor's memory, exact in any order of the threads' sums.
static int64_t fingerprint(const at::Tensor& tensor) {
  TORCH_CHECK_VALUE(tensor.device().is_cpu(), "fingerprint: expected a CPU tensor, got one on ", tensor.device());
  const at::Tensor t = at::isIntegralType(tensor.scalar_type(), /*includeBool=*/false)
                           ? tensor.contiguous() : tensor.to(at::kLong).contiguous();
  const auto& w = fingerprint_table();
  const int64_t n = t.numel();
  const int64_t rows = (n + kFingerprintWidth - 1) / kFingerprintWidth;
  uint64_t total = 0;
  AT_DISPATCH_INTEGRAL_TYPES(t.scalar_type(), "fingerprint", [&] {
    const scalar_t* data = t.const_data_ptr<scalar_t>();
    total = at::parallel_reduce(0, rows, 16, uint64_t{0}, [&](int64_t begin, int64_t end, uint64_t sum) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t first = r * kFingerprintWidth;
        const int64_t count = std::min(n - first, kFingerprintWidth);
        uint64_t row = 0;
        for (int64_t j = 0; j < count; ++j) {
          row += static_cast<uint64_t>(static_cast<int64_t>(data[first + j])) * w[j];
        }
        sum += row * static_cast<uint64_t>(2 * r + 1);
      }
      return sum;
    }, std::plus<uint64_t>());
  });
  return static_cast<int64_t>(total);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "revgnn_ext compiled ops (registered under torch.ops.revgnn_ext)";
  m.def("ownership", &ownership,
        "(references to the tensor's TensorImpl, references to its storage, whether it spans the whole storage)");
  m.def("fingerprint", &fingerprint,
        "sum_k t_k w[k mod 4096] (2 floor(k / 4096) + 1) mod 2^64 of a CPU tensor (w: fingerprint_weights())");
  m.def("fingerprint_weights", &fingerprint_weights, "the 4096 int64 weights of fingerprint()");
  m.attr("torch_version") = REVGNN_EXT_TORCH_VERSION;
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
