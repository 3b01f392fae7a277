"""The three Triton ops vs their eager reference vs torch.compile of the reference.

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only -q

pgd_step is timed alone (it runs under no_grad); anchor_kl and knn_subgraph_kl forward +
backward (what a training step does; anchor_kl also with its loss weighted by 5, as the trainer's
eager step weights it, its size labelled "<size>, loss_x5"). Sizes: "paper" (DPGD batch of 64 3x224x224 images;
512 anchors x 1000 old classes; 200 roots x k 10 x d 512 over 1000 classes) on every device,
"large" (roofline) on CUDA only. Triton runs on CUDA only (on CPU it exists only as the
interpreter, which is for tests). extra_info holds the bytes each op must move (its inputs read
once, its outputs written once; fp32), the achieved GB/s and the fraction of the device's
measured copy bandwidth (benchmarks/conftest.py). pytest-benchmark's rounds are host-timed with a
synchronize (launch-bound ops read their dispatch cost); on CUDA each op is also timed with CUDA
events, L2 flushed between calls (extra_info device_ms, `triton.testing.do_bench`), and the GB/s
and the summary's speed-ups are over that device time.
Before a row is timed, its implementation's result (pgd_step's output; the loss and the gradient for the
losses) is checked against the eager reference on the same inputs, at the paper size (the large sizes, whose
eager reference needs 20-35 GB, are timed unchecked: tests/kernels holds the kernels at other shapes), so a
row never times a fast path that computes something else.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = ["eager_reference", "compiled_reference", "triton"]
F32 = 4

# "large" sizes move gigabytes so that device time, not the host's cost of one call, is measured: on
# the H200 (2026-12-04) one anchor_kl fwd+bwd call cost 0.85-0.98 ms at the paper size (2 MB of data) in
# every implementation, and the Triton and compiled rows of the large size of then (65536 x 1000, 8192 x
# 8000; knn 100k classes) sat at that same floor. Now: anchor_kl 3 passes of 2.1 GB that must move (1.5 ms
# at that device's copy bandwidth; 5 passes for a backward that scales a saved gradient), knn_subgraph_kl
# about 7.8 GB (1.8 ms), pgd_step 1.2 GB (0.29 ms, measured at 98 % of copy bandwidth, so already
# device-bound). Eager references need about 20-35 GB on the GPU.
PGD_SIZES = {"paper": 64, "large": 512}  # images of 3 x 224 x 224
ANCHOR_SIZES = {"paper": (512, 1000), "large": (524288, 1000), "large_wide": (65536, 8000)}
KNN_SIZES = {"paper": (1000, 200, 10, 512), "large": (2_000_000, 400_000, 10, 512)}  # classes, roots, k, d


def _skip_unsupported(impl: str, device: str, size: str) -> None:
    if impl == "triton" and device != "cuda":
        pytest.skip("Triton kernels run on CUDA only (on CPU only through the test interpreter)")
    if size.startswith("large") and device != "cuda":
        pytest.skip("roofline sizes run on a GPU only")


def _rounds(device: str) -> dict:
    return dict(rounds=3, warmup_rounds=1, iterations=1) if device == "cpu" else \
        dict(rounds=50, warmup_rounds=5, iterations=1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def check_before_timing(what: str, impl: str, size: str, actual, expected) -> None:
    """The timed implementation's outputs against the eager reference's, before any timing: an AssertionError
    naming the row where they differ by more than rounding (1e-4 of the reference's largest magnitude, or
    1e-3 relative). The callers skip the eager reference row itself, and the large sizes (module docstring),
    before computing the reference."""
    for a, e in zip(actual, expected):
        e = e.detach().float()
        scale = float(e.abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(a.detach().float(), e, rtol=1e-3, atol=1e-4 * scale + 1e-12, msg=lambda m: (
            f"{what} {impl} at the {size} size disagrees with the eager reference before timing: {m}"))


# ---------------------------------------------------------------- pgd_step

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(PGD_SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_pgd_step(benchmark, impl, size, device, roofline):
    _skip_unsupported(impl, device, size)
    benchmark.group = f"pgd_step {size} {device}"
    torch.manual_seed(0)
    shape = (PGD_SIZES[size], 3, 224, 224)
    x0 = torch.rand(shape, device=device)
    x_adv = (x0 + 0.01 * torch.randn_like(x0)).clamp(0, 1)
    grad = torch.randn_like(x0)
    per_channel = [torch.full((3,), v, device=device) for v in (1.5e-3, 8 / 255, 0.0, 1.0)]
    fn = {"eager_reference": ops.pgd_step_reference, "compiled_reference": _compiled(ops.pgd_step_reference),
          "triton": ops.pgd_step}[impl]

    def run():
        with torch.no_grad():
            return fn(x_adv, grad, x0, *per_channel)

    def step():
        run()
        sync(device)

    with ops.backend("triton" if impl == "triton" else "reference"):
        if impl != "eager_reference" and not size.startswith("large"):
            with torch.no_grad():
                check_before_timing("pgd_step", impl, size, [run()],
                                    [ops.pgd_step_reference(x_adv, grad, x0, *per_channel)])
        benchmark.pedantic(step, **_rounds(device))
        roofline(benchmark, 4 * x0.numel() * F32, device, run)
    benchmark.extra_info.update(op="pgd_step", impl=impl, size=size, shape=list(shape))


# ---------------------------------------------------------------- anchor_kl (forward + backward)

# the loss as backward's start (an incoming gradient of 1), and weighted as the trainer's eager step weights
# it (lambda_ACGD = 5): there the Triton backward scales its saved gradient in place (2 more passes)
ANCHOR_UPSTREAM = {"loss": 1.0, "loss_x5": 5.0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(ANCHOR_SIZES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("upstream", list(ANCHOR_UPSTREAM))
def test_anchor_kl_fwd_bwd(benchmark, upstream, impl, size, device, roofline):
    _skip_unsupported(impl, device, size)
    label = size if upstream == "loss" else f"{size}, {upstream}"
    benchmark.group = f"anchor_kl {label} {device}"
    weight = ANCHOR_UPSTREAM[upstream]
    torch.manual_seed(0)
    anchors, classes = ANCHOR_SIZES[size]
    student = (30 * torch.randn(anchors, classes, device=device)).requires_grad_(True)
    teacher = 30 * torch.randn(anchors, classes, device=device)
    tau = 20.0
    reference = lambda s, t: ops.anchor_kl_reference(s, t, tau)  # noqa: E731
    fn = {"eager_reference": reference, "compiled_reference": _compiled(reference),
          "triton": lambda s, t: ops.anchor_kl(s, t, tau)}[impl]

    def run():
        loss = fn(student, teacher)
        return loss, *torch.autograd.grad(loss if weight == 1.0 else weight * loss, student)

    def step():
        run()
        sync(device)

    with ops.backend("triton" if impl == "triton" else "reference"):
        if impl != "eager_reference" and not size.startswith("large"):
            loss = reference(student, teacher)
            check_before_timing("anchor_kl", impl, size, run(),
                                [loss, *torch.autograd.grad(weight * loss, student)])
        benchmark.pedantic(step, **_rounds(device))
        # must move, forward + backward: read z_S and z_T, write d loss / d z_S: 3 passes, what the Triton
        # path moves under this gradient of 1 (its backward hands the forward's dkl_dz out untouched).
        # A backward that scales a saved gradient (read, write) makes 5, as inductor's code for the
        # reference does (forward: read both; backward: read both, write). Before 2026-12-06 this counted 5
        # for every row, the Triton path then moving 5 too (BENCHMARKS.md, session 47)
        roofline(benchmark, 3 * anchors * classes * F32, device, run)
    benchmark.extra_info.update(op="anchor_kl", impl=impl, size=label, anchors=anchors, classes=classes,
                                upstream_gradient=weight)


# ---------------------------------------------------------------- knn_subgraph_kl (forward + backward)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(KNN_SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_knn_subgraph_kl_fwd_bwd(benchmark, impl, size, device, roofline):
    _skip_unsupported(impl, device, size)
    benchmark.group = f"knn_subgraph_kl {size} {device}"
    torch.manual_seed(0)
    classes, roots, k, dim = KNN_SIZES[size]
    ref_emb = F.normalize(torch.randn(classes, dim, device=device), dim=-1)
    emb = F.normalize(ref_emb + 0.3 * torch.randn_like(ref_emb), dim=-1).requires_grad_(True)
    root_idx = torch.randperm(classes, device=device)[:roots]
    neighbors = torch.randint(0, classes, (roots, k), device=device)
    log_q0 = ops.knn_reference_logprob(ref_emb, root_idx, neighbors, 0.05)
    reference = lambda e: ops.knn_subgraph_kl_reference(e, root_idx, neighbors, log_q0, 0.05)  # noqa: E731
    # as the training step calls it: its TSGR graph's indices are checked, and its backward plan built,
    # once per task (TSGRGraph.build), not per call
    plan = ops.knn_backward_plan(root_idx, neighbors, classes) if impl == "triton" else None
    fn = {"eager_reference": reference, "compiled_reference": _compiled(reference),
          "triton": lambda e: ops.knn_subgraph_kl(e, root_idx, neighbors, log_q0, 0.05, check_indices=False,
                                                  plan=plan)}[impl]

    def run():
        loss = fn(emb)
        return loss, *torch.autograd.grad(loss, emb)

    def step():
        run()
        sync(device)

    # must move: read each embedding row the graph touches once (neighbours repeat rows: counting all
    # R * (k + 1) gathers over-counted 1.68x), read log q_0 and the int64 indices, write the dense
    # (classes x d) gradient
    touched = torch.unique(torch.cat([root_idx, neighbors.reshape(-1)])).numel()
    bytes_moved = (touched * dim + roots * k + classes * dim) * F32 + roots * (k + 1) * 8
    with ops.backend("triton" if impl == "triton" else "reference"):
        if impl != "eager_reference" and not size.startswith("large"):
            loss = reference(emb)
            check_before_timing("knn_subgraph_kl", impl, size, run(), [loss, *torch.autograd.grad(loss, emb)])
        benchmark.pedantic(step, **_rounds(device))
        roofline(benchmark, bytes_moved, device, run)
    benchmark.extra_info.update(op="knn_subgraph_kl", impl=impl, size=size, classes=classes, roots=roots,
                                k=k, dim=dim, **_gathered(benchmark, classes, roots, k, dim))


def _gathered(benchmark, classes: int, roots: int, k: int, dim: int) -> dict:
    """The bytes a gather moves, every gathered row counted each time it is read (a 2 KB row of 512
    fp32 is one contiguous read; rows repeat across subgraphs, and at the large size they are spread
    over 4 GB, far beyond L2): the forward reads R (k + 1) rows and writes g and g_root, the backward
    reads g_root and R k root rows and writes the (classes x d) gradient. Against the distinct-row count
    (bytes_moved), this is the traffic a gather-and-scatter pass cannot avoid."""
    rows = roots * (k + 1) * dim + roots * k  # forward: embedding rows, log q_0
    rows += roots * k + roots * dim  # forward writes: g, g_root
    rows += roots * dim + roots * k * dim + roots * k + classes * dim  # backward: g_root, root rows, g, gradient
    gathered = rows * F32 + roots * (k + 1) * 8 * 3  # and the int64 indices and plan
    info = {"gathered_bytes": gathered}
    ms, bandwidth = benchmark.extra_info.get("device_ms"), benchmark.extra_info.get("device_copy_GBps")
    if ms and bandwidth:
        info.update(gathered_GBps=round(gathered / ms / 1e6, 2),
                    gathered_fraction_of_copy_bandwidth=round(gathered / ms / 1e6 / bandwidth, 4))
    return info
