// Similarity engine, fused CUDA backend: op schemas of distill_cuda_fused (same as distill_cuda).
//
// infonce_fwd/infonce_bwd run the on-chip kernels of similarity_fused.cu. The other ops have no
// fused kernel yet and forward to distill_cuda::* through the dispatcher (that library must be
// loaded: cuda_ext/_build.py loads it first), so the namespace offers every op the Python
// registry (_registry.py) registers fakes and autograd for.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "similarity_fused.h"

namespace distill_sim::fused {
namespace {

using at::Tensor;
constexpr double kInf = std::numeric_limits<double>::infinity();

double neg_log(double w) { return w == 0.0 ? kInf : -std::log(w); }

at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const Tensor& a, const Tensor& b, int64_t offset) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), "distill_cuda_fused: a and b must be CUDA tensors, got ", a.device(),
              " and ", b.device());
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "distill_cuda_fused: a and b must be 2-D, got ", a.dim(), "-D and ",
              b.dim(), "-D");
  TORCH_CHECK(a.size(1) == b.size(1), "distill_cuda_fused: a has D=", a.size(1), " but b has D=", b.size(1));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "distill_cuda_fused: a has dtype ", a.scalar_type(),
              " but b has ", b.scalar_type());
  TORCH_CHECK(offset >= 0 && a.size(0) + offset <= b.size(0), "distill_cuda_fused: positives (i, i + offset) need ",
              "N + offset <= M; got N=", a.size(0), ", M=", b.size(0), ", offset=", offset);
}

// `block` is accepted for schema compatibility: the fused kernels use fixed 64 x 64 tiles.
std::tuple<Tensor, Tensor, Tensor> infonce_fwd(const Tensor& a_in, const Tensor& b_in, const Tensor& scale_in,
                                               int64_t offset, double w_row, double w_col, int64_t /*block*/) {
  check_inputs(a_in, b_in, offset);
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t n = a.size(0);
  const Tensor scale = scale_in.to(a.options().dtype(acc_type(a))).reshape({}).contiguous();
  auto [lse_r, lse_c, pos] = infonce_stats(a, b, scale, offset);
  // Per-row terms before the means: lse and pos are both large at a high scale, their difference is not.
  const Tensor per_row = w_row * (lse_r - pos) + w_col * (lse_c.narrow(0, offset, n) - pos);
  return {per_row.mean().to(a.scalar_type()), lse_r, lse_c};
}

std::tuple<Tensor, Tensor, Tensor> infonce_bwd(const Tensor& grad, const Tensor& a_in, const Tensor& b_in,
                                               const Tensor& scale_in, const Tensor& lse_r, const Tensor& lse_c,
                                               int64_t offset, double w_row, double w_col, int64_t /*block*/) {
  check_inputs(a_in, b_in, offset);
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t n = a.size(0), m = b.size(0);
  const auto opts = a.options().dtype(acc_type(a));
  const Tensor scale = scale_in.to(opts).reshape({}).contiguous();
  const Tensor row_shift = (lse_r.to(opts) + neg_log(w_row / n)).contiguous();
  Tensor col_shift = at::full({m}, kInf, opts);  // columns without a positive get no column-softmax term
  col_shift.narrow(0, offset, n).copy_(lse_c.to(opts).narrow(0, offset, n) + neg_log(w_col / n));
  auto [ga, gb, gs] = infonce_grads(a, b, scale, row_shift, col_shift, offset, (w_row + w_col) / n);
  const Tensor g = grad.to(opts);
  return {(ga * (scale * g)).to(a.scalar_type()), (gb * (scale * g)).to(b.scalar_type()),
          (gs * g).to(scale_in.scalar_type())};
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> base_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using SiglipSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                      const Tensor&, int64_t, int64_t, bool);
using KdFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, double, double, double, c10::string_view, int64_t);
using KdBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                                                    double, double, int64_t);
using TopkSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, int64_t);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> siglip(const Tensor& a, const Tensor& b, const Tensor& scale,
                                                          const Tensor& bias, int64_t offset, int64_t block,
                                                          bool with_grad) {
  static const auto op = base_op<SiglipSig>("distill_cuda::siglip");
  return op.call(a, b, scale, bias, offset, block, with_grad);
}

std::tuple<Tensor, Tensor> kd_fwd(const Tensor& a, const Tensor& b, const Tensor& ta, const Tensor& tb,
                                  const Tensor& scale, const Tensor& teacher_scale, double w_row, double w_col,
                                  double contrastive_weight, c10::string_view kind, int64_t block) {
  static const auto op = base_op<KdFwdSig>("distill_cuda::kd_fwd");
  return op.call(a, b, ta, tb, scale, teacher_scale, w_row, w_col, contrastive_weight, kind, block);
}

std::tuple<Tensor, Tensor, Tensor> kd_bwd(const Tensor& grad, const Tensor& a, const Tensor& b, const Tensor& ta,
                                          const Tensor& tb, const Tensor& scale, const Tensor& teacher_scale,
                                          const Tensor& stats, double w_row, double w_col, double contrastive_weight,
                                          int64_t block) {
  static const auto op = base_op<KdBwdSig>("distill_cuda::kd_bwd");
  return op.call(grad, a, b, ta, tb, scale, teacher_scale, stats, w_row, w_col, contrastive_weight, block);
}

std::tuple<Tensor, Tensor> topk(const Tensor& queries, const Tensor& keys, int64_t k, int64_t block) {
  static const auto op = base_op<TopkSig>("distill_cuda::topk");
  return op.call(queries, keys, k, block);
}

}  // namespace
}  // namespace distill_sim::fused

TORCH_LIBRARY(distill_cuda_fused, m) {
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

TORCH_LIBRARY_IMPL(distill_cuda_fused, CUDA, m) {
  m.impl("infonce_fwd", &distill_sim::fused::infonce_fwd);
  m.impl("infonce_bwd", &distill_sim::fused::infonce_bwd);
  m.impl("siglip", &distill_sim::fused::siglip);
  m.impl("kd_fwd", &distill_sim::fused::kd_fwd);
  m.impl("kd_bwd", &distill_sim::fused::kd_bwd);
  m.impl("topk", &distill_sim::fused::topk);
}
