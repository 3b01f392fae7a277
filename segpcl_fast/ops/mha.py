"""Multi-head attention core for the LoRA attention blocks: xformers when it can run, else SDPA.

    out = attention(q, k, v, attn_mask)     # q, k, v: (B, H, L, D); out: (B, H, L, D)

The reference is torch's F.scaled_dot_product_attention (softmax(q k^T / sqrt(D) + mask) v).
xformers' memory-efficient attention is optional and detected at run time: "auto" uses it for
mask-free attention (the image tower) on CUDA tensors, outside torch.compile (compiled graphs
keep SDPA, which the compiler lowers itself), torch.func transforms (SDPA composes with them) and
torch.jit.trace (a trace of aten ops), when `xformers.ops` imports, the backend is not
"reference", and a one-off probe (forward and backward on a tiny input of the same device, dtype
and head size) runs. The probe matters: a wheel built for another CUDA/torch imports fine but has
no kernels ("xFormers wasn't build with CUDA support", seen on an H100 with torch 2.11+cu130), and
fp32 inputs have no flash kernel; such cases run SDPA, and the reason is logged once.
Masked attention (the text tower's causal mask) always runs SDPA. xformers has no CPU kernels.
`last_choice()["attention"]` says which ran ("xformers" or "sdpa").
"""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import get_backend, jit_tracing, record_choice, under_func_transform

log = logging.getLogger("segpcl_fast.ops")

# devices xformers' kernels run on (tests add "cpu" together with a stand-in module)
XFORMERS_DEVICES = {"cuda"}
_probed: dict = {}  # (device, dtype, head_dim) -> None when xformers runs there, else the reason


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    try:
        return importlib.import_module("xformers.ops")
    except Exception:  # not installed, or installed without kernels for this torch
        return None


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def xformers_failure(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """None when xformers' attention runs forward and backward for this device/dtype/head size,
    else why not. Probed once per key on a (1, 8, 2, head_dim) input; cached."""
    key = (str(device), dtype, head_dim)
    if key not in _probed:
        xo = _xformers_ops()
        if xo is None:
            _probed[key] = "xformers.ops does not import"
        else:
            try:
                # inference_mode(False): a first call under the caller's inference_mode made tensors that
                # cannot require grad, and the cached failure turned xformers off for the process
                with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                    q = torch.randn(1, 8, 2, head_dim, device=device, dtype=dtype, requires_grad=True)
                    xo.memory_efficient_attention(q, q, q).sum().backward()
                _probed[key] = None
            except Exception as exc:  # NotImplementedError (no kernel), RuntimeError, ...
                reason = str(exc).strip().splitlines()
                _probed[key] = f"{type(exc).__name__}: {' / '.join(line.strip() for line in reason[-3:])}"
                log.warning("xformers attention does not run for %s %s head_dim %d (%s); using SDPA",
                            device, dtype, head_dim, _probed[key])
    return _probed[key]


def _use_xformers(q: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> bool:
    return (attn_mask is None and q.dim() == 4 and q.device.type in XFORMERS_DEVICES and get_backend() != "reference"
            and not torch.compiler.is_compiling() and not under_func_transform() and not jit_tracing()
            and _xformers_ops() is not None
            and xformers_failure(q.device, q.dtype, q.shape[-1]) is None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, L, D) tensors; see the module docstring."""
    if _use_xformers(q, attn_mask):
        record_choice("attention", "xformers", q.device.type)
        # xformers takes (B, L, H, D); its default scale is 1 / sqrt(D), as SDPA's
        out = _xformers_ops().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if not torch.compiler.is_compiling():
        record_choice("attention", "sdpa", q.device.type)
    return attention_reference(q, k, v, attn_mask)
