"""Import `segpcl_fast.kernels.<name>`, also from a source checkout that was not pip-installed.

setup.py installs the top-level kernels/ directory as the package `segpcl_fast.kernels`. In a
plain checkout (tests run from the repository root) that package does not exist yet; this loader
registers ../kernels under that same name, so every kernel module (and its torch.library custom
op, which may be registered only once per process) is imported under exactly one name.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from . import dispatch

_PKG = "segpcl_fast.kernels"


def _ensure_kernels_package() -> None:
    if _PKG in sys.modules:
        return
    try:
        importlib.import_module(_PKG)
        return
    except ModuleNotFoundError as exc:
        if exc.name != _PKG:
            raise
    source_dir = Path(__file__).resolve().parents[2] / "kernels"
    init = source_dir / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(f"{_PKG} is not installed and no source kernels/ directory was found at "
                                  f"{source_dir}; reinstall with `pip install --no-build-isolation .`")
    spec = importlib.util.spec_from_file_location(_PKG, init, submodule_search_locations=[str(source_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PKG] = module
    spec.loader.exec_module(module)


def load_kernel(name: str):
    """The kernel module `segpcl_fast.kernels.<name>` (e.g. "pgd_step")."""
    _ensure_kernels_package()
    return importlib.import_module(f"{_PKG}.{name}")


_utils = load_kernel("_triton_utils")


def choose_impl(op: str, *tensors, supported: bool = True) -> str:
    """"triton" or "reference" for these tensors under the current backend, recorded in dispatch.

    auto: Triton on CUDA tensors when triton is installed, else (and for float64) the reference. "triton": Triton on
    CUDA, or on CPU under TRITON_INTERPRET=1 (tests); anywhere else one clear error.
    "reference" (and "cpp", which has no version of these ops): the reference.
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
    if backend == "triton":
        _utils.check_can_run(op, *tensors)
        return "triton"
    if (backend == "auto" and supported and _utils.HAS_TRITON and all(t.is_cuda for t in tensors)
            and not _utils.has_fp64(*tensors)):
        return "triton"
    return "reference"
