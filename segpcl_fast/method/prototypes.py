"""Stage 3 of SeGP-CL (method.md) and dual-path inference.

New prototypes   p_c = mean of r_S(x) over task t's training images of class c.
Drift transfer   d_a = r_S(x_a) - r_T(x_a); w_a,c = max(0, cos(r_T(x_a), p_c));
                 p_c <- p_c + sum_a w_a,c d_a / sum_a w_a,c   (unchanged if all w_a,c = 0).
Dual path        l(x, c) = s · cos(v_S(x), u_S,c) + beta · s · cos(r_S(x), p_c).

The prototype memory (one raw-feature vector per seen class) is the method's only memory.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

WEIGHT_RULES = ("relu_cos", "uniform")


def class_means(raw_feats: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """(len(classes), D) fp32: row i = mean of raw_feats over the rows whose label is classes[i]."""
    if raw_feats.dim() != 2 or labels.shape != (raw_feats.shape[0],):
        raise ValueError(f"class_means: expected (N, D) features and (N,) labels, got {tuple(raw_feats.shape)} "
                         f"and {tuple(labels.shape)}")
    classes_t = torch.as_tensor(list(classes), dtype=torch.long, device=labels.device)
    member = labels.view(1, -1) == classes_t.view(-1, 1)  # (C, N)
    counts = member.sum(1)
    if bool((counts == 0).any()):
        missing = classes_t[counts == 0].tolist()
        raise ValueError(f"class_means: no images of class(es) {missing}; every new class needs training "
                         f"images to define its prototype")
    sums = member.to(raw_feats.device, torch.float32) @ raw_feats.float()
    return sums / counts.to(sums.device, torch.float32).unsqueeze(1)


def transfer_weights(teacher_raw: torch.Tensor, prototypes: torch.Tensor, rule: str = "relu_cos") -> torch.Tensor:
    """(M, C) anchor-to-class weights w_a,c. relu_cos: max(0, cos(r_T(x_a), p_c)); uniform: 1."""
    if rule == "relu_cos":
        cos = F.normalize(teacher_raw.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T
        return cos.clamp(min=0.0)
    if rule == "uniform":
        return teacher_raw.new_ones(teacher_raw.shape[0], prototypes.shape[0], dtype=torch.float32)
    raise ValueError(f"unknown prototype weight rule '{rule}' (prototypes.weight_rule); choose from {WEIGHT_RULES}")


def transfer_prototypes(prototypes_old: torch.Tensor, teacher_raw: torch.Tensor, student_raw: torch.Tensor,
                        weight_rule: str = "relu_cos") -> torch.Tensor:
    """Anchor-induced drift transfer: p_c + sum_a w_a,c d_a / sum_a w_a,c, d_a = r_S(x_a) - r_T(x_a).

    prototypes_old (C_old, D); teacher_raw, student_raw (M, D) raw features of the anchors before
    (cached) and after training the task. Classes whose weights are all 0 keep their prototype.
    Returns a new (C_old, D) fp32 tensor.
    """
    if teacher_raw.shape != student_raw.shape or teacher_raw.dim() != 2:
        raise ValueError(f"transfer_prototypes: teacher_raw {tuple(teacher_raw.shape)} and student_raw "
                         f"{tuple(student_raw.shape)} must both be (anchors, D)")
    if prototypes_old.dim() != 2 or prototypes_old.shape[1] != teacher_raw.shape[1]:
        raise ValueError(f"transfer_prototypes: prototypes {tuple(prototypes_old.shape)} must be (C_old, "
                         f"D={teacher_raw.shape[1]})")
    weights = transfer_weights(teacher_raw, prototypes_old, weight_rule)  # (M, C)
    drift = student_raw.float() - teacher_raw.float()  # (M, D)
    total = weights.sum(0)  # (C,)
    shift = (weights.T @ drift) / total.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    shift = torch.where((total > 0).unsqueeze(1), shift, torch.zeros_like(shift))
    return prototypes_old.float() + shift


def dual_path_logits(img_emb: torch.Tensor, raw: torch.Tensor, text_emb: torch.Tensor, prototypes: torch.Tensor,
                     logit_scale: Union[float, torch.Tensor], beta: float) -> torch.Tensor:
    """l(x, c) = s · cos(v_S(x), u_c) + beta · s · cos(r_S(x), p_c), (B, C) over the seen classes."""
    if text_emb.shape[0] != prototypes.shape[0]:
        raise ValueError(f"dual_path_logits: {text_emb.shape[0]} text embeddings but {prototypes.shape[0]} "
                         f"prototypes; both need one row per seen class")
    clip = F.normalize(img_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T
    logits = logit_scale * clip
    if beta != 0:
        visual = F.normalize(raw.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T
        logits = logits + beta * logit_scale * visual
    return logits


class PrototypeMemory:
    """Raw-feature prototypes of every seen class, rows in class order: `tensor` is (C_seen, D)."""

    def __init__(self, tensor: Optional[torch.Tensor] = None):
        self.tensor = tensor if tensor is not None else torch.zeros(0, 0)

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def add(self, new: torch.Tensor) -> None:
        """Append the prototypes of the task's new classes (rows in class order)."""
        if new.dim() != 2:
            raise ValueError(f"PrototypeMemory.add: expected (C_new, D), got {tuple(new.shape)}")
        if len(self) == 0:
            self.tensor = new.float().clone()
            return
        if new.shape[1] != self.tensor.shape[1]:
            raise ValueError(f"PrototypeMemory.add: new prototypes have width {new.shape[1]}, stored ones "
                             f"{self.tensor.shape[1]}")
        self.tensor = torch.cat([self.tensor, new.float().to(self.tensor.device)])

    def set_old(self, moved: torch.Tensor) -> None:
        """Replace the first moved.shape[0] rows (the old classes) by `moved`."""
        if moved.dim() != 2 or moved.shape[0] > len(self) or moved.shape[1] != self.tensor.shape[1]:
            raise ValueError(f"PrototypeMemory.set_old: got {tuple(moved.shape)} for a memory of "
                             f"{tuple(self.tensor.shape)}")
        self.tensor = torch.cat([moved.float().to(self.tensor.device), self.tensor[moved.shape[0]:]])

    def transfer(self, n_old: int, teacher_raw: torch.Tensor, student_raw: torch.Tensor,
                 weight_rule: str = "relu_cos") -> torch.Tensor:
        """Drift-transfer the first n_old prototypes in place; returns the per-class shift norm (n_old,)."""
        old = self.tensor[:n_old].to(teacher_raw.device)
        moved = transfer_prototypes(old, teacher_raw, student_raw, weight_rule)
        self.set_old(moved)
        return (moved - old.float()).norm(dim=-1)

    def state_dict(self) -> dict:
        return {"prototypes": self.tensor}

    def load_state_dict(self, state: dict) -> None:
        if "prototypes" not in state or state["prototypes"].dim() != 2:
            raise ValueError("PrototypeMemory.load_state_dict: expected {'prototypes': (C_seen, D) tensor}")
        self.tensor = state["prototypes"].float()
