"""End-to-end training step: images/s and MFU, eager reference vs compiled vs compiled + fused ops.

    python -m pytest benchmarks/test_bench_e2e.py --benchmark-only -q --benchmark-json=e2e.json
    python benchmarks/test_bench_e2e.py e2e.json          # the table for BENCHMARKS.md

One step = what the trainer runs per iteration of a mid-run task: Learner.loss on a batch of task
images plus as many anchors (one image-tower forward), the text tower on every needed class,
L_cls + 5 L_ACGD + L_GR, backward into the LoRA B matrices, SGD. FLOPs are analytic
(segpcl_fast.engine.flops): MFU counts the model FLOPs (count="model": each LoRA slice's useful
product, in the rank-r form x W^T + s (x A^T) B^T, which the merged arrangement of the "auto" variants
runs as x (W + s B A)^T, 2.6 % fewer FLOPs at ViT-B/16's shape: benchmarks/flop_audit.py);
count="executed" (also the packed q/k/v LoRA's zero slices) is what the tests check equal
to torch's FlopCounterMode on the reference ops. MFU = model FLOPs / median step time / the matmul
peak measured on the same device in the same session (fp32 on CPU, bf16 on GPU). images/s counts
the task images; the as many anchors in the same forward are work the FLOPs count, not images/s.

Variants: eager_reference (plain PyTorch ops, no compile), eager_fused (ops backend auto: the C++
LoRA op, Triton ops on GPU), compiled_reference (torch.compile, reference ops), compiled_fused
(auto under compile: LoRA as the plain-PyTorch merged arrangement, which inductor traces, and the
Triton ops), compiled_cpp_lora (the same with the opaque C++ LoRA op, SEGPCL_LORA_COMPILE=cpp) and,
on CUDA only, cudagraphs_fused (compiled_fused under mode "reduce-overhead": CUDA graphs) and
bf16text_fused (compiled_fused with run.text_precision=bf16, the text transformer under autocast)
compiled_triton (compiled, ops backend "triton": the image tower's LoRA layers as fused Triton GEMMs),
bf16text_cudagraphs (CUDA graphs and the bf16 text trunk together), autotune_fused (mode
"max-autotune-no-cudagraphs", the GPU presets' choice), autotune_cudagraphs (mode "max-autotune") and
staticbatch_fused (compiled_fused with SEGPCL_COMPILE_DYNAMIC_BATCH=0: the static-batch graph) and
percallcast_fused (compiled_fused with SEGPCL_FROZEN_CAST=per_call: frozen weights cast every forward)
and eagerloss_fused (compiled_fused with SEGPCL_COMPILE_LOSS=0: the loss terms eager) and
cppwrapper_fused (compiled_fused with SEGPCL_COMPILE_CPP_WRAPPER=1: inductor's host code in C++) and
unbatchedmerge_fused (compiled_fused with SEGPCL_COMPILE_BATCH_MERGE=0: one addmm a LoRA merge) and
tf32_fused / tf32_cudagraphs (compiled_fused / cudagraphs_fused with run.tf32: fp32 GEMMs on TF32) and
fp16_fused (compiled_fused with run.precision=fp16: the image tower under fp16 autocast with the trainer's
dynamic loss scaling, torch.amp.GradScaler's unscale and update each step; its MFU is over the fp16
matmul peak, measured as the bf16 one is).
A CUDA-graph variant records how many compiled graphs ran without CUDA graphs, and why
(cudagraph_skips, cudagraph_skip_reasons: engine/compiling.py).
CPU: the shipped tiny model (segpcl-tiny, random weights), batch 32 + 32 anchors, 50 old + 10 new
classes, fp32. GPU: ViT-B/16 with random weights, batch 128 + 128 anchors, 90 old + 10 new classes
(CIFAR100's last task), bf16 autocast.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
import warnings

import pytest
import torch

from segpcl_fast import ops
from segpcl_fast.config import Config
from segpcl_fast.engine.bench import build_step, matmul_peak_flops, sync
from segpcl_fast.engine.compiling import CUDA_GRAPH_MODES, CompileSettings, cudagraph_skips
from segpcl_fast.engine.flops import step_flops
from segpcl_fast.model.clip import AUTOCAST_DTYPES
from segpcl_fast.model.tf32 import cuda_matmul_tf32_for, run_tf32

VARIANTS = {  # name: (ops backend, compiled, environment)
    "eager_reference": ("reference", False, {}),
    "eager_fused": ("auto", False, {}),
    "compiled_reference": ("reference", True, {}),
    "compiled_fused": ("auto", True, {}),  # LoRA: the plain-PyTorch merged arrangement, traced by inductor
    "compiled_cpp_lora": ("auto", True, {"SEGPCL_LORA_COMPILE": "cpp"}),  # LoRA: the opaque C++ op
    # compiled_fused replayed as CUDA graphs (torch.compile mode "reduce-overhead"): the H200 profile
    # found the compiled step's forwards launch-bound (GPU idle 28 % of the step). CUDA only.
    "cudagraphs_fused": ("auto", True, {"SEGPCL_COMPILE_MODE": "reduce-overhead"}),
    # compiled_fused with run.text_precision=bf16 (opt-in): the text transformer under bf16 autocast; the
    # profile found its fp32 GEMMs on SIMT cores, about 7 ms of GPU time a step. CUDA only.
    "bf16text_fused": ("auto", True, {"SEGPCL_BENCH_TEXT_PRECISION": "bf16"}),
    # compiled, ops backend "triton": the LoRA layers as the fused Triton GEMMs (kernels/lora_fused.py; the
    # bf16 image tower: the fp32 text tower keeps the merged arrangement). CUDA only.
    "compiled_triton": ("triton", True, {}),
    # both of the above that remove the most time: CUDA graphs (host launches) and the bf16 text trunk
    # (the step all in bf16, as issue 7 defines it). CUDA only.
    "bf16text_cudagraphs": ("auto", True, {"SEGPCL_COMPILE_MODE": "reduce-overhead",
                                                 "SEGPCL_BENCH_TEXT_PRECISION": "bf16"}),
    # the GPU presets' compile mode (engine/presets.py): inductor's autotuned GEMM templates, which can
    # take a GEMM's bias + GELU (c_fc) into its epilogue; compiles for minutes. CUDA only.
    "autotune_fused": ("auto", True, {"SEGPCL_COMPILE_MODE": "max-autotune-no-cudagraphs"}),
    # the same with CUDA graphs (mode "max-autotune"). CUDA only.
    "autotune_cudagraphs": ("auto", True, {"SEGPCL_COMPILE_MODE": "max-autotune"}),
    # compiled_fused with the image batch left to torch's automatic dynamic shapes: the static graph a
    # constant batch compiles, which training leaves at its first short batch (engine/compiling.py), beside
    # compiled_fused's symbolic one. CUDA only (on the CPU the two measured the same: BENCHMARKS.md).
    "staticbatch_fused": ("auto", True, {"SEGPCL_COMPILE_DYNAMIC_BATCH": "0"}),
    # compiled_fused with the frozen weights kept fp32 and cast by autocast on every forward (one kernel a
    # tensor: about 100 a step for ViT-B/16), beside compiled_fused's stored in bf16 once
    # (model/frozen_cast.py; the same results). CUDA only (the CPU rows are fp32: nothing is cast).
    "percallcast_fused": ("auto", True, {"SEGPCL_FROZEN_CAST": "per_call"}),
    # compiled_fused with stage 2's loss terms eager (SEGPCL_COMPILE_LOSS=0), as before they were compiled:
    # about a hundred more launches a step between and after the towers' graphs. CUDA only.
    "eagerloss_fused": ("auto", True, {"SEGPCL_COMPILE_LOSS": "0"}),
    # compiled_fused with inductor's C++ wrapper (SEGPCL_COMPILE_CPP_WRAPPER=1): each graph's kernel launches,
    # GEMM calls and buffer allocations run from compiled C++, not generated Python (the H200 profile: about
    # 40-50 us of host time a kernel, the forwards launch-bound). Launch costs without CUDA graphs'
    # constraints (static memory pools, a graph per shape). CUDA only.
    "cppwrapper_fused": ("auto", True, {"SEGPCL_COMPILE_CPP_WRAPPER": "1"}),
    # compiled_fused with each LoRA layer's W + s B A its own addmm (SEGPCL_COMPILE_BATCH_MERGE=0), as before
    # they were batched into one bmm per shape: 72 GEMMs a ViT-B/16 step, each with a copy of W and a memset
    # on CUDA (session 35's trace). CUDA only.
    "unbatchedmerge_fused": ("auto", True, {"SEGPCL_COMPILE_BATCH_MERGE": "0"}),
    # compiled_fused with run.tf32 (the GPU presets' setting): the fp32 text trunk's GEMMs on TF32 tensor cores
    # instead of the CUDA cores (session 35's profile: about 7 ms of an 82 ms step), its results at TF32
    # rounding (10-bit mantissa; bf16text_fused's are at bf16's 7). CUDA only.
    "tf32_fused": ("auto", True, {"SEGPCL_BENCH_TF32": "1"}),
    # the same under CUDA graphs: the step as the GPU presets would run it with mode "reduce-overhead". CUDA only.
    "tf32_cudagraphs": ("auto", True, {"SEGPCL_COMPILE_MODE": "reduce-overhead", "SEGPCL_BENCH_TF32": "1"}),
    # compiled_fused with run.precision=fp16 (a V100 / T4 user's precision): fp16 autocast, the loss scaled and
    # the gradients unscaled and checked by a GradScaler each step. CUDA only.
    "fp16_fused": ("auto", True, {"SEGPCL_BENCH_PRECISION": "fp16"}),
}
# on the CPU they would be compiled_fused again (fp32 there)
CUDA_ONLY = {"cudagraphs_fused", "bf16text_fused", "compiled_triton", "bf16text_cudagraphs", "autotune_fused",
             "autotune_cudagraphs", "staticbatch_fused", "percallcast_fused", "eagerloss_fused", "cppwrapper_fused",
             "unbatchedmerge_fused", "tf32_fused", "tf32_cudagraphs", "fp16_fused"}
SETUPS = {
    "cpu": dict(model="segpcl-tiny", n_images=int(os.environ.get("SEGPCL_BENCH_BATCH", 32)), n_old=50, n_new=10,
                precision="fp32", dtype=torch.float32, rounds=5),
    "cuda": dict(model="ViT-B-16", n_images=int(os.environ.get("SEGPCL_BENCH_BATCH", 128)), n_old=90, n_new=10,
                 precision="bf16", dtype=torch.bfloat16, rounds=20),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the ViT-B/16 bf16 row needs a GPU"))]


@pytest.fixture(scope="session")
def matmul_peak():
    """The MFU denominator, measured once per device and matmul dtype per session. With
    SEGPCL_BENCH_PEAK_FILE set (gpu_suite.sh: one pytest per variant), the first session measures and
    writes it there and the later ones read it, so every variant of a dtype has its MFU over the same peak."""
    shared = os.environ.get("SEGPCL_BENCH_PEAK_FILE")
    measured = {}
    if shared and os.path.isfile(shared):
        with open(shared) as f:
            measured = {key: float(flops) for key, flops in json.load(f).items()}

    def get(device: str, dtype: torch.dtype) -> float:
        # "cuda" alone for bf16 on the GPU and fp32 on the CPU: the key of files written before fp16 had a row
        key = device if dtype == SETUPS[device]["dtype"] else f"{device} {str(dtype).removeprefix('torch.')}"
        if key not in measured:
            measured[key] = matmul_peak_flops(device, dtype)
            if shared:
                from segpcl_fast.fileio import atomic_write_text
                atomic_write_text(shared, json.dumps(measured))
        return measured[key]
    return get


def _step_choices(step, device: str, compiled: bool) -> dict:
    """What the step ran (extra_info "ops"): ops.last_choice() sees only eager calls, so a compiled variant's
    row said lora_b_linear "merged" under SEGPCL_LORA_COMPILE=cpp too, where its graphs call the C++ op. For a
    compiled step the traced choices are asked as the trainer records them (record_compiled_choices)."""
    choices = ops.last_choice()
    if compiled:
        from segpcl_fast.ops.lora_linear import OP, lora_b_linear_impl
        trained_B = torch.empty(0, device=device, requires_grad=True)
        choices[OP] = lora_b_linear_impl(torch.empty(0, device=device), trained_B, compiling=True)
        choices.update(step.model.compiled_choices(torch.device(device)))
    return choices


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("device", DEVICES)
def test_e2e_step(benchmark, matmul_peak, monkeypatch, device, variant):
    setup = SETUPS[device]
    benchmark.group = f"e2e training step {device}"
    backend, compiled, env = VARIANTS[variant]
    if variant in CUDA_ONLY and device != "cuda":
        pytest.skip(f"{variant} is CUDA only: on {device} it would time compiled_fused again")
    if env.get("SEGPCL_LORA_COMPILE") == "cpp":
        from segpcl_fast.ops import _ext
        if not _ext.has_kernel(device):  # else the merged fallback would run, a second compiled_fused row
            pytest.skip(f"the C++ LoRA op has no {device} kernel here (build segpcl_fast._C: gpu_suite.sh's ext step)")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    torch._dynamo.reset()
    settings = CompileSettings.from_env() if compiled else None  # the variant's mode; SEGPCL_COMPILE_DYNAMIC_BATCH
    cfg = Config()
    precision = os.environ.get("SEGPCL_BENCH_PRECISION", setup["precision"])  # fp16_fused's run.precision
    cfg.run.text_precision = os.environ.get("SEGPCL_BENCH_TEXT_PRECISION", "fp32")
    cfg.run.tf32 = os.environ.get("SEGPCL_BENCH_TF32", "0") == "1"
    # run.tf32 as the trainer applies it (CUDA only), around the compiles too (inductor reads it there)
    with ops.backend(backend), cuda_matmul_tf32_for(run_tf32(cfg.run.tf32, device)) as tf32:
        step = build_step(setup["model"], device, setup["n_images"], setup["n_old"], setup["n_new"],
                          precision=precision, compile_settings=settings, cfg=cfg)

        # what the row needs besides its times, recorded before them: a run stopped in its rounds
        # (gpu_suite's step limit) still writes a JSON that summary.py can turn into a row
        counted = step_flops(step.model, step.shape)
        flops = counted["total"]
        peak = matmul_peak(device, AUTOCAST_DTYPES[precision] or torch.float32)
        benchmark.extra_info.update(
            device=device, device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
            model=setup["model"], precision=precision, compiled=compiled, batch=setup["n_images"],
            anchors=step.shape.n_anchors, classes=setup["n_old"] + setup["n_new"], step_flops=flops,
            # the text tower's share of the FLOPs, and the precision it runs in (fp32 by default: those
            # FLOPs run on fp32 kernels, yet count against the bf16 peak like the rest)
            text_flops=counted["text"], text_precision=cfg.run.text_precision,
            # whether fp32 CUDA matmuls ran on TF32 (run.tf32, or the process's own setting); None on the CPU
            tf32=tf32 if device == "cuda" else None,
            matmul_peak_tflops=round(peak / 1e12, 4), threads=torch.get_num_threads(),
            rounds_planned=setup["rounds"],
            # the image tower's graph symbolic in the batch, as training runs it (engine/compiling.py)
            dynamic_batch=settings.dynamic_batch if settings is not None else None,
            compile_backend=settings.backend if settings is not None else None,
            compile_mode=settings.mode if settings is not None else None,
            # stage 2's loss terms compiled too (engine/compiling.py: compile_learner; SEGPCL_COMPILE_LOSS)
            compile_loss=settings.loss if settings is not None else None,
            cpp_wrapper=settings.cpp_wrapper if settings is not None else None,
            # the LoRA merges batched into one bmm a shape (engine/compiling.py; SEGPCL_COMPILE_BATCH_MERGE)
            batch_merge=ops.lora_linear.batch_merge() if settings is not None else None,
            # {tower: dtype} whose frozen GEMM weights are stored in the autocast dtype (model/frozen_cast.py)
            frozen_storage={t: str(d).removeprefix("torch.") for t, d in step.model.frozen_storage.items()})

        def timed():
            loss = step()
            sync(step.device)
            return loss
        with cudagraph_skips() as skips:  # a CUDA-graph variant whose graphs all skipped is compiled_fused again
            for _ in range(3):  # warm-up (compiles), outside the counters below
                timed()
        if settings is not None and settings.mode in CUDA_GRAPH_MODES:
            benchmark.extra_info.update(cudagraph_skips=skips["count"], cudagraph_skip_reasons=skips["reasons"][:5])
        benchmark.extra_info.update(_host_syncs(step))
        before = _disturbances(device)
        skipped_before = step.skipped["fp16_skipped_steps"]
        with _gc_timer() as gc_time:
            loss = benchmark.pedantic(timed, rounds=setup["rounds"], warmup_rounds=0, iterations=1)
        after = _disturbances(device)
        if precision == "fp16":  # a skipped step does no update: the rounds' count says how many timed that
            benchmark.extra_info.update(fp16_skipped_in_warmup=skipped_before,
                                        fp16_skipped_in_rounds=step.skipped["fp16_skipped_steps"] - skipped_before)
        choices = _step_choices(step, device, compiled)
    assert torch.isfinite(loss)
    # what can make one round slow (the H200's compiled_fused had one round of 1218 ms, then one of 1441 ms,
    # among 73-96 ms ones, with no graph compiled and no allocator retry): graphs compiled, caching-allocator
    # retries (a cudaFree of its cache, with a sync), and Python's cyclic GC (a full collection walks every
    # object dynamo and inductor keep: its longest pause and total time in the rounds)
    info = dict(ops=choices, **{k: after[k] - before[k] for k in after}, **gc_time)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = stats.stats.median
        info.update(step_ms=round(median * 1e3, 3), images_per_s=round(setup["n_images"] / median, 2),
                    achieved_tflops=round(flops / median / 1e12, 4), mfu=round(flops / median / peak, 4),
                    slowest_round_ms=round(stats.stats.max * 1e3, 3))
    benchmark.extra_info.update(info)


@contextlib.contextmanager
def _gc_timer():
    """Time Python's garbage collections while inside: yields a dict that on exit holds gc_full_collections
    (generation 2), gc_ms (all collections) and gc_longest_ms."""
    found = {"gc_full_collections": 0, "gc_ms": 0.0, "gc_longest_ms": 0.0}
    started = []

    def callback(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            ms = (time.perf_counter() - started.pop()) * 1e3
            found["gc_ms"] += ms
            found["gc_longest_ms"] = max(found["gc_longest_ms"], ms)
            found["gc_full_collections"] += info.get("generation") == 2
    gc.callbacks.append(callback)
    try:
        yield found
    finally:
        gc.callbacks.remove(callback)
        found["gc_ms"], found["gc_longest_ms"] = round(found["gc_ms"], 3), round(found["gc_longest_ms"], 3)


def _host_syncs(step) -> dict:
    """CUDA only: the host syncs one step makes (torch.cuda.set_sync_debug_mode "warn": `.item()`, a
    blocking CPU -> GPU copy, a nonzero...), counted on one untimed step, with the Python lines that
    made them (host_sync_sites). Each one drains the GPU's queue: the host can no longer launch ahead."""
    if step.device.type != "cuda":
        return {}
    sync(step.device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = [f"{os.path.relpath(w.filename)}:{w.lineno}" for w in seen if "synchroniz" in str(w.message)]
    sync(step.device)
    return {"host_syncs_per_step": len(sites), "host_sync_sites": sorted(set(sites))[:10]}


def _disturbances(device: str) -> dict:
    """Counters of what can stall one step: frames dynamo compiled, caching-allocator retries (CUDA)."""
    from torch._dynamo.utils import counters
    found = {"graphs_compiled": counters["frames"]["ok"]}
    if device == "cuda":
        found["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    return found


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/test_bench_e2e.py BENCH.json [MORE.json ...]")
    from summary import e2e_table, main
    sys.exit(main(sys.argv[1:], e2e_table))  # exit 1 when no file gave a row (missing: "no such file")
