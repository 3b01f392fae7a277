"""`segpcl-fast profile`: a few training steps of task 2 under torch.profiler.

What runs: task 1 for `steps` steps (warm-up: allocator, compilation, the prototypes task 2's DPGD
needs), then task 2 under the profiler: stage 1 (DPGD), `steps` training steps, stage 3. Files:

    trace.json       Chrome / Perfetto trace (chrome://tracing, ui.perfetto.dev)
    top_ops.txt      ops and kernels by self time (device time on GPU, CPU time otherwise); the
                     stage ranges are left out (their time is their ops')
    stages.txt       total time inside each stage range; ranges nest (image_forward inside dpgd,
                     student_forward_losses and prototypes; losses.* inside student_forward_losses),
                     so the column does not add up to the wall time
    categories.txt   self time by kind of kernel (GEMM, attention, inductor-fused, our Triton
                     kernels, other elementwise, copies) and, on GPU, the time no kernel ran

Stage ranges (torch.profiler.record_function; NVTX ranges too with nvtx=True under nsys): the
trainer's own `dpgd`, `student_forward_losses`, `backward`, `grad_sync`, `optimizer`,
`prototypes`, `eval`, plus, while profiling only, `image_forward`, `text_forward` (the towers,
student and teacher) and `losses.cls`, `losses.acgd`, `losses.gr` (the loss terms).

Under torchrun every rank profiles its own part: rank 0 writes to out_dir, rank r > 0 to
out_dir/rank<r>/ (its `dpgd` range is the wait for rank 0's anchors).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..config import Config
from ..fileio import atomic_path, atomic_write_text

STAGES = ("dpgd", "student_forward_losses", "image_forward", "text_forward", "losses.cls", "losses.acgd",
          "losses.gr", "backward", "grad_sync", "optimizer", "prototypes")


def _ranged(fn, name: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    wrapper.__wrapped_by_profile__ = True
    return wrapper


@contextlib.contextmanager
def stage_ranges():
    """Add record_function ranges to the towers (class level: student and teacher) and loss terms."""
    from ..method import losses as stage2
    from ..model.clip import CLIPModel
    targets = [(CLIPModel, "encode_image", "image_forward"), (CLIPModel, "class_embeddings", "text_forward"),
               (stage2, "cls_loss", "losses.cls"), (stage2, "acgd_loss", "losses.acgd"),
               (stage2, "tsgr_loss", "losses.gr")]
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in targets]
    try:
        for owner, attr, name in targets:
            setattr(owner, attr, _ranged(getattr(owner, attr), name))
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def stage_table(events, on_gpu: bool) -> tuple[str, dict]:
    """Total (inclusive) time per stage range, ms, and the table text."""
    totals = {}
    for e in events:
        if e.key in STAGES:
            us = e.device_time_total if on_gpu and e.device_time_total > 0 else e.cpu_time_total
            totals[e.key] = {"ms": us / 1e3, "calls": e.count}
    lines = [f"{'stage (ranges nest)':<26}{'calls':>8}{'total ms':>14}{'ms / call':>12}"]
    for name in STAGES:
        if name in totals:
            t = totals[name]
            lines.append(f"{name:<26}{t['calls']:>8}{t['ms']:>14.2f}{t['ms'] / max(t['calls'], 1):>12.3f}")
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
    if on_gpu:
        cands = [e for e in cands if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    else:  # ops (aten::mm, segpcl::lora_b_linear_fwd), not Python-level annotations (DataLoader, Optimizer)
        cands = [e for e in cands if "::" in e.key and "#" not in e.key and not e.key.startswith("Optimizer")]
    cands = [e for e in cands if getattr(e, key) > 0]
    return max(cands, key=lambda e: getattr(e, key)).key if cands else None


def ncu_command(kernel: str, argv: list[str]) -> str:
    """Nsight Compute command profiling one launch of `kernel` in a 1-step profile run."""
    # ncu matches --kernel-name against the demangled function name: keep the bare identifier
    name = kernel.split("(")[0].split("<")[0].strip().split(" ")[-1].split("::")[-1]
    cmd = ["ncu", "--kernel-name", f"regex:{name}", "--launch-skip", "10", "--launch-count", "1", "--set", "full",
           "-o", "segpcl_kernel", sys.executable, "-m", "segpcl_fast.cli", "profile", *argv]
    return shlex.join(cmd)


def profile_training(cfg: Config, out_dir: str | os.PathLike, steps: int = 5, row_limit: int = 30,
                     nvtx: bool = False, compile_settings=None) -> dict:
    """Profile `steps` training steps of task 2 (or task 1 if there is one task); returns paths and stats."""
    from .trainer import Trainer
    if steps < 1:
        raise ValueError(f"profile: --steps must be >= 1, got {steps}")
    cfg = copy.deepcopy(cfg)
    cfg.run.max_steps_per_task = steps
    cfg.run.checkpoint, cfg.run.plots, cfg.run.progress, cfg.eval.fwt = False, False, False, False
    trainer = Trainer(cfg, compile_settings=compile_settings, writes=False)  # its files go to out_dir
    out = Path(out_dir) if trainer.dist.is_main else Path(out_dir) / f"rank{trainer.dist.rank}"
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = trainer.device.type == "cuda"
    task = 1 if trainer.scenario.num_tasks > 1 else 0
    if task:
        trainer.train_task(0)  # warm-up, and the state task 2's DPGD starts from
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    nvtx_ctx = torch.autograd.profiler.emit_nvtx() if nvtx and on_gpu else contextlib.nullcontext()
    with stage_ranges(), nvtx_ctx, profile(activities=activities, record_shapes=False) as prof:
        start = time.perf_counter()
        info = trainer.train_task(task)
        if on_gpu:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
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
    return {"paths": {k: str(v) for k, v in paths.items()}, "table": table, "stages": stages, "on_gpu": on_gpu,
            "stages_table": stages_text, "categories": categories, "categories_table": categories_text,
            "top_kernel": kernel, "device": str(trainer.device),
            "task": task + 1, "steps": info["timings"]["steps"], "sort_by": sort_by}
