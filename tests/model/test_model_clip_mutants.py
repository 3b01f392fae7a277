"""Checks added by a mutation audit of model loading (segpcl_fast/model/clip.py) and of
model/patch_embed.py, model/tf32.py and model/frozen_cast.py: each test here fails on a small semantic
change (a mutant) of that code which the rest of the suite let through, and passes on the code as it is.
Values are checked against open_clip's own models and tables, torch's own ops, or as round trips.

Covered:
- open_clip_resolves: the package's own config and a TorchScript file are not open_clip's alone, a
  plain state-dict file is (open_clip itself loads it);
- names_a_file and the missing-file error: a path with a separator or a weights suffix (.safetensors)
  names a file; "random" / "none" / "" are random weights;
- a file named like a pretrained tag is read as that file, by open_clip too (it preferred the tag);
- offline resolution through the Hugging Face cache: a tag whose hub weights are cached (safetensors
  alone, an hf_hub with a trailing slash) goes to open_clip by tag even when its URL file lies beside
  them; an hf-hub: name's cached config is found; HF_HUB_OFFLINE given back as it was;
- a local-dir: model loads with its folder's weights;
- model.preprocess: a mapping's None values dropped, mean / std as tuples; a mapping reaches a
  TorchScript file's model;
- torchscript_state_dict keeps unexpected keys (for the strict load) and drops open_clip's
  non-state buffers and OpenAI's int attributes;
- configs_fitting for a config that leaves sizes at open_clip's defaults, text width != embed_dim;
- the load error's guess: never the model being loaded, "and others" only past six names;
- model_from_state_dict is strict and says nothing of random initialisation; open_clip_call leaves a
  root logger that has handlers alone;
- every module of a loaded model in eval mode (the patch GEMM took a fresh module's train mode);
- PatchEmbedGEMM: a width that is no multiple of a non-square kernel's width falls back to the
  convolution; a second use_patch_gemm keeps the module (and its hooks); the GEMM under CUDA autocast.
"""
import logging
import os

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segpcl_fast import ops
from segpcl_fast.model import clip as clip_module
from segpcl_fast.model.clip import (ModelLoadError, configs_fitting, load_model, model_from_state_dict,
                                    names_a_file, open_clip_resolves, preprocess_override, weights_quick_gelu)

TINY = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture
def registered(monkeypatch):
    """Register open_clip model configs for one test (open_clip's table restored after)."""
    import open_clip.factory as factory

    def register(name, cfg):
        monkeypatch.setitem(factory._MODEL_CONFIGS, name, cfg)
        return name
    return register


@pytest.fixture
def tags(monkeypatch):
    """Give a model pretrained tags in open_clip's table for one test."""
    import open_clip.pretrained as pretrained

    def set_tags(name, **cfgs):
        monkeypatch.setitem(pretrained._PRETRAINED, name, {tag: pretrained._pcfg(**cfg) for tag, cfg in cfgs.items()})
    return set_tags


def _same_weights(a: nn.Module, b: dict) -> bool:
    own = a.state_dict()
    return own.keys() == b.keys() and all(torch.equal(own[k], b[k]) for k in own)


def _scripted(path):
    """A TorchScript archive (torch.jit.save; what _is_torchscript_archive recognises)."""
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    return str(path)


# ----------------------------------------------------------------------------- names, tags, files

def test_open_clip_resolves_only_what_open_clip_alone_builds(tiny_model_name, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(open_clip.create_model(tiny_model_name).state_dict(), path)
    assert open_clip_resolves(tiny_model_name, str(path))
    open_clip.create_model(tiny_model_name, pretrained=str(path))  # it does
    assert open_clip_resolves(tiny_model_name, None)
    assert not open_clip_resolves("segpcl-tiny", None)  # the package's own config
    assert not open_clip_resolves("segpcl-tiny", "segpcl-world")
    assert not open_clip_resolves(tiny_model_name, _scripted(tmp_path / "scripted.pt"))


def test_names_a_file_by_separator_suffix_or_existence(tmp_path, monkeypatch):
    assert not names_a_file(None) and not names_a_file("") and not names_a_file("openai")
    for name in (os.path.join("some", "weights"), "w.safetensors", "w.pt", "w.bin", "w.pth", "w.ckpt"):
        assert names_a_file(name), name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").write_bytes(b"")
    assert names_a_file("weights")


def test_a_missing_file_is_named_as_one_whatever_its_suffix(tiny_model_name):
    for missing in (os.path.join("nowhere", "weights"), "nowhere.safetensors"):
        with pytest.raises(ModelLoadError, match=rf"weights file '{missing}' \(model.pretrained\) does not exist"):
            load_model(tiny_model_name, missing)


@pytest.mark.parametrize("pretrained", [None, "", "none", "random"])
def test_every_spelling_of_no_weights_is_random_weights(tiny_model_name, pretrained):
    assert clip_module._resolve_pretrained(tiny_model_name, pretrained, None) is None
    assert load_model(tiny_model_name, pretrained).pretrained == pretrained


def test_a_file_named_like_a_tag_is_that_file_for_open_clip_too(tiny_model_name, tmp_path, monkeypatch, tags):
    """A local file `quick` beside a tag `quick` (trained with QuickGELU, downloadable only): load_model reads the
    file, with the name's GELU; open_clip, handed the bare name, took the tag and went for its download."""
    import open_clip.pretrained

    def download(*args, **kwargs):
        raise AssertionError("open_clip went for the tag's download")
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", download)
    tags(tiny_model_name, quick={"url": "https://example.invalid/x/quick.pt", "quick_gelu": True})
    source = open_clip.create_model(tiny_model_name)
    monkeypatch.chdir(tmp_path)
    torch.save(source.state_dict(), tmp_path / "quick")
    assert not weights_quick_gelu(tiny_model_name, "quick", "quick")
    model = load_model(tiny_model_name, "quick")
    assert not model.quick_gelu and _same_weights(model.clip, source.state_dict())


# ----------------------------------------------------------------------------- offline caches

def _hf_cache(root, repo, *files):
    """A Hugging Face hub cache (huggingface_hub's layout) holding `files` of `repo`."""
    cached = root / f"models--{repo.replace('/', '--')}"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("abc123")
    (cached / "snapshots" / "abc123").mkdir(parents=True)
    for f in files:
        (cached / "snapshots" / "abc123" / f).write_bytes(b"x")
    return root


def test_a_tag_cached_in_the_hub_goes_to_open_clip_by_tag(tiny_model_name, tmp_path, tags):
    """Cached hub weights (the safetensors file alone; open_clip's hf_hub names end in '/') are handed to open_clip
    by tag, which reads them from the cache, even where the tag's URL download also lies in the cache folder."""
    cache = _hf_cache(tmp_path, "org/tiny", "open_clip_model.safetensors")
    (cache / "tiny.pt").write_bytes(b"x")  # the URL file
    tags(tiny_model_name, hub={"hf_hub": "org/tiny/", "url": "https://example.invalid/x/tiny.pt"},
         other={"hf_hub": "org/other/"})
    assert clip_module._resolve_pretrained(tiny_model_name, "hub", str(cache)) == "hub"
    with pytest.raises(ModelLoadError, match="not available offline"):
        clip_module._resolve_pretrained(tiny_model_name, "other", str(cache))


def test_an_hf_hub_models_cached_config_is_found(tmp_path):
    cache = str(_hf_cache(tmp_path, "org/model", "open_clip_config.json"))
    clip_module._require_cached_hf_config("hf-hub:org/model", cache)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        clip_module._require_cached_hf_config("hf-hub:org/elsewhere", cache)


@pytest.mark.parametrize("before", [None, "0"])
def test_hf_hub_offline_gives_the_variable_back_as_it_was(before, monkeypatch):
    if before is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", before)
    with clip_module._hf_hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ.get("HF_HUB_OFFLINE") == before


def test_a_local_dir_model_loads_its_folders_weights(tmp_path):
    import json
    from open_clip.model import CLIP
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    weights = CLIP(**TINY).state_dict()
    torch.save(weights, tmp_path / "open_clip_pytorch_model.bin")
    if not hasattr(open_clip.factory, "LOCAL_DIR_PREFIX"):  # open_clip 2.32: one error naming the fix
        with pytest.raises(ModelLoadError, match=r"has no local-dir: models .*upgrade open_clip_torch"):
            load_model(f"local-dir:{tmp_path}", pretrained=None)
        return
    model = load_model(f"local-dir:{tmp_path}", pretrained=None)
    assert _same_weights(model.clip, weights)


def test_local_dir_names_on_an_open_clip_without_them_are_one_error(monkeypatch, tmp_path):
    monkeypatch.delattr(open_clip.factory, "LOCAL_DIR_PREFIX", raising=False)
    with pytest.raises(ModelLoadError, match=r"open_clip_torch .* has no local-dir: models \(open_clip_torch 3.0"):
        load_model(f"local-dir:{tmp_path}", pretrained=None)


# ----------------------------------------------------------------------------- preprocess, TorchScript

def test_a_preprocess_mappings_none_values_are_left_to_open_clip(tiny_model_name):
    assert preprocess_override(tiny_model_name, {"mean": [0.5, 0.5, 0.5], "std": None, "interpolation": "bilinear"}) \
        == {"mean": (0.5, 0.5, 0.5), "interpolation": "bilinear"}
    stats = load_model(tiny_model_name, None, preprocess={"std": None, "mean": [0.5, 0.25, 0.125]}).image_stats
    assert stats.mean == (0.5, 0.25, 0.125) and stats.std == open_clip.OPENAI_DATASET_STD


def test_a_preprocess_mapping_reaches_a_torchscript_files_model(tiny_model_name, tmp_path):
    import warnings
    source = open_clip.create_model(tiny_model_name).eval()
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(source, (torch.rand(1, 3, 32, 32), torch.zeros(1, 24, dtype=torch.long)),
                                 check_trace=False, strict=False)
        torch.jit.save(traced, str(path))
    model = load_model(tiny_model_name, str(path), preprocess={"mean": [0.5, 0.25, 0.125], "resize_mode": "squash"})
    assert model.image_stats.mean == (0.5, 0.25, 0.125) and model.image_stats.resize_mode == "squash"
    assert _same_weights(model.clip, source.state_dict())


class _Archive(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.extra = nn.Parameter(torch.zeros(3))
        self.register_buffer("attn_mask", torch.ones(2, 2))
        self.register_buffer("input_resolution", torch.tensor(224))

    def forward(self, x):
        return x * self.w


class _Own(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("attn_mask", torch.zeros(2, 2), persistent=False)


def test_torchscript_state_dict_keeps_what_a_strict_load_must_refuse(tmp_path):
    """OpenAI's int attributes and the buffers open_clip keeps out of its state dict are dropped; a key the model
    lacks stays, so that the strict load names it (a wrong archive is refused, not loaded in part)."""
    path = tmp_path / "a.pt"
    torch.jit.save(torch.jit.script(_Archive()), str(path))
    state = clip_module.torchscript_state_dict(str(path), _Own())
    assert sorted(state) == ["extra", "w"] and torch.equal(state["w"], torch.ones(2))


# ----------------------------------------------------------------------------- configs_fitting, the load error

def test_configs_fitting_reads_open_clips_defaults_for_sizes_a_config_leaves_out(registered):
    """open_clip builds a config's missing sizes at its defaults (ViT-B/16's image tower at 224, context 77, ...);
    here the text width (512) is not the embedding width (24)."""
    name = registered("test-open-clip-defaults", {"embed_dim": 24, "vision_cfg": {"layers": 1}, "text_cfg": {}})
    with torch.device("meta"):
        state = open_clip.create_model(name, device="meta").state_dict()
    assert state["text_projection"].shape == (512, 24)
    assert configs_fitting(state) == [name]


def _guess(message: str) -> list[str]:
    if "tensor sizes are those of open_clip's " not in message:
        return []
    return message.split("tensor sizes are those of open_clip's ")[1].split(": name")[0].split(", ")


def test_the_load_errors_guess_never_names_the_model_and_lists_six(registered, tiny_model_name, tmp_path):
    names = [registered(f"test-fit-{i}", TINY) for i in range(7)]
    state = open_clip.create_model(names[0]).state_dict()
    del state["logit_scale"]  # sizes of every test-fit config, and no config loads it
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="Missing key") as e:
        load_model(names[0], str(path))
    assert _guess(str(e.value)) == names[1:]  # six: all of them, and nothing said of others
    with pytest.raises(ModelLoadError) as e:
        load_model(tiny_model_name, str(path))
    assert _guess(str(e.value)) == names[:5] + [names[5] + " and others"]


def test_model_from_state_dict_is_strict_and_quiet(tiny_model_name, caplog):
    source = open_clip.create_model(tiny_model_name)
    with caplog.at_level(logging.WARNING):
        open_clip.create_model(tiny_model_name)
    said = any("initialized randomly" in r.getMessage() for r in caplog.records)
    assert said or open_clip.__version__.startswith("2.")  # what open_clip 3 says (2.32 says nothing)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model = model_from_state_dict(tiny_model_name, source.state_dict())
    assert _same_weights(model.clip, source.state_dict())
    assert not any("initialized randomly" in r.getMessage() for r in caplog.records)
    partial = {k: v for k, v in source.state_dict().items() if k != "logit_scale"}
    with pytest.raises(ModelLoadError, match=r"(?s)could not build .*Missing key.*logit_scale"):
        model_from_state_dict(tiny_model_name, partial)


def test_open_clip_call_leaves_a_configured_root_logger_alone():
    root = logging.getLogger()
    handler = logging.NullHandler()
    root.addHandler(handler)
    try:
        before = list(root.handlers)
        with clip_module.open_clip_call():
            assert root.handlers == before
    finally:
        root.removeHandler(handler)


def test_every_module_of_a_loaded_model_is_in_eval_mode(tiny_model_name):
    model = load_model(tiny_model_name, None)
    assert model.patch_embed == "gemm" and not any(m.training for m in model.clip.modules())


# ----------------------------------------------------------------------------- patch embedding

class _Tower(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv1 = conv


def test_a_ragged_width_of_a_non_square_kernel_falls_back_to_the_convolution():
    from segpcl_fast.model.patch_embed import use_patch_gemm
    conv = nn.Conv2d(3, 8, (4, 8), stride=(4, 8))
    tower = _Tower(conv)
    assert use_patch_gemm(tower) == "gemm"
    x = torch.randn(2, 3, 16, 20)  # rows a multiple of 4, columns no multiple of 8 (a multiple of 4)
    torch.testing.assert_close(tower.conv1(x), F.conv2d(x, conv.weight, conv.bias, stride=(4, 8)))
    assert ops.last_choice()["patch_embed"] == "conv"


def test_a_second_use_patch_gemm_keeps_the_module_and_its_hooks():
    from segpcl_fast.model.patch_embed import use_patch_gemm
    tower = _Tower(nn.Conv2d(3, 8, 4, stride=4))
    use_patch_gemm(tower)
    gemm = tower.conv1
    seen = []
    gemm.register_forward_hook(lambda *args: seen.append(1))
    assert use_patch_gemm(tower) == "gemm" and tower.conv1 is gemm
    tower.conv1(torch.randn(1, 3, 8, 8))
    assert seen == [1]


def test_the_gemm_runs_under_cuda_autocast(tf32_flags, monkeypatch):
    """Under autocast (run.precision=bf16 / fp16) the GEMM is as exact as the convolution and cheaper: it runs
    whatever the TF32 switches say (checked by making the tensors and autocast say CUDA)."""
    from segpcl_fast.model import patch_embed
    tf32_flags(cudnn=True, matmul=False)
    assert patch_embed.conv_is_cheaper(True, torch.float32, False)
    assert not patch_embed.conv_is_cheaper(True, torch.float32, True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    x = torch.randn(1, 3, 4, 4)
    assert patch_embed._conv_is_cheaper_in_fp32(x)  # outside autocast: the convolution
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: device == ("cuda",))
    assert not patch_embed._conv_is_cheaper_in_fp32(x)


# ----------------------------------------------------------------------------- frozen weights stored in bf16

def _frozen(model, **precision):
    model.requires_grad_(False)
    model.set_precision(**precision)
    return model


def test_a_trainable_tensor_keeps_its_fp32_master_and_counts_are_of_tensors_cast(tiny_model_name):
    model = _frozen(load_model(tiny_model_name, None), image="bf16")
    block = model.visual.transformer.resblocks[0]
    block.mlp.c_fc.weight.requires_grad_(True)  # trained: autocast casts it each step, its fp32 master stays
    n = model.store_frozen_weights()["visual"]
    assert block.mlp.c_fc.weight.dtype == torch.float32 and block.mlp.c_proj.weight.dtype == torch.bfloat16
    tensors = list(model.visual.parameters()) + list(model.visual.buffers())
    assert n == sum(t.dtype == torch.bfloat16 for t in tensors) > 0
    assert model.store_frozen_weights() == {"visual": 0}  # nothing left to cast
    assert model.restore_frozen_weights() == n and all(t.dtype == torch.float32 for t in tensors)


def test_a_custom_text_towers_blocks_are_stored(registered):
    """CustomTextCLIP (SigLIP's, CoCa's layout) holds its text transformer in .text, not on the model."""
    import copy
    name = registered("test-tiny-custom-text", {**TINY, "custom_text": True})
    per_call = _frozen(load_model(name, None), text="bf16")
    stored = copy.deepcopy(per_call)
    assert stored.store_frozen_weights()["text"] > 0 and stored.frozen_storage == {"text": torch.bfloat16}
    assert stored.clip.text.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    tokens = stored.tokenize(["a photo of a cat", "a small dog"])
    assert torch.equal(stored.encode_text(tokens), per_call.encode_text(tokens))


def test_a_timm_towers_blocks_are_stored(registered):
    """open_clip's TimmModel: the trunk's blocks run under autocast, stored in bf16; its norm and head stay fp32."""
    import copy
    name = registered("test-timm-frozen", {
        "embed_dim": 192, "custom_text": True,
        "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": "linear"},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}})
    per_call = _frozen(load_model(name, None), image="bf16")
    stored = copy.deepcopy(per_call)
    assert stored.store_frozen_weights()["visual"] > 0 and stored.frozen_storage == {"visual": torch.bfloat16}
    trunk = stored.visual.trunk
    linears = [m for m in trunk.blocks.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert trunk.norm.weight.dtype == torch.float32 and stored.visual.head.proj.weight.dtype == torch.float32
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(stored.encode_image(x)[1], per_call.encode_image(x)[1])
