"""Direct torch.ops.segpcl.* calls skip the ops/ wrappers' checks: the ops' own launchers refuse
operands the kernels would index out of bounds or that tl.dot cannot take on a GPU (the interpreter's
fp32 casts hid a dtype mix). Each case ran to a result before the launchers checked."""
import pytest
import torch

from segpcl_fast.ops._kernels import load_kernel

pytest.importorskip("triton")
knn = load_kernel("knn_subgraph_kl")
load_kernel("lora_fused")  # registers segpcl::lora_fused_*
load_kernel("pgd_step")
load_kernel("anchor_kl")


def test_anchor_kl_refuses_a_teacher_of_other_rows(device):
    zs, zt = torch.randn(64, 100, device=device), torch.randn(8, 100, device=device)
    with pytest.raises(ValueError, match="teacher has shape"):
        torch.ops.segpcl.anchor_kl_rows(zs, zt, 20.0, False)


def test_pgd_step_refuses_a_gradient_of_another_shape(device):
    x, g = torch.rand(1, 3, 4, 4, device=device), torch.randn(1, 3, 2, 2, device=device)
    c = torch.ones(3, device=device)
    with pytest.raises(ValueError, match="grad has shape"):
        torch.ops.segpcl.pgd_step(x, g, x, c * 0.01, c * 0.1, c * -1, c)


def test_knn_backward_refuses_intermediates_of_another_graph(device):
    emb = torch.nn.functional.normalize(torch.randn(12, 8, device=device), dim=-1)
    roots, nbs = torch.tensor([0, 1, 2], device=device), torch.randint(0, 12, (3, 4), device=device)
    ref = knn.knn_reference_logprob(emb, roots, nbs, 0.05)
    _, g, g_root = torch.ops.segpcl.knn_subgraph_kl_rows(emb, roots, nbs, ref, 0.05)
    grad_kl = torch.ones(3, device=device)
    with pytest.raises(ValueError, match="g_root"):
        torch.ops.segpcl.knn_subgraph_kl_backward(grad_kl, emb, roots, nbs, g, g_root[:2])
    with pytest.raises(ValueError, match="plan must be"):
        torch.ops.segpcl.knn_subgraph_kl_backward(grad_kl, emb, roots, nbs, g, g_root, torch.zeros(5, dtype=torch.long,
                                                                                                   device=device))
    with pytest.raises(ValueError, match="ref_logprob has shape"):
        torch.ops.segpcl.knn_subgraph_kl_rows(emb, roots, nbs, ref[:, :2], 0.05)


def _lora(device, dtype):
    x = torch.randn(8, 40, device=device, dtype=dtype)
    w, b = torch.randn(16, 40, device=device, dtype=dtype), torch.randn(16, device=device, dtype=dtype)
    a, lb = torch.randn(4, 40, device=device, dtype=dtype), torch.randn(16, 4, device=device, dtype=dtype)
    return x, w, b, a, lb


def test_lora_fused_refuses_mixed_dtypes_and_mismatched_shapes(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    other = torch.float16
    x, w, b, a, lb = _lora(device, dtype)
    with pytest.raises(TypeError, match="share one dtype"):
        torch.ops.segpcl.lora_fused_fwd(x, w.to(other), b, a, lb, 0.5)
    with pytest.raises(TypeError, match="share one dtype"):
        torch.ops.segpcl.lora_fused_fwd(x, w, b.to(other), a, lb, 0.5)
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.segpcl.lora_fused_fwd(x, w[:, :32], b, a, lb, 0.5)
    with pytest.raises(ValueError, match="lora_A must have shape"):
        torch.ops.segpcl.lora_fused_fwd(x, w, b, a[:, :32], lb, 0.5)
    y, u, merged = torch.ops.segpcl.lora_fused_fwd(x, w, b, a, lb, 0.5)
    g = torch.randn_like(y)
    with pytest.raises(TypeError, match="share one dtype"):
        torch.ops.segpcl.lora_fused_bwd(g, u.to(other), merged, lb, 0.5)
    with pytest.raises(ValueError, match="u must have shape"):
        torch.ops.segpcl.lora_fused_bwd(g, u[:4], merged, lb, 0.5)
    with pytest.raises(ValueError, match="lora_B must have shape"):
        torch.ops.segpcl.lora_fused_bwd(g, u, merged, lb[:8], 0.5)
    grad_x, grad_b = torch.ops.segpcl.lora_fused_bwd(g, u, merged, lb, 0.5)
    assert grad_x.shape == x.shape and grad_b.shape == lb.shape


def test_lora_fused_leaves_a_weight_past_int32_offsets_to_the_merged_arrangement():
    """The fused GEMMs index W in int32: a W of 2^31 elements or more is refused by the launcher and not
    chosen by backend "triton" (lora_b_linear_impl), which takes what "auto" takes instead."""
    from segpcl_fast import ops
    from segpcl_fast.ops import lora_linear
    fused = load_kernel("lora_fused")
    with pytest.raises(ValueError, match="2\\^31 elements"):
        fused._check_weight_size(torch.empty(65536, 32768, device="meta"))
    fused._check_weight_size(torch.empty(65536, 32767, device="meta"))
    column_slice = torch.empty(65536, 32768, device="meta")[:, :16]  # few elements, row 65535 at 65535 * 32768
    with pytest.raises(ValueError, match="2\\^31 elements"):  # as the backward's W' it is read as is: refused
        fused._check_weight_size(column_slice)
    fused._check_weight_size(column_slice, read_as_is=False)  # the forward's W: its W' is made contiguous
    assert not fused.fused_supported(torch.device("cuda"), torch.bfloat16, 4, (65536, 32768))
    assert fused.fused_supported(torch.device("cuda"), torch.bfloat16, 4, (65536 - 16, 32768))
    if not fused.fused_supported(torch.device("cpu"), torch.float32):
        pytest.skip("the fused kernels run on the CPU under TRITON_INTERPRET=1 only")
    x = torch.randn(2, 32768)
    with ops.backend("triton"):
        assert lora_linear.lora_b_linear_impl(x, torch.zeros(65536, 4, requires_grad=True)) != "triton"
        assert lora_linear.lora_b_linear_impl(x, torch.zeros(65535, 4, requires_grad=True)) == "triton"
