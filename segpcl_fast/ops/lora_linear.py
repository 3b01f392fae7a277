"""LoRA-B-only linear: y = x W^T + b + s * (x A^T) B^T, with W, b, A frozen and only B trained.

`lora_b_linear` is the one function every LoRA layer calls. Four implementations, one result:

- "triton": `kernels/lora_fused.py`, the merged arrangement as two Triton GEMMs with u = x A^T and
  g^T u folded into their launches (opt-in: backend "triton");
- "cpp": the C++/CUDA op `torch.ops.segpcl.lora_b_linear_fwd` (csrc/, built as segpcl_fast._C),
  GEMM arrangement chosen by SEGPCL_LORA_FWD / SEGPCL_LORA_BWD (default merged);
- "merged": `lora_b_linear_merged`, the merged arrangement y = x (W + s B A)^T + b written in plain
  PyTorch (an autograd.Function of aten ops, which torch.compile traces);
- "reference": `lora_b_linear_reference`, the formula as written (the spec).

"triton", "cpp" and "merged" save u = x A^T (N x r) for backward instead of x (N x in) and return gradients
for x and B only: W, b and A are frozen, and every path refuses them requiring grad (one error,
not a silently missing gradient). `dispatch.last_choice()` says which ran.

Backends (dispatch.set_backend): "auto" and "triton" pick per call (`lora_b_linear_impl`; "triton"
takes the fused Triton GEMMs where they run); "cpp" requires the C++ op (error otherwise);
"reference" forces the formula.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from ._ext import extension_status, has_kernel
from ._kernels import _utils, load_kernel

load_kernel("lora_merge")  # registers segpcl::lora_merged_weight (SEGPCL_LORA_MERGE=triton)
_fused = load_kernel("lora_fused")  # registers segpcl::lora_fused_fwd / _bwd (backend "triton")

__all__ = ["lora_b_linear", "lora_b_linear_reference", "lora_b_linear_merged", "lora_b_linear_impl",
           "extension_status"]

OP = "lora_b_linear"
log = logging.getLogger("segpcl_fast.ops")
_said_no_cuda_kernel = False


def lora_b_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The formula, in plain PyTorch: F.linear(x, W, b) + scaling * (x @ A^T) @ B^T."""
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_A), lora_B)


class _MergedLoRABLinear(torch.autograd.Function):
    """The merged arrangement in plain PyTorch (the C++ op's default, csrc/lora_b_linear_aten.cpp):
    y = x (W + s B A)^T + b and grad_x = g (W + s B A) (exact rewrites of the formula), u = x A^T
    saved for grad_B = s g^T u. Made of aten ops only, so torch.compile traces it and inductor
    fuses around its GEMMs; the merged weight costs O(out in r), not O(N).

    Where x needs a gradient, the forward's W + s B A is kept for the backward (one out x in tensor
    per call of the layer until then) rather than formed again: on an H200 (BENCHMARKS.md, session
    35) the layer's fwd + bwd took 0.603 ms kept against 0.861 ms formed twice (25216 x 768 -> 3072,
    r 32, bf16).
    SEGPCL_LORA_MERGED_BACKWARD=recompute forms it again (less memory, for A/B timing).
    SEGPCL_LORA_MERGE=triton forms W + s B A with the Triton kernel (`merged_weight`);
    SEGPCL_LORA_OVERLAP=1 runs u = x A^T and g^T u on a second CUDA stream, beside the layer's two
    big GEMMs (`_side_stream`). Both are opt-in until a GPU has timed them."""

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, scaling, keep_merged):
        merged = merged_weight(weight, lora_A, lora_B, scaling)
        side = _side_stream(x)
        if side is None:
            return _linear_not_a_view(x, merged, bias), F.linear(x, lora_A), merged
        # u is allocated on the main stream (so its memory returns to the main stream's pool) and
        # written on the side one: memory-bound (reads x), beside the compute-bound y GEMM
        main = torch.cuda.current_stream(x.device)
        u = x.new_empty((*x.shape[:-1], lora_A.shape[0]))
        side.wait_stream(main)  # x, A and u's allocation are ready
        with torch.cuda.stream(side):
            torch.matmul(x, lora_A.t(), out=u)
        y = _linear_not_a_view(x, merged, bias)
        main.wait_stream(side)
        for t in (x, u):  # the allocator must not hand their memory out while side may still use it
            t.record_stream(side)
        return y, u, merged

    @staticmethod
    def setup_context(ctx, inputs, output):
        _x, weight, _bias, lora_A, lora_B, scaling, keep_merged = inputs
        ctx.scaling = scaling
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)  # no (N, r) zeros for u's gradient each step
        ctx.keep_merged = keep_merged and ctx.needs_input_grad[0]  # no grad_x (a tower's first layer): no use
        kept = output[2] if ctx.keep_merged else weight
        ctx.save_for_backward(output[1], kept, lora_A, lora_B)  # u = x A^T, not x

    @staticmethod
    def backward(ctx, grad_y, _grad_u, _grad_merged):
        if grad_y is None:  # y took no part in what was differentiated
            return None, None, None, None, None, None, None
        _utils.refuse_double_backward("lora_b_linear (merged)")  # u is saved without its graph
        u, kept, lora_A, lora_B = ctx.saved_tensors
        grad_x = grad_B = None
        side = _side_stream(grad_y) if ctx.needs_input_grad[0] and ctx.needs_input_grad[4] else None
        if side is not None:  # g^T u (memory-bound: reads g) beside grad_x = g W' (compute-bound)
            main = torch.cuda.current_stream(grad_y.device)
            g2 = grad_y.reshape(-1, grad_y.shape[-1])  # any copy (a stride-0 gradient) and grad_B: made on main
            grad_B = torch.empty_like(lora_B)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                _grad_B(g2, u, lora_B, ctx.scaling, out=grad_B)
        if ctx.needs_input_grad[0]:
            merged = kept if ctx.keep_merged else merged_weight(kept, lora_A, lora_B, ctx.scaling)
            grad_x = grad_y @ merged
        if side is not None:
            main.wait_stream(side)
            for t in (g2, u, grad_B):
                t.record_stream(side)
        elif ctx.needs_input_grad[4]:
            grad_B = _grad_B(grad_y, u, lora_B, ctx.scaling)
        return grad_x, None, None, None, grad_B, None, None


def _linear_not_a_view(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) as a tensor of its own, not a view: for a (..., in) input with a bias, F.linear
    returns a view of its 2-D addmm, and an output of an autograd.Function that is a view refuses an in-place
    update ("Output 0 of _MergedLoRABLinear is a view and is being modified inplace": timm's `qkv += bias`, in
    eager code and while dynamo traces). The same GEMM on the rows, then _unsafe_view, as the C++ op does
    (csrc/lora_b_linear_aten.cpp) and aten::matmul."""
    y = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))


def _grad_B(grad_y: torch.Tensor, u: torch.Tensor, lora_B: torch.Tensor, scaling: float,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s g^T u, s applied to the GEMM's accumulator (one rounding); beta=0: lora_B gives the shape only."""
    return torch.addmm(lora_B, grad_y.reshape(-1, grad_y.shape[-1]).t(), u.reshape(-1, u.shape[-1]),
                       beta=0, alpha=scaling, out=out)


MERGE_KERNELS = ("addmm", "triton")


def merge_kernel() -> str:
    """SEGPCL_LORA_MERGE: how the merged arrangement forms W + s B A: "addmm" (default, cuBLAS / the
    CPU's GEMM) or "triton" (kernels/lora_merge.py, where Triton runs: CUDA tensors, or the CPU
    under TRITON_INTERPRET=1; elsewhere addmm)."""
    return dispatch.env_choice("SEGPCL_LORA_MERGE", MERGE_KERNELS, "addmm")


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s B A in W's dtype (fp32 accumulation, one rounding), by SEGPCL_LORA_MERGE's kernel.

    While torch.compile traces (and SEGPCL_COMPILE_BATCH_MERGE is not 0): B A as a plain mm in fp32
    (or wider), then W + s (B A) rounded once, which inductor's batch_linear_post_grad pass
    (engine/compiling.py) batches across the tower's layers of one shape into one bmm. As addmm,
    each layer's merge was its own GEMM, and on CUDA also a copy of W into the output, and most a memset:
    72 GEMMs, 72 copies and 48 memsets a step in session 35's H200 trace (BENCHMARKS.md, session 43)."""
    if (merge_kernel() == "triton" and _utils.can_run_triton(weight, lora_A, lora_B)
            and not _utils.has_fp64(weight, lora_A, lora_B)):
        return torch.ops.segpcl.lora_merged_weight(weight, lora_A, lora_B, float(scaling))
    if torch.compiler.is_compiling() and batch_merge():
        wide = torch.promote_types(weight.dtype, torch.float32)
        return (weight.to(wide) + scaling * torch.mm(lora_B.to(wide), lora_A.to(wide))).to(weight.dtype)
    return torch.addmm(weight, lora_B, lora_A, alpha=scaling)


def batch_merge() -> bool:
    """SEGPCL_COMPILE_BATCH_MERGE: "1" (default) forms W + s B A inside compiled graphs as an mm that
    inductor batches across layers (merged_weight; engine/compiling.py turns the pass on); "0" keeps one
    addmm a layer (A/B timing). The one reader of the switch."""
    return dispatch.env_choice("SEGPCL_COMPILE_BATCH_MERGE", ("1", "0"), "1") == "1"


_SIDE_STREAMS: dict = {}


def overlap() -> bool:
    """SEGPCL_LORA_OVERLAP: "1" runs the merged arrangement's rank-r products (u = x A^T forward,
    g^T u backward) on a second CUDA stream, concurrently with the layer's big GEMMs; "0" (default)
    keeps one stream. Eager CUDA only (not while torch.compile traces, not during a CUDA-graph
    capture)."""
    value = os.environ.get("SEGPCL_LORA_OVERLAP") or "0"
    if value not in ("0", "1"):
        raise ValueError(f"SEGPCL_LORA_OVERLAP='{value}' must be 0 or 1")
    return value == "1"


def _side_stream(t: torch.Tensor):
    """The second stream of t's device when SEGPCL_LORA_OVERLAP=1 applies to this call, else None."""
    if not overlap() or not t.is_cuda or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return None
    if t.device not in _SIDE_STREAMS:
        _SIDE_STREAMS[t.device] = torch.cuda.Stream(device=t.device)
    return _SIDE_STREAMS[t.device]


MERGED_BACKWARDS = ("keep", "recompute")


def merged_backward() -> str:
    """SEGPCL_LORA_MERGED_BACKWARD: "keep" (default) saves the forward's W + s B A for grad_x,
    "recompute" forms it again in the backward."""
    return dispatch.env_choice("SEGPCL_LORA_MERGED_BACKWARD", MERGED_BACKWARDS, "keep")


def lora_b_linear_merged(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The merged arrangement in plain PyTorch: y = x (W + s B A)^T + b, saving u = x A^T (not x)
    and the merged weight (SEGPCL_LORA_MERGED_BACKWARD, `_MergedLoRABLinear`).

    When B needs no gradient (evaluation, prototypes, the frozen teacher in DPGD), u is never
    needed: y is one F.linear with the merged weight, and autograd (grad_x = g (W + s B A) for
    DPGD) saves no activation at all; where x needs a gradient it keeps that merged (out x in)
    weight until backward instead, one per layer. W, b and A are frozen: every path refuses
    them requiring a gradient (`_check_args`)."""
    x, weight, bias, lora_A, lora_B = _autocast([x, weight, bias, lora_A, lora_B])  # then autocast is a no-op
    _check_args(x, weight, bias, lora_A, lora_B)
    return _merged_checked(x, weight, bias, lora_A, lora_B, scaling)


def _merged_checked(x, weight, bias, lora_A, lora_B, scaling):
    """lora_b_linear_merged on arguments already cast and checked."""
    if not _needs_grad_B(lora_B):
        return F.linear(x, merged_weight(weight, lora_A, lora_B, scaling), bias)
    y, _u, _merged = _MergedLoRABLinear.apply(x, weight, bias, lora_A, lora_B, float(scaling),
                                              merged_backward() == "keep")
    return y


def _check_args(x, weight, bias, lora_A, lora_B, autocast_dtype: Optional[torch.dtype] = None) -> None:
    """The C++ op's argument checks (csrc/lora_b_linear.h), with its messages. Plain ifs: under
    torch.compile they become guards, not graph breaks. autocast_dtype: the dtype autocast will cast
    every tensor to (the reference's F.linear does), so their own dtypes need not agree."""
    if x.dim() < 1 or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise RuntimeError(f"lora_b_linear: x must be (..., in), weight (out, in), lora_A (r, in), lora_B (out, r); "
                           f"got {tuple(x.shape)}, {tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    out, n_in, r = weight.shape[0], weight.shape[1], lora_A.shape[0]
    problem = None
    if r < 1:
        problem = f"lora_A has rank 0 (shape {tuple(lora_A.shape)}); the rank must be >= 1"
    elif n_in < 1 or out < 1:
        problem = f"weight has shape {tuple(weight.shape)}; a layer needs at least one input and one output feature"
    elif x.shape[-1] != n_in:
        problem = f"x's last dimension ({x.shape[-1]}) must equal weight's in-features ({n_in})"
    elif lora_A.shape[1] != n_in:
        problem = f"lora_A must be (r, in) = (r, {n_in}), got {tuple(lora_A.shape)}"
    elif lora_B.shape[0] != out or lora_B.shape[1] != r:
        problem = f"lora_B must be (out, r) = ({out}, {r}), got {tuple(lora_B.shape)}"
    elif bias is not None and (bias.dim() != 1 or bias.shape[0] != out):
        problem = f"bias must be 1-D (out,) = ({out},), got {tuple(bias.shape)}"
    elif not x.is_floating_point():
        problem = f"x must be a floating tensor, got {x.dtype}"
    else:
        for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
            if t is not None and ((autocast_dtype is None and t.dtype != x.dtype) or t.device != x.device):
                problem = (f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}; all tensors must share "
                           "x's dtype and device (cast the weights, or run under autocast)")
                break
    if problem is None and torch.is_grad_enabled():
        trained = [name for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A))
                   if t is not None and t.requires_grad]
        if trained:
            problem = (f"{', '.join(trained)} {'requires' if len(trained) == 1 else 'require'} grad, but this op trains lora_B only and returns no gradient "
                       "for weight, bias or lora_A; freeze them (.requires_grad_(False)) or use your own layer")
    if problem is not None:
        raise RuntimeError(f"lora_b_linear: {problem}")


def _needs_grad_B(lora_B: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and lora_B.requires_grad


def lora_b_linear_impl(x: torch.Tensor, lora_B: Optional[torch.Tensor] = None,
                       compiling: Optional[bool] = None) -> str:
    """Which implementation `lora_b_linear` runs for this input: "triton", "cpp", "merged" or "reference".
    `compiling` (default: whether torch.compile is tracing now) asks for the traced choice.

    "auto" takes the C++ op in eager mode where it has a kernel for x's device, and the plain-PyTorch
    merged arrangement under torch.compile (inductor traces it and fuses the bias and its neighbours
    into the GEMMs; the C++ op is opaque to it), where the C++ op cannot run, and where B needs no
    gradient (then merged is one GEMM and computes no u; the C++ op always does).
    "triton" takes the fused Triton GEMMs (kernels/lora_fused.py: u and g^T u folded into the two
    GEMMs' launches) where they run (bf16 / fp16 on CUDA, after autocast, in and out multiples of 16;
    the CPU under TRITON_INTERPRET=1; r <= 128) and B needs a gradient, eager or compiled; elsewhere what "auto"
    takes.
    Opt-in until a GPU has timed it against the others.
    Under a torch.func transform (grad, vmap, jvp, ...): the reference, the one path those transforms take;
    "cpp" or "triton" forced there is one error. Under torch.jit.trace, "auto" takes the reference too: the
    choice above depends on the grad mode, which jit.trace's own check changes (it traces again under no_grad and
    refused "Graphs differed across invocations"), and a trace of the C++ op needs segpcl_fast._C to load.
    """
    name = dispatch.get_backend()
    if name == "reference":
        return "reference"
    if dispatch.reference_under_transform(OP, forced=name in ("cpp", "triton")):  # torch.func, jit.trace
        return "reference"
    if name == "triton" and (lora_B is None or _needs_grad_B(lora_B)) and _fused_runs(x, lora_B):
        return "triton"
    if name == "cpp":
        if has_kernel(x.device.type):
            return "cpp"
        status = extension_status()
        why = status["error"] or f"built without a kernel for device '{x.device.type}' (cuda={status['cuda']})"
        raise RuntimeError(
            f"ops backend 'cpp' forced but segpcl_fast._C cannot run lora_b_linear: {why}. Build it with "
            "`pip install --no-build-isolation .` (SEGPCL_WITH_CUDA=1 for the CUDA kernels) or use "
            "set_backend('auto').")
    if lora_B is not None and not _needs_grad_B(lora_B):
        return "merged"
    compiled = torch.compiler.is_compiling() if compiling is None else compiling
    if not has_kernel(x.device.type):
        if x.device.type == "cuda" and not compiled:
            _say_no_cuda_kernel()
        return "merged"
    return compiled_impl() if compiled else "cpp"


def _say_no_cuda_kernel() -> None:
    """Once per process: eager training on CUDA runs without the C++ op it would take. A plain `pip install .`
    (an isolated build, whose torch is not the user's) builds no extension and says so only under -v."""
    global _said_no_cuda_kernel
    if _said_no_cuda_kernel:
        return
    _said_no_cuda_kernel = True
    status = extension_status()
    why = status["error"] or "it was built without CUDA kernels"
    log.warning("segpcl_fast._C has no CUDA kernel for lora_b_linear (%s): the LoRA layers run the plain-PyTorch "
                "merged arrangement. Build it with `pip install --no-build-isolation .` (CUDA_HOME set, "
                "SEGPCL_WITH_CUDA=1 to require the CUDA kernels); `segpcl-fast env` shows the extension's state",
                why)


def _fused_runs(x: torch.Tensor, lora_B: Optional[torch.Tensor]) -> bool:
    """Whether the fused Triton LoRA kernels take x (its dtype after autocast, which leaves float64
    as it is), this rank and these widths (fused_supported)."""
    two_d = lora_B is not None and lora_B.dim() == 2
    rank = lora_B.shape[-1] if two_d else 1
    weight_shape = (lora_B.shape[0], x.shape[-1]) if two_d and x.dim() else (0, 0)  # W is (out, in)
    dtype = _autocast_dtype(x.device.type) if x.dtype in _AUTOCAST_FROM else None
    return _utils.HAS_TRITON and _fused.fused_supported(x.device, dtype or x.dtype, rank, weight_shape)


# the C++ op's GEMM arrangements (csrc/lora_b_linear_aten.cpp reads these variables per call, default first)
CPP_PATHS = {"SEGPCL_LORA_FWD": ("merged", "concat", "addmm"), "SEGPCL_LORA_BWD": ("merged", "split", "fused")}


def switches() -> dict:
    """Every LoRA A/B switch's value now ({variable: value}, defaults where unset). Each is otherwise
    read only where its path runs (SEGPCL_LORA_MERGE=bogus surfaced at the first frozen-B call, in
    evaluation): a run reads them all up front, so a bad value is one ValueError before it starts."""
    return {"SEGPCL_LORA_MERGE": merge_kernel(), "SEGPCL_LORA_OVERLAP": "1" if overlap() else "0",
            "SEGPCL_LORA_MERGED_BACKWARD": merged_backward(), "SEGPCL_LORA_COMPILE": compiled_impl(), **cpp_paths()}


def cpp_paths() -> dict:
    """{SEGPCL_LORA_FWD: ..., SEGPCL_LORA_BWD: ...}: the C++ op's GEMM arrangements now; a value it
    would refuse at its first call is one ValueError."""
    values = {}
    for name, allowed in CPP_PATHS.items():
        value = os.environ.get(name) or allowed[0]
        if value not in allowed:
            raise ValueError(f"{name}='{value}' is not a {'forward' if 'FWD' in name else 'backward'} path of the "
                             f"C++ op; use {', '.join(allowed)} (default {allowed[0]}), or unset it")
        values[name] = value
    return values


def compiled_impl() -> str:
    """What "auto" runs under torch.compile where the C++ op could run: SEGPCL_LORA_COMPILE=merged
    (default: plain PyTorch, traced by inductor) or cpp (the opaque custom op, for comparison)."""
    return dispatch.env_choice("SEGPCL_LORA_COMPILE", ("merged", "cpp"), "merged")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts F.linear's inputs to on this device; None when autocast is off, or where torch
    has no autocast ("meta": shape inference and deferred initialisation run the layers there)."""
    if not _utils.autocast_available(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts; float64 it leaves alone


def _autocast(tensors):
    """Cast like F.linear does under autocast (fp32/fp16/bf16 tensors to the autocast dtype, float64
    untouched): the C++ op has no autocast kernel of its own."""
    dtype = _autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return [t.to(dtype) if t is not None and t.dtype in _AUTOCAST_FROM else t for t in tensors]


def lora_b_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y = x W^T + b + scaling * (x A^T) B^T for x of shape (..., in); grads flow to x and lora_B.

    Every path checks its arguments the same way first (`_check_args`: shapes, floating dtypes shared
    with x after autocast, one device, and weight / bias / lora_A not requiring grad)."""
    dispatch.refuse_trained_constants(OP, scaling=scaling)
    impl = lora_b_linear_impl(x, lora_B)
    if impl == "reference":  # checked without the autocast copies (F.linear makes its own)
        _check_args(x, weight, bias, lora_A, lora_B, _autocast_dtype(x.device.type))
    else:
        x, weight, bias, lora_A, lora_B = _autocast([x, weight, bias, lora_A, lora_B])
        _check_args(x, weight, bias, lora_A, lora_B)
    if not torch.compiler.is_compiling():  # recorded once the arguments passed: what ran
        dispatch.record_choice(OP, impl, x.device.type)
    if impl == "reference":
        return lora_b_linear_reference(x, weight, bias, lora_A, lora_B, scaling)
    if impl == "merged":
        return _merged_checked(x, weight, bias, lora_A, lora_B, scaling)
    if impl == "triton":
        return _fused.lora_b_linear_fused(x, weight, bias, lora_A, lora_B, scaling)
    y, _u = torch.ops.segpcl.lora_b_linear_fwd(x, weight, bias, lora_A, lora_B, float(scaling))
    return y
