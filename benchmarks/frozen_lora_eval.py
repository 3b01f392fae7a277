"""Evaluation time with the LoRA paths `auto` takes where B needs no gradient: the merged GEMM
(auto's choice since 397cefb) against the C++ op (backend cpp, which also computes u = x A^T).

    python benchmarks/frozen_lora_eval.py RUN_DIR [--rounds 3] [--device cpu]

RUN_DIR is a finished `segpcl-fast train` output (e.g. the default job's runs/default). Each round
re-evaluates its last checkpoint once per backend, alternating (`segpcl_fast.evaluate(run_dir,
run__ops=...)`), after one warm-up; prints each time, the medians and the accuracy, which must be
the same for both. BENCHMARKS.md has the measured numbers.
"""
from __future__ import annotations

import argparse
import statistics
import time

import segpcl_fast


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    backends = {"auto (merged GEMM where B is frozen)": "auto", "cpp (the C++ op everywhere)": "cpp"}
    segpcl_fast.evaluate(args.run_dir, run__ops="auto", run__device=args.device, run__progress=False)  # warm-up
    times = {name: [] for name in backends}
    accs = {}
    for _ in range(args.rounds):
        for name, ops in backends.items():
            start = time.perf_counter()
            out = segpcl_fast.evaluate(args.run_dir, run__ops=ops, run__device=args.device, run__progress=False)
            times[name].append(time.perf_counter() - start)
            accs[name] = out["acc"]
    for name in backends:
        print(f"{name}: {' / '.join(f'{t:.2f}' for t in times[name])} s, median {statistics.median(times[name]):.2f} s, "
              f"acc {accs[name]:.2f}")
    (auto, cpp) = (statistics.median(times[n]) for n in backends)
    print(f"auto / cpp median time: {auto / cpp:.2f}x")
    return 0 if len(set(accs.values())) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
