"""Where a profiled step's host time goes: compiled graphs, dynamo's guards, eager ops, per thread.

    python benchmarks/trace_host_split.py TRACE.json[.gz] --steps N

Reads a torch.profiler Chrome trace (profile_e2e_step.py's trace.json.gz, `segpcl-fast profile`'s
trace.json) and, for each host thread, sums the top-level host events (those no other host event
of the thread encloses) by kind, divided by the number of profiled steps:

- compiled: torch.compile's graphs (`Torch-Compiled Region`, autograd's `CompiledFunctionBackward`);
- guards: dynamo's cache lookups before each compiled call;
- optimizer: `Optimizer.*`;
- accumulate_grad: autograd writing .grad (AccumulateGrad);
- eager: every other op (aten, our custom ops, autograd's backward of eager ops).

In a launch-bound step each of these is time the GPU may wait on; the eager share is what
compiling more of the step (engine/compiling.py) can take away. The thread's span per step is
printed too: its events cover less of it where the thread waits (the main thread in .backward()
while autograd's thread runs) or runs plain Python.

A second table counts, per thread and kind, the CUDA API calls that put work on the GPU: kernel
launches (runtime cudaLaunchKernel* for aten / cuBLAS / flash kernels, driver cuLaunchKernel* for
Triton's; the two are disjoint), memsets and memcpys, each under the top-level host event that
made it.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json


def kind(name: str) -> str:
    if name.startswith("Torch-Compiled Region") or "CompiledFunctionBackward" in name:
        return "compiled"
    if name.startswith("TorchDynamo Cache Lookup"):
        return "guards"
    if name.startswith("Optimizer."):
        return "optimizer"
    if "AccumulateGrad" in name:
        return "accumulate_grad"
    return "eager"


def _counted(e: dict) -> bool:
    """A host op, or the optimizer's range. Other record_function ranges (the trainer's
    student_forward_losses, backward, losses, ...; ProfilerStep#N) enclose ops of every kind: they are
    looked through, not counted, or a `segpcl-fast profile` trace would read as all eager."""
    if "dur" not in e or e.get("name", "").startswith("ProfilerStep#"):
        return False
    return e.get("cat") == "cpu_op" or (e.get("cat") == "user_annotation" and e["name"].startswith("Optimizer."))


def top_level(events: list[dict]) -> dict:
    """{thread id: (its counted host events, the top-level ones among them)}: a thread's events nest, so
    an event is top-level when no earlier one of its thread is still open at its start."""
    threads = collections.defaultdict(list)
    for e in events:
        if _counted(e):
            threads[e["tid"]].append(e)
    out = {}
    for tid, es in threads.items():
        es.sort(key=lambda e: (e["ts"], -e["dur"]))
        top, open_end = [], float("-inf")
        for e in es:
            if e["ts"] >= open_end:
                top.append(e)
                open_end = e["ts"] + e["dur"]
        out[tid] = (es, top)
    return out


def host_split(events: list[dict]) -> dict:
    """{thread id: {"span_ms": ..., "events": n top-level, kind: ms, ...}} over the host events."""
    out = {}
    for tid, (es, top) in top_level(events).items():
        totals = collections.Counter()
        for e in top:
            totals[kind(e["name"])] += e["dur"] / 1e3
        span = (max(e["ts"] + e["dur"] for e in es) - min(e["ts"] for e in es)) / 1e3
        out[tid] = {"span_ms": span, "events": len(top), **totals}
    return out


LAUNCHES = {"cudaLaunchKernel": "kernels", "cudaLaunchKernelExC": "kernels", "cuLaunchKernel": "kernels",
            "cuLaunchKernelEx": "kernels", "cudaMemsetAsync": "memsets", "cudaMemcpyAsync": "memcpys"}


def launches(events: list[dict]) -> dict:
    """{thread id: {(kind, what): n}}: each CUDA API call of LAUNCHES (what: kernels, memsets, memcpys)
    under the kind of the top-level host event of its thread that encloses it ("none": no host op)."""
    tops = {tid: (top, [t["ts"] for t in top]) for tid, (_, top) in top_level(events).items()}
    out: dict = collections.defaultdict(collections.Counter)
    for e in events:
        what = LAUNCHES.get(e.get("name")) if e.get("cat") in ("cuda_runtime", "cuda_driver") else None
        if what is None:
            continue
        owner = "none"
        top, starts = tops.get(e["tid"], ([], []))
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] < top[i]["ts"] + top[i]["dur"]:
            owner = kind(top[i]["name"])
        out[e["tid"]][(owner, what)] += 1
    return dict(out)


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


KINDS = ("compiled", "guards", "eager", "accumulate_grad", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--steps", type=int, required=True, help="profiled steps in the trace")
    args = parser.parse_args()
    events = load(args.trace)
    split = host_split(events)
    print("| thread | top-level events / step | span ms / step | " + " | ".join(f"{k} ms / step" for k in KINDS) + " |")
    print("|---" * (3 + len(KINDS)) + "|")
    for tid, row in sorted(split.items(), key=lambda kv: -kv[1]["span_ms"]):
        cells = " | ".join(f"{row.get(k, 0.0) / args.steps:.2f}" for k in KINDS)
        print(f"| {tid} | {row['events'] / args.steps:.0f} | {row['span_ms'] / args.steps:.1f} | {cells} |")
    counts = launches(events)
    if counts:
        owners = [*KINDS, "none"]
        print("\nGPU work put on the queue per step (kernel launches / memsets / memcpys), by the host event that made it:\n")
        print("| thread | " + " | ".join(owners) + " | all |")
        print("|---" * (2 + len(owners)) + "|")
        for tid, c in sorted(counts.items(), key=lambda kv: -sum(kv[1].values())):
            def cell(owner):
                return " / ".join(f"{sum(n for (o, w), n in c.items() if w == what and owner in (o, None)) / args.steps:.1f}"
                                  for what in ("kernels", "memsets", "memcpys"))
            print(f"| {tid} | " + " | ".join(cell(o) for o in owners) + f" | {cell(None)} |")


if __name__ == "__main__":
    main()
