"""Small helpers shared by the Triton kernel files: guarded triton import, interpreter mode, sizes.

Nothing here imports triton at module load; `HAS_TRITON` says whether it is installed.
Kernels are jitted, and triton imported, at their first launch (`lazy_jit`), so
TRITON_INTERPRET=1 set any time before that (and before anything else imports triton) runs
them on CPU tensors through Triton's interpreter (tests/kernels/conftest.py does).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys

import torch

# triton is imported at the first kernel launch, not here: importing it reads TRITON_INTERPRET
# (triton.language's own helpers are jitted at import), and test sessions set that variable
# after this package may have been imported by other tests. `tl` stays None until then.
HAS_TRITON = importlib.util.find_spec("triton") is not None
tl = None


def interpret_mode() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def can_run_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors: CUDA tensors, or CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpret_mode() and all(t.device.type == "cpu" for t in tensors)


def launch_device(t: torch.Tensor):
    """Context for a kernel launch on t's device: Triton launches on the *current* GPU and its current
    stream, and checks only that a pointer is a GPU address, not which GPU's. Without this, tensors
    on cuda:1 while cuda:0 is current (run.device=cuda:1 in one process) were read by a kernel on
    cuda:0's stream: an illegal access without peer access, unordered stale reads with it."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def refuse_double_backward(op: str) -> None:
    """Called at the top of a backward whose result is not itself differentiable (a gradient computed
    in the forward pass, a saved output marked non-differentiable): under create_graph=True autograd
    runs backward with grad mode on, and would build a silently wrong second-order graph. Also the
    LoRA op's fast paths' guard (ops/ may import kernels/, not the other way)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: double backward (torch.autograd.grad(..., create_graph=True) through this op) "
                           "is not supported by its fast path; for higher-order gradients run the plain-PyTorch "
                           "reference: segpcl_fast.ops.backend('reference') (run.ops=reference)")


def has_fp64(*tensors) -> bool:
    """Any float64 input: the Triton kernels compute in fp32 and do not take it (auto runs the reference)."""
    return any(t.dtype == torch.float64 for t in tensors)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the references compute in: fp32 for fp32 / bf16 / fp16 storage, fp64 when any input is
    fp64 (gradcheck)."""
    return torch.float64 if has_fp64(*tensors) else torch.float32


def _interpreter_came_too_late() -> bool:
    """TRITON_INTERPRET=1 is set, but triton.language was imported before it was (torch.compile and
    torch._dynamo import triton): its own helpers (tl.max, ...) were jitted for the GPU then, and the
    interpreter cannot call them."""
    language = sys.modules.get("triton.language")
    if language is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return not isinstance(language.standard.max, InterpretedFunction)


def check_can_run(op: str, *tensors: torch.Tensor) -> None:
    """Raise one clear error when a Triton launcher is called where it cannot run."""
    if not HAS_TRITON:
        raise RuntimeError(f"segpcl::{op}: triton is not installed; `pip install triton` or use the "
                           "reference backend (segpcl_fast.ops.set_backend('reference'))")
    if len({t.device for t in tensors}) > 1:
        devices = [str(t.device) for t in tensors]
        raise RuntimeError(f"segpcl::{op}: all tensors must be on one device, got {devices}; move them to one "
                           "device (.to(x.device))")
    if not can_run_triton(*tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f"segpcl::{op}: the Triton kernel needs CUDA tensors (or CPU tensors with "
                           f"TRITON_INTERPRET=1 set before triton is imported); got devices {devices}. "
                           "Use segpcl_fast.ops.<op> with backend 'auto' to fall back to the reference.")
    if has_fp64(*tensors):
        raise TypeError(f"segpcl::{op}: the Triton kernel computes in fp32 and takes fp32 / bf16 / fp16 "
                        "tensors, got float64; backend 'auto' or 'reference' runs float64 in float64")
    if interpret_mode() and not all(t.is_cuda for t in tensors) and _interpreter_came_too_late():
        raise RuntimeError(f"segpcl::{op}: TRITON_INTERPRET=1 was set after triton had been imported (torch.compile "
                           "and torch._dynamo import it), so the interpreter cannot run the kernel; set it before "
                           "anything imports torch, e.g. `TRITON_INTERPRET=1 python ...`")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def check_pow2_knobs(op: str, **knobs) -> None:
    """A launch knob (rows or warps per program, a chunk width) given as a power of two >= 1, or None for the
    launcher's default: anything else is one ValueError naming it (0 fell back to the default unsaid)."""
    for name, value in knobs.items():
        if value is not None and (value < 1 or value != next_pow2(value)):
            raise ValueError(f"{op}: {name} must be a power of two >= 1 (or None for the default), got {value}")


def check_tau(op: str, tau) -> None:
    """tau: one finite number > 0 (a Python number or a one-element tensor), else one ValueError naming the op."""
    ok = not isinstance(tau, (str, bytes, bool)) and not (isinstance(tau, torch.Tensor) and tau.numel() != 1)
    try:
        ok = ok and 0 < float(tau) < math.inf  # float("2") would pass: strings are refused above
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{op}: tau must be a finite number > 0 (a float), got {tau!r}")


def autocast_available(device_type: str) -> bool:
    """Whether torch has autocast for this device type (not for "meta": torch.autocast("meta") raises). Inside
    torch.compile, any device but meta: torch 2.11's dynamo cannot trace torch.amp.is_autocast_available (a
    graph break in every compiled LoRA layer), and compiled graphs run on real devices."""
    if device_type == "meta":
        return False
    available = getattr(torch.amp, "is_autocast_available", None)
    if torch.compiler.is_compiling() or available is None:
        return True
    return available(device_type)


def autocast_off(device_type: str):
    """A context with the caller's autocast off for this device type (nothing to turn off where torch has none)."""
    return torch.autocast(device_type, enabled=False) if autocast_available(device_type) else contextlib.nullcontext()


def tau_value(op: str, tau) -> float:
    """check_tau's tau as a Python float, as the ops take it (a constant: every path then computes in the
    inputs' dtype and gives the same shape; a float64 or (1,) tensor tau had made the reference's loss float64
    or (1,)). A one-element tensor is read once, in eager code; inside torch.compile it is one ValueError (its
    value is data-dependent in a graph: a guard error under dynamic shapes, a graph break otherwise)."""
    if isinstance(tau, torch.Tensor) and torch.compiler.is_compiling():
        raise ValueError(f"{op}: inside torch.compile tau must be a Python float, got a tensor (its value is "
                         f"data-dependent in a graph); pass float(tau) from outside the compiled code")
    check_tau(op, tau)
    return float(tau)


def prev_pow2(n: int) -> int:
    """Largest power of two <= n (n >= 1)."""
    return 1 << (max(1, int(n)).bit_length() - 1)


def common_divisor(limit: int, *values: int) -> int:
    """The largest power of two up to `limit` that divides every value (0 counts as divisible): the
    alignment a kernel may promise Triton (tl.multiple_of) for sizes and strides it cannot know."""
    d = limit
    while d > 1 and any(int(v) % d for v in values):
        d //= 2
    return d


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rows_per_program(n_rows: int, row_elems: int, gpu_tile_elems: int = 8192,
                     interpret_programs: int = 4, max_tile_elems: int = 1 << 16) -> int:
    """Rows each program handles (a power of two).

    On a GPU: enough rows for a tile of about `gpu_tile_elems` elements. Under the interpreter
    (~3 ms per program): few, large programs, so tests stay quick.
    """
    largest = prev_pow2(max(1, max_tile_elems // max(1, row_elems)))
    if interpret_mode():
        want = cdiv(max(1, n_rows), interpret_programs)
    else:
        want = max(1, gpu_tile_elems // max(1, row_elems))
    return min(next_pow2(want), largest)


class lazy_jit:
    """`triton.jit`, applied at the first launch instead of at import.

    At the first launch it imports triton, binds the real `triton.language` to the name `tl`
    in the kernel's module (where it is None until then) and jits the function; launch as usual:
    `kernel[grid](...)`. Deferring both lets TRITON_INTERPRET be set after this package was
    imported and still run the kernels in the interpreter. A @lazy_jit function can also be a
    helper that kernels of the same module call: at the first launch every @lazy_jit name of the
    module is bound to its jitted function.
    """

    def __init__(self, fn):
        self.fn = fn
        self._kernel = None

    @property
    def kernel(self):
        if self._kernel is None:
            if not HAS_TRITON:
                raise RuntimeError("triton is not installed; `pip install triton` or use the reference backend")
            import triton
            import triton.language

            module = self.fn.__globals__
            module["tl"] = triton.language
            self._kernel = triton.jit(self.fn)
            # a kernel may call other @lazy_jit functions of its module (helpers): Triton resolves
            # them by name and needs jitted functions there, so bind every one to its jitted form
            for name, value in list(module.items()):
                if isinstance(value, lazy_jit):
                    module[name] = value.kernel
        return self._kernel

    def __getitem__(self, grid):
        return self.kernel[grid]


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype a kernel should store `dtype` results in.

    On a GPU: `dtype` itself (Triton's fp32 -> bf16/fp16 cast rounds to nearest even). Triton's
    interpreter truncates in that cast instead, so under it kernels store fp32 and the launcher
    casts with torch (round to nearest even): the same values a GPU run stores.
    """
    if interpret_mode() and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def refuse_frozen_grads(op: str, needs_input_grad) -> None:
    """The op's backward gives grad_x and grad_B only: weight, bias and lora_A are frozen. A direct
    call (torch.ops.segpcl.*, skipping the Python wrapper's checks) with one of them requiring grad
    is refused here rather than leaving its .grad silently None."""
    frozen = [name for name, needs in zip(("weight", "bias", "lora_A"), needs_input_grad[1:4]) if needs]
    if frozen:
        raise RuntimeError(f"{op}: {', '.join(frozen)} require(s) grad, but the LoRA-B-only linear trains lora_B "
                           f"(and x) only; freeze them (requires_grad_(False)) or use a plain linear")
