// Similarity engine, CUDA backend: host loops of the teacher-student KD op (see tiled_kd.py).
//
// Per row block: two GEMMs (student S, teacher T), one fused row kernel and one column pass for
// the forward; the backward recomputes S and T and forms
// G = w_row/N ((1+c) P_s - P_t) + w_col/M ((1+c) Q_s - Q_t) - c (w_row/N + w_col/M) I
// in one kernel (weights folded into the exponent shifts), then dA = s G B and dB += s G^T A.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>

#include "similarity.h"

namespace distill_sim {
namespace {

using at::Tensor;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kBlockElements = int64_t(1) << 24;  // two buffers: 2 x 64 MiB fp32

at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
bool is_half(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }
double neg_log(double w) { return w == 0.0 ? kInf : -std::log(w); }

int64_t block_rows(int64_t n, int64_t m, int64_t block) {
  if (block > 0) return std::min(block, n);
  return std::max<int64_t>(1, std::min<int64_t>(n, kBlockElements / std::max<int64_t>(m, 1)));
}

void gemm_nt(Tensor& out, const Tensor& a_blk, const Tensor& b) {
  if (a_blk.scalar_type() == out.scalar_type()) at::mm_out(out, a_blk, b.t());
  else at::mm_out(out, a_blk, b.t(), out.scalar_type());
}

void check_kd(const Tensor& a, const Tensor& b, const Tensor& ta, const Tensor& tb) {
  const std::pair<const char*, const Tensor*> named[] = {{"a", &a}, {"b", &b}, {"ta", &ta}, {"tb", &tb}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->is_cuda() && t->dim() == 2, "distill_cuda.kd: ", name, " must be a 2-D CUDA tensor");
    TORCH_CHECK(t->device() == a.device() && t->scalar_type() == a.scalar_type(), "distill_cuda.kd: ", name,
                " must match a's device and dtype (", a.device(), ", ", a.scalar_type(), ")");
  }
  TORCH_CHECK(a.size(0) == ta.size(0) && b.size(0) == tb.size(0), "distill_cuda.kd: teacher rows must match student");
}

}  // namespace

std::tuple<Tensor, Tensor> kd_fwd(const Tensor& a_in, const Tensor& b_in, const Tensor& ta_in, const Tensor& tb_in,
                                  const Tensor& scale_in, const Tensor& tscale_in, double w_row, double w_col,
                                  double cw, c10::string_view kind, int64_t block) {
  check_kd(a_in, b_in, ta_in, tb_in);
  const bool kl = std::string(kind) == "kl";
  const Tensor a = a_in.contiguous(), b = b_in.contiguous(), ta = ta_in.contiguous(), tb = tb_in.contiguous();
  const int64_t n = a.size(0), m = b.size(0), rows = block_rows(n, m, block);
  const auto opts = a.options().dtype(acc_type(a));
  const Tensor scale = scale_in.to(opts).reshape({}), tscale = tscale_in.to(opts).reshape({});
  Tensor row_stats = at::empty({3, n}, opts);  // student lse, teacher lse, teacher-weighted x
  Tensor cols = at::zeros({5, m}, opts);
  cols[0].fill_(-kInf);
  cols[2].fill_(-kInf);
  Tensor buf_s = at::empty({rows, m}, opts), buf_t = at::empty({rows, m}, opts);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    Tensor s = buf_s.narrow(0, 0, r), t = buf_t.narrow(0, 0, r);
    gemm_nt(s, a.narrow(0, r0, r), b);
    gemm_nt(t, ta.narrow(0, r0, r), tb);
    Tensor block_rows_out = at::empty({3, r}, opts);
    kd_rows(s, t, scale, tscale, kl, block_rows_out);
    row_stats.narrow(1, r0, r).copy_(block_rows_out);
    kd_cols_update(s, t, scale, tscale, kl, cols);
  }
  const Tensor lse_s = row_stats[0], lse_t = row_stats[1];
  const Tensor lse_sc = cols[1].log() + cols[0], lse_tc = cols[3].log() + cols[2];
  Tensor row_terms = row_stats[2] + lse_s, col_terms = cols[4] / cols[3] + lse_sc;
  if (kl) {
    row_terms = row_terms - lse_t;
    col_terms = col_terms - lse_tc;
  }
  Tensor loss = w_row * row_terms.mean() + w_col * col_terms.mean();
  if (cw != 0.0) {
    Tensor pos = (a.to(opts.dtype()) * b.to(opts.dtype())).sum(1) * scale;
    loss = loss + cw * (w_row * (lse_s - pos).mean() + w_col * (lse_sc - pos).mean());
  }
  Tensor stats = at::full({4, std::max(n, m)}, kInf, opts);
  stats[0].narrow(0, 0, n).copy_(lse_s);
  stats[1].narrow(0, 0, n).copy_(lse_t);
  stats[2].narrow(0, 0, m).copy_(lse_sc);
  stats[3].narrow(0, 0, m).copy_(lse_tc);
  return {loss.to(a.scalar_type()), stats};
}

std::tuple<Tensor, Tensor, Tensor> kd_bwd(const Tensor& grad, const Tensor& a_in, const Tensor& b_in,
                                          const Tensor& ta_in, const Tensor& tb_in, const Tensor& scale_in,
                                          const Tensor& tscale_in, const Tensor& stats, double w_row, double w_col,
                                          double cw, int64_t block) {
  check_kd(a_in, b_in, ta_in, tb_in);
  const Tensor a = a_in.contiguous(), b = b_in.contiguous(), ta = ta_in.contiguous(), tb = tb_in.contiguous();
  const int64_t n = a.size(0), m = b.size(0), rows = block_rows(n, m, block);
  const auto acc = acc_type(a);
  const auto opts = a.options().dtype(acc);
  const Tensor scale = scale_in.to(opts).reshape({}), tscale = tscale_in.to(opts).reshape({});
  const Tensor s_row = stats[0].narrow(0, 0, n) + neg_log(w_row * (1 + cw) / n);
  const Tensor t_row = stats[1].narrow(0, 0, n) + neg_log(w_row / n);
  const Tensor col_shifts = at::stack({stats[2].narrow(0, 0, m) + neg_log(w_col * (1 + cw) / m),
                                       stats[3].narrow(0, 0, m) + neg_log(w_col / m)}).contiguous();
  const double diag_sub = cw * (w_row / n + w_col / m);
  Tensor da = at::empty({n, a.size(1)}, opts), db = at::zeros({m, b.size(1)}, opts), dscale = at::zeros({}, opts);
  Tensor buf_s = at::empty({rows, m}, opts), buf_t = at::empty({rows, m}, opts);
  Tensor gbuf = is_half(a) ? at::empty({rows, m}, a.options()) : buf_s;  // G overwrites S in fp32/fp64
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    Tensor s = buf_s.narrow(0, 0, r), t = buf_t.narrow(0, 0, r), g = gbuf.narrow(0, 0, r);
    const Tensor a_blk = a.narrow(0, r0, r);
    gemm_nt(s, a_blk, b);
    gemm_nt(t, ta.narrow(0, r0, r), tb);
    const Tensor row_shifts = at::stack({s_row.narrow(0, r0, r), t_row.narrow(0, r0, r)}).contiguous();
    kd_grad(s, t, scale, tscale, row_shifts, col_shifts, r0, diag_sub, g);
    Tensor gb = g.scalar_type() == acc ? at::mm(g, b) : at::mm(g, b, acc);
    dscale += (gb * a_blk.to(acc)).sum();
    da.narrow(0, r0, r).copy_(gb * scale);
    if (g.scalar_type() == acc) db.addmm_(g.t(), a_blk);
    else at::addmm_out(db, db, g.t(), a_blk, acc);
  }
  const Tensor gs = grad.to(opts);
  return {(da * gs).to(a.scalar_type()), (db * (scale * gs)).to(b.scalar_type()),
          (dscale * gs).to(scale_in.scalar_type())};
}

}  // namespace distill_sim
