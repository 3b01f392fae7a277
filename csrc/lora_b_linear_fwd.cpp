// Forward of the LoRA-B-only linear, shared by the CPU and CUDA kernels (ATen GEMMs: MKL/oneDNN on
// CPU, cuBLAS on CUDA, both accumulating bf16/fp16 products in fp32).
//
//   u = x A^T                      (N x r), returned so autograd saves it instead of x
//   y = x W^T + b + s * u B^T
//
// Default: y is written by the base GEMM and the rank-r update is added in place by a second GEMM
// with beta = 1 (one extra read + write of y, N x out). With allow_k_concat (the CUDA kernel, where
// these passes are memory-bound) and in + r < out (e.g. CLIP's c_fc, 768 -> 3072), the two products
// are instead one GEMM over K-concatenated operands, y = [x | u] [W | sB]^T + b: copying x (N x in)
// moves fewer bytes than the extra pass over y. On CPU (compute-bound) the K = in + r GEMM measured
// slower than base GEMM + in-place update (78 vs 72 ms at N 4096, 768 -> 3072, r 32, 2 cores), so
// the CPU kernel never concatenates.
#include "lora_b_linear.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace segpcl {

std::tuple<at::Tensor, at::Tensor> lora_b_linear_fwd_aten(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                          double scaling, bool allow_k_concat) {
  const auto [in, out, r] = check_lora_b_linear_args(x, weight, bias, lora_A, lora_B);
  // The caller already cast for autocast; keep it from re-casting the GEMMs below.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor x2 = x.reshape({-1, in});
  const at::Tensor u = at::mm(x2, lora_A.t());
  at::Tensor y;
  if (allow_k_concat && in + r < out) {
    const at::Tensor xu = at::cat({x2, u}, 1);
    const at::Tensor wb = at::cat({weight, lora_B * scaling}, 1);
    y = bias.has_value() ? at::addmm(*bias, xu, wb.t()) : at::mm(xu, wb.t());
  } else {
    y = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    y.addmm_(u, lora_B.t(), /*beta=*/1.0, /*alpha=*/scaling);
  }
  return {y.view(with_last_dim(x, out)), u.view(with_last_dim(x, r))};
}

}  // namespace segpcl
