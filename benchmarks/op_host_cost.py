"""The host's side of one fused-op call, on any machine: launches and Python time, kernels stubbed out.

    python benchmarks/op_host_cost.py

At the paper's sizes a fused op's time on a GPU is what its host spends per call (BENCHMARKS.md:
about 40-50 us a launch on the H200 lease's host), not its bytes. This prints, for anchor_kl and
knn_subgraph_kl forward + backward (with the graph's plan where the op takes one, as the training
step does): the ops that would launch a kernel (allocations and views left out, a custom op counted
once) and the Python time of the call path (wrappers, custom-op dispatch, launchers, autograd) on
CPU tensors with each Triton kernel replaced by a no-op, best of 5 x 2000 calls on one thread.
"""
from __future__ import annotations

import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from segpcl_fast import ops
from segpcl_fast.ops._kernels import load_kernel

# dispatched ops that allocate or make views: no kernel runs on a GPU for them
NO_KERNEL = ("empty", "view", "expand", "unsqueeze", "squeeze", "slice", "select", "t.", "transpose", "permute",
             "detach", "alias", "as_strided", "_reshape_alias", "reshape")


class Launches(TorchDispatchMode):
    """`with Launches() as seen:` records in seen.names the dispatched ops that launch a kernel on a
    GPU (a custom op counts once). tests/kernels' `kernel_launches` fixture uses it too. A Triton
    kernel launched directly, not from inside a custom op (anchor_kl's backward scaling), is not a
    dispatched op: the stubs of this script record it as `triton.<kernel>`."""

    def __init__(self):
        super().__init__()
        self.names = []
        self.inside = 0  # > 0 while a dispatched op runs (its kernels are counted as that op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any(f".{part}" in str(func) for part in NO_KERNEL):
            self.names.append(str(func))
        self.inside += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.inside -= 1


_RECORDING: list[Launches] = []  # the Launches blocks open now (the stubs report direct launches to them)


class _NoKernel:
    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for seen in _RECORDING:
                if not seen.inside:
                    seen.names.append(f"triton.{self.name}")
        return launch


def _stub_kernels() -> None:
    for module, names in (("anchor_kl", ("_anchor_kl_kernel", "_anchor_kl_chunked_kernel", "_scale_grad_kernel")),
                          ("knn_subgraph_kl", ("_knn_kl_fwd_kernel", "_knn_kl_bwd_kernel"))):
        for name in names:
            setattr(load_kernel(module), name, _NoKernel(name))


def _best_us(fn, calls=2000, repeats=5) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # the Triton path on CPU tensors (its kernels are stubbed out)
    _stub_kernels()
    torch.set_num_threads(1)
    z_s, z_t = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    emb = torch.randn(10, 8, requires_grad=True)
    roots, neighbors = torch.arange(3), torch.randint(0, 10, (3, 4))
    log_q0 = torch.log_softmax(torch.randn(3, 4), -1)
    # the plan where this version of the op takes one (the same command then runs on older commits)
    plan = dict(plan=ops.knn_backward_plan(roots, neighbors, 10)) if hasattr(ops, "knn_backward_plan") else {}
    calls = {
        "anchor_kl fwd+bwd": lambda: torch.autograd.grad(ops.anchor_kl(z_s, z_t, 2.0), z_s),
        "knn_subgraph_kl fwd+bwd": lambda: torch.autograd.grad(
            ops.knn_subgraph_kl(emb, roots, neighbors, log_q0, 0.05, check_indices=False, **plan), emb),
    }
    print("| call | kernel launches | Python us (kernels stubbed) | launched |\n|---|---|---|---|")
    with ops.backend("triton"):
        for name, fn in calls.items():
            with Launches() as seen:
                _RECORDING.append(seen)
                fn()
                _RECORDING.remove(seen)
            print(f"| {name} | {len(seen.names)} | {_best_us(fn):.1f} | {', '.join(seen.names)} |")


if __name__ == "__main__":
    main()
