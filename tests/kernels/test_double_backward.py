"""Double backward (create_graph=True) through a fast path whose backward has no graph of its own:
a clear error, never a silently wrong second-order gradient. The references support it (they are
plain autograd), and their second-order gradients are what the fast paths would have had to match.

Before the guard: the Triton anchor_kl gave exact zeros for d/dz_S of ||dL/dz_S||^2 (the gradient
comes precomputed from the forward pass), the merged LoRA arrangement gave wrong grad_x (u is saved
without its graph), the C++ op an ATen error about out= arguments."""
import pytest
import torch
import torch.nn.functional as F

from segpcl_fast import ops
from segpcl_fast.ops._ext import has_kernel
from segpcl_fast.ops.lora_linear import lora_b_linear_merged, lora_b_linear_reference



def _grad_norm_backward(fn, *inputs, wrt):
    """d/d(inputs) of ||d fn / d wrt||^2: the second-order quantity (a gradient penalty)."""
    out = fn(*inputs)
    (g,) = torch.autograd.grad(out.pow(2).sum() if out.dim() else out, wrt, create_graph=True)
    g.pow(2).sum().backward()


def _lora_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(6, 8, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    lora_b = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    return x, w, b, a, lora_b


def test_reference_lora_double_backward_is_nonzero():
    x, w, b, a, lora_b = _lora_inputs()
    _grad_norm_backward(lambda *t: lora_b_linear_reference(*t, 0.7), x, w, b, a, lora_b, wrt=lora_b)
    assert x.grad.abs().sum() > 0  # what the merged path used to get wrong, silently


@pytest.mark.parametrize("path", ["merged", "cpp"])
def test_lora_fast_paths_refuse_double_backward(path):
    if path == "cpp" and not has_kernel("cpu"):
        pytest.skip("segpcl_fast._C not built")
    x, w, b, a, lora_b = _lora_inputs()
    if path == "merged":
        fn = lambda *t: lora_b_linear_merged(*t, 0.7)  # noqa: E731
    else:
        fn = lambda *t: torch.ops.segpcl.lora_b_linear_fwd(*t, 0.7)[0]  # noqa: E731
    with pytest.raises(RuntimeError, match=r"lora_b_linear \((merged|C\+\+ op)\): double backward .* is not "
                                           r"supported .*ops.backend\('reference'\)"):
        _grad_norm_backward(fn, x, w, b, a, lora_b, wrt=lora_b)
    # first-order gradients are untouched by the guard (autograd runs backward with grad mode off)
    out = fn(x, w, b, a, lora_b)
    gx, gb = torch.autograd.grad(out.pow(2).sum(), (x, lora_b))
    ref = lora_b_linear_reference(x, w, b, a, lora_b, 0.7)
    rx, rb = torch.autograd.grad(ref.pow(2).sum(), (x, lora_b))
    torch.testing.assert_close((gx, gb), (rx, rb))


def test_triton_anchor_kl_refuses_double_backward(device):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(4, 7, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(4, 7, generator=gen).to(device)
    with ops.backend("reference"):
        _grad_norm_backward(lambda s: ops.anchor_kl(s, teacher, 2.0), student, wrt=student)
    assert student.grad.abs().sum() > 0
    student.grad = None
    with ops.backend("triton"):
        with pytest.raises(RuntimeError, match=r"anchor_kl \(Triton\): double backward"):
            _grad_norm_backward(lambda s: ops.anchor_kl(s, teacher, 2.0), student, wrt=student)


def test_triton_knn_subgraph_kl_refuses_double_backward(device):
    gen = torch.Generator().manual_seed(2)
    emb = F.normalize(torch.randn(6, 4, generator=gen), dim=-1).to(device).requires_grad_()
    roots, neighbors = torch.tensor([0, 3], device=device), torch.tensor([[1, 2], [4, 5]], device=device)
    ref = F.log_softmax(torch.randn(2, 2, generator=gen), dim=-1).to(device)
    with ops.backend("triton"):
        with pytest.raises(RuntimeError, match=r"knn_subgraph_kl \(Triton\): double backward"):
            _grad_norm_backward(lambda e: ops.knn_subgraph_kl(e, roots, neighbors, ref, 0.5), emb, wrt=emb)
