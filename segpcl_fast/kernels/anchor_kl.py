"""ACGD anchor distillation loss (method.md stage 2), loss and gradient in one pass.

    L_ACGD = tau^2 * mean_a KL( softmax(z_T[a] / tau) || softmax(z_S[a] / tau) )

z_S, z_T: (A, C) student / teacher logits over the old classes (any C). The teacher may be
given as cached logits or as log-probabilities already at temperature tau
(teacher = log_softmax(z_T / tau)); it is a constant (no gradient flows into it).

The kernel reads each row of z_S and z_T once, and writes the per-row KL and its gradient
d KL_a / d z_S[a] = (p_S * sum(p_T) - p_T) / tau (= (p_S - p_T) / tau for a normalised teacher),
saved for backward, which only scales it: no second read of the logits, no host sync.
Compute is fp32 whatever the storage (fp32 / bf16); the loss is fp32, the gradient has z_S's dtype.

The backward of an fp32 z_S scales the saved gradient in place and hands it out as z_S's gradient
(`anchor_kl_scale_grad_triton`): the kernel reads the incoming gradient on the device and leaves
the rows whose incoming gradient is exactly 1 untouched, so the usual case (backward starts from this
loss, or from a sum it enters with weight 1) reads and writes nothing more: forward +
backward move 3 passes over the logits (read z_S, z_T; write the gradient) where a separate
backward (read dkl_dz, write grad) made 5, as torch.compile's code for the reference does. Liger-
Kernel's losses skip that product too, after a host-side `torch.equal(grad_output, 1)`; here the test
is on the device (no sync). The price: one backward per forward. The buffer handed out has its version
bumped, so a second backward through the same graph (retain_graph=True, torch.autograd.functional.
jacobian, an fp32 gradcheck) is refused with a clear error (other nodes of that backward may have run
by then, as with any error raised in a backward); one under torch.utils.checkpoint, whose recomputation
makes a fresh buffer, runs. Under torch.compile or make_fx (a traced backward), for bf16 / fp16 z_S (the
saved gradient is fp32, the result z_S's dtype: one rounding), and for a saved tensor that a saved-tensor
hook gave back non-contiguous, the backward is the out-of-place product.

Two kernels, the same results. Rows up to SINGLE_BLOCK_COLS wide: a whole row (padded to a power
of two) is one register tile. Wider rows (any width): the row is walked in BLOCK_C-column chunks
twice. The first walk keeps running maxima and rescaled sums (online softmax) for the student's
and the teacher's normaliser and for sum_j e_T[j] ((t_j - m_T) - (s_j - m_S)), from which the KL
follows; the second walk writes the gradient, re-reading the row, which is meant to still be in
L2 (one DRAM read of each input and one write, without a spilled 8192-wide tile per program; not
yet measured on a GPU). The sums are kept relative to the running maxima, so large logits do not
cancel.

NaN / inf: a NaN anywhere in a row of z_S or z_T makes that row's KL (and so the loss) NaN and
its gradient NaN. A teacher entry of -inf (logit or log-prob) is a zero-probability class and
contributes exactly 0 (0 * log 0 = 0). z_S must be finite: a -inf student logit where the teacher
has mass gives an infinite loss. A +inf anywhere in a row, or a teacher row with no finite entry,
is undefined (NaN or inf). The reference gives the same NaNs. 0 anchors give NaN (the mean of
nothing, as torch.mean). Any column count runs fused. float64 runs on the reference, in float64.

Precision: the KL is a sum of terms of both signs, so in fp32 (both paths) its value has an absolute
error of about 1e-7 times the row's size: a student within 1e-3 of its teacher at tau 20 (each task's
first steps) gives a loss value off by several times (even slightly negative), while the gradient,
computed from the probabilities directly, stays within about 4e-5 relative. The loss value is for
logging there; training follows the gradient. Very large tau (1e5 and up) flattens the softmaxes
below fp32's resolution (loss and gradient both lose accuracy); tau is meant to be O(1-100).

Contents: `anchor_kl_reference` (the spec), the Triton kernel and launcher, and the custom op
`segpcl::anchor_kl_rows(z_S, teacher, tau, teacher_is_logprob, scale=1, mean=False) -> (kl_rows (A,),
dkl_dz (A, C))`, both fp32 and both times scale (/ A with mean), with fake + autograd; its backward's
in-place scaling, `anchor_kl_scale_grad_triton(dkl_dz, grad_rows)` (so dkl_dz, once backward has run for
an fp32 z_S, is z_S's gradient); `anchor_kl_fused` turns kl_rows into the scalar loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton_utils import (cdiv, check_can_run, check_pow2_knobs, check_tau, common_divisor, compute_dtype,
                            interpret_mode, launch_device, lazy_jit, next_pow2, refuse_double_backward,
                            rows_per_program)

tl = None  # triton.language, bound by lazy_jit at the first launch

__all__ = ["anchor_kl_reference", "anchor_kl_fused", "anchor_kl_triton", "anchor_kl_scale_grad_triton",
           "check_anchor_kl_inputs", "SINGLE_BLOCK_COLS", "CHUNK_COLS"]

SINGLE_BLOCK_COLS = 4096  # widest row held as one register tile; wider rows take the chunked kernel
CHUNK_COLS = 1024         # columns per chunk in the chunked kernel


# over the anchors (rows): "mean" is the method's batch mean, torch.nn.KLDivLoss's "batchmean" (also taken
# by that name), not its "mean" over every element; "none" gives one value per anchor, (A,)
REDUCTIONS = ("mean", "sum", "none", "batchmean")


def anchor_kl_reference(student_logits: torch.Tensor, teacher: torch.Tensor, tau: float,
                        teacher_is_logprob: bool = False, reduction: str = "mean") -> torch.Tensor:
    """tau^2 * mean over anchors of KL(softmax(z_T / tau) || softmax(z_S / tau)), fp32 (fp64 for fp64
    inputs). The teacher is a constant; 0 * log 0 = 0, and a NaN stays NaN. reduction "sum": the sum over
    anchors; "none": each anchor's tau^2 KL, shape (A,)."""
    compute = compute_dtype(student_logits, teacher)
    log_p_student = F.log_softmax(student_logits.to(compute) / tau, dim=-1)
    if teacher_is_logprob:
        log_p_teacher = teacher.detach().to(compute)
    else:
        log_p_teacher = F.log_softmax(teacher.detach().to(compute) / tau, dim=-1)
    p_teacher = log_p_teacher.exp()
    kl_rows = torch.where(p_teacher == 0, 0.0, p_teacher * (log_p_teacher - log_p_student)).sum(-1)
    if reduction == "none":
        return tau ** 2 * kl_rows
    return tau ** 2 * (kl_rows.sum() if reduction == "sum" else kl_rows.mean())  # mean / batchmean


def check_anchor_kl_inputs(student_logits: torch.Tensor, teacher: torch.Tensor, tau: float,
                           reduction: str = "mean") -> None:
    """Shape / dtype / device checks (no host sync); one clear error per problem."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"anchor_kl: reduction must be one of {REDUCTIONS} (over anchors), got {reduction!r}")
    if student_logits.dim() != 2:
        raise ValueError(f"anchor_kl: student_logits must be (anchors, classes), got {tuple(student_logits.shape)}")
    if teacher.shape != student_logits.shape:
        raise ValueError(f"anchor_kl: teacher has shape {tuple(teacher.shape)} but student_logits has "
                         f"{tuple(student_logits.shape)}; both are (anchors, old classes)")
    if not (student_logits.is_floating_point() and teacher.is_floating_point()):
        raise TypeError(f"anchor_kl: logits must be floating tensors, got {student_logits.dtype} / {teacher.dtype}")
    if teacher.device != student_logits.device:
        raise ValueError(f"anchor_kl: teacher on {teacher.device}, student_logits on {student_logits.device}")
    check_tau("anchor_kl", tau)


@lazy_jit
def _anchor_kl_kernel(zs_ptr, zt_ptr, kl_ptr, dz_ptr, n_rows, n_cols, stride_s, stride_t, stride_dz,
                      tau, scale, TEACHER_IS_LOGPROB: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                      VEC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    # VEC (a power of two) divides the column count and every row stride (the launcher's
    # common_divisor): so each run of VEC columns starts aligned and is all in or all out of the mask,
    # and Triton loads and stores 4 fp32 at once. Without the hints a width that is not a multiple of
    # 16 (1000 classes) compiled to one element per load and store. (Written out at each access: hints
    # on offsets a @jit helper returned did not reach the loads.)
    mask = tl.max_constancy(row_ok[:, None] & col_ok[None, :], [1, VEC])
    s_offs = tl.max_contiguous(tl.multiple_of(rows[:, None] * stride_s + cols[None, :], [1, VEC]), [1, VEC])
    t_offs = tl.max_contiguous(tl.multiple_of(rows[:, None] * stride_t + cols[None, :], [1, VEC]), [1, VEC])
    dz_offs = tl.max_contiguous(tl.multiple_of(rows[:, None] * stride_dz + cols[None, :], [1, VEC]), [1, VEC])
    # Per element: 2 exponentials (one per input) and a few adds and multiplies; divisions and
    # logarithms are per row. The softmaxes are taken in base 2, log2(e) / tau folded into the row's
    # scale: exp2 is one sm_90 instruction, exp is five (a multiply by log2 e and a fix-up for results
    # below 2^-126; exp2 flushes those to 0). KL = sum_j p_T[j] (log p_T[j] - log p_S[j]) is summed as the
    # chunked kernel does, from the shifted logits (t - m_T) - (s - m_S) (in units of log 2, so times
    # ln 2) and the two log-normalisers, and p = e / sum e. (Written with a division by tau per element,
    # p = exp(log p) and exp, the kernel compiled to about 83 sm_90 instructions an element, as many
    # cycles as its bytes take at 1000 classes: on an H200 it moved 64 % of copy bandwidth.)
    inv_tau = 1.0 / tau
    k = inv_tau * 1.4426950408889634  # log2(e) / tau
    # padding is -inf: a padding column has probability 0; a padding row is NaN throughout, never stored
    # the row maximum is subtracted before the scale: z - max(z) is exact near the maximum, so large
    # logits (z_S ~ 3000 at tau 1) lose nothing to the rounding of z * log2(e) / tau
    s = tl.load(zs_ptr + s_offs, mask=mask, other=float("-inf")).to(tl.float32)
    t = tl.load(zt_ptr + t_offs, mask=mask, other=float("-inf")).to(tl.float32)
    s_shift = (s - tl.max(s, axis=1)[:, None]) * k
    s_exp = tl.exp2(s_shift)
    s_sum = tl.sum(s_exp, axis=1)
    if TEACHER_IS_LOGPROB:
        t_shift = t * 1.4426950408889634  # log2 p_T, normalised by the caller
    else:
        t_shift = (t - tl.max(t, axis=1)[:, None]) * k
    e_t = tl.exp2(t_shift)  # p_T up to its normaliser
    has_mass = e_t > 0  # 0 * log 0 = 0; also keeps padding free of (-inf) - (-inf)
    c = tl.sum(tl.where(has_mass, e_t * (t_shift - s_shift), 0.0), axis=1) * 0.6931471805599453  # ln 2
    e_sum = tl.sum(e_t, axis=1)
    log_s_sum = tl.log(s_sum)
    g = inv_tau * scale  # both outputs are scale * (KL, d KL / d z_S): per row, no cost per element
    if TEACHER_IS_LOGPROB:  # KL = sum p_T (log p_T - s_shift) + log(s_sum) sum p_T;  d/dz_S: (p_S sum p_T - p_T) / tau
        kl = c + e_sum * log_s_sum
        dz = s_exp * (e_sum * g / s_sum)[:, None] - e_t * g
    else:  # p_T = e_t / e_sum: KL = c / e_sum - log(e_sum) + log(s_sum);  d/dz_S: (p_S - p_T) / tau
        kl = c / e_sum - tl.log(e_sum) + log_s_sum
        dz = s_exp * (g / s_sum)[:, None] - e_t * (g / e_sum)[:, None]
    tl.store(kl_ptr + rows, kl * scale, mask=row_ok)
    tl.store(dz_ptr + dz_offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@lazy_jit
def _load_row_chunk(zs_ptr, zt_ptr, rows, row_ok, c0, n_cols, stride_s, stride_t, BLOCK_C: tl.constexpr,
                    VEC: tl.constexpr):
    """Columns c0 .. c0 + BLOCK_C of the rows: (z_S, z_T) in fp32, the column and tile masks (VEC: as
    in the one-tile kernel)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    mask = tl.max_constancy(row_ok[:, None] & col_ok[None, :], [1, VEC])
    s_offs = tl.max_contiguous(tl.multiple_of(rows[:, None] * stride_s + cols[None, :], [1, VEC]), [1, VEC])
    t_offs = tl.max_contiguous(tl.multiple_of(rows[:, None] * stride_t + cols[None, :], [1, VEC]), [1, VEC])
    s = tl.load(zs_ptr + s_offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(zt_ptr + t_offs, mask=mask, other=0.0).to(tl.float32)
    return s, t, cols, col_ok, mask


@lazy_jit
def _anchor_kl_chunked_kernel(zs_ptr, zt_ptr, kl_ptr, dz_ptr, n_rows, n_cols, stride_s, stride_t, stride_dz,
                              tau, scale, TEACHER_IS_LOGPROB: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                              VEC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    neg_inf = float("-inf")
    # Maxima and differences are kept in the logits' own units (z, not z / tau) and scaled after the
    # subtraction, as in the one-tile kernel: z - max z is exact near the maximum, so large logits at a
    # small tau lose nothing to the rounding of z / tau. Exponentials in base 2, k = log2(e) / tau.
    inv_tau = 1.0 / tau
    k = inv_tau * 1.4426950408889634
    m_s = tl.full((ROWS,), neg_inf, tl.float32)   # running max of z_S
    d_s = tl.zeros((ROWS,), tl.float32)           # sum exp((z_S - m_s) / tau)
    m_t = tl.full((ROWS,), neg_inf, tl.float32)   # running max of t (logits: z_T; log-probs: tau log p_T, max 0)
    if TEACHER_IS_LOGPROB:
        m_t = tl.zeros((ROWS,), tl.float32)
    d_t = tl.zeros((ROWS,), tl.float32)           # sum e_t, e_t = exp((t - m_t) / tau)
    # c = sum e_t ((t - m_t) - (z_S - m_s)) over classes with mass (times 1 / tau at the end): every term is
    # a difference of values near their row maxima, so large logits do not cancel
    c = tl.zeros((ROWS,), tl.float32)
    n_nan = tl.zeros((ROWS,), tl.float32)         # NaNs seen in the row (poison the row, as one tile does)
    for c0 in range(0, n_cols, BLOCK_C):
        s, t, cols, col_ok, mask = _load_row_chunk(zs_ptr, zt_ptr, rows, row_ok, c0, n_cols, stride_s, stride_t,
                                                   BLOCK_C, VEC)
        n_nan += tl.sum(((s != s) | (t != t)).to(tl.float32), axis=1)
        s = tl.where(col_ok[None, :], s, neg_inf)
        if TEACHER_IS_LOGPROB:
            t = tl.where(col_ok[None, :], t * tau, neg_inf)  # log p_T in the logits' units
        else:
            t = tl.where(col_ok[None, :], t, neg_inf)
        # a new maximum: rescale the sums and move c's reference points (rows with nothing summed
        # yet have d = 0 and m = -inf: leave them, rather than compute exp(nan) or 0 * inf)
        m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
        s_moved = (m_s_new > m_s) & (d_s > 0)
        d_s = tl.where(s_moved, d_s * tl.exp2((m_s - m_s_new) * k), d_s)
        c = tl.where(s_moved & (d_t > 0), c + (m_s_new - m_s) * d_t, c)
        m_s = m_s_new
        if not TEACHER_IS_LOGPROB:
            m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
            t_moved = (m_t_new > m_t) & (d_t > 0)
            rescale = tl.where(t_moved, tl.exp2((m_t - m_t_new) * k), 1.0)
            c = tl.where(t_moved, (c - (m_t_new - m_t) * d_t) * rescale, c)
            d_t = d_t * rescale
            m_t = m_t_new
        d_s += tl.sum(tl.where(s > neg_inf, tl.exp2((s - m_s[:, None]) * k), 0.0), axis=1)
        has_mass = t > neg_inf
        e_t = tl.where(has_mass, tl.exp2((t - m_t[:, None]) * k), 0.0)
        d_t += tl.sum(e_t, axis=1)
        # a student -inf where the teacher has mass adds +inf, also while the row's student maximum is
        # still -inf (a first chunk of -inf only: -inf - -inf would be nan)
        s_shift = tl.where(s > neg_inf, s - m_s[:, None], neg_inf)
        c += tl.sum(tl.where(has_mass, e_t * ((t - m_t[:, None]) - s_shift), 0.0), axis=1)
    c = c * inv_tau
    log_d_s = tl.log(d_s)
    if TEACHER_IS_LOGPROB:
        # p_t = exp(log p_T): KL = sum p_t (log p_T - s / tau) + lse_s sum p_t = c + d_t log d_s
        kl = c + d_t * log_d_s
        pt_sum = d_t
        lg_d_t = tl.zeros((ROWS,), tl.float32)
    else:
        # p_t = e_t / d_t: KL = sum p_t (t - s) / tau - lse_t + lse_s = c / d_t - log d_t + log d_s
        kl = c / d_t - tl.log(d_t) + log_d_s
        pt_sum = tl.full((ROWS,), 1.0, tl.float32)
        lg_d_t = tl.log2(d_t)
    lg_d_s = tl.log2(d_s)
    poisoned = n_nan > 0
    kl = tl.where(poisoned, float("nan"), kl)
    tl.store(kl_ptr + rows, kl * scale, mask=row_ok)
    g = inv_tau * scale
    for c0 in range(0, n_cols, BLOCK_C):
        s, t, cols, col_ok, mask = _load_row_chunk(zs_ptr, zt_ptr, rows, row_ok, c0, n_cols, stride_s, stride_t,
                                                   BLOCK_C, VEC)
        p_s = tl.exp2((s - m_s[:, None]) * k - lg_d_s[:, None])
        if TEACHER_IS_LOGPROB:
            p_t = tl.exp2(t * 1.4426950408889634)
        else:
            p_t = tl.exp2((t - m_t[:, None]) * k - lg_d_t[:, None])
        dz = (p_s * pt_sum[:, None] - p_t) * g
        dz = tl.where(poisoned[:, None], float("nan"), dz)
        dz_offs = tl.max_contiguous(tl.multiple_of(rows[:, None] * stride_dz + cols[None, :], [1, VEC]), [1, VEC])
        tl.store(dz_ptr + dz_offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# One-tile kernel's rows and warps per program on a GPU, from the knob sweep on an H200 (BENCHMARKS.md,
# 2026-12-04: benchmarks/tune_kernels_cuda.py, 8192 rows, fp32, kernel alone). Fastest measured
# (rows, warps) by width, against the rule before it (a 4096-element tile on 4 warps, 8 above):
#   10 columns    (128, 16)  0.0079 ms   was (256, 4)  0.0223 ms
#   200 columns   (2, 4)     0.0159 ms   was (16, 4)   0.0316 ms
#   1000 columns  (2, 4)     0.0366 ms   was (4, 4)    0.0462 ms
#   4096 columns  (1, 16)    0.1162 ms   was (1, 4)    0.1733 ms
# By the width padded to a power of two. The measured widths' winners hold 4 elements a thread at 16
# and 256 columns; the widths between are not measured and follow that: a 2048-element tile on 16
# warps up to 64 columns, 1024 on 8 warps at 128 (CIFAR100's 70-90 old classes), then as measured.
TILE_DEFAULTS = {16: (128, 16), 32: (64, 16), 64: (32, 16), 128: (8, 8), 256: (2, 4), 512: (2, 4),
                 1024: (2, 4), 2048: (1, 4), 4096: (1, 16)}


def tile_rows(n_rows: int, n_cols: int) -> int:
    """Rows per program of the one-tile kernel (a power of two): on a GPU TILE_DEFAULTS (narrower than
    16 columns: 16's); under the interpreter few, large programs (tests stay quick)."""
    cols = next_pow2(n_cols)
    if interpret_mode():
        return rows_per_program(n_rows, cols, gpu_tile_elems=4096)
    return TILE_DEFAULTS[max(16, cols)][0]


def tile_warps(rows: int, n_cols: int) -> int:
    """Warps per program of the one-tile kernel: TILE_DEFAULTS' for its default rows; for other rows
    (tests, the sweep) 4 up to a 4096-element tile, else 8."""
    default_rows, warps = TILE_DEFAULTS[max(16, next_pow2(n_cols))]
    if rows == default_rows:
        return warps
    return 4 if rows * next_pow2(n_cols) <= 4096 else 8


def anchor_kl_triton(student_logits: torch.Tensor, teacher: torch.Tensor, tau: float,
                     teacher_is_logprob: bool = False, rows: int | None = None,
                     chunk_cols: int | None = None, num_warps: int | None = None, scale: float = 1.0,
                     mean: bool = False):
    """Launch a kernel: (kl_rows (A,), dkl_dz (A, C)), both fp32 and both multiplied by `scale`, and by
    1 / A too when `mean` (the backward scales dkl_dz by the incoming gradient, then rounds once to
    z_S's dtype). A is read here, from the tensor, so that torch.compile sees constant arguments: a
    scale computed from the shape by the caller would be a new constant, and a recompile, per A.

    Rows up to SINGLE_BLOCK_COLS wide run as one tile each, wider ones in chunks of CHUNK_COLS;
    `chunk_cols` (a power of two) forces the chunked kernel with that chunk, `rows` the rows per
    program and `num_warps` the warps per program (tests, tuning: benchmarks/tune_kernels_cuda.py).
    """
    check_can_run("anchor_kl", student_logits, teacher)
    check_anchor_kl_inputs(student_logits, teacher, tau)  # also for a direct torch.ops.segpcl call: one shape
    check_pow2_knobs("anchor_kl", rows=rows, chunk_cols=chunk_cols, num_warps=num_warps)
    n_rows, n_cols = student_logits.shape
    scale = scale / max(n_rows, 1) if mean else scale
    zs = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    zt = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    kl = torch.empty(n_rows, dtype=torch.float32, device=zs.device)
    dz = torch.empty((n_rows, n_cols), dtype=torch.float32, device=zs.device)
    if n_rows == 0 or n_cols == 0:
        return kl.zero_(), dz
    # row strides: a single row's is never used (and 0 keeps the alignment promise below true for it)
    strides = (zs.stride(0), zt.stride(0), dz.stride(0)) if n_rows > 1 else (0, 0, 0)
    one_tile = chunk_cols is None and next_pow2(n_cols) <= SINGLE_BLOCK_COLS
    block_c = next_pow2(n_cols) if one_tile else chunk_cols or CHUNK_COLS
    # VEC: runs of VEC columns start aligned and are all in or all out of the mask (the kernels' hints),
    # so it divides the width and every row stride, and a chunk holds whole runs
    vec = common_divisor(min(16, block_c), n_cols, *strides)
    if one_tile:
        rows = rows or tile_rows(n_rows, n_cols)
        with launch_device(zs):
            _anchor_kl_kernel[(cdiv(n_rows, rows),)](
                zs, zt, kl, dz, n_rows, n_cols, *strides, float(tau), float(scale),
                TEACHER_IS_LOGPROB=bool(teacher_is_logprob), ROWS=rows, BLOCK_C=block_c, VEC=vec,
                num_warps=num_warps or tile_warps(rows, n_cols))
    else:
        rows = rows or rows_per_program(n_rows, n_cols, gpu_tile_elems=1)  # one row per program on a GPU
        with launch_device(zs):
            _anchor_kl_chunked_kernel[(cdiv(n_rows, rows),)](
                zs, zt, kl, dz, n_rows, n_cols, *strides, float(tau), float(scale),
                TEACHER_IS_LOGPROB=bool(teacher_is_logprob), ROWS=rows, BLOCK_C=block_c, VEC=vec,
                num_warps=num_warps or 4)
    return kl, dz


# ---------------------------------------------------------------- torch.library registration

@torch.library.custom_op("segpcl::anchor_kl_rows", mutates_args=())
def anchor_kl_rows_op(student_logits: torch.Tensor, teacher: torch.Tensor, tau: float,
                      teacher_is_logprob: bool, scale: float = 1.0, mean: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return anchor_kl_triton(student_logits, teacher, tau, teacher_is_logprob, scale=scale, mean=mean)


@anchor_kl_rows_op.register_fake
def _anchor_kl_rows_fake(student_logits, teacher, tau, teacher_is_logprob, scale=1.0, mean=False):
    n_rows, n_cols = student_logits.shape
    kl = student_logits.new_empty((n_rows,), dtype=torch.float32)
    return kl, student_logits.new_empty((n_rows, n_cols), dtype=torch.float32)


@lazy_jit
def _scale_grad_kernel(dz_ptr, g_ptr, n_elems, n_rows, n_cols, stride_g, SHARED_G: tl.constexpr, BLOCK: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """dz[a, :] *= g[a] in place (dz contiguous, n_cols wide), leaving every row whose g is exactly 1
    unread and unwritten; a NaN g is not 1 (it poisons its row, as the product does).
    SHARED_G (every row has the same g: stride 0, the gradient of kl_rows.sum(); or one row): g is read
    once, and when it is 1 no program touches dz; otherwise each program walks the flat elements in steps
    of (programs x BLOCK). Per-row g: each program takes rows in steps of the program count, reads the
    row's g and, unless it is 1, scales the row in BLOCK_C-column chunks."""
    pid = tl.program_id(0).to(tl.int64)
    n_programs = tl.num_programs(0).to(tl.int64)
    if SHARED_G:
        g = tl.load(g_ptr).to(tl.float32)
        if g != 1.0:
            for start in range(pid * BLOCK, n_elems, n_programs * BLOCK):
                offs = start + tl.arange(0, BLOCK)
                in_range = offs < n_elems
                dz = tl.load(dz_ptr + offs, mask=in_range)
                tl.store(dz_ptr + offs, dz * g, mask=in_range)
    else:
        cols = tl.arange(0, BLOCK_C)
        for row in range(pid, n_rows, n_programs):
            g = tl.load(g_ptr + row * stride_g).to(tl.float32)
            if g != 1.0:
                row_ptr = dz_ptr + row * n_cols
                for c0 in range(0, n_cols, BLOCK_C):
                    in_row = c0 + cols < n_cols
                    dz = tl.load(row_ptr + c0 + cols, mask=in_row)
                    tl.store(row_ptr + c0 + cols, dz * g, mask=in_row)


SCALE_BLOCK = 4096     # elements per program and step of the in-place scaling (one incoming gradient)
SCALE_ROW_CHUNK = 1024  # widest column chunk of a row (per-row incoming gradients)
SCALE_PROGRAMS = 1024  # at most this many programs walk dz (one wave of 8-warp programs on an H100)


def anchor_kl_scale_grad_triton(dkl_dz: torch.Tensor, grad_rows: torch.Tensor) -> None:
    """dkl_dz (A, C) fp32 contiguous *= grad_rows (A,) per row, in place; a row whose grad_rows entry is
    exactly 1 is not read or written (none is, when grad_rows is one value expanded and that value is 1).
    No host sync: the test is the kernel's."""
    check_can_run("anchor_kl_scale_grad_", dkl_dz, grad_rows)
    if dkl_dz.dim() != 2 or not dkl_dz.is_contiguous() or dkl_dz.dtype != torch.float32:
        raise ValueError("anchor_kl_scale_grad_: dkl_dz must be the op's own contiguous fp32 (anchors, classes) "
                         f"gradient, got {dkl_dz.dtype} {tuple(dkl_dz.shape)} strides {dkl_dz.stride()}")
    if grad_rows.shape != dkl_dz.shape[:1]:
        raise ValueError(f"anchor_kl_scale_grad_: grad_rows has shape {tuple(grad_rows.shape)}, want "
                         f"({dkl_dz.shape[0]},): one incoming gradient per row")
    n_rows, n_cols = dkl_dz.shape
    if dkl_dz.numel() == 0:
        return
    shared = n_rows == 1 or grad_rows.stride(0) == 0
    work = cdiv(dkl_dz.numel(), SCALE_BLOCK) if shared else n_rows
    programs = min(work, 2 if interpret_mode() else SCALE_PROGRAMS)
    with launch_device(dkl_dz):
        _scale_grad_kernel[(programs,)](dkl_dz, grad_rows, dkl_dz.numel(), n_rows, n_cols, grad_rows.stride(0),
                                        SHARED_G=shared, BLOCK=SCALE_BLOCK,
                                        BLOCK_C=min(SCALE_ROW_CHUNK, next_pow2(n_cols)),
                                        num_warps=8 if shared else 4)


def _anchor_kl_setup_context(ctx, inputs, output):
    ctx.student_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(output[1])  # the gradient itself, for the backward: not differentiable
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.handed_out = False


def _traced(t: torch.Tensor) -> bool:
    """Whether this backward is being traced rather than run: by torch.compile (AOTAutograd's functional
    and fake tensors; compiled autograd, where dynamo traces this function and answers type(t) with
    torch.Tensor) or by make_fx, whose proxy mode (also at pre-dispatch) records ops on real tensors. A
    direct kernel launch is no op: a trace would leave it out."""
    if type(t) is not torch.Tensor or torch.compiler.is_compiling():
        return True
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    keys = torch._C._TorchDispatchModeKey
    return get_proxy_mode() is not None or any(torch._C._get_dispatch_mode(key) is not None
                                               for key in (keys.FAKE, keys.FUNCTIONAL))


def _anchor_kl_backward(ctx, grad_kl, _grad_dz):
    """d loss / d z_S = grad_kl[a] * dkl_dz[a]. fp32 z_S, run eagerly: dkl_dz scaled in place (rows with
    grad_kl exactly 1 untouched, on the device) and handed out, its version bumped, so that autograd
    refuses a later use of it as a saved tensor; otherwise (bf16 / fp16 z_S, a traced backward, a saved
    tensor that came back non-contiguous from a saved-tensor hook) out of place in fp32, rounded once to
    z_S's dtype in the same kernel (out=). The gradient was computed in the forward pass, so it has no
    graph of its own: no double backward."""
    if grad_kl is None:
        return None, None, None, None, None, None
    refuse_double_backward("anchor_kl (Triton)")
    try:
        (dkl_dz,) = ctx.saved_tensors
    except RuntimeError as error:  # the version check: handed out by an earlier backward of this forward
        if not ctx.handed_out:
            raise
        raise RuntimeError("anchor_kl (Triton): a second backward through one forward (retain_graph=True, "
                           "torch.autograd.functional.jacobian, an fp32 gradcheck): the first backward handed the "
                           "forward's saved gradient out as z_S's gradient. Run the forward again for each backward, "
                           "or use the reference for this op: segpcl_fast.ops.backend('reference')") from error
    if (ctx.student_dtype == dkl_dz.dtype == torch.float32 and dkl_dz.is_contiguous()
            and not _traced(dkl_dz)):
        # the launcher itself, not a custom op: this branch runs eagerly only (a traced backward takes the
        # product below), and torch.library's Python dispatch cost 14 us a call here (op_host_cost.py)
        anchor_kl_scale_grad_triton(dkl_dz, grad_kl)
        torch.autograd.graph.increment_version(dkl_dz)
        ctx.handed_out = True
        return dkl_dz, None, None, None, None, None
    grad_student = torch.empty(dkl_dz.shape, dtype=ctx.student_dtype, device=dkl_dz.device)
    torch.mul(dkl_dz, grad_kl.float()[:, None], out=grad_student)
    return grad_student, None, None, None, None, None


anchor_kl_rows_op.register_autograd(_anchor_kl_backward, setup_context=_anchor_kl_setup_context)


def anchor_kl_fused(student_logits: torch.Tensor, teacher: torch.Tensor, tau: float,
                    teacher_is_logprob: bool = False, reduction: str = "mean") -> torch.Tensor:
    """The same loss as `anchor_kl_reference` through the fused op (Triton), fp32 (a scalar, or (A,) for
    reduction "none").

    The kernel scales each row's KL and gradient by tau^2 (/ A for the mean), so the loss is their sum:
    the mean's division and the tau^2 product, and their two backward products, are not launched (on a
    GPU each is a kernel launch, and at the paper's sizes the launches, not the bytes, take the time)."""
    # the teacher is a target: no gradient, and no graph through it (as the reference detaches it)
    kl_rows, _ = torch.ops.segpcl.anchor_kl_rows(student_logits, teacher.detach(), float(tau),
                                                 bool(teacher_is_logprob), float(tau) ** 2,
                                                 reduction in ("mean", "batchmean"))
    if reduction == "none":
        return kl_rows
    # 0 anchors: the mean of nothing, NaN. `!= 0`, not the bare shape: torch 2.6's dynamo guarded on the
    # shape's value there, a recompile per anchor count
    return kl_rows.sum() if reduction == "sum" or student_logits.shape[0] != 0 else kl_rows.mean()
