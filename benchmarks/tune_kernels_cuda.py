"""Knob sweep for the Triton kernels on a GPU: which anchor_kl kernel and chunk for which width, and
the knn_subgraph_kl kernels' programs and warps at the large size.

    TRITON_INTERPRET=0 python benchmarks/tune_kernels_cuda.py          # anchor_kl: markdown tables on stdout
    TRITON_INTERPRET=0 python benchmarks/tune_kernels_cuda.py knn      # knn_subgraph_kl (gpu_suite's bench-knn)
    TRITON_INTERPRET=0 python benchmarks/tune_kernels_cuda.py knn --static [90]   # its variants' sm_90 resources, no GPU

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

`knn`: knn_subgraph_kl at test_bench_kernels.py's large size (2,000,000 classes x 512, 400,000 roots,
k 10, its random graph), the forward and the backward (with the graph's plan, as training passes it)
timed apart, which the pytest row (forward + backward: 11.3 ms, 16 % of copy bandwidth on the distinct
bytes, on the H200 of 2026-12-04) does not show. Each part at its default and at other programs /
warps (knn_kl_forward_triton's roots_per_program, num_warps; knn_kl_backward_triton's
contributions_per_load, rows_per_program, num_warps), with GB/s of the bytes a gather moves (every
gathered row counted each time: test_bench_kernels._gathered's count for that part) against the copy
bandwidth, and registers / spills as compiled for the device.
"""
from __future__ import annotations

import sys

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


KNN_SIZE = (2_000_000, 400_000, 10, 512)  # classes, roots, k, d: test_bench_kernels.KNN_SIZES["large"]
# the variants beside each default (forward: 1 root on 8 warps, 78 registers, 38 % occupancy on sm_90; backward:
# 4 contributions a load on 2 warps, 64 registers, 50 %), chosen by their sm_90 resources (Triton 3.8, check_triton_build,
# 2026-12-06): the forward at 4 warps (128 registers, 25 %) and at 16; two roots a program; the backward from 2 to 8
# contributions a load on 2-8 warps (2 on 4 warps: 32 registers, 100 %; 8 on 8: 58, 50 %) and two rows a program
KNN_FORWARD = [dict(num_warps=4), dict(num_warps=16), dict(roots_per_program=2, num_warps=8)]
KNN_BACKWARD = ([dict(contributions_per_load=c, num_warps=w) for c in (2, 4, 8) for w in (2, 4, 8)
                 if (c, w) != (4, 2)] + [dict(rows_per_program=2)])


def knn_problem(classes: int, roots: int, k: int, d: int, device: str = "cuda") -> dict:
    """The benchmark's random graph (seed 0) and what each part's launcher takes."""
    import torch.nn.functional as F

    from segpcl_fast.kernels import knn_subgraph_kl as knn
    torch.manual_seed(0)
    ref_emb = F.normalize(torch.randn(classes, d, device=device), dim=-1)
    emb = F.normalize(ref_emb + 0.3 * torch.randn_like(ref_emb), dim=-1)
    root_idx = torch.randperm(classes, device=device)[:roots]
    neighbors = torch.randint(0, classes, (roots, k), device=device)
    log_q0 = knn.knn_reference_logprob(ref_emb, root_idx, neighbors, 0.05)
    del ref_emb
    _, g, g_root = knn.knn_kl_forward_triton(emb, root_idx, neighbors, log_q0, 0.05, mean=True)
    return dict(emb=emb, roots=root_idx, neighbors=neighbors, log_q0=log_q0, g=g, g_root=g_root,
                grad_kl=torch.ones(roots, device=device), plan=knn.knn_backward_plan(root_idx, neighbors, classes))


def knn_runs(p: dict) -> list[tuple[str, str, object]]:
    """(part, knobs, launch) for every variant of the sweep: both parts' defaults first (a sweep stopped at its
    time limit still splits the default's time), then the variants."""
    from segpcl_fast.kernels import knn_subgraph_kl as knn

    def forward(**knobs):
        return lambda: knn.knn_kl_forward_triton(p["emb"], p["roots"], p["neighbors"], p["log_q0"], 0.05, mean=True,
                                                 **knobs)

    def backward(**knobs):
        return lambda: knn.knn_kl_backward_triton(p["grad_kl"], p["emb"], p["roots"], p["neighbors"], p["g"],
                                                  p["g_root"], p["plan"], **knobs)
    runs = [("forward", "default", forward()), ("backward", "default", backward())]
    runs += [("forward", _knobs_text(kn), forward(**kn)) for kn in KNN_FORWARD]
    runs += [("backward", _knobs_text(kn), backward(**kn)) for kn in KNN_BACKWARD]
    return runs


def _knobs_text(knobs: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in knobs.items())


def knn_gathered_bytes(classes: int, roots: int, k: int, d: int) -> dict:
    """Bytes each part moves with every gathered row counted each time it is read (test_bench_kernels._gathered,
    split): the forward reads R (k + 1) rows, log q_0 and the indices and writes kl, g and g_root; the backward
    reads the plan, g_root, R k root rows and g and writes the (classes x d) gradient."""
    f32, i64 = 4, 8
    forward = (roots * (k + 1) * d + roots * k) * f32 + roots * (k + 1) * i64 + (roots + roots * k + roots * d) * f32
    plan = classes + 1 + 2 * roots * (k + 1)
    backward = plan * i64 + (roots * d + roots * k * d + roots * k + roots + classes * d) * f32
    return {"forward": forward, "backward": backward}


def sweep_knn(bw: float) -> None:
    import triton.testing

    from segpcl_fast.ops._kernels import load_kernel
    check_build = load_kernel("check_triton_build")
    arch = int("".join(map(str, torch.cuda.get_device_capability())))
    classes, roots, k, d = KNN_SIZE
    moved = knn_gathered_bytes(*KNN_SIZE)
    p = knn_problem(*KNN_SIZE)
    print(f"\nknn_subgraph_kl, fp32, {classes} classes x {d}, {roots} roots, k {k} (random graph), forward and backward "
          f"apart; GB/s of the gathered bytes (forward {moved['forward'] / 1e9:.2f} GB, backward "
          f"{moved['backward'] / 1e9:.2f} GB); registers / spills as compiled for sm_{arch}")
    print("| part | knobs | warps | ms | GB/s | % copy | regs | spill B | occupancy |\n|---|---|---|---|---|---|---|---|---|")
    for part, knobs, run in knn_runs(p):
        usage = knn_usage(check_build, part, run, arch)
        ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")  # a launch takes milliseconds
        gbs = moved[part] / ms / 1e6
        print(f"| {part} | {knobs} | {usage[0]} | {ms:.4f} | {gbs:.0f} | {100 * gbs / bw:.0f}% | {' | '.join(usage[1:])} |",
              flush=True)


def knn_usage(check_build, part: str, run, arch: int) -> tuple[str, str, str, str]:
    """(warps, registers, spill bytes, occupancy) of the launch `run` makes, compiled for sm_`arch`; 'n/a'
    with the reason where it does not compile (Triton internals: the columns are lost, not the row)."""
    try:
        (compiled,) = check_build.check([check_build.Case(part, run)], [arch])
    except Exception as exc:  # noqa: BLE001
        return "n/a", f"n/a ({type(exc).__name__}: {exc})", "n/a", "n/a"
    if compiled.problems:
        return str(compiled.num_warps), f"n/a ({'; '.join(compiled.problems)})", "n/a", "n/a"
    return str(compiled.num_warps), str(compiled.registers), str(compiled.spill_bytes), f"{compiled.occupancy:.0%}"


def main_knn():
    from conftest import measure_copy_bandwidth  # benchmarks/conftest.py (this script's folder)
    assert torch.cuda.is_available(), "needs a CUDA device"
    bw = measure_copy_bandwidth("cuda")
    print(f"device {torch.cuda.get_device_name(0)}; copy bandwidth {bw:.0f} GB/s")
    sweep_knn(bw)


def meta_knn_problem(classes: int, roots: int, k: int, d: int) -> dict:
    """knn_problem's tensors on the meta device (shapes only): what the static check compiles for."""
    meta = dict(device="meta")
    return dict(emb=torch.empty(classes, d, **meta), roots=torch.empty(roots, dtype=torch.long, **meta),
                neighbors=torch.empty(roots, k, dtype=torch.long, **meta), log_q0=torch.empty(roots, k, **meta),
                g=torch.empty(roots, k, **meta), g_root=torch.empty(roots, d, **meta),
                grad_kl=torch.empty(roots, **meta),
                plan=torch.empty(classes + 1 + 2 * roots * (k + 1), dtype=torch.long, **meta))


def main_knn_static(arch: int = 90) -> None:
    """The sweep's variants compiled for sm_`arch` without a GPU (Triton's compiler on meta tensors): warps,
    registers, spills, occupancy; no times."""
    from segpcl_fast.ops._kernels import load_kernel
    check_build = load_kernel("check_triton_build")
    print(f"knn_subgraph_kl at {KNN_SIZE} (classes, roots, k, d), fp32, compiled for sm_{arch} (no timing)")
    print("| part | knobs | warps | regs | spill B | occupancy |\n|---|---|---|---|---|---|")
    for part, knobs, run in knn_runs(meta_knn_problem(*KNN_SIZE)):
        print(f"| {part} | {knobs} | {' | '.join(knn_usage(check_build, part, run, arch))} |")


USAGE = "usage: tune_kernels_cuda.py [anchor_kl | knn | knn --static [ARCH]]"

if __name__ == "__main__":
    args = sys.argv[1:]
    if args in ([], ["anchor_kl"]):
        main()
    elif args == ["knn"]:
        main_knn()
    elif args[:2] == ["knn", "--static"] and len(args) <= 3 and all(a.isdigit() for a in args[2:]):
        main_knn_static(*map(int, args[2:]))
    else:
        sys.exit(USAGE)
