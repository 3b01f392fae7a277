"""The two loss ops as nn.Modules, for training code of your own (as Liger-Kernel's loss modules wrap
its ops): each forward is one call of the functional op, so it dispatches (Triton on CUDA, else the
reference) and traces under torch.compile as that op does.

    AnchorKLLoss(tau=20.0)            ops.anchor_kl: tau^2 * mean_a KL(softmax(z_T / tau) || softmax(z_S / tau))
    SubgraphKLLoss(roots, neighbors,  ops.knn_subgraph_kl over fixed kNN subgraphs, held as buffers
                   ref_logprob, tau,  (they move with .to(device)), checked once when built; the
                   num_classes)       Triton backward's plan built once too, as the trainer's TSGR graph
    SubgraphKLLoss.from_reference(ref_emb, roots, k, tau)
                                      the subgraphs of method.md's TSGR: each root's k nearest rows of
                                      ref_emb by cosine (itself excluded) and log q_0 at tau

tau is fixed per module (a float: the ops refuse a trained one). The LoRA-B-only linear's module is
segpcl_fast.model.lora.LoRABLinear.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .anchor_kl import anchor_kl
from .knn_kl import knn_backward_plan, knn_subgraph_kl, knn_subgraphs

__all__ = ["AnchorKLLoss", "SubgraphKLLoss"]


def _tau(owner: str, tau) -> float:
    if isinstance(tau, torch.Tensor) or not isinstance(tau, (int, float)) or not 0 < float(tau) < math.inf:
        raise ValueError(f"{owner}: tau must be a finite number > 0 (a float, not a tensor), got {tau!r}")
    return float(tau)


class AnchorKLLoss(nn.Module):
    """ACGD's loss (method.md stage 2): tau^2 * mean over anchors of KL(softmax(z_T / tau) || softmax(z_S / tau)).

    forward(student_logits, teacher): (anchors, classes) each, any class count; the teacher is a
    constant (logits, or log-probabilities at tau with teacher_is_logprob=True). Returns an fp32
    scalar (fp64 for fp64 inputs). On CUDA the Triton kernel computes the loss and z_S's gradient in one
    pass (segpcl_fast.kernels.anchor_kl: fp32 logits get one backward per forward)."""

    def __init__(self, tau: float = 20.0, teacher_is_logprob: bool = False):
        super().__init__()
        self.tau = _tau("AnchorKLLoss", tau)
        self.teacher_is_logprob = bool(teacher_is_logprob)

    def forward(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return anchor_kl(student_logits, teacher, self.tau, self.teacher_is_logprob)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, teacher_is_logprob={self.teacher_is_logprob}"


class SubgraphKLLoss(nn.Module):
    """TSGR's loss (method.md stage 2) over fixed kNN subgraphs: mean_r KL(q_0[r] || q_S[r]),
    q_S[r] = softmax_j(cos(e[roots[r]], e[neighbors[r, j]]) / tau).

    roots (R,) and neighbors (R, k): int64 rows of a (num_classes, d) embedding matrix, checked here
    once (forward then skips the per-call range check, as the trainer does); ref_logprob (R, k): log q_0,
    e.g. from ops.knn_reference_logprob. forward(emb): (num_classes, d) embeddings, L2-normalised here
    (normalize=False: already normalised); extra rows past num_classes are in no subgraph and get a zero
    gradient. Returns an fp32 scalar (0, with a zero gradient, for a graph with no edges)."""

    def __init__(self, roots: torch.Tensor, neighbors: torch.Tensor, ref_logprob: torch.Tensor, tau: float,
                 num_classes: int, normalize: bool = True):
        super().__init__()
        self.tau = _tau("SubgraphKLLoss", tau)
        self.num_classes = int(num_classes)
        self.normalize = bool(normalize)
        roots, neighbors = torch.as_tensor(roots), torch.as_tensor(neighbors)
        if roots.dim() != 1 or neighbors.dim() != 2 or neighbors.shape[0] != roots.shape[0]:
            raise ValueError(f"SubgraphKLLoss: roots must be (R,) and neighbors (R, k), got {tuple(roots.shape)} and "
                             f"{tuple(neighbors.shape)}")
        if roots.is_floating_point() or neighbors.is_floating_point():
            raise TypeError(f"SubgraphKLLoss: roots and neighbors are row indices (integers), got {roots.dtype} / "
                            f"{neighbors.dtype}")
        if ref_logprob.shape != neighbors.shape or not ref_logprob.is_floating_point():
            raise ValueError(f"SubgraphKLLoss: ref_logprob must be floating (R, k) = {tuple(neighbors.shape)}, got "
                             f"{ref_logprob.dtype} {tuple(ref_logprob.shape)}; ops.knn_reference_logprob computes it")
        indices = torch.cat([roots.reshape(-1), neighbors.reshape(-1)])
        if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < self.num_classes):
            raise ValueError(f"SubgraphKLLoss: roots and neighbors must be rows 0..{self.num_classes - 1} of the "
                             f"embedding matrix (num_classes={self.num_classes}), got {int(indices.min())} .. "
                             f"{int(indices.max())}")
        roots, neighbors = roots.long(), neighbors.long()
        self.register_buffer("roots", roots)
        self.register_buffer("neighbors", neighbors)
        self.register_buffer("ref_logprob", ref_logprob.float())
        # the Triton backward's scatter order, a function of the indices alone: built once, not per call
        plan = knn_backward_plan(roots, neighbors, self.num_classes) if neighbors.numel() else None
        self.register_buffer("plan", plan)

    @classmethod
    def from_reference(cls, ref_emb: torch.Tensor, roots, k: int, tau: float, normalize: bool = True
                       ) -> "SubgraphKLLoss":
        """Each root's subgraph: its k nearest rows of ref_emb (num_classes, d) by cosine, itself excluded
        (k shrinks to num_classes - 1), and log q_0 from ref_emb at tau, in fp32."""
        if ref_emb.dim() != 2 or not ref_emb.is_floating_point():
            raise ValueError(f"SubgraphKLLoss.from_reference: ref_emb must be a floating (classes, d) matrix, got "
                             f"{ref_emb.dtype} {tuple(ref_emb.shape)}")
        if int(k) < 1:
            raise ValueError(f"SubgraphKLLoss.from_reference: k must be >= 1, got {k}")
        tau = _tau("SubgraphKLLoss.from_reference", tau)
        n = ref_emb.shape[0]
        roots = torch.as_tensor(roots, dtype=torch.long, device=ref_emb.device).reshape(-1)
        if roots.numel() and not (0 <= int(roots.min()) and int(roots.max()) < n):
            raise ValueError(f"SubgraphKLLoss.from_reference: roots must be rows 0..{n - 1} of ref_emb, got "
                             f"{roots.tolist()}")
        k = min(int(k), n - 1)
        if roots.numel() == 0 or k < 1:  # nothing to preserve (one class): a graph with no edges, loss 0
            empty = torch.zeros(roots.numel(), 0, device=ref_emb.device)
            return cls(roots, empty.long(), empty, tau, n, normalize)
        with torch.autocast(ref_emb.device.type, enabled=False):  # fp32: q_0 is the fixed target
            neighbors, ref_logprob = knn_subgraphs(F.normalize(ref_emb.detach().float(), dim=-1), roots, k, tau)
        return cls(roots, neighbors, ref_logprob, tau, n, normalize)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        if emb.dim() != 2 or emb.shape[0] < self.num_classes:
            raise ValueError(f"SubgraphKLLoss: emb must be (classes, d) with at least the graph's {self.num_classes} "
                             f"rows, got {tuple(emb.shape)}")
        if self.neighbors.numel() == 0:  # no edges: 0, still a function of emb (backward gives zeros)
            return emb[:0].sum().float()
        emb = emb[:self.num_classes]  # rows past the graph's are in no subgraph; the plan covers num_classes rows
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        return knn_subgraph_kl(emb, self.roots, self.neighbors, self.ref_logprob, self.tau, check_indices=False,
                               plan=self.plan)

    def extra_repr(self) -> str:
        return (f"roots={self.roots.shape[0]}, k={self.neighbors.shape[1] if self.neighbors.dim() == 2 else 0}, "
                f"tau={self.tau}, num_classes={self.num_classes}, normalize={self.normalize}")
