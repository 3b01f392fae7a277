"""Static sm_90 resources of the knn_subgraph_kl kernels across (k, d): where the fused tiles stop
compiling without a stack frame (spills), which sets MAX_FUSED_TILE and MAX_FUSED_DIM.

    TRITON_INTERPRET=0 python benchmarks/knn_tile_limits.py [--archs 90]

No GPU needed: each launch is compiled through segpcl_fast.kernels.check_triton_build on meta tensors.
Shapes past the launchers' limits are compiled by calling the kernels directly, with the launchers'
own tile and warp rules, so the table shows why the limits sit where they do.
"""
from __future__ import annotations

import argparse

import torch

from segpcl_fast.kernels import knn_subgraph_kl as knn
from segpcl_fast.kernels._triton_utils import cdiv, next_pow2
from segpcl_fast.kernels.check_triton_build import Case, check

SHAPES = [(10, 512), (32, 1024), (64, 1024), (16, 2048), (16, 4096), (8, 4096), (4, 8192), (2, 16384)]


def _forward(k: int, d: int, dtype: torch.dtype):
    meta = torch.device("meta")
    emb, roots = torch.empty(5000, d, device=meta, dtype=dtype), torch.empty(200, dtype=torch.long, device=meta)
    nb, ref = torch.empty(200, k, dtype=torch.long, device=meta), torch.empty(200, k, device=meta)
    kl, g, g_root = torch.empty(200, device=meta), torch.empty(200, k, device=meta), torch.empty(200, d, device=meta)
    block_k, block_d = next_pow2(k), next_pow2(d)
    return lambda: knn._knn_kl_fwd_kernel[(200,)](
        emb, roots, nb, ref, kl, g, g_root, 200, k, d, d, 0.05, 1.0, ROOTS=1, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=knn.forward_warps(block_k, block_d))


def _backward(k: int, d: int, dtype: torch.dtype):
    meta = torch.device("meta")
    n_rows, n_roots = 5000, 200
    emb = torch.empty(n_rows, d, device=meta, dtype=dtype)
    plan = torch.empty(knn.plan_size(n_rows, n_roots, k), dtype=torch.long, device=meta)
    grad_kl, g, g_root = (torch.empty(s, device=meta) for s in ((n_roots,), (n_roots, k), (n_roots, d)))
    out = torch.empty(n_rows, d, device=meta, dtype=dtype)
    block_c, block_d = 4, next_pow2(d)  # the launcher's contributions_per_load default
    return lambda: knn._knn_kl_bwd_kernel[(cdiv(n_rows, 1),)](
        plan, grad_kl, 1, g_root, g, emb, out, n_rows, n_roots, k, n_roots * (k + 1), d, d, d,
        ROWS=1, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=knn.backward_warps(block_c, block_d))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="90", help="comma-separated SM versions (default 90)")
    args = parser.parse_args(argv)
    cases = []
    for k, d in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            name = f"k {k} d {d} {str(dtype).removeprefix('torch.')} (fused_fits: {knn.fused_fits(k, d)})"
            cases += [Case(f"forward {name}", _forward(k, d, dtype)), Case(f"backward {name}", _backward(k, d, dtype))]
    print("| case | sm | warps | registers | stack B a thread |\n|---|---|---|---|---|")
    for r in check(cases, [int(a) for a in args.archs.split(",")]):
        print(f"| {r.case} | {r.arch} | {r.num_warps} | {r.registers} | {r.stack_bytes} |")


if __name__ == "__main__":
    main()
