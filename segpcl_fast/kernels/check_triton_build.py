"""Compile every Triton kernel as its launcher calls it, for sm_89 and sm_90, without a GPU.

    python -m segpcl_fast.kernels.check_triton_build [--archs 89,90] [--json report.json]

The Triton counterpart of csrc/check_cuda_build.py: a GPU session is rare, so a kernel that does
not compile, or compiles to something a launch would refuse, should fail on the CPU machines.
Each case runs an op's real launcher (`pgd_step_triton`, `anchor_kl_triton`,
`knn_kl_forward_triton`, `knn_kl_backward_triton`) on meta tensors at the paper's and the
benchmarks' sizes. Every kernel launch is caught and, instead of running, compiled for each
target with Triton's own argument binder, so the specialisation (constexprs, 16-byte alignment,
integer widths, num_warps) is the one a launch on that GPU compiles. Each compiled kernel is then
read back: registers, local memory (spills) and stack from the cubin (Triton's cuobjdump), shared
memory from Triton's metadata, and checked against what would make its launch fail there:

- shared memory over the per-block opt-in limit of the arch (227 KiB sm_90, 99 KiB sm_89);
- registers x threads over the 64 Ki register file;
- a grid over CUDA's limits (2^31 - 1 programs on axis 0, 65535 on axes 1 and 2).

Local memory ("spill B") and the stack frame ("stack B", where ptxas puts spilled registers; cuobjdump
counts them there, not as LOCAL) are reported, with a WARN line per kernel with a stack frame, not
failed (a spill is slow, not wrong). Exit status 0 only when every
kernel compiles and fits on every arch. Archs with a row of limits: sm_80, sm_86, sm_89, sm_90;
any other is refused, not guessed. Binding goes through Triton's internal
`create_function_from_signature` and `JITFunction._pack_args` (Triton 3.x, checked on 3.8;
`binder_available()` says when they differ). Meta tensors keep their storage offsets, so a view's
alignment specialises as on a GPU. The command line compiles, never interprets: it sets
TRITON_INTERPRET=0 for its own process; `check()` refuses while TRITON_INTERPRET=1 is set (triton
interprets once imported so): run it in a fresh process.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from . import _triton_utils


@dataclass(frozen=True)
class SM:
    """Per-arch limits (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability")."""
    shared_per_block: int  # the opt-in maximum a launch may ask for
    shared_per_sm: int
    warps_per_sm: int
    blocks_per_sm: int


SMS = {80: SM(163 * 1024, 164 * 1024, 64, 32), 86: SM(99 * 1024, 100 * 1024, 48, 16),
       89: SM(99 * 1024, 100 * 1024, 48, 24), 90: SM(227 * 1024, 228 * 1024, 64, 32)}
REGISTER_FILE = 64 * 1024  # per SM, and the most one block may use
REG_ALLOC_UNIT = 256  # registers are given to a warp in units of 256
SUB_PARTITIONS = 4  # an SM's register file is split between 4 sub-partitions (warp schedulers)
SHARED_RESERVED_PER_BLOCK = 1024  # the system's share of each block's shared memory (sm_80 and later)
SHARED_ALLOC_UNIT = 128
MAX_GRID = (2**31 - 1, 65535, 65535)
DEFAULT_ARCHS = (89, 90)  # RTX 4090 (the 2x4090 preset), H100 / H200


@dataclass
class Compiled:
    """One kernel specialisation compiled for one arch, and what it uses."""
    case: str
    kernel: str
    arch: int
    grid: tuple
    constexprs: dict
    pointers: str = ""  # element types of the pointer arguments, in order
    num_warps: int = 0
    registers: int = 0
    spill_bytes: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    occupancy: float = 0.0  # resident warps per SM / the arch's most, from registers, shared memory, blocks
    instructions: int = 0  # SASS instructions in the cubin (static: a loop body counts once)
    loop_instructions: int = 0  # SASS instructions of its longest loop body (0: no loop)
    seconds: float = 0.0
    problems: list = field(default_factory=list)


@dataclass
class Case:
    """A label and a thunk that calls one launcher on meta tensors."""
    name: str
    run: Callable[[], object]


# ---------------------------------------------------------------- compiling instead of launching

def _targets(archs: Iterable[int]):
    from triton.backends.compiler import GPUTarget
    return [GPUTarget("cuda", int(a), 32) for a in archs]


def _cuobjdump() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise FileNotFoundError(f"Triton's bundled cuobjdump is missing at {path}; reinstall triton")
    return str(path)


def _cuobjdump_cubin(cubin: bytes, *flags: str) -> str:
    """Triton's cuobjdump with `flags` on a cubin (written to a temporary file), its stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([_cuobjdump(), *flags, str(path)], check=True, capture_output=True, text=True).stdout


def resource_usage(cubin: bytes, kernel: str) -> dict[str, int]:
    """REG / STACK / LOCAL of `kernel` in a cubin, read with `cuobjdump -res-usage`."""
    out = _cuobjdump_cubin(cubin, "-res-usage")
    match = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", out)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage listed no function {kernel}:\n{out}")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", match.group(1))}


def sass_listing(cubin: bytes, kernel: str) -> str:
    """`cuobjdump -sass` of `kernel`. Its static instruction count (count_sass) is, for a kernel without
    loops, instructions per thread per launch: a proxy for its arithmetic cost that needs no GPU
    (anchor_kl's one-tile kernel: BENCHMARKS.md, session 35); for a loop, longest_loop_sass gives the
    instructions of one iteration."""
    return _cuobjdump_cubin(cubin, "-sass", "-fun", kernel)


def count_sass(listing: str) -> int:
    """Instructions in a `cuobjdump -sass` listing: lines `/*ADDR*/  [@P0] OPCODE ...` (the address
    in hex, 4 digits, then 5 from 0x10000), less the trailing self-branch and NOP padding."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", listing)
    while ops and ops[-1] in ("NOP", "BRA"):
        ops.pop()
    return len(ops)


def longest_loop_sass(listing: str) -> int:
    """Instructions in the longest loop body of a `cuobjdump -sass` listing: from a backward branch's
    target to the branch itself, both counted (0 when nothing branches backward)."""
    lines = [(int(addr, 16), text) for addr, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", listing)]
    index = {addr: i for i, (addr, _) in enumerate(lines)}
    bodies = [i - index[target] + 1 for i, (addr, text) in enumerate(lines)
              for m in [re.search(r"\bBRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)] if m
              for target in [int(m.group(1), 16)] if target < addr and target in index]
    return max(bodies, default=0)


def launch_problems(arch: int, grid: tuple, num_warps: int, registers: int, shared: int) -> list[str]:
    """What makes a launch of this compiled kernel fail on `arch` (empty when it fits)."""
    sm = sm_limits(arch)
    problems = []
    if shared > sm.shared_per_block:
        problems.append(f"shared memory {shared} B > {sm.shared_per_block} B per block on sm_{arch}")
    threads = num_warps * 32
    if registers * threads > REGISTER_FILE:
        problems.append(f"{registers} registers x {threads} threads > {REGISTER_FILE} registers per block")
    for axis, (size, most) in enumerate(zip(tuple(grid) + (1, 1), MAX_GRID)):
        if not 0 < size <= most:
            problems.append(f"grid axis {axis} = {size} outside 1..{most}")
    return problems


def sm_limits(arch: int) -> SM:
    """The per-SM limits of `arch`; an arch without a row is an error, never a guess."""
    if arch not in SMS:
        raise ValueError(f"no SM limits for sm_{arch}; known: {', '.join(f'sm_{a}' for a in sorted(SMS))} "
                         "(add a row to SMS from the CUDA C++ Programming Guide's table)")
    return SMS[arch]


def occupancy(arch: int, num_warps: int, registers: int, shared: int) -> float:
    """Theoretical occupancy: resident warps per SM over the arch's most, as the CUDA occupancy
    calculator counts them (registers per warp in units of 256 within each of the 4 SM
    sub-partitions, shared memory with the 1 KiB system share in units of 128 B); 0 where a block
    does not fit."""
    sm = sm_limits(arch)
    if num_warps < 1:
        return 0.0
    regs_per_warp = _round_up(max(registers, 1) * 32, REG_ALLOC_UNIT)
    warps_by_registers = (REGISTER_FILE // SUB_PARTITIONS // regs_per_warp) * SUB_PARTITIONS
    blocks = min(sm.blocks_per_sm, sm.warps_per_sm // num_warps, warps_by_registers // num_warps)
    if shared > 0:
        blocks = min(blocks, sm.shared_per_sm // _round_up(shared + SHARED_RESERVED_PER_BLOCK, SHARED_ALLOC_UNIT))
    return blocks * num_warps / sm.warps_per_sm


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def binder_available() -> str | None:
    """None when this Triton has the internals the check binds arguments with, else why not."""
    try:
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as exc:
        return f"triton {_triton_version()} has no triton.runtime.jit.create_function_from_signature ({exc})"
    params = list(inspect.signature(create_function_from_signature).parameters)
    if params[:3] != ["sig", "kparams", "backend"] or not hasattr(JITFunction, "_pack_args"):
        return (f"triton {_triton_version()}: create_function_from_signature{tuple(params)} / "
                "JITFunction._pack_args differ from Triton 3.x's (checked on 3.8)")
    return None


def _launch_options(jit, kwargs: dict) -> dict:
    """The options a real launch adds to the call (JITFunction.run): debug, instrumentation (Triton
    3.4+ reads them from triton.knobs; older releases get the call's own options)."""
    try:
        from triton import knobs
    except ImportError:
        return dict(kwargs)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    return kwargs


def _compile(case: str, jit, target, grid: tuple, bound, specialization, options, kwargs) -> Compiled:
    import triton
    from triton.compiler import ASTSource, make_backend

    t0 = time.perf_counter()
    backend = make_backend(target)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    names = {path: jit.arg_names[path[0]] for path in constexprs}
    record = Compiled(case=case, kernel=jit.fn.__name__, arch=target.arch, grid=grid,
                      constexprs={names[p]: v for p, v in constexprs.items()},
                      pointers=",".join(t[1:] for t in signature.values() if t.startswith("*")))
    try:
        kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
        usage = resource_usage(kernel.asm["cubin"], kernel.metadata.name)
        record.num_warps = kernel.metadata.num_warps
        record.registers, record.spill_bytes = usage.get("REG", 0), usage.get("LOCAL", 0)
        record.stack_bytes, record.shared_bytes = usage.get("STACK", 0), kernel.metadata.shared
        record.problems = launch_problems(target.arch, grid, record.num_warps, record.registers, record.shared_bytes)
        record.occupancy = occupancy(target.arch, record.num_warps, record.registers, record.shared_bytes)
        listing = sass_listing(kernel.asm["cubin"], kernel.metadata.name)
        record.instructions, record.loop_instructions = count_sass(listing), longest_loop_sass(listing)
    except Exception as exc:  # noqa: BLE001 - a compile error is the finding, reported per kernel
        first = str(exc).strip().splitlines()
        record.problems = [f"does not compile: {type(exc).__name__}: {first[-1] if first else ''}"]
    record.seconds = time.perf_counter() - t0
    return record


class Recorder:
    """What `compile_instead_of_launch` yields: set `case` before a launcher runs; `results` holds
    one Compiled per distinct specialisation and arch. Two launches are the same compile when
    Triton's own binder gives the same specialisation (constexpr values, dtypes, 16-byte
    alignment, integer widths) and options (num_warps, ...) for the same kernel and grid."""

    def __init__(self, archs: Iterable[int]):
        archs = tuple(archs)
        for arch in archs:
            sm_limits(arch)
        self.targets = _targets(archs)
        self.case = ""
        self.results: list[Compiled] = []
        self._seen: set[tuple] = set()

    def launch(self, jit, grid, args, kwargs) -> None:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        kwargs = _launch_options(jit, kwargs)
        for target in self.targets:
            binder = create_function_from_signature(jit.signature, jit.params, make_backend(target))
            bound, specialization, options = binder(*args, **kwargs)
            grid_now = tuple(grid(bound) if callable(grid) else grid)
            key = (id(jit), target.arch, repr(specialization), repr(sorted(options.items())), grid_now)
            if key not in self._seen:
                self._seen.add(key)
                self.results.append(_compile(self.case, jit, target, grid_now, bound, specialization, options,
                                             kwargs))


@contextlib.contextmanager
def compile_instead_of_launch(archs: Iterable[int]) -> Iterator[Recorder]:
    """Within the block a Triton launch compiles for each arch instead of running, and the
    launchers accept meta tensors (no data is touched). It patches triton's JITFunction.run and
    _triton_utils.can_run_triton for the whole process (restored on exit): not for use while
    another thread launches kernels. Interpreter mode is read from TRITON_INTERPRET, as
    _triton_utils does: a process that imported triton interpreted must not clear it and call this."""
    if _triton_utils.interpret_mode():
        raise RuntimeError("check_triton_build compiles kernels, but TRITON_INTERPRET=1 is set in this process "
                           "(triton interprets once imported): run the check in a fresh process")
    missing = binder_available()
    if missing is not None:
        raise RuntimeError(f"check_triton_build cannot bind kernel arguments: {missing}")
    from triton.runtime.jit import JITFunction

    recorder = Recorder(archs)
    saved_run, saved_can_run = JITFunction.run, _triton_utils.can_run_triton
    JITFunction.run = lambda jit, *args, grid, warmup, **kwargs: recorder.launch(jit, grid, args, kwargs)
    _triton_utils.can_run_triton = lambda *tensors: True
    try:
        yield recorder
    finally:
        JITFunction.run, _triton_utils.can_run_triton = saved_run, saved_can_run


def check(cases: Iterable[Case], archs: Iterable[int] = DEFAULT_ARCHS) -> list[Compiled]:
    """Compile every kernel launch the cases make, for each arch; a launcher that raises is a
    failed result too."""
    failures = []
    with compile_instead_of_launch(archs) as recorder:
        for case in cases:
            recorder.case = case.name
            try:
                case.run()
            except Exception as exc:  # noqa: BLE001 - a launcher that raises is a finding too
                failures.append(Compiled(case=case.name, kernel="(launcher)", arch=0, grid=(), constexprs={},
                                         problems=[f"launcher raised {type(exc).__name__}: {exc}"]))
    return recorder.results + failures


# ---------------------------------------------------------------- the launch sites, as cases

def default_cases() -> list[Case]:
    """The configurations the ops launch with: paper sizes, the benchmarks' large sizes, the tiny
    model, fp32 and bf16 storage, both teacher forms, one-tile and chunked anchor_kl rows, and the
    merged LoRA weight of ViT-B/16's layers."""
    from . import anchor_kl, knn_subgraph_kl, lora_fused, lora_merge, pgd_step

    meta = torch.device("meta")
    f32, bf16 = torch.float32, torch.bfloat16
    cases = []

    def pgd(n, hw, dtype, layout=torch.contiguous_format):
        x = torch.empty(n, 3, hw, hw, dtype=dtype, device=meta, memory_format=layout)
        params = [torch.empty(3, device=meta) for _ in range(4)]
        return lambda: pgd_step.pgd_step_triton(x, x, x, *params)

    for dtype in (f32, bf16):
        for n, hw in ((64, 224), (512, 224), (128, 32)):  # paper batch, roofline size, tiny model
            cases.append(Case(f"pgd_step {n}x3x{hw}x{hw} {_name(dtype)}", pgd(n, hw, dtype)))
        cases.append(Case(f"pgd_step 64x3x224x224 {_name(dtype)} channels_last",
                          pgd(64, 224, dtype, torch.channels_last)))

    def akl(rows, cols, s_dtype, t_dtype, logprob, chunk=None):
        zs = torch.empty(rows, cols, dtype=s_dtype, device=meta)
        zt = torch.empty(rows, cols, dtype=t_dtype, device=meta)
        return lambda: anchor_kl.anchor_kl_triton(zs, zt, 20.0, logprob, chunk_cols=chunk)

    widths = ((512, 10), (512, 90), (512, 1000), (524288, 1000), (512, anchor_kl.SINGLE_BLOCK_COLS), (65536, 8000))
    for rows, cols in widths:
        for s_dtype, t_dtype in ((f32, f32), (bf16, bf16), (bf16, f32)):
            for logprob in (False, True):
                form = "log-probs" if logprob else "logits"
                cases.append(Case(f"anchor_kl {rows}x{cols} {_name(s_dtype)}/{_name(t_dtype)} teacher {form}",
                                  akl(rows, cols, s_dtype, t_dtype, logprob)))
    # chunks narrower than 16 columns (tests, the sweep): the alignment hints must fit inside one chunk
    cases.append(Case("anchor_kl 512x64 in chunks of 8 fp32/fp32 teacher logits", akl(512, 64, f32, f32, False, 8)))

    def akl_scale(rows, cols, shared):
        dz = torch.empty(rows, cols, device=meta)
        grad_rows = torch.empty((), device=meta).expand(rows) if shared else torch.empty(rows, device=meta)
        return lambda: anchor_kl.anchor_kl_scale_grad_triton(dz, grad_rows)

    for rows, cols in ((512, 1000), (524288, 1000)):  # fp32 z_S's backward: one incoming gradient, or one per row
        for shared in (True, False):
            cases.append(Case(f"anchor_kl backward scaling {rows}x{cols} fp32, {'one' if shared else 'per-row'} "
                              "incoming gradient", akl_scale(rows, cols, shared)))

    def knn(classes, n_roots, k, d, dtype, mean_grad=False):
        emb = torch.empty(classes, d, dtype=dtype, device=meta)
        roots = torch.empty(n_roots, dtype=torch.long, device=meta)
        neighbors = torch.empty(n_roots, k, dtype=torch.long, device=meta)
        ref = torch.empty(n_roots, k, device=meta)

        def run():
            kl, g, g_root = knn_subgraph_kl.knn_kl_forward_triton(emb, roots, neighbors, ref, 0.05)
            # the training step's loss is the mean over roots: its gradient is a stride-0 expand, a stride
            # Triton compiles apart from the contiguous one (specialised on 1)
            grad_kl = torch.empty((), device=meta).expand(n_roots) if mean_grad else kl
            knn_subgraph_kl.knn_kl_backward_triton(grad_kl, emb, roots, neighbors, g, g_root)
        return run

    for classes, n_roots, k, d in ((1000, 200, 10, 512), (2000000, 400000, 10, 512), (1000, 200, 10, 768),
                                   (1000, 200, 20, 1024)):
        for dtype in (f32, bf16):
            cases.append(Case(f"knn_subgraph_kl {classes} classes {n_roots}x{k} d{d} {_name(dtype)}",
                              knn(classes, n_roots, k, d, dtype)))
    cases.append(Case("knn_subgraph_kl 1000 classes 200x10 d512 fp32, the mean's stride-0 gradient",
                      knn(1000, 200, 10, 512, f32, mean_grad=True)))

    def merge(n_out, n_in, rank, dtype):
        w = torch.empty(n_out, n_in, dtype=dtype, device=meta)
        a, b = torch.empty(rank, n_in, dtype=dtype, device=meta), torch.empty(n_out, rank, dtype=dtype, device=meta)
        return lambda: lora_merge.lora_merged_weight_triton(w, a, b, 2.0)

    for n_out, n_in, rank in ((3072, 768, 32), (768, 768, 8), (768, 3072, 128)):  # c_fc, attention, widest rank
        for dtype in (f32, bf16):
            cases.append(Case(f"lora_merged_weight {n_out}x{n_in} r{rank} {_name(dtype)}",
                              merge(n_out, n_in, rank, dtype)))

    def fused(tokens, n_in, n_out, rank, dtype):
        x = torch.empty(tokens, n_in, dtype=dtype, device=meta)
        w, bias = torch.empty(n_out, n_in, dtype=dtype, device=meta), torch.empty(n_out, dtype=dtype, device=meta)
        a, b = torch.empty(rank, n_in, dtype=dtype, device=meta), torch.empty(n_out, rank, dtype=dtype, device=meta)

        def run():
            _, u, merged = lora_fused.lora_fused_forward(x, w, bias, a, b, 2.0)
            lora_fused.lora_fused_backward(torch.empty(tokens, n_out, dtype=dtype, device=meta), u, merged, b, 2.0)
        return run

    for tokens, n_in, n_out, rank in ((128 * 197, 768, 3072, 32), (128 * 197, 3072, 768, 32), (4096, 512, 512, 8),
                                      (4096, 768, 2304, lora_fused.MAX_RANK)):  # the widest rank it takes
        for dtype in (bf16, torch.float16):
            cases.append(Case(f"lora_fused {tokens}x{n_in}->{n_out} r{rank} {_name(dtype)}",
                              fused(tokens, n_in, n_out, rank, dtype)))
    return cases


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ---------------------------------------------------------------- report

def table(results: list[Compiled]) -> str:
    """One line per distinct compiled kernel and arch, and the cases that failed."""
    lines = [f"{'kernel':<26} {'arch':>5} {'warps':>5} {'regs':>4} {'spill B':>7} {'stack B':>7} {'shared B':>8} "
             f"{'occ':>4} {'instr':>6}  constexprs; pointer types"]
    distinct = {}
    for r in results:
        if r.kernel != "(launcher)":
            distinct.setdefault((r.kernel, r.arch, json.dumps(r.constexprs, sort_keys=True), r.pointers, r.num_warps,
                                 r.registers), r)
    for r in sorted(distinct.values(), key=lambda r: (r.kernel, r.arch, json.dumps(r.constexprs), r.pointers,
                                                      r.num_warps)):
        consts = " ".join(f"{k}={v}" for k, v in r.constexprs.items())
        lines.append(f"{r.kernel:<26} {'sm_' + str(r.arch):>5} {r.num_warps:>5} {r.registers:>4} {r.spill_bytes:>7} "
                     f"{r.stack_bytes:>7} {r.shared_bytes:>8} {r.occupancy:>4.0%} {r.instructions:>6}  {consts}; "
                     f"{r.pointers}")
    for r in sorted(distinct.values(), key=lambda r: (r.kernel, r.arch, json.dumps(r.constexprs))):
        if r.stack_bytes > 0:  # ptxas puts spilled registers in the stack frame: slow, not wrong
            consts = " ".join(f"{k}={v}" for k, v in r.constexprs.items())
            lines.append(f"WARN {r.kernel} sm_{r.arch} {consts}: {r.stack_bytes} B stack frame per thread "
                         "(registers spilled there: a smaller tile or more warps)")
    for r in results:
        for problem in r.problems:
            lines.append(f"FAIL {r.case}: {r.kernel} sm_{r.arch}: {problem}")
    return "\n".join(lines)


def _write_json(path: Path, results: list[Compiled], archs, seconds: float) -> None:
    payload = {"archs": list(archs), "seconds": seconds, "triton": _triton_version(),
               "ok": not any(r.problems for r in results), "kernels": [asdict(r) for r in results]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _triton_version() -> str:
    import triton
    return triton.__version__


def main(argv=None) -> int:
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret (read when triton is imported)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(map(str, DEFAULT_ARCHS)),
                        help="compute capabilities, e.g. 89,90 (RTX 4090, H100) or 80 (A100)")
    parser.add_argument("--json", type=Path, help="also write every compiled kernel and its usage here")
    parser.add_argument("-k", dest="select", default="", help="only the cases whose name contains this")
    args = parser.parse_args(argv)
    tokens = [a.strip().replace(".", "") for a in re.split(r"[,;]", args.archs) if a.strip()]
    if not tokens or not all(t.isdigit() for t in tokens):
        parser.error(f"--archs '{args.archs}' is not a list of compute capabilities; e.g. --archs 89,90")
    archs = [int(t) for t in tokens]
    for arch in archs:
        try:
            sm_limits(arch)
        except ValueError as exc:
            parser.error(str(exc))
    missing = binder_available()
    if missing is not None:
        print(f"check_triton_build: cannot bind kernel arguments on this Triton: {missing}", file=sys.stderr)
        return 2
    cases = [c for c in default_cases() if args.select in c.name]
    if not cases:
        parser.error(f"-k '{args.select}' matches no case")
    t0 = time.perf_counter()
    results = check(cases, archs)
    seconds = time.perf_counter() - t0
    print(table(results))
    failed = sum(bool(r.problems) for r in results)
    print(f"{len(cases)} cases, {len(results)} compiles for sm_{', sm_'.join(map(str, archs))} in {seconds:.1f} s "
          f"(triton {_triton_version()}): {'all compile and fit' if not failed else f'{failed} FAILED'}")
    if args.json:
        _write_json(args.json, results, archs, seconds)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
