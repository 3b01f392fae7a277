"""TSGR text-space geometry loss over fixed kNN subgraphs (method.md stage 2, L_GR).

For root r with neighbours N(r) = neighbors[r, :] (k rows of the student text embeddings):

    q_S[r] = softmax_j( emb[roots[r]] . emb[neighbors[r, j]] / tau )
    L_GR   = mean_r KL( q_0[r] || q_S[r] ),      q_0[r] = exp(ref_logprob[r]) (fixed)

emb is L2-normalised by the caller, so the dot product is the cosine. ref_logprob comes from the
reference (pretrained) embeddings once per task: `knn_reference_logprob`.

Forward kernel (one root per loop step, `roots_per_program` per program): gathers the root row
and its k neighbour rows once, and writes the per-root KL, g[r, j] = d KL_r / d sim[r, j] =
(q_S * sum(q_0) - q_0) / tau, and the root's gradient sum_j g[r, j] emb[neighbors[r, j]] (the
neighbour rows are already loaded). Backward scatters into emb deterministically, with no float
atomics, from a *plan* of the graph (`knn_backward_plan`, one int64 tensor): the R * (k + 1)
contributions (R root rows, then R * k neighbour rows in row-major order) stably sorted by target
row, CSR offsets giving each row of emb its run of them (searchsorted, no host sync), and for each
contribution the row it reads (g_root[r] for a root, emb[roots[r]] for a neighbour slot of root r).
The plan depends on the indices only: a caller whose graph is fixed (the trainer's TSGR graph, one
per task) builds it once and passes it, and the backward then launches one kernel; without it the
backward builds it (a sort and a search, a few launches). One program per row of emb loads its
contributions' rows together (up to BLOCK_C at a time, so the gathers are in flight at once rather
than one dependent load chain each), sums them in the plan's fixed order and writes the row once
(zeros for rows nothing points at, so the gradient needs no separate zero fill). Duplicate
neighbours and a root listed among its own neighbours are summed like any other contributions.
Compute is fp32; the loss is fp32, the gradient has emb's dtype.

NaN / inf: a NaN in a gathered embedding row or in ref_logprob[r] makes KL_r and the loss NaN (on
the reference too). ref_logprob = -inf marks a neighbour with q_0 = 0: it contributes 0 to the KL
(0 * log 0 = 0) and still receives gradient through the softmax. 0 roots give NaN (the mean of
nothing). Indices outside [0, classes) raise (a device assert on CUDA). float64 runs on the
reference, in float64.

Contents: `knn_subgraph_kl_reference` (the spec), `knn_reference_logprob`, `knn_backward_plan`,
the Triton kernels and launchers, and the custom ops `segpcl::knn_subgraph_kl_rows` (with fake + autograd) and
`segpcl::knn_subgraph_kl_backward` (with fake).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._triton_utils import (autocast_off, cdiv, check_can_run, check_pow2_knobs, check_tau, compute_dtype,
                            interpret_mode, launch_device, lazy_jit, next_pow2, refuse_double_backward, store_dtype,
                            tau_value)

tl = None  # triton.language, bound by lazy_jit at the first launch

__all__ = ["knn_subgraph_kl_reference", "knn_reference_logprob", "knn_subgraph_kl_fused", "knn_backward_plan",
           "check_knn_inputs", "check_knn_plan", "MAX_FUSED_TILE", "MAX_FUSED_DIM",
           "fused_fits"]

MAX_FUSED_TILE = 1 << 15  # next_pow2(k) * next_pow2(d) elements held by a forward program (1 << 16 spilled on sm_90)
MAX_FUSED_DIM = 1 << 13  # next_pow2(d) of a backward program (16384 spilled on sm_90)
MAX_CONTRIBUTIONS = 1 << 31  # R * (k + 1): the backward numbers contributions in int32


def fused_fits(k: int, d: int, n_roots: int = 0) -> bool:
    """Whether the kernels take k neighbours of d-dim embeddings without spilling (sm_90, Triton 3.8:
    check_triton_build), and R = n_roots roots (R * (k + 1) < MAX_CONTRIBUTIONS); other problems run
    on the reference.

    k and R are only compared, never read as ints: in the compiled loss terms (engine/compiling.py)
    they are symbolic (k = min(tsgr.k, seen classes - 1) and R, the task's new classes, change between
    tasks), and next_pow2(k) specialised the graph on each k, one recompile per value (a sweep over
    tsgr.k, or tasks of 1-2 classes, met dynamo's recompile limit). d, the model's width, is an int."""
    widest_k = MAX_FUSED_TILE // next_pow2(d)  # next_pow2(k) * next_pow2(d) <= the tile iff k <= this
    return k <= widest_k and next_pow2(d) <= MAX_FUSED_DIM and n_roots * (k + 1) < MAX_CONTRIBUTIONS


def _subgraph_similarities(emb: torch.Tensor, roots: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """sim[r, j] = emb[roots[r]] . emb[neighbors[r, j]], fp32 (fp64 for fp64 emb), shape (R, k), whatever the
    caller's autocast (which made it bf16 at tau 0.05: a loss > 0 at student = reference, off the kernel's)."""
    emb = emb.to(compute_dtype(emb))
    with autocast_off(emb.device.type):
        return torch.einsum("rd,rkd->rk", emb[roots], emb[neighbors])


def knn_reference_logprob(ref_emb: torch.Tensor, roots: torch.Tensor, neighbors: torch.Tensor,
                          tau: float) -> torch.Tensor:
    """log q_0 = log_softmax_j(cos(u_0,root, u_0,j) / tau) from the reference embeddings, fp32 (fp64 for
    fp64 ref_emb), (R, k).

    ref_emb must already be L2-normalised (rows); computed once, without gradient.
    """
    tau = tau_value("knn_reference_logprob", tau)
    with torch.no_grad():
        return F.log_softmax(_subgraph_similarities(ref_emb, roots, neighbors) / tau, dim=-1)


def knn_subgraph_kl_reference(emb: torch.Tensor, roots: torch.Tensor, neighbors: torch.Tensor,
                              ref_logprob: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_r KL(q_0[r] || q_S[r]) with q_S[r] = softmax_j(emb[root] . emb[neighbour_j] / tau), fp32
    (fp64 for fp64 emb). q_0 is a constant; 0 * log 0 = 0, and a NaN stays NaN."""
    log_q_student = F.log_softmax(_subgraph_similarities(emb, roots, neighbors) / tau, dim=-1)
    log_q_ref = ref_logprob.detach().to(log_q_student.dtype)
    q_ref = log_q_ref.exp()
    kl_rows = torch.where(q_ref == 0, 0.0, q_ref * (log_q_ref - log_q_student)).sum(-1)
    return kl_rows.mean()


def check_knn_inputs(emb, roots, neighbors, ref_logprob, tau, check_indices: bool = True) -> None:
    """Shape / dtype / device checks, and an index range check that does not sync with the host
    (torch._assert_async: on CUDA a failure surfaces at the next synchronisation, as a device assert)."""
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"knn_subgraph_kl: emb must be a floating (classes, dim) matrix, got "
                         f"{tuple(emb.shape)} {emb.dtype}")
    if roots.dim() != 1 or neighbors.dim() != 2 or neighbors.shape[0] != roots.shape[0]:
        raise ValueError(f"knn_subgraph_kl: roots must be (R,) and neighbors (R, k); got {tuple(roots.shape)} "
                         f"and {tuple(neighbors.shape)}")
    if roots.dtype != torch.int64 or neighbors.dtype != torch.int64:
        raise TypeError(f"knn_subgraph_kl: roots / neighbors must be int64 (torch.long), got {roots.dtype} / "
                        f"{neighbors.dtype}; use .long()")
    if not ref_logprob.is_floating_point():
        raise TypeError(f"knn_subgraph_kl: ref_logprob must be a floating tensor of log-probabilities, got "
                        f"{ref_logprob.dtype}; compute it with knn_reference_logprob(ref_emb, roots, neighbors, tau)")
    if ref_logprob.shape != neighbors.shape:
        raise ValueError(f"knn_subgraph_kl: ref_logprob has shape {tuple(ref_logprob.shape)}, neighbors "
                         f"{tuple(neighbors.shape)}; compute it with knn_reference_logprob(ref_emb, roots, "
                         "neighbors, tau)")
    devices = {t.device for t in (emb, roots, neighbors, ref_logprob)}
    if len(devices) != 1:
        raise ValueError(f"knn_subgraph_kl: all inputs must be on one device, got {sorted(map(str, devices))}")
    check_tau("knn_subgraph_kl", tau)
    # `> 0`, not a size's truth value: torch 2.6's dynamo turned that into a guard on the exact root count
    if check_indices and roots.numel() > 0:
        n = emb.shape[0]
        lo, hi = torch.aminmax(roots)
        if neighbors.numel() > 0:  # k = 0 (a graph over one seen class) has only roots to check
            nb_lo, nb_hi = torch.aminmax(neighbors)
            lo, hi = torch.minimum(lo, nb_lo), torch.maximum(hi, nb_hi)
        in_range = (lo >= 0) & (hi < n)
        # under torch.compile the message names no size: formatting emb.shape[0] into it specialises the
        # graph to that class count (a recompile per task's class count; with dynamic=True an error)
        bound = "emb.shape[0]" if torch.compiler.is_compiling() else str(n)
        torch._assert_async(in_range, f"knn_subgraph_kl: roots and neighbors must be row indices of emb, in "
                                      f"[0, {bound}); got a negative one or one >= {bound}")


@lazy_jit
def _knn_kl_fwd_kernel(emb_ptr, roots_ptr, nb_ptr, ref_ptr, kl_ptr, g_ptr, groot_ptr,
                       n_roots, k, d, stride_e, tau, scale,
                       ROOTS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    k_ok = offs_k < k
    d_ok = offs_d < d
    log2e_over_tau = 1.4426950408889634 / tau  # once a program
    for i in range(ROOTS):
        r = pid * ROOTS + i
        if r < n_roots:
            root = tl.load(roots_ptr + r)
            e_root = tl.load(emb_ptr + root * stride_e + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            nb = tl.load(nb_ptr + r * k + offs_k, mask=k_ok, other=0)
            e_nb = tl.load(emb_ptr + nb[:, None] * stride_e + offs_d[None, :],
                           mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            # base-2 softmax (exp2 is one sm_90 instruction, exp five; a division by tau an element six):
            # the maximum is subtracted before the scale log2(e) / tau, as anchor_kl does
            dots = tl.where(k_ok, tl.sum(e_nb * e_root[None, :], axis=1), float("-inf"))
            shifted = (dots - tl.max(dots, axis=0)) * log2e_over_tau  # log2 of q_S up to its normaliser
            q_exp = tl.exp2(shifted)
            q_sum = tl.sum(q_exp, axis=0)
            log2_q = shifted - tl.log2(q_sum)
            log_q0 = tl.load(ref_ptr + r * k + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            log2_q0 = tl.where(k_ok, log_q0 * 1.4426950408889634, float("-inf"))
            q0 = tl.exp2(log2_q0)
            has_mass = q0 > 0
            kl = tl.sum(q0 * (tl.where(has_mass, log2_q0, 0.0) - tl.where(has_mass, log2_q, 0.0)),
                        axis=0) * 0.6931471805599453  # ln 2
            g = tl.where(k_ok, (q_exp * (tl.sum(q0, axis=0) / q_sum) - q0) * (scale / tau), 0.0)
            g_root = tl.sum(g[:, None] * e_nb, axis=0)
            tl.store(kl_ptr + r, kl * scale)
            tl.store(g_ptr + r * k + offs_k, g, mask=k_ok)
            tl.store(groot_ptr + r * d + offs_d, g_root, mask=d_ok)

@lazy_jit
def _knn_kl_bwd_kernel(plan_ptr, grad_kl_ptr, stride_gkl, groot_ptr, g_ptr, emb_ptr, out_ptr,
                       n_rows, n_roots, k, n_contrib, d, stride_e, stride_out,
                       ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    d_ok = offs_d < d
    source_ptr = plan_ptr + n_rows + 1  # the plan: row_start (n_rows + 1), source, gather_row (n_contrib each)
    gather_ptr = source_ptr + n_contrib
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            # this row's contributions are source[row_start[row]:row_start[row + 1]], in the plan's order
            start = tl.load(plan_ptr + row)
            end = tl.load(plan_ptr + row + 1)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for q0 in range(start, end, BLOCK_C):
                q = q0 + offs_c
                ok = q < end
                src = tl.load(source_ptr + q, mask=ok, other=0)
                gather = tl.load(gather_ptr + q, mask=ok, other=0)
                is_root = ok & (src < n_roots)
                is_nb = ok & (src >= n_roots)
                # root r = src: w = grad_kl[r], row g_root[r] (its precomputed sum_j g[r, j] emb[nb_j]);
                # neighbour slot (r, j) = src - n_roots: w = grad_kl[r] g[r, j], row emb[roots[r]]
                # int32: contributions number under 2^31 (the launchers check), and a 64-bit division is a
                # branch to a 64-bit routine beside the 32-bit one, for each contribution
                slot = tl.where(is_nb, src - n_roots, 0).to(tl.int32)
                r = tl.where(is_root, src, (slot // k).to(tl.int64))
                w = tl.load(grad_kl_ptr + r * stride_gkl, mask=ok, other=0.0).to(tl.float32)
                w_nb = w * tl.load(g_ptr + slot, mask=is_nb, other=0.0)
                v_root = tl.load(groot_ptr + gather[:, None] * d + offs_d[None, :],
                                 mask=is_root[:, None] & d_ok[None, :], other=0.0)
                v_nb = tl.load(emb_ptr + gather[:, None] * stride_e + offs_d[None, :],
                               mask=is_nb[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                contrib = tl.where(is_root[:, None], w[:, None] * v_root, w_nb[:, None] * v_nb)
                acc += tl.sum(contrib, axis=0)
            tl.store(out_ptr + row * stride_out + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def _tile(k: int, d: int) -> tuple[int, int]:
    return next_pow2(k), next_pow2(d)


def forward_warps(block_k: int, block_d: int) -> int:
    """Warps of a forward program: 4, or 8 over a 4096-element (next_pow2(k) x next_pow2(d)) tile."""
    return 4 if block_k * block_d <= 4096 else 8


def knn_kl_forward_triton(emb, roots, neighbors, ref_logprob, tau, roots_per_program: int | None = None,
                          scale: float = 1.0, mean: bool = False, num_warps: int | None = None):
    """Launch the forward kernel: (kl_rows (R,), g (R, k), g_root (R, d)), all fp32 and all multiplied
    by `scale`, and by 1 / R too when `mean` (R read here, from the tensor: constant arguments for
    torch.compile, not a new constant per R). roots_per_program, num_warps: knobs (benchmarks/
    tune_kernels_cuda.py knn); None takes the defaults."""
    check_can_run("knn_subgraph_kl", emb, roots, neighbors, ref_logprob)
    # shapes also for a direct torch.ops.segpcl call; index ranges are checked by ops.knn_subgraph_kl
    # (check_indices), a raw op's caller's contract
    check_knn_inputs(emb, roots, neighbors, ref_logprob, tau, check_indices=False)
    check_pow2_knobs("knn_subgraph_kl", num_warps=num_warps)
    n_roots, k = neighbors.shape
    scale = scale / max(n_roots, 1) if mean else scale
    d = emb.shape[1]
    block_k, block_d = _tile(k, d)
    if not fused_fits(k, d, n_roots):
        raise ValueError(f"knn_subgraph_kl: k={k}, d={d} exceed the fused tiles (next_pow2(k) * next_pow2(d) <= "
                         f"{MAX_FUSED_TILE}, next_pow2(d) <= {MAX_FUSED_DIM}), or R={n_roots} roots R * (k + 1) >= "
                         f"{MAX_CONTRIBUTIONS}; use the reference backend")
    emb_c = emb if emb.stride(-1) == 1 else emb.contiguous()
    f32 = dict(dtype=torch.float32, device=emb.device)
    if n_roots == 0 or k == 0:
        return torch.zeros(n_roots, **f32), torch.zeros((n_roots, k), **f32), torch.zeros((n_roots, d), **f32)
    # the kernel writes every element of all three (no zero fills: each is a launch on the GPU)
    kl, g, g_root = torch.empty(n_roots, **f32), torch.empty((n_roots, k), **f32), torch.empty((n_roots, d), **f32)
    if roots_per_program is None:
        roots_per_program = cdiv(n_roots, 4) if interpret_mode() else 1
    grid = (cdiv(n_roots, roots_per_program),)
    with launch_device(emb):
        _knn_kl_fwd_kernel[grid](emb_c, roots.contiguous(), neighbors.contiguous(), ref_logprob.float().contiguous(),
                                 kl, g, g_root, n_roots, k, d, emb_c.stride(0), float(tau), float(scale),
                                 ROOTS=roots_per_program, BLOCK_K=block_k, BLOCK_D=block_d,
                                 num_warps=num_warps or forward_warps(block_k, block_d))
    return kl, g, g_root


def knn_backward_plan(roots: torch.Tensor, neighbors: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The backward's plan of a graph over an embedding matrix of n_rows rows, one int64 tensor of
    n_rows + 1 + 2 * R * (k + 1) entries: [row_start | source | gather_row].

    The R * (k + 1) contributions are numbered root r -> r, neighbour slot (r, j) -> R + r * k + j;
    source lists them stably sorted by the row of emb they add to (roots[r], neighbors[r, j]), row t's
    run being source[row_start[t]:row_start[t + 1]]; gather_row[q] is the row contribution source[q]
    reads: r (a row of g_root) for a root, roots[r] (a row of emb) for a neighbour slot. It depends on
    the indices only, so a fixed graph builds it once (TSGRGraph does) and passes it to every call.
    No host sync."""
    n_roots, k = neighbors.shape
    targets = torch.cat([roots, neighbors.reshape(-1)])
    sorted_target, source = torch.sort(targets, stable=True)
    row_start = torch.searchsorted(sorted_target, torch.arange(n_rows + 1, device=targets.device))
    owner = roots[(source - n_roots).clamp_min(0) // max(k, 1)] if n_roots else source
    gather_row = torch.where(source < n_roots, source, owner)
    return torch.cat([row_start, source, gather_row])


def plan_size(n_rows: int, n_roots: int, k: int) -> int:
    return n_rows + 1 + 2 * n_roots * (k + 1)


def check_knn_plan(plan: torch.Tensor, emb: torch.Tensor, neighbors: torch.Tensor) -> None:
    """Shape / dtype / device of a plan (its values are the caller's: `knn_backward_plan` of the same
    roots and neighbours, over emb's rows)."""
    want = plan_size(emb.shape[0], *neighbors.shape)
    if plan.dim() != 1 or plan.numel() != want or plan.dtype != torch.int64 or plan.device != emb.device:
        raise ValueError(f"knn_subgraph_kl: plan must be knn_backward_plan(roots, neighbors, emb.shape[0]): an int64 "
                         f"vector of {want} entries on {emb.device}, got {tuple(plan.shape)} {plan.dtype} on "
                         f"{plan.device}; build it again for this graph and embedding matrix")


def backward_warps(block_c: int, block_d: int) -> int:
    """Warps of a backward program: 1024 elements of its (BLOCK_C x BLOCK_D) gather tile a warp, up to 16 (at
    most 4 left d 2048 fp32 spilling on sm_90, and d 8192 2.7 KB a thread)."""
    return max(1, min(16, block_c * block_d // 1024))


def knn_kl_backward_triton(grad_kl, emb, roots, neighbors, g, g_root, plan=None, rows_per_program: int | None = None,
                           contributions_per_load: int = 4, num_warps: int | None = None):
    """Deterministic segment-sum scatter of all contributions into d loss / d emb (emb's dtype).

    plan: `knn_backward_plan(roots, neighbors, emb.shape[0])`, built here when None.
    contributions_per_load: how many of a row's contributions one program gathers at once.
    rows_per_program, num_warps: knobs (benchmarks/tune_kernels_cuda.py knn); None takes the defaults."""
    check_can_run("knn_subgraph_kl", emb, roots, neighbors, g, g_root, grad_kl, *([] if plan is None else [plan]))
    n_roots, k = neighbors.shape
    d = emb.shape[1]
    if (grad_kl.shape, g.shape, g_root.shape) != ((n_roots,), (n_roots, k), (n_roots, d)):
        raise ValueError(f"knn_subgraph_kl backward: grad_kl (R,), g (R, k) and g_root (R, d) expected for R={n_roots}, "
                         f"k={k}, d={d}; got {tuple(grad_kl.shape)}, {tuple(g.shape)}, {tuple(g_root.shape)}")
    if plan is not None:
        check_knn_plan(plan, emb, neighbors)
    check_pow2_knobs("knn_subgraph_kl", num_warps=num_warps)
    if not fused_fits(k, d, n_roots):  # the forward's rule: a backward is of a forward the kernels took
        raise ValueError(f"knn_subgraph_kl backward: k={k}, d={d} exceed the fused tiles (next_pow2(k) * next_pow2(d) "
                         f"<= {MAX_FUSED_TILE}, next_pow2(d) <= {MAX_FUSED_DIM}), or R={n_roots} roots R * (k + 1) >= "
                         f"{MAX_CONTRIBUTIONS}; use the reference backend")
    if n_roots == 0 or k == 0:
        return torch.zeros(emb.shape, dtype=emb.dtype, device=emb.device)
    n_rows = emb.shape[0]
    plan = knn_backward_plan(roots, neighbors, n_rows) if plan is None else plan.contiguous()
    emb_c = emb if emb.stride(-1) == 1 else emb.contiguous()
    out = torch.empty(emb.shape, dtype=store_dtype(emb.dtype), device=emb.device)  # every row is written
    rows = rows_per_program or (cdiv(n_rows, 4) if interpret_mode() else 1)
    block_c, block_d = next_pow2(contributions_per_load), next_pow2(d)
    grad_kl = grad_kl.float()  # the mean's gradient is a stride-0 expand: read through its stride, not copied
    with launch_device(emb):
        _knn_kl_bwd_kernel[(cdiv(n_rows, rows),)](
            plan, grad_kl, grad_kl.stride(0), g_root.contiguous(), g.contiguous(), emb_c, out,
            n_rows, n_roots, k, n_roots * (k + 1), d, emb_c.stride(0), out.stride(0),
            ROWS=rows, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=num_warps or backward_warps(block_c, block_d))
    return out.to(emb.dtype)


# ---------------------------------------------------------------- torch.library registration

@torch.library.custom_op("segpcl::knn_subgraph_kl_rows", mutates_args=())
def knn_subgraph_kl_rows_op(emb: torch.Tensor, roots: torch.Tensor, neighbors: torch.Tensor,
                            ref_logprob: torch.Tensor, tau: float, plan: Optional[torch.Tensor] = None,
                            scale: float = 1.0, mean: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scale * (kl_rows, g, g_root) (/ R with mean); plan (`knn_backward_plan`, optional) is for the
    backward only."""
    return knn_kl_forward_triton(emb, roots, neighbors, ref_logprob, tau, scale=scale, mean=mean)


@knn_subgraph_kl_rows_op.register_fake
def _knn_rows_fake(emb, roots, neighbors, ref_logprob, tau, plan=None, scale=1.0, mean=False):
    n_roots, k = neighbors.shape
    f32 = dict(dtype=torch.float32, device=emb.device)
    return (torch.empty((n_roots,), **f32), torch.empty((n_roots, k), **f32),
            torch.empty((n_roots, emb.shape[1]), **f32))


@torch.library.custom_op("segpcl::knn_subgraph_kl_backward", mutates_args=())
def knn_subgraph_kl_backward_op(grad_kl: torch.Tensor, emb: torch.Tensor, roots: torch.Tensor,
                                neighbors: torch.Tensor, g: torch.Tensor, g_root: torch.Tensor,
                                plan: Optional[torch.Tensor] = None) -> torch.Tensor:
    return knn_kl_backward_triton(grad_kl, emb, roots, neighbors, g, g_root, plan)


@knn_subgraph_kl_backward_op.register_fake
def _knn_backward_fake(grad_kl, emb, roots, neighbors, g, g_root, plan=None):
    return torch.empty(emb.shape, dtype=emb.dtype, device=emb.device)


def _knn_setup_context(ctx, inputs, output):
    emb, roots, neighbors, _, _, plan, _, _ = inputs
    _, g, g_root = output
    ctx.mark_non_differentiable(g, g_root)  # intermediates for the backward, not outputs to differentiate
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(emb, roots, neighbors, g, g_root, plan)


def _knn_backward(ctx, grad_kl, _grad_g, _grad_g_root):
    if grad_kl is None:
        return None, None, None, None, None, None, None, None
    refuse_double_backward("knn_subgraph_kl (Triton)")  # the backward kernel has no autograd of its own
    emb, roots, neighbors, g, g_root, plan = ctx.saved_tensors
    grad_emb = torch.ops.segpcl.knn_subgraph_kl_backward(grad_kl, emb, roots, neighbors, g, g_root, plan)
    return grad_emb, None, None, None, None, None, None, None


knn_subgraph_kl_rows_op.register_autograd(_knn_backward, setup_context=_knn_setup_context)


def knn_subgraph_kl_fused(emb: torch.Tensor, roots: torch.Tensor, neighbors: torch.Tensor,
                          ref_logprob: torch.Tensor, tau: float, plan: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same loss as `knn_subgraph_kl_reference` through the fused ops (Triton), fp32 scalar.
    plan: `knn_backward_plan(roots, neighbors, emb.shape[0])` of a fixed graph (built in the backward
    when None; its shape checked by the caller, ops.knn_subgraph_kl, as the inputs are). The kernel scales each root's KL and derivatives by 1 / R, so the loss is their sum
    (no division and no backward product of the mean to launch)."""
    # q_0 is a target: no gradient, and no graph through it (as the reference detaches it)
    kl_rows, _, _ = torch.ops.segpcl.knn_subgraph_kl_rows(emb, roots, neighbors, ref_logprob.detach(), float(tau),
                                                          plan, 1.0, True)
    # 0 roots: the mean of nothing, NaN. `!= 0`, not the bare shape: torch 2.6's dynamo guarded on the
    # shape's value there, a recompile per root count
    return kl_rows.sum() if roots.shape[0] != 0 else kl_rows.mean()
