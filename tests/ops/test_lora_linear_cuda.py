"""segpcl::lora_b_linear on CUDA (every SEGPCL_LORA_FWD / SEGPCL_LORA_BWD path, including the fused
rank-r kernel) against the reference; needs a GPU and an extension built with CUDA (SEGPCL_WITH_CUDA=1)."""
from __future__ import annotations

import pytest
import torch

from segpcl_fast.ops import dispatch, lora_linear
from segpcl_fast.ops.lora_linear import lora_b_linear, lora_b_linear_reference

from lora_cases import PATHS, forward_backward, make_inputs, set_paths, small_update_slopes, upcast

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _cuda_extension():
    status = lora_linear.extension_status()
    if not status["cuda"]:
        pytest.fail(f"a GPU is present but segpcl_fast._C has no CUDA kernels ({status}); "
                    "rebuild with SEGPCL_WITH_CUDA=1 CUDA_HOME=/usr/local/cuda")
    with dispatch.backend("cpp"):  # the C++ op itself, also where B needs no gradient
        yield


# with bwd=fused, rank 32 and 64 take the rank-r kernel, 80 the cuBLAS fallback; rows/cols not
# multiples of the tiles.
CASES = [((4, 197), 768, 3072, 32), ((333,), 3072, 768, 32), ((1000,), 200, 130, 64), ((77,), 64, 96, 80),
         ((5000,), 96, 64, 8)]


@pytest.mark.parametrize("paths", PATHS, ids=["-".join(p) for p in PATHS])
@pytest.mark.parametrize("lead,n_in,n_out,rank", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_float64_truth(lead, n_in, n_out, rank, dtype, paths, monkeypatch):
    set_paths(monkeypatch, *paths)
    args = make_inputs(lead, n_in, n_out, rank, dtype=dtype, device="cuda")
    ours = forward_backward(lora_b_linear, *args, 2.0)
    assert dispatch.last_choice()["lora_b_linear"] == "cpp"
    low_ref = forward_backward(lora_b_linear_reference, *args, 2.0)
    g = torch.randn(ours[0].shape, generator=torch.Generator().manual_seed(1)).to(device="cuda", dtype=dtype)
    truth = forward_backward(lora_b_linear_reference, *upcast(args), 2.0, grad_out=g.double())
    for got, ref, exact in zip(ours, low_ref, truth):
        assert got.dtype == dtype and got.shape == exact.shape
        err = (got.double() - exact).abs().max().item()
        ref_err = (ref.double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err <= 2.0 * ref_err + 1e-4 * scale, (err, ref_err, scale)


def test_cuda_opcheck_and_gradcheck():
    x, weight, bias, lora_A, lora_B = make_inputs((3, 5), 24, 40, 4, device="cuda")
    torch.library.opcheck(torch.ops.segpcl.lora_b_linear_fwd.default, (x, weight, bias, lora_A, lora_B, 0.5))
    g, u = torch.randn(3, 5, 40, device="cuda"), torch.randn(3, 5, 4, device="cuda")
    torch.library.opcheck(torch.ops.segpcl.lora_b_linear_bwd.default,
                          (g, u, weight, lora_A, lora_B.detach(), 0.5, True, True))
    x64, w64, b64, a64, lb64 = make_inputs((2, 3), 6, 10, 3, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(lambda x_, b_: lora_b_linear(x_, w64, b64, a64, b_, 1.3), (x64, lb64))


@pytest.mark.parametrize("paths", PATHS, ids=["-".join(p) for p in PATHS])
def test_cuda_grad_flags(paths, monkeypatch):
    set_paths(monkeypatch, *paths)
    x, weight, bias, lora_A, lora_B = make_inputs((64,), 32, 96, 8, device="cuda")
    g, u = torch.randn(64, 96, device="cuda"), torch.randn(64, 8, device="cuda")
    gx, gB = torch.ops.segpcl.lora_b_linear_bwd(g, u, weight, lora_A, lora_B.detach(), 0.5, False, True)
    assert gx.numel() == 0
    torch.testing.assert_close(gB, 0.5 * g.T @ u, rtol=1e-4, atol=1e-4)
    gx, gB = torch.ops.segpcl.lora_b_linear_bwd(g, u, weight, lora_A, lora_B.detach(), 0.5, True, False)
    assert gB.numel() == 0
    torch.testing.assert_close(gx, g @ weight + 0.5 * (g @ lora_B.detach()) @ lora_A, rtol=1e-4, atol=1e-4)


def _path_tolerance(t):
    """Paths round at different points: in bf16 they may differ by a few units in the last place of
    the largest entries (4 ulps of max |t| here; a fixed rtol fails on small entries that come out
    of cancellation); fp32 to 1e-4."""
    if t.dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4)
    return dict(rtol=0.0, atol=4 * 2.0 ** -8 * t.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backward_paths_agree(dtype, monkeypatch):
    """SEGPCL_LORA_BWD=merged (default), split (cuBLAS) and fused (the rank-r kernel): the same grads."""
    x, weight, bias, lora_A, lora_B = make_inputs((1000,), 200, 130, 32, device="cuda", dtype=dtype)
    g = torch.randn(1000, 130, device="cuda", dtype=dtype)
    u = (x @ lora_A.T).detach().to(dtype)
    grads = {}
    for path in ("merged", "split", "fused"):
        monkeypatch.setenv("SEGPCL_LORA_BWD", path)
        grads[path] = torch.ops.segpcl.lora_b_linear_bwd(g, u, weight, lora_A, lora_B.detach(), 0.5, True, True)
    for path in ("split", "fused"):
        for got, merged in zip(grads[path], grads["merged"]):
            torch.testing.assert_close(got, merged, **_path_tolerance(merged))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_paths_agree(dtype, monkeypatch):
    """SEGPCL_LORA_FWD=merged (default), concat (K-concatenated GEMM) and addmm: the same (y, u)."""
    x, weight, bias, lora_A, lora_B = make_inputs((3, 333), 200, 520, 32, device="cuda", dtype=dtype)
    outs = {}
    for path in ("merged", "concat", "addmm"):
        monkeypatch.setenv("SEGPCL_LORA_FWD", path)
        outs[path] = torch.ops.segpcl.lora_b_linear_fwd(x, weight, bias, lora_A, lora_B.detach(), 0.5)
    for path in ("concat", "addmm"):
        for a, b in zip(outs[path], outs["merged"]):
            torch.testing.assert_close(a, b, **_path_tolerance(b))
    ref = x.float() @ weight.float().T + bias.float() + 0.5 * (x.float() @ lora_A.float().T) @ lora_B.detach().float().T
    torch.testing.assert_close(outs["merged"][0].float(), ref, **_path_tolerance(outs["merged"][0]))


@pytest.mark.parametrize("paths", PATHS, ids=["-".join(p) for p in PATHS])
@pytest.mark.parametrize("bscale", [1e-3, 3e-4])
def test_cuda_bf16_keeps_small_updates_at_least_as_well_as_the_reference(bscale, paths, monkeypatch):
    set_paths(monkeypatch, *paths)
    ours, ref = small_update_slopes(lora_b_linear, lora_b_linear_reference, bscale, device="cuda")
    assert dispatch.last_choice()["lora_b_linear"] == "cpp"
    assert ref - 0.02 <= ours <= 1.02, (ours, ref)


def test_cuda_fused_backward_is_flagged_nondeterministic(monkeypatch):
    """The fused kernel adds with float atomics: deterministic mode must hear of it; merged must not."""
    args = make_inputs((300,), 64, 96, 8, device="cuda")
    try:
        torch.use_deterministic_algorithms(True)
        set_paths(monkeypatch, "merged", "fused")
        with pytest.raises(RuntimeError, match="SEGPCL_LORA_BWD=fused"):
            forward_backward(lora_b_linear, *args, 0.5)
        set_paths(monkeypatch, "merged", "merged")
        forward_backward(lora_b_linear, *make_inputs((300,), 64, 96, 8, device="cuda"), 0.5)
    finally:
        torch.use_deterministic_algorithms(False)


def test_cuda_raw_op_with_x_on_another_device_names_the_devices():
    """The CUDAGuard used to come before the argument checks: x on the CPU with CUDA weights failed in
    the guard ('non-CUDA DeviceType') instead of naming the devices."""
    x, weight, bias, lora_A, lora_B = make_inputs((5,), 24, 40, 4, device="cuda")
    with pytest.raises(RuntimeError, match="all tensors must be on x's device"):
        torch.ops.segpcl.lora_b_linear_fwd(torch.ones(5, 24), weight, bias, lora_A,
                                            lora_B, 0.5)
