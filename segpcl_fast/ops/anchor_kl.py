"""ops.anchor_kl: the ACGD loss tau^2 * mean_a KL(softmax(z_T/tau) || softmax(z_S/tau)).

Triton (loss and gradient in one pass) or the reference; see segpcl_fast.kernels.anchor_kl for
the formula, the teacher forms and NaN / inf behaviour.
"""
from __future__ import annotations

import torch

from ..kernels._triton_utils import tau_value
from ._kernels import choose_impl, load_kernel
from .dispatch import refuse_trained_constants

_k = load_kernel("anchor_kl")
anchor_kl_reference = _k.anchor_kl_reference
ANCHOR_KL_REDUCTIONS = _k.REDUCTIONS  # "mean" (the method's; also named "batchmean", as torch does), "sum", "none"


def anchor_kl(student_logits: torch.Tensor, teacher: torch.Tensor, tau: float,
              teacher_is_logprob: bool = False, reduction: str = "mean") -> torch.Tensor:
    """tau^2 * mean over rows of KL(softmax(teacher/tau) || softmax(student_logits/tau)), fp32 scalar
    (fp64 for fp64 inputs).

    student_logits, teacher: (anchors, old classes). teacher_is_logprob=True: teacher already is
    log_softmax(z_T / tau). Gradient flows into student_logits only. reduction over the anchors:
    "mean" (the method's), "sum", or "none" (each anchor's tau^2 KL, shape (A,), e.g. to weight anchors).
    """
    refuse_trained_constants("anchor_kl", tau=tau)
    tau = tau_value("anchor_kl", tau)  # a float: the same dtype and shape on every path
    _k.check_anchor_kl_inputs(student_logits, teacher, tau, reduction)
    if choose_impl("anchor_kl", student_logits, teacher) == "triton":
        return _k.anchor_kl_fused(student_logits, teacher, tau, teacher_is_logprob, reduction)
    return anchor_kl_reference(student_logits, teacher, tau, teacher_is_logprob, reduction)


def logprob_tolerance(dtype: torch.dtype) -> float:
    """How far from 0 a log-probability row's logsumexp may be after rounding to `dtype`: 8 of its epsilons,
    at least 1e-4 (measured over 20k rows x 9 classes: bf16 up to 4.3e-3, fp16 5.4e-4; fp32 ~1e-7). Raw
    logits or probabilities given instead are off by far more."""
    return max(1e-4, 8 * torch.finfo(dtype).eps)


def check_teacher_logprob(teacher: torch.Tensor) -> bool:
    """One ValueError when a teacher given as log-probabilities is not: a row's logsumexp is 0 for
    log_softmax(z_T / tau) (within logprob_tolerance of its dtype), and anything but for raw logits, which the
    kernel would take as unnormalised probabilities exp(z_T), a wrong loss with no error. Rows without a finite
    logsumexp (NaN; all -inf) are left to the op's NaN rules. One host sync (one read of two values):
    AnchorKLLoss asks it once per module. Returns whether some row was checked (False for no anchors, or none
    with a finite logsumexp)."""
    if teacher.numel() == 0:
        return False
    lse = teacher.detach().float().logsumexp(dim=-1)
    finite = lse.isfinite()
    off = torch.where(finite, lse, torch.zeros_like(lse))  # (no boolean indexing: a second sync, and not vmap's)
    worst, any_finite = torch.stack([torch.take(off, off.abs().argmax()), finite.any().float()]).tolist()
    if any_finite and abs(worst) > logprob_tolerance(teacher.dtype):
        raise ValueError(f"anchor_kl: teacher_is_logprob=True but a teacher row's logsumexp is {worst:.4g}, not 0: "
                         f"these are not log-probabilities. Pass teacher_is_logprob=False for raw teacher logits, "
                         f"or log_softmax(z_T / tau) as the teacher")
    return bool(any_finite)
