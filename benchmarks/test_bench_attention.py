"""Attention at the step's shapes, forward + backward, through each SDPA backend and xformers.

    python -m pytest benchmarks/test_bench_attention.py --benchmark-only -q

What it is for: session 35's profile of the compiled ViT-B/16 step on an H200 found attention at
8.6 ms a step, about 128 TFLOP/s for its analytic FLOPs, where the step's GEMMs ran at 444: 197 tokens
are a short sequence for a flash kernel's tiles. "eager_reference" is ops.attention_reference (SDPA
with torch's own choice of backend, what the step runs); the other rows pin one backend (flash,
efficient, cudnn, math: torch.nn.attention.sdpa_kernel) or call xformers' memory_efficient_attention.
A backend that cannot run a shape (flash with a mask, cudnn on an old GPU, ...) is a skip with its
error. Sizes: "vit_b16" (256 images x 12 heads x 197 tokens x 64: the e2e step's 128 + 128 anchors),
"vit_b16_cls" (its class-token last block, model/vit_tail.py: 1 query over 197 keys) and "text" (100
prompts x 8 heads x 16 tokens x 64, causal additive mask: the text trunk), bf16, on CUDA; "tiny"
(the shipped tiny ViT's 32 x 4 x 17 x 32, fp32) on the CPU. extra_info: FLOPs (4 B H Lq Lk D forward,
twice that backward) and TFLOP/s over the device time (CUDA events) or the host-timed median.
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import device_median_ms, median_seconds, sync
from segpcl_fast import ops

SIZES = {  # name: (batch, heads, query length, key length, head dim, causal mask, device)
    "tiny": (32, 4, 17, 17, 32, False, "cpu"),
    "vit_b16": (256, 12, 197, 197, 64, False, "cuda"),
    "vit_b16_cls": (256, 12, 1, 197, 64, False, "cuda"),
    "text": (100, 8, 16, 16, 64, True, "cuda"),
}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
IMPLS = ["eager_reference", *BACKENDS, "xformers"]


def _xformers_attention():
    try:
        import xformers.ops as xo
    except Exception as exc:  # not installed, or a wheel for another torch
        pytest.skip(f"xformers does not import: {type(exc).__name__}: {exc}")
    return lambda q, k, v, mask: xo.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_bias=None if mask is None else mask.expand(q.shape[0], q.shape[1], *mask.shape[-2:])).transpose(1, 2)


def _pinned(backend):
    def attention(q, k, v, mask):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attention


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", list(SIZES))
def test_attention(benchmark, size, impl):
    batch, heads, lq, lk, dim, causal, device = SIZES[size]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the ViT-B/16 and text shapes run on a GPU")
    if impl == "xformers" and device != "cuda":
        pytest.skip("xformers has no CPU kernels")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    q = torch.randn(batch, heads, lq, dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, heads, lk, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    # the additive causal mask the text trunk hands SDPA (model/lora.py sdpa_mask of open_clip's attn_mask)
    mask = torch.full((lq, lk), float("-inf"), device=device, dtype=dtype).triu(1) if causal else None
    fn = {"eager_reference": lambda q, k, v, mask: ops.attention_reference(q, k, v, mask),
          "xformers": None, **{name: _pinned(b) for name, b in BACKENDS.items()}}[impl]
    fn = fn or _xformers_attention()
    grad_out = torch.randn(batch, heads, lq, dim, device=device, dtype=dtype)

    def run():
        out = fn(q, k, v, mask)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    try:
        run()
        sync(device)
    except Exception as exc:  # no kernel for this shape / device / mask (each backend raises its own kind)
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        pytest.skip(f"{impl} does not run {size}: {lines[0][:200]}")
    benchmark.group = f"attention {size} {device}"

    def timed():
        grads = run()
        sync(device)
        return grads
    benchmark.pedantic(timed, rounds=3 if device == "cpu" else 30, warmup_rounds=1, iterations=1)
    flops = 12 * batch * heads * lq * lk * dim  # 4 B H Lq Lk D forward, 8 backward
    info = dict(op="attention", impl=impl, size=f"{size} ({batch}x{heads}x{lq}x{lk}x{dim})", device=device,
                flops=flops)
    seconds = median_seconds(benchmark)
    device_ms = device_median_ms(run, device)
    if device_ms is not None:
        info.update(device_ms=round(device_ms, 4), timing="cuda events")
        seconds = device_ms / 1e3
    if seconds:
        info.update(achieved_tflops=round(flops / seconds / 1e12, 2))
    benchmark.extra_info.update(info)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-q", *sys.argv[1:]]))
