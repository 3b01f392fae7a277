"""ViT patch embedding as one GEMM: a stride = kernel convolution is a matmul over flattened patches.

open_clip's VisionTransformer embeds patches with `conv1`, a Conv2d whose stride equals its kernel
(16 x 16 for ViT-B/16), no padding, no groups. Each output pixel is the dot product of one
non-overlapping C x P x Q patch with each filter, so

    conv1(x) = (patches(x) @ W.reshape(out, C * P * Q).T).reshape(N, H/P, W/Q, out), in NCHW order

with patches(x) the (N * H/P * W/Q, C * P * Q) matrix of the patches, flattened in W's own (C, P, Q)
order. Same products and sums, only their order inside each dot product differs (fp rounding);
fp32 on CUDA outside autocast keeps the convolution (torch's defaults give cuDNN convolutions TF32
but fp32 matmuls none: the GEMM would be slower there and not the same arithmetic). On
an H200 (BENCHMARKS.md, session 35's profile) cuDNN ran ViT-B/16's patch conv on 256 images in
2.1 ms plus a 0.57 ms NCHW -> NHWC conversion, for 59 GFLOP that a GEMM does in about a tenth of a
millisecond. The output is returned as an NCHW view of the GEMM's NHWC result, which open_clip's
reshape + permute into (N, H/P * W/Q, out) turns back into a contiguous tensor with no copy.

`PatchEmbedGEMM` subclasses nn.Conv2d (same parameters, same state-dict keys, isinstance still
holds); `use_patch_gemm` swaps it in where the convolution qualifies (CLIPModel does, for open_clip
ViTs) and `ops.last_choice()["patch_embed"]` says which ran. SEGPCL_PATCH_EMBED=conv keeps cuDNN's
convolution (for A/B timing).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dispatch import env_choice, record_choice
from .tf32 import cuda_matmul_tf32, cudnn_conv_tf32

log = logging.getLogger("segpcl_fast.model")

CHOICES = ("gemm", "conv")


def qualifies(conv: nn.Module) -> bool:
    """A Conv2d that tiles its input into non-overlapping patches (stride = kernel, no padding/dilation/groups)."""
    return (isinstance(conv, nn.Conv2d) and tuple(conv.stride) == tuple(conv.kernel_size)
            and conv.padding == (0, 0) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")  # padding "same" / "valid" (a string): not ours to rewrite


class PatchEmbedGEMM(nn.Conv2d):
    """nn.Conv2d with stride = kernel computed as one GEMM over the flattened patches (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.kernel_size
        ragged = x.dim() != 4 or x.shape[-2] % p or x.shape[-1] % q  # an edge the convolution drops
        use_conv = ragged or _conv_is_cheaper_in_fp32(x)
        if not torch.compiler.is_compiling():
            record_choice("patch_embed", "conv" if use_conv else "gemm", x.device.type)
        if use_conv:
            return super().forward(x)
        n, c, h, w = x.shape
        gh, gw = h // p, w // q
        patches = x.reshape(n, c, gh, p, gw, q).permute(0, 2, 4, 1, 3, 5).reshape(n * gh * gw, c * p * q)
        y = F.linear(patches, self.weight.reshape(self.out_channels, c * p * q), self.bias)
        return y.reshape(n, gh, gw, self.out_channels).permute(0, 3, 1, 2)


def conv_is_cheaper(on_cuda: bool, dtype: torch.dtype, autocast: bool) -> bool:
    """fp32 on CUDA outside autocast (run.precision=fp32): torch lets cuDNN convolutions use TF32 by
    default but not fp32 matmuls, so there the GEMM would run on the CUDA cores, slower than the
    convolution and not the same arithmetic: keep cuDNN's convolution, exactly as before."""
    return (on_cuda and dtype == torch.float32 and not autocast
            and cudnn_conv_tf32() and not cuda_matmul_tf32())


def _conv_is_cheaper_in_fp32(x: torch.Tensor) -> bool:
    return conv_is_cheaper(x.is_cuda, x.dtype, torch.is_autocast_enabled("cuda"))


def choice() -> str:
    return env_choice("SEGPCL_PATCH_EMBED", CHOICES, "gemm")


def use_patch_gemm(visual: nn.Module) -> str:
    """Swap a ViT's qualifying `conv1` for PatchEmbedGEMM (sharing its parameters), in place.

    Returns what the patch embedding now runs: "gemm", "conv" (kept: SEGPCL_PATCH_EMBED=conv or a
    convolution that is not a patch tiling) or "none" (no conv1: not an open_clip ViT)."""
    conv = getattr(visual, "conv1", None)
    if conv is None:
        return "none"
    if isinstance(conv, PatchEmbedGEMM):
        return "gemm"
    if choice() == "conv" or not qualifies(conv):
        return "conv"
    gemm = PatchEmbedGEMM(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          bias=conv.bias is not None, device="meta")
    gemm.weight, gemm.bias = conv.weight, conv.bias  # the same Parameters: state dict and optimizer unchanged
    gemm.train(conv.training)
    visual.conv1 = gemm
    log.info("patch embedding: %s as one GEMM over %s patches", type(conv).__name__, tuple(conv.kernel_size))
    return "gemm"
