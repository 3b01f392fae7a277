"""Shared inputs for the lora_b_linear tests (CPU and CUDA)."""
from __future__ import annotations

import os

import pytest
import torch

from segpcl_fast.ops import lora_linear


def require_extension():
    """Fail (not skip) when segpcl_fast._C is missing, unless the build was skipped on purpose."""
    status = lora_linear.extension_status()
    if status["built"]:
        return
    if os.environ.get("SEGPCL_NO_EXT", "0") == "1":
        pytest.skip("SEGPCL_NO_EXT=1: extension not built")
    pytest.fail(f"segpcl_fast._C is not built ({status['error']}); run `python setup.py build_ext --inplace`")


def make_inputs(lead=(3, 5), n_in=24, n_out=40, rank=4, dtype=torch.float32, device="cpu", bias=True,
                seed=0):
    """x (lead..., in) and B require grad; W, b, A are frozen. B is random (not LoRA's zero init)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rand(*lead, n_in).requires_grad_()
    weight = rand(n_out, n_in, scale=n_in ** -0.5)
    b = rand(n_out) if bias else None
    lora_A = rand(rank, n_in, scale=n_in ** -0.5)
    lora_B = rand(n_out, rank, scale=0.5).requires_grad_()
    return x, weight, b, lora_A, lora_B


def forward_backward(fn, x, weight, bias, lora_A, lora_B, scaling, grad_out=None, seed=1):
    """(y, grad_x, grad_B) of fn for a fixed random grad_out."""
    y = fn(x, weight, bias, lora_A, lora_B, scaling)
    if grad_out is None:
        gen = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(y.shape, generator=gen).to(device=y.device, dtype=y.dtype)
    grad_x, grad_B = torch.autograd.grad(y, (x, lora_B), grad_out)
    return y.detach(), grad_x, grad_B


def in_place_bias_case(lead):
    """(inputs, fn, want): make_inputs(lead), a function that adds a bias to lora_b_linear's output in place
    (`y += extra`, as timm's EvaAttention adds its q/v biases), and the reference's forward_backward of the same
    out of place (scaling 0.5): an output that is a view made inside the op refuses the in-place update."""
    inputs = make_inputs(lead)
    extra = torch.randn(40)

    def with_inplace_bias(*args):
        y = lora_linear.lora_b_linear(*args)
        y += extra
        return y
    want = forward_backward(lambda *a: lora_linear.lora_b_linear_reference(*a) + extra, *inputs, 0.5)
    return inputs, with_inplace_bias, want


def upcast(tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


# (SEGPCL_LORA_FWD, SEGPCL_LORA_BWD): every GEMM arrangement the op has (csrc/README.md); the first
# is the default. The CPU runs `fused` (a CUDA kernel) as `split`.
PATHS = [("merged", "merged"), ("concat", "split"), ("concat", "fused"), ("addmm", "split")]


def set_paths(monkeypatch, fwd, bwd):
    monkeypatch.setenv("SEGPCL_LORA_FWD", fwd)
    monkeypatch.setenv("SEGPCL_LORA_BWD", bwd)


def small_update_slopes(fn, ref_fn, bscale, device="cpu"):
    """(slope of fn, slope of ref_fn): bf16, B small against W (early training); the LoRA part of the
    output, y(B) - y(0), regressed on its float64 value. 1 keeps all of it; rounding y to bf16 after
    adding the update (the reference, peft) drops part of a small one."""
    x, weight, bias, lora_A, lora_B = make_inputs((64,), 256, 384, 16, dtype=torch.bfloat16, device=device)
    x = x.detach()
    lora_B = (lora_B.detach().float() * bscale / 0.5).to(torch.bfloat16)
    zero = torch.zeros_like(lora_B)
    xd, wd, bd, ad, b_d = upcast([x, weight, bias, lora_A, lora_B])
    exact = ref_fn(xd, wd, bd, ad, b_d, 1.0) - ref_fn(xd, wd, bd, ad, 0 * b_d, 1.0)

    def slope(f):
        got = (f(x, weight, bias, lora_A, lora_B, 1.0) - f(x, weight, bias, lora_A, zero, 1.0)).double()
        return ((got * exact).sum() / (exact * exact).sum()).item()
    return slope(fn), slope(ref_fn)


def check_autocast_casts_like_linear(fn):
    """Under CPU bf16 autocast fn casts like F.linear: bf16 output close to the reference's, and
    B's gradient arrives in B's own dtype (fp32)."""
    x, weight, bias, lora_A, lora_B = make_inputs((3, 4), 32, 48, 4)
    lora_B_ref = lora_B.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, weight, bias, lora_A, lora_B, 0.5)
        y_ref = lora_linear.lora_b_linear_reference(x, weight, bias, lora_A, lora_B_ref, 0.5)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert lora_B.grad.dtype == torch.float32
    torch.testing.assert_close(lora_B.grad, lora_B_ref.grad, rtol=2e-2, atol=5e-2)
    # autocast leaves float64 alone (it cast every tensor to bf16 here, so float64 came back bf16)
    args64 = [t.detach().double() for t in (x, weight, bias, lora_A, lora_B)]
    args64[-1].requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = fn(*args64, 0.5)
        y64_ref = lora_linear.lora_b_linear_reference(*args64, 0.5)
    assert y64.dtype == y64_ref.dtype == torch.float64
    torch.testing.assert_close(y64, y64_ref)


def backward_ops(y: torch.Tensor) -> list:
    """Names of the aten ops that y.sum().backward() runs."""
    seen = []

    class _Log(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with _Log():
        y.sum().backward()
    return seen


def saved_tensors(fn, *args):
    """(fn(*args), the tensors autograd saved for backward while running it)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fn(*args)
    return y, saved


def check_saves_u_not_x(fn, x, weight, bias, lora_A, lora_B, merged_weight: bool = False):
    """fn keeps u = x A^T (and weights), never x, for its backward; with merged_weight, also one
    out x in tensor equal to W + s B A (the merged arrangement keeps it for grad_x)."""
    _, saved = saved_tensors(fn, x, weight, bias, lora_A, lora_B, 0.5)
    assert all(t.data_ptr() != x.data_ptr() for t in saved)
    activation_like = [t for t in saved if t.shape[:-1] == x.shape[:-1]]
    assert [tuple(t.shape) for t in activation_like] == [(*x.shape[:-1], lora_A.shape[0])]  # u only
    torch.testing.assert_close(activation_like[0], x.detach() @ lora_A.T)
    params = {weight.data_ptr(), lora_A.data_ptr(), lora_B.data_ptr()}
    others = [t for t in saved if t.data_ptr() not in params and t.data_ptr() != activation_like[0].data_ptr()]
    if merged_weight:
        assert len(others) == 1 and others[0].shape == weight.shape
        torch.testing.assert_close(others[0], torch.addmm(weight, lora_B, lora_A, alpha=0.5).detach())
    else:
        assert others == []
