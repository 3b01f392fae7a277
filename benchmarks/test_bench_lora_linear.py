"""fwd+bwd time and saved-activation bytes of the LoRA-B-only linear.

    python -m pytest benchmarks/test_bench_lora_linear.py --benchmark-only -q

Compared, for one CLIP c_fc-sized layer (in 768 -> out 3072, r 32): the C++ op
(segpcl::lora_b_linear) in each GEMM arrangement, its merged arrangement in plain PyTorch (eager,
and compiled as the trainer runs it under run.compile), the plain-PyTorch reference, peft's LoRA
layer with lora_A frozen, peft's LoRA with A trainable (its default), and the frozen base
nn.Linear alone (eager and compiled). CPU always (fp32, N = SEGPCL_BENCH_TOKENS or 4096 tokens);
CUDA (bf16, 128 x 197 tokens) when a GPU is present.
Saved bytes (what autograd keeps for backward, the parameters excluded) go to extra_info in two parts:
activations (tensors with a row per token: u, or x) and weight-shaped tensors (the merged arrangement's
kept W + s B A, out x in whatever the batch).
Before a segpcl_* row is timed, its output and its gradients for x and B are checked against the plain-PyTorch
reference on the same tensors (within fp32 / bf16 rounding): a row never times an arrangement that computes
something else. The peft rows draw their own A (other weights) and the base linear is other work: not checked.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from conftest import saved_bytes_by_rows
from segpcl_fast.ops import dispatch
from segpcl_fast.ops.lora_linear import (extension_status, lora_b_linear, lora_b_linear_merged,
                                         lora_b_linear_reference)

N_IN, N_OUT, RANK = 768, 3072, 32
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The C++ op's GEMM arrangements (csrc/lora_b_linear_aten.cpp), environment read per call:
# segpcl_cpp: the default, merged forward and backward (y = x (W + s B A)^T + b, grad_x = g (W + s B A))
# segpcl_cpp_split: K-concatenated forward, split backward (g B and g^T u, then addmm(s gB A, g, W))
# segpcl_cpp_fused: as split, with g B and g^T u from the one rank-r CUDA kernel (CUDA only)
# segpcl_cpp_addmm: base GEMM + in-place rank-r addmm forward, split backward
VARIANTS = {"segpcl_cpp": {"SEGPCL_LORA_FWD": "merged", "SEGPCL_LORA_BWD": "merged"},
            "segpcl_cpp_split": {"SEGPCL_LORA_FWD": "concat", "SEGPCL_LORA_BWD": "split"},
            "segpcl_cpp_fused": {"SEGPCL_LORA_FWD": "concat", "SEGPCL_LORA_BWD": "fused"},
            "segpcl_cpp_addmm": {"SEGPCL_LORA_FWD": "addmm", "SEGPCL_LORA_BWD": "split"}}
# the plain-PyTorch merged arrangement with the opt-in GPU changes (ops/lora_linear.py): W + s B A by
# the Triton kernel (kernels/lora_merge.py), u and g^T u on a second CUDA stream, and both
MERGED_VARIANTS = {"segpcl_merged_triton_merge": {"SEGPCL_LORA_MERGE": "triton"},
                   "segpcl_merged_overlap": {"SEGPCL_LORA_OVERLAP": "1"},
                   "segpcl_merged_triton_merge_overlap": {"SEGPCL_LORA_MERGE": "triton", "SEGPCL_LORA_OVERLAP": "1"}}
# segpcl_triton: the fused Triton GEMMs (kernels/lora_fused.py, ops backend "triton"; bf16 on CUDA only)
CUDA_ONLY = {"segpcl_cpp_fused", *MERGED_VARIANTS, "segpcl_triton"}
# segpcl_merged: the same merged arrangement in plain PyTorch (lora_b_linear_merged), eager;
# *_compiled: torch.compile (inductor, default mode) of the layer: segpcl_compiled is what the
# trainer runs under run.compile (ops backend auto: the merged arrangement, traced by inductor),
# base_linear_compiled the frozen base nn.Linear compiled the same way.
IMPLS = [*VARIANTS, "segpcl_merged", *MERGED_VARIANTS, "segpcl_triton", "segpcl_compiled", "reference",
         "peft_A_frozen", "peft_A_trainable",
         "base_linear", "base_linear_compiled"]


def _tokens(device):
    return int(os.environ.get("SEGPCL_BENCH_TOKENS", 4096 if device == "cpu" else 128 * 197))


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def _peft_layer(base, train_A):
    import peft

    wrapper = torch.nn.Sequential()
    wrapper.add_module("fc", base)
    model = peft.get_peft_model(wrapper, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["fc"]),
                                autocast_adapter_dtype=False)
    layer = model.base_model.model.fc
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    layer.lora_A["default"].weight.requires_grad_(train_A)
    return model


def _layer(impl, device):
    dtype = _dtype(device)
    base = torch.nn.Linear(N_IN, N_OUT).to(device=device, dtype=dtype).requires_grad_(False)
    if impl == "base_linear":
        return base
    if impl == "base_linear_compiled":
        return torch.compile(base)
    if impl.startswith("peft"):
        return _peft_layer(base, train_A=impl == "peft_A_trainable")
    lora_A = (torch.randn(RANK, N_IN, device=device) / N_IN ** 0.5).to(dtype)
    lora_B = torch.nn.Parameter((torch.randn(N_OUT, RANK, device=device) * 0.02).to(dtype))
    fn = lora_b_linear_merged if impl.startswith("segpcl_merged") else \
        {"reference": lora_b_linear_reference}.get(impl, lora_b_linear)

    def forward(x):
        return fn(x, base.weight, base.bias, lora_A, lora_B, 1.0)
    layer = torch.compile(forward) if impl == "segpcl_compiled" else forward
    layer.params = [base.weight, base.bias, lora_A, lora_B]  # weights, not activations
    return layer


def _weights(layer):
    """The layer's weights: an nn.Module's parameters, or the tensors a functional layer lists in .params."""
    return list(layer.parameters()) if isinstance(layer, torch.nn.Module) else list(layer.params)


def check_before_timing(impl: str, layer, x: torch.Tensor, g: torch.Tensor) -> None:
    """A segpcl_* row's y, grad_x and grad_B against lora_b_linear_reference's on the same tensors: an
    AssertionError naming the row where they differ by more than rounding (of the reference's largest magnitude:
    1e-4 in fp32, 2e-2 in bf16 / fp16, as the merged weight W + s B A is rounded once more there)."""
    weight, bias, lora_A, lora_B = layer.params
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    wrt = [x, lora_B]
    y = layer(x)
    actual = [y, *torch.autograd.grad(y, wrt, g)]
    y_ref = lora_b_linear_reference(x, weight, bias, lora_A, lora_B, 1.0)
    expected = [y_ref, *torch.autograd.grad(y_ref, wrt, g)]
    for name, a, e in zip(("y", "grad_x", "grad_B"), actual, expected):
        e = e.detach().float()
        torch.testing.assert_close(a.detach().float(), e, rtol=10 * tol, atol=tol * float(e.abs().max()) + 1e-12,
                                   msg=lambda m: f"lora_b_linear {impl}: {name} disagrees with the reference before "
                                                 f"timing: {m}")


def _saved_bytes(layer, x) -> tuple[int, int]:
    """(activation bytes, weight-shaped bytes) autograd keeps for the layer's backward: u (N x r) or x are
    activations; the merged arrangement's kept W + s B A (out x in, whatever the batch) is weight-shaped."""
    y, activations, kept = saved_bytes_by_rows(lambda: layer(x), _weights(layer), rows=x.shape[0])
    y.sum().backward()
    return activations, kept


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_lora_linear_fwd_bwd(benchmark, impl, device, monkeypatch):
    if impl in CUDA_ONLY and device == "cpu":
        pytest.skip(f"{impl} picks a CUDA kernel or stream; on the CPU it is another row again")
    for name, value in {**VARIANTS, **MERGED_VARIANTS}.get(impl, {}).items():
        monkeypatch.setenv(name, value)
    if impl.startswith("segpcl_cpp") and not (extension_status()["built"] and
                                     (device == "cpu" or extension_status()["cuda"])):
        pytest.skip(f"segpcl_fast._C not built for {device}: {extension_status()}")
    if impl.startswith("peft"):
        if importlib.util.find_spec("peft") is None:  # installed but broken: an error, not a skip
            pytest.skip("peft is not installed (pip install -e '.[test]')")
    torch.manual_seed(0)
    layer = _layer(impl, device)
    benchmark.group = f"lora_b_linear fwd+bwd {device}"
    n = _tokens(device)
    x = torch.randn(n, N_IN, device=device, dtype=_dtype(device), requires_grad=True)
    g = torch.randn(n, N_OUT, device=device, dtype=_dtype(device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    wrt = [x] + [p for p in _weights(layer) if p.requires_grad]

    def step():  # autograd.grad, not backward: .grad would add up across rounds (an extra add per round)
        torch.autograd.grad(layer(x), wrt, g)
        sync()

    with dispatch.backend("triton" if impl == "segpcl_triton" else "auto"):
        saved, kept = _saved_bytes(layer, x)
        if impl.startswith("segpcl_cpp") or impl == "segpcl_triton":
            assert dispatch.last_choice()["lora_b_linear"] == impl.split("_")[1]
        if impl.startswith("segpcl"):
            check_before_timing(impl, layer, x, g)
        benchmark.extra_info.update(saved_activation_bytes=saved, saved_weight_shaped_bytes=kept, tokens=n, n_in=N_IN,
                                    n_out=N_OUT, rank=RANK, dtype=str(_dtype(device)), device=device)
        rounds = 15 if device == "cpu" else 50  # 5 CPU rounds flipped rankings between runs on a shared box
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=2)
