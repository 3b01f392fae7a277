"""Loader of the C++/CUDA extension `segpcl_fast._C` and the Python half of its ops.

Importing `segpcl_fast._C` registers `torch.ops.segpcl.*` (schemas and CPU/CUDA kernels, see
csrc/). This module adds what torch.compile and autograd need on top: a fake (shape-only)
kernel per op and the backward of `segpcl::lora_b_linear_fwd` (which calls
`segpcl::lora_b_linear_bwd` with the u = x A^T the forward returned, so x is never saved).
"""
from __future__ import annotations

import importlib
import logging

import torch

log = logging.getLogger("segpcl_fast.ops")

_C = None
_load_error: str | None = None


def _load():
    global _C, _load_error
    try:
        _C = importlib.import_module("segpcl_fast._C")
    except ImportError as exc:  # not built: the references run instead
        _load_error = f"{type(exc).__name__}: {exc}"
        if "undefined symbol" in str(exc):  # most often: built against another torch than this one
            _load_error = (f"cannot be loaded, most likely built against another torch than this one "
                           f"({torch.__version__}; else another C++ / CUDA runtime): rebuild it with "
                           f"`pip install --no-build-isolation .` ({_load_error})")
            log.warning("segpcl_fast._C %s; the LoRA op runs in plain PyTorch meanwhile", _load_error)
        log.debug("segpcl_fast._C not available (%s)", _load_error)
        return
    _register_python_side()


def extension_status() -> dict:
    """{'built': is segpcl_fast._C importable, 'cuda': was it compiled with CUDA kernels,
    'error': why it could not be imported (None when built)}."""
    return {"built": _C is not None, "cuda": bool(_C is not None and _C.WITH_CUDA), "error": _load_error}


def has_kernel(device_type: str) -> bool:
    """Whether the extension has a lora_b_linear kernel for this device type ('cpu', 'cuda')."""
    if _C is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and bool(_C.WITH_CUDA))


def _with_last_dim(t: torch.Tensor, n: int) -> tuple:
    return (*t.shape[:-1], n)


def _register_python_side() -> None:
    from ._kernels import _utils  # once, not in each forward's setup_context and backward
    @torch.library.register_fake("segpcl::lora_b_linear_fwd")
    def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling):
        torch._check(x.shape[-1] == weight.shape[1], lambda: "lora_b_linear: x's last dim != in-features")
        y = x.new_empty(_with_last_dim(x, weight.shape[0]))
        u = x.new_empty(_with_last_dim(x, lora_A.shape[0]))
        return y, u

    @torch.library.register_fake("segpcl::lora_b_linear_bwd")
    def _bwd_fake(grad_out, u, weight, lora_A, lora_B, scaling, need_grad_x, need_grad_B):
        grad_x = grad_out.new_empty(_with_last_dim(grad_out, weight.shape[1]) if need_grad_x else (0,))
        grad_B = grad_out.new_empty(tuple(lora_B.shape) if need_grad_B else (0,))
        return grad_x, grad_B

    def _setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scaling = inputs
        _utils.refuse_frozen_grads("segpcl::lora_b_linear_fwd", ctx.needs_input_grad)
        _, u = output
        ctx.scaling = scaling
        ctx.need_grad_x = ctx.needs_input_grad[0]
        ctx.need_grad_B = ctx.needs_input_grad[4]
        ctx.mark_non_differentiable(u)  # u is saved for backward, not an output to differentiate
        ctx.set_materialize_grads(False)  # so no (N, r) zeros are made for u's gradient each step
        ctx.save_for_backward(u, weight, lora_A, lora_B)  # u = x A^T, not x

    def _backward(ctx, grad_y, _grad_u):
        if grad_y is None:  # y took no part in what was differentiated
            return None, None, None, None, None, None
        _utils.refuse_double_backward("lora_b_linear (C++ op)")  # its backward is an opaque op, with u saved
        u, weight, lora_A, lora_B = ctx.saved_tensors
        grad_x, grad_B = torch.ops.segpcl.lora_b_linear_bwd(
            grad_y, u, weight, lora_A, lora_B, ctx.scaling, ctx.need_grad_x, ctx.need_grad_B)
        return (grad_x if ctx.need_grad_x else None, None, None, None,
                grad_B if ctx.need_grad_B else None, None)

    torch.library.register_autograd("segpcl::lora_b_linear_fwd", _backward, setup_context=_setup_context)

    def _bwd_backward(ctx, *grads):
        raise RuntimeError("segpcl::lora_b_linear_bwd is not differentiable: it is the backward of "
                           "lora_b_linear_fwd (double backward: run the reference, run.ops=reference)")

    # called by a backward with grad mode off; a direct call on tensors that require grad gets outputs
    # whose backward is this one clear error (without an autograd kernel the CPU kernel's mm(out=) raised
    # in fp32, and bf16 outputs carried a meaningless grad_fn)
    torch.library.register_autograd("segpcl::lora_b_linear_bwd", _bwd_backward,
                                    setup_context=lambda ctx, inputs, output: None)


_load()
