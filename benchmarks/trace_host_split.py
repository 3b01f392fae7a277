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
"""
from __future__ import annotations

import argparse
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


def host_split(events: list[dict]) -> dict:
    """{thread id: {"span_ms": ..., "events": n top-level, kind: ms, ...}} over the host events."""
    host = [e for e in events if _counted(e)]
    threads = collections.defaultdict(list)
    for e in host:
        threads[e["tid"]].append(e)
    out = {}
    for tid, es in threads.items():
        es.sort(key=lambda e: (e["ts"], -e["dur"]))
        totals, top, open_end = collections.Counter(), 0, float("-inf")
        for e in es:
            if e["ts"] >= open_end:  # not inside the last top-level event (a thread's events nest)
                totals[kind(e["name"])] += e["dur"] / 1e3
                top += 1
                open_end = e["ts"] + e["dur"]
        span = (max(e["ts"] + e["dur"] for e in es) - min(e["ts"] for e in es)) / 1e3
        out[tid] = {"span_ms": span, "events": top, **totals}
    return out


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
    split = host_split(load(args.trace))
    print("| thread | top-level events / step | span ms / step | " + " | ".join(f"{k} ms / step" for k in KINDS) + " |")
    print("|---" * (3 + len(KINDS)) + "|")
    for tid, row in sorted(split.items(), key=lambda kv: -kv[1]["span_ms"]):
        cells = " | ".join(f"{row.get(k, 0.0) / args.steps:.2f}" for k in KINDS)
        print(f"| {tid} | {row['events'] / args.steps:.0f} | {row['span_ms'] / args.steps:.1f} | {cells} |")


if __name__ == "__main__":
    main()
