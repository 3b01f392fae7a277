"""Kernel launches of one compiled training step, counted on the CPU: what a GPU host pays a step.

    python benchmarks/step_launches.py [--model segpcl-tiny] [--text-precision fp32|bf16] [--json]

Builds the e2e benchmark's step (engine/bench.py: bf16 image tower, batch 2 + 2 anchors, 5 old + 3
new classes), compiled with inductor for the CPU (the SEGPCL_COMPILE_* switches apply) with its C++ kernels recording themselves to the
profiler (inductor's cpp.enable_kernel_profile), runs 3 steps and profiles a 4th. In that step it
counts, by phase (the trainer's record_function ranges: forward + losses, backward, optimizer):

- graph kernels: the fused kernels inductor's graphs ran (graph_<n>_cpp_fused_*; Triton on a GPU);
- graph aten calls: the aten ops the graphs' code called themselves (GEMMs, attention, ...);
- eager ops: the aten ops run outside any compiled graph, by name.

Ops that launch nothing are left out: views, no-op casts, detach, allocations (an op counts when it
or an op it calls is not one of those). On a GPU each op counted is one launch or more, and an eager
one also pays the dispatcher and, in backward, an autograd node: the eager count is what compiling
more of the step removes. (inductor's generated_kernel_count, benchmarks/compiled_kernel_count.py,
counts the kernels it compiled, once per graph, not those a step runs.)
"""
from __future__ import annotations

import argparse
import collections
import json

# aten ops that launch no kernel by themselves (views, metadata, allocation, no-op casts)
NO_LAUNCH = frozenset(f"aten::{name}" for name in (
    "to", "detach", "detach_", "view", "reshape", "_reshape_alias", "_unsafe_view", "slice", "select", "t",
    "transpose", "permute", "expand", "expand_as", "as_strided", "unsqueeze", "squeeze", "narrow", "split",
    "split_with_sizes", "chunk", "unbind", "alias", "resolve_conj", "resolve_neg", "empty", "empty_strided",
    "empty_like", "lift_fresh", "contiguous", "numel", "size", "stride", "result_type", "is_same_size",
    "unflatten", "flatten", "view_as", "_local_scalar_dense_noop"))
GRAPH_MARKERS = ("Torch-Compiled Region", "CompiledFunction", "Call CompiledFxGraph")
PHASES = {"student_forward_losses": "forward", "backward": "backward", "optimizer": "optimizer"}


def _is_kernel(event) -> bool:
    """An inductor kernel's own profiler event (graph_<n>_cpp_fused_* on the CPU)."""
    return "cpp_fused" in event.name or event.name.startswith("triton_")


def _launches(event) -> bool:
    """Whether an aten op launches a kernel: it is not a NO_LAUNCH op, or an aten op it calls launches."""
    return event.name not in NO_LAUNCH or any(_launches(c) for c in event.cpu_children if c.name.startswith("aten::"))


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _phase(event, ranges) -> str:
    """The trainer range the event ran in, by its own ancestors or, on the autograd thread, by time."""
    for parent in _ancestors(event):
        if parent.name in PHASES:
            return PHASES[parent.name]
    start = event.time_range.start
    for name, (lo, hi) in ranges.items():
        if lo <= start <= hi:
            return PHASES[name]
    return "other"


def count_launches(events) -> dict:
    """{phase: {"graph_kernels": n, "graph_aten": n, "eager": n, "graph_aten_ops": {name: n},
    "eager_ops": {name: n}}} of a profile."""
    ranges = {e.name: (e.time_range.start, e.time_range.end) for e in events if e.name in PHASES}
    out: dict = {}
    for e in events:
        kernel = _is_kernel(e)
        parent = e.cpu_parent
        top_aten = e.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::"))
        if not (kernel or top_aten):
            continue
        if top_aten and not _launches(e):
            continue
        in_graph = kernel or any(any(m in p.name for m in GRAPH_MARKERS) for p in _ancestors(e))
        row = out.setdefault(_phase(e, ranges), {"graph_kernels": 0, "graph_aten": 0, "eager": 0,
                                                 "graph_aten_ops": collections.Counter(),
                                                 "eager_ops": collections.Counter()})
        if kernel:
            row["graph_kernels"] += 1
        elif in_graph:
            row["graph_aten"] += 1
            row["graph_aten_ops"][e.name.removeprefix("aten::")] += 1
        else:
            row["eager"] += 1
            row["eager_ops"][e.name.removeprefix("aten::")] += 1
    return out


def measure(model: str, text_precision: str) -> dict:
    import torch
    import torch._inductor.config as inductor_config

    from segpcl_fast.config import Config
    from segpcl_fast.engine import compiling
    from segpcl_fast.engine.bench import build_step

    torch.manual_seed(0)
    cfg = Config()
    cfg.run.text_precision = text_precision
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        step = build_step(model, "cpu", 2, 5, 3, precision="bf16", compile_settings=compiling.CompileSettings.from_env(),
                          cfg=cfg)
        for _ in range(3):
            step.run()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step.run()
    return count_launches(prof.events())


def table(model: str, text_precision: str, rows: dict) -> str:
    lines = [f"{model}, text {text_precision}: one compiled step (batch 2 + 2 anchors, 5 old + 3 new classes)", "",
             "| phase | graph kernels | graph aten calls | eager ops | eager ops by name |", "|---|---|---|---|---|"]
    order = [p for p in ("forward", "backward", "optimizer", "other") if p in rows]
    for phase in order:
        r = rows[phase]
        names = ", ".join(f"{n} {c}" for n, c in sorted(r["eager_ops"].items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"| {phase} | {r['graph_kernels']} | {r['graph_aten']} | {r['eager']} | {names} |")
    total = {k: sum(rows[p][k] for p in order) for k in ("graph_kernels", "graph_aten", "eager")}
    lines.append(f"| all | {total['graph_kernels']} | {total['graph_aten']} | {total['eager']} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="segpcl-tiny")
    parser.add_argument("--text-precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--json", action="store_true", help="print the counts as JSON too")
    args = parser.parse_args()
    rows = measure(args.model, args.text_precision)
    print(table(args.model, args.text_precision, rows))
    if args.json:
        print(json.dumps({p: {**r, "graph_aten_ops": dict(r["graph_aten_ops"]), "eager_ops": dict(r["eager_ops"])}
                          for p, r in rows.items()}))


if __name__ == "__main__":
    main()
