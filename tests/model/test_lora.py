import copy

import pytest
import torch

from segpcl_fast.model.clip import load_model
from segpcl_fast.model.lora import (LoRABLinear, LoRAMultiheadAttention, count_trainable, inject_lora,
                                    lora_parameters)


@pytest.fixture(scope="module")
def vit_b16():
    return load_model("ViT-B-16", pretrained=None)


def test_vit_b16_trainable_count_matches_paper(vit_b16):
    model = copy.deepcopy(vit_b16)
    params = inject_lora(model, rank=32, targets=["k", "v", "c_fc", "c_proj"])
    assert count_trainable(model) == 3_440_640
    assert sum(p.numel() for p in params) == 3_440_640
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)


def test_b_zero_reproduces_pretrained_exactly(vit_b16):
    ref = copy.deepcopy(vit_b16).train()  # train mode + grad: nn.MultiheadAttention's standard path
    model = copy.deepcopy(vit_b16).train()
    inject_lora(model)
    x = torch.randn(2, 3, 224, 224)
    tokens = ref.tokenize(["a good photo of a dog.", "a photo of a small red car on a road."])
    r0, v0 = ref.encode_image(x)
    r1, v1 = model.encode_image(x)
    assert torch.equal(r0, r1) and torch.equal(v0, v1)
    assert torch.equal(ref.encode_text(tokens), model.encode_text(tokens))


def test_lora_linear_formula_and_frozen_a():
    base = torch.nn.Linear(12, 20)
    layer = LoRABLinear(base, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 12)
    expected = base(x) + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    assert not layer.lora_A.requires_grad and "lora_A" in dict(layer.named_buffers())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_B"]
    # Kaiming-uniform bound of nn.Linear / peft: 1/sqrt(in_features)
    assert layer.lora_A.abs().max() <= 1 / 12 ** 0.5 + 1e-6


def test_packed_attention_lora_only_touches_chosen_slices():
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    attn = LoRAMultiheadAttention(mha, ["k", "v"], out_lora=False, rank=3, alpha=3.0,
                                  generator=torch.Generator().manual_seed(1))
    torch.nn.init.normal_(attn.lora_B["k"])
    torch.nn.init.normal_(attn.lora_B["v"])
    x = torch.randn(2, 7, 16)
    from segpcl_fast import ops
    got = ops.lora_b_linear(x, attn.in_proj_weight, attn.in_proj_bias, attn.lora_A, attn.packed_lora_B(), 1.0)
    base = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    a_k, a_v = attn.lora_A[:3], attn.lora_A[3:]
    torch.testing.assert_close(got[..., :16], base[..., :16])  # q untouched
    torch.testing.assert_close(got[..., 16:32], base[..., 16:32] + (x @ a_k.T) @ attn.lora_B["k"].T)
    torch.testing.assert_close(got[..., 32:], base[..., 32:] + (x @ a_v.T) @ attn.lora_B["v"].T)


def test_attention_matches_torch_mha_with_mask():
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).train()
    attn = LoRAMultiheadAttention(copy.deepcopy(mha), ["q", "v"], out_lora=True, rank=2, alpha=2.0,
                                  generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6, 16)
    mask = torch.full((6, 6), float("-inf")).triu(1)
    ref = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(attn(x, x, x, attn_mask=mask)[0], ref)


def test_gradients_reach_only_b(tiny_model_name):
    model = load_model(tiny_model_name, pretrained=None)
    params = inject_lora(model, rank=4, targets=["q", "k", "v", "out", "c_fc", "c_proj"])
    raw, emb = model.encode_image(torch.randn(2, 3, 32, 32))
    txt = model.encode_text(model.tokenize(["a red square."]))
    (emb.sum() + txt.sum()).backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_B" not in n)
    # every layer of both towers got its adapters: 2 towers x 2 blocks x (q,k,v + out + c_fc + c_proj)
    assert len(params) == 2 * 2 * 6


@pytest.mark.parametrize("targets, per_block", [
    (["q"], lambda d, m, r: d * r),
    (["out", "c_fc"], lambda d, m, r: d * r + m * r),
])
def test_targets_configurable(tiny_model_name, targets, per_block):
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, targets=targets)
    expected = 2 * per_block(48, 192, 4) + 2 * per_block(32, 128, 4)
    assert count_trainable(model) == expected


def test_bad_targets_and_rank(tiny_model_name):
    model = load_model(tiny_model_name, pretrained=None)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        inject_lora(model, targets=["key"])
    with pytest.raises(ValueError, match="rank must be positive"):
        inject_lora(model, rank=0)
