"""What the e2e benchmark's MFU numerator counts, against what the timed step executes.

    python benchmarks/flop_audit.py [--model ViT-B-16] [--images 128] [--old 90] [--new 10]

The MFU numerator is engine/flops.step_flops(count="model"): each LoRA layer as x W^T + s (x A^T) B^T,
its rank-r products included. The merged arrangement (what compiled_fused and the other "auto"
variants run under torch.compile) computes x (W + s B A)^T instead, skipping u B^T forward and g B,
(g B) A backward. This script counts both arrangements with torch's FlopCounterMode on the real step
(CPU, fp32, SDPA's math kernel; random weights) at 2 and 4 task images (+ as many anchors): FLOPs are
affine in the batch, so it extrapolates to --images and prints them next to the analytic counts,
with the text tower's share (fp32 by default, run.text_precision: counted against the bf16 peak like
the rest).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from segpcl_fast import ops
from segpcl_fast.config import Config
from segpcl_fast.engine.bench import build_step
from segpcl_fast.engine.flops import step_flops
from segpcl_fast.ops import lora_linear


@contextlib.contextmanager
def arrangement(name: str):
    """'reference': the plain-PyTorch reference ops; 'merged': backend auto with the C++ op hidden, so
    lora_b_linear takes the plain-PyTorch merged arrangement eagerly (what compile traces)."""
    has_kernel = lora_linear.has_kernel
    if name == "merged":
        lora_linear.has_kernel = lambda device: False
    try:
        with ops.backend("reference" if name == "reference" else "auto"):
            yield
    finally:
        lora_linear.has_kernel = has_kernel


def counted(model: str, n: int, n_old: int, n_new: int, name: str):
    with arrangement(name):
        step = build_step(model, "cpu", n, n_old, n_new, precision="fp32", cfg=Config())
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            step()
        assert ops.last_choice()["lora_b_linear"] == name, ops.last_choice()
    return counter.get_total_flops(), step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--old", type=int, default=90)
    parser.add_argument("--new", type=int, default=10)
    args = parser.parse_args(argv)
    executed = {}
    for name in ("reference", "merged"):
        (f2, step), (f4, _) = (counted(args.model, n, args.old, args.new, name) for n in (2, 4))
        executed[name] = f2 + (f4 - f2) // 2 * (args.images - 2)
    shape = dataclasses.replace(step.shape, n_images=args.images, n_anchors=args.images)
    model = step_flops(step.model, shape, count="model")
    analytic = step_flops(step.model, shape, count="executed")["total"]
    tera = 1e12
    print(f"{args.model}, {args.images} + {args.images} images, {args.old} + {args.new} classes, text length "
          f"{shape.text_len}")
    print(f"MFU numerator (count='model'):          {model['total'] / tera:.4f} TFLOP")
    print(f"reference ops, FlopCounterMode:         {executed['reference'] / tera:.4f} TFLOP "
          f"(analytic count='executed': {analytic / tera:.4f})")
    print(f"merged arrangement, FlopCounterMode:    {executed['merged'] / tera:.4f} TFLOP "
          f"(model / merged = {model['total'] / executed['merged']:.4f})")
    print(f"text tower: {model['text'] / tera:.4f} TFLOP, {100 * model['text'] / model['total']:.2f} % of the model count")


if __name__ == "__main__":
    main()
