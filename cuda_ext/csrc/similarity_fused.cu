// Fused symmetric InfoNCE kernels (FlashAttention manner): logit tiles never leave the chip.
//
// Tiles are 64 x 64 logits, computed by 256 threads (4 x 4 each, rows ty + 16 r, columns tx + 16 c)
// from 32-wide slices of the embeddings staged in shared memory in the accumulator type.
//
// Forward: block (row tile I, column split s) sweeps its column tiles once, keeping an online
// (max, sum) per row in registers; per tile it writes the column (max, sum) over its 64 rows to a
// partial buffer (row_tiles, M) and the positive logits z[i, i + offset] (taken from the same
// dot products as the statistics). A finalize kernel merges rows over splits and columns over
// row tiles: no atomics, so results are deterministic.
//
// Backward: G is formed per tile on chip and multiplied at once with the other side's embeddings.
// Two launches of one kernel: owner = rows of a (dA = G b) and owner = rows of b (dB = G^T a); a
// block owns 64 output rows and a range of the other side's tiles and accumulates into its own
// slice of an fp32 split-K buffer (splits, n_own, D), summed on the host side. Tiles are thus
// recomputed twice in the backward (5 tile GEMMs in all instead of the minimum 4), the price of
// needing neither atomics nor a (N, M) buffer.
#include "similarity_fused.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace distill_sim::fused {
namespace {

constexpr int kTile = 64;             // logits per tile side
constexpr int kK = 32;                // embedding slice per shared-memory stage
constexpr int kPad = kTile + 1;       // shared row stride (avoids bank conflicts on transposed stores)
constexpr int kThreads = 256;         // 16 x 16 threads, 4 x 4 logits each
constexpr int kStage = kK * kPad;     // one staged slice
constexpr int kBlocksPerSm = 2;       // target occupancy when choosing column splits

template <typename T>
__device__ __forceinline__ float to_acc_f(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_acc_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_acc_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename In, typename Acc>
__device__ __forceinline__ Acc to_acc(In v) { return static_cast<Acc>(to_acc_f(v)); }
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) { return v; }

__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }

// Online softmax state (max m, sum s of exp(v - m)); an empty state is (-inf, 0).
template <typename T>
__device__ __forceinline__ void push(T& m, T& s, T v) {
  if (v > m) { s = s * ex(m - v) + T(1); m = v; } else { s += ex(v - m); }
}

template <typename T>
__device__ __forceinline__ void merge(T& m, T& s, T m2, T s2) {
  if (m2 == T(-INFINITY)) return;
  if (m == T(-INFINITY)) { m = m2; s = s2; return; }
  if (m2 > m) { s = s * ex(m - m2) + s2; m = m2; } else { s += s2 * ex(m2 - m); }
}

// sh[k * kPad + r] = X[row0 + r, k0 + k] for a 64 x 32 slice (zero outside the matrix); coalesced reads.
template <typename In, typename Acc>
__device__ __forceinline__ void stage(const In* __restrict__ X, int64_t rows, int64_t row0, int64_t D, int64_t k0,
                                      Acc* __restrict__ sh) {
#pragma unroll
  for (int e = 0; e < kTile * kK / kThreads; ++e) {
    const int idx = threadIdx.x + e * kThreads, r = idx / kK, k = idx % kK;
    const int64_t row = row0 + r, col = k0 + k;
    sh[k * kPad + r] = (row < rows && col < D) ? to_acc<In, Acc>(X[row * D + col]) : Acc(0);
  }
}

// acc[r][c] = X[x0 + ty + 16 r] . Y[y0 + tx + 16 c] (raw dot products). Ends with a barrier.
template <typename In, typename Acc>
__device__ __forceinline__ void tile_dots(const In* __restrict__ X, int64_t nx, int64_t x0, const In* __restrict__ Y,
                                          int64_t ny, int64_t y0, int64_t D, Acc* sx, Acc* sy, Acc (&acc)[4][4]) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = Acc(0);
  for (int64_t k0 = 0; k0 < D; k0 += kK) {
    stage(X, nx, x0, D, k0, sx);
    stage(Y, ny, y0, D, k0, sy);
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kK; ++k) {
      Acc xa[4], yb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        xa[i] = sx[k * kPad + ty + 16 * i];
        yb[i] = sy[k * kPad + tx + 16 * i];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] += xa[r] * yb[c];
    }
    __syncthreads();
  }
}

template <typename In, typename Acc>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const In* __restrict__ A, const In* __restrict__ B, int64_t N, int64_t M, int64_t D,
               const Acc* __restrict__ scale, int64_t offset, int tiles_per_split, Acc* __restrict__ row_m,
               Acc* __restrict__ row_s, Acc* __restrict__ col_m, Acc* __restrict__ col_s, Acc* __restrict__ pos) {
  __shared__ Acc smem[2 * kStage];
  Acc *sx = smem, *sy = smem + kStage;
  Acc *cm = smem, *cs = smem + 16 * kTile;  // column partials reuse the staging area after tile_dots
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col_tiles = (M + kTile - 1) / kTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t t_end = min(col_tiles, t_begin + tiles_per_split);
  const Acc sc = *scale;
  Acc rm[4], rs[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) { rm[r] = Acc(-INFINITY); rs[r] = Acc(0); }
  Acc acc[4][4];
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t j0 = t * kTile;
    tile_dots(A, N, i0, B, M, j0, D, sx, sy, acc);
    Acc cmax[4], csum[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) { cmax[c] = Acc(-INFINITY); csum[c] = Acc(0); }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t i = i0 + ty + 16 * r;
      Acc m = Acc(-INFINITY), s = Acc(0);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t j = j0 + tx + 16 * c;
        if (i >= N || j >= M) continue;
        const Acc z = sc * acc[r][c];
        if (j == i + offset) pos[i] = z;
        push(m, s, z);
        push(cmax[c], csum[c], z);
      }
      // The 16 threads of a row are lanes tx = 0..15 of one half-warp: xor-shuffles stay inside it.
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) {
        const Acc m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
        merge(m, s, m2, s2);
      }
      merge(rm[r], rs[r], m, s);
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      cm[ty * kTile + tx + 16 * c] = cmax[c];
      cs[ty * kTile + tx + 16 * c] = csum[c];
    }
    __syncthreads();
    if (threadIdx.x < kTile && j0 + threadIdx.x < M) {
      Acc m = Acc(-INFINITY), s = Acc(0);
      for (int y = 0; y < 16; ++y) merge(m, s, cm[y * kTile + threadIdx.x], cs[y * kTile + threadIdx.x]);
      col_m[blockIdx.x * M + j0 + threadIdx.x] = m;
      col_s[blockIdx.x * M + j0 + threadIdx.x] = s;
    }
    __syncthreads();  // cm/cs alias the staging area of the next tile
  }
  if (tx == 0) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t i = i0 + ty + 16 * r;
      if (i < N) {
        row_m[blockIdx.y * N + i] = rm[r];
        row_s[blockIdx.y * N + i] = rs[r];
      }
    }
  }
}

// lse_r[i] from (splits, N) partials, lse_c[j] from (row_tiles, M) partials.
template <typename Acc>
__global__ void finalize_kernel(const Acc* __restrict__ row_m, const Acc* __restrict__ row_s, int splits, int64_t N,
                                const Acc* __restrict__ col_m, const Acc* __restrict__ col_s, int64_t row_tiles,
                                int64_t M, Acc* __restrict__ lse_r, Acc* __restrict__ lse_c) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < N) {
    Acc m = Acc(-INFINITY), s = Acc(0);
    for (int y = 0; y < splits; ++y) merge(m, s, row_m[y * N + idx], row_s[y * N + idx]);
    lse_r[idx] = m + lg(s);
  }
  if (idx < M) {
    Acc m = Acc(-INFINITY), s = Acc(0);
    for (int64_t y = 0; y < row_tiles; ++y) merge(m, s, col_m[y * M + idx], col_s[y * M + idx]);
    lse_c[idx] = m + lg(s);
  }
}

// kOwnIsRow: X = a (own rows i), Y = b (other j), out = G Y; else X = b (own j), Y = a (other i), out = G^T Y.
template <typename In, typename Acc, bool kOwnIsRow>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const In* __restrict__ X, int64_t nx, const In* __restrict__ Y, int64_t ny, int64_t D,
               const Acc* __restrict__ scale, const Acc* __restrict__ x_shift, const Acc* __restrict__ y_shift,
               int64_t offset, Acc diag_sub, int tiles_per_split, Acc* __restrict__ out,
               Acc* __restrict__ dscale_part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* smem = reinterpret_cast<Acc*>(smem_raw);
  Acc *sx = smem, *sy = smem + kStage;
  Acc* sv = smem;                  // (64 other, 64 d) slice of Y, reuses the staging area
  Acc* gt = smem + 2 * kStage;     // G^T tile: gt[other * kPad + own]
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t y_tiles = (ny + kTile - 1) / kTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t t_end = min(y_tiles, t_begin + tiles_per_split);
  Acc* out_blk = out + static_cast<int64_t>(blockIdx.y) * nx * D;
  const Acc sc = *scale;
  Acc ds = Acc(0), acc[4][4];
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t y0 = t * kTile;
    tile_dots(X, nx, x0, Y, ny, y0, D, sx, sy, acc);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t xi = x0 + ty + 16 * r;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t yj = y0 + tx + 16 * c;
        Acc g = Acc(0);
        if (xi < nx && yj < ny) {
          const Acc z = sc * acc[r][c];
          g = ex(z - x_shift[xi]) + ex(z - y_shift[yj]);
          if (kOwnIsRow ? (yj == xi + offset) : (xi == yj + offset)) g -= diag_sub;
          ds += g * acc[r][c];
        }
        gt[(tx + 16 * c) * kPad + ty + 16 * r] = g;
      }
    }
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
#pragma unroll
      for (int e = 0; e < kTile * kTile / kThreads; ++e) {
        const int idx = threadIdx.x + e * kThreads, k = idx / kTile, d = idx % kTile;
        const int64_t row = y0 + k, col = d0 + d;
        sv[k * kPad + d] = (row < ny && col < D) ? to_acc<In, Acc>(Y[row * D + col]) : Acc(0);
      }
      __syncthreads();  // also publishes gt on the first slice
      Acc o[4][4];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[r][c] = Acc(0);
#pragma unroll 8
      for (int k = 0; k < kTile; ++k) {
        Acc gv[4], yv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          gv[i] = gt[k * kPad + ty + 16 * i];
          yv[i] = sv[k * kPad + tx + 16 * i];
        }
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) o[r][c] += gv[r] * yv[c];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t xi = x0 + ty + 16 * r;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t d = d0 + tx + 16 * c;
          if (xi < nx && d < D) out_blk[xi * D + d] += o[r][c];  // this block owns (split, rows): no race
        }
      }
      __syncthreads();  // sv and gt are rewritten next
    }
  }
  if (dscale_part != nullptr) {
    for (int off = 16; off > 0; off >>= 1) ds += __shfl_xor_sync(0xffffffffu, ds, off);
    __shared__ Acc warp_sums[kThreads / 32];
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = ds;
    __syncthreads();
    if (threadIdx.x == 0) {
      Acc total = Acc(0);
      for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
      dscale_part[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
    }
  }
}

// Column (or other-side) splits so that own_tiles * splits fills the device; every split is non-empty.
void plan_splits(int64_t own_tiles, int64_t other_tiles, int* splits, int* tiles_per_split) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t want = (kBlocksPerSm * static_cast<int64_t>(sms) + own_tiles - 1) / own_tiles;
  const int64_t s = std::max<int64_t>(1, std::min<int64_t>(want, other_tiles));
  const int64_t per = (other_tiles + s - 1) / s;
  *tiles_per_split = static_cast<int>(per);
  *splits = static_cast<int>((other_tiles + per - 1) / per);
}

void check_pair(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), "distill_cuda_fused: a and b must be CUDA tensors");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1),
              "distill_cuda_fused: a and b must be (N, D) and (M, D), got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "distill_cuda_fused: a is ", a.scalar_type(), " but b is ",
              b.scalar_type());
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "distill_cuda_fused: a and b must be contiguous");
}

// Calls fn(In(), Acc()) for the input dtype: half types accumulate in fp32, fp64 in fp64.
template <typename Fn>
void dispatch(const at::Tensor& a, Fn&& fn) {
  switch (a.scalar_type()) {
    case at::kFloat: fn(float(), float()); break;
    case at::kDouble: fn(double(), double()); break;
    case at::kHalf: fn(__half(), float()); break;
    case at::kBFloat16: fn(__nv_bfloat16(), float()); break;
    default: TORCH_CHECK(false, "distill_cuda_fused: unsupported dtype ", a.scalar_type());
  }
}

template <typename In, typename Acc, bool kOwnIsRow>
void launch_bwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& x_shift,
                const at::Tensor& y_shift, int64_t offset, double diag_sub, at::Tensor& out_sum,
                at::Tensor* dscale, cudaStream_t stream) {
  const int64_t nx = x.size(0), ny = y.size(0), D = x.size(1);
  const int64_t x_tiles = (nx + kTile - 1) / kTile, y_tiles = (ny + kTile - 1) / kTile;
  int splits, per;
  plan_splits(x_tiles, y_tiles, &splits, &per);
  const auto opts = x.options().dtype(scale.scalar_type());
  at::Tensor out = at::zeros({splits, nx, D}, opts);
  at::Tensor part = dscale != nullptr ? at::empty({splits * x_tiles}, opts) : at::Tensor();
  const size_t smem = 3 * kStage * sizeof(Acc);
  auto kernel = bwd_kernel<In, Acc, kOwnIsRow>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(x_tiles), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, smem, stream>>>(
      reinterpret_cast<const In*>(x.data_ptr()), nx, reinterpret_cast<const In*>(y.data_ptr()), ny, D,
      scale.data_ptr<Acc>(), x_shift.data_ptr<Acc>(), y_shift.data_ptr<Acc>(), offset, static_cast<Acc>(diag_sub),
      per, out.data_ptr<Acc>(), dscale != nullptr ? part.data_ptr<Acc>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  out_sum = splits == 1 ? out[0] : out.sum(0);
  if (dscale != nullptr) *dscale = part.sum();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_stats(const at::Tensor& a, const at::Tensor& b,
                                                             const at::Tensor& scale, int64_t offset) {
  check_pair(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = a.size(0), M = b.size(0), D = a.size(1);
  const int64_t row_tiles = (N + kTile - 1) / kTile, col_tiles = (M + kTile - 1) / kTile;
  int splits, per;
  plan_splits(row_tiles, col_tiles, &splits, &per);
  const auto opts = a.options().dtype(scale.scalar_type());
  at::Tensor rows = at::empty({2, splits, N}, opts), cols = at::empty({2, row_tiles, M}, opts);
  at::Tensor lse_r = at::empty({N}, opts), lse_c = at::empty({M}, opts), pos = at::empty({N}, opts);
  dispatch(a, [&](auto in_tag, auto acc_tag) {
    using In = decltype(in_tag);
    using Acc = decltype(acc_tag);
    Acc *rp = rows.data_ptr<Acc>(), *cp = cols.data_ptr<Acc>();
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits));
    fwd_kernel<In, Acc><<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<const In*>(a.data_ptr()), reinterpret_cast<const In*>(b.data_ptr()), N, M, D,
        scale.data_ptr<Acc>(), offset, per, rp, rp + splits * N, cp, cp + row_tiles * M, pos.data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t len = std::max(N, M);
    finalize_kernel<Acc><<<static_cast<unsigned>((len + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        rp, rp + splits * N, splits, N, cp, cp + row_tiles * M, row_tiles, M, lse_r.data_ptr<Acc>(),
        lse_c.data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {lse_r, lse_c, pos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_grads(const at::Tensor& a, const at::Tensor& b,
                                                             const at::Tensor& scale, const at::Tensor& row_shift,
                                                             const at::Tensor& col_shift, int64_t offset,
                                                             double diag_sub) {
  check_pair(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor ga, gb, dscale;
  dispatch(a, [&](auto in_tag, auto acc_tag) {
    using In = decltype(in_tag);
    using Acc = decltype(acc_tag);
    launch_bwd<In, Acc, true>(a, b, scale, row_shift, col_shift, offset, diag_sub, ga, &dscale, stream);
    launch_bwd<In, Acc, false>(b, a, scale, col_shift, row_shift, offset, diag_sub, gb, nullptr, stream);
  });
  return {ga, gb, dscale};
}

}  // namespace distill_sim::fused
