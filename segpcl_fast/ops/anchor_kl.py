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


LOGPROB_TOLERANCE = 0.05  # |logsumexp| of a log-probability row: bf16 storage rounds it by about 1e-2 at most


def check_teacher_logprob(teacher: torch.Tensor) -> bool:
    """One ValueError when a teacher given as log-probabilities is not: a row's logsumexp is 0 for
    log_softmax(z_T / tau) (up to LOGPROB_TOLERANCE), and anything but for raw logits, which the kernel would
    take as unnormalised probabilities exp(z_T), a wrong loss with no error. Rows without a finite logsumexp
    (NaN; all -inf) are left to the op's NaN rules. One host sync: AnchorKLLoss asks it once per module.
    Returns whether some row was checked (False for no anchors, or none with a finite logsumexp)."""
    lse = teacher.detach().float().logsumexp(dim=-1)
    lse = lse[lse.isfinite()]
    worst = lse.abs().max() if lse.numel() else None
    if worst is not None and worst.item() > LOGPROB_TOLERANCE:
        raise ValueError(f"anchor_kl: teacher_is_logprob=True but a teacher row's logsumexp is {lse[lse.abs().argmax()]:.4g}, "
                         f"not 0: these are not log-probabilities. Pass teacher_is_logprob=False for raw teacher "
                         f"logits, or log_softmax(z_T / tau) as the teacher")
    return worst is not None

