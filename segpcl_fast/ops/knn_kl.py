"""ops.knn_subgraph_kl: the TSGR loss mean_r KL(q_0[r] || q_S[r]) over fixed kNN subgraphs.

Triton (gather + similarities + softmax + KL + root gradient in one pass; deterministic
segment-sum backward) or the reference; see segpcl_fast.kernels.knn_subgraph_kl for the
formula and NaN / inf behaviour. `knn_reference_logprob` computes the fixed log q_0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels._triton_utils import tau_value
from ._kernels import choose_impl, load_kernel
from .dispatch import refuse_trained_constants

_k = load_kernel("knn_subgraph_kl")
knn_subgraph_kl_reference = _k.knn_subgraph_kl_reference
knn_reference_logprob = _k.knn_reference_logprob
knn_backward_plan = _k.knn_backward_plan
knn_fused_fits = _k.fused_fits  # whether the Triton kernels take (k, d, roots): else "auto" runs the reference


def row_indices(owner: str, name: str, value, device=None) -> torch.Tensor:
    """int64 row indices from a tensor, list, range or array of integers (any integer dtype, uint8 included:
    read as values, converted before any indexing); a boolean mask, fractional rows or complex values refused.
    An empty list (float32 to torch.as_tensor) is no rows."""
    t = torch.as_tensor(value, device=device)
    if t.numel() == 0 and t.is_floating_point():
        t = t.long()
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{owner}: {name} must be integer row indices, got {t.dtype}"
                        + ("; for a mask pass mask.nonzero().squeeze(1)" if t.dtype == torch.bool else ""))
    return t.long()


def knn_subgraphs(ref_emb: torch.Tensor, roots: torch.Tensor, k: int, tau: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed kNN subgraphs TSGR compares (method.md stage 2): (roots, neighbors (R, k) int64, each
    root's k nearest rows of ref_emb by cosine, itself excluded, nearest first, ref_logprob (R, k), log q_0
    at tau over them). ref_emb: (classes, d) reference embeddings, normalised here in fp32 whatever the
    caller's autocast (q_0 is the fixed target: a bf16 build leaves the loss > 0 at student = reference
    and can pick other neighbours); roots: (R,) integer rows of it (a tensor or a list; checked here, one
    host sync per graph). k shrinks to classes - 1; with no root or a single class there is nothing to
    preserve: roots[:0] and (0, 0)."""
    if ref_emb.dim() != 2 or not ref_emb.is_floating_point():
        raise ValueError(f"knn_subgraphs: ref_emb must be a floating (classes, d) matrix, got {ref_emb.dtype} "
                         f"{tuple(ref_emb.shape)}")
    roots = row_indices("knn_subgraphs", "roots", roots, device=ref_emb.device)
    if roots.dim() != 1:
        raise TypeError(f"knn_subgraphs: roots must be a 1-D tensor (or list) of integer row indices of ref_emb, got "
                        f"shape {tuple(roots.shape)}")
    n = ref_emb.shape[0]
    if roots.numel() and not (0 <= int(roots.min()) and int(roots.max()) < n):
        raise ValueError(f"knn_subgraphs: roots must be rows 0..{n - 1} of ref_emb, got rows "
                         f"{int(roots.min())}..{int(roots.max())}")
    if isinstance(k, bool) or int(k) != k or k < 1:  # 0 or less: an empty graph, a loss of 0, without a word
        raise ValueError(f"knn_subgraphs: k must be an integer >= 1 (neighbours per root), got {k!r}")
    tau = tau_value("knn_subgraphs", tau)  # q_0 at tau: 0 gave NaN, a negative tau inverted it
    k = min(int(k), n - 1)
    if roots.numel() == 0 or k < 1:
        none = torch.zeros(0, 0, device=ref_emb.device)
        return roots[:0], none.long(), none
    with torch.autocast(ref_emb.device.type, enabled=False):
        ref = F.normalize(ref_emb.float(), dim=-1)
        sim = ref[roots] @ ref.T  # (R, classes) cosines
        sim[torch.arange(roots.numel(), device=sim.device), roots] = float("-inf")  # N(c) excludes c
        neighbors = sim.topk(k, dim=-1).indices
        # log q_0 with the same similarity computation the loss uses on the student side
        return roots, neighbors, knn_reference_logprob(ref, roots, neighbors, tau)


def knn_subgraph_kl(emb: torch.Tensor, roots: torch.Tensor, neighbors: torch.Tensor,
                    ref_logprob: torch.Tensor, tau: float, check_indices: bool = True,
                    plan: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean_r KL(exp(ref_logprob[r]) || softmax_j(emb[roots[r]] . emb[neighbors[r, j]] / tau)), fp32 scalar.

    emb: (classes, d) student text embeddings, already L2-normalised; roots (R,) and neighbors
    (R, k) int64 row indices; ref_logprob (R, k) from knn_reference_logprob. Gradient flows into
    emb (root and neighbour rows). The loss is fp32 (fp64 for fp64 emb).

    Indices outside [0, classes) raise (torch._assert_async: no host sync; on CUDA a device assert,
    which ends the process's CUDA context). check_indices=False skips that check (about 8 small
    launches on CUDA) for indices validated once already: the trainer's TSGR graph, fixed per task.

    plan: `knn_backward_plan(roots, neighbors, emb.shape[0])` for a graph used more than once (the
    TSGR graph is fixed for a task): the Triton backward then runs one kernel instead of building
    it (a sort and a search) every call. Its shape is checked; its values must come from these roots
    and neighbours. The reference ignores it.
    """
    refuse_trained_constants("knn_subgraph_kl", tau=tau)
    tau = tau_value("knn_subgraph_kl", tau)  # a float: the same dtype and shape on every path
    _k.check_knn_inputs(emb, roots, neighbors, ref_logprob, tau, check_indices)
    if plan is not None:
        _k.check_knn_plan(plan, emb, neighbors)
    fits = _k.fused_fits(neighbors.shape[1], emb.shape[1], neighbors.shape[0])
    if choose_impl("knn_subgraph_kl", emb, roots, neighbors, ref_logprob, supported=fits) == "triton":
        return _k.knn_subgraph_kl_fused(emb, roots, neighbors, ref_logprob, tau, plan)
    return knn_subgraph_kl_reference(emb, roots, neighbors, ref_logprob, tau)
