// revgnn_ext._C: the op schemas (csrc/ops/schemas.h). Contracts: csrc/ops/<op>.h; kernels:
// csrc/cpu/<op>_cpu.cpp and csrc/cuda/<op>_cuda.cu; autograd and fake kernels: revgnn_ext/ops.py.
#include <torch/extension.h>
#include <torch/library.h>

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "revgnn_ext compiled ops (registered under torch.ops.revgnn_ext)";
  m.def("ownership", &ownership,
        "(references to the tensor's TensorImpl, references to its storage, whether it spans the whole storage)");
  m.attr("torch_version") = REVGNN_EXT_TORCH_VERSION;
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
