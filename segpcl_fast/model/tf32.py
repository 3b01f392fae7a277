"""TF32 for fp32 matmuls on CUDA (run.tf32): read and set torch's switch, whichever of its two APIs is in use.

What stays fp32 in a run with run.precision=bf16 (the text transformer unless run.text_precision=bf16,
the image projection, logits, the TSGR similarities) runs its CUDA GEMMs on the CUDA cores unless TF32
is on: in session 35's H200 profile the fp32 text trunk's GEMMs took about 7 ms of an 82 ms ViT-B/16
step (BENCHMARKS.md). TF32 rounds GEMM operands to a 10-bit mantissa (bf16 keeps 7) and accumulates
in fp32, which open_clip's training script turns on for every run.

torch has two switches for it: `torch.backends.cuda.matmul.allow_tf32` (every version) and, from
torch 2.9, `torch.backends.cuda.matmul.fp32_precision` ("tf32" / "ieee" / "none": inherit). Once the
new one is set to what the old one does not say, reading the old one raises ("mix of the legacy and
new APIs"), so the readers here read the new one where it exists, and the setter sets the legacy one
unless reading it raises (then the process uses the new API, and so does the setter).
cuDNN convolutions have their own switch (on by default in torch); it is left alone.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


def _resolved(*precisions: str) -> bool:
    """Whether the first fp32_precision that is not "none" (inherit) in a switch's chain is "tf32"."""
    return next((p for p in precisions if p != "none"), "none") == "tf32"


def cuda_matmul_tf32() -> bool:
    """Whether fp32 CUDA matmuls may use TF32 now (never raises, whichever API set it)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):  # torch >= 2.9; reads right after either API
        return _resolved(m.fp32_precision, getattr(torch.backends, "fp32_precision", "none"))
    return bool(m.allow_tf32)


def cudnn_conv_tf32() -> bool:
    """Whether fp32 cuDNN convolutions may use TF32 now (torch's default: yes); never raises."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        return _resolved(conv.fp32_precision, getattr(torch.backends.cudnn, "fp32_precision", "none"),
                         getattr(torch.backends, "fp32_precision", "none"))
    return bool(torch.backends.cudnn.allow_tf32)


def run_tf32(enabled: bool, device: torch.device | str) -> bool:
    """Whether run.tf32 sets the switch for a run on `device`: it is torch's CUDA switch, so on CUDA only."""
    return bool(enabled) and torch.device(device).type == "cuda"


def set_cuda_matmul_tf32(enabled: bool) -> Callable[[], None]:
    """Turn TF32 for fp32 CUDA matmuls on or off; returns a function that puts back what was there.
    Uses the legacy switch unless the process already set the new one (torch refuses reads of the
    legacy switch after that, and both kinds of reader work after a legacy set)."""
    m = torch.backends.cuda.matmul
    if cuda_matmul_tf32() == enabled:
        return lambda: None
    try:
        previous = m.allow_tf32
    except RuntimeError:  # the new API is in use: stay with it
        previous_precision = m.fp32_precision
        m.fp32_precision = "tf32" if enabled else "ieee"
        return lambda: setattr(m, "fp32_precision", previous_precision)
    # "none" (inherit torch.backends.fp32_precision) comes back as "none", not the "ieee" / "tf32" the
    # legacy setter leaves: a process-wide setting made later still reaches matmuls
    inherited = getattr(m, "fp32_precision", None) == "none"
    m.allow_tf32 = enabled

    def undo() -> None:
        m.allow_tf32 = previous
        if inherited:
            m.fp32_precision = "none"
    return undo


@contextlib.contextmanager
def cuda_matmul_tf32_for(enabled: bool) -> Iterator[bool]:
    """run.tf32 for a block: enabled=True turns TF32 on and gives back the previous setting after;
    enabled=False leaves torch's setting as it is (a process that turned TF32 on itself keeps it).
    Yields whether fp32 CUDA matmuls use TF32 in the block."""
    undo = set_cuda_matmul_tf32(True) if enabled else (lambda: None)
    try:
        yield cuda_matmul_tf32()
    finally:
        undo()
