// segpcl_fast._C: schema of the segpcl:: operators and the Python module init.
//
// Kernels are registered per dispatch key next to their implementation:
//   cpu/lora_b_linear_cpu.cpp    TORCH_LIBRARY_IMPL(segpcl, CPU, m)   (always built)
//   cuda/lora_b_linear_cuda.cu   TORCH_LIBRARY_IMPL(segpcl, CUDA, m)  (CUDA builds only)
// Fake (meta) kernels and autograd are registered from Python: segpcl_fast/ops/_ext.py (named below).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(segpcl, m) {
  // Fake kernels and autograd live in this Python module: torch imports it when it needs them, so
  // a process that loads _C without segpcl_fast (torch.export.load, a bare torch.ops call) has them.
  m.set_python_module("segpcl_fast.ops._ext");
  // y = x W^T + b + s * (x A^T) B^T; also returns u = x A^T (..., r), the only activation backward needs.
  m.def("lora_b_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "float scaling) -> (Tensor, Tensor)");
  // grad_x = g W + s (g B) A and grad_B = s g^T u; an output not asked for is returned empty (shape [0]).
  m.def("lora_b_linear_bwd(Tensor grad_out, Tensor u, Tensor weight, Tensor lora_A, Tensor lora_B, "
        "float scaling, bool need_grad_x, bool need_grad_B) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "segpcl_fast C++/CUDA ops; importing registers torch.ops.segpcl.*";
#ifdef SEGPCL_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
