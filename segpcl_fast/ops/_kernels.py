"""The Triton kernel modules (`segpcl_fast.kernels.<name>`) and the rule that picks Triton or the
reference for a call."""
from __future__ import annotations

import importlib

import torch

from . import dispatch


def load_kernel(name: str):
    """The kernel module `segpcl_fast.kernels.<name>` (e.g. "pgd_step")."""
    return importlib.import_module(f"segpcl_fast.kernels.{name}")


_utils = load_kernel("_triton_utils")


def choose_impl(op: str, *tensors, supported: bool = True) -> str:
    """"triton" or "reference" for these tensors under the current backend, recorded in dispatch.

    auto: Triton on CUDA tensors when triton is installed, else (and for float64) the reference. "triton": Triton on
    CUDA, or on CPU under TRITON_INTERPRET=1 (tests); anywhere else one clear error.
    "reference" (and "cpp", which has no version of these ops): the reference.
    Under a torch.func transform: the reference ("triton" forced there: one error).
    supported=False (shapes the fused kernel does not take) picks the reference under "auto";
    under "triton" the launcher then raises its own clear error.
    Inside torch.compile tracing the choice is not recorded (its logging would break the graph).
    """
    impl = impl_for(op, *tensors, supported=supported)
    if not torch.compiler.is_compiling():  # record_choice logs: a graph break under dynamo
        dispatch.record_choice(op, impl, tensors[0].device.type)
    return impl


def impl_for(op: str, *tensors, supported: bool = True) -> str:
    """choose_impl's rule, without recording the choice (`segpcl-fast env` asks it per device)."""
    backend = dispatch.get_backend()
    if dispatch.reference_under_transform(op, forced=backend == "triton"):  # torch.func, jit.trace: see dispatch
        return "reference"
    if backend == "triton":
        _utils.check_can_run(op, *tensors)
        return "triton"
    if (backend == "auto" and supported and _utils.HAS_TRITON and all(t.is_cuda for t in tensors)
            and not _utils.has_fp64(*tensors)):
        return "triton"
    return "reference"
