"""Knob sweep for the Triton kernels on a GPU: which anchor_kl kernel and chunk for which width.

    TRITON_INTERPRET=0 python benchmarks/tune_kernels_cuda.py      # markdown table on stdout

anchor_kl forward+backward (fp32, 8192 anchors, tau 20) for row widths around and above
SINGLE_BLOCK_COLS: the one-tile kernel (where it takes the width) and the chunked kernel at
several chunk sizes, timed with triton.testing.do_bench (median), with GB/s for the 3 passes the
op must make (read z_S, read z_T, write the gradient) against the device-to-device copy bandwidth
measured in the same run (benchmarks/conftest.py's measure_copy_bandwidth, as the pytest
benchmarks do). The defaults in segpcl_fast/kernels/anchor_kl.py (SINGLE_BLOCK_COLS, CHUNK_COLS) should be
set from this table.

A second table sweeps the one-tile kernel's rows and warps per program at ACGD's widths (old
classes: 10, 50 and 90 on CIFAR100's tasks 2, 6 and 10, 200 on ImageNet-R / CUB, 1000, 4096), beside each
variant's registers and theoretical occupancy as compiled for this GPU
(segpcl_fast.kernels.check_triton_build). The launcher's default holds a 4096-element tile per
program on 4 warps (32 elements a thread) until 2026-12-04: 80-255 registers and 12-38 % occupancy on
sm_90 by that check, and 1.3-2.8x slower than the best variant this table found on an H200 at each
width (BENCHMARKS.md). The default rule (anchor_kl.tile_rows / tile_warps) is set from it.
"""
from __future__ import annotations

import torch

ROWS = 8192
WIDTHS = (1000, 2048, 4096, 8000, 16000)
CHUNKS = (512, 1024, 2048, 4096)
TILE_WIDTHS = (10, 50, 90, 200, 1000, 4096)  # 50 / 90: CIFAR100's old classes at tasks 6 / 10, not yet measured
TILE_WARPS = (4, 8, 16)


def main():
    import triton.testing
    from conftest import measure_copy_bandwidth  # benchmarks/conftest.py (this script's folder)

    from segpcl_fast.ops._kernels import load_kernel
    k = load_kernel("anchor_kl")
    assert torch.cuda.is_available(), "needs a CUDA device"
    bw = measure_copy_bandwidth("cuda")  # GB/s, read + write: the pytest benchmarks' roofline yardstick
    print(f"device {torch.cuda.get_device_name(0)}; copy bandwidth {bw:.0f} GB/s; anchor_kl fp32, "
          f"{ROWS} rows, tau 20, kernel launch + loss/gradient pass (ms, GB/s, % of copy)")
    print("| width | kernel | ms | GB/s | % copy |\n|---|---|---|---|---|")
    torch.manual_seed(0)
    for width in WIDTHS:
        student = 30 * torch.randn(ROWS, width, device="cuda")
        teacher = student + 15 * torch.randn_like(student)
        moved = 3 * ROWS * width * 4
        variants = [("one tile", None)] if width <= k.SINGLE_BLOCK_COLS else []
        variants += [(f"chunked {c}", c) for c in CHUNKS if c <= max(width, CHUNKS[0])]
        for name, chunk in variants:
            ms = triton.testing.do_bench(lambda: k.anchor_kl_triton(student, teacher, 20.0, chunk_cols=chunk),
                                         return_mode="median")
            gbs = moved / ms / 1e6
            print(f"| {width} | {name} | {ms:.4f} | {gbs:.0f} | {100 * gbs / bw:.0f}% |")
    sweep_tile(k, bw)


def sweep_tile(k, bw):
    """The one-tile kernel at ACGD widths: rows x warps per program, time beside registers."""
    import triton.testing

    from segpcl_fast.ops._kernels import load_kernel
    check_build = load_kernel("check_triton_build")
    arch = int("".join(map(str, torch.cuda.get_device_capability())))
    print(f"\none-tile anchor_kl, fp32, {ROWS} rows, tau 20: rows and warps per program (default marked *); "
          f"registers and occupancy as compiled for sm_{arch}")
    print("| width | rows | warps | ms | GB/s | % copy | regs | occupancy |\n|---|---|---|---|---|---|---|---|")
    for width in TILE_WIDTHS:
        student = 30 * torch.randn(ROWS, width, device="cuda")
        teacher = student + 15 * torch.randn_like(student)
        moved = 3 * ROWS * width * 4
        default_rows = k.tile_rows(ROWS, width)
        default_warps = k.tile_warps(default_rows, width)
        # the default (chosen from the 2026-12-04 H200 sweep), half and twice it, and 8 times it (the
        # 2026-12-04 sweep's own variants were the rule before: a 4096-element tile, half and an eighth)
        variants = {max(1, default_rows // 2), default_rows, 2 * default_rows, 8 * default_rows}
        # up to 8192-element tiles: past that a tile spills and compiles for long (TUNE_TIMEOUT)
        for rows in sorted(r for r in variants if r * k.next_pow2(width) <= 8192):
            for warps in TILE_WARPS:
                def run(rows=rows, warps=warps):
                    return k.anchor_kl_triton(student, teacher, 20.0, rows=rows, num_warps=warps)
                try:  # Triton internals (check_triton_build's binder): a failure costs the columns, not the row
                    (compiled,) = check_build.check([check_build.Case("tile", run)], [arch])
                    usage = (f"{compiled.registers} | {compiled.occupancy:.0%}" if not compiled.problems
                             else f"n/a ({'; '.join(compiled.problems)}) | n/a")
                except Exception as exc:  # noqa: BLE001
                    usage = f"n/a ({type(exc).__name__}: {exc}) | n/a"
                ms = triton.testing.do_bench(run, return_mode="median")
                gbs = moved / ms / 1e6
                mark = "*" if (rows, warps) == (default_rows, default_warps) else ""
                print(f"| {width} | {rows}{mark} | {warps}{mark} | {ms:.4f} | {gbs:.0f} | {100 * gbs / bw:.0f}% | {usage} |")


if __name__ == "__main__":
    main()
