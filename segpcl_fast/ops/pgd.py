"""ops.pgd_step: one DPGD descent step over an anchor batch (Triton kernel or reference).

`pgd_step(x_adv, grad, x0, gamma, eps, lo, hi, inplace=False)`; see
segpcl_fast.kernels.pgd_step for the formula, operation order and NaN behaviour.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Optional, Union

import torch

from ._kernels import choose_impl, load_kernel
from .dispatch import refuse_trained_constants

_k = load_kernel("pgd_step")
pgd_step_reference = _k.pgd_step_reference

PerChannel = Union[torch.Tensor, float, Sequence[float]]


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _host_values(name: str, v: PerChannel, channels: int) -> Optional[list[float]]:
    """A bound given on the host as floats, one per channel (one number is every channel's), or None for a tensor.
    Plain Python checks, no numpy calls: torch.compile traces them (a numpy array is read with tolist)."""
    if isinstance(v, torch.Tensor):
        return None
    items = v.tolist() if type(v).__module__ == "numpy" and hasattr(v, "tolist") else v
    if _is_number(items):
        return [float(items)] * max(channels, 1)
    if (not isinstance(items, Sequence) or isinstance(items, str) or not items
            or not all(_is_number(x) for x in items)):
        raise TypeError(f"pgd_step: {name} must be a number, a sequence of one number per channel or a (C,) tensor, "
                        f"got {v!r}")
    return [float(x) for x in items]


def pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, gamma: PerChannel,
             eps: PerChannel, lo: PerChannel, hi: PerChannel, inplace: bool = False) -> torch.Tensor:
    """x_new = clamp(clamp(x_adv - gamma*sign(grad), x0 - eps, x0 + eps), lo, hi), per channel.

    x_adv, grad, x0: (N, C, H, W); gamma, eps, lo, hi: (C,) tensors, sequences of C numbers or numbers, in the
    model's normalised input space (eps >= 0, lo <= hi). inplace=True overwrites x_adv and returns it;
    when x_adv, grad or x0 is part of an autograd graph, the Triton path then copies the functional op's
    result into x_adv (autograd sees it, as it sees the reference's: grad gets its zero gradient) instead of
    running the in-place kernel.
    float64 inputs compute in float64 (the reference).
    """
    refuse_trained_constants("pgd_step", gamma=gamma, eps=eps, lo=lo, hi=hi)
    # (the kernel would write it; dynamo cannot trace is_inference, and compiled code has no inference tensors)
    if inplace and not torch.compiler.is_compiling() and x_adv.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("pgd_step: inplace=True on an inference tensor outside torch.inference_mode() is not "
                           "allowed (as for torch's in-place ops); step inside inference_mode, or pass x_adv.clone()")
    bounds = {"gamma": gamma, "eps": eps, "lo": lo, "hi": hi}
    channels = x_adv.shape[1] if x_adv.dim() == 4 else 0
    host = {name: _host_values(name, v, channels) for name, v in bounds.items()}
    if host["eps"] is not None and not all(e >= 0 for e in host["eps"]):  # (NaN too)
        raise ValueError(f"pgd_step: eps must be >= 0, got {eps}")
    if host["lo"] is not None and host["hi"] is not None:
        pairs = (zip(host["lo"], host["hi"]) if len(host["lo"]) == len(host["hi"]) else
                 ((a, b) for a in host["lo"] for b in host["hi"]))  # a wrong length (check_pgd_inputs names it): all pairs
        if not all(a <= b for a, b in pairs):
            raise ValueError(f"pgd_step: lo must be <= hi, got lo {lo}, hi {hi}")
    dtype = _k.compute_dtype(x_adv)
    gamma, eps, lo, hi = (v.to(device=x_adv.device, dtype=dtype) if host[name] is None else
                          torch.tensor(host[name], dtype=dtype, device=x_adv.device) for name, v in bounds.items())
    _k.check_pgd_inputs(x_adv, grad, x0, gamma, eps, lo, hi)
    if choose_impl("pgd_step", x_adv, grad, x0) == "triton":
        tracked = torch.is_grad_enabled() and (x_adv.requires_grad or grad.requires_grad or x0.requires_grad)
        if inplace and not tracked:
            torch.ops.segpcl.pgd_step_(x_adv, grad, x0, gamma, eps, lo, hi)
            return x_adv
        if not inplace:
            return torch.ops.segpcl.pgd_step(x_adv, grad, x0, gamma, eps, lo, hi)
        # the functional op saves its x_adv for backward: give it a copy, since copy_ then overwrites x_adv
        return x_adv.copy_(torch.ops.segpcl.pgd_step(x_adv.clone(), grad, x0, gamma, eps, lo, hi))
    out = pgd_step_reference(x_adv, grad, x0, gamma, eps, lo, hi)
    if inplace:
        return x_adv.copy_(out)
    return out
