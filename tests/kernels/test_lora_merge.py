"""lora_merged_weight: the Triton W + s B A against torch.addmm, and its use by the merged LoRA
arrangement (SEGPCL_LORA_MERGE=triton)."""
import pytest
import torch

from segpcl_fast.ops import lora_linear
from segpcl_fast.ops._kernels import load_kernel

kernel = load_kernel("lora_merge")


def _layer(device, lead=(3, 5), n_in=24, n_out=40, rank=4):
    """A LoRA layer's inputs: x and B require grad, W, b, A frozen."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, n_in, generator=g).to(device).requires_grad_()
    w, a, b = _inputs(n_out, n_in, rank, torch.float32, device)
    return x, w, torch.randn(n_out, generator=g).to(device), a, b.requires_grad_()


def _forward_backward(fn, x, w, bias, a, b, scaling):
    y = fn(x, w, bias, a, b, scaling)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device)
    return (y, *torch.autograd.grad(y, (x, b), grad_y))


def _inputs(n_out, n_in, rank, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    a = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
    b = torch.randn(n_out, rank, generator=g) * 0.3
    return [t.to(device=device, dtype=dtype) for t in (w, a, b)]


@pytest.mark.parametrize("n_out,n_in,rank", [(1, 1, 1), (70, 50, 5), (130, 200, 33), (64, 64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_addmm(n_out, n_in, rank, dtype, device):
    """fp32 sums of exact products, one rounding: within fp32 summation order of addmm in fp32, and the
    same bf16 value as addmm (one rounding of the same fp32 sum) but where the two sums' last bits
    straddle a bf16 rounding boundary."""
    w, a, b = _inputs(n_out, n_in, rank, dtype, device)
    got = kernel.lora_merged_weight_triton(w, a, b, 0.7)
    want = kernel.lora_merged_weight_reference(w, a, b, 0.7)
    assert got.dtype == dtype and got.shape == w.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        exact = w.double() + 0.7 * b.double() @ a.double()
        assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() * 1.01 + 1e-6
        assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("block", [(16, 16), (32, 128), (128, 32)])
def test_tile_knob_and_strided_inputs_keep_the_result(block, device):
    w, a, b = _inputs(100, 90, 7, torch.float32, device, seed=1)
    w_t = w.t().contiguous().t()  # column-major W: strides (1, out)
    b_wide = torch.randn(100, 20, device=device)[:, 3:10]  # B a strided view, row stride 20
    b_wide.copy_(b)
    got = kernel.lora_merged_weight_triton(w_t, a, b_wide, -1.3, block=block)
    torch.testing.assert_close(got, torch.addmm(w, b, a, alpha=-1.3), rtol=1e-6, atol=1e-6)


def test_opcheck_and_empty(device):
    w, a, b = _inputs(40, 24, 4, torch.float32, device)
    torch.library.opcheck(torch.ops.segpcl.lora_merged_weight.default, (w, a, b, 0.5))
    empty = kernel.lora_merged_weight_triton(w[:0], a, b[:0], 0.5)
    assert empty.shape == (0, 24)
    with pytest.raises(ValueError, match=r"lora_A \(r, in\)"):
        kernel.lora_merged_weight_triton(w, a[:, :5], b, 0.5)


def test_merged_arrangement_uses_it_when_asked(device, monkeypatch):
    """SEGPCL_LORA_MERGE=triton: the merged LoRA layer forms W + s B A with this kernel (in the
    forward, and in the backward under SEGPCL_LORA_MERGED_BACKWARD=recompute), and its outputs and
    gradients equal the addmm arrangement's; an unknown value is refused."""
    args = _layer(device)
    want = _forward_backward(lora_linear.lora_b_linear_merged, *args, 0.5)
    calls = []
    real = kernel.lora_merged_weight_triton
    monkeypatch.setattr(kernel, "lora_merged_weight_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("SEGPCL_LORA_MERGE", "triton")
    monkeypatch.setenv("SEGPCL_LORA_MERGED_BACKWARD", "recompute")
    got = _forward_backward(lora_linear.lora_b_linear_merged, *args, 0.5)
    assert len(calls) == 2  # forward, and the backward's grad_x
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("SEGPCL_LORA_MERGE", "cublas")
    with pytest.raises(ValueError, match="SEGPCL_LORA_MERGE='cublas' is unknown"):
        lora_linear.lora_b_linear_merged(*args, 0.5)


def test_compiles_with_no_graph_break(device, monkeypatch, graph_breaks):
    monkeypatch.setenv("SEGPCL_LORA_MERGE", "triton")
    x, w, bias, a, b = _layer(device, (4,), 16, 24, 4)
    compiled = torch.compile(lora_linear.lora_b_linear_merged, fullgraph=True, backend="aot_eager")
    y = compiled(x, w, bias, a, b, 0.5)
    assert graph_breaks() == 0
    torch.testing.assert_close(y, lora_linear.lora_b_linear_reference(x, w, bias, a, b, 0.5), rtol=1e-5, atol=1e-6)
