"""Tests added by a mutation audit of segpcl_fast/model: the text truncation really truncates (and
matches open_clip's own full-length encode_text), class embeddings against open_clip, the logit-scale
clamp, the image statistics, and LoRA's defaults, seeded Kaiming-uniform A and alpha / r scaling in
the packed attention."""
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
