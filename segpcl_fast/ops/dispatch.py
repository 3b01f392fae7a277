"""Which implementation of a fused op runs: the Triton kernel, the C++/CUDA op, or the reference.

One switch for every op: `set_backend("reference")` forces the plain-PyTorch references (the
spec), "auto" (default) picks the fast path where it exists for the device and dtype, and "triton" /
"cpp" ask for one kind of fast path, for a whole run (run.ops):
- "triton": the Triton ops (pgd_step, anchor_kl, knn_subgraph_kl) run their kernels, or raise where they
  cannot (CPU tensors outside TRITON_INTERPRET=1, float64); lora_b_linear takes its fused Triton GEMMs
  where they run (bf16 / fp16 on CUDA, B trained) and what "auto" takes elsewhere (fp32, frozen B);
- "cpp": lora_b_linear runs the C++ op, or raises where the extension has no kernel for the device; the
  Triton ops, which have no C++ version, run their references.
`ops._kernels.impl_for(op, *tensors)` (the Triton ops) and `ops.lora_linear.lora_b_linear_impl`
say what would run, `last_choice()` what ran, and every first choice per (op, device, impl) is logged.

Under a torch.func transform (grad, vmap, jvp, jacrev, functional_call inside grad, ...) every op runs its
reference under "auto": torch's custom ops with a registered autograd and the autograd.Functions of the fast
paths do not compose with those transforms (pytorch/pytorch#170834: "it must override the setup_context
staticmethod"), while the references are plain aten ops, which every transform takes. A forced "triton" there,
and "cpp" for lora_b_linear (the Triton ops have no C++ version: "cpp" runs their references anyway), is one
error naming the switch. Under torch.jit.trace "auto" runs the references too: a trace of aten ops, the same
whatever the grad mode. One rule for every op: `reference_under_transform`.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

log = logging.getLogger("segpcl_fast.ops")

BACKENDS = ("auto", "reference", "triton", "cpp")
# the starting backend: SEGPCL_OPS=<one of BACKENDS> (e.g. SEGPCL_OPS=reference to run a whole
# program on the references), else "auto"; run.ops in a config sets it per run
_backend = os.environ.get("SEGPCL_OPS", "") or "auto"
if _backend not in BACKENDS:  # a ConfigError: the CLI prints it as one line
    from ..config import ConfigError
    raise ConfigError(f"SEGPCL_OPS='{_backend}' is not an ops backend; use one of {', '.join(BACKENDS)}, or unset it")
_logged: set[tuple] = set()
_last_choice: dict[str, str] = {}
_used: dict[str, dict[str, None]] = {}  # op -> implementations in order of first use (a dict as ordered set)


def env_choice(name: str, choices: tuple, default: str) -> str:
    """The value of the A/B switch `name` (an environment variable, e.g. SEGPCL_LORA_MERGE), `default`
    when unset or empty (as for SEGPCL_OPS); a value not in `choices` is one ValueError naming the
    variable and the choices."""
    value = os.environ.get(name) or default
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {choices}")
    return value


def refuse_trained_constants(op: str, **constants) -> None:
    """The ops take these (tau, scaling, the PGD step's bounds) as constants: no gradient flows to
    them on any fast path. A tensor among them that requires grad is one ValueError (the reference
    alone would have differentiated through it), not a gradient that silently does not arrive."""
    for name, value in constants.items():
        if isinstance(value, torch.Tensor) and value.requires_grad:  # (getattr on a SymFloat breaks a graph)
            raise ValueError(f"{op}: {name} is a constant of the op (no gradient flows to it) but requires grad; "
                             f"pass {name}.detach() (or a float)")


def under_func_transform() -> bool:
    """Whether a torch.func transform is active now (traced by torch.compile as a constant, no graph break)."""
    return torch._C._are_functorch_transforms_active()


def jit_tracing() -> bool:
    """Whether torch.jit.trace is recording now (never inside torch.compile)."""
    return not torch.compiler.is_compiling() and torch.jit.is_tracing()


def reference_under_transform(op: str, forced: bool) -> bool:
    """Whether a torch.func transform or torch.jit.trace makes this call of `op` run its reference (the rule
    in this module's docstring, for every op). `forced`: a fast backend is forced for this op ("triton" for
    the Triton ops; "cpp" or "triton" for lora_b_linear). Under torch.func: True, and a forced backend is one
    error. Under torch.jit.trace: True unless forced (a forced backend is traced as asked)."""
    if under_func_transform():
        if forced:
            refuse_forced_under_func_transform(op)
        return True
    return not forced and jit_tracing()


def refuse_forced_under_func_transform(op: str) -> None:
    """A forced fast backend under a torch.func transform: one error with the fix (the fast paths' autograd
    does not compose with torch.func's transforms)."""
    raise RuntimeError(f"{op}: ops backend '{_backend}' is forced, but a torch.func transform (grad, vmap, jvp, ...) "
                       "is active and the fast paths do not compose with torch.func; use set_backend('auto') "
                       "(run.ops=auto), which runs the plain-PyTorch reference under torch.func, or "
                       "set_backend('reference')")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown ops backend '{name}'; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str):
    """Temporarily force a backend: `with ops.backend("reference"): ...`."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def record_choice(op: str, impl: str, device: str) -> str:
    """Remember and log (once per op/device/impl, and once more for a choice made under torch.func) which
    implementation ran."""
    _last_choice[op] = impl
    _used.setdefault(op, {})[impl] = None
    func = under_func_transform()
    key = (op, device, impl, func)
    if key not in _logged:
        _logged.add(key)
        log.info("segpcl_fast.ops.%s -> %s (device=%s, backend=%s%s)", op, impl, device, _backend,
                 ", under a torch.func transform" if func else "")
    return impl


def last_choice() -> dict[str, str]:
    """{op name: implementation used by its last call}."""
    return dict(_last_choice)


def choices_used() -> dict[str, str]:
    """{op name: every implementation it ran since the last reset_choices(), "+"-joined in order
    of first use}: e.g. lora_b_linear "cpp+merged" when training ran the C++ op and evaluation (B
    needs no gradient) the merged GEMM. Calls inside torch.compile'd code are not recorded."""
    return {op: "+".join(impls) for op, impls in _used.items()}


def restore_choices(used: dict[str, str]) -> None:
    """Add choices_used()'s record of an earlier part of the run (a checkpoint's), first in order."""
    earlier = {op: dict.fromkeys(impls.split("+")) for op, impls in used.items() if impls}
    for op, impls in _used.items():
        earlier.setdefault(op, {}).update(impls)
    _used.clear()
    _used.update(earlier)


def reset_choices() -> None:
    _last_choice.clear()
    _used.clear()
