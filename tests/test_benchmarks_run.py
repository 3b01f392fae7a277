"""Every benchmark runs once (pytest-benchmark's --benchmark-disable: each body once, no timing), so a
benchmark that breaks is a failing test here, not a surprise on a lent GPU. (Found on the H200,
2026-12-04: the LoRA benchmark read layer.parameters() of its functional layers, and 7 of its rows
failed there and on the CPU; nothing ran the benchmarks between GPU calls.)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_benchmark_runs_once():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # as users run them: the Triton rows skip on the CPU
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-disable", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout.splitlines()[-1], tail


def test_the_e2e_benchmarks_gc_timer_counts_full_collections():
    """benchmarks/test_bench_e2e.py records Python's GC pauses during the timed rounds (a suspect for
    the H200's lone 1.2-1.4 s rounds): a full collection inside must show up, none outside."""
    import gc
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from test_bench_e2e import _gc_timer
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    junk = []
    with _gc_timer() as found:
        for _ in range(3):
            junk.append([junk])  # a cycle for the collector
            gc.collect()
    gc.collect()  # after the block: not counted
    assert found["gc_full_collections"] == 3
    assert 0 < found["gc_longest_ms"] <= found["gc_ms"]


@pytest.mark.slow
@pytest.mark.parametrize("probe", [["gc", "--steps", "3"], ["guards", "--steps", "2"],
                                   ["guards", "--steps", "2", "--filter", "keep_tensor_guards_unsafe"],
                                   ["anchor_gather", "--steps", "2", "--size", "16", "--pool", "20"]])
def test_the_host_probes_run_and_report(probe):
    """benchmarks/host_probes.py (BENCHMARKS.md, session 38) on the tiny step, compiled with aot_eager:
    dynamo's guards are the same as under inductor, without the code generation."""
    import torch
    if probe[0] == "guards" and not hasattr(torch.compiler, "keep_tensor_guards_unsafe"):
        pytest.skip(f"torch {torch.__version__} has no guard filters (torch.compiler.keep_tensor_guards_unsafe)")
    proc = subprocess.run([sys.executable, "benchmarks/host_probes.py", *probe, "--backend", "aot_eager",
                           "--images", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if probe[0] == "gc":
        assert "tracked objects, full collection ms" in proc.stdout and "generation 2 collected" in proc.stdout
    elif probe[0] == "anchor_gather":
        assert [line.split(": ")[1].rsplit(" ", 5)[0] for line in proc.stdout.splitlines()] == [
            "t[index], copied", "t[index]", "index_select into a buffer"], proc.stdout
        assert proc.stdout.startswith("cpu 4 x 3 x 16 x 16 fp32 from 20, ")
    else:
        assert "Cache Lookup 6 calls in 2 steps" in proc.stdout, proc.stdout
        if "--filter" not in probe:
            assert proc.stdout.count(" guards; ") == 3  # the image tower's, the text trunk's, the loss terms'


@pytest.mark.slow
def test_compiled_kernel_count_finds_fewer_kernels_with_frozen_weights_stored(monkeypatch):
    """benchmarks/compiled_kernel_count.py (BENCHMARKS.md, session 42): the tiny model's bf16 step under
    inductor generates fewer kernels with the frozen GEMM weights stored in bf16 (model/frozen_cast.py)
    than with autocast casting them every forward, about one fewer per stored image-tower tensor."""
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from compiled_kernel_count import count
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = {}
    for value in ("once", "per_call"):
        monkeypatch.setenv("SEGPCL_FROZEN_CAST", value)
        torch._dynamo.reset()
        rows[value] = count("segpcl-tiny", "fp32")
    torch._dynamo.reset()
    assert rows["once"]["frozen_storage"] == {"visual": "torch.bfloat16"} and rows["per_call"]["frozen_storage"] == {}
    # (46 fewer before the LoRA merges were batched, 29 since: per call, inductor now folds a merge's
    # weight cast into the merge's own kernel, so storing in bf16 saves less there)
    assert 20 <= rows["per_call"]["kernels"] - rows["once"]["kernels"] <= 60, rows


def test_trace_host_split_sums_top_level_host_events_by_kind(tmp_path):
    """benchmarks/trace_host_split.py on a hand-made trace: nested events count once, in their
    top-level event's kind; record_function ranges (the trainer's, ProfilerStep) are looked through
    (a `segpcl-fast profile` trace read as all eager); device events are left out; each thread apart."""
    import gzip
    import json
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from trace_host_split import host_split, launches, load
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    events = [
        {"cat": "user_annotation", "tid": 1, "ts": 0, "dur": 7000, "name": "student_forward_losses"},  # looked through
        {"cat": "cpu_op", "tid": 1, "ts": 0, "dur": 9500, "name": "ProfilerStep#3"},  # looked through
        {"cat": "cpu_op", "tid": 1, "ts": 0, "dur": 5000, "name": "Torch-Compiled Region: 0/0"},
        {"cat": "cpu_op", "tid": 1, "ts": 100, "dur": 800, "name": "aten::mm"},  # inside the graph's call
        {"cat": "cpu_op", "tid": 1, "ts": 5000, "dur": 300, "name": "TorchDynamo Cache Lookup"},
        {"cat": "cpu_op", "tid": 1, "ts": 6000, "dur": 700, "name": "aten::div"},
        {"cat": "cpu_op", "tid": 1, "ts": 6100, "dur": 200, "name": "aten::copy_"},  # inside aten::div
        {"cat": "user_annotation", "tid": 1, "ts": 8000, "dur": 1000, "name": "Optimizer.step#SGD.step"},
        {"cat": "kernel", "tid": 7, "ts": 0, "dur": 9000, "name": "gemm"},  # a device event
        {"cat": "cpu_op", "tid": 2, "ts": 1000, "dur": 2000,
         "name": "autograd::engine::evaluate_function: CompiledFunctionBackward"},
        {"cat": "cpu_op", "tid": 2, "ts": 3000, "dur": 400,
         "name": "autograd::engine::evaluate_function: torch::autograd::AccumulateGrad"},
        {"cat": "cpu_op", "tid": 2, "ts": 3500, "dur": 600, "name": "autograd::engine::evaluate_function: DivBackward0"},
    ]
    events += [  # CUDA API calls, attributed to the top-level host event enclosing them on their thread
        {"cat": "cuda_driver", "tid": 1, "ts": 200, "dur": 5, "name": "cuLaunchKernel"},  # in the graph (Triton)
        {"cat": "cuda_runtime", "tid": 1, "ts": 300, "dur": 5, "name": "cudaLaunchKernel"},  # in the graph's aten::mm
        {"cat": "cuda_runtime", "tid": 1, "ts": 310, "dur": 5, "name": "cudaMemsetAsync"},
        {"cat": "cuda_runtime", "tid": 1, "ts": 6200, "dur": 5, "name": "cudaMemcpyAsync"},  # aten::div's copy_
        {"cat": "cuda_runtime", "tid": 1, "ts": 6300, "dur": 5, "name": "cudaLaunchKernelExC"},  # aten::div
        {"cat": "cuda_runtime", "tid": 1, "ts": 9600, "dur": 5, "name": "cudaLaunchKernel"},  # outside any host op
        {"cat": "cuda_runtime", "tid": 1, "ts": 400, "dur": 5, "name": "cudaGetErrorString"},  # not GPU work
        {"cat": "cuda_runtime", "tid": 2, "ts": 3100, "dur": 5, "name": "cudaLaunchKernel"},  # AccumulateGrad
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    counts = launches(load(str(path)))
    assert counts == {1: {("compiled", "kernels"): 2, ("compiled", "memsets"): 1, ("eager", "memcpys"): 1,
                          ("eager", "kernels"): 1, ("none", "kernels"): 1},
                      2: {("accumulate_grad", "kernels"): 1}}, counts
    split = host_split(load(str(path)))
    assert set(split) == {1, 2}
    assert split[1] == {"span_ms": 9.0, "events": 4, "compiled": 5.0, "guards": 0.3, "eager": 0.7, "optimizer": 1.0}
    assert split[2] == {"span_ms": 3.1, "events": 3, "compiled": 2.0, "accumulate_grad": 0.4, "eager": 0.6}
    proc = subprocess.run([sys.executable, "benchmarks/trace_host_split.py", str(path), "--steps", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "| 1 | 2 | 4.5 | 2.50 | 0.15 | 0.35 | 0.00 | 0.50 |" in proc.stdout, proc.stdout
    # per step (2 steps): compiled 2 kernels, 1 memset; eager 1 kernel, 1 memcpy; none 1 kernel
    assert ("| 1 | 1.0 / 0.5 / 0.0 | 0.0 / 0.0 / 0.0 | 0.5 / 0.0 / 0.5 | 0.0 / 0.0 / 0.0 | 0.0 / 0.0 / 0.0 | "
            "0.5 / 0.0 / 0.0 | 2.0 / 0.5 / 0.5 |") in proc.stdout, proc.stdout


def test_step_launches_counts_graph_kernels_graph_gemms_and_eager_ops_apart():
    """benchmarks/step_launches.py on a hand-built step: an eager multiply and a view before a compiled
    GEMM + ReLU + sum, in the trainer's forward range. The multiply counts as one eager op, the view as
    nothing, the GEMM as a graph aten call and the fused ReLU + sum as graph kernels."""
    import torch
    import torch._inductor.config as inductor_config
    from torch.autograd.profiler import record_function
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from step_launches import count_launches
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    torch._dynamo.reset()
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    graph = torch.compile(lambda a, b: (a @ b).relu().sum(), backend="inductor")
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        graph(x, w)  # compiled outside the profile
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with record_function("student_forward_losses"):
                graph((x * 2).view(8, 16), w)
    torch._dynamo.reset()
    rows = count_launches(prof.events())
    assert set(rows) == {"forward"}, rows
    forward = rows["forward"]
    assert forward["eager_ops"] == {"mul": 1} and forward["eager"] == 1
    assert forward["graph_aten_ops"] == {"mm": 1} and forward["graph_kernels"] >= 1


def test_the_fp16_dpgd_gradient_script_shows_plain_fp16_flushing_what_the_scaled_path_keeps():
    """benchmarks/fp16_dpgd_gradient.py (BENCHMARKS.md, session 50) on the tiny model at s = 300, where the
    anchors' CE gradient is small: plain fp16 zeroes many pixels' gradients, the norm-2^8 path none."""
    proc = subprocess.run([sys.executable, "benchmarks/fp16_dpgd_gradient.py", "--model", "segpcl-tiny", "--scale",
                           "300", "--anchors", "6"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split(":")[0]: line for line in proc.stdout.splitlines() if line.startswith("fp16 ")}
    assert list(rows) == ["fp16 plain", "fp16 norm 1", "fp16 norm 2^8"], proc.stdout
    zero = {how: float(line.split("zero ")[1].split(",")[0]) for how, line in rows.items()}
    sign = {how: float(line.split("fp32's sign ")[1].split(",")[0]) for how, line in rows.items()}
    assert zero["fp16 plain"] > 0.3 and zero["fp16 norm 2^8"] == 0.0 and sign["fp16 norm 2^8"] > 0.99, proc.stdout


def test_a_benchmark_out_of_gpu_memory_is_skipped_naming_the_device_and_other_errors_still_fail(tmp_path):
    """benchmarks/conftest.py: an out-of-memory error (raised, or the cause of another, as torch.compile's code
    wraps it) skips its benchmark with the allocation that failed; any other error fails as before."""
    import shutil
    shutil.copy(ROOT / "benchmarks" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_oom.py").write_text(
        "import weakref\n"
        "import pytest\n"
        "import torch\n"
        "OOM = 'CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has a total capacity of 23.6 GiB'\n"
        "def test_raised():\n"
        "    raise torch.cuda.OutOfMemoryError(OOM)\n"
        "def test_wrapped():\n"
        "    try:\n"
        "        raise torch.OutOfMemoryError(OOM)\n"
        "    except torch.OutOfMemoryError as e:\n"
        "        raise RuntimeError('backend compiler failed') from e\n"
        "def test_other_error():\n"
        "    raise RuntimeError('a real bug')\n"
        "def test_fails_while_handling_an_oom():\n"
        "    try:\n"
        "        raise torch.OutOfMemoryError(OOM)\n"
        "    except torch.OutOfMemoryError:\n"
        "        assert False, 'a check after the fallback'\n"
        "REFS = []\n"
        "def test_holds_a_tensor_then_runs_out():\n"
        "    held = torch.ones(4)\n"
        "    REFS.append(weakref.ref(held))\n"
        "    raise torch.cuda.OutOfMemoryError(OOM)\n"
        "@pytest.fixture\n"
        "def freed_before_this_test():\n"
        "    return REFS[0]() is None\n"
        "def test_its_tensor_is_freed_before_the_next_test(freed_before_this_test):\n"
        "    assert freed_before_this_test\n"
        "def test_passes():\n"
        "    assert torch.ones(1).item() == 1\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-q", "-rfs", "-p", "no:cacheprovider"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert "2 failed, 2 passed, 3 skipped" in out, out[-3000:]
    assert "SKIPPED [3] conftest.py" in out  # the out-of-memory tests, one reason:
    assert "does not fit the GPU: CUDA out of memory. Tried to allocate 8.00 GiB" in out, out[-3000:]
    assert "FAILED test_oom.py::test_other_error - RuntimeError: a real bug" in out
    assert "FAILED test_oom.py::test_fails_while_handling_an_oom - AssertionError" in out  # not a skip


def test_a_bare_pytest_of_the_benchmarks_imports_this_checkout(tmp_path):
    """README runs `pytest benchmarks/ --benchmark-only` (no `python -m`): pytest then puts only benchmarks/ on
    sys.path, and an installed segpcl_fast elsewhere (a non-editable install, another clone's editable one) was
    the one imported and timed. benchmarks/conftest.py puts this checkout first: a shadowing package on
    PYTHONPATH, which has no ops, must not be what the benchmark files import."""
    shadow = tmp_path / "shadow" / "segpcl_fast"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the shadowing segpcl_fast was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "shadow"))
    # `pytest` as its console script runs it: the working folder (here not the checkout) on sys.path, no -m
    code = ("import sys, pytest; sys.exit(pytest.main([sys.argv[1], '--collect-only', '-q', '-p', 'no:cacheprovider']))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks" / "test_bench_kernels.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "shadowing" not in proc.stdout + proc.stderr


class _FakeBenchmark:
    """What the kernel benchmarks use of pytest-benchmark's fixture: pedantic() runs the round once."""
    def __init__(self):
        self.extra_info, self.timed, self.stats = {}, 0, None

    def pedantic(self, fn, **kwargs):
        self.timed += 1
        return fn()


@pytest.mark.parametrize("op", ["pgd_step", "anchor_kl", "knn_subgraph_kl"])
def test_a_kernel_benchmark_row_is_checked_against_the_eager_reference_before_it_is_timed(monkeypatch, op):
    """benchmarks/test_bench_kernels.py timed each row without looking at what it computed: a compiled (or Triton)
    row that gave another result was timed and compared as if it did the same work. A wrong row now fails before
    its first timed round; a right one is timed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import test_bench_kernels as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    call = {"pgd_step": lambda b: bench.test_pgd_step(b, "compiled_reference", "paper", "cpu", lambda *a: None),
            "anchor_kl": lambda b: bench.test_anchor_kl_fwd_bwd(b, "loss_x5", "compiled_reference", "paper", "cpu",
                                                               lambda *a: None),
            "knn_subgraph_kl": lambda b: bench.test_knn_subgraph_kl_fwd_bwd(b, "compiled_reference", "paper", "cpu",
                                                                           lambda *a: None)}[op]
    wrong = {"pgd_step": lambda fn: (lambda x, g, x0, *pc: x.clone()),  # no step taken
             "anchor_kl": lambda fn: (lambda s, t: 1.01 * fn(s, t)),
             "knn_subgraph_kl": lambda fn: (lambda e: fn(e) + 0.05 * e.sum())}[op]
    monkeypatch.setattr(bench, "_compiled", wrong)
    benchmark = _FakeBenchmark()
    with pytest.raises(AssertionError, match=f"{op} compiled_reference at the paper size disagrees with the eager "
                                             "reference before timing"):
        call(benchmark)
    assert benchmark.timed == 0
    monkeypatch.setattr(bench, "_compiled", lambda fn: fn)  # the same computation: checked, then timed
    benchmark = _FakeBenchmark()
    call(benchmark)
    assert benchmark.timed == 1


def test_a_lora_benchmark_row_is_checked_against_the_reference_before_it_is_timed(monkeypatch):
    """benchmarks/test_bench_lora_linear.py timed each arrangement without comparing what it computed with the
    reference: a merged arrangement that dropped the LoRA update (the frozen base's work) would have read as a
    LoRA layer at the base linear's cost. A wrong row now fails before its first timed round."""
    import importlib.util
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # benchmarks/conftest.py sets it: restored
    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "benchmarks" / "conftest.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    monkeypatch.setitem(sys.modules, "conftest", helpers)  # the benchmark's `from conftest import ...`
    monkeypatch.delitem(sys.modules, "test_bench_lora_linear", raising=False)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import test_bench_lora_linear as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setenv("SEGPCL_BENCH_TOKENS", "64")

    merged = bench.lora_b_linear_merged

    def without_the_update(x, weight, bias, lora_A, lora_B, scaling):
        return merged(x, weight, bias, lora_A, 0 * lora_B, scaling)
    monkeypatch.setattr(bench, "lora_b_linear_merged", without_the_update)
    benchmark = _FakeBenchmark()
    with pytest.raises(AssertionError, match="lora_b_linear segpcl_merged: y disagrees with the reference before timing"):
        bench.test_lora_linear_fwd_bwd(benchmark, "segpcl_merged", "cpu", monkeypatch)
    assert benchmark.timed == 0
    monkeypatch.setattr(bench, "lora_b_linear_merged", merged)  # the real arrangement: checked, then timed
    benchmark = _FakeBenchmark()
    bench.test_lora_linear_fwd_bwd(benchmark, "segpcl_merged", "cpu", monkeypatch)
    assert benchmark.timed == 1
