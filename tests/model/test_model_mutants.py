"""Tests added by a mutation audit of segpcl_fast/model: the text truncation really truncates (and
matches open_clip's own full-length encode_text), class embeddings against open_clip, the logit-scale
clamp, the image statistics, and LoRA's defaults, seeded Kaiming-uniform A and alpha / r scaling in
the packed attention.

A second audit (the changes since 7a90c2d) added the tests after the marker below: bf16 attention weights from
fp32 scores, pack_slices' dtype, LoRAPackedLinear's mode, plain CoCa injection, peft_layers' out_proj mapping,
to_peft of a stored model and of EVA attention, frozen_cast's float64 / plain-attention / get_cast_dtype cases,
and the TF32 readers' inheritance chain."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from segpcl_fast.model.clip import load_model
from segpcl_fast.model.lora import LoRABLinear, LoRAMultiheadAttention, inject_lora

PROMPTS = ["a cat.", "a good photo of a very small striped orange cat.", "a dog.", "art of the big red car.",
           "x."]


def _seq_lengths_seen_by_text_transformer(model, fn):
    seen = []
    handle = model.text_tower.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            out = fn()
    finally:
        handle.remove()
    return seen, out


def test_text_truncation_stops_at_the_longest_prompts_eot(tiny_model_name):
    model = load_model(tiny_model_name, pretrained=None)
    tokens = model.tokenize(PROMPTS)
    context = tokens.shape[1]
    longest = int(tokens.argmax(dim=-1).max()) + 1  # EOT (the largest token id) of the longest prompt, inclusive
    assert longest < context
    seen, short = _seq_lengths_seen_by_text_transformer(model, lambda: model.encode_text(tokens))  # default
    assert seen == [longest]
    seen, full = _seq_lengths_seen_by_text_transformer(model, lambda: model.clip.encode_text(tokens))
    assert seen == [context]
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)  # open_clip's own full-length run
    # each prompt alone, truncated at its own EOT, gives the same embedding as in the batch
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            alone = model.encode_text(model.tokenize([p]))
        torch.testing.assert_close(alone[0], full[i], rtol=1e-5, atol=1e-6)
    seen, _ = _seq_lengths_seen_by_text_transformer(model, lambda: model.class_embeddings([[p] for p in PROMPTS]))
    assert seen == [longest]


def test_class_embeddings_equal_open_clips_normalised_prompt_means(tiny_model_name):
    """u_c = normalise(mean_k normalise(encode_text(prompt_ck))), for uneven prompt counts and across
    text batches (batch_size smaller than the number of prompts)."""
    model = load_model(tiny_model_name, pretrained=None)
    prompts = [[PROMPTS[0]], PROMPTS[1:4], [PROMPTS[4], PROMPTS[0]]]
    with torch.no_grad():
        per_prompt = F.normalize(model.clip.encode_text(model.tokenize([p for ps in prompts for p in ps])), dim=-1)
        want = F.normalize(torch.stack([per_prompt[0], per_prompt[1:4].mean(0), per_prompt[4:6].mean(0)]), dim=-1)
        for batch_size in (1024, 2):
            got = model.class_embeddings(prompts, batch_size=batch_size)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        single = model.class_embeddings([[p] for p in PROMPTS], batch_size=2)
        ref = model.clip.encode_text(model.tokenize(PROMPTS), normalize=True)
    torch.testing.assert_close(single, ref, rtol=1e-5, atol=1e-6)


def test_logit_scale_is_clamped_at_100_as_clip_does(tiny_model_name):
    model = load_model(tiny_model_name, pretrained=None)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(250.0))
    assert float(model.logit_scale().detach()) == 100.0
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(30.0))
    assert abs(float(model.logit_scale().detach()) - 30.0) < 1e-4


def test_image_stats_are_open_clips_preprocessing_and_model_is_in_eval_mode(tiny_model_name):
    import open_clip
    from segpcl_fast.model import clip as clip_module
    model = load_model(tiny_model_name, pretrained=None)
    cfg = open_clip.get_model_preprocess_cfg(model.clip)
    assert model.image_stats.size == cfg["size"][0]
    assert model.image_stats.mean == tuple(cfg["mean"]) == open_clip.constants.OPENAI_DATASET_MEAN
    assert model.image_stats.std == tuple(cfg["std"]) == open_clip.constants.OPENAI_DATASET_STD
    assert clip_module._OPENAI_MEAN == open_clip.constants.OPENAI_DATASET_MEAN
    assert clip_module._OPENAI_STD == open_clip.constants.OPENAI_DATASET_STD
    assert not model.clip.training


# ----------------------------------------------------------------------------- LoRA
def test_inject_lora_defaults_are_method_md(tiny_model_name):
    """rank 32, alpha 32 (s = alpha / r = 1), targets K, V, c_fc, c_proj, both towers."""
    from segpcl_fast.config import LoRAConfig
    cfg = LoRAConfig()
    assert (cfg.rank, cfg.alpha, list(cfg.targets), list(cfg.towers)) == (32, 32.0, ["k", "v", "c_fc", "c_proj"],
                                                                          ["visual", "text"])
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model)
    attn = [m for m in model.modules() if isinstance(m, LoRAMultiheadAttention)]
    linears = [m for m in model.modules() if isinstance(m, LoRABLinear)]
    assert len(attn) == 4 and all(a.slices == ["k", "v"] and a.scaling == 1.0 and a.rank == 32 for a in attn)
    assert all(not isinstance(a.out_proj, LoRABLinear) for a in attn)
    assert len(linears) == 8 and all(m.scaling == 1.0 and m.rank == 32 for m in linears)


def test_lora_a_is_seeded_kaiming_uniform():
    def a_of(seed):
        return LoRABLinear(torch.nn.Linear(768, 64), rank=32, alpha=32.0,
                           generator=torch.Generator().manual_seed(seed)).lora_A
    a0, again, a1 = a_of(0), a_of(0), a_of(1)
    assert torch.equal(a0, again) and not torch.equal(a0, a1)
    bound = 1 / math.sqrt(768)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as peft / nn.Linear
    assert float(a0.abs().max()) <= bound + 1e-7 and float(a0.abs().max()) > 0.99 * bound
    assert abs(float(a0.std()) - bound / math.sqrt(3)) < 0.02 * bound


def test_inject_lora_seed_draws_the_a_matrices(tiny_model_name):
    def a_matrices(seed):
        model = load_model(tiny_model_name, pretrained=None)
        inject_lora(model, rank=4, seed=seed)
        return {k: v for k, v in model.state_dict().items() if "lora_A" in k}
    a0, again, a1 = a_matrices(0), a_matrices(0), a_matrices(1)
    assert a0.keys() == a1.keys() and all(torch.equal(a0[k], again[k]) for k in a0)
    assert all(not torch.equal(a0[k], a1[k]) for k in a0)


def test_packed_attention_scales_by_alpha_over_r_and_freezes_out_proj():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    attn = LoRAMultiheadAttention(mha, ["q", "v"], out_lora=False, rank=2, alpha=8.0,
                                  generator=torch.Generator().manual_seed(0))
    assert [n for n, p in attn.named_parameters() if p.requires_grad] == ["lora_B.q", "lora_B.v"]
    for p in attn.lora_B.values():
        torch.nn.init.normal_(p)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    ref.load_state_dict(mha.state_dict())
    with torch.no_grad():  # W + (alpha / r) B A on the q rows (0:16) and v rows (32:48), by hand
        ref.in_proj_weight[:16] += 4.0 * attn.lora_B["q"] @ attn.lora_A[:2]
        ref.in_proj_weight[32:] += 4.0 * attn.lora_B["v"] @ attn.lora_A[2:]
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(attn(x)[0], ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_lora_state_dict_holds_a_and_b_and_nothing_else(tiny_model_name):
    """The whole trained state of a run: every frozen A buffer and every B, copied."""
    from segpcl_fast.model.lora import lora_state_dict
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, targets=["q", "v", "out", "c_fc"])
    state = lora_state_dict(model)
    full = model.state_dict()
    assert set(state) == {k for k in full if "lora_A" in k or "lora_B" in k}
    assert any("lora_A" in k for k in state) and any("lora_B" in k for k in state)
    assert all(torch.equal(state[k], full[k]) and state[k].data_ptr() != full[k].data_ptr() for k in state)


@pytest.mark.parametrize("tower", ["visual", "text"])
def test_towers_option_adapts_only_the_chosen_tower(tiny_model_name, tower):
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, towers=[tower])
    adapted = (LoRABLinear, LoRAMultiheadAttention)
    in_visual = sum(isinstance(m, adapted) for m in model.visual.modules())
    in_text = sum(isinstance(m, adapted) for m in model.clip.transformer.modules())
    assert (in_visual, in_text) == ((2 * 3, 0) if tower == "visual" else (0, 2 * 3))


# ----------------------------------------------------------------------------- text pooling other than argmax
@pytest.mark.parametrize("pool", [{"pool_type": "last", "no_causal_mask": True},  # CLIPA's text tower
                                  {"pool_type": "first"}, {"pool_type": "eos", "eos_id": 2}])  # MetaCLIP-2 style
def test_truncation_matches_full_length_for_non_argmax_text_pooling(tmp_path, pool):
    """Only argmax pooling behind a causal mask may be truncated; the others must equal open_clip's
    full-length encode_text (open_clip keeps the pooling as CLIP.text_pool_type, not pool_type)."""
    import dataclasses

    import open_clip
    from open_clip.model import CLIPTextCfg
    missing = set(pool) - {f.name for f in dataclasses.fields(CLIPTextCfg)}
    if missing:
        pytest.skip(f"open_clip {open_clip.__version__} has no text config field {sorted(missing)}")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, **pool}}
    name = f"audit-tiny-{pool['pool_type']}"
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    model = load_model(name, pretrained=None)
    tokens = model.tokenize(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.clip.encode_text(tokens), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- mutation audit since 7a90c2d
def test_bf16_attention_weights_come_from_fp32_scores():
    """need_weights=True in bf16: the scores q k^T / sqrt(D) are computed in fp32 from the bf16 q and k (as SDPA's
    kernels do) and the softmax rounded once to bf16; scores in bf16 would be rounded to 8 bits first."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    attn = LoRAMultiheadAttention(mha, ["q", "v"], out_lora=False, rank=2, alpha=2.0,
                                  generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = (4 * torch.randn(2, 7, 32)).to(torch.bfloat16)  # scores of some tens: bf16 spacing 0.125 .. 0.5 there
    out, weights = attn(x, x, x, average_attn_weights=False)
    q, k, v = (t.view(2, 7, 2, 16).transpose(1, 2) for t in attn._project(x).chunk(3, dim=-1))
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(16)
    assert scores.abs().max() > 8
    want = torch.softmax(scores, dim=-1).to(torch.bfloat16)
    torch.testing.assert_close(weights, want, rtol=0, atol=0)
    torch.testing.assert_close(out, attn.out_proj((want @ v).transpose(1, 2).reshape(2, 7, 32)), rtol=0, atol=0)


def test_a_float64_tower_is_not_stored_in_the_autocast_dtype(tiny_model_name):
    """Autocast leaves float64 operands alone (frozen_cast._CASTABLE): a float64 model's frozen weights are not
    stored in bf16 (that would change its results), and nothing reads as stored."""
    from segpcl_fast.model import frozen_cast
    model = load_model(tiny_model_name, pretrained=None).double()
    model.set_precision(image="bf16")
    inject_lora(model, rank=2, alpha=2.0)
    assert len(list(frozen_cast.frozen_operands(model, "visual"))) == 0
    assert model.store_frozen_weights() == {"visual": 0} and model.frozen_storage == {}
    assert all(t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point())


def test_storing_keeps_a_get_cast_dtype_the_caller_set_on_the_instance(tiny_model_name):
    """store_frozen pins open_clip's get_cast_dtype only where the transformer still uses its class's method; one set
    on the instance (a caller's own) is left in place through store and restore."""
    model = load_model(tiny_model_name, pretrained=None)
    model.set_precision(image="fp32", text="bf16")
    inject_lora(model, rank=2, alpha=2.0)
    transformer = model.text_tower.transformer

    def own():
        return torch.float32
    transformer.get_cast_dtype = own
    assert model.store_frozen_weights()["text"] > 0
    assert vars(transformer)["get_cast_dtype"] is own
    model.restore_frozen_weights()
    assert vars(transformer)["get_cast_dtype"] is own


def test_packed_lora_b_takes_bs_dtype_in_a_bf16_attention():
    """pack_slices makes an unadapted slice's zero rows in B's dtype: a bf16 attention adapted on q alone packs a
    bf16 B_full [B_q; 0; 0] and runs in bf16 (zeros of another dtype promoted the product to fp32)."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).to(torch.bfloat16)
    attn = LoRAMultiheadAttention(mha, ["q"], out_lora=False, rank=2, alpha=2.0,
                                  generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attn.lora_B["q"].normal_()
    packed = attn.packed_lora_B()
    assert packed.dtype == torch.bfloat16 and packed.shape == (48, 2)
    assert torch.equal(packed[:16], attn.lora_B["q"]) and not packed[16:].any()
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    assert attn._project(x).dtype == torch.bfloat16
    assert attn(x, need_weights=False)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("training", [False, True])
def test_packed_linear_and_its_merge_keep_the_mode_of_the_layer_they_replace(training):
    """timm's packed qkv (LoRAPackedLinear) in the mode of the nn.Linear it wraps, and its merged nn.Linear in the
    adapter's mode (a fresh module is in train mode), as LoRABLinear and the attention adapter do."""
    from segpcl_fast.model.lora import LoRAPackedLinear
    base = torch.nn.Linear(8, 24).train(training)
    packed = LoRAPackedLinear(base, ["q", "v"], rank=2, alpha=2.0, generator=torch.Generator().manual_seed(0))
    assert packed.training is training
    assert packed.merged().training is training


def test_a_plain_open_clip_coca_gets_adapters_in_its_text_tower_alone(tiny_coca_name):
    """inject_lora on a plain open_clip model whose text tower is `.text` (CustomTextCLIP, CoCa): towers="text"
    adapts exactly the modules the CLIPModel wrapper adapts (its text tower), not the image tower's blocks nor
    CoCa's text decoder."""
    import open_clip
    wrapped = load_model(tiny_coca_name, pretrained=None)
    plain = open_clip.create_model(tiny_coca_name)
    inject_lora(wrapped, rank=2, towers="text")
    inject_lora(plain, rank=2, towers="text")
    kinds = (LoRABLinear, LoRAMultiheadAttention)
    adapted = [n for n, m in plain.named_modules() if isinstance(m, kinds)]
    assert adapted and all(n.startswith("text.") for n in adapted)
    assert adapted == [n.removeprefix("clip.") for n, m in wrapped.named_modules() if isinstance(m, kinds)]


@pytest.mark.parametrize("targets", [["out"], ["q", "v", "out"]])
def test_peft_layers_map_an_attentions_out_proj_adapter_at_the_attentions_rank(tiny_model_name, targets):
    """peft adapts an nn.MultiheadAttention's in_proj and out_proj with one rank R = max(n, 1) * r (n adapted q/k/v
    slices): the out_proj adapter's A and B are zero-padded to R (A rows, B columns), an attention with no slice
    adapted gets R = r and zero in_proj factors; s B A of each equals our adapter's (checked without peft, whose
    0.21 adds the out_proj delta twice and so is refused by to_peft)."""
    from segpcl_fast.model.peft_adapter import peft_layers
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=2, alpha=3.0, targets=targets, towers="visual")
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen))
    layers = peft_layers(model.clip)
    attns = [(n, m) for n, m in model.clip.named_modules() if isinstance(m, LoRAMultiheadAttention)]
    assert attns and all(n in layers for n, _ in attns)
    n_slices = len([t for t in targets if t in "qkv"])
    for name, m in attns:
        v, d, r = layers[name], m.embed_dim, m.rank
        big = max(n_slices, 1) * r
        assert v["rank"] == big and v["scaling"] == 1.5
        assert v["A"].shape == (big, d) and v["B"].shape == (3 * d, big)
        assert v["out_A"].shape == (big, d) and v["out_B"].shape == (d, big)
        want_in = m.packed_lora_B() @ m.lora_A if n_slices else torch.zeros(3 * d, d)
        torch.testing.assert_close(v["B"] @ v["A"], want_in, rtol=0, atol=0)
        torch.testing.assert_close(v["out_B"] @ v["out_A"], m.out_proj.lora_B @ m.out_proj.lora_A)


def test_to_peft_of_a_stored_model_holds_fp32_base_weights_at_the_values_the_run_used(tiny_model_name):
    """A model whose frozen weights are stored in bf16 (store_frozen_weights) gives a peft model over fp32 weights
    (open_clip's dtype), holding the bf16-rounded values the run computed with; the model given stays stored."""
    pytest.importorskip("peft")
    from segpcl_fast.model.peft_adapter import to_peft
    model = load_model(tiny_model_name, pretrained=None)
    model.set_precision(image="bf16")
    inject_lora(model, rank=2, alpha=2.0, targets=["c_fc"], towers="visual")
    model.store_frozen_weights()
    stored = model.visual.transformer.resblocks[0].mlp.c_fc.weight
    assert stored.dtype == torch.bfloat16
    inner = to_peft(model).base_model.model
    assert all(t.dtype == torch.float32 for t in inner.state_dict().values() if t.is_floating_point())
    base = inner.visual.transformer.resblocks[0].mlp.c_fc.get_base_layer().weight
    assert torch.equal(base, stored.float())
    assert model.frozen_storage == {"visual": torch.bfloat16} and stored.dtype == torch.bfloat16


def test_to_peft_refuses_a_fused_qkv_with_separate_q_v_biases():
    """timm's EVA attention (a fused qkv beside its own q_bias / v_bias) reads qkv.weight directly on a freshly
    created model, never calling a peft layer: to_peft refuses it instead of writing an adapter that would be dropped."""
    pytest.importorskip("peft")
    from segpcl_fast.model.lora import LoRAPackedLinear
    from segpcl_fast.model.peft_adapter import to_peft

    class EvaLikeAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = LoRAPackedLinear(torch.nn.Linear(8, 24, bias=False), ["q", "v"], rank=2, alpha=2.0,
                                        generator=torch.Generator().manual_seed(0))
            self.q_bias, self.v_bias = torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.zeros(8))
    model = torch.nn.Sequential(EvaLikeAttention())
    with pytest.raises(NotImplementedError, match="separate q / v biases"):
        to_peft(model)


def test_a_plain_attention_left_unadapted_is_not_stored_in_bf16(tiny_model_name):
    """frozen_cast leaves plain nn.MultiheadAttention to torch's own paths (one reads its weights without autocast's
    casts): with LoRA on the MLPs alone, no attention weight, out_proj included, is stored in bf16, and the image
    features stay what per-call autocast computes, bit for bit."""
    import copy
    per_call = load_model(tiny_model_name, pretrained=None)
    per_call.set_precision(image="bf16")
    inject_lora(per_call, rank=2, alpha=2.0, targets=["c_fc", "c_proj"], towers="visual")
    stored = copy.deepcopy(per_call)
    assert stored.store_frozen_weights()["visual"] > 0
    attn = stored.visual.transformer.resblocks[0].attn
    assert type(attn) is torch.nn.MultiheadAttention
    assert {t.dtype for t in attn.parameters()} == {torch.float32}
    assert stored.visual.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(stored.raw_features(x), per_call.raw_features(x))


def test_tf32_readers_follow_the_process_wide_precision_when_a_switch_inherits(monkeypatch):
    """A switch at "none" inherits torch.backends.fp32_precision (and cuDNN's convolutions cudnn.fp32_precision
    first): the readers resolve that chain themselves, for torch versions whose getters answer "none" as set. Read
    from a stand-in for torch.backends (torch's own switches are not touched)."""
    from types import SimpleNamespace

    from segpcl_fast.model import tf32
    matmul = SimpleNamespace(fp32_precision="none", allow_tf32=False)
    conv = SimpleNamespace(fp32_precision="none")
    cudnn = SimpleNamespace(conv=conv, fp32_precision="none", allow_tf32=False)
    backends = SimpleNamespace(fp32_precision="tf32", cuda=SimpleNamespace(matmul=matmul), cudnn=cudnn)
    monkeypatch.setattr(tf32, "torch", SimpleNamespace(backends=backends))
    assert tf32.cuda_matmul_tf32() is True and tf32.cudnn_conv_tf32() is True
    cudnn.fp32_precision = "ieee"  # cuDNN's own switch comes before the process-wide one
    assert tf32.cudnn_conv_tf32() is False and tf32.cuda_matmul_tf32() is True
    matmul.fp32_precision = "ieee"  # a switch set explicitly wins
    assert tf32.cuda_matmul_tf32() is False
    backends.fp32_precision, matmul.fp32_precision = "none", "none"  # "none" all the way: IEEE fp32
    assert tf32.cuda_matmul_tf32() is False
