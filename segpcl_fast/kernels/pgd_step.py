"""One projected sign-gradient *descent* step over a whole anchor batch (DPGD, method.md stage 1).

    x_new = clamp(clamp(x_adv - gamma * sign(grad), x0 - eps, x0 + eps), lo, hi)

with per-channel gamma, eps, lo, hi (C,) in the model's (normalised) input space. The step is
written in torchattacks' PGD operation order (it ascends; we descend on L_DPGD):

    a = x_adv - gamma * sign(grad);  delta = clamp(a - x0, -eps, eps);  x_new = clamp(x0 + delta, lo, hi)

so in fp32 the result equals torchattacks.PGD's step on the negated gradient bit for bit.
Compute is fp32 whatever the storage (fp32 or bf16); bf16 is rounded once, at the store. float64
runs on the reference, in float64. eps >= 0 and lo <= hi are checked for bounds on the CPU.

NaN / inf: sign(NaN) is 0 (as torch.sign), so a NaN gradient entry leaves that pixel where the
projection puts it; a NaN in x_adv or x0 gives NaN in x_new (clamp propagates NaN, as torch.clamp).
+-inf in x_adv is projected into the eps-ball, i.e. finite when x0 is finite.

Contents: `pgd_step_reference` (the spec), the Triton kernel and launcher, and two
torch.library custom ops: `segpcl::pgd_step` (functional, with fake + autograd) and
`segpcl::pgd_step_` (in place on x_adv, with fake; not differentiable).
"""
from __future__ import annotations

import torch

from ._triton_utils import (cdiv, check_can_run, compute_dtype, interpret_mode, launch_device, lazy_jit, next_pow2,
                            store_dtype)

tl = None  # triton.language, bound by lazy_jit at the first launch

__all__ = ["pgd_step_reference", "pgd_step_triton", "check_pgd_inputs"]


def _per_channel(v: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return v.to(dtype).view(1, -1, 1, 1)


def pgd_step_reference(x_adv: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor,
                       gamma: torch.Tensor, eps: torch.Tensor, lo: torch.Tensor,
                       hi: torch.Tensor) -> torch.Tensor:
    """method.md DPGD step in torchattacks' order, fp32 compute (fp64 for fp64 x_adv), result in x_adv's dtype."""
    compute = compute_dtype(x_adv)
    gamma, eps, lo, hi = (_per_channel(v, compute) for v in (gamma, eps, lo, hi))
    x0 = x0.to(compute)
    stepped = x_adv.to(compute) - gamma * grad.to(compute).sign()
    delta = torch.clamp(stepped - x0, min=-eps, max=eps)
    return torch.clamp(x0 + delta, min=lo, max=hi).to(x_adv.dtype)


def check_pgd_inputs(x_adv, grad, x0, gamma, eps, lo, hi) -> None:
    """Shape / dtype / device checks (no host sync); one clear error per problem."""
    if x_adv.dim() != 4:
        raise ValueError(f"pgd_step: x_adv must be (N, C, H, W), got shape {tuple(x_adv.shape)}")
    for name, t in (("grad", grad), ("x0", x0)):
        if t.shape != x_adv.shape:
            raise ValueError(f"pgd_step: {name} has shape {tuple(t.shape)} but x_adv has {tuple(x_adv.shape)}; "
                             "they must match")
    if not x_adv.is_floating_point():
        raise TypeError(f"pgd_step: x_adv must be a floating tensor, got {x_adv.dtype}")
    channels = x_adv.shape[1]
    for name, t in (("gamma", gamma), ("eps", eps), ("lo", lo), ("hi", hi)):
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"pgd_step: {name} must be a per-channel tensor of shape ({channels},), got "
                             f"{tuple(t.shape)}; pass a python float to use one value for every channel")
    devices = {t.device for t in (x_adv, grad, x0, gamma, eps, lo, hi)}
    if len(devices) != 1:
        raise ValueError(f"pgd_step: all inputs must be on one device, got {sorted(map(str, devices))}")
    # checked where it costs no host sync and no extra launches in DPGD's hot loop: bounds on the CPU,
    # eagerly (ops.pgd_step checks python floats before it makes them tensors on x_adv's device); bounds
    # already on a GPU are the caller's contract
    if eps.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool((eps >= 0).all() & (lo <= hi).all()):
            raise ValueError(f"pgd_step: every eps must be >= 0 and every lo <= hi (per channel); got eps "
                             f"{eps.tolist()}, lo {lo.tolist()}, hi {hi.tolist()}")


@lazy_jit
def _step_and_project(x_ptr, g_ptr, x0_ptr, out_ptr, offs, mask, gamma, eps, lo, hi):
    """The step at storage offsets `offs` (every tensor laid out alike), fp32 compute, stored in out's dtype."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))  # NaN -> 0, as torch.sign
    stepped = x - gamma * sign
    delta = tl.minimum(tl.maximum(stepped - x0, -eps, propagate_nan=tl.PropagateNan.ALL), eps,
                       propagate_nan=tl.PropagateNan.ALL)
    y = tl.minimum(tl.maximum(x0 + delta, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                   propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@lazy_jit
def _pgd_step_kernel(x_ptr, g_ptr, x0_ptr, out_ptr, gamma_ptr, eps_ptr, lo_ptr, hi_ptr,
                     hw, channels, blocks_per_plane, BLOCK: tl.constexpr):
    # NCHW (contiguous): one program per chunk of BLOCK pixels within a plane (N * C planes, one 1-D
    # grid: a second grid axis stops at 65535): the channel is one scalar per program, so the
    # per-channel bounds are 4 scalar loads, no per-element index math.
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // blocks_per_plane
    cols = (pid % blocks_per_plane) * BLOCK + tl.arange(0, BLOCK)
    ch = plane % channels
    _step_and_project(x_ptr, g_ptr, x0_ptr, out_ptr, plane * hw + cols, cols < hw, tl.load(gamma_ptr + ch),
                      tl.load(eps_ptr + ch), tl.load(lo_ptr + ch), tl.load(hi_ptr + ch))


@lazy_jit
def _pgd_step_channels_last_kernel(x_ptr, g_ptr, x0_ptr, out_ptr, gamma_ptr, eps_ptr, lo_ptr, hi_ptr,
                                   numel, channels, BLOCK: tl.constexpr):
    # NHWC storage (channels_last): BLOCK consecutive elements, the channel varying fastest, so each
    # element's bounds are gathers from the 4 (C,) vectors (a few bytes, cached)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    ch = offs % channels
    _step_and_project(x_ptr, g_ptr, x0_ptr, out_ptr, offs, mask, tl.load(gamma_ptr + ch, mask=mask),
                      tl.load(eps_ptr + ch, mask=mask), tl.load(lo_ptr + ch, mask=mask),
                      tl.load(hi_ptr + ch, mask=mask))


def _block_size(hw: int, block: int | None) -> int:
    if block is not None:
        return next_pow2(block)
    if interpret_mode():  # ~3 ms per program in the interpreter: one program per plane
        return min(1 << 16, next_pow2(hw))
    return min(2048, next_pow2(hw))


def _channels_last(*tensors: torch.Tensor) -> bool:
    """Every tensor stored NHWC (channels_last) and not also NCHW-contiguous (C = 1, or 1 x 1 images, are both)."""
    return all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in tensors)


def pgd_step_triton(x_adv, grad, x0, gamma, eps, lo, hi, out: torch.Tensor | None = None,
                    block: int | None = None) -> torch.Tensor:
    """Launch the kernel; writes into `out` (may be x_adv itself) or a new tensor. channels_last inputs (all three)
    run in their own layout, into a channels_last result; any other (or mixed) layout runs on contiguous copies,
    into a contiguous result (the reference's elementwise ops may lay a mixed one out otherwise: same values)."""
    check_can_run("pgd_step", x_adv, grad, x0)
    devices = {t.device for t in (x_adv, gamma, eps, lo, hi)}
    if len(devices) > 1:
        raise RuntimeError(f"segpcl::pgd_step: gamma, eps, lo and hi must be on x_adv's device {x_adv.device}, got "
                           f"{sorted(map(str, devices))}")
    check_pgd_inputs(x_adv, grad, x0, gamma, eps, lo, hi)  # also for a direct torch.ops.segpcl call: the kernel
    # reads grad and x0 at x_adv's offsets
    channels_last = _channels_last(x_adv, grad, x0)
    if channels_last:
        x_adv_c, grad_c, x0_c = x_adv, grad, x0
    else:
        x_adv_c, grad_c, x0_c = x_adv.contiguous(), grad.contiguous(), x0.contiguous()
    dtype = store_dtype(x_adv.dtype)
    if out is not None and out.dtype == dtype and out.stride() == x_adv_c.stride():
        buffer = out
    else:
        buffer = torch.empty_like(x_adv_c, dtype=dtype)
    params = [p.float().contiguous() for p in (gamma, eps, lo, hi)]
    n, channels, height, width = x_adv.shape
    hw = height * width
    if x_adv.numel() > 0 and channels_last:
        block_size = _block_size(x_adv.numel(), block)
        with launch_device(x_adv):
            _pgd_step_channels_last_kernel[(cdiv(x_adv.numel(), block_size),)](
                x_adv_c, grad_c, x0_c, buffer, *params, x_adv.numel(), channels, BLOCK=block_size,
                num_warps=4 if block_size <= 2048 else 8)
    elif x_adv.numel() > 0:
        block_size = _block_size(hw, block)
        blocks_per_plane = cdiv(hw, block_size)
        with launch_device(x_adv):
            _pgd_step_kernel[(n * channels * blocks_per_plane,)](
                x_adv_c, grad_c, x0_c, buffer, *params, hw, channels, blocks_per_plane, BLOCK=block_size,
                num_warps=4 if block_size <= 2048 else 8)
    if buffer is out:
        return out
    if out is None:  # (.to keeps the layout)
        return buffer.to(x_adv.dtype)
    return out.copy_(buffer)


# ---------------------------------------------------------------- torch.library registration

@torch.library.custom_op("segpcl::pgd_step", mutates_args=())
def pgd_step_op(x_adv: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, gamma: torch.Tensor,
                eps: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return pgd_step_triton(x_adv, grad, x0, gamma, eps, lo, hi)


@pgd_step_op.register_fake
def _pgd_step_fake(x_adv, grad, x0, gamma, eps, lo, hi):
    if _channels_last(x_adv, grad, x0):  # the kernel's own layout (pgd_step_triton)
        return torch.empty_like(x_adv, memory_format=torch.channels_last)
    return torch.empty(x_adv.shape, dtype=x_adv.dtype, device=x_adv.device)


def _pgd_setup_context(ctx, inputs, output):
    x_adv, grad, x0, gamma, eps, lo, hi = inputs
    ctx.save_for_backward(x_adv, grad, x0, gamma, eps, lo, hi)


def _pgd_backward(ctx, grad_out):
    """d x_new / d x_adv and d x_new / d x0: clamp passes gradient where min <= x <= max, so at an exact
    tie with a bound the whole gradient takes the unclamped branch (a subgradient; autograd of torch.clamp
    with tensor bounds gives 0.5 there, with scalar bounds 0). The sign of `grad` is piecewise constant
    (its gradient zeros), and gamma/eps/lo/hi get no gradient."""
    x_adv, grad, x0, gamma, eps, lo, hi = ctx.saved_tensors
    gamma, eps, lo, hi = (_per_channel(v) for v in (gamma, eps, lo, hi))
    x0f = x0.float()
    diff = x_adv.float() - gamma * grad.float().sign() - x0f
    in_ball = (diff >= -eps) & (diff <= eps)
    pre_box = x0f + torch.clamp(diff, min=-eps, max=eps)
    in_box = (pre_box >= lo) & (pre_box <= hi)
    g = grad_out.float() * in_box
    grad_x_adv = (g * in_ball).to(x_adv.dtype)
    grad_x0 = (g * ~in_ball).to(x0.dtype)
    # sign(grad) is piecewise constant: zeros, as autograd of the reference gives, when grad's is asked for
    grad_grad = torch.zeros_like(grad) if ctx.needs_input_grad[1] else None
    return grad_x_adv, grad_grad, grad_x0, None, None, None, None


pgd_step_op.register_autograd(_pgd_backward, setup_context=_pgd_setup_context)


@torch.library.custom_op("segpcl::pgd_step_", mutates_args=("x_adv",))
def pgd_step_inplace_op(x_adv: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, gamma: torch.Tensor,
                        eps: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    if x_adv.is_contiguous() or _channels_last(x_adv, grad, x0):
        pgd_step_triton(x_adv, grad, x0, gamma, eps, lo, hi, out=x_adv)
    else:
        x_adv.copy_(pgd_step_triton(x_adv, grad, x0, gamma, eps, lo, hi))


@pgd_step_inplace_op.register_fake
def _pgd_step_inplace_fake(x_adv, grad, x0, gamma, eps, lo, hi):
    return None
