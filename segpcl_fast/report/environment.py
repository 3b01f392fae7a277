"""`segpcl-fast env`: what this machine has, and which implementation each fused op takes on it.

Like `python -m torch.utils.collect_env` or `python -m xformers.info`, narrowed to what decides
segpcl_fast's paths; paste its output into a bug report. The per-device answers come from the
dispatch's own predicates (`ops._kernels.impl_for`, `ops.lora_linear.lora_b_linear_impl`,
`ops.mha._use_xformers`), so they are what a call would run, not a second copy of the rules.
Nothing here imports open_clip or launches a kernel (on CUDA, xformers' one-off probe aside).
"""
from __future__ import annotations

import importlib
import os
import platform
from typing import Optional

import torch

from ..model.tf32 import cuda_matmul_tf32
from .results import _dist_version, collect_versions

# environment variables that change what runs (ours, Triton's, CUDA's, the DDP presets')
ENV_PREFIXES = ("SEGPCL_", "TRITON_", "NCCL_", "TORCHINDUCTOR_")
ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "OMP_NUM_THREADS", "TORCH_LOGS")
TRITON_OPS = ("pgd_step", "anchor_kl", "knn_subgraph_kl")


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _triton() -> dict:
    from ..ops._kernels import _utils
    info = {"installed": _utils.HAS_TRITON, "version": _dist_version("triton"),
            "interpreter": _utils.interpret_mode(), "import_error": None}
    if _utils.HAS_TRITON:
        try:
            importlib.import_module("triton")
        except Exception as exc:  # installed but broken (e.g. built for another torch)
            info["import_error"] = f"{type(exc).__name__}: {exc}"
    return info


def _extension() -> dict:
    from ..ops import _ext
    status = dict(_ext.extension_status())
    status["path"] = getattr(_ext._C, "__file__", None)
    return status


def _cuda_devices() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    from ..model.clip import NATIVE_BF16_MAJOR
    rows = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        rows.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1),
                     "multiprocessors": props.multi_processor_count,
                     "bf16": props.major >= NATIVE_BF16_MAJOR})  # else run.precision=fp16
    return rows


def _impl_or_error(choose) -> str:
    """choose() -> the implementation name, or "error: ..." where the forced backend cannot run."""
    try:
        return choose()
    except RuntimeError as exc:
        return f"error: {exc}"


def _gpu_train_dtype(device: str) -> torch.dtype:
    """What a GPU trains in (the presets' and dataset configs' run.precision): bf16, or fp16 on one without native
    bf16 (compute capability < 8: run.precision=fp16 there, precision_warning)."""
    from ..model.clip import native_bf16
    return torch.bfloat16 if native_bf16(device) else torch.float16


def _lora_impls(device: str) -> dict:
    from ..ops.lora_linear import lora_b_linear_impl
    # the fused Triton path takes bf16 / fp16 only: asked in what the GPU trains in
    dtype = _gpu_train_dtype(device) if torch.device(device).type == "cuda" else torch.float32
    x = torch.empty(0, device=device, dtype=dtype)
    trained_B = torch.empty(0, device=device, dtype=dtype, requires_grad=True)
    with torch.enable_grad():
        return {"training": _impl_or_error(lambda: lora_b_linear_impl(x, trained_B, compiling=False)),
                "frozen_B": _impl_or_error(lambda: lora_b_linear_impl(x, trained_B.detach(), compiling=False)),
                "compiled": _impl_or_error(lambda: lora_b_linear_impl(x, trained_B, compiling=True))}


def _attention_impl(device: str) -> str:
    from ..ops.mha import _use_xformers
    dtype = _gpu_train_dtype(device) if torch.device(device).type == "cuda" else torch.bfloat16
    q = torch.empty(1, 1, 1, 64, device=device, dtype=dtype)  # ViT-B head size, in what the GPU trains in
    return "xformers" if _use_xformers(q, None) else "sdpa"


def lora_arrangement() -> str:
    """'fwd merged, bwd merged' (what the C++ op computes), or 'error: ...' for a value it would refuse
    at its first call."""
    from ..ops.lora_linear import cpp_paths
    try:
        values = cpp_paths()
    except ValueError as e:
        return f"error: {e}"
    return f"fwd {values['SEGPCL_LORA_FWD']}, bwd {values['SEGPCL_LORA_BWD']}"


def lora_switches():
    """Every LoRA A/B switch's value ({variable: value}), or 'error: ...' for the first bad one."""
    from ..ops.lora_linear import switches
    try:
        return switches()
    except ValueError as e:
        return f"error: {e}"


def op_reasons(device: str, paths: dict) -> dict:
    """{op: why `paths[op]` runs on `device`}: the dispatch's conditions, read off the same state."""
    from ..ops import _ext, dispatch
    from ..ops._kernels import _utils
    from ..ops.lora_linear import compiled_impl
    backend = dispatch.get_backend()
    if backend == "reference":
        forced = "ops backend 'reference' (run.ops / SEGPCL_OPS): every op runs its plain-PyTorch reference"
        return {op: forced for op in paths}
    why = {}
    for op in TRITON_OPS:
        if backend == "cpp":
            why[op] = "ops backend 'cpp' forces the C++ LoRA op only: the Triton ops run their references"
        elif paths.get(op) == "triton":
            why[op] = ("ops backend 'triton' forces the kernels" if backend == "triton" else
                       "auto: the Triton kernel, on CUDA tensors")
        elif backend == "triton":  # forced where the kernels cannot run: the table's row is that error
            why[op] = ("ops backend 'triton' (run.ops / SEGPCL_OPS) forces the kernels, which cannot run on "
                       f"{device} tensors here (the error above); run.ops=auto runs the reference")
        elif not _utils.HAS_TRITON:
            why[op] = "auto: triton is not installed"
        elif device != "cuda":
            why[op] = "auto: the Triton kernels take CUDA tensors (the tests run them on CPU: TRITON_INTERPRET=1, run.ops=triton)"
        else:
            why[op] = "auto: the reference (fp64 tensors, or the kernel cannot run here)"
    status = _ext.extension_status()
    no_kernel = (f"segpcl_fast._C is not built ({status['error']})" if not status["built"] else
                 f"segpcl_fast._C has no {device} kernel (built without CUDA)")
    eager = ("the C++ op (segpcl::lora_b_linear), eager" if _ext.has_kernel(device) else
             f"{no_kernel}: the plain-PyTorch merged arrangement")
    if backend == "cpp":  # every LoRA call takes the C++ op, or fails (the table's error rows say why)
        forced = "ops backend 'cpp' (run.ops / SEGPCL_OPS) forces the C++ op"
        why.update({op: forced for op in ("lora_b_linear", "lora_b_linear (B frozen)", "lora_b_linear (compiled)")})
        return _attention_reasons(why, paths)
    why["lora_b_linear"] = eager
    why["lora_b_linear (B frozen)"] = ("B needs no gradient: W + s B A as one GEMM, no u" if _ext.has_kernel(device)
                                       else eager)
    try:
        traced = compiled_impl()
    except ValueError as exc:
        traced = f"error ({exc})"
    why["lora_b_linear (compiled)"] = (
        "under torch.compile inductor traces the plain-PyTorch merged arrangement and fuses its neighbours "
        "(SEGPCL_LORA_COMPILE=cpp keeps the C++ op)" if traced == "merged" and _ext.has_kernel(device) else
        f"under torch.compile: SEGPCL_LORA_COMPILE={traced}" if _ext.has_kernel(device) else eager)
    for op in ("lora_b_linear", "lora_b_linear (compiled)"):  # backend 'triton' where the fused GEMMs take the call
        if paths.get(op) == "triton":
            why[op] = ("ops backend 'triton': the fused Triton GEMMs (kernels/lora_fused.py; B trained, bf16 / fp16 "
                       "on CUDA, the CPU under TRITON_INTERPRET=1), eager and compiled")
    return _attention_reasons(why, paths)


def _attention_reasons(why: dict, paths: dict) -> dict:
    why["attention (no mask)"] = ("xformers memory-efficient attention (installed, and its kernels run here)"
                                  if paths.get("attention (no mask)") == "xformers" else
                                  "SDPA: xformers is not installed, has no kernels for this device, or the "
                                  "backend is 'reference'")
    why["attention (masked)"] = "SDPA (the text tower's causal mask: xformers is not used with a mask)"
    return {op: why[op] for op in paths if op in why}


def op_paths(device: str) -> dict:
    """{op: implementation} that a call on `device` tensors takes under the current ops backend."""
    from ..ops._kernels import impl_for
    probe = torch.empty(0, device=device)
    paths = {op: _impl_or_error(lambda: impl_for(op, probe)) for op in TRITON_OPS}
    lora = _lora_impls(device)
    paths["lora_b_linear"] = lora["training"]
    paths["lora_b_linear (B frozen)"] = lora["frozen_B"]
    paths["lora_b_linear (compiled)"] = lora["compiled"]
    paths["attention (no mask)"] = _attention_impl(device)
    paths["attention (masked)"] = "sdpa"
    return paths


def _optional_packages() -> dict:
    from ..engine import accel
    found = accel.available()
    found["scikit_learn"] = _dist_version("scikit-learn")
    found["tensorboard"] = _dist_version("tensorboard")  # run.tensorboard
    return found


def _environment_variables() -> dict:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def environment() -> dict:
    """The whole report as a JSON-ready dict (`segpcl-fast env --json`)."""
    from ..ops import dispatch
    versions = collect_versions()
    versions["peft"] = _dist_version("peft")
    paths = {device: op_paths(device) for device in _devices()}
    return {
        "versions": versions,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": {"available": torch.cuda.is_available(), "torch_built_with": torch.version.cuda,
                 "torch_arch_list": torch.cuda.get_arch_list() if torch.cuda.is_available() else [],
                 "devices": _cuda_devices(),
                 # this process's switch now; a run with run.tf32 turns it on for the run
                 "matmul_tf32": cuda_matmul_tf32()},
        "triton": _triton(),
        "extension": _extension(),
        "optional": _optional_packages(),
        "ops_backend": dispatch.get_backend(),
        "op_paths": paths,
        "op_reasons": {device: op_reasons(device, paths[device]) for device in paths},
        "lora_arrangement": lora_arrangement(),
        "lora_switches": lora_switches(),
        "environment_variables": _environment_variables(),
    }


def _yes(flag: Optional[bool]) -> str:
    return "yes" if flag else "no"


def format_environment(env: dict) -> str:
    """The report as the text `segpcl-fast env` prints."""
    v, cuda, triton, ext = env["versions"], env["cuda"], env["triton"], env["extension"]
    lines = [f"segpcl_fast {v['segpcl_fast']}   python {v['python']}   {env['platform']}",
             "   ".join(f"{k} {v.get(k) or '-'}" for k in ("torch", "torchvision", "open_clip", "numpy", "peft"))]
    if cuda["available"]:
        for d in cuda["devices"]:
            lines.append(f"cuda:{d['index']} {d['name']} (sm_{d['capability'].replace('.', '')}, "
                         f"{d['memory_gib']} GiB, {d['multiprocessors']} SMs"
                         f"{'' if d.get('bf16', True) else '; no bf16: run.precision=fp16 or fp32'})")
        lines.append(f"torch CUDA {cuda['torch_built_with']}, kernels for {' '.join(cuda['torch_arch_list'])}")
        if "matmul_tf32" in cuda:
            lines.append(f"fp32 matmuls: TF32 {'on' if cuda['matmul_tf32'] else 'off'} in this process "
                         "(run.tf32=true turns it on for a run; the GPU presets set it)")
    else:
        lines.append(f"no CUDA device (torch built with CUDA {cuda['torch_built_with'] or '-'}); "
                     f"cpu: {env['cpu_threads']} threads")
    if not triton["installed"]:
        lines.append("triton: not installed (the fused kernels' references run)")
    else:
        state = f"import fails: {triton['import_error']}" if triton["import_error"] else (
            "interpreter on (TRITON_INTERPRET): the kernels run on CPU tensors under run.ops=triton"
            if triton["interpreter"] else "imports; the kernels run on CUDA tensors")
        lines.append(f"triton {triton['version']}: {state}")
    if ext["built"]:
        lines.append(f"extension segpcl_fast._C: CPU kernels, {'with' if ext['cuda'] else 'no'} CUDA kernels "
                     f"({ext['path']})")
    else:
        lines.append(f"extension segpcl_fast._C: not built ({ext['error']}); LoRA runs in plain PyTorch")
    opt = env["optional"]
    lines.append(f"apex FusedSGD: {_yes(opt['apex_fused_sgd'])}   xformers: {_yes(opt['xformers'])}   "
                 f"scikit-learn: {opt['scikit_learn'] or 'no'}   tensorboard: {opt['tensorboard'] or 'no'}")
    devices = list(env["op_paths"])
    lines.append(f"\nop paths under ops backend '{env['ops_backend']}' (run.ops / SEGPCL_OPS):")
    width = max(len(op) for op in env["op_paths"][devices[0]])
    errors, rows = [], []
    for op in env["op_paths"][devices[0]]:
        cells = []
        for d in devices:
            impl = env["op_paths"][d][op]
            if impl.startswith("error: "):
                errors.append(f"  {op} on {d}: {impl[len('error: '):]}")
                impl = "error (below)"
            cells.append(impl)
        rows.append((op, cells))
    col = max([12] + [len(cell) + 2 for _, cells in rows for cell in cells])  # the cells as printed
    lines.append(("  " + "op".ljust(width) + "  " + "".join(d.ljust(col) for d in devices)).rstrip())
    for op, cells in rows:
        lines.append("  " + op.ljust(width) + "  " + "".join(c.ljust(col) for c in cells).rstrip())
    lines += errors
    if env.get("lora_arrangement"):
        lines.append(f"  C++ LoRA op's GEMMs (SEGPCL_LORA_FWD / _BWD): {env['lora_arrangement']}")
    switches = env.get("lora_switches")
    if switches:
        from ..ops.lora_linear import CPP_PATHS  # shown on the line above
        shown = switches if isinstance(switches, str) else ", ".join(
            f"{k.removeprefix('SEGPCL_LORA_')}={v}" for k, v in switches.items() if k not in CPP_PATHS)
        lines.append(f"  LoRA switches (SEGPCL_LORA_*): {shown}")
    for d, reasons in env.get("op_reasons", {}).items():  # why: each distinct reason once, with its ops
        grouped: dict[str, list[str]] = {}
        for op, reason in reasons.items():
            grouped.setdefault(reason, []).append(op)
        lines.append(f"why, on {d}:")
        lines += [f"  {', '.join(ops)}: {reason}" for reason, ops in grouped.items()]
    lines += _hints(env)
    variables = env["environment_variables"]
    lines.append("\nenvironment: " + (" ".join(f"{k}={val}" for k, val in variables.items()) or "(none of ours set)"))
    return "\n".join(lines)


def _hints(env: dict) -> list[str]:
    """What to install or rebuild when a GPU is here but a fast path is not."""
    if not env["cuda"]["available"]:
        return []
    hints = []
    if not env["triton"]["installed"] or env["triton"]["import_error"]:
        hints.append("the Triton kernels need an importable triton matching this torch (`pip install triton`)")
    if not env["extension"]["cuda"]:
        hints.append("the C++ LoRA op has no CUDA kernels: rebuild with `SEGPCL_WITH_CUDA=1 pip install "
                     "--no-build-isolation .` (needs nvcc; CUDA_HOME)")
    return ["\nhint: " + h for h in hints]
