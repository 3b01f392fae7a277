"""The merged LoRA weight W + s B A in one pass (the LoRA-B-only linear's merged arrangement).

    merged = W + s * B @ A        W (out, in), B (out, r), A (r, in); r small (LoRA's rank)

A GEMM with K = r: on an H200 cuBLAS's addmm took 0.031-0.041 ms for 3072 x 768 at r 32 in bf16,
20-30x the 0.0022 ms its bytes (read W, write the result; A and B are small) take at copy bandwidth
(BENCHMARKS.md, session 35): the product is a few MFLOP, and a GEMM kernel built for long K spends
its time elsewhere. This kernel reads a (BLOCK_O x BLOCK_I) tile of W, the matching rows of B and
columns of A, forms their product in fp32 as r rank-1 updates (each product of two bf16 values is
exact in fp32, as in cuBLAS's fp32 accumulation) and writes W + s * (B A) rounded once to W's
dtype, like torch.addmm(W, B, A, alpha=s). Any rank.

Contents: `lora_merged_weight_reference` (the spec: torch.addmm), the kernel and launcher, and
the custom op `segpcl::lora_merged_weight` with a fake kernel (no autograd: the LoRA layer forms the
merged weight inside its own autograd.Function, where nothing is differentiated through it).
"""
from __future__ import annotations

import torch

from ._triton_utils import cdiv, check_can_run, interpret_mode, launch_device, lazy_jit, next_pow2, store_dtype

tl = None  # triton.language, bound by lazy_jit at the first launch

__all__ = ["lora_merged_weight_reference", "lora_merged_weight_triton"]


def lora_merged_weight_reference(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                                 scaling: float) -> torch.Tensor:
    """W + s B A, as the merged arrangement forms it (one addmm: fp32 accumulation, one rounding)."""
    return torch.addmm(weight, lora_B, lora_A, alpha=scaling)


@lazy_jit
def _lora_merge_kernel(w_ptr, a_ptr, b_ptr, out_ptr, n_out, n_in, rank, scaling,
                       stride_w, stride_a, stride_b, stride_out, blocks_i,
                       BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one 1-D grid over (row block, column block): a second axis stops at 65535
    pid_o = pid // blocks_i
    pid_i = pid % blocks_i
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = offs_o < n_out
    i_ok = offs_i < n_in
    # B A as r rank-1 updates in fp32 (exact products of bf16 / fp16 values, summed in order j = 0..r-1):
    # a fp32 tl.dot at IEEE precision took 201 registers on sm_90 at r = 32 and spilled at 128
    ba = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    b_cols = b_ptr + offs_o * stride_b  # B[:, j] and A[j, :] (pointers stepped: no 32-bit j * stride product)
    a_rows = a_ptr + offs_i
    for _ in range(0, rank):
        b_col = tl.load(b_cols, mask=o_ok, other=0.0).to(tl.float32)
        a_row = tl.load(a_rows, mask=i_ok, other=0.0).to(tl.float32)
        ba += b_col[:, None] * a_row[None, :]
        b_cols += 1
        a_rows += stride_a
    mask = o_ok[:, None] & i_ok[None, :]
    w = tl.load(w_ptr + offs_o[:, None] * stride_w + offs_i[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_o[:, None] * stride_out + offs_i[None, :], (w + scaling * ba).to(out_ptr.dtype.element_ty),
             mask=mask)


def _tiles(n_out: int, n_in: int) -> tuple[int, int]:
    if interpret_mode():  # ~3 ms a program in the interpreter: few, large ones
        return min(64, next_pow2(n_out)), min(128, next_pow2(n_in))
    return 64, 64  # a 64 x 64 tile of W (4096 elements) per program: 576 programs for 3072 x 768


def _warps(block_o: int, block_i: int) -> int:
    """Warps of a program. 2 for the 64 x 64 tile: each thread then holds one column of W's tile (64
    rows) and reads B[:, j] from shared memory four rows at a time (one load of B a thread an
    update); with 4 warps each thread loaded its 32 rows of B[:, j] one by one from global memory, 6
    instructions an FFMA. sm_90, r 32, instructions per element of W: bf16 195 -> 59 (Triton 3.6:
    106), fp32 140 -> 59 (check_triton_build listings). Other tiles (tests, tuning) keep 4."""
    return 2 if (block_o, block_i) == (64, 64) else 4


def lora_merged_weight_triton(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                              block: tuple[int, int] | None = None) -> torch.Tensor:
    """Launch the kernel: W + s B A in W's dtype (a new tensor). block: (rows of W, columns of W) per
    program (powers of two; tests and tuning)."""
    check_can_run("lora_merged_weight", weight, lora_A, lora_B)
    n_out, n_in = weight.shape
    rank = lora_A.shape[0]
    if lora_A.shape != (rank, n_in) or lora_B.shape != (n_out, rank):
        raise ValueError(f"lora_merged_weight: weight (out, in), lora_A (r, in), lora_B (out, r) expected, got "
                         f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    w, a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (weight, lora_A, lora_B))
    out = torch.empty((n_out, n_in), dtype=store_dtype(weight.dtype), device=weight.device)
    if out.numel() == 0:
        return out.to(weight.dtype)
    block_o, block_i = block or _tiles(n_out, n_in)
    with launch_device(w):
        blocks_i = cdiv(n_in, block_i)
        _lora_merge_kernel[(cdiv(n_out, block_o) * blocks_i,)](
            w, a, b, out, n_out, n_in, rank, float(scaling), w.stride(0), a.stride(0), b.stride(0), out.stride(0),
            blocks_i, BLOCK_O=block_o, BLOCK_I=block_i, num_warps=_warps(block_o, block_i))
    return out.to(weight.dtype)


# ---------------------------------------------------------------- torch.library registration

@torch.library.custom_op("segpcl::lora_merged_weight", mutates_args=())
def lora_merged_weight_op(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scaling: float) -> torch.Tensor:
    return lora_merged_weight_triton(weight, lora_A, lora_B, scaling)


@lora_merged_weight_op.register_fake
def _lora_merged_weight_fake(weight, lora_A, lora_B, scaling):
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
