"""Multi-head attention core for the LoRA attention blocks: xformers when it can run, else SDPA.

    out = attention(q, k, v, attn_mask)     # q, k, v: (B, H, L, D); out: (B, H, L, D)

The reference is torch's F.scaled_dot_product_attention (softmax(q k^T / sqrt(D) + mask) v).
xformers' memory-efficient attention is optional and detected at run time: "auto" uses it for
mask-free attention (the image tower) on CUDA tensors, outside torch.compile (compiled graphs
keep SDPA, which the compiler lowers itself), when `xformers.ops` imports and the backend is not
"reference". Masked attention (the text tower's causal mask) always runs SDPA. xformers has no
CPU kernels. `last_choice()["attention"]` says which ran ("xformers" or "sdpa").
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import get_backend, record_choice

# devices xformers' kernels run on (tests add "cpu" together with a stand-in module)
XFORMERS_DEVICES = {"cuda"}


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    try:
        return importlib.import_module("xformers.ops")
    except Exception:  # not installed, or installed without kernels for this torch
        return None


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _use_xformers(q: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> bool:
    return (attn_mask is None and q.device.type in XFORMERS_DEVICES and get_backend() != "reference"
            and not torch.compiler.is_compiling() and _xformers_ops() is not None)


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
