"""Host-side costs of the training step, measured on whatever device runs it.

    python benchmarks/host_probes.py gc [--model segpcl-tiny] [--steps 200]
    python benchmarks/host_probes.py guards [--model segpcl-tiny] [--filter none|<torch.compiler guard filter>]
    python benchmarks/host_probes.py anchor_gather [--device cpu|cuda] [--images 128] [--size 224] [--pool 1280]

gc: GC-tracked objects and the time of one full collection after the step is built and warmed up,
then the collections Python runs by itself over --steps steady steps (a full one would stall the
host for the first figure). guards: the guards dynamo builds for each compiled tower, by kind, and
the profiler's "TorchDynamo Cache Lookup" time per tower call; --filter compiles with one of
torch.compiler's guard filters (`skip_guard_on_all_nn_modules_unsafe`, `keep_tensor_guards_unsafe`,
...) to see what dropping those guards would save. BENCHMARKS.md, session 38.
anchor_gather: a step's anchor batch from a CPU-resident anchor cache (acgd.source=new_data / folder),
best of --steps: on cuda the old path (t[index], then pinned, then copied) against
method.anchors.gather_to_device (index_select into pinned memory, then copied), synchronised; on the
CPU, where nothing pins, the host copies alone (t[index] then a copy, against index_select into a buffer
allocated once). BENCHMARKS.md, session 50.
"""
from __future__ import annotations

import argparse
import collections
import gc
import statistics
import time

import torch

from segpcl_fast import ops
from segpcl_fast.config import Config
from segpcl_fast.engine.bench import build_step
from segpcl_fast.engine.compiling import CompileSettings


def _step(model: str, device: str, images: int, backend: str = "inductor"):
    with ops.backend("auto"):
        step = build_step(model, device, images, 10, 2, precision="fp32" if device == "cpu" else "bf16",
                          compile_settings=CompileSettings(backend=backend), cfg=Config())
        for _ in range(3):  # compiles
            step()
    return step


def _full_gc_ms(reps: int = 3) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        gc.collect(2)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def probe_gc(args) -> None:
    print(f"after the imports: {len(gc.get_objects())} tracked objects, full collection ms "
          f"{[round(t, 1) for t in _full_gc_ms()]}")
    step = _step(args.model, args.device, args.images, args.backend)
    print(f"step built and warmed up: {len(gc.get_objects())} tracked objects, full collection ms "
          f"{[round(t, 1) for t in _full_gc_ms()]}")
    pauses, started = [], {}

    def callback(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            pauses.append((info["generation"], (time.perf_counter() - started["t"]) * 1e3))
    gc.callbacks.append(callback)
    try:
        with ops.backend("auto"):
            for _ in range(args.steps):
                step()
    finally:
        gc.callbacks.remove(callback)
    for generation in (0, 1, 2):
        ms = [p for g, p in pauses if g == generation]
        print(f"{args.steps} steady steps: generation {generation} collected {len(ms)} times, "
              f"{sum(ms):.1f} ms in all, longest {max(ms, default=0.0):.1f} ms")


def probe_guards(args) -> None:
    counted = []

    def keep_all(entries):
        counted.append(collections.Counter(e.guard_type for e in entries))
        return [True] * len(entries)
    chosen = keep_all if args.filter == "none" else getattr(torch.compiler, args.filter)
    real_compile = torch.compile

    def compile_with_filter(fn=None, **kwargs):
        kwargs.pop("mode", None)  # torch.compile takes mode or options, not both ("default" here)
        kwargs["options"] = {"guard_filter_fn": chosen}
        return real_compile(fn, **kwargs)
    torch.compile = compile_with_filter
    try:
        step = _step(args.model, args.device, args.images, args.backend)
    finally:
        torch.compile = real_compile
    for i, kinds in enumerate(counted):
        print(f"compiled graph {i}: {sum(kinds.values())} guards; {kinds.most_common(6)}")
    with ops.backend("auto"), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    lookups = [e.cpu_time_total for e in prof.events() if "Cache Lookup" in e.name]
    print(f"filter {args.filter}: TorchDynamo Cache Lookup {len(lookups)} calls in {args.steps} steps, median "
          f"{statistics.median(lookups):.1f} us a call")


def probe_anchor_gather(args) -> None:
    from segpcl_fast.method.anchors import gather_to_device, host_to_device
    torch.manual_seed(0)
    pool = torch.randn(args.pool, 3, args.size, args.size)
    index = torch.randint(0, args.pool, (args.images,))
    if args.device == "cuda":
        paths = {"t[index], pinned, copied": lambda: host_to_device(pool[index], "cuda"),
                 "gather_to_device": lambda: gather_to_device(pool, index, "cuda")}
    else:
        buffer = torch.empty(args.images, 3, args.size, args.size)
        paths = {"t[index], copied": lambda: pool[index].clone(),
                 "t[index]": lambda: pool[index],
                 "index_select into a buffer": lambda: torch.index_select(pool, 0, index, out=buffer)}
    for name, fn in paths.items():
        best = float("inf")
        for _ in range(args.steps + 1):  # the first call allocates the buffers a path reuses
            start = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        print(f"{args.device} {args.images} x 3 x {args.size} x {args.size} fp32 from {args.pool}, "
              f"{torch.get_num_threads()} threads: {name} {best * 1e3:.1f} ms (best of {args.steps})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=("gc", "guards", "anchor_gather"))
    parser.add_argument("--model", default="segpcl-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=None, help="batch (gc, guards: 8; anchor_gather: 128, a paper "
                                                                   "batch's anchors)")
    parser.add_argument("--steps", type=int, default=None, help="steady steps (gc: 200, guards: 10)")
    parser.add_argument("--filter", default="none", help="guards: a torch.compiler guard filter, or none")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: the same guards, "
                                                              "no code generation)")
    parser.add_argument("--size", type=int, default=224, help="anchor_gather: image side")
    parser.add_argument("--pool", type=int, default=1280, help="anchor_gather: anchors in the cache")
    args = parser.parse_args(argv)
    args.steps = args.steps or {"gc": 200, "guards": 10, "anchor_gather": 10}[args.probe]
    args.images = args.images or (128 if args.probe == "anchor_gather" else 8)
    {"gc": probe_gc, "guards": probe_guards, "anchor_gather": probe_anchor_gather}[args.probe](args)


if __name__ == "__main__":
    main()
