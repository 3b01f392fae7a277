"""Optional accelerators, detected at run time and never required: NVIDIA apex, xformers.

The PyPI package called `apex` is unrelated to NVIDIA apex; we check for the fused optimizer
module itself. Each probe says what it found, so a run can report which path it used.
The xformers attention path itself lives in segpcl_fast/ops/mha.py (model code calls ops/).
"""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger("segpcl_fast.engine")


def has_apex_fused_sgd() -> bool:
    try:
        mod = importlib.import_module("apex.optimizers")
        return hasattr(mod, "FusedSGD")
    except Exception:  # ImportError, or the unrelated PyPI 'apex' failing on import
        return False


def apex_fused_sgd(params, optim_cfg):
    """NVIDIA apex FusedSGD on CUDA params, or None (caller falls back to torch's SGD)."""
    if not params or not params[0].is_cuda or not has_apex_fused_sgd():
        log.info("apex FusedSGD not available (needs NVIDIA apex and CUDA); using torch SGD")
        return None
    from apex.optimizers import FusedSGD
    try:
        return FusedSGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
    except RuntimeError as e:  # apex built without --cuda_ext: "apex.optimizers.FusedSGD requires cuda extensions"
        log.warning("apex FusedSGD cannot run here (%s); using torch SGD", e)
        return None


def has_xformers() -> bool:
    """xformers imports and, where CUDA is present, its attention runs there in bf16
    (an import alone proves nothing: a wheel for another CUDA imports without kernels)."""
    try:
        importlib.import_module("xformers.ops")
    except Exception:
        return False
    import torch
    if not torch.cuda.is_available():
        return True
    from ..ops.mha import xformers_failure
    return xformers_failure(torch.device("cuda"), torch.bfloat16, 64) is None


def available() -> dict:
    """{"apex_fused_sgd": bool, "xformers": bool} for reports."""
    return {"apex_fused_sgd": has_apex_fused_sgd(), "xformers": has_xformers()}
