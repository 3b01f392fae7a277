"""LoRA-B-only injection and r(x) / v(x) on timm image towers (open_clip's TimmModel: SigLIP's MAP-pooled
ViT, EVA with a fused qkv and separate biases and a GluMlp, EVA-02 CLIP's q/k/v projections and SwiGLU).

The peers: open_clip's own encode_image (B = 0 and merged weights must compute it), the LoRA formula
slice by slice, and a fresh open_clip model loading the merged state dict strictly.
"""
import copy
import json

import open_clip
import pytest
import timm
import torch
from torch import nn

from segpcl_fast.model.clip import load_model
from segpcl_fast.model.lora import (LoRABLinear, LoRAPackedLinear, count_trainable, inject_lora, lora_parameters,
                                    merge_lora)

# open_clip's TimmModel builds the trunk at the timm model's own size (224), whatever image_size says
TIMM_CONFIGS = {
    "test-timm-map": {  # SigLIP's layout: packed qkv, MAP pool, no projection (v = r)
        "embed_dim": 192, "custom_text": True,
        "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 1,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}},
    "test-timm-eva": {  # EVA-02: fused qkv with separate q/v biases, GluMlp, the trunk's head projects
        "embed_dim": 32, "custom_text": True,
        "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": None},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
}


@pytest.fixture(scope="module")
def timm_names(tmp_path_factory):
    d = tmp_path_factory.mktemp("timm_configs")
    for name, cfg in TIMM_CONFIGS.items():
        (d / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return list(TIMM_CONFIGS)


@pytest.fixture(scope="module")
def models(timm_names):
    return {name: load_model(name, pretrained=None) for name in timm_names}


def _images(n=2):
    return torch.randn(n, 3, 224, 224)


@pytest.mark.parametrize("name", list(TIMM_CONFIGS))
def test_r_is_the_trunk_feature_before_the_projection_and_v_is_open_clip_s_embedding(models, name):
    model = models[name]
    assert model._timm
    x = _images()
    with torch.no_grad():
        raw, emb = model.encode_image(x)
        ref = model.clip.encode_image(x)
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    head = model.visual.trunk.get_classifier()
    if name == "test-timm-eva":  # r is 192-wide, before the trunk's Linear head projects it to 32
        assert raw.shape == (2, 192) and isinstance(head, nn.Linear)
        torch.testing.assert_close(emb, raw @ head.weight.T + head.bias)
    else:  # no projection: r = v
        assert raw.shape == emb.shape == (2, 192)
        torch.testing.assert_close(raw, emb, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(TIMM_CONFIGS))
def test_b_zero_is_open_clip_and_every_block_is_adapted(models, name):
    model = copy.deepcopy(models[name])
    x = _images()
    with torch.no_grad():
        ref = model.clip.encode_image(x)
    params = inject_lora(model, rank=4, towers=["visual"])
    blocks = model.visual.trunk.blocks
    r = 4
    d, hidden = 192, (768 if name == "test-timm-map" else 2 * 512)  # GluMlp: fc1 gives value and gate
    assert count_trainable(model) == len(blocks) * r * (2 * d + hidden + d)  # k, v, c_fc, c_proj
    assert all(isinstance(b.attn.qkv, LoRAPackedLinear) and b.attn.qkv.slices == ["k", "v"] for b in blocks)
    assert all(isinstance(b.mlp.fc2, LoRABLinear) and not isinstance(b.attn.proj, LoRABLinear) for b in blocks)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_B" not in n)
    assert params and all("lora_B" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not any(isinstance(m, (LoRABLinear, LoRAPackedLinear)) for m in model.visual.trunk.attn_pool.modules()) \
        if name == "test-timm-map" else True
    with torch.no_grad():
        _close(model.encode_image(x)[1], ref, 1e-6)


def test_packed_qkv_lora_touches_only_the_chosen_slices(models):
    qkv = copy.deepcopy(models["test-timm-map"].visual.trunk.blocks[0].attn.qkv)
    lora = LoRAPackedLinear(copy.deepcopy(qkv), ["q", "v"], rank=3, alpha=6.0, generator=torch.Generator().manual_seed(1))
    for b in lora.lora_B.values():
        nn.init.normal_(b)
    x = torch.randn(2, 5, 192)
    got, base = lora(x), qkv(x)
    a_q, a_v = lora.lora_A[:3], lora.lora_A[3:]
    torch.testing.assert_close(got[..., :192], base[..., :192] + 2.0 * (x @ a_q.T) @ lora.lora_B["q"].T)
    torch.testing.assert_close(got[..., 192:384], base[..., 192:384])  # k untouched
    torch.testing.assert_close(got[..., 384:], base[..., 384:] + 2.0 * (x @ a_v.T) @ lora.lora_B["v"].T)


@pytest.mark.parametrize("name", list(TIMM_CONFIGS))
def test_merged_weights_load_into_plain_open_clip_and_compute_the_adapted_function(models, name):
    model = copy.deepcopy(models[name])
    params = inject_lora(model, rank=4, alpha=8.0, targets=["q", "k", "v", "out", "c_fc", "c_proj"])
    for p in params:
        nn.init.normal_(p, std=0.1)
    x = _images()
    with torch.no_grad():
        raw, emb = model.encode_image(x)
        text = model.class_embeddings([["a photo of a dog."], ["a car.", "a red car."]])
    merged = copy.deepcopy(model)
    assert [k for k in merged.state_dict() if "lora_" in k]
    assert merge_lora(merged) is merged and not [k for k in merged.state_dict() if "lora_" in k]
    fresh = open_clip.create_model(name).eval()
    fresh.load_state_dict(merged.clip.state_dict(), strict=True)
    with torch.no_grad():
        _close(fresh.encode_image(x), emb)
        _close(merged.encode_image(x)[0], raw)
        _close(merged.class_embeddings([["a photo of a dog."], ["a car.", "a red car."]]), text)
        for p in params:
            nn.init.zeros_(p)
        assert _rel_diff(model.encode_image(x)[1], emb) > 1e-2  # the update was in the weights


def _rel_diff(a, b):
    """max |a - b| over max |b|: EVA's random init gives embeddings of size 1e-3, so absolute
    tolerances would say nothing."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _close(a, b, tol=1e-4):
    assert a.shape == b.shape and _rel_diff(a, b) <= tol, _rel_diff(a, b)


def test_gradients_reach_every_visual_b(models):
    model = copy.deepcopy(models["test-timm-eva"])
    params = inject_lora(model, rank=2, towers=["visual"], targets=["q", "v", "out", "c_fc", "c_proj"])
    for p in params:
        nn.init.normal_(p, std=0.01)  # B = 0 would zero the gradients of the next layers' A-side products
    raw, emb = model.encode_image(_images(1))
    emb.square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() and p.grad.any() for p in lora_parameters(model))


class _Tower(nn.Module):
    """inject_lora's view of a model: .visual, .text_tower, .name (here a bare timm trunk)."""

    def __init__(self, visual):
        super().__init__()
        self.visual, self.text_tower, self.name = visual, nn.Identity(), "bare-timm"


def test_separate_q_k_v_projections_are_adapted_one_by_one():
    # EVA-02 CLIP's attention layout (eva02_base_patch16_clip_224): q_proj / k_proj / v_proj
    trunk = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=2, qkv_fused=False, num_classes=0).eval()
    x = _images(1)
    with torch.no_grad():
        ref = trunk(x)
    model = _Tower(trunk)
    inject_lora(model, rank=2, towers=["visual"])
    for b in trunk.blocks:
        assert isinstance(b.attn.k_proj, LoRABLinear) and isinstance(b.attn.v_proj, LoRABLinear)
        assert not isinstance(b.attn.q_proj, LoRABLinear)
        assert isinstance(b.mlp.fc1, LoRABLinear) and isinstance(b.mlp.fc2, LoRABLinear)  # GluMlp: fc1 holds both halves
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), ref, rtol=0, atol=0)


def test_swiglu_adapts_both_input_projections():
    trunk = timm.create_model("eva02_base_patch16_clip_224", pretrained=False, depth=1, num_classes=0).eval()
    assert type(trunk.blocks[0].mlp).__name__ == "SwiGLU"  # EVA-02 CLIP's MLP
    x = _images(1)
    with torch.no_grad():
        ref = trunk(x)
    params = inject_lora(_Tower(trunk), rank=2, towers=["visual"], targets=["c_fc"])
    mlp = trunk.blocks[0].mlp
    assert isinstance(mlp.fc1_g, LoRABLinear) and isinstance(mlp.fc1_x, LoRABLinear)
    assert not isinstance(mlp.fc2, LoRABLinear)
    with torch.no_grad():
        _close(trunk(x), ref, 1e-6)
        for p in params:  # each of the two runs: B of fc1_g alone, then of fc1_x alone, changes the output
            nn.init.normal_(p, std=0.1)
            assert _rel_diff(trunk(x), ref) > 1e-3
            nn.init.zeros_(p)


def test_a_fused_qkv_with_separate_biases_runs_its_lora():
    """EvaAttention(qkv_fused, qkv_bias) computes F.linear(x, self.qkv.weight, bias) unless
    qkv_bias_separate: injection switches that on, or the wrapped qkv would never run."""
    trunk = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, num_classes=0).eval()
    attn = trunk.blocks[0].attn
    assert attn.q_bias is not None and not attn.qkv_bias_separate
    x = _images(1)
    with torch.no_grad():
        ref = trunk(x)
    params = inject_lora(_Tower(trunk), rank=2, towers=["visual"], targets=["q", "k", "v"])
    assert attn.qkv_bias_separate and isinstance(attn.qkv, LoRAPackedLinear)
    with torch.no_grad():
        _close(trunk(x), ref, 1e-5)  # the bias is added in another order
        for p in params:
            nn.init.normal_(p, std=0.1)
        assert _rel_diff(trunk(x), ref) > 1e-2


def test_a_tower_without_transformer_blocks_is_refused():
    from segpcl_fast.config import ConfigError
    trunk = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(ConfigError, match="no transformer blocks LoRA injection knows.*lora.towers"):
        inject_lora(_Tower(trunk), towers=["visual"])


def test_the_cli_refuses_a_resnet_clip_in_one_line(tmp_path, capsys):
    """A ResNet CLIP (RN50) was a traceback with exit code 1; it is a config error now, one line, code 2."""
    from segpcl_fast.cli import main
    assert main(["train", "--set", "model.name=RN50", "--set", "model.pretrained=none", "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the visual tower of RN50 has no transformer blocks" in err[0], err


def test_torch_compile_traces_a_timm_tower_with_lora_without_graph_breaks(models):
    """Dynamo sees through the LoRA layers (custom ops with fake kernels) inside timm's blocks,
    rotary embeddings and the in-place bias add included."""
    model = copy.deepcopy(models["test-timm-eva"])
    params = inject_lora(model, rank=2, towers=["visual"])

    def step(x):
        return model.encode_image(x)[1].square().sum()
    explained = torch._dynamo.explain(step)(_images(1))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1 and params
