"""LoRA-B-only linear: y = x W^T + b + s * (x A^T) B^T, with W, b, A frozen and only B trained.

`lora_b_linear` is the one function every LoRA layer calls. It runs the C++/CUDA op
`torch.ops.segpcl.lora_b_linear_fwd` (csrc/, built as segpcl_fast._C) when the extension is built
with a kernel for x's device, else `lora_b_linear_reference`; `dispatch.last_choice()` says which
ran ("cpp" or "reference"). The op saves u = x A^T (N x r) for backward instead of x (N x in)
and returns gradients for x and B only (W, b, A are frozen by contract).

Backends (dispatch.set_backend): "auto" (and "triton": this op has no Triton kernel) take the
C++ op where it can run; "cpp" requires it (error otherwise); "reference" forces plain PyTorch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from ._ext import extension_status, has_kernel

__all__ = ["lora_b_linear", "lora_b_linear_reference", "lora_b_linear_impl", "extension_status"]

OP = "lora_b_linear"


def lora_b_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The formula, in plain PyTorch: F.linear(x, W, b) + scaling * (x @ A^T) @ B^T."""
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_A), lora_B)


def lora_b_linear_impl(x: torch.Tensor) -> str:
    """Which implementation `lora_b_linear` runs for this input: "cpp" or "reference"."""
    name = dispatch.get_backend()
    if name == "reference":
        return "reference"
    if has_kernel(x.device.type):
        return "cpp"
    if name == "cpp":
        status = extension_status()
        why = status["error"] or f"built without a kernel for device '{x.device.type}' (cuda={status['cuda']})"
        raise RuntimeError(
            f"ops backend 'cpp' forced but segpcl_fast._C cannot run lora_b_linear: {why}. Build it with "
            "`pip install --no-build-isolation .` (SEGPCL_WITH_CUDA=1 for the CUDA kernels) or use "
            "set_backend('auto').")
    return "reference"


def _autocast(tensors):
    """Cast like F.linear does under autocast: the C++ op has no autocast kernel of its own."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t if t is None else t.to(dtype) for t in tensors]


def lora_b_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y = x W^T + b + scaling * (x A^T) B^T for x of shape (..., in); grads flow to x and lora_B."""
    impl = lora_b_linear_impl(x)
    if not torch.compiler.is_compiling():
        dispatch.record_choice(OP, impl, x.device.type)
    if impl == "reference":
        return lora_b_linear_reference(x, weight, bias, lora_A, lora_B, scaling)
    x, weight, bias, lora_A, lora_B = _autocast([x, weight, bias, lora_A, lora_B])
    y, _u = torch.ops.segpcl.lora_b_linear_fwd(x, weight, bias, lora_A, lora_B, float(scaling))
    return y
