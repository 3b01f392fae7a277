import copy
import importlib.util

import pytest
import torch

from segpcl_fast import ops
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


def test_b_zero_reproduces_pretrained_exactly(vit_b16, monkeypatch):
    """With B = 0 every LoRA layer adds exactly nothing: the whole-block path (nn.MultiheadAttention's
    GEMMs on both sides) reproduces the plain model bit for bit. Through the class-token tail the LoRA
    attention projects the class token's query as its own GEMM where nn.MultiheadAttention projects a
    transposed view of it; CPU BLAS may round those two layouts differently (torch 2.11's does, by up
    to 4e-7; 2.14's does not), so there the two agree to float32 rounding."""
    ref = copy.deepcopy(vit_b16).train()  # train mode + grad: nn.MultiheadAttention's standard path
    model = copy.deepcopy(vit_b16).train()
    inject_lora(model)
    x = torch.randn(2, 3, 224, 224)
    tokens = ref.tokenize(["a good photo of a dog.", "a photo of a small red car on a road."])
    with monkeypatch.context() as env:
        env.setenv("SEGPCL_VIT_TAIL", "full")
        r0, v0 = ref.encode_image(x)
        r1, v1 = model.encode_image(x)
    assert torch.equal(r0, r1) and torch.equal(v0, v1)
    assert torch.equal(ref.encode_text(tokens), model.encode_text(tokens))
    r_tail, v_tail = model.encode_image(x)  # the default: the last block for the class token
    torch.testing.assert_close(r_tail, r0, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(v_tail, v0, rtol=1e-5, atol=2e-6)


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


def test_lora_linear_standalone_with_the_global_generator():
    """Without a generator A comes from torch's global one (reproducible under manual_seed, as nn.Linear's
    init); B starts at zero, so the layer is its base linear until B trains; a bad base or rank is refused."""
    base, other = torch.nn.Linear(12, 20), torch.nn.Linear(12, 20)
    torch.manual_seed(3)
    layer = LoRABLinear(base, rank=4, alpha=8)
    torch.manual_seed(3)
    again = LoRABLinear(other, rank=4, alpha=8)
    assert torch.equal(layer.lora_A, again.lora_A) and layer.lora_A.abs().sum() > 0
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), base(x))
    layer(x).sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0 and base.weight.grad is None
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRABLinear(torch.nn.Conv2d(3, 3, 1), rank=4, alpha=8)
    for rank in (0, -2, 2.5):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            LoRABLinear(torch.nn.Linear(12, 20), rank=rank, alpha=8)


def test_every_adapter_checks_alpha_and_runs_on_the_meta_device():
    """Each adapter refuses a NaN / inf / non-positive alpha as inject_lora does (a NaN alpha made the output NaN
    while B was still 0), and runs on the meta device as nn.Linear does (shape inference, deferred init)."""
    for alpha in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="LoRABLinear: alpha must be a finite number > 0"):
            LoRABLinear(torch.nn.Linear(12, 20), rank=4, alpha=alpha)
        with pytest.raises(ValueError, match="LoRAMultiheadAttention: alpha must be a finite number > 0"):
            LoRAMultiheadAttention(torch.nn.MultiheadAttention(8, 2, batch_first=True), ["q"], True, 2, alpha,
                                   torch.Generator())
    with torch.device("meta"):
        layer = LoRABLinear(torch.nn.Linear(16, 8), rank=2, alpha=2)
        attention = LoRAMultiheadAttention(torch.nn.MultiheadAttention(8, 2, batch_first=True), ["q", "v"], True, 2,
                                           2.0, torch.Generator())
    for backend in ("auto", "reference"):
        with ops.backend(backend):
            assert layer(torch.empty(4, 16, device="meta")).shape == (4, 8)
            x = torch.empty(3, 5, 8, device="meta")
            assert attention(x, x, x)[0].shape == (3, 5, 8)


def test_jit_trace_of_a_lora_model_passes_its_check_and_holds_aten_ops_only(tiny_model_name):
    """torch.jit.trace checks a trace by tracing again under no_grad: "auto" picked the C++ op with B trainable
    and the merged GEMM without a gradient, so the check failed ("Graphs differed across invocations"), and the
    trace held segpcl::lora_b_linear_fwd, which the TorchScript needs segpcl_fast._C to load. Under tracing "auto"
    runs the reference: one trace, of aten ops, computing the model's output and B's gradients."""
    import warnings
    torch.manual_seed(0)
    model = load_model(tiny_model_name, pretrained=None).eval()
    params = inject_lora(model, rank=4, targets=["q", "v", "c_fc"])
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32)

    class ImageEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            return self.model.encode_image(images)[1]
    module = ImageEmbedding()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (x,))  # (its check raised before)
    assert not [n.kind() for n in traced.inlined_graph.nodes() if "segpcl" in n.kind()]
    torch.testing.assert_close(traced(x), module(x), rtol=1e-5, atol=1e-6)
    traced(x).square().sum().backward()
    traced_grads = [p.grad.clone() for p in params if p.grad is not None]
    for p in params:
        p.grad = None
    module(x).square().sum().backward()
    eager_grads = [p.grad for p in params if p.grad is not None]
    assert len(traced_grads) == len(eager_grads) > 0
    for a, b in zip(traced_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


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


def _mha_and_lora(seed=0):
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).train()
    attn = LoRAMultiheadAttention(copy.deepcopy(mha), ["q", "k", "v"], out_lora=True, rank=2, alpha=2.0,
                                  generator=torch.Generator().manual_seed(0))
    for b in attn.lora_B.values():  # B != 0, so the LoRA path runs; the peer is the merged MHA
        torch.nn.init.normal_(b, std=0.1)
    return attn.merged().train(), attn


def test_attention_takes_torch_mha_s_signature_weights_and_padding():
    """nn.MultiheadAttention's forward, positional order included: need_weights (torch's default True) returns the
    weights, averaged or per head; key_padding_mask (bool or additive; also given positionally, 4th) joins attn_mask;
    is_causal is a hint needing attn_mask. Before, the weights were None and a positional padding mask landed in
    need_weights, ignored."""
    plain, attn = _mha_and_lora()
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:], padding[2, 1] = True, True
    causal = torch.full((6, 6), float("-inf")).triu(1)
    cases = [((x, x, x), {}), ((x, x, x), {"average_attn_weights": False}), ((x, x, x, padding), {}),
             ((x, x, x), {"key_padding_mask": padding.float() * -1e4, "attn_mask": causal}),
             ((x, x, x), {"key_padding_mask": padding, "attn_mask": causal, "is_causal": True, "need_weights": False}),
             ((x[:, :1], x, x), {"key_padding_mask": padding})]
    for args, kwargs in cases:
        want_out, want_weights = plain(*args, **kwargs)
        got_out, got_weights = attn(*args, **kwargs)
        torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
        if want_weights is None:
            assert got_weights is None
        else:
            assert got_weights.shape == want_weights.shape
            torch.testing.assert_close(got_weights, want_weights, rtol=1e-5, atol=1e-6)
    unpadded = attn(x, x, x, need_weights=False)[0]
    assert not torch.allclose(attn(x, x, x, padding, False)[0], unpadded)  # the positional mask is applied
    with pytest.raises(RuntimeError, match="is_causal is a hint .* pass attn_mask too"):
        attn(x, x, x, is_causal=True)


@pytest.mark.parametrize("kind", ["per_sample_heads_float", "per_sample_heads_bool", "shared_bool"])
def test_attention_takes_every_mask_torch_mha_takes(kind):
    """(B*H, L, S) masks differ per sample and head (open_clip's padding and CoCa class-token
    masks): broadcasting them over the batch instead of viewing them as (B, H, L, S) fails for B > 1
    or mixes samples; bool masks are True where attention is NOT allowed (MHA's convention)."""
    mha, attn = _mha_and_lora()
    B, H, L = 3, 4, 6
    x = torch.randn(B, L, 16)
    allowed = torch.rand(B * H, L, L) > 0.4
    allowed |= torch.eye(L, dtype=torch.bool)  # every query sees at least itself (no all -inf rows)
    if kind == "per_sample_heads_float":
        mask = torch.zeros(B * H, L, L).masked_fill_(~allowed, float("-inf"))
    elif kind == "per_sample_heads_bool":
        mask = ~allowed
    else:
        mask = ~allowed[0]
    ref = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(attn(x, x, x, attn_mask=mask)[0], ref)
    with pytest.raises(ValueError, match=r"\(batch \* heads, L, S\) = \(12, ...\), got \(4, 6, 6\)"):
        attn(x, x, x, attn_mask=torch.zeros(H, L, L))


def test_coca_text_tower_with_lora_runs_several_prompts(tiny_coca_name):
    """CoCa's text tower gives every block a (B*heads, L, L) padding + class-token mask: with LoRA
    injected and B = 0 it computes what open_clip's own CoCa computes, prompt by prompt."""
    ref = load_model(tiny_coca_name, pretrained=None)
    model = copy.deepcopy(ref)
    inject_lora(model, rank=4)
    for b in lora_parameters(model):
        assert not b.any()
    prompts = [["a photo of a {}.".format(c), "a {}.".format(c)] for c in ("dog", "very small striped cat")]
    with torch.no_grad():
        got = model.class_embeddings(prompts)
        want = ref.class_embeddings(prompts)
        one_by_one = torch.stack([ref.class_embeddings([p]) for p in prompts]).squeeze(1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, one_by_one, rtol=1e-5, atol=1e-6)
    # and it trains: every text block's B gets a finite, non-zero gradient through the masked attention
    text_b = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.text.")]
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.01)  # B = 0 gives A-side products zero gradient in the next layer only
    model.class_embeddings(prompts).square().sum().backward()
    assert text_b and all(p.grad is not None and p.grad.isfinite().all() and p.grad.any() for p in text_b)


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
    for rank in (0, 4.5, True):  # 4.5 failed deep inside torch.empty
        with pytest.raises(ValueError, match=f"rank must be a positive integer, got {rank}"):
            inject_lora(model, rank=rank)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        inject_lora(model, rank=4, alpha=float("nan"))
    with pytest.raises(ValueError, match=r"unknown tower\(s\) \['both'\]"):  # the name, not its letters
        inject_lora(model, towers="both")
    for empty in ({"targets": []}, {"towers": ()}):  # froze the whole model and trained nothing, silently
        with pytest.raises(ValueError, match="nothing would train"):
            inject_lora(model, rank=4, **empty)
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen
    with pytest.raises(TypeError, match="inject_lora takes a CLIP.*LoRABLinear"):
        inject_lora(torch.nn.Linear(4, 4), rank=2)


def test_a_second_injection_is_refused_by_name(tiny_model_name):
    """A second inject_lora found no plain blocks (they hold LoRA modules now) and said the tower had no transformer
    blocks: 'pick a ViT model' (a review's finding)."""
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4)
    with pytest.raises(ValueError, match=r"already has \d+ LoRA layers .*inject once"):
        inject_lora(model, rank=4)


@pytest.mark.parametrize("where", ["text_c_fc", "visual_attn", "visual_c_proj_pre"])
def test_a_hook_on_a_layer_the_injection_replaces_is_refused_by_name(tiny_model_name, where):
    """inject_lora puts new modules in place of the adapted layers: a hook registered on the old one stopped firing
    without a word (peft keeps the layer as base_layer and its hooks fire). Refused before anything changes."""
    model = load_model(tiny_model_name, pretrained=None)
    block = {"text_c_fc": model.clip.transformer.resblocks[0], "visual_attn": model.visual.transformer.resblocks[-1],
             "visual_c_proj_pre": model.visual.transformer.resblocks[0]}[where]
    fired = []
    if where == "text_c_fc":
        block.mlp.c_fc.register_forward_hook(lambda *a: fired.append(1))
    elif where == "visual_attn":
        block.attn.register_forward_hook(lambda *a: fired.append(1))
    else:
        block.mlp.c_proj.register_forward_pre_hook(lambda *a: fired.append(1))
    with pytest.raises(ValueError, match=r"hook.*(c_fc|attn|c_proj).*inject_lora first"):
        inject_lora(model, rank=4, targets=["k", "v", "c_fc", "c_proj"])
    assert not lora_parameters(model) and not any(isinstance(m, (LoRABLinear, LoRAMultiheadAttention))
                                                  for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen either: the model as it was
    # a layer the targets leave alone may keep its hook
    model = load_model(tiny_model_name, pretrained=None)
    model.clip.transformer.resblocks[0].mlp.c_fc.register_forward_hook(lambda *a: fired.append(1))
    inject_lora(model, rank=4, targets=["k", "v", "c_proj"])
    model.encode_text(model.tokenize(["a photo"]))
    assert fired


def test_merge_and_unload_refuse_an_adapter_carrying_a_hook(tiny_model_name):
    """merge_lora / unload_lora put plain layers in place of the adapters: a hook on an adapter would stay on the
    module taken out. Refused by name before anything changes; once the hook is removed, the merge runs."""
    from segpcl_fast.model.peft_adapter import unload_lora
    from segpcl_fast.model.lora import merge_lora
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4)
    adapters = lambda m: [n for n, x in m.named_modules() if isinstance(x, (LoRABLinear, LoRAMultiheadAttention))]  # noqa: E731
    before = adapters(model)
    handle = model.visual.transformer.resblocks[1].mlp.c_fc.register_forward_hook(lambda *a: None)
    for replace in (merge_lora, unload_lora):
        with pytest.raises(ValueError, match=r"1 LoRA adapter\(s\) to be replaced carry a hook \(e.g. "
                                             r".*resblocks.1.mlp.c_fc\).*register it again on the plain layer"):
            replace(model)
        assert adapters(model) == before  # every adapter still in place
    handle.remove()
    merge_lora(model)
    assert not lora_parameters(model)


def test_a_plain_open_clip_model_takes_the_same_adapters(tiny_model_name):
    """inject_lora(open_clip.create_model(...)) (a review's finding: only segpcl_fast's CLIPModel was taken, with a
    raw AttributeError otherwise): the same B parameters, in the same order, as the CLIPModel wrapper gets for
    the same seed, and with those B both compute the same image and text embeddings."""
    import open_clip
    wrapped = load_model(tiny_model_name, pretrained=None)
    plain = open_clip.create_model(tiny_model_name).eval()
    plain.load_state_dict(wrapped.clip.state_dict())
    ours, theirs = inject_lora(wrapped, rank=4, alpha=8.0, seed=3), inject_lora(plain, rank=4, alpha=8.0, seed=3)
    assert [p.shape for p in ours] == [p.shape for p in theirs] and len(ours) > 0
    assert [n for n, p in plain.named_parameters() if p.requires_grad] == \
        [n.removeprefix("clip.") for n, p in wrapped.named_parameters() if p.requires_grad]
    for a, b in zip(ours, theirs):
        torch.nn.init.normal_(a, std=0.2)
        with torch.no_grad():
            b.copy_(a)
    images = torch.randn(2, 3, wrapped.image_stats.size, wrapped.image_stats.size)
    tokens = open_clip.get_tokenizer(tiny_model_name)(["a photo of a dog.", "a car."])
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), wrapped.clip.encode_image(images))
        torch.testing.assert_close(plain.encode_text(tokens), wrapped.clip.encode_text(tokens))
        adapted = plain.encode_image(images)
        for p in theirs:
            p.zero_()
        assert (plain.encode_image(images) - adapted).abs().max() > 1e-2  # the adapters are in its forward


def test_one_tower_or_target_may_be_named_alone(tiny_model_name):
    model = load_model(tiny_model_name, pretrained=None)
    params = inject_lora(model, rank=4, targets="c_fc", towers="text")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(params) == len(names) > 0 and all(".visual." not in n and "c_fc" in n for n in names), names


@pytest.mark.parametrize("targets", [("k", "v", "c_fc", "c_proj"), ("q", "v", "out"), ("c_fc",)])
def test_merge_lora_is_plain_open_clip_computing_the_same_function(tiny_model_name, targets):
    """merge_lora folds W + s B A into every adapted weight: no LoRA module is left, the state dict
    loads strictly into a fresh open_clip model of the same name, and both towers compute what the
    adapted model computes (B random, so every slice's update matters)."""
    import open_clip
    from segpcl_fast.model.lora import merge_lora
    model = load_model(tiny_model_name, pretrained=None)
    params = inject_lora(model, rank=4, alpha=8.0, targets=targets)
    for p in params:
        torch.nn.init.normal_(p, std=0.2)
    images = torch.randn(3, 3, model.image_stats.size, model.image_stats.size)
    prompts = [["a photo of a dog."], ["a small red car on a long road.", "a car."]]
    with torch.no_grad():
        raw, emb = model.encode_image(images)
        text = model.class_embeddings(prompts)
    merged = copy.deepcopy(model)
    n_adapted = sum(isinstance(m, (LoRABLinear, LoRAMultiheadAttention)) for m in model.modules())
    assert n_adapted > 0 and merge_lora(merged) is merged  # in place, the model returned (peft's merge_and_unload)
    assert not any(isinstance(m, (LoRABLinear, LoRAMultiheadAttention)) for m in merged.modules())
    assert not [k for k in merged.state_dict() if "lora_" in k]
    with torch.no_grad():
        raw_m, emb_m = merged.encode_image(images)
        text_m = merged.class_embeddings(prompts)
    torch.testing.assert_close(raw_m, raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb_m, emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_m, text, atol=1e-5, rtol=1e-5)
    fresh = open_clip.create_model(tiny_model_name).eval()
    fresh.load_state_dict(merged.clip.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_image(images), emb, atol=1e-5, rtol=1e-5)
    # the update really is in the weights: with B = 0 the model computes something else
    for p in params:
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        assert (model.encode_image(images)[1] - emb).abs().max() > 1e-2


def test_a_float64_layer_merges_in_float64():
    """W + s B A of a float64 layer keeps float64's precision (it was rounded to fp32 on the way), for the linear
    and the attention adapters; fp32 and bf16 layers still merge in fp32, rounded once."""
    x = torch.randn(5, 64, dtype=torch.float64)
    layer = LoRABLinear(torch.nn.Linear(64, 32).double(), rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        assert (layer.merged()(x) - layer(x)).abs().max() < 1e-12
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).double()
    adapted = LoRAMultiheadAttention(mha, ["k", "v"], out_lora=True, rank=2, alpha=4.0,
                                     generator=torch.Generator().manual_seed(1))
    for p in adapted.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    q = torch.randn(2, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        assert (adapted.merged()(q, q, q)[0] - adapted(q, q, q)[0]).abs().max() < 1e-12
    low = LoRABLinear(torch.nn.Linear(64, 32).to(torch.bfloat16), rank=4, alpha=8.0)
    torch.nn.init.normal_(low.lora_B)
    want = torch.addmm(low.weight.float(), low.lora_B.float(), low.lora_A.float(), alpha=2.0).to(torch.bfloat16)
    assert torch.equal(low.merged().weight, want)  # the same fp32 addmm, one rounding


def test_merged_linear_equals_peft_merge_and_unload():
    """LoRABLinear.merged() against peft's merge_and_unload on the same W, b, A, B (the peer)."""
    if importlib.util.find_spec("peft") is None:  # installed but broken: an error, not a skip
        pytest.skip("peft is not installed (pip install -e '.[test]')")
    import peft

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 20)

        def forward(self, x):
            return self.fc(x)
    base = One()
    layer = LoRABLinear(copy.deepcopy(base.fc), rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(layer.lora_B)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc"]))
    lora = model.base_model.model.fc
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(layer.lora_A)
        lora.lora_B["default"].weight.copy_(layer.lora_B)
    plain = model.merge_and_unload().fc
    ours = layer.merged()
    assert type(ours) is torch.nn.Linear and not ours.weight.requires_grad
    torch.testing.assert_close(ours.weight, plain.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.bias, plain.bias)


def test_adapters_and_merged_layers_keep_the_mode_of_the_layers_they_replace(vit_b16):
    """An eval model stays in eval through inject_lora and merge_lora, module by module (a fresh module is
    in train mode: nn.MultiheadAttention's fused inference path then would not be taken)."""
    model = copy.deepcopy(vit_b16)
    model.clip.visual.train()  # one tower in train mode, the other in eval
    modes = {n: m.training for n, m in model.named_modules()}
    assert True in modes.values() and False in modes.values()
    inject_lora(model, rank=2, targets=["q", "v", "out", "c_fc", "c_proj"])
    adapted = {n: m.training for n, m in model.named_modules() if n in modes}
    assert adapted == modes
    new = [(n, m.training) for n, m in model.named_modules() if n not in modes]  # out_proj's inner layers
    assert new and all(mode == n.startswith("clip.visual.") for n, mode in new)
    from segpcl_fast.model.lora import merge_lora
    merge_lora(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
