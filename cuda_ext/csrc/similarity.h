// Similarity engine: launchers of the fused epilogue kernels (similarity_kernels.cu).
//
// Every launcher works on one row block S (R, M) of raw dot products a_blk @ b^T, accumulated in
// fp32 (fp64 for fp64 inputs) by cuBLAS; the logit scale/bias are applied inside the kernels, read
// from device scalars so no host sync is needed. Statistics live in O(N + M) vectors.
#pragma once

#include <ATen/ATen.h>

namespace distill_sim {

// lse_out[i] = logsumexp_j(scale * S[i, j]) for the R rows of S.
void row_lse(const at::Tensor& S, const at::Tensor& scale, at::Tensor lse_out);

// Folds the block's columns into running (col_max, col_sum) of scale * S (online softmax).
void col_lse_update(const at::Tensor& S, const at::Tensor& scale, at::Tensor col_max, at::Tensor col_sum);

// G = exp(z - row_shift_i) + exp(z - col_shift_j) - diag_sub * [j == i + diag_col0], z = scale * S.
void infonce_grad(const at::Tensor& S, const at::Tensor& scale, const at::Tensor& row_shift,
                  const at::Tensor& col_shift, int64_t diag_col0, double diag_sub, at::Tensor G);

// sums[0] += sum softplus(z); with G defined: G = (sigmoid(z) - [pos]) * inv_n and sums[1] += sum G.
void siglip_block(const at::Tensor& S, const at::Tensor& scale, const at::Tensor& bias, int64_t diag_col0,
                  double inv_n, at::Tensor sums, c10::optional<at::Tensor> G);

// Per row of the student block S and teacher block T: lse of zs, lse of zt and
// sum_j softmax(zt)_j * x_j with x = zt - zs (kl) or -zs (ce). out: (3, R) rows.
void kd_rows(const at::Tensor& S, const at::Tensor& T, const at::Tensor& scale, const at::Tensor& tscale,
             bool kl, at::Tensor out);

// Running column statistics, cols (5, M): student max, student sum, teacher max, teacher sum,
// teacher-weighted sum of x.
void kd_cols_update(const at::Tensor& S, const at::Tensor& T, const at::Tensor& scale, const at::Tensor& tscale,
                    bool kl, at::Tensor cols);

// G = exp(zs - shifts[0]_i) + exp(zs - shifts[1]_j) - exp(zt - shifts[2]_i) - exp(zt - shifts[3]_j)
//     - diag_sub * [j == i], shifts (4, max(N, M)) already offset to the block's rows.
void kd_grad(const at::Tensor& S, const at::Tensor& T, const at::Tensor& scale, const at::Tensor& tscale,
             const at::Tensor& row_shifts, const at::Tensor& col_shifts, int64_t diag_col0, double diag_sub,
             at::Tensor G);

}  // namespace distill_sim
