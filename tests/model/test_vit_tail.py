"""The ViT's last block for its class token alone (model/vit_tail.py): r(x) and every gradient must
equal the whole block's (float64), LoRA's cross form must equal torch's nn.MultiheadAttention, the tail
must run only where _pool reads the class token alone, and it must keep less for the backward."""
import json

import pytest
import torch
import torch.nn as nn

from segpcl_fast import ops
from segpcl_fast.model import vit_tail
from segpcl_fast.model.clip import load_model
from segpcl_fast.model.lora import LoRAMultiheadAttention, inject_lora, lora_parameters


def _lora_model(name, targets, rank=4, towers=("visual",)):
    model = load_model(name, pretrained=None).double()
    if targets:
        inject_lora(model, rank=rank, targets=targets, towers=list(towers))
        for p in lora_parameters(model):
            nn.init.normal_(p, std=0.2)  # B = 0 would hide a wrong LoRA path
    return model


def _features_and_grads(model, x):
    params = lora_parameters(model.visual)
    raw = model.raw_features(x)
    weights = torch.randn(raw.shape, dtype=raw.dtype, generator=torch.Generator().manual_seed(3)).to(raw.device)
    grads = torch.autograd.grad((raw * weights).sum(), [x] + params)
    return raw, grads


@pytest.mark.parametrize("targets", [["k", "v", "c_fc", "c_proj"], ["q", "k", "v", "out", "c_fc", "c_proj"],
                                     ["q", "out"], []])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_class_token_tail_equals_the_whole_block(tiny_model_name, targets, checkpointing, monkeypatch):
    torch.manual_seed(0)
    model = _lora_model(tiny_model_name, targets)
    model.train()
    model.visual.transformer.grad_checkpointing = checkpointing
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    assert vit_tail.applies(model.visual)
    got, got_grads = _features_and_grads(model, x)
    assert ops.last_choice()["vit_last_block"] == "cls"
    monkeypatch.setenv("SEGPCL_VIT_TAIL", "full")
    want, want_grads = _features_and_grads(model, x)
    assert ops.last_choice()["vit_last_block"] == "full"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert len(got_grads) == 1 + len(lora_parameters(model.visual))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # and open_clip's own image encoder (the whole tower, its projection)
        torch.testing.assert_close(model.encode_image(x)[1], model.clip.encode_image(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("slices, out_lora", [(["k", "v"], False), (["q"], True), (["q", "k", "v"], True), ([], False)])
def test_lora_attention_with_other_keys_equals_torch_multihead_attention(slices, out_lora):
    """query rows over another tensor as key = value: the same as torch's MHA with the merged weights."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).double()
    lora = LoRAMultiheadAttention(mha, slices, out_lora, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(1))
    for p in lora_parameters(lora):
        nn.init.normal_(p, std=0.3)
    plain = nn.MultiheadAttention(32, 4, batch_first=True).double()  # merged in float64 (merged() rounds via fp32)
    with torch.no_grad():
        w = lora.in_proj_weight
        plain.in_proj_weight.copy_(w + lora.scaling * lora.packed_lora_B() @ lora.lora_A if slices else w)
        plain.in_proj_bias.copy_(lora.in_proj_bias)
        out = lora.out_proj
        plain.out_proj.weight.copy_(out.weight + out.scaling * out.lora_B @ out.lora_A if out_lora else out.weight)
        plain.out_proj.bias.copy_(out.bias)
    kv = torch.randn(3, 7, 32, dtype=torch.float64)
    for query in (kv[:, :1], kv[:, 2:5], torch.randn(3, 2, 32, dtype=torch.float64)):
        got = lora(query, kv, kv)[0]
        want = plain(query, kv, kv, need_weights=False)[0]
        assert got.shape == (3, query.shape[1], 32)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lora(kv[:, :1], kv, kv)[0], lora(kv)[0][:, :1], rtol=1e-10, atol=1e-12)
    with pytest.raises(NotImplementedError, match="one tensor as both key and value"):
        lora(kv, kv, kv.clone())
    other = torch.randn(6, 7, 32, dtype=torch.float64)  # another batch size: torch's MHA refuses it too
    with pytest.raises(ValueError, match=r"key / value \(6, 7, 32\) do not fit query \(3, 1, 32\)"):
        lora(kv[:, :1], other, other)


def _register(tmp_path, name, vision_extra):
    import open_clip
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16, **vision_extra},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    return name


@pytest.mark.parametrize("vision_extra", [{"pool_type": "avg"}, {"pool_type": "avg", "final_ln_after_pool": True},
                                          {"attentional_pool": True, "attn_pooler_heads": 4},
                                          {"block_type": "custom"}])
def test_a_tower_pooling_more_than_its_class_token_runs_the_whole_block(tmp_path, vision_extra):
    import dataclasses

    import open_clip
    from open_clip.model import CLIPVisionCfg
    missing = set(vision_extra) - {f.name for f in dataclasses.fields(CLIPVisionCfg)}
    if missing:
        pytest.skip(f"open_clip {open_clip.__version__} has no vision config field {sorted(missing)}")
    name = _register(tmp_path, f"test-tail-{len(vision_extra)}-{'-'.join(map(str, vision_extra.values()))}".lower(),
                     vision_extra)
    custom = vision_extra.get("block_type") == "custom"  # open_clip's CustomResidualAttentionBlock: no LoRA there
    model = _lora_model(name, [] if custom else ["k", "v", "c_fc"])
    assert not vit_tail.qualifies(model.visual)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got = model.encode_image(x)[1]
        assert ops.last_choice()["vit_last_block"] == "full"
        torch.testing.assert_close(got, model.clip.encode_image(x), rtol=1e-10, atol=1e-12)


def test_a_final_ln_after_pool_tower_still_takes_the_tail(tmp_path):
    """pool_type tok with ln_post after the pool: the class token's row is still all that is read."""
    name = _register(tmp_path, "test-tail-ln-after", {"final_ln_after_pool": True})
    model = _lora_model(name, ["k", "v"])
    assert vit_tail.qualifies(model.visual)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x)[1], model.clip.encode_image(x), rtol=1e-10, atol=1e-12)
    assert ops.last_choice()["vit_last_block"] == "cls"


def test_unknown_choice_is_one_clear_error(tiny_model_name, monkeypatch):
    model = load_model(tiny_model_name, pretrained=None)
    monkeypatch.setenv("SEGPCL_VIT_TAIL", "token")
    with pytest.raises(ValueError, match="SEGPCL_VIT_TAIL='token' is unknown"):
        model.raw_features(torch.randn(1, 3, 32, 32))


def _saved_bytes(model, x) -> int:
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.raw_features(x)
    return sum(total)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_tail_keeps_less_for_the_backward(tiny_model_name, monkeypatch, checkpointing):
    """Skipped rows keep no activations: a tail that computed the whole block and sliced it would not.
    Under gradient checkpointing the last block is checkpointed too (it keeps its input alone)."""
    model = _lora_model(tiny_model_name, ["k", "v", "c_fc", "c_proj"])
    model.train()
    model.visual.transformer.grad_checkpointing = checkpointing
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    tail = _saved_bytes(model, x)
    monkeypatch.setenv("SEGPCL_VIT_TAIL", "full")
    full = _saved_bytes(model, x)
    # test-tiny: 2 blocks of 17 tokens; the last block's MLP (4x width) and attention rows are kept for 1 of 17
    if checkpointing:  # each block keeps its input alone, in both paths
        assert tail <= full, (tail, full)
    else:
        assert tail < 0.9 * full, (tail, full)  # 0.82 here; computing the whole block and slicing it keeps all


def test_hooks_on_the_tower_keep_the_whole_block(tiny_model_name):
    """The tail calls neither visual.transformer nor its last block, and the last block's parts on the
    class token's row alone: with a hook on any of these, the whole block runs, so a forward hook fires
    and sees every token, and a backward hook fires."""
    model = _lora_model(tiny_model_name, ["k", "v"])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    last = model.visual.transformer.resblocks[-1]
    tokens = 1 + (32 // 8) ** 2
    for module in (model.visual.transformer, last, last.attn, last.mlp, last.ln_2, last.mlp.c_fc):
        for register in (module.register_forward_hook, module.register_forward_pre_hook):
            seen = []
            handle = register(lambda _m, args, *out: seen.append(args[0].shape[1]))
            with torch.no_grad():
                model.raw_features(x)
            handle.remove()
            assert seen == [tokens] and ops.last_choice()["vit_last_block"] == "full", (module, seen)
    for module in (model.visual.transformer, last, last.mlp):
        for register in (module.register_full_backward_hook, module.register_full_backward_pre_hook):
            fired = []
            handle = register(lambda *args: fired.append(1))
            model.raw_features(x.clone().requires_grad_()).sum().backward()
            handle.remove()
            assert fired == [1] and ops.last_choice()["vit_last_block"] == "full", module
    with torch.no_grad():
        model.raw_features(x)
    assert ops.last_choice()["vit_last_block"] == "cls"


def test_ln_post_hooks_and_replaced_forwards_keep_the_whole_block(tiny_model_name, caplog):
    """ln_post (applied before the pool) would see the class token's row alone under the tail, and a forward
    replaced on the transformer or last block (a wrapper's) would be bypassed: each keeps the whole block. A hook
    on the tower itself cannot fire (raw_features runs its parts): one warning names where to hook instead."""
    model = _lora_model(tiny_model_name, ["k", "v"])
    visual = model.visual
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = model.raw_features(x)
    seen = []
    handle = visual.ln_post.register_forward_hook(lambda _m, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        torch.testing.assert_close(model.raw_features(x), want)
    handle.remove()
    assert seen == [(2, 1 + (32 // 8) ** 2, visual.ln_post.normalized_shape[0])]
    assert ops.last_choice()["vit_last_block"] == "full"
    last = visual.transformer.resblocks[-1]
    for module in (visual.transformer, last, last.mlp, last.attn, visual.ln_post):
        calls = []
        original = module.forward
        module.forward = lambda *a, _f=original, **k: calls.append(a[0].shape[1]) or _f(*a, **k)
        with torch.no_grad():
            torch.testing.assert_close(model.raw_features(x), want)
        del module.forward
        assert calls == [1 + (32 // 8) ** 2] and ops.last_choice()["vit_last_block"] == "full", module
    for register in (visual.register_forward_hook, visual.register_full_backward_hook):
        model._said_tower_hooks = False
        caplog.clear()
        handle = register(lambda *args: None)
        with caplog.at_level("WARNING", logger="segpcl_fast.model"):
            model.raw_features(x.clone().requires_grad_()).sum().backward()
            model.raw_features(x)
        handle.remove()
        assert caplog.text.count("a hook on the image tower (model.visual), or a forward replaced on it") == 1


@pytest.mark.parametrize("vision_extra", [{"ls_init_value": 0.3}, {"patch_dropout": 0.5}])
def test_layer_scale_and_patch_dropout_keep_the_tail_exact(tmp_path, vision_extra):
    name = _register(tmp_path, f"test-tail-{next(iter(vision_extra))}".replace("_", "-"), vision_extra)
    model = _lora_model(name, ["q", "k", "v", "out", "c_fc", "c_proj"])
    model.train()  # patch dropout drops tokens in training (the class token kept)
    assert vit_tail.qualifies(model.visual)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    got = model.raw_features(x)
    assert ops.last_choice()["vit_last_block"] == "cls"
    torch.manual_seed(5)  # the same tokens dropped
    want = model.visual._pool(model.visual.transformer(model.visual._embeds(x)))[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_compiles_with_no_graph_break(tiny_model_name):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = _lora_model(tiny_model_name, ["k", "v", "c_fc", "c_proj"]).float()
    model.train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    want = model.raw_features(x)
    compiled = torch.compile(type(model).raw_features, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(model, x), want)
    assert not counters["graph_break"]


def _bf16_tail_and_whole_block_agree(name, device, backend, monkeypatch):
    """Under bf16 autocast, through the `backend` LoRA path (the cross form hands row slices of the packed
    in_proj, views with a storage offset, to the C++ op and the Triton kernels): the class-token tail and
    the whole block agree to bf16 rounding, values and gradients."""
    if backend == "cpp":
        from segpcl_fast.ops import _ext
        if not _ext.has_kernel(device):
            pytest.skip(f"segpcl_fast._C has no {device} kernel here (build it: gpu_suite.sh's ext-build step)")
    torch.manual_seed(0)
    model = load_model(name, pretrained=None, device=device)
    model.set_precision(image="bf16")
    inject_lora(model, rank=4, targets=["q", "k", "v", "out", "c_fc", "c_proj"], towers=["visual"])
    for p in lora_parameters(model):
        nn.init.normal_(p, std=0.2)
    model.train()
    x = torch.randn(6, 3, 32, 32, device=device, requires_grad=True)

    def run():
        with ops.backend(backend):
            return _features_and_grads(model, x)
    got, got_grads = run()
    assert ops.last_choice()["vit_last_block"] == "cls"
    monkeypatch.setenv("SEGPCL_VIT_TAIL", "full")
    want, want_grads = run()
    monkeypatch.delenv("SEGPCL_VIT_TAIL")

    def close(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item() < 5e-2  # 0.013 at most on the CPU; a wrong row: O(1)
    assert close(got, want)
    assert all(close(g, w) for g, w in zip(got_grads, want_grads))


@pytest.mark.parametrize("backend", ["auto", "reference", "cpp"])
def test_bf16_tail_equals_the_whole_block(tiny_model_name, backend, monkeypatch):
    _bf16_tail_and_whole_block_agree(tiny_model_name, "cpu", backend, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu_suite.sh's ext-tests step)")
@pytest.mark.parametrize("backend", ["auto", "reference", "cpp", "triton"])
def test_cuda_tail_equals_the_whole_block_under_bf16_autocast(tiny_model_name, backend, monkeypatch):
    _bf16_tail_and_whole_block_agree(tiny_model_name, "cuda", backend, monkeypatch)
