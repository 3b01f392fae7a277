"""ops.pgd_step: one DPGD descent step over an anchor batch (Triton kernel or reference).

`pgd_step(x_adv, grad, x0, gamma, eps, lo, hi, inplace=False)`; see
segpcl_fast.kernels.pgd_step for the formula, operation order and NaN behaviour.
"""
from __future__ import annotations

from typing import Union

import torch

from ._kernels import choose_impl, load_kernel

_k = load_kernel("pgd_step")
pgd_step_reference = _k.pgd_step_reference

PerChannel = Union[torch.Tensor, float]


def _as_channels(v: PerChannel, channels: int, device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=torch.float32)
    return torch.full((channels,), float(v), dtype=torch.float32, device=device)


def pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, gamma: PerChannel,
             eps: PerChannel, lo: PerChannel, hi: PerChannel, inplace: bool = False) -> torch.Tensor:
    """x_new = clamp(clamp(x_adv - gamma*sign(grad), x0 - eps, x0 + eps), lo, hi), per channel.

    x_adv, grad, x0: (N, C, H, W); gamma, eps, lo, hi: (C,) tensors or python floats, in the
    model's normalised input space. inplace=True overwrites x_adv and returns it.
    """
    channels = x_adv.shape[1] if x_adv.dim() == 4 else 0
    gamma, eps, lo, hi = (_as_channels(v, channels, x_adv.device) for v in (gamma, eps, lo, hi))
    _k.check_pgd_inputs(x_adv, grad, x0, gamma, eps, lo, hi)
    if choose_impl("pgd_step", x_adv, grad, x0) == "triton":
        if inplace:
            torch.ops.segpcl.pgd_step_(x_adv, grad, x0, gamma, eps, lo, hi)
            return x_adv
        return torch.ops.segpcl.pgd_step(x_adv, grad, x0, gamma, eps, lo, hi)
    out = pgd_step_reference(x_adv, grad, x0, gamma, eps, lo, hi)
    if inplace:
        return x_adv.copy_(out)
    return out
