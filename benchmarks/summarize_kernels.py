"""Markdown table of the kernel benchmarks in a pytest-benchmark JSON file.

    python benchmarks/summarize_kernels.py results.json

One row per (op, size, device, impl): median ms, speed-up over the eager reference and over
torch.compile of the reference, achieved GB/s and fraction of the measured copy bandwidth.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def summarize(path: str) -> str:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        sys.exit(f"{path}: no benchmark results ({type(exc).__name__}); the pytest run was stopped before "
                 "writing its JSON: give it more time (STEP_TIMEOUT / BUDGET in gpu_suite.sh)")
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "op" not in info or "impl" not in info:
            continue
        key = (info["op"], info["size"], info["device"])
        groups[key][info["impl"]] = dict(ms=bench["stats"]["median"] * 1e3, **info)
    lines = ["| op | size | device | impl | median ms | x eager | x compiled | GB/s | of copy BW |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (op, size, device), impls in sorted(groups.items()):
        eager = impls.get("eager_reference", {}).get("ms")
        compiled = impls.get("compiled_reference", {}).get("ms")
        for impl, row in sorted(impls.items()):
            ratio = lambda base: f"{base / row['ms']:.2f}" if base else "-"  # noqa: E731
            lines.append(f"| {op} | {size} | {device} | {impl} | {row['ms']:.3f} | {ratio(eager)} | "
                         f"{ratio(compiled)} | {row.get('achieved_GBps', '-')} | "
                         f"{row.get('fraction_of_copy_bandwidth', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/summarize_kernels.py BENCHMARK_JSON")
    print(summarize(sys.argv[1]))
