"""What the other lora_b_linear tests leave open (found by a mutation audit): the CPU backward's
row blocks (every other test fits in one block), the C++ argument checks the GEMMs would not
catch (a broadcastable bias, mixed dtypes), non-contiguous operands, the fake kernels in bf16, and
has_kernel's per-device answer."""
from __future__ import annotations

import types

import pytest
import torch

from segpcl_fast.ops import _ext, dispatch
from segpcl_fast.ops.lora_linear import lora_b_linear, lora_b_linear_reference

from lora_cases import PATHS, make_inputs, require_extension, set_paths, upcast

CPU_PATHS = [p for p in PATHS if p[1] != "fused"]


@pytest.fixture
def cpp():
    require_extension()
    with dispatch.backend("cpp"):
        yield


# out = 1024: blocks of 4 MB / (1024 * 4 B) = 1024 rows, so 1100 rows are a full block and a ragged
# one; out = 16384 hits the 64-row floor: 150 rows are blocks of 64, 64 and 22.
BLOCK_SHAPES = [((1100,), 8, 1024, 4), ((3, 50), 6, 16384, 2)]


@pytest.mark.parametrize("lead,n_in,n_out,rank", BLOCK_SHAPES)
@pytest.mark.parametrize("paths", CPU_PATHS, ids=["-".join(p) for p in CPU_PATHS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_over_several_row_blocks(lead, n_in, n_out, rank, paths, dtype, cpp, monkeypatch):
    set_paths(monkeypatch, *paths)
    x, weight, bias, lora_A, lora_B = make_inputs(lead, n_in, n_out, rank, dtype=dtype, seed=3)
    y = lora_b_linear(x, weight, bias, lora_A, lora_B, 0.75)
    assert dispatch.last_choice()["lora_b_linear"] == "cpp"
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    g[-1] *= 3.0  # the last rows (the ragged block) differ from the first ones
    gx, gB = torch.autograd.grad(y, (x, lora_B), g)
    xd, wd, bd, ad, b_d = upcast([x, weight, bias, lora_A, lora_B])
    yd = lora_b_linear_reference(xd, wd, bd, ad, b_d, 0.75)
    gxd, gBd = torch.autograd.grad(yd, (xd, b_d), g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2

    def close(got, want):  # relative to the largest entry: out = 16384 sums long fp32 dot products
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=tol)

    close(y, yd.detach())
    close(gx, gxd)
    close(gB, gBd)
    # the backward op on its own, each gradient alone
    u = (x.detach().reshape(-1, n_in).double() @ lora_A.double().T).to(dtype).reshape(*lead, rank)
    gx_only, empty = torch.ops.segpcl.lora_b_linear_bwd(g, u, weight, lora_A, lora_B.detach(), 0.75, True, False)
    empty2, gB_only = torch.ops.segpcl.lora_b_linear_bwd(g, u, weight, lora_A, lora_B.detach(), 0.75, False, True)
    assert empty.numel() == 0 and empty2.numel() == 0
    close(gx_only, gxd)
    close(gB_only, 0.75 * g.double().reshape(-1, n_out).T @ u.double().reshape(-1, rank))


@pytest.mark.parametrize("paths", CPU_PATHS, ids=["-".join(p) for p in CPU_PATHS])
def test_non_contiguous_operands(paths, cpp, monkeypatch):
    set_paths(monkeypatch, *paths)
    x, weight, bias, lora_A, lora_B = make_inputs((4, 6), 24, 40, 4, seed=5)
    x_nc = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (4, 6, 24), strided
    w_nc = weight.T.contiguous().T
    a_nc = lora_A.T.contiguous().T
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or a_nc.is_contiguous())
    y = lora_b_linear(x_nc, w_nc, bias, a_nc, lora_B, 1.5)
    g = torch.randn(y.shape).transpose(0, 1).contiguous().transpose(0, 1)  # a strided grad_out too
    gx, gB = torch.autograd.grad(y, (x_nc, lora_B), g)
    y_ref = lora_b_linear_reference(x, weight, bias, lora_A, lora_B, 1.5)
    gx_ref, gB_ref = torch.autograd.grad(y_ref, (x, lora_B), g)
    assert y.shape == (4, 6, 40) and gx.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gB, gB_ref, rtol=1e-4, atol=1e-4)


def test_cpp_op_rejects_what_a_gemm_would_broadcast_or_reject_vaguely(cpp):
    x, weight, bias, lora_A, lora_B = make_inputs((3,), 8, 8, 2)
    with pytest.raises(RuntimeError, match="bias must be 1-D"):  # (1,) would broadcast in addmm
        lora_b_linear(x, weight, bias[:1].clone(), lora_A, lora_B, 0.5)
    with pytest.raises(RuntimeError, match="bias must be 1-D"):
        lora_b_linear(x, weight, bias.view(1, 8), lora_A, lora_B, 0.5)
    with pytest.raises(RuntimeError, match="all tensors must share x's dtype"):
        lora_b_linear(x, weight.double(), bias, lora_A, lora_B, 0.5)
    with pytest.raises(RuntimeError, match="all tensors must share x's dtype"):
        lora_b_linear(x, weight, bias, lora_A, lora_B.detach().half().requires_grad_(), 0.5)


def test_fake_kernels_keep_bf16(cpp):
    x, weight, bias, lora_A, lora_B = make_inputs((2, 3), dtype=torch.bfloat16)
    fwd, bwd = torch.ops.segpcl.lora_b_linear_fwd.default, torch.ops.segpcl.lora_b_linear_bwd.default
    torch.library.opcheck(fwd, (x.detach(), weight, bias, lora_A, lora_B.detach(), 0.5),
                          test_utils=("test_faketensor",))
    g, u = torch.randn(2, 3, 40).bfloat16(), torch.randn(2, 3, 4).bfloat16()
    for flags in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(bwd, (g, u, weight, lora_A, lora_B.detach(), 0.5, *flags),
                              test_utils=("test_faketensor",))


def test_has_kernel_per_device(monkeypatch):
    monkeypatch.setattr(_ext, "_C", types.SimpleNamespace(WITH_CUDA=False))
    assert _ext.has_kernel("cpu") and not _ext.has_kernel("cuda") and not _ext.has_kernel("mps")
    monkeypatch.setattr(_ext, "_C", types.SimpleNamespace(WITH_CUDA=True))
    assert _ext.has_kernel("cpu") and _ext.has_kernel("cuda") and not _ext.has_kernel("mps")
    monkeypatch.setattr(_ext, "_C", None)
    assert not _ext.has_kernel("cpu") and not _ext.has_kernel("cuda")
