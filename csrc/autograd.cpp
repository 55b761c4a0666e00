// Autograd of the functional ops (spmm, gen_aggregate, gat_aggregate), registered at the Autograd
// key: the forward runs the op below autograd and saves what its backward op reads; the backward
// calls the backward ops through the dispatcher, so that their own autograd (spmm's second order,
// the refusals of the others: revgnn_ext/ops.py) applies under create_graph. In C++ because a
// Python autograd kernel costs over 100 us per call, several times a small graph's kernel, and
// a 1001-layer model pays it thousands of times a step (docs/design.md §3).
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace revgnn_ext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

Tensor required(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// The backward of x reads the transposed CSR, which revgnn_ext.ops passes when gradients are recorded.
void check_transposed(const Tensor& rowptr_t, const char* op) {
  TORCH_CHECK(rowptr_t.defined(), "revgnn_ext.", op, ": the backward needs the transposed CSR (rowptr_t, col_t, ",
              "perm_t); revgnn_ext.ops passes it when gradients are recorded");
}

// needs_input_grad counts a function's tensor arguments only (an absent optional is none): each
// argument's number among them (-1 for none), from whether each is a tensor, kept with the context.
void number_tensors(AutogradContext* ctx, std::initializer_list<bool> present) {
  std::vector<int64_t> numbers;
  int64_t next = 0;
  for (bool p : present) numbers.push_back(p ? next++ : -1);
  ctx->saved_data["tensor_numbers"] = numbers;
}

// Whether the gradient of argument `arg` is wanted.
bool needs_grad(AutogradContext* ctx, size_t arg) {
  const int64_t number = ctx->saved_data["tensor_numbers"].toIntList()[arg];
  return number >= 0 && ctx->needs_input_grad(number);
}

// Whether the gradients of arguments [first, first + N) are wanted: a backward op's output_mask.
template <size_t N>
std::array<bool, N> wanted_grads(AutogradContext* ctx, size_t first) {
  std::array<bool, N> wanted;
  for (size_t i = 0; i < N; ++i) wanted[i] = needs_grad(ctx, first + i);
  return wanted;
}

// Autograd's gradients of a function of `total` arguments: a backward op's outputs for arguments
// [first, first + N) where wanted, undefined everywhere else.
template <size_t N>
variable_list gradients(size_t total, size_t first, const std::array<Tensor, N>& outputs,
                        const std::array<bool, N>& wanted) {
  variable_list grads(total);
  for (size_t i = 0; i < N; ++i) {
    if (wanted[i]) grads[first + i] = outputs[i];
  }
  return grads;
}

class Spmm : public torch::autograd::Function<Spmm> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& rowptr, const Tensor& col,
                               const OptTensor& rowptr_t, const OptTensor& col_t, const OptTensor& perm_t,
                               const OptTensor& weight, const Tensor& x, c10::string_view reduce) {
    static auto op = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                         const OptTensor&, const OptTensor&, const OptTensor&,
                                                         const Tensor&, c10::string_view)>("revgnn_ext::spmm");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, arg] = op.call(rowptr, col, rowptr_t, col_t, perm_t, weight, x, reduce);
    const bool weight_grad = weight.has_value() && weight->requires_grad();
    ctx->save_for_backward({rowptr, col, required(rowptr_t), required(col_t), required(perm_t), required(weight),
                            weight_grad ? x : Tensor(), arg});
    ctx->saved_data["reduce"] = std::string(reduce);
    number_tensors(ctx, {true, true, has(rowptr_t), has(col_t), has(perm_t), has(weight), true});
    ctx->mark_non_differentiable({arg});
    return {out, arg};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto backward_x = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                            const OptTensor&, const Tensor&, const Tensor&, c10::string_view)>(
        "revgnn_ext::spmm_backward_x");
    static auto backward_weight = find_op<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                                 const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                                                 c10::string_view)>("revgnn_ext::spmm_backward_weight");
    const auto s = ctx->get_saved_variables();
    const std::string reduce = ctx->saved_data["reduce"].toStringRef();
    Tensor grad_weight, grad_x;
    if (needs_grad(ctx, 6)) {
      check_transposed(s[2], "spmm");
      grad_x = backward_x.call(s[0], s[1], s[2], s[3], s[4], optional(s[5]), grads[0], s[7], reduce);
    }
    if (needs_grad(ctx, 5)) {
      grad_weight = backward_weight.call(s[0], s[1], optional(s[2]), optional(s[3]), optional(s[4]), s[6], grads[0],
                                         s[7], reduce);
    }
    return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), grad_weight, grad_x, Tensor()};
  }
};

class GenAggregate : public torch::autograd::Function<GenAggregate> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& rowptr, const Tensor& col,
                               const OptTensor& rowptr_t, const OptTensor& col_t, const OptTensor& perm_t,
                               const Tensor& x, const OptTensor& edge_attr, const OptTensor& edge_weight,
                               const OptTensor& edge_bias, const OptTensor& t, const OptTensor& p,
                               c10::string_view aggr, double eps) {
    static auto op = find_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
        const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, c10::string_view,
        double)>("revgnn_ext::gen_aggregate");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, state] = op.call(rowptr, col, rowptr_t, col_t, perm_t, x, edge_attr, edge_weight, edge_bias, t, p,
                                aggr, eps);
    ctx->save_for_backward({rowptr, col, required(rowptr_t), required(col_t), required(perm_t), x,
                            required(edge_attr), required(edge_weight), required(edge_bias), required(t),
                            required(p), out, state});
    ctx->saved_data["aggr"] = std::string(aggr);
    ctx->saved_data["eps"] = eps;
    number_tensors(ctx, {true, true, has(rowptr_t), has(col_t), has(perm_t), true, has(edge_attr), has(edge_weight),
                         has(edge_bias), has(t), has(p)});
    ctx->mark_non_differentiable({state});
    return {out, state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = find_op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
        const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
        const Tensor&, c10::string_view, double, std::array<bool, 6>)>("revgnn_ext::gen_aggregate_backward");
    const auto s = ctx->get_saved_variables();
    check_transposed(s[2], "gen_aggregate");
    const auto wanted = wanted_grads<6>(ctx, 5);
    auto [x, attr, weight, bias, t, p] =
        op.call(s[0], s[1], s[2], s[3], s[4], s[5], optional(s[6]), optional(s[7]), optional(s[8]), optional(s[9]),
                optional(s[10]), s[11], s[12], grads[0], ctx->saved_data["aggr"].toStringRef(),
                ctx->saved_data["eps"].toDouble(), wanted);
    return gradients<6>(13, 5, {x, attr, weight, bias, t, p}, wanted);
  }
};

class GatAggregate : public torch::autograd::Function<GatAggregate> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& rowptr, const Tensor& col,
                               const OptTensor& rowptr_t, const OptTensor& col_t, const OptTensor& perm_t,
                               const OptTensor& perm, const Tensor& x, const Tensor& src_score,
                               const OptTensor& dst_score, const OptTensor& edge_attr, const OptTensor& edge_weight,
                               const OptTensor& edge_keep, double negative_slope, double attn_dropout,
                               int64_t seed) {
    static auto op = find_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
        const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, double,
        double, int64_t)>("revgnn_ext::gat_aggregate");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, lse] = op.call(rowptr, col, rowptr_t, col_t, perm_t, perm, x, src_score, dst_score, edge_attr,
                              edge_weight, edge_keep, negative_slope, attn_dropout, seed);
    ctx->save_for_backward({rowptr, col, required(rowptr_t), required(col_t), required(perm_t), required(perm), x,
                            src_score, required(dst_score), required(edge_attr), required(edge_weight),
                            required(edge_keep), out, lse});
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["attn_dropout"] = attn_dropout;
    ctx->saved_data["seed"] = seed;
    number_tensors(ctx, {true, true, has(rowptr_t), has(col_t), has(perm_t), has(perm), true, true, has(dst_score),
                         has(edge_attr), has(edge_weight)});
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = find_op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
        const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
        const Tensor&, const Tensor&, double, double, int64_t, std::array<bool, 5>)>(
        "revgnn_ext::gat_aggregate_backward");
    const auto s = ctx->get_saved_variables();
    check_transposed(s[2], "gat_aggregate");
    const auto wanted = wanted_grads<5>(ctx, 6);
    auto [x, src, dst, attr, weight] =
        op.call(s[0], s[1], s[2], s[3], s[4], optional(s[5]), s[6], s[7], optional(s[8]), optional(s[9]),
                optional(s[10]), optional(s[11]), s[12], s[13], grads[0], ctx->saved_data["negative_slope"].toDouble(),
                ctx->saved_data["attn_dropout"].toDouble(), ctx->saved_data["seed"].toInt(), wanted);
    return gradients<5>(15, 6, {x, src, dst, attr, weight}, wanted);
  }
};

std::tuple<Tensor, Tensor> pair(const variable_list& outputs) { return {outputs[0], outputs[1]}; }

std::tuple<Tensor, Tensor> spmm_autograd(const Tensor& rowptr, const Tensor& col, const OptTensor& rowptr_t,
                                         const OptTensor& col_t, const OptTensor& perm_t, const OptTensor& weight,
                                         const Tensor& x, c10::string_view reduce) {
  return pair(Spmm::apply(rowptr, col, rowptr_t, col_t, perm_t, weight, x, reduce));
}

std::tuple<Tensor, Tensor> gen_aggregate_autograd(const Tensor& rowptr, const Tensor& col, const OptTensor& rowptr_t,
                                                  const OptTensor& col_t, const OptTensor& perm_t, const Tensor& x,
                                                  const OptTensor& edge_attr, const OptTensor& edge_weight,
                                                  const OptTensor& edge_bias, const OptTensor& t, const OptTensor& p,
                                                  c10::string_view aggr, double eps) {
  return pair(GenAggregate::apply(rowptr, col, rowptr_t, col_t, perm_t, x, edge_attr, edge_weight, edge_bias, t, p,
                                  aggr, eps));
}

std::tuple<Tensor, Tensor> gat_aggregate_autograd(const Tensor& rowptr, const Tensor& col, const OptTensor& rowptr_t,
                                                  const OptTensor& col_t, const OptTensor& perm_t,
                                                  const OptTensor& perm, const Tensor& x, const Tensor& src_score,
                                                  const OptTensor& dst_score, const OptTensor& edge_attr,
                                                  const OptTensor& edge_weight, const OptTensor& edge_keep,
                                                  double negative_slope, double attn_dropout, int64_t seed) {
  return pair(GatAggregate::apply(rowptr, col, rowptr_t, col_t, perm_t, perm, x, src_score, dst_score, edge_attr,
                                  edge_weight, edge_keep, negative_slope, attn_dropout, seed));
}

}  // namespace

TORCH_LIBRARY_IMPL(revgnn_ext, Autograd, m) {
  m.impl("spmm", &spmm_autograd);
  m.impl("gen_aggregate", &gen_aggregate_autograd);
  m.impl("gat_aggregate", &gat_aggregate_autograd);
}

}  // namespace revgnn_ext
