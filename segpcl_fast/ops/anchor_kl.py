"""ops.anchor_kl: the ACGD loss tau^2 * mean_a KL(softmax(z_T/tau) || softmax(z_S/tau)).

Triton (loss and gradient in one pass) or the reference; see segpcl_fast.kernels.anchor_kl for
the formula, the teacher forms and NaN / inf behaviour.
"""
from __future__ import annotations

import torch

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
    _k.check_anchor_kl_inputs(student_logits, teacher, tau, reduction)
    if choose_impl("anchor_kl", student_logits, teacher) == "triton":
        return _k.anchor_kl_fused(student_logits, teacher, tau, teacher_is_logprob, reduction)
    return anchor_kl_reference(student_logits, teacher, tau, teacher_is_logprob, reduction)
