// revgnn_ext._emu: the CUDA kernels (csrc/cuda/*.cu) built for the CPU under the emulator of the
// CUDA execution model (csrc/simt.h), registered for CPU tensors under torch.ops.revgnn_ext_emu
// with the same schemas as revgnn_ext; revgnn_ext.emulator routes revgnn_ext's ops to them.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops/schemas.h"
#include "simt.h"

TORCH_LIBRARY(revgnn_ext_emu, m) { ::revgnn_ext::define_ops(m); }

void selftest(const std::string& name);  // csrc/emu/selftest.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "revgnn_ext's CUDA kernels on the CPU, under an emulator of the CUDA execution model";
  m.def("configure", &simt::configure, "The scheduling seed of the launches that follow", pybind11::arg("seed"));
  m.def("selftest", &selftest, "Launches a kernel with the named fault, which the emulator must report",
        pybind11::arg("name"));
}
