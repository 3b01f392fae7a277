"""Profile the steady-state end-to-end training step (the one test_bench_e2e.py times).

    python benchmarks/profile_e2e_step.py [--device cuda] [--variant compiled_fused] [--steps 5] [-o DIR]

Builds the step of one test_bench_e2e.py variant at that file's sizes (CPU: the tiny model;
CUDA: ViT-B/16, bf16), runs 3 warm-up steps (compilation happens there, outside the window), then
profiles `--steps` steps and writes to DIR: top_kernels.txt (self time), categories.txt (GEMM,
attention, inductor-fused, our Triton kernels, other elementwise, copies, and on GPU the time no
kernel ran), trace.json.gz, and summary.json with the step time and, from the analytic FLOPs
(GEMMs and attention), the throughput of the whole step (MFU) and of its GEMM + attention kernels
alone: if those run near the matmul peak, the MFU gap is everything else (the other kernels and
the time no kernel runs).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench_e2e import CUDA_ONLY, SETUPS, VARIANTS  # noqa: E402  (the benchmark's own sizes and variants)

from segpcl_fast import ops  # noqa: E402
from segpcl_fast.config import Config  # noqa: E402
from segpcl_fast.engine.bench import build_step, matmul_peak_flops, sync  # noqa: E402
from segpcl_fast.engine.compiling import CompileSettings  # noqa: E402
from segpcl_fast.engine.flops import step_flops  # noqa: E402
from segpcl_fast.engine.profile import category_table  # noqa: E402
from segpcl_fast.fileio import atomic_path, atomic_write_text  # noqa: E402
from segpcl_fast.model.clip import AUTOCAST_DTYPES  # noqa: E402
from segpcl_fast.model.tf32 import cuda_matmul_tf32_for, run_tf32  # noqa: E402


def _sig(x: float, digits: int = 5) -> float:
    """x to `digits` significant digits (a CPU's 0.35 TFLOP/s peak rounded to 3 decimals was off by
    up to 0.5 %, more than the MFU it sits beside)."""
    return float(f"{x:.{digits}g}")


def profile_step(device: str, variant: str, steps: int, out_dir: Path, warmup: int = 3) -> dict:
    setup = SETUPS[device]
    backend, compiled, env = VARIANTS[variant]
    os.environ.update(env)
    settings = CompileSettings.from_env() if compiled else None  # the variant's mode; SEGPCL_COMPILE_DYNAMIC_BATCH
    on_gpu = device == "cuda"
    cfg = Config()  # the variant's text precision and TF32, as test_bench_e2e.py sets them (bf16text_*, tf32_*)
    cfg.run.text_precision = os.environ.get("SEGPCL_BENCH_TEXT_PRECISION", "fp32")
    cfg.run.tf32 = os.environ.get("SEGPCL_BENCH_TF32", "0") == "1"
    # fp16_fused's run.precision, as test_bench_e2e.py reads it (this script profiled bf16 for it, over the bf16 peak)
    precision = os.environ.get("SEGPCL_BENCH_PRECISION", setup["precision"])
    # run.tf32 as the trainer applies it (CUDA only), around the compiles and the profiled steps
    with ops.backend(backend), cuda_matmul_tf32_for(run_tf32(cfg.run.tf32, device)) as tf32:
        step = build_step(setup["model"], device, setup["n_images"], setup["n_old"], setup["n_new"],
                          precision=precision, compile_settings=settings, cfg=cfg)
        for _ in range(warmup):
            step()
        sync(step.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync(step.device)
            wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=40, max_name_column_width=100)
    categories_text, categories = category_table(events, on_gpu, wall_ms)
    flops = step_flops(step.model, step.shape)["total"]
    peak = matmul_peak_flops(device, AUTOCAST_DTYPES[precision] or torch.float32)  # the benchmark's MFU denominator
    step_ms = wall_ms / steps
    matmul_ms = (categories.get("gemm", 0.0) + categories.get("attention", 0.0)) / steps
    summary = dict(device=torch.cuda.get_device_name() if on_gpu else "cpu", variant=variant, model=setup["model"],
                   precision=precision, batch=setup["n_images"], anchors=step.shape.n_anchors,
                   steps=steps, step_ms=round(step_ms, 3), step_flops=flops, tf32=tf32 if on_gpu else None,
                   matmul_peak_tflops=_sig(peak / 1e12),
                   mfu_under_profiler=round(flops / (step_ms / 1e3) / peak, 4),  # profiled wall time: not the benchmark's MFU
                   gemm_attention_ms_per_step=round(matmul_ms, 3),
                   gemm_attention_tflops=_sig(flops / (matmul_ms / 1e3) / 1e12) if matmul_ms > 0 else None,
                   category_ms_per_step={k: round(v / steps, 3) for k, v in categories.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "top_kernels.txt", table + "\n")
    atomic_write_text(out_dir / "categories.txt", categories_text)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    with atomic_path(out_dir / "trace.json") as tmp:
        prof.export_chrome_trace(str(tmp))
    with open(out_dir / "trace.json", "rb") as src, atomic_path(out_dir / "trace.json.gz") as tmp:
        with gzip.open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.remove(out_dir / "trace.json")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=sorted(SETUPS))
    p.add_argument("--variant", default="compiled_fused", choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("-o", "--output-dir", default="runs/profile_e2e_step")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.variant in CUDA_ONLY and args.device != "cuda":  # as test_bench_e2e.py skips it there
        p.error(f"--variant {args.variant} is CUDA only: on {args.device} it would profile compiled_fused again; "
                "use --device cuda, or a variant that runs here (eager_reference, eager_fused, compiled_reference, "
                "compiled_fused, compiled_cpp_lora)")
    out = Path(args.output_dir)
    summary = profile_step(args.device, args.variant, args.steps, out)
    print((out / "categories.txt").read_text())
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
