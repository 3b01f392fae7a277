"""Markdown table of the kernel benchmarks in a pytest-benchmark JSON file (gpu_suite.sh's step).

    python benchmarks/summarize_kernels.py results.json

One row per (op, size, device, impl): median ms, speed-up over the eager reference and over
torch.compile of the reference, achieved GB/s and fraction of the measured copy bandwidth
(summary.kernel_table; `python benchmarks/summary.py` prints every table). Exit 1 when there is no
table: the file is missing ("no such file"), cut off, or holds no kernel rows.
"""
from __future__ import annotations

import sys

from summary import kernel_table, main

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/summarize_kernels.py BENCHMARK_JSON")
    sys.exit(main(sys.argv[1:], kernel_table))
