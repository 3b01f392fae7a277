"""Stage 2 of SeGP-CL (method.md): the training loss of task t.

    L = L_cls + lambda_ACGD · L_ACGD + lambda_GR · L_GR          (lambda_ACGD = 5, lambda_GR = 1)

L_cls   CE(s · v̄_S(x) · U_S^T, y) over the current task's (or all seen) classes.
L_ACGD  tau_A^2 · mean_a KL(softmax(z_T / tau_A) || softmax(z_S / tau_A)) on anchors, over the
        old classes (ops.anchor_kl), tau_A = 20.
L_GR    TSGR: for each new class c, a fixed kNN subgraph N(c) (k = 10 nearest by cosine in the
        pretrained reference text space among C_<=t minus c); q_0,c = softmax_j(cos(u_0,c, u_0,j) /
        tau_T); L_GR = mean_c KL(q_0,c || q_S,c) (ops.knn_subgraph_kl), tau_T = 0.05.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import ops

TERM_NAMES = {"cls": "L_cls", "acgd": "L_ACGD", "gr": "L_GR", "total": "L"}


def cls_loss(img_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
             logit_scale: Union[float, torch.Tensor]) -> torch.Tensor:
    """L_cls = mean_x CE(s · v̄(x) · U^T, y).

    img_emb: (B, d) image embeddings v(x) (normalised here); text_emb: (C, d) class embeddings u_c
    (normalised here); labels: (B,) in 0..C-1 (positions in text_emb).
    """
    if img_emb.dim() != 2 or text_emb.dim() != 2 or img_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"cls_loss: expected (B, d) images and (C, d) text, got {tuple(img_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    logits = logit_scale * F.normalize(img_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    return F.cross_entropy(logits.float(), labels)


def acgd_loss(student_logits_old: torch.Tensor, teacher_logits_old: torch.Tensor, tau: float) -> torch.Tensor:
    """L_ACGD = tau^2 · mean_a KL(softmax(z_T / tau) || softmax(z_S / tau)), z over the old classes."""
    if student_logits_old.shape != teacher_logits_old.shape:
        raise ValueError(f"acgd_loss: student logits {tuple(student_logits_old.shape)} and cached teacher logits "
                         f"{tuple(teacher_logits_old.shape)} must both be (anchors, old classes)")
    return ops.anchor_kl(student_logits_old, teacher_logits_old.to(student_logits_old.device), tau)


# ----------------------------------------------------------------------------- TSGR

@dataclass
class TSGRGraph:
    """The fixed kNN subgraphs of task t, rooted at its new classes.

    roots (R,) int64 class rows; neighbors (R, k) int64, each root's k nearest classes (reference
    cosine, decreasing) among the seen classes minus itself; ref_logprob (R, k) = log q_0 =
    log_softmax_j(cos(u_0,root, u_0,j) / tau). Empty (R = 0 or k = 0) when there is nothing to
    preserve (a single seen class); its loss is then 0.
    """
    roots: torch.Tensor
    neighbors: torch.Tensor
    ref_logprob: torch.Tensor
    tau: float
    n_classes: int  # C_seen at build time: the student text must have at least this many rows
    # ops.knn_backward_plan over n_classes rows: the fused backward's scatter order, built once per
    # graph instead of every step (None for an empty graph)
    plan: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.roots.shape[0]

    @property
    def empty(self) -> bool:
        return self.neighbors.numel() == 0

    def to(self, device: Union[str, torch.device]) -> "TSGRGraph":
        return TSGRGraph(self.roots.to(device), self.neighbors.to(device), self.ref_logprob.to(device), self.tau,
                         self.n_classes, None if self.plan is None else self.plan.to(device))

    @classmethod
    def build(cls, ref_text_all: torch.Tensor, new_classes: Sequence[int], k: int, tau: float) -> "TSGRGraph":
        """Graph from the pretrained reference embeddings of the seen classes (rows = ordered labels).

        ref_text_all: (C_seen, d) u_0 of classes 0..C_seen-1; new_classes: the roots (task t's rows).
        k shrinks to C_seen - 1 when fewer classes exist.
        """
        if ref_text_all.dim() != 2:
            raise ValueError(f"TSGRGraph.build: ref_text_all must be (C_seen, d), got {tuple(ref_text_all.shape)}")
        if k < 1 or not tau > 0:
            raise ValueError(f"TSGRGraph.build: need tsgr.k >= 1 and tsgr.tau > 0, got k={k}, tau={tau}")
        n_seen = ref_text_all.shape[0]
        # N(c): c's k nearest seen classes by reference cosine, c excluded, and log q_0, in fp32 (the roots'
        # type and range are knn_subgraphs' checks: a fractional root is refused, not truncated)
        roots, neighbors, ref_logprob = ops.knn_subgraphs(ref_text_all, list(new_classes), k, tau)
        if neighbors.numel() == 0:  # nothing to preserve (no root, or a single seen class)
            return cls(roots, neighbors, ref_logprob, float(tau), n_seen)
        return cls(roots, neighbors, ref_logprob, float(tau), n_seen, ops.knn_backward_plan(roots, neighbors, n_seen))


def tsgr_loss(student_text: torch.Tensor, graph: TSGRGraph) -> torch.Tensor:
    """L_GR = mean_c KL(q_0,c || q_S,c), q_S,c = softmax_{j in N(c)}(cos(u_S,c, u_S,j) / tau_T).

    student_text: (C_seen, d) student class embeddings (rows = ordered labels; normalised here).
    """
    if graph.empty:
        return student_text.new_zeros((), dtype=torch.float32)
    if student_text.dim() != 2 or student_text.shape[0] < graph.n_classes:
        raise ValueError(f"tsgr_loss: student_text {tuple(student_text.shape)} must have a row for each of the "
                         f"{graph.n_classes} seen classes the graph was built on")
    # rows past the graph's n_classes are in no subgraph (zero gradient either way); without them the
    # graph's plan, built over n_classes rows, fits
    emb = F.normalize(student_text[:graph.n_classes], dim=-1)
    # the graph's indices were validated when it was built (roots on the host, neighbours from topk over
    # its n_classes rows, and student_text has those rows): no per-step range check
    plan = None if graph.plan is None else graph.plan.to(emb.device)
    return ops.knn_subgraph_kl(emb, graph.roots, graph.neighbors, graph.ref_logprob.to(emb.device), graph.tau,
                               check_indices=False, plan=plan)


# ----------------------------------------------------------------------------- the step's losses

def training_losses(emb: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor,
                    n_old: int, teacher_logits: Optional[torch.Tensor], graph: Optional[TSGRGraph],
                    cfg) -> tuple[torch.Tensor, dict]:
    """(L, {term: value}) of a training step from its towers' outputs (Learner.loss's stage-2 math).

    emb: (B + A, d) image embeddings v(x) of the batch's B images, then of its A anchors (A = 0 without
    ACGD); text: (C_seen, d) the student's class embeddings u_S; labels: (B,) ordered labels;
    teacher_logits: (A, C_old) the cached teacher logits, or None (no ACGD term); graph: the task's TSGR
    graph, or None (no L_GR). cfg: optim.cls_over, acgd.tau and the terms' weights. Tensors in, tensors
    out: under run.compile it is one compiled graph (engine/compiling.py: compile_learner), not the
    hundred-odd eager launches its normalisations, GEMMs, cross-entropy and their backward are.
    """
    n_img = labels.shape[0]
    emb = F.normalize(emb, dim=-1)
    if cfg.optim.cls_over == "seen":
        l_cls = cls_loss(emb[:n_img], text, labels, logit_scale)
    else:
        l_cls = cls_loss(emb[:n_img], text[n_old:], labels - n_old, logit_scale)
    parts = {"cls": l_cls}
    if teacher_logits is not None:
        z_s = logit_scale * emb[n_img:] @ text[:n_old].T
        parts["acgd"] = acgd_loss(z_s, teacher_logits, cfg.acgd.tau)
    if graph is not None:
        with torch.autocast(text.device.type, enabled=False):  # fp32 against the fp32 reference
            parts["gr"] = tsgr_loss(text.float(), graph)
    total = total_loss(parts.get("cls"), parts.get("acgd"), parts.get("gr"), cfg, check=False)
    return total, parts


# ----------------------------------------------------------------------------- total

def check_finite(parts: Mapping[str, Optional[torch.Tensor]], step: Optional[int] = None) -> None:
    """Raise FloatingPointError naming the first loss term that is NaN or inf (one host sync)."""
    named = [(k, v) for k, v in parts.items() if v is not None]
    if not named:
        return
    if bool(torch.isfinite(torch.stack([v.detach().float().reshape(()) for _, v in named])).all()):
        return
    for key, value in named:
        v = float(value.detach())
        if v != v or v in (float("inf"), float("-inf")):
            where = f" at step {step}" if step is not None else ""
            raise FloatingPointError(
                f"{TERM_NAMES.get(key, key)} is {v}{where}; try a lower learning rate (optim.lr), fp32 "
                f"(run.precision=fp32) or gradient clipping (optim.grad_clip)")


def total_loss(l_cls: Optional[torch.Tensor], l_acgd: Optional[torch.Tensor], l_gr: Optional[torch.Tensor],
               cfg, step: Optional[int] = None, check: bool = True) -> torch.Tensor:
    """L = L_cls + lambda_ACGD · L_ACGD + lambda_GR · L_GR; None terms are skipped.

    cfg: a segpcl_fast.config.Config (uses cfg.acgd.weight, cfg.tsgr.weight). check=True raises a
    FloatingPointError naming the term when any term is NaN/inf (costs one host sync per call).
    """
    weighted = [(1.0, l_cls), (cfg.acgd.weight, l_acgd), (cfg.tsgr.weight, l_gr)]
    terms = [w * v for w, v in weighted if v is not None]
    if not terms:
        raise ValueError("total_loss: every term is None; at least L_cls must be given")
    if check:
        check_finite({"cls": l_cls, "acgd": l_acgd, "gr": l_gr}, step=step)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
