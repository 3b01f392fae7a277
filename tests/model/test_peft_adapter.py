"""Our adapters as a peft adapter (to_peft, save_peft_adapter) and unloaded (unload_lora).

The peer is peft itself: the PeftModel to_peft builds, and one peft's PeftModel.from_pretrained reads
from the written directory into a fresh open_clip model, must compute our LoRA model's function
(float64, random B); unload_lora must give the pretrained function back bit for bit.
"""
import copy
import json

import pytest
import torch

from segpcl_fast.model.clip import load_model
from segpcl_fast.model.lora import LoRABLinear, LoRAMultiheadAttention, inject_lora, lora_parameters
from segpcl_fast.model.peft_adapter import peft_adds_out_proj_twice, save_peft_adapter, to_peft, unload_lora

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tiny_model_name):
    return load_model(tiny_model_name, pretrained=None).double()


def _adapted(base, targets, rank=2, alpha=3.0, towers=("visual", "text")):
    model = copy.deepcopy(base)
    inject_lora(model, rank=rank, alpha=alpha, targets=targets, towers=towers)
    gen = torch.Generator().manual_seed(1)
    for p in lora_parameters(model):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _outputs(clip, x, tokens):
    with torch.no_grad():
        return clip.encode_image(x), clip.encode_text(tokens)


def _inputs(model):
    gen = torch.Generator().manual_seed(2)
    size = model.image_stats.size
    return torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64), model.tokenize(["a cat", "a red dog"])


TARGETS = [["k", "v", "c_fc", "c_proj"], ["q"], ["c_fc"], ["q", "k", "v", "c_fc", "c_proj"]]


@pytest.mark.parametrize("targets", TARGETS, ids=lambda t: "-".join(t))
def test_peft_model_computes_our_lora_model(base, targets):
    model = _adapted(base, targets)
    x, tokens = _inputs(model)
    ours = _outputs(model.clip, x, tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = to_peft(model)
    theirs = _outputs(wrapped.base_model.model, x, tokens)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    plain = copy.deepcopy(base).clip
    assert not torch.allclose(_outputs(plain, x, tokens)[0], ours[0])  # the adapters change the function
    after = model.state_dict()  # the model given is left as it was
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert any(isinstance(m, (LoRABLinear, LoRAMultiheadAttention)) for m in model.modules())


def test_written_adapter_loads_into_a_fresh_open_clip_model_with_peft(base, tmp_path):
    model = _adapted(base, ["k", "v", "c_fc", "c_proj"], rank=3, alpha=5.0)
    x, tokens = _inputs(model)
    ours = _outputs(model.clip, x, tokens)
    state = torch.random.get_rng_state()
    out = save_peft_adapter(model, tmp_path / "adapter")
    assert torch.equal(torch.random.get_rng_state(), state)  # peft's own init draws were forked off
    assert out == tmp_path / "adapter" and {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary directory left
    config = json.loads((out / "adapter_config.json").read_text())
    # attention: k and v, 2 slices of rank 3 -> peft rank 6 with lora_alpha 10 (scaling 5 / 3 kept)
    assert config["r"] == 3 and config["lora_alpha"] == pytest.approx(5.0)
    assert set(config["rank_pattern"].values()) == {6}
    assert config["alpha_pattern"].values() and all(v == pytest.approx(10.0) for v in config["alpha_pattern"].values())
    fresh = copy.deepcopy(base).clip  # the same pretrained weights, no adapters
    loaded = peft.PeftModel.from_pretrained(fresh, str(out))
    for a, b in zip(ours, _outputs(loaded.base_model.model, x, tokens)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    assert not any("lora" in k for k in base.clip.state_dict())  # the fixture's model untouched


def test_text_tower_only_adapter_leaves_the_image_tower_alone(base):
    """target_modules names exact modules: the text blocks' 'transformer.resblocks.0.attn' must not
    also catch the image tower's 'visual.transformer.resblocks.0.attn'."""
    model = _adapted(base, ["k", "v"], towers=("text",))
    wrapped = to_peft(model).base_model.model
    adapted = {n for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and n.endswith("attn")}
    assert adapted and all(not n.startswith("visual.") for n in adapted)
    x, tokens = _inputs(model)
    for a, b in zip(_outputs(model.clip, x, tokens), _outputs(wrapped, x, tokens)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_out_proj_adapter_follows_what_the_installed_peft_computes(base):
    """peft 0.21 adds an nn.MultiheadAttention's out_proj delta twice (huggingface/peft pull 3774):
    the probe must say so exactly when it does, and to_peft must then refuse rather than write an
    adapter computing another function; with a fixed peft the adapter must be exact."""
    model = _adapted(base, ["v", "out"])
    attn = peft.get_peft_model(copy.deepcopy(base.clip), peft.LoraConfig(
        r=1, lora_alpha=1, target_modules=["visual.transformer.resblocks.0.attn"], init_lora_weights=False))
    layer = attn.base_model.model.visual.transformer.resblocks[0].attn
    out = layer.get_base_layer().out_proj
    x, tokens = _inputs(model)
    plain = copy.deepcopy(base.clip)
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
        plain.visual.transformer.resblocks[0].attn.out_proj.weight += (
            out.lora_B["default"].weight @ out.lora_A["default"].weight)
    doubled = not torch.allclose(_outputs(attn.base_model.model, x, tokens)[0], _outputs(plain, x, tokens)[0])
    assert peft_adds_out_proj_twice() == doubled
    if doubled:
        with pytest.raises(NotImplementedError, match="pull 3774"):
            to_peft(model)
        return
    for a, b in zip(_outputs(model.clip, x, tokens), _outputs(to_peft(model).base_model.model, x, tokens)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_unload_gives_the_pretrained_model_back_sharing_its_weights(base, tiny_model_name):
    model = _adapted(base, ["q", "k", "v", "out", "c_fc", "c_proj"])
    x, tokens = _inputs(model)
    weight = model.clip.visual.transformer.resblocks[0].mlp.c_fc.weight
    state = torch.random.get_rng_state()
    assert unload_lora(model) is model
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not any(isinstance(m, (LoRABLinear, LoRAMultiheadAttention)) for m in model.modules())
    assert model.clip.visual.transformer.resblocks[0].mlp.c_fc.weight is weight  # shared, not copied
    # frozen as inject_lora freezes: nn.MultiheadAttention takes another (fused) path without trainable weights
    frozen = copy.deepcopy(base).requires_grad_(False)
    for a, b in zip(_outputs(frozen.clip, x, tokens), _outputs(model.clip, x, tokens)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    modes = {n: m.training for n, m in frozen.clip.named_modules()}  # eval / train as they were, module by module
    assert {n: m.training for n, m in model.clip.named_modules()} == modes and not all(modes.values())
    fresh = load_model(tiny_model_name, pretrained=None).double()
    fresh.clip.load_state_dict(model.clip.state_dict(), strict=True)  # plain open_clip names again
    assert not any(p.requires_grad for p in model.parameters())


def test_errors_name_the_problem_and_write_nothing(base, tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        to_peft(copy.deepcopy(base))
    model = _adapted(base, ["c_fc"])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="new \\(or empty\\) directory"):
        save_peft_adapter(model, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="is a file, not a folder|exists and is not a folder"):
        save_peft_adapter(model, tmp_path / "file" / "adapter")
    with pytest.raises(ValueError, match="needs a directory path"):
        save_peft_adapter(model, " ")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (save_peft_adapter(model, empty) / "adapter_config.json").is_file()  # an empty directory is filled
    assert (save_peft_adapter(model, tmp_path / "new" / "deeper") / "adapter_config.json").is_file()  # parents made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "new", "taken"]
