"""segpcl::lora_b_linear against peft's LoRA layer (the peer reference) with lora_A frozen."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from segpcl_fast.ops import dispatch
from segpcl_fast.ops.lora_linear import lora_b_linear

from lora_cases import make_inputs, require_extension

if importlib.util.find_spec("peft") is None:  # not installed: skip; installed but broken: an error
    pytest.skip("peft is not installed (pip install -e '.[test]')", allow_module_level=True)
import peft  # noqa: E402


class _OneLinear(torch.nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.fc = torch.nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.fc(x)


def peft_lora_b_only(weight, bias, lora_A, lora_B, alpha):
    """A peft LoRA model on one nn.Linear with our W, b, A, B copied in and only B trainable."""
    rank, n_in = lora_A.shape
    base = _OneLinear(n_in, weight.shape[0]).to(weight.dtype)
    with torch.no_grad():
        base.fc.weight.copy_(weight)
        base.fc.bias.copy_(bias)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["fc"], lora_dropout=0.0, bias="none")
    model = peft.get_peft_model(base, config, autocast_adapter_dtype=False)  # keep bf16 adapters
    layer = model.base_model.model.fc
    assert isinstance(layer, peft.tuners.lora.Linear)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    layer.lora_A["default"].weight.requires_grad_(False)
    return model, layer


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("lead,n_in,n_out,rank", [((2, 33), 48, 96, 8), ((70,), 96, 48, 8)])
def test_matches_peft_lora_with_frozen_A(dtype, tol, lead, n_in, n_out, rank):
    require_extension()
    x, weight, bias, lora_A, lora_B = make_inputs(lead, n_in, n_out, rank, dtype=dtype)
    alpha = 2 * rank
    model, layer = peft_lora_b_only(weight, bias, lora_A, lora_B.detach(), alpha)
    assert layer.scaling["default"] == alpha / rank
    x_peft = x.detach().clone().requires_grad_()
    y_peft = model(x_peft)
    g = torch.randn(y_peft.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y_peft.backward(g)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.model.fc.lora_B.default.weight"]

    with dispatch.backend("auto"):
        y = lora_b_linear(x, weight, bias, lora_A, lora_B, alpha / rank)
    assert dispatch.last_choice()["lora_b_linear"] == "cpp"
    y.backward(g)
    scale = y_peft.detach().abs().max().item()
    torch.testing.assert_close(y.detach(), y_peft.detach(), rtol=tol, atol=tol * scale)
    torch.testing.assert_close(x.grad, x_peft.grad, rtol=tol, atol=tol * x_peft.grad.abs().max().item())
    peft_grad_B = layer.lora_B["default"].weight.grad
    torch.testing.assert_close(lora_B.grad, peft_grad_B, rtol=tol, atol=tol * peft_grad_B.abs().max().item())
