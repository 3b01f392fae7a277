// The LoRA-B-only linear in ATen GEMMs (MKL/oneDNN on CPU, cuBLAS on CUDA; bf16/fp16 products
// accumulate in fp32), shared by the CPU and CUDA kernels. Paths (environment, read per call so one
// process can time them all; see lora_b_linear.h):
//
// Forward, always u = x A^T (N x r), returned so autograd saves it instead of x, then
//   merged (default): y = x (W + s B A)^T + b. The rank-r update is folded into the weight
//                     (out x in, O(out in r) work, independent of N), so y costs one base-sized
//                     GEMM and no extra pass over x or y.
//   concat:           y = [x | u] [W | sB]^T + b, one GEMM over K = in + r (copies x once).
//   addmm:            y = x W^T + b, then y += s u B^T in place (one extra read + write of y).
// Backward (in cpu/ and cuda/), with g = grad_out (N x out):
//   merged (default): grad_x = g (W + s B A)            grad_B = s g^T u
//   split:            grad_x = g W + s (g B) A          grad_B = s g^T u
//   fused (CUDA):     split, with g B and g^T u from one kernel that reads g once.
// Merging rounds W + s B A once to x's dtype: in bf16, an update entry below half a unit in the
// last place of W's entry is dropped, the same size of loss as adding a bf16 LoRA output to a bf16
// base output (plain PyTorch, peft); tests/ops/test_lora_linear.py holds the error to the
// reference's. What merging does lose in bf16 is some exactness of differences between two LoRA
// states (y(B2) - y(B1), e.g. a student's drift from its teacher): the unmerged formula's rounding
// of x W^T is the same for both and cancels, the merged weight's is not. Measured (N 512, 768 x 768,
// r 32, CPU, 2026-12-02): relative error of y(B2) - y(B1) 0.101 merged vs 0.072 unmerged at updates
// of 1e-2, 0.98 vs 0.68 at 1e-3; total error against fp64 equal (2.4e-3 / 2.9e-3 both ways).
#include "lora_b_linear.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdlib>
#include <cstring>

namespace segpcl {

namespace {
const char* env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return (value == nullptr || *value == '\0') ? fallback : value;
}
}  // namespace

FwdPath fwd_path_from_env() {
  const char* v = env_or("SEGPCL_LORA_FWD", "merged");
  if (std::strcmp(v, "merged") == 0) return FwdPath::kMerged;
  if (std::strcmp(v, "concat") == 0) return FwdPath::kConcat;
  if (std::strcmp(v, "addmm") == 0) return FwdPath::kAddmm;
  TORCH_CHECK(false, "lora_b_linear: SEGPCL_LORA_FWD='", v, "' is not a forward path; use merged (default), "
              "concat or addmm, or unset it");
}

BwdPath bwd_path_from_env() {
  const char* v = env_or("SEGPCL_LORA_BWD", "merged");
  if (std::strcmp(v, "merged") == 0) return BwdPath::kMerged;
  if (std::strcmp(v, "split") == 0) return BwdPath::kSplit;
  if (std::strcmp(v, "fused") == 0) return BwdPath::kFused;
  TORCH_CHECK(false, "lora_b_linear: SEGPCL_LORA_BWD='", v, "' is not a backward path; use merged (default), "
              "split or fused (CUDA), or unset it");
}

at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                         double scaling) {
  return at::addmm(weight, lora_B, lora_A, /*beta=*/1.0, /*alpha=*/scaling);  // W + s B A, one rounding
}

std::tuple<at::Tensor, at::Tensor> lora_b_linear_fwd_aten(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                          double scaling, FwdPath path) {
  const auto [in, out, r] = check_lora_b_linear_args(x, weight, bias, lora_A, lora_B);
  bwd_path_from_env();  // a bad SEGPCL_LORA_BWD fails here, before any work, not in backward
  // The caller already cast for autocast; keep it from re-casting the GEMMs below.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor x2 = x.reshape({-1, in});
  const at::Tensor u = at::mm(x2, lora_A.t());
  at::Tensor y;
  if (path == FwdPath::kMerged) {
    const at::Tensor w = merged_weight(weight, lora_A, lora_B, scaling);
    y = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  } else if (path == FwdPath::kConcat) {
    const at::Tensor xu = at::cat({x2, u}, 1);
    const at::Tensor wb = at::cat({weight, lora_B * scaling}, 1);
    y = bias.has_value() ? at::addmm(*bias, xu, wb.t()) : at::mm(xu, wb.t());
  } else {
    y = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    y.addmm_(u, lora_B.t(), /*beta=*/1.0, /*alpha=*/scaling);
  }
  // _unsafe_view, not view: a view of an intermediate is flagged by autograd as created inside a custom
  // Function, and an in-place op on y (timm's `qkv += bias`) would then be refused (aten::matmul does the same)
  return {at::_unsafe_view(y, with_last_dim(x, out)), at::_unsafe_view(u, with_last_dim(x, r))};
}

}  // namespace segpcl
