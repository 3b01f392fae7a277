"""Frozen GEMM weights stored in the autocast dtype (model/frozen_cast.py): the same numbers, fewer casts."""
import copy

import pytest
import torch

from segpcl_fast import ops
from segpcl_fast.model import frozen_cast
from segpcl_fast.model.clip import load_model
from segpcl_fast.model.lora import inject_lora, merge_lora


def _model(name, image="bf16", text="fp32", seed=0):
    torch.manual_seed(seed)
    model = load_model(name, pretrained=None)
    model.set_precision(image=image, text=text)
    inject_lora(model, rank=4, alpha=8.0, targets=["k", "v", "c_fc", "c_proj"], towers=["visual", "text"])
    with torch.no_grad():  # trained-looking B, so the LoRA products take part
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _image_pass(model, x):
    model.zero_grad()
    raw = model.raw_features(x)
    raw.square().mean().backward()
    return raw.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend,image", [("auto", "bf16"), ("reference", "bf16"), ("auto", "fp16")])
def test_stored_image_tower_gives_the_same_features_and_gradients_bit_for_bit(tiny_model_name, backend, image):
    per_call = _model(tiny_model_name, image=image)
    stored = copy.deepcopy(per_call)
    assert stored.store_frozen_weights() == {"visual": len(list(frozen_cast.frozen_operands(stored, "visual")))}
    x = torch.randn(3, 3, 32, 32)
    with ops.backend(backend):
        raw_a, grads_a = _image_pass(per_call, x)
        raw_b, grads_b = _image_pass(stored, x)
    assert torch.equal(raw_a, raw_b)
    assert grads_a.keys() == grads_b.keys() and any(".visual." in n for n in grads_a)
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n


def test_what_is_stored_in_bf16_and_what_stays_fp32(tiny_model_name):
    model = _model(tiny_model_name)
    names = list(model.state_dict())
    model.store_frozen_weights()
    assert list(model.state_dict()) == names  # same names, same Parameter objects
    stored = {id(t) for _, _, t in frozen_cast.frozen_operands(model, "visual")}
    dtypes = {n: t.dtype for n, t in model.named_parameters()} | {n: t.dtype for n, t in model.named_buffers()}
    bf16 = {n for n, d in dtypes.items() if d == torch.bfloat16}
    blocks = model.visual.transformer.resblocks
    assert {"clip.visual.conv1.weight", "clip.visual.transformer.resblocks.0.attn.in_proj_weight",
            "clip.visual.transformer.resblocks.0.attn.in_proj_bias", "clip.visual.transformer.resblocks.0.attn.lora_A",
            "clip.visual.transformer.resblocks.0.attn.out_proj.weight",
            "clip.visual.transformer.resblocks.0.mlp.c_fc.weight", "clip.visual.transformer.resblocks.0.mlp.c_fc.lora_A",
            f"clip.visual.transformer.resblocks.{len(blocks) - 1}.mlp.c_proj.bias",
            "clip.visual.positional_embedding", "clip.visual.class_embedding"} <= bf16  # (added to conv1's output)
    assert all(n.startswith("clip.visual.") for n in bf16)  # the text tower is fp32 (run.text_precision)
    assert len(bf16) == len(stored)
    for n in ("clip.visual.proj", "clip.visual.ln_pre.weight", "clip.positional_embedding",
              "clip.token_embedding.weight", "clip.visual.ln_post.weight", "clip.visual.transformer.resblocks.0.ln_1.weight",
              "clip.visual.transformer.resblocks.0.attn.lora_B.k", "clip.visual.transformer.resblocks.0.mlp.c_fc.lora_B"):
        assert dtypes[n] == torch.float32, n
    assert model.frozen_storage == {"visual": torch.bfloat16}


def test_stored_text_tower_gives_the_same_embeddings_bit_for_bit(tiny_model_name):
    """run.text_precision=bf16: the text tower's blocks stored in bf16; open_clip casts the tower's input
    to `transformer.get_cast_dtype()` (a block's weight dtype), which must still say fp32."""
    per_call = _model(tiny_model_name, image="fp32", text="bf16")
    stored = copy.deepcopy(per_call)
    cast_dtype = stored.text_tower.transformer.get_cast_dtype()
    assert stored.store_frozen_weights()["text"] > 0
    assert stored.text_tower.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert stored.text_tower.transformer.get_cast_dtype() == cast_dtype == torch.float32
    tokens = stored.tokenize(["a photo of a cat", "a drawing of a very small dog on a chair"])
    for truncate in (True, False):  # ours, and open_clip's own encode_text
        a = per_call.encode_text(tokens, truncate=truncate)
        b = stored.encode_text(tokens, truncate=truncate)
        assert torch.equal(a, b), truncate
    assert stored.restore_frozen_weights() > 0
    assert "get_cast_dtype" not in vars(stored.text_tower.transformer) and stored.frozen_storage == {}


def test_compiled_image_tower_casts_no_frozen_input(tiny_model_name):
    """Traced through AOTAutograd (no code generation): in the forward graph, every cast of a graph input
    to bf16 is of a trained tensor (B) or the images, not of a frozen weight (autocast casts each of those
    again on every call when they are stored in fp32). (The LoRA merge's widening of W and A to fp32
    inside compiled graphs, ops.lora_linear.merged_weight, is no such cast: inductor reads them in its
    merge kernels.)"""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._guards import TracingContext

    def frozen_input_casts(model):
        found = []

        def forward_compiler(graph, inputs):
            info = TracingContext.get().fw_metadata.input_info
            inputs_at = {n: i for i, n in enumerate(n for n in graph.graph.nodes if n.op == "placeholder")}
            for node in graph.graph.nodes:
                if (node.op == "call_function" and "_to_copy" in str(node.target) and node.args
                        and node.kwargs.get("dtype") == torch.bfloat16
                        and node.args[0] in inputs_at and not info[inputs_at[node.args[0]]].requires_grad
                        and tuple(node.args[0].meta["val"].shape) != tuple(x.shape)):
                    found.append(tuple(node.args[0].meta["val"].shape))
            return make_boxed_func(graph.forward)

        def backend(gm, example_inputs):
            return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler,
                                         bw_compiler=lambda g, i: make_boxed_func(g.forward))
        torch._dynamo.reset()
        fn = torch.compile(type(model).raw_features, backend=backend, fullgraph=True)
        fn(model, x).sum().backward()
        torch._dynamo.reset()
        return found

    x = torch.randn(2, 3, 32, 32)
    per_call = _model(tiny_model_name)
    stored = copy.deepcopy(per_call)
    stored.store_frozen_weights()
    n_stored = len(list(frozen_cast.frozen_operands(stored, "visual")))
    with ops.backend("auto"):
        # all but 4 stored tensors are cast straight from the graph's inputs when kept fp32 (conv1's weight is
        # reshaped, the class embedding expanded, the last block's in_proj weight and bias sliced first)
        assert len(frozen_input_casts(per_call)) == n_stored - 4
        assert frozen_input_casts(stored) == []


def test_precision_and_injection_after_storing_are_refused_until_restored(tiny_model_name):
    model = _model(tiny_model_name)
    model.store_frozen_weights()
    with pytest.raises(ValueError, match="visual tower's frozen weights are stored in torch.bfloat16"):
        model.set_precision(image="fp32")
    with pytest.raises(ValueError, match="inject LoRA first"):
        inject_lora(model, rank=2, alpha=2.0)
    model.set_precision(image="bf16", text="fp32")  # the same precision is fine
    assert model.restore_frozen_weights() == len(list(frozen_cast.frozen_operands(model, "visual")))
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    model.set_precision(image="fp32")
    model.raw_features(torch.randn(1, 3, 32, 32))


def test_merge_lora_of_a_stored_model_is_fp32_with_the_values_the_run_used(tiny_model_name):
    """A merged export holds fp32 weights (open_clip's dtype), the frozen ones the bf16-rounded values
    the stored run computed with: W + s B A in fp32 from them."""
    per_call = _model(tiny_model_name)
    stored = copy.deepcopy(per_call)
    stored.store_frozen_weights()
    block = stored.visual.transformer.resblocks[0].mlp.c_fc
    w16, a16, b, s = block.weight.clone(), block.lora_A.clone(), block.lora_B.detach().clone(), block.scaling
    merge_lora(stored)
    assert stored.frozen_storage == {}
    assert all(t.dtype == torch.float32 for t in stored.state_dict().values() if t.is_floating_point())
    merged = stored.visual.transformer.resblocks[0].mlp.c_fc.weight
    torch.testing.assert_close(merged, torch.addmm(w16.float(), b, a16.float(), alpha=s), rtol=0, atol=0)
    merge_lora(per_call)  # from the fp32 originals: differs by bf16 rounding of W
    assert 0 < (merged - per_call.visual.transformer.resblocks[0].mlp.c_fc.weight).abs().max() < 1e-2


def test_per_call_switch_keeps_fp32_storage(tiny_model_name, monkeypatch):
    monkeypatch.setenv("SEGPCL_FROZEN_CAST", "per_call")
    model = _model(tiny_model_name)
    assert model.store_frozen_weights() == {} and model.frozen_storage == {}
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    monkeypatch.setenv("SEGPCL_FROZEN_CAST", "bogus")
    with pytest.raises(ValueError, match="SEGPCL_FROZEN_CAST"):
        model.store_frozen_weights()


def test_fp32_model_stores_nothing(tiny_model_name):
    model = _model(tiny_model_name, image="fp32")
    assert model.store_frozen_weights() == {} and model.frozen_storage == {}


def test_a_tower_with_nothing_to_store_is_not_recorded_as_stored(tiny_model_name, monkeypatch):
    """A tower whose blocks frozen_cast does not know (a ConvNeXt trunk: no `.blocks`) has nothing cast;
    it must not read as stored (results.json's ops, set_precision's refusal)."""
    model = _model(tiny_model_name, image="fp32", text="bf16")
    monkeypatch.setattr(frozen_cast, "_tower_roots", lambda model, tower: [])
    assert model.store_frozen_weights() == {"text": 0} and model.frozen_storage == {}
    model.set_precision(image="fp32", text="fp32")  # nothing stored: nothing refused
