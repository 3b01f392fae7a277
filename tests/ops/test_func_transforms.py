"""torch.func (grad, vmap, jvp, functional_call) through the ops: every op runs its reference there,
since torch's custom ops and the fast paths' autograd.Functions do not compose with those transforms
(pytorch/pytorch#170834); a forced fast backend is one error naming the fix.

The CPU's "auto" LoRA path is the C++ op, so the CPU tests here fail without the fallback; the Triton
ops' "auto" fallback shows on CUDA only (their CPU "auto" is the reference already)."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap

from segpcl_fast.model.clip import load_model
from segpcl_fast.model.lora import inject_lora
from segpcl_fast.ops import anchor_kl, dispatch, knn_subgraph_kl, lora_linear
from segpcl_fast.ops.lora_linear import lora_b_linear, lora_b_linear_reference

from lora_cases import make_inputs, require_extension

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_suite.sh's ext-tests step)")])]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _lora_inputs(device):
    x, weight, bias, lora_A, lora_B = make_inputs((6,), 24, 40, 4, device=device)
    return x.detach(), weight, bias, lora_A, lora_B.detach()


def _eager_grad_B(x, weight, bias, lora_A, lora_B, target):
    """d/dB of ((y - target)^2).sum() through the eager "auto" path (the C++ op where built)."""
    B = lora_B.clone().requires_grad_()
    y = lora_b_linear(x, weight, bias, lora_A, B, 0.5)
    (g,) = torch.autograd.grad(((y - target) ** 2).sum(), B)
    return g


def test_the_eager_path_here_is_a_fast_one(device):
    """The premise of this file: outside torch.func, "auto" runs a fast LoRA path with B trained."""
    if device == "cpu":
        require_extension()
    x, *rest = _lora_inputs(device)
    assert lora_linear.lora_b_linear_impl(x, rest[-1].clone().requires_grad_()) in ("cpp", "merged")


def test_func_grad_wrt_B_equals_autograd(device, caplog):
    x, weight, bias, lora_A, lora_B = _lora_inputs(device)
    target = torch.randn(6, 40, device=device)

    def loss(B):
        return ((lora_b_linear(x, weight, bias, lora_A, B, 0.5) - target) ** 2).sum()

    with caplog.at_level("INFO", logger="segpcl_fast.ops"):
        func_grad = grad(loss)(lora_B)
    assert dispatch.last_choice()["lora_b_linear"] == "reference"
    assert f"lora_b_linear -> reference (device={device}, backend=auto, under a torch.func transform)" in caplog.text
    torch.testing.assert_close(func_grad, _eager_grad_B(x, weight, bias, lora_A, lora_B, target), rtol=1e-5, atol=1e-5)


def test_per_sample_gradients_through_vmap_of_grad(device):
    """The per-example gradients of B (vmap over the batch of grad), each equal to its own backward."""
    x, weight, bias, lora_A, lora_B = _lora_inputs(device)
    target = torch.randn(6, 40, device=device)

    def loss_one(B, xi, ti):
        return ((lora_b_linear(xi[None], weight, bias, lora_A, B, 0.5) - ti) ** 2).sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(lora_B, x, target)
    assert per_sample.shape == (6, *lora_B.shape)
    for i in range(6):
        expected = _eager_grad_B(x[i:i + 1], weight, bias, lora_A, lora_B, target[i:i + 1])
        torch.testing.assert_close(per_sample[i], expected, rtol=1e-5, atol=1e-5)


def test_forward_mode_jvp_wrt_B_is_the_lora_term(device):
    """y is affine in B: its directional derivative along T is s (x A^T) T^T, whatever B is."""
    x, weight, bias, lora_A, lora_B = _lora_inputs(device)
    tangent = torch.randn_like(lora_B)
    y, dy = jvp(lambda B: lora_b_linear(x, weight, bias, lora_A, B, 0.5), (lora_B,), (tangent,))
    torch.testing.assert_close(y, lora_b_linear_reference(x, weight, bias, lora_A, lora_B, 0.5))
    torch.testing.assert_close(dy, 0.5 * (x @ lora_A.t()) @ tangent.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_forced_fast_backend_is_refused_under_func(backend):
    x, weight, bias, lora_A, lora_B = _lora_inputs("cpu")
    with dispatch.backend(backend), pytest.raises(RuntimeError, match=r"torch\.func transform .*set_backend\('auto'\)"):
        grad(lambda B: lora_b_linear(x, weight, bias, lora_A, B, 0.5).sum())(lora_B)
    zs, zt = torch.randn(4, 7), torch.randn(4, 7)
    if backend == "triton":  # the Triton ops: the same refusal, before any launch
        with dispatch.backend(backend), pytest.raises(RuntimeError, match=r"anchor_kl: .*torch\.func transform"):
            grad(lambda z: anchor_kl(z, zt, 2.0))(zs)


def test_triton_ops_take_the_reference_under_func_grad(device):
    """anchor_kl and knn_subgraph_kl under torch.func.grad: the reference's gradient, equal to the eager
    "auto" path's (Triton on CUDA)."""
    gen = torch.Generator().manual_seed(0)
    zs, zt = (torch.randn(5, 9, generator=gen).to(device) for _ in range(2))
    eager = zs.clone().requires_grad_()
    (g_eager,) = torch.autograd.grad(anchor_kl(eager, zt, 2.0), eager)
    g_func = grad(lambda z: anchor_kl(z, zt, 2.0))(zs)
    assert dispatch.last_choice()["anchor_kl"] == "reference"
    torch.testing.assert_close(g_func, g_eager, rtol=1e-5, atol=1e-6)

    emb = torch.nn.functional.normalize(torch.randn(12, 16, generator=gen), dim=-1).to(device)
    roots = torch.tensor([0, 3, 7], device=device)
    neighbors = torch.randint(0, 12, (3, 4), generator=gen).to(device)
    ref = torch.log_softmax(torch.randn(3, 4, generator=gen), -1).to(device)
    eager = emb.clone().requires_grad_()
    (g_eager,) = torch.autograd.grad(knn_subgraph_kl(eager, roots, neighbors, ref, 0.5), eager)
    g_func = grad(lambda e: knn_subgraph_kl(e, roots, neighbors, ref, 0.5))(emb)
    torch.testing.assert_close(g_func, g_eager, rtol=1e-5, atol=1e-6)
    assert dispatch.last_choice()["knn_subgraph_kl"] == "reference"


def test_functional_call_grad_over_a_lora_model(tiny_model_name):
    """torch.func.grad of a LoRA-injected CLIP's loss w.r.t. its B factors (a dict of parameters, as
    per-sample-gradient and meta-learning code passes them) equals loss.backward()'s."""
    require_extension()
    torch.manual_seed(0)
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, targets=["q", "v", "c_fc"])
    encoder = _EncodeImage(model)
    b_params = {n: p.detach().normal_(0, 0.1) for n, p in encoder.named_parameters() if "lora_B" in n}
    assert b_params  # (B starts at 0, LoRA's init: random, so that every term of the gradient counts)
    images = torch.randn(2, 3, 32, 32)

    def loss(params):
        _raw, emb = functional_call(encoder, params, (images,))
        return emb.square().sum()

    dispatch.reset_choices()
    func_grads = grad(loss)(b_params)
    assert dispatch.choices_used()["lora_b_linear"] == "reference"
    _raw, emb = encoder(images)
    emb.square().sum().backward()
    assert dispatch.choices_used()["lora_b_linear"] == "reference+cpp"  # the eager pass: the C++ op
    trained = dict(encoder.named_parameters())
    image_side = [name for name in func_grads if trained[name].grad is not None]  # the text tower's Bs: no part
    assert image_side and all(".visual." in name for name in image_side)
    for name, g in func_grads.items():
        expected = trained[name].grad if name in image_side else torch.zeros_like(g)
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)


class _EncodeImage(torch.nn.Module):
    """model.encode_image as a module's forward (functional_call calls forward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.encode_image(images)
