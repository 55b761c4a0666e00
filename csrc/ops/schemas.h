// Every op's schema, in one place: registered under revgnn_ext by revgnn_ext._C and under
// revgnn_ext_emu by the emulated build of the CUDA kernels (revgnn_ext._emu). Contracts:
// csrc/ops/<op>.h.
#pragma once

#include <torch/library.h>

namespace revgnn_ext {

inline void define_ops(torch::Library& m) {
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
        "Tensor grad_out, str aggr, float eps, bool[6] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
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
}

}  // namespace revgnn_ext
