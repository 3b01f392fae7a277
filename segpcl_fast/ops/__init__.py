"""Dispatch for the fused ops: one function per op; see dispatch.py for the backend switch."""
from .dispatch import (backend, choices_used, get_backend, last_choice, reset_choices, restore_choices,
                       set_backend)
from .lora_linear import lora_b_linear, lora_b_linear_merged, lora_b_linear_reference

__all__ = ["backend", "choices_used", "get_backend", "last_choice", "reset_choices", "restore_choices", "set_backend",
           "lora_b_linear", "lora_b_linear_merged", "lora_b_linear_reference"]
from .pgd import pgd_step, pgd_step_reference
from .anchor_kl import anchor_kl, anchor_kl_reference
from .knn_kl import (knn_backward_plan, knn_reference_logprob, knn_subgraph_kl, knn_subgraph_kl_reference,
                     knn_subgraphs)
__all__ += ["pgd_step", "pgd_step_reference", "anchor_kl", "anchor_kl_reference",
            "knn_subgraph_kl", "knn_subgraph_kl_reference", "knn_reference_logprob", "knn_backward_plan",
            "knn_subgraphs"]
from .mha import attention, attention_reference
__all__ += ["attention", "attention_reference"]
from .modules import AnchorKLLoss, SubgraphKLLoss
__all__ += ["AnchorKLLoss", "SubgraphKLLoss"]
