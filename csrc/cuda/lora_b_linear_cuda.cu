// CUDA kernels of segpcl::lora_b_linear_{fwd,bwd}.
//
// Forward: the shared ATen forward (cuBLAS GEMMs, fp32 accumulation), path from SEGPCL_LORA_FWD:
// merged (default, y = x (W + s B A)^T + b), concat or addmm; see lora_b_linear_aten.cpp.
// Backward, with g = grad_out (N x out) and u = x A^T (N x r) saved by the forward, path from
// SEGPCL_LORA_BWD:
//   merged (default): grad_x = g (W + s B A), one base-sized cuBLAS GEMM; grad_B = s g^T u.
//   split:            g B (N x r) and g^T u (out x r) as two skinny cuBLAS GEMMs, then
//                     grad_x = addmm(s (g B) A, g, W). The default on the H100 before merged:
//                     2.04x the base linear fwd+bwd in CUDA-event timing (BENCHMARKS.md).
//   fused:            split, with g B and g^T u from one kernel that reads each tile of g once into
//                     shared memory (lora_rank_r_grad_kernel below, fp32 accumulation; ranks <=
//                     kMaxRank, not float64; float64 or larger ranks run split). On an H100 (bf16,
//                     N 25216, 768 -> 3072, r 32) it made fwd+bwd 2.61 ms against 1.40 ms for split.
// (Also tried on the H100: g [W | B] as one GEMM, then addmm(g W, g B, A) on its column slices;
// 2.22x against split's 2.04x the base linear, reverted.)
#include "../lora_b_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace segpcl {
namespace {

constexpr int kRows = 64;      // rows of g per block
constexpr int kCols = 32;      // columns of g per shared-memory tile
constexpr int kMaxRank = 64;   // largest r the fused kernel takes
constexpr int kThreads = 256;
constexpr int kAccPerThread = kRows * kMaxRank / kThreads;  // g B outputs held per thread

// Block (bx, by) owns rows [bx*kRows, +kRows) of g and the column range [o_begin, o_end); it walks
// that range in kCols-wide tiles. Per tile, in shared memory: g tile (kRows x kCols), B tile
// (kCols x r), and the block's rows of u (kRows x r, loaded once). From the same tile it adds
//   g_tile B_tile   into the block's register accumulators for g B (rows x r)
//   g_tile^T u_rows into grad_B (kCols x r), atomically (blocks along N share those rows)
// At the end the g B accumulators are added atomically into gB (blocks along out share rows).
// Both outputs are fp32 and must be zero-initialised.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    lora_rank_r_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ B,
                            const scalar_t* __restrict__ u, float* __restrict__ gB, float* __restrict__ grad_B,
                            int64_t n_rows, int64_t n_out, int rank, int64_t cols_per_block, bool want_gB,
                            bool want_grad_B) {
  extern __shared__ float smem[];
  float* u_s = smem;                  // kRows x rank
  float* g_s = u_s + kRows * rank;    // kRows x kCols
  float* b_s = g_s + kRows * kCols;   // kCols x rank
  const int tid = threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t o_begin = static_cast<int64_t>(blockIdx.y) * cols_per_block;
  const int64_t o_end = (o_begin + cols_per_block < n_out) ? o_begin + cols_per_block : n_out;

  for (int i = tid; i < kRows * rank; i += kThreads) {
    const int64_t n = n0 + i / rank;
    u_s[i] = n < n_rows ? static_cast<float>(u[n * rank + i % rank]) : 0.f;
  }
  float acc[kAccPerThread];
#pragma unroll
  for (int k = 0; k < kAccPerThread; ++k) acc[k] = 0.f;

  for (int64_t o0 = o_begin; o0 < o_end; o0 += kCols) {
    __syncthreads();  // the previous tile is consumed (and u_s is loaded, on the first pass)
    for (int i = tid; i < kRows * kCols; i += kThreads) {
      const int64_t n = n0 + i / kCols, o = o0 + i % kCols;
      g_s[i] = (n < n_rows && o < o_end) ? static_cast<float>(g[n * n_out + o]) : 0.f;
    }
    for (int i = tid; i < kCols * rank; i += kThreads) {
      const int64_t o = o0 + i / rank;
      b_s[i] = o < o_end ? static_cast<float>(B[o * rank + i % rank]) : 0.f;
    }
    __syncthreads();
    if (want_gB) {
#pragma unroll
      for (int k = 0; k < kAccPerThread; ++k) {
        const int i = tid + k * kThreads;
        if (i < kRows * rank) {
          const int row = i / rank, j = i % rank;
          float s = 0.f;
#pragma unroll 8
          for (int c = 0; c < kCols; ++c) s += g_s[row * kCols + c] * b_s[c * rank + j];
          acc[k] += s;
        }
      }
    }
    if (want_grad_B) {
      for (int i = tid; i < kCols * rank; i += kThreads) {
        const int c = i / rank, j = i % rank;
        const int64_t o = o0 + c;
        if (o < o_end) {
          float s = 0.f;
#pragma unroll 8
          for (int row = 0; row < kRows; ++row) s += g_s[row * kCols + c] * u_s[row * rank + j];
          atomicAdd(&grad_B[o * rank + j], s);
        }
      }
    }
  }
  if (want_gB) {
#pragma unroll
    for (int k = 0; k < kAccPerThread; ++k) {
      const int i = tid + k * kThreads;
      const int64_t n = n0 + i / rank;
      if (i < kRows * rank && n < n_rows) atomicAdd(&gB[n * rank + i % rank], acc[k]);
    }
  }
}

// s * (a b) in a's dtype: s scales the fp32 accumulator, then one rounding (beta = 0: addmm ignores
// the uninitialised input, NaN and all).
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double s) {
  return at::addmm(at::empty({a.size(0), b.size(1)}, a.options()), a, b, /*beta=*/0.0, /*alpha=*/s);
}

// (g B, g^T u) in fp32, g read once. g (N x out), B (out x r), u (N x r), all contiguous.
std::tuple<at::Tensor, at::Tensor> rank_r_grads_fused(const at::Tensor& g, const at::Tensor& B,
                                                      const at::Tensor& u, bool want_gB, bool want_grad_B) {
  const int64_t n_rows = g.size(0), n_out = g.size(1);
  const int rank = static_cast<int>(B.size(1));
  const auto f32 = g.options().dtype(at::kFloat);
  at::Tensor gB = at::zeros({want_gB ? n_rows : 0, rank}, f32);
  at::Tensor grad_B = at::zeros({want_grad_B ? n_out : 0, rank}, f32);
  if (n_rows == 0 || n_out == 0) return {gB, grad_B};

  // Split the out dimension across blockIdx.y until there are ~2 blocks per SM.
  const int64_t row_blocks = (n_rows + kRows - 1) / kRows;
  const int64_t col_tiles = (n_out + kCols - 1) / kCols;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, g.get_device()));
  const int64_t target = 2 * static_cast<int64_t>(sm_count);
  const int64_t splits = std::min<int64_t>(col_tiles, std::max<int64_t>(1, (target + row_blocks - 1) / row_blocks));
  const int64_t cols_per_block = ((col_tiles + splits - 1) / splits) * kCols;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>((n_out + cols_per_block - 1) / cols_per_block));
  const size_t smem = sizeof(float) * (kRows * rank + kRows * kCols + kCols * rank);
  TORCH_CHECK(row_blocks < (int64_t{1} << 31), "lora_b_linear_bwd: too many rows for one launch");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "lora_rank_r_grad_kernel", [&] {
    lora_rank_r_grad_kernel<scalar_t><<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), gB.data_ptr<float>(),
        grad_B.data_ptr<float>(), n_rows, n_out, rank, cols_per_block, want_gB, want_grad_B);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gB, grad_B};
}

std::tuple<at::Tensor, at::Tensor> lora_b_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                          double scaling) {
  check_lora_b_linear_args(x, weight, bias, lora_A, lora_B);  // before the guard: x on the CPU gets this message
  const c10::cuda::CUDAGuard device_guard(x.device());
  return lora_b_linear_fwd_aten(x, weight, bias, lora_A, lora_B, scaling, fwd_path_from_env());
}

std::tuple<at::Tensor, at::Tensor> lora_b_linear_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& u,
                                                          const at::Tensor& weight, const at::Tensor& lora_A,
                                                          const at::Tensor& lora_B, double scaling,
                                                          bool need_grad_x, bool need_grad_B) {
  check_lora_b_linear_bwd_args(grad_out, u, weight, lora_A, lora_B);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_A.size(0);
  const at::ScalarType dtype = grad_out.scalar_type();
  const at::Tensor g = grad_out.reshape({-1, out}).contiguous();
  const at::Tensor u2 = u.reshape({-1, r}).contiguous();

  const BwdPath path = bwd_path_from_env();
  at::Tensor grad_x = at::empty({0}, g.options());
  at::Tensor s_gB, grad_B = at::empty({0}, g.options());  // s_gB = s (g B), N x r, in dtype
  if (path == BwdPath::kMerged) {
    if (need_grad_B) grad_B = scaled_mm(g.t(), u2, scaling);
    if (need_grad_x) {
      const at::Tensor w = merged_weight(weight, lora_A, lora_B, scaling);  // W + s B A, out x in
      grad_x = at::_unsafe_view(at::mm(g, w), with_last_dim(grad_out, in));
    }
  } else {
    if (path == BwdPath::kFused && r <= kMaxRank && dtype != at::kDouble) {
      // float atomics: the sum order of grad_B and g B varies from run to run
      at::globalContext().alertNotDeterministic("segpcl::lora_b_linear_bwd with SEGPCL_LORA_BWD=fused (CUDA)");
      at::Tensor gB_fp32, grad_B_fp32;  // the kernel's fp32 sums, unscaled: scaled, then rounded once
      std::tie(gB_fp32, grad_B_fp32) = rank_r_grads_fused(g, lora_B.contiguous(), u2, need_grad_x, need_grad_B);
      if (need_grad_B) grad_B = grad_B_fp32.mul_(scaling).to(dtype);
      if (need_grad_x) s_gB = gB_fp32.mul_(scaling).to(dtype);
    } else {
      if (need_grad_x) s_gB = scaled_mm(g, lora_B, scaling);
      if (need_grad_B) grad_B = scaled_mm(g.t(), u2, scaling);
    }
    if (need_grad_x) {
      const at::Tensor low_rank = at::mm(s_gB, lora_A);   // s (g B) A, N x in
      grad_x = at::_unsafe_view(at::addmm(low_rank, g, weight), with_last_dim(grad_out, in));  // + g W, one cuBLAS GEMM
    }
  }
  return {grad_x, grad_B};
}

}  // namespace

TORCH_LIBRARY_IMPL(segpcl, CUDA, m) {
  m.impl("lora_b_linear_fwd", &lora_b_linear_fwd_cuda);
  m.impl("lora_b_linear_bwd", &lora_b_linear_bwd_cuda);
}

}  // namespace segpcl
