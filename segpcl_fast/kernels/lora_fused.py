"""The LoRA-B-only linear as two Triton GEMMs, each with its rank-r product folded into the same launch.

    y = x W'^T + b,  u = x A^T                     (forward; W' = W + s B A, kernels/lora_merge.py)
    grad_x = g W',   grad_B = s g^T u              (backward; g = d loss / d y)

The frozen base linear is two GEMMs (y, grad_x). The merged arrangement (ops/lora_linear.py) adds
three more launches around them: u = x A^T (reads x again), g^T u (reads g again: 155 MB for a
ViT-B/16 c_fc at batch 128, 0.037 ms at an H200's copy bandwidth, measured 0.066 ms) and W + s B A;
that left it at 1.59x the base on an H200 (BENCHMARKS.md, session 35). Here each GEMM's launch
also runs the rank-r product's programs: a grid of GEMM tiles with "side" programs interleaved
among them (`_is_side`), so the memory-bound side work runs on the SMs beside the compute-bound
tiles instead of after them.

- forward: GEMM tiles of y (grouped along M for L2 reuse), and one side program per M block that
  computes that block's u = x A^T (BLOCK_M x r).
- backward: GEMM tiles of grad_x, and side programs that each reduce g^T u over one block of out
  and one of `splits` ranges of rows into an fp32 partial; the partials are summed in a fixed order
  afterwards (deterministic: no atomics), scaled by s and rounded once. With splits = 1 the side
  programs write grad_B themselves.

Storage bf16 / fp16 on a GPU (tensor-core tl.dot, fp32 accumulation); fp32 runs on the merged
arrangement there (a fp32 tl.dot without TF32 is slow). Under TRITON_INTERPRET=1 (tests) any float
dtype runs, with every tile cast to fp32 before tl.dot (the interpreter's bf16 dot is wrong) and
results stored in fp32, then rounded by torch.

Contents: the kernels and launchers, the custom ops `segpcl::lora_fused_fwd` (with fake and autograd)
and `segpcl::lora_fused_bwd` (with fake), and `lora_b_linear_fused`, the layer's function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._triton_utils import (cdiv, check_can_run, interpret_mode, launch_device, lazy_jit, next_pow2,
                            refuse_double_backward, refuse_frozen_grads, store_dtype)
from .lora_merge import lora_merged_weight_triton

tl = None  # triton.language, bound by lazy_jit at the first launch

__all__ = ["lora_b_linear_fused", "lora_fused_forward", "lora_fused_backward", "fused_supported", "FusedTiles",
           "MAX_RANK"]

# widest rank r the kernels hold in one tile: at r 192 (BLOCK_R 256) the backward needs 240 KiB of shared
# memory on sm_90, over its 227 (check_triton_build); wider layers take the merged arrangement
MAX_RANK = 128


@lazy_jit
def _is_side(pid, n_gemm, n_side):
    """Programs 0, period, 2 period, ... (n_side of them) are side programs, the rest GEMM tiles.
    Returns (is_side, side index, GEMM tile index)."""
    period = (n_gemm + n_side) // n_side
    side = (pid % period == 0) & (pid // period < n_side)
    tile = pid - tl.minimum(pid // period + 1, n_side)
    return side, pid // period, tile


@lazy_jit
def _tile_mn(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """GEMM tile index -> (pid_m, pid_n), GROUP_M row blocks at a time (their B columns stay in L2)."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % in_group) % group_m, (tile % in_group) // group_m


@lazy_jit
def _tile(ptr, rows, cols, stride_rows, stride_cols, rows_ok, cols_ok, DOT_FP32: tl.constexpr):
    """A (rows x cols) operand tile, zeros outside the masks; fp32 under the interpreter (its bf16 dot
    is wrong), else as stored (tensor-core tl.dot, fp32 accumulation)."""
    t = tl.load(ptr + rows[:, None] * stride_rows + cols[None, :] * stride_cols, mask=rows_ok[:, None] & cols_ok[None, :],
                other=0.0)
    if DOT_FP32:
        t = t.to(tl.float32)
    return t


@lazy_jit
def _gemm_tile(a_ptr, b_ptr, tile, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr):
    """GEMM tile `tile` of A (M x K) @ B (K x N), both read through their strides: (fp32 accumulator,
    its rows, its columns, their masks). EVEN_K: BLOCK_K divides K, so no K step needs a mask."""
    pid_m, pid_n = _tile_mn(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)  # int32: k * stride stays under out * in < 2^31 (MAX_WEIGHT_ELEMS)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:  # all true: the tiles' masks are the rows' and columns' only, the same every step
            k_ok = tl.full([BLOCK_K], 1, tl.int1)
        else:
            k_ok = kk < K
        acc = tl.dot(_tile(a_ptr, offs_m, kk, stride_am, stride_ak, m_ok, k_ok, DOT_FP32),
                     _tile(b_ptr, kk, offs_n, stride_bk, stride_bn, k_ok, n_ok, DOT_FP32), acc)
    return acc, offs_m, offs_n, m_ok, n_ok


@lazy_jit
def _lora_fwd_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, y_ptr, u_ptr, M, N, K, R,
                     stride_x, stride_w, stride_a, stride_y, stride_u,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    side, side_idx, tile = _is_side(pid, num_pid_m * num_pid_n, num_pid_m)
    # (the compiler wants a name bound in both branches to have one type: each branch has its own)
    if side:  # u[m block] = x[m block] A^T: a GEMM of one column block (r <= BLOCK_R)
        acc_u, offs_m, offs_r, m_ok, r_ok = _gemm_tile(x_ptr, a_ptr, side_idx, M, R, K, stride_x, 1, 1, stride_a,
                                                       BLOCK_M, BLOCK_R, BLOCK_K, 1, DOT_FP32, EVEN_K)
        tl.store(u_ptr + offs_m[:, None] * stride_u + offs_r[None, :], acc_u.to(u_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & r_ok[None, :])
    else:  # y tile = x W'^T + b (W' is (N, K): its transpose read through the strides)
        acc, offs_m, offs_n, m_ok, n_ok = _gemm_tile(x_ptr, w_ptr, tile, M, N, K, stride_x, 1, 1, stride_w,
                                                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, DOT_FP32, EVEN_K)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@lazy_jit
def _lora_bwd_kernel(g_ptr, w_ptr, u_ptr, gx_ptr, part_ptr, M, N, K, R, rows_per_split, n_splits, scaling,
                     stride_g, stride_w, stride_u, stride_gx,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
                     BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, FINAL: tl.constexpr,
                     EVEN_K: tl.constexpr):
    # g: (M, K = out), W': (K = out, N = in), u: (M, R); grad_x: (M, N); part: (n_splits, K, R) fp32,
    # or grad_B (K, R) itself when FINAL (one split: scaled by s and rounded here)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_o = tl.cdiv(K, BLOCK_O)
    side, side_idx, tile = _is_side(pid, num_pid_m * num_pid_n, num_pid_o * n_splits)
    if side:  # part[split, o block] = sum over the split's rows of g[rows, o block]^T u[rows]
        split = side_idx // num_pid_o
        offs_o = (side_idx % num_pid_o).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_r = tl.arange(0, BLOCK_R)
        o_ok = offs_o < K
        r_ok = offs_r < R
        row_end = tl.minimum((split + 1) * rows_per_split, M)
        acc_gu = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
        for m0 in range(split * rows_per_split, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            row_ok = rows < row_end
            acc_gu = tl.dot(_tile(g_ptr, offs_o, rows, 1, stride_g, o_ok, row_ok, DOT_FP32),  # g^T
                            _tile(u_ptr, rows, offs_r, stride_u, 1, row_ok, r_ok, DOT_FP32), acc_gu)
        out = part_ptr + split.to(tl.int64) * K * R + offs_o[:, None] * R + offs_r[None, :]
        if FINAL:
            tl.store(out, (acc_gu * scaling).to(part_ptr.dtype.element_ty), mask=o_ok[:, None] & r_ok[None, :])
        else:
            tl.store(out, acc_gu, mask=o_ok[:, None] & r_ok[None, :])
    else:  # grad_x tile = g W'
        acc, offs_m, offs_n, m_ok, n_ok = _gemm_tile(g_ptr, w_ptr, tile, M, N, K, stride_g, 1, stride_w, 1,
                                                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, DOT_FP32, EVEN_K)
        tl.store(gx_ptr + offs_m[:, None] * stride_gx + offs_n[None, :], acc.to(gx_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@dataclass
class FusedTiles:
    """Tile sizes and launch knobs (GPU defaults; the interpreter takes few, large programs).
    block_o: rows of out per g^T u side program; splits: row ranges g^T u is reduced over (None: by
    the row count, `n_splits`)."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    block_o: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    splits: Optional[int] = None

    @classmethod
    def default(cls) -> "FusedTiles":
        if interpret_mode():
            return cls(block_m=32, block_n=32, block_k=32, block_o=32, group_m=2, num_warps=4, num_stages=1)
        return cls()

    def n_splits(self, rows: int) -> int:
        """Row ranges g^T u is reduced over: about 4096 rows each (a 0.5-1 MB stream of g per side
        program at 64 columns), at most 16."""
        if self.splits is not None:
            return max(1, self.splits)
        return max(1, min(16, cdiv(rows, 4096)))


# the GEMMs index W's tile rows k * stride in int32 (int64 offsets cost the sm_90 kernels 4-7 % more
# instructions): W with 2^31 elements or more runs the merged arrangement
MAX_WEIGHT_ELEMS = 1 << 31


# on a GPU the GEMMs' widths (in, out: their K and their row strides) must be multiples of this. Triton
# assumes an integer argument divisible by 16 only when it is one; otherwise the masked loads are 2 bytes
# wide, too narrow for the async copies that prefetch the next K step, and the sm_90 kernels lose their
# pipelining (4096 x 1000 -> 1000 bf16: the forward spilled 88 B a thread, the backward took 255 registers and
# 40 KiB of shared memory instead of 96; 1008 -> 1040 neither: a 2026-12-06 review's sm_90 build, BENCHMARKS.md
# "Session 49"). Such layers run the merged arrangement.
GPU_WIDTH_MULTIPLE = 16


def fused_supported(device: torch.device, dtype: torch.dtype, rank: int = 1,
                    weight_shape: tuple[int, int] = (0, 0)) -> bool:
    """Where the fused kernels take x: bf16 / fp16 on CUDA (tensor-core tl.dot) with in and out
    multiples of GPU_WIDTH_MULTIPLE, or fp32 / bf16 / fp16 of any width on the CPU under the
    interpreter (tests: the ragged widths exercise the masks); LoRA rank r up to MAX_RANK; W
    (weight_shape = (out, in)) under MAX_WEIGHT_ELEMS elements."""
    n_out, n_in = weight_shape
    if rank > MAX_RANK or n_out * n_in >= MAX_WEIGHT_ELEMS:
        return False
    if interpret_mode() and device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    aligned = n_out % GPU_WIDTH_MULTIPLE == 0 and n_in % GPU_WIDTH_MULTIPLE == 0
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and aligned


def _check_weight_size(weight: torch.Tensor, read_as_is: bool = True) -> None:
    """The GEMMs' W' (out x in, unit column stride) is indexed k * stride(0) + n in int32: its rows' reach
    must stay under 2^31. read_as_is=False: a W whose merged W' the forward makes contiguous (its strides
    do not matter)."""
    rows, cols = weight.shape
    reach = rows * (max(weight.stride(0), cols) if read_as_is else cols)
    if reach >= MAX_WEIGHT_ELEMS:
        raise ValueError(f"lora_fused: W {tuple(weight.shape)} (row stride {weight.stride(0)}) spans 2^31 elements "
                         "or more, past the kernels' int32 offsets; the merged arrangement (ops backend 'auto') "
                         "takes it")


def _check_dtype_and_rank(t: torch.Tensor, rank: int) -> None:
    """The launchers' dtype and rank rules (the device is check_can_run's): bf16 / fp16, or any of
    fused_supported's under the interpreter; r up to MAX_RANK."""
    if t.dtype not in (torch.bfloat16, torch.float16) and not fused_supported(t.device, t.dtype):
        raise TypeError(f"lora_fused: the fused Triton kernels take bf16 / fp16 on CUDA, got {t.dtype} on {t.device}; "
                        "fp32 runs the merged arrangement (ops backend 'auto')")
    if rank > MAX_RANK:
        raise ValueError(f"lora_fused: rank {rank} exceeds the kernels' tile (r <= {MAX_RANK}); the merged "
                         "arrangement (ops backend 'auto') takes any rank")


def _check_operands(op: str, named: dict, shapes: dict) -> None:
    """One dtype for every operand (tl.dot takes one on a GPU; the interpreter's fp32 casts hide a mix) and
    the shapes the kernels index by (a direct torch.ops.segpcl call skips lora_b_linear's checks)."""
    dtypes = {name: t.dtype for name, t in named.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"{op}: all operands must share one dtype, got {dtypes}; cast them to x's dtype")
    for name, want in shapes.items():
        t = named[name]
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., d) as a (rows, d) matrix with unit stride along d (a view where possible)."""
    t = t.reshape(t.shape[:-1].numel(), t.shape[-1])  # not (-1, d): d = 0 leaves -1 ambiguous
    return t if t.stride(-1) == 1 else t.contiguous()


def lora_fused_forward(x, weight, bias, lora_A, lora_B, scaling, tiles: Optional[FusedTiles] = None):
    """(y (..., out), u (..., r), W + s B A (out, in)), in x's dtype."""
    check_can_run("lora_fused", x, weight, lora_A, lora_B, *([] if bias is None else [bias]))
    _check_dtype_and_rank(x, lora_A.shape[0])
    n_out, rank = lora_B.shape if lora_B.dim() == 2 else (-1, -1)
    _check_operands("lora_fused_fwd", dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B),
                    dict(weight=(n_out, x.shape[-1]), bias=(n_out,), lora_A=(rank, x.shape[-1])))
    _check_weight_size(weight, read_as_is=False)
    tiles = tiles or FusedTiles.default()
    merged = lora_merged_weight_triton(weight, lora_A, lora_B, scaling)
    x2 = _rows(x)
    M, K = x2.shape
    N, R = weight.shape[0], lora_A.shape[0]
    dtype = store_dtype(x.dtype)
    lead = x.shape[:-1]
    # made in their final shapes: the op returns these tensors themselves, not views of them (an
    # output that is a view cannot be changed in place downstream)
    y_out = torch.empty((*lead, N), dtype=dtype, device=x.device)
    u_out = torch.empty((*lead, R), dtype=dtype, device=x.device)
    y, u = y_out.view(M, N), u_out.view(M, R)
    if M > 0:
        a = lora_A if lora_A.stride(-1) == 1 else lora_A.contiguous()
        b = bias.contiguous() if bias is not None else merged  # any pointer: HAS_BIAS=False never reads it
        n_prog = cdiv(M, tiles.block_m) * (cdiv(N, tiles.block_n) + 1)
        with launch_device(x2):
            _lora_fwd_kernel[(n_prog,)](
                x2, merged, b, a, y, u, M, N, K, R, x2.stride(0), merged.stride(0), a.stride(0), y.stride(0),
                u.stride(0), HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                BLOCK_K=tiles.block_k, BLOCK_R=max(16, next_pow2(R)), GROUP_M=tiles.group_m,
                DOT_FP32=interpret_mode(), EVEN_K=K % tiles.block_k == 0, num_warps=tiles.num_warps,
                num_stages=tiles.num_stages)
    return y_out.to(x.dtype), u_out.to(x.dtype), merged


def lora_fused_backward(grad_y, u, merged, lora_B, scaling, tiles: Optional[FusedTiles] = None):
    """(grad_x (..., in), grad_B (out, r)): grad_x = g W', grad_B = s g^T u (deterministic)."""
    check_can_run("lora_fused", grad_y, u, merged, lora_B)
    _check_dtype_and_rank(grad_y, u.shape[-1])
    _check_operands("lora_fused_bwd", dict(grad_y=grad_y, u=u, merged=merged),  # lora_B: grad_B's dtype and shape only
                    dict(u=(*grad_y.shape[:-1], u.shape[-1]), merged=(grad_y.shape[-1], merged.shape[-1])))
    if tuple(lora_B.shape) != (grad_y.shape[-1], u.shape[-1]):
        raise ValueError(f"lora_fused_bwd: lora_B must have shape {(grad_y.shape[-1], u.shape[-1])}, got "
                         f"{tuple(lora_B.shape)}")
    merged = merged if merged.stride(1) == 1 else merged.contiguous()  # the kernel reads W' rows with unit stride
    _check_weight_size(merged)
    tiles = tiles or FusedTiles.default()
    g2, u2 = _rows(grad_y), _rows(u)
    M, K = g2.shape  # K = out
    N, R = merged.shape[1], u2.shape[1]
    dtype = store_dtype(grad_y.dtype)
    grad_x_out = torch.empty((*grad_y.shape[:-1], N), dtype=dtype, device=grad_y.device)  # returned itself
    grad_x = grad_x_out.view(M, N)
    splits = tiles.n_splits(M) if M > 0 else 1
    final = splits == 1
    part = torch.empty((K, R) if final else (splits, K, R), dtype=store_dtype(lora_B.dtype) if final else torch.float32,
                       device=grad_y.device)
    if M > 0 and K > 0:  # K = 0 (no output column) would leave no side program: _is_side divides by 0
        n_prog = cdiv(M, tiles.block_m) * cdiv(N, tiles.block_n) + cdiv(K, tiles.block_o) * splits
        with launch_device(g2):
            _lora_bwd_kernel[(n_prog,)](
                g2, merged, u2, grad_x, part, M, N, K, R, cdiv(M, splits), splits, float(scaling),
                g2.stride(0), merged.stride(0), u2.stride(0), grad_x.stride(0),
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_O=tiles.block_o,
                BLOCK_R=max(16, next_pow2(R)), GROUP_M=tiles.group_m, DOT_FP32=interpret_mode(), FINAL=final,
                EVEN_K=K % tiles.block_k == 0, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    else:  # nothing to reduce over: grad_x = g W' and g^T u are zeros
        grad_x.zero_()
        part.zero_()
    if final:
        grad_B = part.to(lora_B.dtype)
    else:  # the partials summed in split order (a fixed-shape reduction: deterministic), scaled, rounded once
        grad_B = torch.empty((K, R), dtype=lora_B.dtype, device=grad_y.device)
        torch.mul(part.sum(0), float(scaling), out=grad_B)
    return grad_x_out.to(grad_y.dtype), grad_B


# ---------------------------------------------------------------- torch.library registration

@torch.library.custom_op("segpcl::lora_fused_fwd", mutates_args=())
def lora_fused_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, u, W + s B A): u and the merged weight are for the backward."""
    return lora_fused_forward(x, weight, bias, lora_A, lora_B, scaling)


@lora_fused_fwd_op.register_fake
def _lora_fused_fwd_fake(x, weight, bias, lora_A, lora_B, scaling):
    lead = x.shape[:-1]
    return (x.new_empty((*lead, weight.shape[0])), x.new_empty((*lead, lora_A.shape[0])),
            weight.new_empty(weight.shape))


@torch.library.custom_op("segpcl::lora_fused_bwd", mutates_args=())
def lora_fused_bwd_op(grad_y: torch.Tensor, u: torch.Tensor, merged: torch.Tensor, lora_B: torch.Tensor,
                      scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return lora_fused_backward(grad_y, u, merged, lora_B, scaling)


@lora_fused_bwd_op.register_fake
def _lora_fused_bwd_fake(grad_y, u, merged, lora_B, scaling):
    return grad_y.new_empty((*grad_y.shape[:-1], merged.shape[1])), lora_B.new_empty(lora_B.shape)


def _fused_setup_context(ctx, inputs, output):
    x, _weight, _bias, _lora_A, lora_B, scaling = inputs
    refuse_frozen_grads("segpcl::lora_fused_fwd", ctx.needs_input_grad)
    _, u, merged = output
    ctx.scaling = scaling
    ctx.mark_non_differentiable(u, merged)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(u, merged, lora_B)  # u = x A^T (N x r), not x


def _fused_backward(ctx, grad_y, _grad_u, _grad_merged):
    if grad_y is None:
        return None, None, None, None, None, None
    refuse_double_backward("lora_b_linear (fused Triton)")  # u is saved without its graph
    u, merged, lora_B = ctx.saved_tensors
    need_x, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
    grad_x = grad_B = None
    if need_x and need_B:
        grad_x, grad_B = torch.ops.segpcl.lora_fused_bwd(grad_y, u, merged, lora_B, ctx.scaling)
    elif need_x:
        grad_x = grad_y @ merged
    elif need_B:  # a tower's first LoRA layer (x needs no gradient): g^T u alone
        grad_B = torch.addmm(lora_B, grad_y.reshape(-1, grad_y.shape[-1]).t(), u.reshape(-1, u.shape[-1]),
                             beta=0, alpha=ctx.scaling)
    return grad_x, None, None, None, grad_B, None


lora_fused_fwd_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def lora_b_linear_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                        lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y = x (W + s B A)^T + b through the fused Triton ops (arguments checked by the caller)."""
    y, _u, _merged = torch.ops.segpcl.lora_fused_fwd(x, weight, bias, lora_A, lora_B, float(scaling))
    return y
