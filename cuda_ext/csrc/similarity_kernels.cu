// Fused epilogue kernels of the similarity engine (see similarity.h).
//
// S blocks are fp32 (fp64 for fp64 inputs). Row statistics use one thread block per row with an
// online (max, sum-exp) per thread and a shuffle reduction; column statistics use one thread per
// column over a slice of rows (grid.y slices), whose partials are merged into the running column
// state by a second kernel, so no atomics touch (max, sum) pairs. Gradient kernels write G in the
// GEMM input type (bf16/fp16 for half inputs) for the tensor-core GEMMs that follow.
#include "similarity.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace distill_sim {
namespace {

constexpr int kThreads = 256;
constexpr int kColSplits = 16;  // row slices per column pass: M threads alone under-fill a GPU

__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() { return -INFINITY; }

// Store an accumulator value as the gradient type (implicit half conversions are disabled by torch).
template <typename G, typename T>
__device__ __forceinline__ G to_out(T v) { return static_cast<G>(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16, float>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half to_out<__half, float>(float v) { return __float2half(v); }

// Online softmax state: max m and sum s of exp(v - m). Merge handles empty (-inf) states.
template <typename T>
__device__ __forceinline__ void merge(T& m, T& s, T m2, T s2) {
  if (m2 == neg_inf<T>()) return;
  if (m == neg_inf<T>()) { m = m2; s = s2; return; }
  if (m2 > m) { s = s * ex(m - m2) + s2; m = m2; } else { s += s2 * ex(m2 - m); }
}

// Same with a weighted sum d of exp(v - m) * x carried along.
template <typename T>
__device__ __forceinline__ void merge3(T& m, T& s, T& d, T m2, T s2, T d2) {
  if (m2 == neg_inf<T>()) return;
  if (m == neg_inf<T>()) { m = m2; s = s2; d = d2; return; }
  if (m2 > m) { T f = ex(m - m2); s = s * f + s2; d = d * f + d2; m = m2; }
  else { T f = ex(m2 - m); s += s2 * f; d += d2 * f; }
}

template <typename T>
__device__ __forceinline__ void push(T& m, T& s, T v) {
  if (v > m) { s = s * ex(m - v) + T(1); m = v; } else { s += ex(v - m); }
}

template <typename T>
__device__ __forceinline__ void push3(T& m, T& s, T& d, T v, T x) {
  if (v > m) { T f = ex(m - v); s = s * f + T(1); d = d * f + x; m = v; }
  else { T e = ex(v - m); s += e; d += e * x; }
}

// Block-wide reduction of (m, s[, d]) into thread 0. blockDim.x == kThreads.
template <typename T, bool kWithD>
__device__ void block_merge(T& m, T& s, T& d) {
  for (int off = 16; off > 0; off >>= 1) {
    T m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    if (kWithD) { T d2 = __shfl_xor_sync(0xffffffffu, d, off); merge3(m, s, d, m2, s2, d2); }
    else merge(m, s, m2, s2);
  }
  __shared__ T sm[32], ss[32], sd[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sm[warp] = m; ss[warp] = s; sd[warp] = kWithD ? d : T(0); }
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / 32;
    m = lane < nwarps ? sm[lane] : neg_inf<T>();
    s = lane < nwarps ? ss[lane] : T(0);
    d = lane < nwarps ? sd[lane] : T(0);
    for (int off = 16; off > 0; off >>= 1) {
      T m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
      if (kWithD) { T d2 = __shfl_xor_sync(0xffffffffu, d, off); merge3(m, s, d, m2, s2, d2); }
      else merge(m, s, m2, s2);
    }
  }
}

template <typename T>
__device__ T block_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __shared__ T part[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = (warp == 0 && lane < blockDim.x / 32) ? part[lane] : T(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__global__ void row_lse_kernel(const T* __restrict__ S, int64_t M, const T* __restrict__ scale, T* __restrict__ out) {
  const T* row = S + blockIdx.x * M;
  const T sc = *scale;
  T m = neg_inf<T>(), s = T(0), d = T(0);
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) push(m, s, sc * row[j]);
  block_merge<T, false>(m, s, d);
  if (threadIdx.x == 0) out[blockIdx.x] = m + lg(s);
}

template <typename T>
__global__ void col_partial_kernel(const T* __restrict__ S, int64_t R, int64_t M, int64_t rows_per_split,
                                   const T* __restrict__ scale, T* __restrict__ pm, T* __restrict__ ps) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= M) return;
  const int64_t r0 = blockIdx.y * rows_per_split, r1 = min(R, r0 + rows_per_split);
  const T sc = *scale;
  T m = neg_inf<T>(), s = T(0);
  for (int64_t r = r0; r < r1; ++r) push(m, s, sc * S[r * M + j]);  // coalesced across threads
  pm[blockIdx.y * M + j] = m;
  ps[blockIdx.y * M + j] = s;
}

template <typename T>
__global__ void col_merge_kernel(const T* __restrict__ pm, const T* __restrict__ ps, int splits, int64_t M,
                                 T* __restrict__ col_max, T* __restrict__ col_sum) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= M) return;
  T m = col_max[j], s = col_sum[j];
  for (int y = 0; y < splits; ++y) merge(m, s, pm[y * M + j], ps[y * M + j]);
  col_max[j] = m;
  col_sum[j] = s;
}

template <typename T, typename G>
__global__ void infonce_grad_kernel(const T* __restrict__ S, int64_t R, int64_t M, const T* __restrict__ scale,
                                    const T* __restrict__ row_shift, const T* __restrict__ col_shift,
                                    int64_t diag_col0, T diag_sub, G* __restrict__ out) {
  const T sc = *scale;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < R * M;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / M, j = idx - i * M;
    const T z = sc * S[idx];
    T g = ex(z - row_shift[i]) + ex(z - col_shift[j]);
    if (j == i + diag_col0) g -= diag_sub;
    out[idx] = to_out<G>(g);
  }
}

template <typename T, typename G>
__global__ void siglip_kernel(const T* __restrict__ S, int64_t R, int64_t M, const T* __restrict__ scale,
                              const T* __restrict__ bias, int64_t diag_col0, T inv_n, double* __restrict__ sums,
                              G* __restrict__ out) {
  const T sc = *scale, bi = *bias;
  T loss = T(0), gsum = T(0);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < R * M;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T z = sc * S[idx] + bi;
    loss += z > T(20) ? z : log1p(ex(z));  // softplus
    if (out != nullptr) {
      const int64_t i = idx / M, j = idx - i * M;
      T g = T(1) / (T(1) + ex(-z));
      if (j == i + diag_col0) g -= T(1);
      g *= inv_n;
      gsum += g;
      out[idx] = to_out<G>(g);
    }
  }
  loss = block_sum(loss);
  __syncthreads();
  gsum = block_sum(gsum);
  if (threadIdx.x == 0) {
    atomicAdd(sums, static_cast<double>(loss));
    atomicAdd(sums + 1, static_cast<double>(gsum));
  }
}

template <typename T>
__global__ void kd_rows_kernel(const T* __restrict__ S, const T* __restrict__ Tt, int64_t M, const T* __restrict__ scale,
                               const T* __restrict__ tscale, bool kl, int64_t R, T* __restrict__ out) {
  const T* srow = S + blockIdx.x * M;
  const T* trow = Tt + blockIdx.x * M;
  const T sc = *scale, tsc = *tscale;
  T ms = neg_inf<T>(), ss = T(0), unused = T(0), mt = neg_inf<T>(), st = T(0), dt = T(0);
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    const T zs = sc * srow[j], zt = tsc * trow[j];
    push(ms, ss, zs);
    push3(mt, st, dt, zt, kl ? zt - zs : -zs);
  }
  block_merge<T, false>(ms, ss, unused);
  __syncthreads();
  block_merge<T, true>(mt, st, dt);
  if (threadIdx.x == 0) {
    out[blockIdx.x] = ms + lg(ss);
    out[R + blockIdx.x] = mt + lg(st);
    out[2 * R + blockIdx.x] = dt / st;
  }
}

// Partials per column and row slice: (5, splits, M) = student m, s; teacher m, s, d.
template <typename T>
__global__ void kd_col_partial_kernel(const T* __restrict__ S, const T* __restrict__ Tt, int64_t R, int64_t M,
                                      int64_t rows_per_split, const T* __restrict__ scale,
                                      const T* __restrict__ tscale, bool kl, T* __restrict__ part) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= M) return;
  const int64_t r0 = blockIdx.y * rows_per_split, r1 = min(R, r0 + rows_per_split);
  const T sc = *scale, tsc = *tscale;
  T ms = neg_inf<T>(), ss = T(0), mt = neg_inf<T>(), st = T(0), dt = T(0);
  for (int64_t r = r0; r < r1; ++r) {
    const T zs = sc * S[r * M + j], zt = tsc * Tt[r * M + j];
    push(ms, ss, zs);
    push3(mt, st, dt, zt, kl ? zt - zs : -zs);
  }
  const int64_t plane = static_cast<int64_t>(gridDim.y) * M, at = blockIdx.y * M + j;
  part[at] = ms; part[plane + at] = ss; part[2 * plane + at] = mt; part[3 * plane + at] = st; part[4 * plane + at] = dt;
}

template <typename T>
__global__ void kd_col_merge_kernel(const T* __restrict__ part, int splits, int64_t M, T* __restrict__ cols) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= M) return;
  const int64_t plane = splits * M;
  T ms = cols[j], ss = cols[M + j], mt = cols[2 * M + j], st = cols[3 * M + j], dt = cols[4 * M + j];
  for (int y = 0; y < splits; ++y) {
    const int64_t at = y * M + j;
    merge(ms, ss, part[at], part[plane + at]);
    merge3(mt, st, dt, part[2 * plane + at], part[3 * plane + at], part[4 * plane + at]);
  }
  cols[j] = ms; cols[M + j] = ss; cols[2 * M + j] = mt; cols[3 * M + j] = st; cols[4 * M + j] = dt;
}

template <typename T, typename G>
__global__ void kd_grad_kernel(const T* __restrict__ S, const T* __restrict__ Tt, int64_t R, int64_t M,
                               const T* __restrict__ scale, const T* __restrict__ tscale,
                               const T* __restrict__ row_shifts, const T* __restrict__ col_shifts,
                               int64_t diag_col0, T diag_sub, G* __restrict__ out) {
  const T sc = *scale, tsc = *tscale;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < R * M;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / M, j = idx - i * M;
    const T zs = sc * S[idx], zt = tsc * Tt[idx];
    T g = ex(zs - row_shifts[i]) + ex(zs - col_shifts[j]) - ex(zt - row_shifts[R + i]) - ex(zt - col_shifts[M + j]);
    if (j == i + diag_col0) g -= diag_sub;
    out[idx] = to_out<G>(g);
  }
}

int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(blocks, 65536));
}

dim3 col_grid(int64_t M, int64_t R, int64_t* rows_per_split, int* splits) {
  *splits = static_cast<int>(std::min<int64_t>(kColSplits, R));
  *rows_per_split = (R + *splits - 1) / *splits;
  return dim3(static_cast<unsigned>((M + kThreads - 1) / kThreads), static_cast<unsigned>(*splits));
}

// Runs fn.template operator()<scalar_t, grad_t>() for the (accumulator, gradient) type pair.
template <typename Fn>
void dispatch_grad(const at::Tensor& S, const at::Tensor& G, Fn&& fn) {
  const auto s = S.scalar_type(), g = G.scalar_type();
  if (s == at::kDouble && g == at::kDouble) fn(double(), double());
  else if (s == at::kFloat && g == at::kFloat) fn(float(), float());
  else if (s == at::kFloat && g == at::kBFloat16) fn(float(), __nv_bfloat16());
  else if (s == at::kFloat && g == at::kHalf) fn(float(), __half());
  else TORCH_CHECK(false, "distill_cuda: unsupported block/gradient dtypes ", s, "/", g);
}

void check_block(const at::Tensor& S) {
  TORCH_CHECK(S.is_cuda() && S.is_contiguous() && S.dim() == 2, "distill_cuda: S must be a contiguous CUDA matrix");
  TORCH_CHECK(S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble, "distill_cuda: S must be fp32/fp64");
}

}  // namespace

void row_lse(const at::Tensor& S, const at::Tensor& scale, at::Tensor lse_out) {
  check_block(S);
  const c10::cuda::CUDAGuard guard(S.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "row_lse", [&] {
    row_lse_kernel<scalar_t><<<S.size(0), kThreads, 0, stream>>>(
        S.data_ptr<scalar_t>(), S.size(1), scale.data_ptr<scalar_t>(), lse_out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void col_lse_update(const at::Tensor& S, const at::Tensor& scale, at::Tensor col_max, at::Tensor col_sum) {
  check_block(S);
  const c10::cuda::CUDAGuard guard(S.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t R = S.size(0), M = S.size(1);
  int64_t rows_per_split;
  int splits;
  const dim3 grid = col_grid(M, R, &rows_per_split, &splits);
  auto part = at::empty({2, splits, M}, S.options());
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "col_lse_update", [&] {
    scalar_t* pm = part.data_ptr<scalar_t>();
    col_partial_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        S.data_ptr<scalar_t>(), R, M, rows_per_split, scale.data_ptr<scalar_t>(), pm, pm + splits * M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    col_merge_kernel<scalar_t><<<grid.x, kThreads, 0, stream>>>(
        pm, pm + splits * M, splits, M, col_max.data_ptr<scalar_t>(), col_sum.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void infonce_grad(const at::Tensor& S, const at::Tensor& scale, const at::Tensor& row_shift,
                  const at::Tensor& col_shift, int64_t diag_col0, double diag_sub, at::Tensor G) {
  check_block(S);
  const c10::cuda::CUDAGuard guard(S.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t R = S.size(0), M = S.size(1);
  dispatch_grad(S, G, [&](auto t_tag, auto g_tag) {
    using T = decltype(t_tag);
    using Gt = decltype(g_tag);
    infonce_grad_kernel<T, Gt><<<grid_for(R * M), kThreads, 0, stream>>>(
        S.data_ptr<T>(), R, M, scale.data_ptr<T>(), row_shift.data_ptr<T>(), col_shift.data_ptr<T>(), diag_col0,
        static_cast<T>(diag_sub), reinterpret_cast<Gt*>(G.data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void siglip_block(const at::Tensor& S, const at::Tensor& scale, const at::Tensor& bias, int64_t diag_col0,
                  double inv_n, at::Tensor sums, c10::optional<at::Tensor> G) {
  check_block(S);
  const c10::cuda::CUDAGuard guard(S.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t R = S.size(0), M = S.size(1);
  const at::Tensor grad_buf = G.has_value() ? *G : S;  // only its dtype is used when G is absent
  dispatch_grad(S, grad_buf, [&](auto t_tag, auto g_tag) {
    using T = decltype(t_tag);
    using Gt = decltype(g_tag);
    siglip_kernel<T, Gt><<<grid_for(R * M), kThreads, 0, stream>>>(
        S.data_ptr<T>(), R, M, scale.data_ptr<T>(), bias.data_ptr<T>(), diag_col0, static_cast<T>(inv_n),
        sums.data_ptr<double>(), G.has_value() ? reinterpret_cast<Gt*>(G->data_ptr()) : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kd_rows(const at::Tensor& S, const at::Tensor& T, const at::Tensor& scale, const at::Tensor& tscale, bool kl,
             at::Tensor out) {
  check_block(S);
  const c10::cuda::CUDAGuard guard(S.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "kd_rows", [&] {
    kd_rows_kernel<scalar_t><<<S.size(0), kThreads, 0, stream>>>(
        S.data_ptr<scalar_t>(), T.data_ptr<scalar_t>(), S.size(1), scale.data_ptr<scalar_t>(),
        tscale.data_ptr<scalar_t>(), kl, S.size(0), out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kd_cols_update(const at::Tensor& S, const at::Tensor& T, const at::Tensor& scale, const at::Tensor& tscale,
                    bool kl, at::Tensor cols) {
  check_block(S);
  const c10::cuda::CUDAGuard guard(S.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t R = S.size(0), M = S.size(1);
  int64_t rows_per_split;
  int splits;
  const dim3 grid = col_grid(M, R, &rows_per_split, &splits);
  auto part = at::empty({5, splits, M}, S.options());
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "kd_cols_update", [&] {
    kd_col_partial_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        S.data_ptr<scalar_t>(), T.data_ptr<scalar_t>(), R, M, rows_per_split, scale.data_ptr<scalar_t>(),
        tscale.data_ptr<scalar_t>(), kl, part.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    kd_col_merge_kernel<scalar_t><<<grid.x, kThreads, 0, stream>>>(part.data_ptr<scalar_t>(), splits, M,
                                                                   cols.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kd_grad(const at::Tensor& S, const at::Tensor& T, const at::Tensor& scale, const at::Tensor& tscale,
             const at::Tensor& row_shifts, const at::Tensor& col_shifts, int64_t diag_col0, double diag_sub,
             at::Tensor G) {
  check_block(S);
  const c10::cuda::CUDAGuard guard(S.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t R = S.size(0), M = S.size(1);
  dispatch_grad(S, G, [&](auto t_tag, auto g_tag) {
    using Tt = decltype(t_tag);
    using Gt = decltype(g_tag);
    kd_grad_kernel<Tt, Gt><<<grid_for(R * M), kThreads, 0, stream>>>(
        S.data_ptr<Tt>(), T.data_ptr<Tt>(), R, M, scale.data_ptr<Tt>(), tscale.data_ptr<Tt>(),
        row_shifts.data_ptr<Tt>(), col_shifts.data_ptr<Tt>(), diag_col0, static_cast<Tt>(diag_sub),
        reinterpret_cast<Gt*>(G.data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace distill_sim
