"""Checks added by a mutation audit of LoRA injection (segpcl_fast/model/lora.py), the peft export / import
(model/peft_adapter.py) and the class-token tail (model/vit_tail.py): each test here fails on a small semantic
change (a mutant) of that code which the rest of tests/model let through, and passes on the code as it is.
Values are checked against torch's own modules (nn.Linear, nn.MultiheadAttention), peft itself, hand-computed
W + s B A, or as a property (round trips, refusals before anything changes). Small hand-built modules
(float64) stand in for the CLIP towers where the structure alone matters, so the file runs in seconds.

Covered:
- LoRAPackedLinear: a width that is not 3 d refused; the slices in q, k, v order whatever the list's order (the
  same A per slice, the same function);
- LoRAMultiheadAttention: a sequence-first attention refused, and one using attention dropout, add_bias_kv or
  add_zero_attn (which it dropped without a word; inject_lora refuses it before changing anything); merged()
  keeping non-zero in_proj / out_proj biases (open_clip's and torch's random init leaves them zero); a float
  attn_mask used in the query's dtype;
- merged_weight: a layer whose W and A are stored in bf16 (store_frozen_weights) and B in fp32 merges in fp32,
  rounded once (same-dtype operands cannot show it: torch's bf16 addmm on CPU accumulates in fp32 already);
- outer_adapters / peft_layers: an attention's LoRA out_proj goes with the attention (no entry of its own); an
  attention without q / k / v adapters maps to zero in_proj factors, A and B both;
- hooks: a backward pre-hook on a layer inject_lora replaces, or on an adapter merge_lora replaces, is refused;
- timm-style block discovery: an attention with only some of q_proj / k_proj / v_proj, an MLP with only one of
  SwiGLU's fc1_g / fc1_x, is not a block; a fused qkv with separate biases on a timm without qkv_bias_separate
  is refused;
- load_lora_state_dict: exactly the model's LoRA tensors, a missing or an extra one refused;
- to_peft: a packed qkv adapter exported at rank n * r computes our function in peft, adapters of different
  scalings refused, the PeftModel frozen; save_peft_adapter with a named adapter writes it at the directory
  itself (peft nests named adapters) and it loads back; base_model_record's weights_seed only for random weights;
- vit_tail.qualifies: a Transformer subclass, an attention subclass or a cross-attention last block keeps the
  whole block; a hook on ln_post keeps the tail when ln_post runs after the pool (final_ln_after_pool).
"""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from segpcl_fast.config import ConfigError
from segpcl_fast.model import vit_tail
from segpcl_fast.model.lora import (LoRABLinear, LoRAMultiheadAttention, LoRAPackedLinear, inject_lora,
                                    load_lora_state_dict, lora_parameters, lora_state_dict, merge_lora,
                                    outer_adapters)
from segpcl_fast.model.peft_adapter import base_model_record, peft_layers, save_peft_adapter, to_peft, unload_lora


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomise(params, seed=1):
    gen = _gen(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ----------------------------------------------------------------------------- small timm-style towers
class _Attn(nn.Module):
    def __init__(self, d=8, qkv=True, projections=("q", "k", "v")):
        super().__init__()
        if qkv:
            self.qkv = nn.Linear(d, 3 * d)
        for s in () if qkv else projections:
            setattr(self, f"{s}_proj", nn.Linear(d, d))
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        w = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return self.proj(w @ v)


class _Mlp(nn.Module):
    def __init__(self, d=8, names=("fc1",)):
        super().__init__()
        for name in names:
            setattr(self, name, nn.Linear(d, 2 * d))
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, attn=None, mlp=None):
        super().__init__()
        self.attn, self.mlp = attn or _Attn(), mlp or _Mlp()

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class _Tower(nn.Module):
    """inject_lora's view of a model: .visual, .text_tower, .name."""

    def __init__(self, *blocks):
        super().__init__()
        self.visual, self.text_tower, self.name = nn.Sequential(*blocks), nn.Identity(), "tiny-timm"

    def forward(self, x):
        return self.visual(x)


def _tower(seed=0):
    torch.manual_seed(seed)
    return _Tower(_Block(), _Block()).double()


# ----------------------------------------------------------------------------- LoRAPackedLinear
def test_packed_linear_refuses_a_width_that_is_not_three_slices():
    with pytest.raises(ValueError, match="3 \\* d outputs, got 25"):
        LoRAPackedLinear(nn.Linear(8, 25), ["q", "v"], rank=2, alpha=2.0, generator=_gen())


def test_packed_linear_takes_its_slices_in_q_k_v_order_whatever_the_lists_order():
    """["v", "q"] and ["q", "v"] are one adapter: slices q, v, A_q drawn first, the same function for the same
    B by name (and so the same state dict as inject_lora's, which passes them in q, k, v order)."""
    base = nn.Linear(8, 24).double()
    ours = LoRAPackedLinear(copy.deepcopy(base), ["q", "v"], rank=2, alpha=3.0, generator=_gen(4))
    other = LoRAPackedLinear(copy.deepcopy(base), ["v", "q"], rank=2, alpha=3.0, generator=_gen(4))
    assert ours.slices == other.slices == ["q", "v"]
    assert list(other.lora_B) == ["q", "v"] and torch.equal(other.lora_A, ours.lora_A)
    _randomise(ours.lora_B.values())
    with torch.no_grad():
        for s in ("q", "v"):
            other.lora_B[s].copy_(ours.lora_B[s])
    x = torch.randn(3, 8, dtype=torch.float64)
    want = base(x) + 1.5 * torch.cat([(x @ ours.lora_A[:2].T) @ ours.lora_B["q"].T, torch.zeros(3, 8),
                                      (x @ ours.lora_A[2:].T) @ ours.lora_B["v"].T], dim=-1)
    torch.testing.assert_close(ours(x), want)
    torch.testing.assert_close(other(x), want)


# ----------------------------------------------------------------------------- LoRAMultiheadAttention
def test_attention_adapter_refuses_a_sequence_first_attention():
    """open_clip's blocks are batch_first: the adapter's forward reads (B, L, D); a (L, B, D) attention refused."""
    with pytest.raises(ValueError, match="batch_first self-attention"):
        LoRAMultiheadAttention(nn.MultiheadAttention(8, 2), ["q"], False, 2, 2.0, _gen())


class _OpenClipBlock(nn.Module):
    """What inject_lora takes for an open_clip block: .attn an nn.MultiheadAttention, .mlp with c_fc and c_proj."""

    def __init__(self, **attention):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **attention)
        self.mlp = nn.Sequential()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(8, 16), nn.Linear(16, 8)


@pytest.mark.parametrize("option", ["dropout", "add_bias_kv", "add_zero_attn"])
def test_an_attention_option_the_adapter_does_not_compute_is_refused_before_anything_changes(option):
    """The adapter computes none of nn.MultiheadAttention's attention dropout, bias_k / bias_v or zero key row: it
    dropped them without a word (with B = 0 it computed another function than the layer it replaced). Refused,
    by inject_lora before it freezes or replaces anything."""
    kwargs = {"dropout": {"dropout": 0.1}, "add_bias_kv": {"add_bias_kv": True},
              "add_zero_attn": {"add_zero_attn": True}}[option]
    with pytest.raises(ValueError, match=f"uses {option}, which LoRAMultiheadAttention does not compute"):
        LoRAMultiheadAttention(nn.MultiheadAttention(8, 2, batch_first=True, **kwargs), ["q"], False, 2, 2.0, _gen())
    model = _Tower(_OpenClipBlock(), _OpenClipBlock(**kwargs))
    with pytest.raises(ValueError, match=f"uses {option}"):
        inject_lora(model, rank=2, targets=["v", "c_fc"], towers="visual")
    assert not lora_parameters(model) and all(p.requires_grad for p in model.parameters())
    inject_lora(model, rank=2, targets=["c_fc"], towers="visual")  # the MLPs alone: the attention stays as it is
    assert len(lora_parameters(model)) == 2


@pytest.mark.parametrize("slices, out_lora", [(["q", "v"], True), ([], True), (["k"], False)])
def test_merged_attention_keeps_non_zero_biases(slices, out_lora):
    """merged() copies in_proj_bias and out_proj.bias: nn.MultiheadAttention initialises both to zero, so a merge
    dropping them looked right on every freshly made model."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    ref = copy.deepcopy(mha)
    attn = LoRAMultiheadAttention(mha, slices, out_lora, rank=2, alpha=4.0, generator=_gen(1))
    _randomise(lora_parameters(attn))
    merged = attn.merged()
    assert torch.equal(merged.in_proj_bias, ref.in_proj_bias) and torch.equal(merged.out_proj.bias, ref.out_proj.bias)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, x, x, need_weights=False)[0], attn(x, need_weights=False)[0],
                                   rtol=1e-6, atol=1e-6)  # the merged weights are rounded through fp32


def test_a_layer_with_bf16_stored_weights_merges_its_fp32_b_in_fp32():
    """store_frozen_weights keeps W and A in bf16 and B in fp32: merged() forms W + s B A from those in fp32 and
    rounds once to W's dtype (B is not rounded to bf16 first)."""
    layer = LoRABLinear(nn.Linear(32, 16), rank=4, alpha=8.0, generator=_gen())
    with torch.no_grad():
        layer.lora_B.normal_(std=30.0)  # s B A of the size of W, so B's rounding would show after W's
        layer.weight.data = layer.weight.data.to(torch.bfloat16)
        layer.lora_A = layer.lora_A.to(torch.bfloat16)
    merged = layer.merged()
    want = torch.addmm(layer.weight.float(), layer.lora_B, layer.lora_A.float(), alpha=2.0).to(torch.bfloat16)
    assert merged.weight.dtype == torch.bfloat16 and torch.equal(merged.weight, want)


def test_a_float_mask_is_used_in_the_querys_dtype():
    """A float attn_mask of another dtype is cast to the query's (as nn.MultiheadAttention does): a bf16 attention
    computes with the mask rounded to bf16, through SDPA and with the weights alike."""
    torch.manual_seed(0)
    attn = LoRAMultiheadAttention(nn.MultiheadAttention(16, 2, batch_first=True), ["q", "v"], False, 2, 2.0,
                                  _gen()).to(torch.bfloat16)
    x = torch.randn(2, 5, 16).to(torch.bfloat16)
    mask = torch.randn(5, 5) * 3.0  # fp32 values bf16 cannot hold
    assert not torch.equal(mask.to(torch.bfloat16).float(), mask)
    for need_weights in (False, True):
        got = attn(x, attn_mask=mask, need_weights=need_weights)
        want = attn(x, attn_mask=mask.to(torch.bfloat16), need_weights=need_weights)
        assert torch.equal(got[0], want[0])
        if need_weights:
            assert torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------- outer adapters / peft_layers
class _AttnHolder(nn.Module):
    def __init__(self, slices, out_lora=True):
        super().__init__()
        torch.manual_seed(0)
        self.attn = LoRAMultiheadAttention(nn.MultiheadAttention(8, 2, batch_first=True).double(), slices, out_lora,
                                           rank=2, alpha=3.0, generator=_gen())


def test_an_attentions_lora_out_proj_goes_with_the_attention():
    holder = _AttnHolder(["v"])
    assert isinstance(holder.attn.out_proj, LoRABLinear)
    assert [name for name, _ in outer_adapters(holder)] == ["attn"]
    assert sorted(peft_layers(holder)) == ["attn"]


def test_an_attention_with_its_out_proj_alone_maps_to_zero_in_proj_factors():
    """No q / k / v adapted: peft's in_proj adapter is A = 0 and B = 0 (peft_adapter's docstring), not only B A = 0
    (a B of ones would train as soon as A moved)."""
    holder = _AttnHolder([])
    _randomise(lora_parameters(holder))
    layer = peft_layers(holder)["attn"]
    assert layer["rank"] == 2 and not layer["A"].any() and not layer["B"].any()
    out = holder.attn.out_proj
    torch.testing.assert_close(layer["out_B"] @ layer["out_A"], out.lora_B @ out.lora_A)


# ----------------------------------------------------------------------------- hooks
def test_a_backward_pre_hook_on_a_replaced_layer_is_refused():
    model = _tower()
    handle = model.visual[1].mlp.fc2.register_full_backward_pre_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"1 layer\(s\) it replaces .* carry a hook \(e.g. visual.1.mlp.fc2\)"):
        inject_lora(model, rank=2, targets=["c_proj"], towers="visual")
    assert not lora_parameters(model) and all(p.requires_grad for p in model.parameters())
    handle.remove()
    inject_lora(model, rank=2, targets=["c_proj"], towers="visual")
    handle = model.visual[0].mlp.fc2.register_full_backward_pre_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"1 LoRA adapter\(s\) to be replaced carry a hook \(e.g. visual.0.mlp.fc2\)"):
        merge_lora(model)
    assert isinstance(model.visual[0].mlp.fc2, LoRABLinear)


# ----------------------------------------------------------------------------- timm-style block discovery
@pytest.mark.parametrize("block", [
    lambda: _Block(attn=_Attn(qkv=False, projections=("q", "k"))),  # no v_proj, no qkv
    lambda: _Block(mlp=_Mlp(names=("fc1_g",))),  # half a SwiGLU, no fc1
], ids=["two-of-three-projections", "half-a-swiglu"])
def test_a_block_with_part_of_a_layout_is_not_a_block(block):
    model = _Tower(block())
    with pytest.raises(ConfigError, match="no transformer blocks LoRA injection knows"):
        inject_lora(model, rank=2, towers="visual")
    assert all(p.requires_grad for p in model.parameters())


def test_a_fused_qkv_with_separate_biases_on_an_old_timm_is_refused():
    """timm's EVA attention before qkv_bias_separate read qkv.weight directly: LoRA on q / k / v could not run."""
    model = _tower()
    model.visual[0].attn.q_bias = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="reads its fused qkv weight directly.*upgrade timm"):
        inject_lora(model, rank=2, targets=["k", "v"], towers="visual")
    assert not lora_parameters(model)
    inject_lora(model, rank=2, targets=["c_fc"], towers="visual")  # without q, k, v it is adapted
    assert len(lora_parameters(model)) == 2


# ----------------------------------------------------------------------------- load_lora_state_dict
def test_load_lora_state_dict_takes_exactly_the_models_lora_tensors():
    model = _tower()
    inject_lora(model, rank=2, targets=["k", "v", "c_fc"], towers="visual")
    _randomise(lora_parameters(model))
    state = lora_state_dict(model)
    fresh = _tower()
    inject_lora(fresh, rank=2, targets=["k", "v", "c_fc"], towers="visual", seed=5)
    missing = dict(state)
    missing.pop(next(k for k in state if "lora_B" in k))
    with pytest.raises(ValueError, match=r"missing 1: .*unexpected 0"):
        load_lora_state_dict(fresh, missing)
    extra = {**state, "visual.9.mlp.fc1.lora_B": state[next(iter(state))]}
    with pytest.raises(ValueError, match=r"missing 0: .*unexpected 1: \['visual.9.mlp.fc1.lora_B'\]"):
        load_lora_state_dict(fresh, extra)
    assert not any(p.any() for p in lora_parameters(fresh))  # nothing loaded by a refused call
    load_lora_state_dict(fresh, state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


# ----------------------------------------------------------------------------- to_peft / save_peft_adapter
def _packed_model(alpha_fc=3.0):
    model = _tower()
    inject_lora(model, rank=2, alpha=3.0, targets=["k", "v", "c_fc"], towers="visual")
    if alpha_fc != 3.0:
        model.visual[1].mlp.fc1 = LoRABLinear(model.visual[1].mlp.fc1.merged(), rank=2, alpha=alpha_fc,
                                              generator=_gen(2))
    _randomise(lora_parameters(model))
    return model.eval()


def test_to_peft_exports_a_packed_qkv_at_rank_n_r_computing_our_function():
    peft = pytest.importorskip("peft")
    model = _packed_model()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        assert not torch.allclose(unload_lora(copy.deepcopy(model))(x), ours)  # the adapters change the function
    wrapped = to_peft(model)
    qkv = wrapped.base_model.model.visual[0].attn.qkv
    assert isinstance(qkv, peft.tuners.lora.LoraLayer) and qkv.r["default"] == 4 and qkv.scaling["default"] == 1.5
    assert wrapped.base_model.model.visual[0].mlp.fc1.r["default"] == 2
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), ours, rtol=1e-12, atol=1e-12)
    assert not any(p.requires_grad for p in wrapped.parameters())  # frozen, as the model it mirrors


def test_to_peft_refuses_adapters_of_different_scalings():
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="different scalings alpha / r"):
        to_peft(_packed_model(alpha_fc=5.0))


def test_a_named_adapter_is_written_at_the_directory_and_loads_back(tmp_path):
    peft = pytest.importorskip("peft")
    model = _packed_model()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
    out = save_peft_adapter(model, tmp_path / "adapter", adapter_name="mine")
    assert out == tmp_path / "adapter" and (out / "adapter_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    fresh = unload_lora(copy.deepcopy(model))
    loaded = peft.PeftModel.from_pretrained(fresh, str(out), adapter_name="mine")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours, rtol=1e-12, atol=1e-12)


def test_base_model_record_names_the_weights_seed_for_random_weights_only(tiny_model_name):
    random = SimpleNamespace(clip=None, name=tiny_model_name, pretrained=None, weights_seed=7, quick_gelu=False)
    record = base_model_record(random)
    assert record["weights_seed"] == 7 and record["load_with"].startswith("torch.manual_seed(7)")
    trained = SimpleNamespace(clip=None, name=tiny_model_name, pretrained="some_weights", weights_seed=7,
                              quick_gelu=False)
    record = base_model_record(trained)
    assert "weights_seed" not in record and "manual_seed" not in record["load_with"]
    assert record["pretrained"] == "some_weights"


# ----------------------------------------------------------------------------- vit_tail.qualifies
@pytest.fixture
def visual(tiny_model_name):
    import open_clip
    torch.manual_seed(0)
    return open_clip.create_model(tiny_model_name).visual


def test_a_transformer_or_attention_subclass_or_a_cross_attention_block_keeps_the_whole_block(visual):
    """qualifies() takes open_clip's own Transformer and ResidualAttentionBlock with nn.MultiheadAttention (or our
    adapter) alone: a subclass may compute otherwise (its own forward), and a cross-attention block (ln_1_kv)
    takes its keys from elsewhere."""
    assert vit_tail.qualifies(visual)
    transformer, last = visual.transformer, visual.transformer.resblocks[-1]
    for module in (transformer, last.attn):
        cls = module.__class__
        module.__class__ = type(f"My{cls.__name__}", (cls,), {})
        assert not vit_tail.qualifies(visual), cls
        module.__class__ = cls
    assert vit_tail.qualifies(visual)
    last.ln_1_kv = nn.LayerNorm(last.ln_1.normalized_shape)
    assert not vit_tail.qualifies(visual)
    del last.ln_1_kv
    last.attn = LoRAMultiheadAttention(last.attn, ["k"], True, 2, 2.0, _gen())  # our adapter qualifies
    assert vit_tail.qualifies(visual)


def test_a_hook_on_ln_post_keeps_the_tail_where_ln_post_follows_the_pool(visual):
    """ln_post before the pool would see the class token's row alone under the tail (so a hook there keeps the
    whole block); after the pool (final_ln_after_pool) it sees the pooled row either way, and the tail stays."""
    handle = visual.ln_post.register_forward_hook(lambda *a: None)
    assert not vit_tail.qualifies(visual)
    visual.final_ln_after_pool = True
    assert vit_tail.qualifies(visual)
    handle.remove()
