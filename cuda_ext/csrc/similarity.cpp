// Similarity engine, CUDA backend: op schemas (TORCH_LIBRARY) and the host-side block loops.
//
// Same algorithm as the tiled PyTorch backend (cuda_ext/tiled.py): for each row block, cuBLAS
// computes the raw dot products a_blk @ b^T into an fp32 buffer (bf16/fp16 inputs use tensor
// cores with fp32 output), the fused kernels in similarity_kernels.cu turn the block into
// row/column statistics or the gradient block G, and two more GEMMs give dA and dB. Memory is
// O((N + M) D) plus one or two (rows, M) buffers. Fakes and autograd are registered in Python.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "similarity.h"

namespace distill_sim {
namespace {

using at::Tensor;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kBlockElements = int64_t(1) << 25;  // 32 Mi logits = 128 MiB fp32 per buffer

at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

bool is_half(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

double neg_log(double w) { return w == 0.0 ? kInf : -std::log(w); }

int64_t block_rows(int64_t n, int64_t m, int64_t block) {
  if (block > 0) return std::min(block, n);
  return std::max<int64_t>(1, std::min<int64_t>(n, kBlockElements / std::max<int64_t>(m, 1)));
}

void check_inputs(std::initializer_list<std::pair<const char*, const Tensor*>> named) {
  const Tensor& first = *named.begin()->second;
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->is_cuda(), "distill_cuda: ", name, " must be a CUDA tensor, got ", t->device());
    TORCH_CHECK(t->dim() == 2, "distill_cuda: ", name, " must be 2-D, got ", t->dim(), "-D");
    TORCH_CHECK(t->device() == first.device(), "distill_cuda: ", name, " is on ", t->device(), " but ",
                named.begin()->first, " is on ", first.device());
    TORCH_CHECK(t->scalar_type() == first.scalar_type(), "distill_cuda: ", name, " has dtype ", t->scalar_type(),
                " but ", named.begin()->first, " has ", first.scalar_type());
  }
}

// out (R, M) <- a_blk @ b^T accumulated in out's dtype (fp32 output for half inputs).
void gemm_nt(Tensor& out, const Tensor& a_blk, const Tensor& b) {
  if (a_blk.scalar_type() == out.scalar_type()) at::mm_out(out, a_blk, b.t());
  else at::mm_out(out, a_blk, b.t(), out.scalar_type());
}

// G @ B in the accumulator dtype.
Tensor gemm_nn(const Tensor& g, const Tensor& b, at::ScalarType acc) {
  return g.scalar_type() == acc ? at::mm(g, b) : at::mm(g, b, acc);
}

// acc += G^T @ A (fp32 accumulator even for half G and A).
void gemm_tn_acc(Tensor& acc, const Tensor& g, const Tensor& a) {
  if (g.scalar_type() == acc.scalar_type()) acc.addmm_(g.t(), a);
  else at::addmm_out(acc, acc, g.t(), a, acc.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> infonce_fwd(const Tensor& a_in, const Tensor& b_in, const Tensor& scale_in,
                                               int64_t offset, double w_row, double w_col, int64_t block) {
  check_inputs({{"a", &a_in}, {"b", &b_in}});
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t n = a.size(0), m = b.size(0), rows = block_rows(n, m, block);
  const auto opts = a.options().dtype(acc_type(a));
  const Tensor scale = scale_in.to(opts).reshape({});
  Tensor lse_r = at::empty({n}, opts), col_max = at::full({m}, -kInf, opts), col_sum = at::zeros({m}, opts);
  Tensor buf = at::empty({rows, m}, opts);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    Tensor s = buf.narrow(0, 0, r);
    gemm_nt(s, a.narrow(0, r0, r), b);
    row_lse(s, scale, lse_r.narrow(0, r0, r));
    col_lse_update(s, scale, col_max, col_sum);
  }
  Tensor lse_c = col_sum.log() + col_max;
  Tensor pos = (a.to(opts.dtype()) * b.narrow(0, offset, n).to(opts.dtype())).sum(1) * scale;
  Tensor loss = w_row * (lse_r - pos).mean() + w_col * (lse_c.narrow(0, offset, n) - pos).mean();
  return {loss.to(a.scalar_type()), lse_r, lse_c};
}

std::tuple<Tensor, Tensor, Tensor> infonce_bwd(const Tensor& grad, const Tensor& a_in, const Tensor& b_in,
                                               const Tensor& scale_in, const Tensor& lse_r, const Tensor& lse_c,
                                               int64_t offset, double w_row, double w_col, int64_t block) {
  check_inputs({{"a", &a_in}, {"b", &b_in}});
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t n = a.size(0), m = b.size(0), rows = block_rows(n, m, block);
  const auto acc = acc_type(a);
  const auto opts = a.options().dtype(acc);
  const Tensor scale = scale_in.to(opts).reshape({});
  const Tensor row_shift = (lse_r + neg_log(w_row / n)).contiguous();
  Tensor col_shift = at::full({m}, kInf, opts);
  col_shift.narrow(0, offset, n).copy_(lse_c.narrow(0, offset, n) + neg_log(w_col / n));
  Tensor da = at::empty({n, a.size(1)}, opts), db = at::zeros({m, b.size(1)}, opts), dscale = at::zeros({}, opts);
  Tensor buf = at::empty({rows, m}, opts);
  Tensor gbuf = is_half(a) ? at::empty({rows, m}, a.options()) : buf;  // G in the GEMM input dtype
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    Tensor s = buf.narrow(0, 0, r), g = gbuf.narrow(0, 0, r);
    const Tensor a_blk = a.narrow(0, r0, r);
    gemm_nt(s, a_blk, b);
    infonce_grad(s, scale, row_shift.narrow(0, r0, r), col_shift, r0 + offset, (w_row + w_col) / n, g);
    Tensor gb = gemm_nn(g, b, acc);
    dscale += (gb * a_blk.to(acc)).sum();
    da.narrow(0, r0, r).copy_(gb * scale);
    gemm_tn_acc(db, g, a_blk);
  }
  const Tensor gs = grad.to(opts);
  return {(da * gs).to(a.scalar_type()), (db * (scale * gs)).to(b.scalar_type()),
          (dscale * gs).to(scale_in.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> siglip(const Tensor& a_in, const Tensor& b_in,
                                                          const Tensor& scale_in, const Tensor& bias_in,
                                                          int64_t offset, int64_t block, bool with_grad) {
  check_inputs({{"a", &a_in}, {"b", &b_in}});
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t n = a.size(0), m = b.size(0), rows = block_rows(n, m, block);
  const auto acc = acc_type(a);
  const auto opts = a.options().dtype(acc);
  const Tensor scale = scale_in.to(opts).reshape({}), bias = bias_in.to(opts).reshape({});
  Tensor sums = at::zeros({2}, a.options().dtype(at::kDouble));
  Tensor buf = at::empty({rows, m}, opts);
  Tensor gbuf = with_grad ? (is_half(a) ? at::empty({rows, m}, a.options()) : at::empty({rows, m}, opts)) : Tensor();
  Tensor da, db, dscale;
  if (with_grad) {
    da = at::empty({n, a.size(1)}, opts);
    db = at::zeros({m, b.size(1)}, opts);
    dscale = at::zeros({}, opts);
  }
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    Tensor s = buf.narrow(0, 0, r);
    const Tensor a_blk = a.narrow(0, r0, r);
    gemm_nt(s, a_blk, b);
    if (!with_grad) {
      siglip_block(s, scale, bias, r0 + offset, 1.0 / n, sums, c10::nullopt);
      continue;
    }
    Tensor g = gbuf.narrow(0, 0, r);
    siglip_block(s, scale, bias, r0 + offset, 1.0 / n, sums, g);
    Tensor gb = gemm_nn(g, b, acc);
    dscale += (gb * a_blk.to(acc)).sum();
    da.narrow(0, r0, r).copy_(gb * scale);
    gemm_tn_acc(db, g, a_blk);
  }
  Tensor pos = (a.to(acc) * b.narrow(0, offset, n).to(acc)).sum(1) * scale + bias;
  Tensor loss = ((sums[0].to(acc) - pos.sum()) / n).to(a.scalar_type());
  if (!with_grad) {
    Tensor empty = at::empty({0}, a.options());
    return {loss, empty, empty.clone(), empty.clone(), empty.clone()};
  }
  return {loss, da.to(a.scalar_type()), (db * scale).to(b.scalar_type()), dscale.to(scale_in.scalar_type()),
          sums[1].to(bias_in.scalar_type())};
}

std::tuple<Tensor, Tensor> topk(const Tensor& q_in, const Tensor& k_in, int64_t k, int64_t block) {
  check_inputs({{"queries", &q_in}, {"keys", &k_in}});
  const Tensor q = q_in.contiguous(), keys = k_in.contiguous();
  const int64_t n = q.size(0), m = keys.size(0), rows = block_rows(n, m, block);
  const auto opts = q.options().dtype(acc_type(q));
  Tensor scores = at::empty({n, k}, q.options()), indices = at::empty({n, k}, q.options().dtype(at::kLong));
  Tensor buf = at::empty({rows, m}, opts);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    Tensor s = buf.narrow(0, 0, r);
    gemm_nt(s, q.narrow(0, r0, r), keys);
    auto [vals, idx] = at::topk(s, k, 1);
    scores.narrow(0, r0, r).copy_(vals);
    indices.narrow(0, r0, r).copy_(idx);
  }
  return {scores, indices};
}

}  // namespace

// Defined in similarity_kd.cpp.
std::tuple<Tensor, Tensor> kd_fwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, double, double, double, c10::string_view, int64_t);
std::tuple<Tensor, Tensor, Tensor> kd_bwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, const Tensor&, const Tensor&, double, double, double, int64_t);

}  // namespace distill_sim

TORCH_LIBRARY(distill_cuda, m) {
  m.def("infonce_fwd(Tensor a, Tensor b, Tensor scale, int offset, float w_row, float w_col, int block)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("infonce_bwd(Tensor grad, Tensor a, Tensor b, Tensor scale, Tensor lse_r, Tensor lse_c, int offset,"
        " float w_row, float w_col, int block) -> (Tensor, Tensor, Tensor)");
  m.def("siglip(Tensor a, Tensor b, Tensor scale, Tensor bias, int offset, int block, bool with_grad)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("kd_fwd(Tensor a, Tensor b, Tensor ta, Tensor tb, Tensor scale, Tensor teacher_scale, float w_row,"
        " float w_col, float contrastive_weight, str kind, int block) -> (Tensor, Tensor)");
  m.def("kd_bwd(Tensor grad, Tensor a, Tensor b, Tensor ta, Tensor tb, Tensor scale, Tensor teacher_scale,"
        " Tensor stats, float w_row, float w_col, float contrastive_weight, int block) -> (Tensor, Tensor, Tensor)");
  m.def("topk(Tensor queries, Tensor keys, int k, int block) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(distill_cuda, CUDA, m) {
  m.impl("infonce_fwd", &distill_sim::infonce_fwd);
  m.impl("infonce_bwd", &distill_sim::infonce_bwd);
  m.impl("siglip", &distill_sim::siglip);
  m.impl("kd_fwd", &distill_sim::kd_fwd);
  m.impl("kd_bwd", &distill_sim::kd_bwd);
  m.impl("topk", &distill_sim::topk);
}
