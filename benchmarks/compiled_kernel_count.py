"""How many kernels inductor generates for the compiled training step, on any machine.

    python benchmarks/compiled_kernel_count.py [--model ViT-B-16] [--text-precision fp32|bf16]

Builds the e2e benchmark's step (engine/bench.py: bf16 image tower, batch 2 + 2 anchors, 5 old + 3
new classes), compiles it with inductor for this machine's device, runs 2 steps and prints
`torch._inductor.metrics.generated_kernel_count` (the kernels of every graph: image tower, text
tower and loss terms, forward and backward; extern GEMM / attention calls are not kernels inductor generates) and
the two losses, once per SEGPCL_FROZEN_CAST value (model/frozen_cast.py), each in its own process.
On a GPU host each generated kernel is one launch per step: the count is what a launch-bound step
pays for. A CPU's inductor fuses with the same scheduler as a GPU's, so the counts compare; the
CPU generates C++ kernels, not Triton.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def count(model: str, text_precision: str) -> dict:
    import torch
    from torch._inductor import metrics

    from segpcl_fast.config import Config
    from segpcl_fast.engine import compiling
    from segpcl_fast.engine.bench import build_step

    torch.manual_seed(0)
    cfg = Config()
    cfg.run.text_precision = text_precision
    step = build_step(model, "cpu", 2, 5, 3, precision="bf16", compile_settings=compiling.CompileSettings(), cfg=cfg)
    metrics.reset()
    losses = [float(step.run()) for _ in range(2)]
    return {"frozen_cast": os.environ.get("SEGPCL_FROZEN_CAST") or "once",
            "frozen_storage": {t: str(d) for t, d in step.model.frozen_storage.items()},
            "kernels": metrics.generated_kernel_count, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="segpcl-tiny")
    parser.add_argument("--text-precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: this setting only
    args = parser.parse_args()
    if args.one:
        print(json.dumps(count(args.model, args.text_precision)))
        return
    print("| model | text | SEGPCL_FROZEN_CAST | kernels generated | losses (2 steps) |\n|---|---|---|---|---|")
    for value in ("once", "per_call"):
        out = subprocess.run([sys.executable, __file__, "--one", "--model", args.model, "--text-precision",
                              args.text_precision], env={**os.environ, "SEGPCL_FROZEN_CAST": value},
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"| {args.model} | {args.text_precision} | {value} | {row['kernels']} | "
              f"{', '.join(f'{v:.4f}' for v in row['losses'])} |")


if __name__ == "__main__":
    main()
