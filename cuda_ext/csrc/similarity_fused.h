// Similarity engine, fused CUDA backend (distill_cuda_fused): launchers of similarity_fused.cu.
//
// Unlike the blocked backend (similarity.h), nothing of size (rows, M) is written: each thread block
// computes 64 x 64 logit tiles from the embeddings in shared memory and keeps them on chip; inputs
// may be fp16/bf16/fp32 (fp32 accumulation) or fp64 (fp64 accumulation).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace distill_sim::fused {

// One sweep over the tiles of z = scale * a @ b^T (a (N, D), b (M, D), scale a 0-d tensor in the
// accumulator dtype). Returns lse_r (N) = logsumexp over each row, lse_c (M) = over each column and
// pos (N) = z[i, i + offset], all in the accumulator dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_stats(const at::Tensor& a, const at::Tensor& b,
                                                             const at::Tensor& scale, int64_t offset);

// Recomputes the tiles and, with G = exp(z - row_shift_i) + exp(z - col_shift_j) - diag_sub [j == i + offset],
// returns (G @ b (N, D), G^T @ a (M, D), sum(G * a @ b^T) 0-d), all in the accumulator dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_grads(const at::Tensor& a, const at::Tensor& b,
                                                             const at::Tensor& scale, const at::Tensor& row_shift,
                                                             const at::Tensor& col_shift, int64_t offset,
                                                             double diag_sub);

}  // namespace distill_sim::fused
