// CPU kernels of gat_aggregate (contract and shared formulas: csrc/ops/gat_aggregate.h).
// Threaded over rows with at::parallel_for. Per edge and head the score, the online softmax step and
// the dropout draw are scalar (shared with CUDA: GatEdges, gat_softmax_join, gat_score_grad); the
// head's C channels go one SIMD vector (at::vec::Vectorized) at a time, in float32 for
// float16/bfloat16 (cpu/common.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/common.h"
#include "ops/gat_aggregate.h"

namespace revgnn_ext {
namespace {

using cpu::AccVec;
using cpu::load_acc;
using cpu::store_acc;

constexpr int64_t kRowBlock = 64;  // rows per partial sum of the edge_weight gradient

// <a, b> over n values, in the vectors' lane order, then the lanes in order: deterministic.
template <typename A, typename B>
at::opmath_type<A> dot(const A* a, const B* b, int64_t n) {
  using V = AccVec<A>;
  constexpr int64_t VS = V::size();
  V acc(0);
  for (int64_t c0 = 0; c0 < n; c0 += VS) {
    const int64_t cnt = std::min(VS, n - c0);
    acc = at::vec::fmadd(load_acc(a + c0, cnt), load_acc(b + c0, cnt), acc);
  }
  return cpu::lane_sum(acc);
}

// ---------------------------------------------------------------------------------- forward
// out[i] = the attention-weighted mean of row i's kept in-edges (lse defined: also L), or
// out[i] += alpha * that mean (the accumulate form).
template <typename scalar_t, typename index_t>
void forward_kernel(const GatInputs& in, const at::Tensor& out_t, const at::Tensor& lse_t, double alpha) {
  using V = AccVec<scalar_t>;
  using acc_t = typename V::value_type;
  constexpr int64_t VS = V::size();
  constexpr const char* op = "revgnn_ext.gat_aggregate";
  const GatEdges<scalar_t, index_t> ed(in);
  const index_t* rowptr = in.rowptr.data_ptr<index_t>();
  const index_t* col = in.col.data_ptr<index_t>();
  const scalar_t* x = in.x.data_ptr<scalar_t>();
  const int64_t ldx = in.x.stride(0), num_src = in.x.size(0), n = in.num_dst, num_edges = in.num_edges;
  const int64_t heads = in.heads, c = in.c, cpad = (c + VS - 1) / VS * VS;
  scalar_t* out = out_t.data_ptr<scalar_t>();
  const int64_t ldo = out_t.stride(0);
  acc_t* lse = lse_t.defined() ? lse_t.data_ptr<acc_t>() : nullptr;
  const V alpha_v(static_cast<acc_t>(alpha));
  at::parallel_for(0, n, cpu::grain_size(n, num_edges, heads * c), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mean(static_cast<size_t>(heads * cpad)), mx(heads), sum(heads);
    for (int64_t i = begin; i < end; ++i) {
      const auto [e0, e1] = checked_row(rowptr, i, n, num_edges, op, "rowptr");
      std::fill(mean.begin(), mean.end(), acc_t(0));
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(sum.begin(), sum.end(), acc_t(0));
      bool any = false;
      for (int64_t e = e0; e < e1; ++e) {
        if (!ed.kept(e)) continue;
        any = true;
        const int64_t j = checked(col[e], num_src, op, "col");
        const uint32_t hash = ed.hash(e);
        for (int64_t h = 0; h < heads; ++h) {
          const V w(gat_softmax_join(gat_leaky(ed.z(i, j, e, h), ed.slope), mx[h], sum[h]));
          const V drop(ed.drop(hash, h));
          const scalar_t* xh = x + j * ldx + h * c;
          acc_t* mh = mean.data() + h * cpad;
          for (int64_t c0 = 0; c0 < c; c0 += VS) {
            const V m = V::loadu(mh + c0);
            at::vec::fmadd(load_acc(xh + c0, std::min(VS, c - c0)) * drop - m, w, m).store(mh + c0);
          }
        }
      }
      scalar_t* o = out + i * ldo;
      if (lse != nullptr) {
        for (int64_t h = 0; h < heads; ++h) lse[i * heads + h] = any ? mx[h] + std::log(sum[h]) : acc_t(0);
      } else if (!any) {
        continue;
      }
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t c0 = 0; c0 < c; c0 += VS) {
          const int64_t cnt = std::min(VS, c - c0);
          scalar_t* oc = o + h * c + c0;
          const V m = V::loadu(mean.data() + h * cpad + c0);
          store_acc(lse != nullptr ? m : at::vec::fmadd(m, alpha_v, load_acc(oc, cnt)), oc, cnt);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------- backward
// r[i, h] = <grad_out[i, head h], out[i, head h]>.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> row_dots(const GatInputs& in, const scalar_t* grad_out, const scalar_t* out) {
  const int64_t heads = in.heads, c = in.c, d = heads * c, n = in.num_dst;
  std::vector<at::opmath_type<scalar_t>> r(static_cast<size_t>(n * heads));
  at::parallel_for(0, n, cpu::grain_size(n, 0, d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t h = 0; h < heads; ++h) r[i * heads + h] = dot(grad_out + i * d + h * c, out + i * d + h * c, c);
  });
  return r;
}

// grad_x and grad_src_score: per source j, over its out-edges (the transposed CSR).
template <typename scalar_t, typename index_t>
void backward_src_kernel(const GatInputs& in, const at::opmath_type<scalar_t>* lse, const scalar_t* grad_out,
                         const std::vector<at::opmath_type<scalar_t>>& r, const GatGrads& grads) {
  using V = AccVec<scalar_t>;
  using acc_t = typename V::value_type;
  constexpr int64_t VS = V::size();
  constexpr const char* op = "revgnn_ext.gat_aggregate_backward";
  const GatEdges<scalar_t, index_t> ed(in);
  const index_t* rowptr_t = in.rowptr_t.data_ptr<index_t>();
  const index_t* col_t = in.col_t.data_ptr<index_t>();
  const index_t* perm_t = in.perm_t.data_ptr<index_t>();
  const scalar_t* x = in.x.data_ptr<scalar_t>();
  const int64_t ldx = in.x.stride(0), num_src = in.x.size(0), num_edges = in.num_edges;
  const int64_t heads = in.heads, c = in.c, d = heads * c, cpad = (c + VS - 1) / VS * VS;
  scalar_t* gx = cpu::ptr_or_null<scalar_t>(grads.x);
  scalar_t* gsrc = cpu::ptr_or_null<scalar_t>(grads.src);
  at::parallel_for(0, num_src, cpu::grain_size(num_src, num_edges, d), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(heads * cpad)), gs(heads);
    for (int64_t j = begin; j < end; ++j) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(gs.begin(), gs.end(), acc_t(0));
      const scalar_t* xr = x + j * ldx;
      const auto [t0, t1] = checked_row(rowptr_t, j, num_src, num_edges, op, "rowptr_t");
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = checked(col_t[t], in.num_dst, op, "col_t");
        const int64_t e = checked(perm_t[t], num_edges, op, "perm_t");
        if (!ed.kept(e)) continue;
        const uint32_t hash = ed.hash(e);
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* g = grad_out + i * d + h * c;
          acc_t w;
          gs[h] += gat_score_grad(ed.z(i, j, e, h), ed.slope, lse[i * heads + h], ed.drop(hash, h),
                                  dot(g, xr + h * c, c), r[i * heads + h], w);
          if (gx == nullptr) continue;
          const V wv(w);
          acc_t* ah = acc.data() + h * cpad;
          for (int64_t c0 = 0; c0 < c; c0 += VS)
            at::vec::fmadd(load_acc(g + c0, std::min(VS, c - c0)), wv, V::loadu(ah + c0)).store(ah + c0);
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        if (gsrc != nullptr) gsrc[j * heads + h] = static_cast<scalar_t>(gs[h]);
        if (gx == nullptr) continue;
        for (int64_t c0 = 0; c0 < c; c0 += VS)
          store_acc(V::loadu(acc.data() + h * cpad + c0), gx + j * d + h * c + c0, std::min(VS, c - c0));
      }
    }
  });
}

// grad_dst_score, grad_edge_attr and grad_edge_weight: per destination i, over its in-edges (the
// CSR); edge_weight's gradient summed per fixed block of kRowBlock rows in float64, then over the
// blocks in order.
template <typename scalar_t, typename index_t>
void backward_dst_kernel(const GatInputs& in, const at::opmath_type<scalar_t>* lse, const scalar_t* grad_out,
                         const std::vector<at::opmath_type<scalar_t>>& r, const GatGrads& grads) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr const char* op = "revgnn_ext.gat_aggregate_backward";
  const GatEdges<scalar_t, index_t> ed(in);
  const index_t* rowptr = in.rowptr.data_ptr<index_t>();
  const index_t* col = in.col.data_ptr<index_t>();
  const scalar_t* x = in.x.data_ptr<scalar_t>();
  const int64_t ldx = in.x.stride(0), num_src = in.x.size(0), n = in.num_dst, num_edges = in.num_edges;
  const int64_t heads = in.heads, c = in.c, d = heads * c, f = in.f;
  scalar_t* gdst = cpu::ptr_or_null<scalar_t>(grads.dst);
  scalar_t* ga = cpu::ptr_or_null<scalar_t>(grads.edge_attr);
  const bool want_w = grads.weight.defined(), direct = !in.weight.defined();
  const scalar_t* attr = ed.attr;
  const scalar_t* weight = ed.weight;
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock, hf = want_w ? heads * f : 0;
  std::vector<double> partial(static_cast<size_t>(blocks * hf), 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t bb, int64_t be) {
    std::vector<acc_t> dz(heads), gd(heads);
    for (int64_t b = bb; b < be; ++b) {
      double* pw = partial.data() + b * hf;
      for (int64_t i = b * kRowBlock; i < std::min(n, (b + 1) * kRowBlock); ++i) {
        std::fill(gd.begin(), gd.end(), acc_t(0));
        const auto [e0, e1] = checked_row(rowptr, i, n, num_edges, op, "rowptr");
        for (int64_t e = e0; e < e1; ++e) {
          if (!ed.kept(e)) continue;  // its grad_edge_attr row stays 0
          const int64_t j = checked(col[e], num_src, op, "col");
          const uint32_t hash = ed.hash(e);
          for (int64_t h = 0; h < heads; ++h) {
            acc_t w;
            dz[h] = gat_score_grad(ed.z(i, j, e, h), ed.slope, lse[i * heads + h], ed.drop(hash, h),
                                   dot(grad_out + i * d + h * c, x + j * ldx + h * c, c), r[i * heads + h], w);
            gd[h] += dz[h];
          }
          if (ga != nullptr && direct) {
            for (int64_t h = 0; h < heads; ++h) ga[e * heads + h] = static_cast<scalar_t>(dz[h]);
          } else if (ga != nullptr) {
            for (int64_t k = 0; k < f; ++k) {
              acc_t s = acc_t(0);
              for (int64_t h = 0; h < heads; ++h) s += dz[h] * static_cast<acc_t>(weight[h * f + k]);
              ga[e * f + k] = static_cast<scalar_t>(s);
            }
          }
          for (int64_t h = 0; h < heads && want_w; ++h)
            for (int64_t k = 0; k < f; ++k)
              pw[h * f + k] += static_cast<double>(dz[h]) * static_cast<double>(attr[e * f + k]);
        }
        if (gdst != nullptr)
          for (int64_t h = 0; h < heads; ++h) gdst[i * heads + h] = static_cast<scalar_t>(gd[h]);
      }
    }
  });
  if (!want_w) return;
  std::vector<double> total(static_cast<size_t>(hf), 0.0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t k = 0; k < hf; ++k) total[k] += partial[b * hf + k];
  scalar_t* gw = grads.weight.data_ptr<scalar_t>();
  for (int64_t k = 0; k < hf; ++k) gw[k] = static_cast<scalar_t>(total[k]);
}

struct CpuGat {
  static void forward(const GatInputs& in, const at::Tensor& out, const at::Tensor& lse, double alpha) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "revgnn_ext.gat_aggregate", [&] {
      AT_DISPATCH_INDEX_TYPES(in.rowptr.scalar_type(), "revgnn_ext.gat_aggregate", [&] {
        forward_kernel<scalar_t, index_t>(in, out, lse, alpha);
      });
    });
  }

  static void backward(const GatInputs& in, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out,
                       const GatGrads& grads) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "revgnn_ext.gat_aggregate_backward",
                                    [&] {
      AT_DISPATCH_INDEX_TYPES(in.rowptr.scalar_type(), "revgnn_ext.gat_aggregate_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* g = grad_out.data_ptr<scalar_t>();
        const auto r = row_dots(in, g, out.data_ptr<scalar_t>());
        const acc_t* l = lse.data_ptr<acc_t>();
        if (grads.x.defined() || grads.src.defined()) backward_src_kernel<scalar_t, index_t>(in, l, g, r, grads);
        if (grads.dst.defined() || grads.edge_attr.defined() || grads.weight.defined())
          backward_dst_kernel<scalar_t, index_t>(in, l, g, r, grads);
      });
    });
  }
};

}  // namespace
}  // namespace revgnn_ext

REVGNN_REGISTER_GAT_AGGREGATE(CPU, ::revgnn_ext::CpuGat)

