// LoRA-B-only linear: y = x W^T + b + s * (x A^T) B^T, W (out x in), A (r x in), B (out x r).
// Shared argument checks for the CPU and CUDA implementations (see ops.cpp for the schema).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace segpcl {

// Checks shapes, dtypes and devices of the forward arguments; returns {in, out, r}.
inline std::array<int64_t, 3> check_lora_b_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_A,
                                                       const at::Tensor& lora_B) {
  TORCH_CHECK(x.dim() >= 1, "lora_b_linear: x must have at least 1 dimension (..., in), got a 0-d tensor");
  TORCH_CHECK(weight.dim() == 2, "lora_b_linear: weight must be 2-D (out, in), got shape ", weight.sizes());
  TORCH_CHECK(lora_A.dim() == 2, "lora_b_linear: lora_A must be 2-D (r, in), got shape ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2, "lora_b_linear: lora_B must be 2-D (out, r), got shape ", lora_B.sizes());
  const int64_t in = weight.size(1), out = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(r >= 1, "lora_b_linear: lora_A has rank 0 (shape ", lora_A.sizes(), "); the rank must be >= 1");
  TORCH_CHECK(in >= 1 && out >= 1, "lora_b_linear: weight has shape ", weight.sizes(),
              "; a layer needs at least one input and one output feature");
  TORCH_CHECK(x.size(-1) == in, "lora_b_linear: x's last dimension (", x.size(-1),
              ") must equal weight's in-features (", in, ")");
  TORCH_CHECK(lora_A.size(1) == in, "lora_b_linear: lora_A must be (r, in) = (r, ", in, "), got ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == out && lora_B.size(1) == r, "lora_b_linear: lora_B must be (out, r) = (", out,
              ", ", r, "), got ", lora_B.sizes());
  for (const at::Tensor* t : {&weight, &lora_A, &lora_B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "lora_b_linear: all tensors must share x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type(),
                " (cast them; the op does not autocast: ops.lora_b_linear casts under autocast as F.linear does)");
    TORCH_CHECK(t->device() == x.device(), "lora_b_linear: all tensors must be on x's device ", x.device(),
                ", got ", t->device());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "lora_b_linear: bias must be 1-D (out,) = (", out,
                ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "lora_b_linear: bias must share x's dtype and device");
  }
  return {in, out, r};
}

inline void check_lora_b_linear_bwd_args(const at::Tensor& grad_out, const at::Tensor& u,
                                         const at::Tensor& weight, const at::Tensor& lora_A,
                                         const at::Tensor& lora_B) {
  TORCH_CHECK(weight.dim() == 2, "lora_b_linear_bwd: weight must be 2-D (out, in), got shape ", weight.sizes());
  TORCH_CHECK(lora_A.dim() == 2, "lora_b_linear_bwd: lora_A must be 2-D (r, in), got shape ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2, "lora_b_linear_bwd: lora_B must be 2-D (out, r), got shape ", lora_B.sizes());
  const int64_t out = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(r >= 1, "lora_b_linear_bwd: lora_A has rank 0; the rank must be >= 1");
  TORCH_CHECK(lora_A.size(1) == weight.size(1), "lora_b_linear_bwd: lora_A must be (r, in) = (r, ", weight.size(1),
              "), got ", lora_A.sizes());
  TORCH_CHECK(out >= 1 && weight.size(1) >= 1, "lora_b_linear_bwd: weight has shape ", weight.sizes(),
              "; a layer needs at least one input and one output feature");
  TORCH_CHECK(grad_out.dim() >= 1 && u.dim() >= 1, "lora_b_linear_bwd: grad_out and u must be (..., out), (..., r)");
  TORCH_CHECK(grad_out.size(-1) == out, "lora_b_linear_bwd: grad_out's last dimension must be out=", out);
  TORCH_CHECK(u.size(-1) == r, "lora_b_linear_bwd: u's last dimension must be r=", r);
  TORCH_CHECK(u.sizes().slice(0, u.dim() - 1) == grad_out.sizes().slice(0, grad_out.dim() - 1),
              "lora_b_linear_bwd: u ", u.sizes(), " and grad_out ", grad_out.sizes(), " must have the same leading dims");
  TORCH_CHECK(lora_B.size(0) == out && lora_B.size(1) == r, "lora_b_linear_bwd: lora_B must be (out, r)");
  for (const at::Tensor* t : {&u, &weight, &lora_A, &lora_B}) {
    TORCH_CHECK(t->scalar_type() == grad_out.scalar_type() && t->device() == grad_out.device(),
                "lora_b_linear_bwd: all tensors must share grad_out's dtype and device");
  }
}

// Output shape (..., n) for an input of shape (..., k).
inline std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t n) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = n;
  return shape;
}

// Which GEMM arrangement computes the forward / backward (lora_b_linear_aten.cpp has the formulas).
// Chosen per call from SEGPCL_LORA_FWD (merged | concat | addmm) and SEGPCL_LORA_BWD
// (merged | split | fused); unset means merged; an unknown value is an error naming the choices.
enum class FwdPath { kMerged, kConcat, kAddmm };
enum class BwdPath { kMerged, kSplit, kFused };
FwdPath fwd_path_from_env();
BwdPath bwd_path_from_env();

// W + s B A (out x in) in W's dtype, products accumulated in fp32, rounded once.
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                         double scaling);

// Forward in ATen GEMMs, shared by CPU and CUDA (cuBLAS / MKL underneath).
std::tuple<at::Tensor, at::Tensor> lora_b_linear_fwd_aten(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                          double scaling, FwdPath path);

}  // namespace segpcl
