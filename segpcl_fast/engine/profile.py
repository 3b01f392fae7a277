"""`segpcl-fast profile`: a few training steps of task 2 under torch.profiler.

What runs: task 1 for `steps` steps (warm-up: allocator, compilation, the prototypes task 2's DPGD
needs), then task 2 under the profiler: stage 1 (DPGD), `steps` training steps, stage 3. Under
run.compile task 2 is warm-up too and task 3 is profiled (where there is one): task 2 compiles
graphs of its own (the teacher's, and the batch grown by the anchors), so a task-2 window timed
mostly dynamo and inductor. Any graph still compiled inside the window is counted and reported
("graphs_compiled_in_window"). Files:

    trace.json       Chrome / Perfetto trace (chrome://tracing, ui.perfetto.dev)
    top_ops.txt      ops and kernels by self time (device time on GPU, CPU time otherwise); the
                     stage ranges are left out (their time is their ops')
    stages.txt       time inside each stage range: host (wall) ms, and on GPU the device time of
                     the kernels launched inside it ("-" for `backward`, whose kernels autograd
                     launches from its own thread); ranges nest (image_forward inside dpgd,
                     student_forward_losses and prototypes; losses.* inside student_forward_losses),
                     so a column does not add up to the wall time
    categories.txt   self time by kind of kernel (GEMM, attention, inductor-fused, our Triton
                     kernels, other elementwise, copies) and, on GPU, the time no kernel ran

Stage ranges (torch.profiler.record_function): the
trainer's own `dpgd`, `student_forward_losses`, `backward`, `grad_sync`, `optimizer`,
`prototypes`, `eval`, plus, while profiling only, `image_forward`, `text_forward` (the towers,
student and teacher) and `losses.cls`, `losses.acgd`, `losses.gr` (the loss terms; under run.compile,
where they are one compiled graph, `losses` around it).

Under torchrun every rank profiles its own part: rank 0 writes to out_dir, rank r > 0 to
out_dir/rank<r>/ (its `dpgd` range is the wait for rank 0's anchors).

nvtx=True is the mode for Nsight Systems and Nsight Compute (CUDA only): the same steps run under
torch.autograd.profiler.emit_nvtx, so every op and stage range is an NVTX range, and torch.profiler
does not run (only one profiler can be on per thread, and its CUPTI session would compete with
nsys's / ncu's); the timeline is the Nsight tool's report, and no file is written. The profiled
task runs between cudaProfilerStart and cudaProfilerStop (torch.cuda.profiler.profile), so
`ncu --profile-from-start off` and `nsys --capture-range=cudaProfilerApi` see that window alone,
not the warm-up: ncu's --launch-skip then counts launches inside the window.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..config import Config, ConfigError
from ..fileio import atomic_path, atomic_write_text, unwritable_dir_reason
from .compiling import compile_counters, loss_terms_compiled

log = logging.getLogger("segpcl_fast.engine")

STAGES = ("dpgd", "student_forward_losses", "image_forward", "text_forward", "losses", "losses.cls", "losses.acgd",
          "losses.gr", "backward", "grad_sync", "optimizer", "prototypes")


def _ranged(fn, name: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    wrapper.__wrapped_by_profile__ = True
    return wrapper


@contextlib.contextmanager
def stage_ranges(learner=None):
    """Add record_function ranges to the towers (class level: student and teacher) and loss terms. When
    `learner`'s loss terms are compiled (run.compile: one graph, engine/compiling.py), one `losses` range
    around that call instead of a range per term: patching the terms' functions would change what the
    graph's guards check (a recompile inside the window), and the graph has no terms to time apart."""
    from ..method import losses as stage2
    from ..model.clip import CLIPModel
    targets = [(CLIPModel, "encode_image", "image_forward"), (CLIPModel, "class_embeddings", "text_forward")]
    if learner is not None and loss_terms_compiled(learner):
        targets.append((learner, "loss_terms", "losses"))
    else:
        targets += [(stage2, "cls_loss", "losses.cls"), (stage2, "acgd_loss", "losses.acgd"),
                    (stage2, "tsgr_loss", "losses.gr")]
    saved = [(owner, attr, vars(owner)[attr]) for owner, attr, _ in targets]
    try:
        for owner, attr, name in targets:
            setattr(owner, attr, _ranged(getattr(owner, attr), name))
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def stage_table(events, on_gpu: bool) -> tuple[str, dict]:
    """Inclusive time per stage range and the table text: "ms", the host (wall) time inside the range;
    on GPU also "device_ms", the time of the kernels launched inside it (None when none was: the
    `backward` range, whose kernels autograd's own thread launches). Two clocks, two columns."""
    totals = {}
    for e in events:
        if e.key in STAGES:
            totals[e.key] = {"ms": e.cpu_time_total / 1e3, "calls": e.count}
            if on_gpu:
                totals[e.key]["device_ms"] = e.device_time_total / 1e3 if e.device_time_total > 0 else None
    head = f"{'stage (ranges nest)':<26}{'calls':>8}{'host ms':>14}{'host ms/call':>14}"
    lines = [head + (f"{'kernel ms':>14}" if on_gpu else "")]
    for name in STAGES:
        if name in totals:
            t = totals[name]
            row = f"{name:<26}{t['calls']:>8}{t['ms']:>14.2f}{t['ms'] / max(t['calls'], 1):>14.3f}"
            if on_gpu:
                row += f"{t['device_ms']:>14.2f}" if t["device_ms"] is not None else f"{'-':>14}"
            lines.append(row)
    return "\n".join(lines) + "\n", totals


# (category, pattern searched in a kernel's (GPU) or op's (CPU) name): the first match wins, so
# attention's cutlass/fmha kernels are taken before the GEMM patterns see "cutlass"
KERNEL_CATEGORIES = (
    ("attention", r"flash|fmha|attention|scaled_dot_product"),
    ("segpcl triton", r"_pgd_step_kernel|_anchor_kl|_knn_kl_"),
    ("gemm", r"gemm|xmma|nvjet|cutlass|cublas|wgmma|^aten::(mm|addmm|bmm|baddbmm|_addmm_activation)$|"
             r"^segpcl::lora_b_linear|^mkldnn|^aten::(_?convolution|mkldnn_convolution)"),
    ("inductor fused", r"^triton_|cpp_fused|^Torch-Compiled Region|^CompiledFunction"),
    ("copy / memset", r"memcpy|memset|Memcpy|Memset|^aten::(copy_|to|_to_copy|clone|contiguous)$"),
    ("elementwise / reduction", r"elementwise|vectorized|reduce|unrolled|softmax|norm|^aten::"),
)


def kernel_category(name: str) -> str:
    """Which KERNEL_CATEGORIES entry a kernel or op name falls in ("other" when none)."""
    for category, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, name):
            return category
    return "other"


def _is_range(e) -> bool:
    """A stage range, a profiler step or a Python-level annotation: not an op or a kernel."""
    return e.key in STAGES or e.key.startswith(("ProfilerStep", "## "))


def ops_table(events, sort_by: str, row_limit: int) -> str:
    """torch.profiler's table of ops and kernels by self time, without the stage ranges."""
    from torch.autograd.profiler_util import EventList
    return EventList([e for e in events if not _is_range(e)]).table(sort_by=sort_by, row_limit=row_limit,
                                                                    max_name_column_width=90)


def category_table(events, on_gpu: bool, wall_ms: float) -> tuple[str, dict]:
    """Self time per kernel category (GPU kernels on GPU, ops on CPU) and its share of `wall_ms`,
    the profiled window's wall time; on GPU also the time no kernel ran (launch gaps, host syncs)."""
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    totals: dict[str, float] = {}
    for e in events:
        if _is_range(e):
            continue
        if on_gpu and getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, key)
        if us > 0:
            category = kernel_category(e.key)
            totals[category] = totals.get(category, 0.0) + us / 1e3
    busy = sum(totals.values())
    rows = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    if on_gpu:
        rows["(no kernel running)"] = max(wall_ms - busy, 0.0)
    lines = [f"{'category':<28}{'self ms':>12}{'% of wall':>12}"]
    lines += [f"{name:<28}{ms:>12.2f}{100 * ms / max(wall_ms, 1e-9):>11.1f}%" for name, ms in rows.items()]
    lines.append(f"{'wall time of the window':<28}{wall_ms:>12.2f}")
    return "\n".join(lines) + "\n", rows


def top_kernel(events, on_gpu: bool) -> Optional[str]:
    """Name of the kernel (GPU) or op (CPU) with the largest self time, stage ranges excluded.

    On CPU there is no kernel for ncu: the op name is a pointer to where the time goes."""
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    cands = [e for e in events if not _is_range(e)]
    if on_gpu:  # kernels: a Memcpy / Memset row is a copy engine's work, which ncu cannot profile
        cands = [e for e in cands if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                 and not e.key.startswith(("Memcpy", "Memset"))]
    else:  # ops (aten::mm, segpcl::lora_b_linear_fwd), not Python-level annotations (DataLoader, Optimizer)
        cands = [e for e in cands if "::" in e.key and "#" not in e.key and not e.key.startswith("Optimizer")]
    cands = [e for e in cands if getattr(e, key) > 0]
    return max(cands, key=lambda e: getattr(e, key)).key if cands else None


def _without_params(name: str) -> str:
    """A demangled kernel name without its trailing parameter list: "void f<4, (anon)::g>(int, float*)"
    -> "void f<4, (anon)::g>" (parentheses inside the name, as in "(anonymous namespace)", stay)."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i].rstrip()
    return name


def kernel_name_regex(kernel: str) -> str:
    """A regex for ncu's `regex:` matching this kernel's whole demangled name with its template
    arguments, and nothing longer: not another instantiation of the same template (an add on bf16
    for one on fp32), not a kernel whose name contains this one. Anchored at the end, with any
    parameter list, and after the start or a space, with or without a leading "void ", so the
    demangler's spelling of the parameters and return type does not matter. Only metacharacters
    are escaped, each with a backslash, which every common dialect (ECMAScript, POSIX extended,
    PCRE, Python's re) reads as the literal character."""
    name = _without_params(kernel)
    name = name[len("void "):] if name.startswith("void ") else name
    return "(^| )" + re.sub(r"([\\^$.*+?()\[\]{}|])", r"\\\1", name) + r"(\(.*\))?$"


def ncu_command(kernel: str, argv: list[str], launches: Optional[int] = None) -> str:
    """Nsight Compute command profiling one launch of `kernel` in a rerun of the profile with `argv`.

    `launches`: how often the kernel ran in the profiled window. The rerun (--nvtx) repeats that
    window between cudaProfilerStart / Stop and ncu starts with profiling off, so its launch count
    starts at the window (not at the warm-up task before it): skipping at most launches - 1 (and at
    most 10, past a first launch's autotuning) still reaches one. torch.profiler does not run under ncu."""
    skip = 10 if launches is None else max(0, min(10, launches - 1))
    cmd = ["ncu", "--profile-from-start", "off", "--kernel-name-base", "demangled",
           "--kernel-name", f"regex:{kernel_name_regex(kernel)}",
           "--launch-skip", str(skip), "--launch-count", "1", "--set", "full", "-f", "-o", "segpcl_kernel",
           sys.executable, "-m", "segpcl_fast.cli", "profile", *argv, "--nvtx"]
    return shlex.join(cmd)


def check_profile_args(cfg: Config, steps: int, nvtx: bool, out_dir: Optional[str | os.PathLike] = None) -> None:
    """profile's own refusals, before anything loads: --steps < 1, --nvtx on a run that is not on CUDA, an
    output folder (`out_dir`, where the trace goes: not under --nvtx) that cannot be written."""
    from .trainer import resolve_device
    if steps < 1:
        raise ConfigError(f"profile: --steps must be >= 1, got {steps}")
    problem = unwritable_dir_reason(out_dir) if out_dir is not None and not nvtx else None
    if problem:
        raise ConfigError(f"profile's output folder: {problem}; pick another folder with -o (run.output_dir)")
    device = resolve_device(cfg.run.device)
    if nvtx and not _is_cuda(device):
        raise ConfigError(f"profile --nvtx emits NVTX ranges for Nsight Systems / Compute, which profile CUDA "
                          f"devices; this run is on {device}: drop --nvtx (torch.profiler's trace and "
                          "tables work on the CPU), or run on a GPU")


def profile_training(cfg: Config, out_dir: str | os.PathLike, steps: int = 5, row_limit: int = 30,
                     nvtx: bool = False, compile_settings=None) -> dict:
    """Profile `steps` training steps of task 2 (task 3 under run.compile; the last task of a shorter run),
    after the tasks before it as warm-up; returns paths and stats."""
    from .trainer import Trainer
    check_profile_args(cfg, steps, nvtx, out_dir)  # before the model and data load: a refusal costs nothing
    cfg = copy.deepcopy(cfg)
    cfg.run.max_steps_per_task = steps
    cfg.run.checkpoint, cfg.run.plots, cfg.run.progress, cfg.eval.fwt = False, False, False, False
    cfg.run.tensorboard = False  # a profile writes its own files (the trace), not a run's curves
    trainer = Trainer(cfg, compile_settings=compile_settings, writes=False)  # its files go to out_dir
    on_gpu = _is_cuda(trainer.device)
    out = Path(out_dir) if trainer.dist.is_main else Path(out_dir) / f"rank{trainer.dist.rank}"
    task = profiled_task(trainer.scenario.num_tasks, bool(trainer.compiled))
    for warm_up in range(task):
        trainer.train_task(warm_up)  # compilation, and the state the profiled task's DPGD starts from
    graphs_before = compile_counters()["unique_graphs"]
    if nvtx:  # the Nsight tool records the timeline; torch.profiler stays off (module docstring)
        with stage_ranges(trainer.learner), torch.autograd.profiler.emit_nvtx(), cuda_profiler_window():
            start = time.perf_counter()
            info = trainer.train_task(task)
            wall_ms = (time.perf_counter() - start) * 1e3
        _say_fewer_steps(info, steps, task, cfg)
        return {"nvtx": True, "paths": {}, "on_gpu": on_gpu, "device": str(trainer.device), "task": task + 1,
                "steps": info["timings"]["steps"], "wall_ms": wall_ms,
                "graphs_compiled_in_window": compile_counters()["unique_graphs"] - graphs_before}
    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with stage_ranges(trainer.learner), profile(activities=activities, record_shapes=False) as prof:
        start = time.perf_counter()
        info = trainer.train_task(task)
        if on_gpu:
            torch.cuda.synchronize(trainer.device)  # the run's device (run.device=cuda:1 need not be current)
        wall_ms = (time.perf_counter() - start) * 1e3
    _say_fewer_steps(info, steps, task, cfg)
    graphs_in_window = compile_counters()["unique_graphs"] - graphs_before
    events = prof.key_averages()
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    table = ops_table(events, sort_by, row_limit)
    stages_text, stages = stage_table(events, on_gpu)
    categories_text, categories = category_table(events, on_gpu, wall_ms)
    paths = {"trace": out / "trace.json", "top_ops": out / "top_ops.txt", "stages": out / "stages.txt",
             "categories": out / "categories.txt"}
    with atomic_path(paths["trace"]) as tmp:
        prof.export_chrome_trace(str(tmp))
        trace = tmp.read_text()  # its "traceName" names the temporary file: name the real one
        tmp.write_text(trace.replace(json.dumps(str(tmp), ensure_ascii=False),  # torch writes the path as is
                                     json.dumps(str(paths["trace"]), ensure_ascii=False)))
    atomic_write_text(paths["top_ops"], table + "\n")
    atomic_write_text(paths["stages"], stages_text)
    atomic_write_text(paths["categories"], categories_text)
    kernel = top_kernel(events, on_gpu)
    launches = next((e.count for e in events if e.key == kernel), None) if kernel else None
    return {"nvtx": False, "paths": {k: str(v) for k, v in paths.items()}, "table": table, "stages": stages,
            "on_gpu": on_gpu, "stages_table": stages_text, "categories": categories,
            "categories_table": categories_text, "top_kernel": kernel, "top_kernel_launches": launches,
            "device": str(trainer.device), "task": task + 1, "steps": info["timings"]["steps"], "sort_by": sort_by,
            "wall_ms": wall_ms, "graphs_compiled_in_window": graphs_in_window}


def _say_fewer_steps(info: dict, steps: int, task: int, cfg: Config) -> None:
    """The profiled task ran out of batches before --steps: the header's "N steps" was not what ran."""
    ran = info["timings"]["steps"]
    if ran < steps:
        log.warning("profile: task %d has %d training steps (its images / optim.batch_size=%d x optim.epochs=%d), "
                    "fewer than --steps %d: %d profiled; raise data.max_train_per_class or lower optim.batch_size "
                    "to profile more", task + 1, ran, cfg.optim.batch_size, cfg.optim.epochs, steps, ran)


def cuda_profiler_window():
    """cudaProfilerStart on entry, cudaProfilerStop on exit: where `ncu --profile-from-start off` and
    `nsys --capture-range=cudaProfilerApi` record."""
    return torch.cuda.profiler.profile()


def profiled_task(num_tasks: int, compiled: bool) -> int:
    """0-based task profiled: the second (the first with DPGD and anchors), or under run.compile the
    third, whose graphs tasks 1 and 2 compiled; the last one in a shorter run."""
    return min(2 if compiled else 1, num_tasks - 1)


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"
