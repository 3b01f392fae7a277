"""Shared benchmark helpers: the device's measured copy bandwidth and roofline bookkeeping.

`device_bandwidth(device)` (session fixture) measures, once per session and device, a
device-to-device copy of a large buffer (best of several) and returns GB/s counting the bytes
read plus the bytes written. `record_roofline(benchmark, bytes_moved, device, bandwidth)` (or the `roofline` fixture) puts
the achieved GB/s of the op just benchmarked (bytes it must move / its median time: on CUDA its
device time from CUDA events, `device_median_ms`, else the host-timed median) and that fraction
of the measured bandwidth into benchmark.extra_info.
"""
from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

# The benchmarks time this checkout's segpcl_fast, not an installed copy: a bare `pytest benchmarks/` (README)
# puts only benchmarks/ on sys.path (no __init__.py here), so without this an install elsewhere (a non-editable
# `pip install .`, another clone's editable install) was imported and timed. Subprocesses inherit it too, as
# tests/conftest.py does for the test suite. Nothing has imported segpcl_fast before this conftest.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                          if p and p != str(ROOT)])

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_copy_bandwidth(device: str, nbytes: int | None = None, repeats: int | None = None) -> float:
    """GB/s of dst.copy_(src) on `device`, counting read + write (2 * nbytes), best of `repeats`."""
    nbytes = nbytes or (1 << 30 if device == "cuda" else 1 << 28)
    repeats = repeats or (20 if device == "cuda" else 5)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (page faults, allocator)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    return 2 * src.numel() * src.element_size() / best / 1e9


@pytest.fixture(scope="session")
def device_bandwidth():
    """device -> measured copy GB/s (read + write), measured on first use in this session."""
    measured: dict[str, float] = {}

    def get(device: str) -> float:
        if device not in measured:
            measured[device] = measure_copy_bandwidth(device)
        return measured[device]
    return get


def median_seconds(benchmark) -> float | None:
    """Median seconds per round of the benchmark just run (None when benchmarking is disabled)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    return stats.stats.median


def saved_bytes(fn, exclude=()) -> tuple:
    """(fn(), the bytes autograd holds for its backward): the distinct storages saved while fn ran,
    each counted once however many nodes save it, the storages of `exclude` (the weights) left out."""
    out, per_row, other = saved_bytes_by_rows(fn, exclude, rows=None)
    return out, per_row + other


def saved_bytes_by_rows(fn, exclude=(), rows: int | None = None) -> tuple:
    """(fn(), per-row bytes, other bytes) of what autograd holds for fn's backward (distinct storages, the
    storages of `exclude` left out): a saved tensor whose first dimension is `rows` (the batch's tokens)
    is an activation, one that is not (a weight-shaped tensor kept for the backward, such as the merged
    arrangement's W + s B A) counts under other bytes; with rows None all count as per-row."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr != 0:
            is_row = rows is None or (t.dim() > 0 and t.shape[0] == rows)
            saved[ptr] = (t.untyped_storage().nbytes(), saved.get(ptr, (0, False))[1] or is_row)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    per_row = sum(n for n, is_row in saved.values() if is_row)
    return out, per_row, sum(n for n, is_row in saved.values() if not is_row)


def device_median_ms(fn, device: str) -> float | None:
    """On CUDA, fn's device time in ms: triton.testing.do_bench's median (CUDA events around each call,
    L2 flushed before each, calls queued without a synchronize between them, so a call whose kernels
    outrun their host dispatch shows the dispatch: the small, launch-bound sizes); None on other
    devices or without triton. pytest-benchmark's own rounds are host-timed with a synchronize."""
    if device != "cuda":
        return None
    try:
        import triton.testing
    except ImportError:
        return None
    fn()  # a call of its own first: do_bench's 100 ms window gave a 50-80 ms row one or two samples
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - start) * 1e3
    rep = min(max(100.0, 20 * estimate_ms), 3000.0)  # about 20 timed calls, at most 3 s a row
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def record_roofline(benchmark, bytes_moved: int, device: str, bandwidth_gbs: float,
                    device_ms: float | None = None) -> None:
    """extra_info: bytes_moved, achieved_GBps, device_copy_GBps, fraction_of_copy_bandwidth; with
    device_ms (CUDA events, `device_median_ms`) the GB/s are over it (timing="cuda events"), else over
    the host-timed median (timing="host")."""
    benchmark.extra_info.update(bytes_moved=int(bytes_moved), device=device,
                                device_copy_GBps=round(bandwidth_gbs, 2))
    seconds = median_seconds(benchmark)
    if device_ms is not None:
        benchmark.extra_info.update(device_ms=round(device_ms, 4), timing="cuda events")
        seconds = device_ms / 1e3
    elif seconds:
        benchmark.extra_info.update(timing="host")
    if seconds:
        achieved = bytes_moved / seconds / 1e9
        benchmark.extra_info.update(achieved_GBps=round(achieved, 2),
                                    fraction_of_copy_bandwidth=round(achieved / bandwidth_gbs, 4))


@pytest.fixture(scope="session")
def roofline(device_bandwidth):
    """`roofline(benchmark, bytes_moved, device, run=None)`: record_roofline against this session's
    measured bandwidth; on CUDA `run` (the op without a synchronize) is timed with CUDA events too."""
    def record(benchmark, bytes_moved: int, device: str, run=None) -> None:
        device_ms = device_median_ms(run, device) if run is not None and median_seconds(benchmark) else None
        record_roofline(benchmark, bytes_moved, device, device_bandwidth(device), device_ms)
    return record


def out_of_memory(exc: BaseException | None) -> BaseException | None:
    """The torch.OutOfMemoryError exc is, or was raised from (`raise ... from`, as torch.compile's code wraps
    errors), None otherwise. Not an error raised while an out-of-memory one was being handled (__context__): that
    is a failure of its own."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return exc
        exc = exc.__cause__
    return None


def out_of_memory_reason(oom: BaseException) -> str:
    """Why a benchmark is skipped: the device and its memory, and the allocation that failed."""
    where = "the GPU"
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        where = f"{torch.cuda.get_device_name()} ({total / 2 ** 30:.1f} GiB)"
    first = str(oom).strip().splitlines()[0] if str(oom).strip() else type(oom).__name__
    return f"does not fit {where}: {first[:200]}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A benchmark whose tensors do not fit the GPU is skipped, naming the device and its memory, not reported
    as an error: the large kernel sizes' eager references need 20-35 GB (test_bench_kernels.py), more than an
    RTX 4090's 24 GB, and `pytest benchmarks/ --benchmark-only` should still time everything that fits."""
    try:
        return (yield)
    except Exception as exc:  # noqa: BLE001 -- anything but an out-of-memory error is raised again
        oom = out_of_memory(exc)
        if oom is None:
            raise
        reason = out_of_memory_reason(oom)
        traceback.clear_frames(exc.__traceback__)  # the test's locals: its tensors
        del oom
    # pytest keeps the error as sys.last_value (and its traceback, the test's frames) until the next test's call,
    # after that test's fixtures have allocated: dropped here, so the memory is back before the next test starts
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    pytest.skip(reason)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """After pytest-benchmark's tables (all times, by group): each fast path against what it is
    measured against (summary.py: x eager / x compiled, GB/s, time / base linear, images/s, MFU)."""
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if not b.has_error]
    if not benchmarks:
        return
    from summary import summarize
    text = summarize([b.as_dict(include_data=False) for b in benchmarks])
    if text:
        terminalreporter.write_sep("-", "segpcl_fast comparisons (benchmarks/summary.py)")
        terminalreporter.write_line(text)
