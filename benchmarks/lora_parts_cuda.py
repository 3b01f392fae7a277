"""Where the LoRA-B-only linear's time goes on a GPU: each GEMM/pass alone, timed with CUDA events.

    python benchmarks/lora_parts_cuda.py            # bf16, N = 128 x 197 tokens, 768 -> 3072, r 32

Prints a markdown table: median ms over 50 timed runs (after 10 warm-ups), each run on one of 4
rotating input sets so the 50 MB L2 does not hold them. Rows: the frozen base linear fwd+bwd
(the issue's 1.1x yardstick); the plain-PyTorch merged arrangement, alone and with the opt-in
SEGPCL_LORA_MERGE=triton / SEGPCL_LORA_OVERLAP=1; the fused Triton GEMMs (ops backend "triton"),
then each of its two kernels alone over a sweep of tiles and g^T u row splits; the C++ op's fwd+bwd
under SEGPCL_LORA_FWD / SEGPCL_LORA_BWD choices (merged/merged is the default); and the pieces they
are built from, with the bytes each must move over the copy bandwidth measured in the same run
(benchmarks/conftest.py's measure_copy_bandwidth; a memory floor for the memory-bound pieces). A
row that raises (a tile the GPU cannot hold, say) is printed with its error and NaN.
"""
from __future__ import annotations

import contextlib
import os
import statistics

import torch

N, N_IN, N_OUT, R = 128 * 197, 768, 3072, 32
DT = torch.bfloat16
SETS = 4


class KeepMerged(torch.autograd.Function):
    """Experiment: the merged arrangement with the forward's W + s B A kept for the backward instead of
    computed again (the C++ op computes it twice; ops.lora_linear's _MergedLoRABLinear keeps it since
    session 35, after this experiment's H200 time); what it saves is one small GEMM, what it costs is
    an out x in tensor per layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        merged = torch.addmm(weight, lora_B, lora_A, alpha=scaling)
        u = torch.nn.functional.linear(x, lora_A)
        ctx.save_for_backward(u, merged)
        ctx.scaling = scaling
        return torch.nn.functional.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad_y):
        u, merged = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_B = torch.mm(g.t(), u.reshape(-1, u.shape[-1])).mul_(ctx.scaling)  # out x r: the scale is cheap
        return grad_y @ merged, None, None, None, grad_B, None


class ConcatKeep(torch.autograd.Function):
    """Experiment: KeepMerged, and u = x A^T from the base GEMM itself: one GEMM against the stacked
    weight [W + s B A; A] ((out + r) x in) gives [y | u] (N x (out + r)); y is returned as a strided
    view of it (row stride out + r). What it saves is u's own pass over x; what it costs is a
    non-contiguous y for the next op (most take it as is, a reshape of it may copy)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        n_out, r = weight.shape[0], lora_A.shape[0]
        stacked = torch.empty(n_out + r, weight.shape[1], dtype=weight.dtype, device=weight.device)
        torch.addmm(weight, lora_B, lora_A, alpha=scaling, out=stacked[:n_out])
        stacked[n_out:].copy_(lora_A)
        bias_u = torch.cat([bias, bias.new_zeros(r)]) if bias is not None else None
        x2 = x.reshape(-1, x.shape[-1])
        yu = torch.addmm(bias_u, x2, stacked.T) if bias_u is not None else x2 @ stacked.T
        u = yu[:, n_out:]
        ctx.save_for_backward(u, stacked[:n_out])
        ctx.scaling = scaling
        return yu[:, :n_out].view(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx, grad_y):
        u, merged = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_B = torch.mm(g.t(), u).mul_(ctx.scaling)
        return grad_y @ merged, None, None, None, grad_B, None


def split_k_gtu(g, u, splits):
    """g^T u (out x r) as `splits` batched partial products over row chunks, then their sum: cuBLAS's
    own g^T u has one long K = N reduction on a small output."""
    n = g.shape[0] - g.shape[0] % splits
    parts = torch.bmm(g[:n].view(splits, n // splits, -1).transpose(1, 2), u[:n].view(splits, n // splits, -1))
    acc = torch.promote_types(g.dtype, torch.float32)
    total = parts.sum(0, dtype=acc)
    if n < g.shape[0]:
        total += (g[n:].T @ u[n:]).to(acc)
    return total.to(g.dtype)


@contextlib.contextmanager
def environment(**values):
    """Environment variables set inside, their earlier values (or absence) restored after, also on an error."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def attempt(name, fn, sets):
    """A row for a knob setting: its time, or the error it raised (a tile that does not fit the GPU's
    shared memory, say), so one setting cannot stop the rows after it."""
    try:
        return name, timed(fn, sets), None
    except Exception as exc:  # noqa: BLE001 - recorded in the table, the sweep goes on
        return f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", float("nan"), None


class _PrintedRows(list):
    """(name, median ms, bytes or None) rows, each printed as a table line when appended."""

    def __init__(self, bandwidth_gbs: float):
        super().__init__()
        self.bandwidth_gbs = bandwidth_gbs

    def append(self, row) -> None:
        super().append(row)
        name, ms, nbytes = row
        floor = f"{nbytes / self.bandwidth_gbs / 1e6:.4f}" if nbytes else ""
        print(f"| {name} | {ms:.4f} | {floor} |", flush=True)


def timed(fn, sets, warmup=10, runs=50):
    """Median device ms of fn over `runs` calls, rotating the input sets. Before each call the GPU is
    kept busy (torch.cuda._sleep) while the call is queued, so the start event fires when the GPU
    reaches the call, not when the host does: a synchronize before each start would put the host's
    dispatch of a tens-of-microseconds part inside its interval (session 38's review)."""
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    times = []
    for i in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # about 0.5 ms of GPU spin: longer than queueing the call takes
        start.record()
        fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    from conftest import measure_copy_bandwidth  # benchmarks/conftest.py (this script's folder)

    from segpcl_fast.ops.lora_linear import extension_status, lora_b_linear, lora_b_linear_merged
    assert torch.cuda.is_available() and extension_status()["cuda"], extension_status()
    dev = "cuda"
    torch.manual_seed(0)
    W = torch.randn(N_OUT, N_IN, device=dev, dtype=DT) / N_IN ** 0.5
    b = torch.randn(N_OUT, device=dev, dtype=DT)
    A = torch.randn(R, N_IN, device=dev, dtype=DT) / N_IN ** 0.5
    B = (torch.randn(N_OUT, R, device=dev, dtype=DT) * 0.02).requires_grad_()
    sets = [(torch.randn(N, N_IN, device=dev, dtype=DT, requires_grad=True),
             torch.randn(N, N_OUT, device=dev, dtype=DT)) for _ in range(SETS)]
    u = [(x.detach() @ A.T, g) for x, g in sets]

    bw = measure_copy_bandwidth(dev)  # GB/s, read + write: the pytest benchmarks' roofline yardstick
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16, N {N}, "
          f"{N_IN} -> {N_OUT}, r {R}; copy bandwidth {bw:.0f} GB/s (read + write)")
    print("| part | median ms | memory floor ms (bytes / copy BW) |\n|---|---|---|", flush=True)
    rows = _PrintedRows(bw)  # each row printed as it is measured: a step stopped at its limit keeps them

    def op_fwd_bwd(x, g):  # autograd.grad: x.grad / B.grad would add up across calls
        torch.autograd.grad(lora_b_linear(x, W, b, A, B, 1.0), (x, B), g)

    def base_fwd_bwd(x, g):
        torch.autograd.grad(torch.nn.functional.linear(x, W, b), (x,), g)

    rows.append(("base linear fwd+bwd (grad_x only)", timed(base_fwd_bwd, sets), None))

    def merged_fwd_bwd(x, g):  # the plain-PyTorch merged arrangement (what inductor traces), eager
        torch.autograd.grad(lora_b_linear_merged(x, W, b, A, B, 1.0), (x, B), g)

    def kept_fwd_bwd(x, g):
        torch.autograd.grad(KeepMerged.apply(x, W, b, A, B, 1.0), (x, B), g)
    rows.append(("plain-PyTorch merged fwd+bwd (lora_b_linear_merged, eager; W + s B A kept)",
                 timed(merged_fwd_bwd, sets), None))
    with environment(SEGPCL_LORA_MERGED_BACKWARD="recompute"):
        rows.append(("the same, W + s B A formed again in backward (SEGPCL_LORA_MERGED_BACKWARD=recompute)",
                     timed(merged_fwd_bwd, sets), None))
    rows.append(("the same, W + s B A kept for backward (experiment: KeepMerged)", timed(kept_fwd_bwd, sets), None))
    opt_in = [("W + s B A by the Triton kernel (SEGPCL_LORA_MERGE=triton)", {"SEGPCL_LORA_MERGE": "triton"}),
              ("u and g^T u on a second stream (SEGPCL_LORA_OVERLAP=1)", {"SEGPCL_LORA_OVERLAP": "1"}),
              ("both", {"SEGPCL_LORA_MERGE": "triton", "SEGPCL_LORA_OVERLAP": "1"})]
    for name, env in opt_in:
        with environment(**env):
            rows.append(attempt(f"lora_b_linear_merged, {name}", merged_fwd_bwd, sets))

    from segpcl_fast.kernels import lora_fused
    from segpcl_fast.ops import dispatch

    def fused_fwd_bwd(x, g):
        with dispatch.backend("triton"):
            torch.autograd.grad(lora_b_linear(x, W, b, A, B, 1.0), (x, B), g)
    rows.append(attempt("fused Triton GEMMs, u and g^T u in their launches (ops backend triton, kernels/lora_fused.py)",
                        fused_fwd_bwd, sets))
    # the fused kernels' tiles (block_m, block_n, block_k, warps, stages; g^T u splits default), each alone
    try:
        u_fused = [lora_fused.lora_fused_forward(x.detach(), W, b, A, B.detach(), 1.0)[1:] for x, _ in sets]
    except Exception as exc:  # noqa: BLE001 - no sweep without the kernels; the rows after it still run
        rows.append((f"fused kernels' sweep skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}",
                     float("nan"), None))
        u_fused = []
    fused_sets = [(x.detach(), g, u_, merged) for (x, g), (u_, merged) in zip(sets, u_fused)]
    tile_knobs = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                  (128, 64, 64, 4, 3)) if u_fused else ()
    for bm, bn, bk, warps, stages in tile_knobs:
        tiles = lora_fused.FusedTiles(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
        knobs = f"{bm}x{bn}x{bk}, {warps} warps, {stages} stages"
        rows.append(attempt(f"fused fwd alone (y and u), {knobs}",
                            lambda x, g, u_, m: lora_fused.lora_fused_forward(x, W, b, A, B.detach(), 1.0, tiles),
                            fused_sets))
        rows.append(attempt(f"fused bwd alone (grad_x and g^T u), {knobs}",
                            lambda x, g, u_, m: lora_fused.lora_fused_backward(g, u_, m, B.detach(), 1.0, tiles),
                            fused_sets))
    for splits in (1, 4, 16) if u_fused else ():
        tiles = lora_fused.FusedTiles(splits=splits)
        rows.append(attempt(f"fused bwd alone, default tiles, g^T u in {splits} row splits",
                            lambda x, g, u_, m: lora_fused.lora_fused_backward(g, u_, m, B.detach(), 1.0, tiles),
                            fused_sets))

    def concat_keep_fwd_bwd(x, g):
        torch.autograd.grad(ConcatKeep.apply(x, W, b, A, B, 1.0), (x, B), g)
    rows.append(("KeepMerged + u from the base GEMM ([W + s B A; A] stacked; experiment: ConcatKeep)",
                 timed(concat_keep_fwd_bwd, sets), None))
    for fwd, bwd in (("merged", "merged"), ("concat", "split"), ("concat", "fused"), ("addmm", "split"),
                     ("merged", "split"), ("concat", "merged")):
        with environment(SEGPCL_LORA_FWD=fwd, SEGPCL_LORA_BWD=bwd):
            rows.append((f"op fwd+bwd, fwd={fwd} bwd={bwd}", timed(op_fwd_bwd, sets), None))
    e = 2  # bytes per bf16 element
    xs = [(x.detach(), g) for x, g in sets]
    WB = torch.cat([W, B.detach()], 1)  # out x (in + r)
    Bd = B.detach()
    Wf, Bf, Af = W.float(), Bd.float(), A.float()
    W_stacked, b_stacked = torch.cat([W, A]), torch.cat([b, b.new_zeros(R)])
    merge_op = torch.ops.segpcl.lora_merged_weight  # registered by segpcl_fast.ops.lora_linear's import
    pieces = [
        ("W + s B A (merged weight, out x in)", lambda x, g: torch.addmm(W, Bd, A), e * 2 * N_OUT * N_IN),
        ("W + s B A, Triton kernel (kernels/lora_merge.py)", lambda x, g: merge_op(W, A, Bd, 1.0), e * 2 * N_OUT * N_IN),
        ("fwd: x W^T + b (base GEMM)", lambda x, g: torch.addmm(b, x, W.T), None),
        ("fwd: u = x A^T", lambda x, g: x @ A.T, e * (N * N_IN + N * R)),
        ("fwd: cat([x, u]) (K-concat copy)", lambda x, g: torch.cat([x, x[:, :R]], 1), e * 2 * N * (N_IN + R)),
        ("fwd: [x|u] [W|B]^T + b (K = in + r)", None, None),
        ("fwd: y += u B^T (in-place addmm)", lambda x, g: g.addmm_(x[:, :R], B.detach().T), e * 2 * N * N_OUT),
        ("bwd: g W (base grad_x GEMM)", lambda x, g: g @ W, None),
        ("bwd: g B (N x r)", lambda x, g: g @ B.detach(), e * (N * N_OUT + N * R)),
        ("bwd: g^T u (out x r)", lambda x, g: g.T @ x[:, :R], e * (N * N_OUT + N * R)),
        ("bwd: (u^T g)^T (the same product, r x out output)", lambda x, g: (x[:, :R].T @ g).T, e * (N * N_OUT + N * R)),
        ("bwd: g^T u, split-K 8 (bmm + sum)", lambda x, g: split_k_gtu(g, x[:, :R], 8), e * (N * N_OUT + N * R)),
        ("bwd: g^T u, split-K 32 (bmm + sum)", lambda x, g: split_k_gtu(g, x[:, :R], 32), e * (N * N_OUT + N * R)),
        ("merged weight: B A alone (mm, no add)", lambda x, g: Bd @ A, e * N_OUT * N_IN),
        ("merged weight: W + B A (mm, then add)", lambda x, g: W + Bd @ A, e * 3 * N_OUT * N_IN),
        ("merged weight: fp32 addmm (W, B, A in fp32)", lambda x, g: torch.addmm(Wf, Bf, Af), 4 * 2 * N_OUT * N_IN),
        ("fwd: x [W';A]^T + [b;0] (y and u in one GEMM, N x (out + r))",
         lambda x, g: torch.addmm(b_stacked, x, W_stacked.T), None),
        ("bwd: addmm(s gB A, g, W)", lambda x, g: torch.addmm(x, g, W), None),
        ("bwd: g [W|B] (g W and g B in one GEMM)", lambda x, g: g @ WB, None),
    ]
    xu = [(torch.cat([x, ug[0]], 1), g) for (x, g), ug in zip(xs, u)]
    for name, fn, nbytes in pieces:
        if fn is None:
            rows.append((name, timed(lambda z, g: torch.addmm(b, z, WB.T), xu), None))
        else:
            rows.append((name, timed(fn, xs), nbytes))


if __name__ == "__main__":
    main()
