// CPU kernels of segpcl::lora_b_linear_{fwd,bwd} (ATen ops; MKL / oneDNN GEMMs underneath).
// Forward: the shared ATen forward (lora_b_linear_aten.cpp), path from SEGPCL_LORA_FWD.
//
// Backward, with g = grad_out (N x out), u = x A^T (N x r) saved by the forward:
//   merged (default): grad_x = g (W + s B A)        split: grad_x = g W + s (g B) A
//   both:             grad_B = s g^T u
// Fusion: g is read from memory once. Rows of g are processed in blocks of ~4 MB (last-level
// cache); each block g_b is used, while cached, by the grad_x GEMM (merged: g_b against
// W + s B A; split: g_b against the concatenated [W | B] (out x (in + r)), which gives g_b W and
// g_b B together) and by the rank-r GEMM g_b^T u_b accumulated into grad_B. SEGPCL_LORA_BWD=fused
// (the CUDA kernel's name) runs split here. The blocks run one after another and each GEMM uses all
// threads (MKL/oneDNN): a first version with one small GEMM per thread (at::parallel_for) measured
// 2x slower on 2 cores. bf16/fp16 blocks are upcast to fp32 in cache, so every product and the
// grad_B sum accumulate in fp32.
#include "../lora_b_linear.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>

namespace segpcl {
namespace {

constexpr int64_t kBlockBytes = 4 * 1024 * 1024;  // target size of one block of g (last-level cache)

at::ScalarType accumulate_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

std::tuple<at::Tensor, at::Tensor> lora_b_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                         double scaling) {
  return lora_b_linear_fwd_aten(x, weight, bias, lora_A, lora_B, scaling, fwd_path_from_env());
}

std::tuple<at::Tensor, at::Tensor> lora_b_linear_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& u,
                                                         const at::Tensor& weight, const at::Tensor& lora_A,
                                                         const at::Tensor& lora_B, double scaling,
                                                         bool need_grad_x, bool need_grad_B) {
  check_lora_b_linear_bwd_args(grad_out, u, weight, lora_A, lora_B);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_A.size(0);
  const at::ScalarType dtype = grad_out.scalar_type(), acc = accumulate_type(dtype);
  const at::Tensor g = grad_out.reshape({-1, out}).contiguous();
  const at::Tensor u2 = u.reshape({-1, r}).contiguous();
  const int64_t n_rows = g.size(0);

  const bool merged = bwd_path_from_env() == BwdPath::kMerged;
  // merged: W + s B A (out x in); split: [W | B] (out x (in + r)); both in the accumulation dtype
  const at::Tensor a_acc = need_grad_x ? lora_A.to(acc) : at::Tensor();
  at::Tensor rhs;
  if (need_grad_x) {
    rhs = merged ? merged_weight(weight.to(acc), a_acc, lora_B.to(acc), scaling)
                 : at::cat({weight, lora_B}, 1).to(acc);
  }
  at::Tensor grad_x = need_grad_x ? at::empty({n_rows, in}, g.options()) : at::empty({0}, g.options());
  at::Tensor grad_B_acc = need_grad_B ? at::zeros({out, r}, g.options().dtype(acc)) : at::Tensor();

  const int64_t block_rows =
      std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(1, out * at::elementSize(acc)), 64, 4096);
  for (int64_t b = 0; b < n_rows; b += block_rows) {
    const int64_t e = std::min(n_rows, b + block_rows);
    const at::Tensor g_b = g.slice(0, b, e).to(acc);  // the one read of this block of g
    if (need_grad_B) grad_B_acc.addmm_(g_b.t(), u2.slice(0, b, e).to(acc));
    if (need_grad_x && merged && acc == dtype) {
      at::Tensor rows = grad_x.slice(0, b, e);  // contiguous rows of grad_x: the GEMM writes in place
      at::mm_out(rows, g_b, rhs);
    } else if (need_grad_x && merged) {
      grad_x.slice(0, b, e).copy_(at::mm(g_b, rhs));  // fp32 block, one rounding to bf16/fp16
    } else if (need_grad_x) {
      const at::Tensor gwb = at::mm(g_b, rhs);  // [g_b W | g_b B]
      grad_x.slice(0, b, e).copy_(at::addmm(gwb.narrow(1, 0, in), gwb.narrow(1, in, r), a_acc, 1.0, scaling));
    }
  }

  at::Tensor grad_B = need_grad_B ? grad_B_acc.mul_(scaling).to(dtype) : at::empty({0}, g.options());
  if (need_grad_x) grad_x = at::_unsafe_view(grad_x, with_last_dim(grad_out, in));
  return {grad_x, grad_B};
}

}  // namespace

TORCH_LIBRARY_IMPL(segpcl, CPU, m) {
  m.impl("lora_b_linear_fwd", &lora_b_linear_fwd_cpu);
  m.impl("lora_b_linear_bwd", &lora_b_linear_bwd_cpu);
}

}  // namespace segpcl
