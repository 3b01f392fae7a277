"""The two loss ops as nn.Modules, for training code of your own (as Liger-Kernel's loss modules wrap
its ops): each forward is one call of the functional op, so it dispatches (Triton on CUDA, else the
reference) and traces under torch.compile as that op does.

    AnchorKLLoss(tau=20.0)            ops.anchor_kl: tau^2 * mean_a KL(softmax(z_T / tau) || softmax(z_S / tau))
    SubgraphKLLoss(roots, neighbors,  ops.knn_subgraph_kl over fixed kNN subgraphs (they move with
                   ref_logprob, tau,  .to(device) and are its state_dict), checked once when built; the
                   num_classes)       Triton backward's plan built once too, as the trainer's TSGR graph
    SubgraphKLLoss.from_reference(ref_emb, roots, k, tau)
                                      the subgraphs of method.md's TSGR: each root's k nearest rows of
                                      ref_emb by cosine (itself excluded) and log q_0 at tau

tau is fixed per module (a float: the ops refuse a trained one). The LoRA-B-only linear's module is
segpcl_fast.model.lora.LoRABLinear.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .anchor_kl import ANCHOR_KL_REDUCTIONS, anchor_kl, check_teacher_logprob, logprob_tolerance
from .dispatch import under_func_transform
from .knn_kl import knn_backward_plan, knn_subgraph_kl, knn_subgraphs, row_indices

__all__ = ["AnchorKLLoss", "SubgraphKLLoss"]


def _tau(owner: str, tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < float(tau) < math.inf:
        raise ValueError(f"{owner}: tau must be a finite number > 0 (a float, not a tensor), got {tau!r}")
    return float(tau)


class AnchorKLLoss(nn.Module):
    """ACGD's loss (method.md stage 2): tau^2 * mean over anchors of KL(softmax(z_T / tau) || softmax(z_S / tau)).

    forward(student_logits, teacher): (anchors, classes) each, any class count; the teacher is a
    constant (logits, or log-probabilities at tau with teacher_is_logprob=True). Returns an fp32
    scalar (fp64 for fp64 inputs); reduction over the anchors "mean" (the method's), "sum", or "none"
    (each anchor's tau^2 KL, (A,)). On CUDA the Triton kernel computes the loss and z_S's gradient in one
    pass (segpcl_fast.kernels.anchor_kl: fp32 logits get one backward per forward).

    With teacher_is_logprob=True the first eager forward checks that the teacher's rows are
    log-probabilities (ops.anchor_kl.check_teacher_logprob: one host sync, once per module; not inside
    torch.compile or a torch.func transform): raw logits there are one ValueError, not a wrong loss."""

    def __init__(self, tau: float = 20.0, teacher_is_logprob: bool = False, reduction: str = "mean"):
        super().__init__()
        self.tau = _tau("AnchorKLLoss", tau)
        self.teacher_is_logprob = bool(teacher_is_logprob)
        if reduction not in ANCHOR_KL_REDUCTIONS:
            raise ValueError(f"AnchorKLLoss: reduction must be one of {ANCHOR_KL_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self._teacher_checked = False  # teacher_is_logprob's check (forward), not yet made

    def __setstate__(self, state: dict) -> None:  # a module pickled whole before reduction existed: the mean
        state.setdefault("reduction", "mean")
        state.setdefault("_teacher_checked", False)
        super().__setstate__(state)

    def forward(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        # once, eagerly (not in a compiled graph; not under torch.func, which cannot read a value back)
        if (self.teacher_is_logprob and not self._teacher_checked and not torch.compiler.is_compiling()
                and not under_func_transform()):
            self._teacher_checked = check_teacher_logprob(teacher)  # (a batch without a finite row: not yet)
        return anchor_kl(student_logits, teacher, self.tau, self.teacher_is_logprob, self.reduction)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, teacher_is_logprob={self.teacher_is_logprob}, reduction={self.reduction!r}"


class SubgraphKLLoss(nn.Module):
    """TSGR's loss (method.md stage 2) over fixed kNN subgraphs: mean_r KL(q_0[r] || q_S[r]),
    q_S[r] = softmax_j(cos(e[roots[r]], e[neighbors[r, j]]) / tau).

    roots (R,) and neighbors (R, k): row indices of a (num_classes, d) embedding matrix, checked once
    here (forward then skips the per-call range check, as the trainer does); ref_logprob (R, k): log q_0,
    e.g. from ops.knn_reference_logprob, kept fp32 (the fixed target: .half() / .bfloat16() leave it).
    forward(emb): (num_classes, d) embeddings, L2-normalised here (normalize=False: already normalised),
    outside autocast; rows past num_classes are in no subgraph and get a zero gradient. Returns an fp32
    scalar (fp64 for fp64 emb; 0, with a zero gradient, for a graph with no edges).

    The graph is plain tensor attributes, not buffers, so torch.compile takes each task's new graph
    (another class count, another root count) as inputs of one dynamic graph rather than specialising
    on buffer shapes and recompiling per task; `.to()` / `.cuda()` move it (`_apply`). state_dict()
    holds it as the module's extra state (with tau and num_classes); loading one checks it again and
    builds the Triton backward's plan anew."""

    def __init__(self, roots, neighbors, ref_logprob: torch.Tensor, tau: float, num_classes: int,
                 normalize: bool = True):
        super().__init__()
        self.normalize = bool(normalize)
        self._set_graph(roots, neighbors, ref_logprob, tau, num_classes)

    def _set_graph(self, roots, neighbors, ref_logprob, tau, num_classes) -> None:
        owner = "SubgraphKLLoss"
        tau = _tau(owner, tau)
        roots, neighbors = row_indices(owner, "roots", roots), row_indices(owner, "neighbors", neighbors)
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"{owner}: num_classes must be a positive integer, got {num_classes!r}")
        num_classes = int(num_classes)
        if roots.dim() != 1 or neighbors.dim() != 2 or neighbors.shape[0] != roots.shape[0]:
            raise ValueError(f"{owner}: roots must be (R,) and neighbors (R, k), got {tuple(roots.shape)} and "
                             f"{tuple(neighbors.shape)}")
        if ref_logprob.shape != neighbors.shape or not ref_logprob.is_floating_point():
            raise ValueError(f"{owner}: ref_logprob must be floating (R, k) = {tuple(neighbors.shape)}, got "
                             f"{ref_logprob.dtype} {tuple(ref_logprob.shape)}; ops.knn_reference_logprob computes it")
        if len({roots.device, neighbors.device, ref_logprob.device}) != 1:
            raise ValueError(f"{owner}: roots, neighbors and ref_logprob must be on one device, got "
                             f"{roots.device} / {neighbors.device} / {ref_logprob.device}")
        indices = torch.cat([roots, neighbors.reshape(-1)])
        if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < num_classes):
            raise ValueError(f"{owner}: roots and neighbors must be rows 0..{num_classes - 1} of the embedding "
                             f"matrix (num_classes={num_classes}), got {int(indices.min())} .. {int(indices.max())}")
        # log-probabilities: each row's q_0 sums to 1 (probabilities or logits passed instead do not), within the
        # rounding of the dtype they came in
        tolerance = logprob_tolerance(ref_logprob.dtype)
        ref_logprob = ref_logprob.detach().float()
        if neighbors.numel() and not torch.allclose(ref_logprob.logsumexp(-1), torch.zeros(()), atol=tolerance):
            raise ValueError(f"{owner}: ref_logprob's rows must be log-probabilities (logsumexp 0 over k), got "
                             "rows that are not; ops.knn_reference_logprob(ref_emb, roots, neighbors, tau) computes them")
        self.roots, self.neighbors, self.ref_logprob, self.tau = roots, neighbors, ref_logprob, tau
        # num_classes as a tensor's shape, not an int attribute: dynamo takes a module's ints as constants,
        # so each task's class count would be a recompile (a zero-byte tensor carries it symbolically)
        self._class_rows = torch.empty(num_classes, 0, dtype=torch.uint8, device=roots.device)
        # the Triton backward's scatter order, a function of the indices alone: built once, not per call
        self.plan = knn_backward_plan(roots, neighbors, num_classes) if neighbors.numel() else None

    @classmethod
    def from_reference(cls, ref_emb: torch.Tensor, roots, k: int, tau: float, normalize: bool = True
                       ) -> "SubgraphKLLoss":
        """Each root's subgraph: its k nearest rows of ref_emb (num_classes, d) by cosine, itself excluded
        (k shrinks to num_classes - 1), and log q_0 from ref_emb at tau, in fp32."""
        owner = "SubgraphKLLoss.from_reference"
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"{owner}: k must be an integer >= 1, got {k!r}")
        tau = _tau(owner, tau)
        roots = row_indices(owner, "roots", roots).reshape(-1)  # (R, 1) taken as (R,)
        # ref_emb's shape and the roots' range are knn_subgraphs' checks; no root or a single class: a graph
        # with no edges, loss 0 (as TSGRGraph)
        return cls(*knn_subgraphs(ref_emb.detach(), roots, int(k), tau), tau, ref_emb.shape[0], normalize)

    @property
    def num_classes(self) -> int:
        return self._class_rows.shape[0]

    def _apply(self, fn, recurse: bool = True):
        """Module.to / cuda / cpu / half ...: the graph moves with the module, and keeps its dtypes (int64
        indices, fp32 q_0) whatever dtype the module is cast to."""
        module = super()._apply(fn, recurse)

        def moved(t):
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        self.roots, self.neighbors, self.ref_logprob = moved(self.roots), moved(self.neighbors), moved(self.ref_logprob)
        self._class_rows = moved(self._class_rows)
        self.plan = None if self.plan is None else moved(self.plan)
        return module

    def get_extra_state(self) -> dict:
        return {"roots": self.roots, "neighbors": self.neighbors, "ref_logprob": self.ref_logprob, "tau": self.tau,
                "num_classes": self.num_classes}

    def set_extra_state(self, state: dict) -> None:
        device = self.roots.device
        self._set_graph(*(state[key].to(device) for key in ("roots", "neighbors", "ref_logprob")), state["tau"],
                        state["num_classes"])

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        if emb.dim() != 2 or emb.shape[0] < self.num_classes:
            raise ValueError(f"SubgraphKLLoss: emb must be (classes, d) with at least the graph's {self.num_classes} "
                             f"rows, got {tuple(emb.shape)}")
        if emb.device != self.roots.device:
            raise ValueError(f"SubgraphKLLoss: emb is on {emb.device}, the graph on {self.roots.device}; move the "
                             f"module: .to(emb.device)")
        if self.neighbors.numel() == 0:  # no edges: 0, still a function of emb (backward gives zeros)
            return emb[:0].sum().to(torch.float64 if emb.dtype == torch.float64 else torch.float32)
        emb = emb[:self.num_classes]  # rows past the graph's are in no subgraph; the plan covers num_classes rows
        with torch.autocast(emb.device.type, enabled=False):  # the cosines at tau 0.05 in fp32, not bf16
            if self.normalize:
                emb = F.normalize(emb, dim=-1)
            return knn_subgraph_kl(emb, self.roots, self.neighbors, self.ref_logprob, self.tau,
                                   check_indices=False, plan=self.plan)

    def extra_repr(self) -> str:
        return (f"roots={self.roots.shape[0]}, k={self.neighbors.shape[1]}, tau={self.tau}, "
                f"num_classes={self.num_classes}, normalize={self.normalize}")
