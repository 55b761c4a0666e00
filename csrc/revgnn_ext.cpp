// revgnn_ext._C: every op schema in one place. Contracts: csrc/ops/<op>.h; kernels:
// csrc/cpu/<op>_cpu.cpp and csrc/cuda/<op>_cuda.cu; autograd and fake kernels: revgnn_ext/ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef REVGNN_EXT_TORCH_VERSION
#error "REVGNN_EXT_TORCH_VERSION must be defined by the build (setup.py / CMakeLists.txt)"
#endif

TORCH_LIBRARY(revgnn_ext, m) {
  // Sparse (CSR by destination) x dense aggregation: csrc/ops/spmm.h. Every op takes the graph
  // first: rowptr, col, then the transposed CSR (rowptr_t, col_t, perm_t), which the backward
  // of x needs and autograd must be able to save.
  m.def("spmm(Tensor rowptr, Tensor col, Tensor? rowptr_t, Tensor? col_t, Tensor? perm_t, Tensor? weight, "
        "Tensor x, str reduce) -> (Tensor, Tensor)");
  m.def("spmm_accumulate_(Tensor(a!) out, Tensor rowptr, Tensor col, Tensor? weight, Tensor x, str reduce, "
        "float alpha=1.0) -> ()");
  m.def("spmm_backward_x(Tensor rowptr, Tensor col, Tensor rowptr_t, Tensor col_t, Tensor perm_t, "
        "Tensor? weight, Tensor grad_out, Tensor arg, str reduce) -> Tensor");
  m.def("spmm_backward_weight(Tensor rowptr, Tensor col, Tensor? rowptr_t, Tensor? col_t, Tensor? perm_t, "
        "Tensor x, Tensor grad_out, Tensor arg, str reduce) -> Tensor");
  // GENConv message construction + aggregation, fused (no [E, D] tensor): csrc/ops/gen_aggregate.h.
  m.def("gen_aggregate(Tensor rowptr, Tensor col, Tensor? rowptr_t, Tensor? col_t, Tensor? perm_t, Tensor x, "
        "Tensor? edge_attr, Tensor? edge_weight, Tensor? edge_bias, Tensor? t, Tensor? p, str aggr, float eps) "
        "-> (Tensor, Tensor)");
  m.def("gen_aggregate_backward(Tensor rowptr, Tensor col, Tensor rowptr_t, Tensor col_t, Tensor perm_t, Tensor x, "
        "Tensor? edge_attr, Tensor? edge_weight, Tensor? edge_bias, Tensor? t, Tensor? p, Tensor out, Tensor state, "
        "Tensor grad_out, str aggr, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // GAT attention softmax + aggregation, fused (no [E, H*C] nor [E, H] tensor): csrc/ops/gat_aggregate.h.
  // perm: the caller's edge ids, hashed by the attention-dropout draw.
  m.def("gat_aggregate(Tensor rowptr, Tensor col, Tensor? rowptr_t, Tensor? col_t, Tensor? perm_t, Tensor? perm, "
        "Tensor x, Tensor src_score, Tensor? dst_score, Tensor? edge_attr, Tensor? edge_weight, Tensor? edge_keep, "
        "float negative_slope, float attn_dropout, int seed) -> (Tensor, Tensor)");
  m.def("gat_aggregate_accumulate_(Tensor(a!) out, Tensor rowptr, Tensor col, Tensor? perm, Tensor x, "
        "Tensor src_score, Tensor? dst_score, Tensor? edge_attr, Tensor? edge_weight, Tensor? edge_keep, "
        "float negative_slope, float attn_dropout, int seed, float alpha=1.0) -> ()");
  m.def("gat_aggregate_backward(Tensor rowptr, Tensor col, Tensor rowptr_t, Tensor col_t, Tensor perm_t, "
        "Tensor? perm, Tensor x, Tensor src_score, Tensor? dst_score, Tensor? edge_attr, Tensor? edge_weight, "
        "Tensor? edge_keep, Tensor out, Tensor lse, Tensor grad_out, float negative_slope, float attn_dropout, "
        "int seed, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One in-place step of the reversible block's inversion, y_group -= f, optionally forming the
  // sum of groups 1.. in the same pass: csrc/ops/rev_subtract.h.
  m.def("rev_subtract_(Tensor(a!) y, Tensor f, int group, int num_groups, Tensor(b!)? sum_out) -> ()");
}

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
