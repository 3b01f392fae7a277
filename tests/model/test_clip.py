import os

import open_clip
import pytest
import torch

from segpcl_fast.model.clip import ModelLoadError, load_model


def test_raw_and_projected_features_match_open_clip(tiny_model_name):
    model = load_model(tiny_model_name, pretrained=None)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        raw, emb = model.encode_image(x)
        ref = model.clip.encode_image(x)
    assert raw.shape == (3, 48) and emb.shape == (3, 32)
    torch.testing.assert_close(emb, ref)
    torch.testing.assert_close(emb, raw @ model.visual.proj)


def test_text_truncation_equals_full_length(tiny_model_name):
    model = load_model(tiny_model_name, pretrained=None)
    tokens = model.tokenize(["a cat.", "a good photo of a very small striped orange cat."])
    assert tokens.shape[1] == 24
    with torch.no_grad():
        full = model.encode_text(tokens, truncate=False)
        short = model.encode_text(tokens, truncate=True)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)


def test_class_embeddings_average_templates(tiny_model_name):
    model = load_model(tiny_model_name, pretrained=None)
    prompts = [["a {}.".format(c), "a photo of a {}.".format(c)] for c in ("dog", "cat")]
    with torch.no_grad():
        u = model.class_embeddings(prompts)
        single = model.class_embeddings([[p] for plist in prompts for p in plist])
    expected = torch.nn.functional.normalize(single.view(2, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(u, expected)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(2))
    ragged = [["a dog."], ["a cat.", "a photo of a cat."], ["a cow.", "a big cow.", "a photo of a cow."]]
    with torch.no_grad():  # classes with different prompt counts: each its own mean
        u = model.class_embeddings(ragged)
        single = model.class_embeddings([[p] for plist in ragged for p in plist])
    expected = torch.stack([single[0], single[1:3].mean(0), single[3:].mean(0)])
    torch.testing.assert_close(u, torch.nn.functional.normalize(expected, dim=-1))


def test_logit_scale_is_exp(tiny_model_name):
    model = load_model(tiny_model_name, pretrained=None)
    torch.testing.assert_close(model.logit_scale(), model.clip.logit_scale.exp())


def test_local_checkpoint_roundtrip(tiny_model_name, tmp_path):
    src = load_model(tiny_model_name, pretrained=None)
    path = tmp_path / "weights.pt"
    torch.save(src.clip.state_dict(), path)
    loaded = load_model(tiny_model_name, pretrained=str(path))
    for (n, a), (_, b) in zip(src.clip.state_dict().items(), loaded.clip.state_dict().items()):
        assert torch.equal(a, b), n


def test_local_weights_whose_bytes_changed_are_refused(tiny_model_name, tmp_path, zero_block):
    """open_clip loads a weights file with a damaged tensor record as if nothing were wrong (other weights,
    silently); its records' CRC-32s say it is damaged."""
    src = load_model(tiny_model_name, pretrained=None)
    path = tmp_path / "weights.pt"
    torch.save(src.clip.state_dict(), path)
    zero_block(path)
    with pytest.raises(ModelLoadError, match=r"could not load .* '.*weights.pt' its bytes changed after it was "
                                             r"written \(BadZipFile: Bad CRC-32 .*\): a damaged copy or disk; copy or download "
                                             r"the weights again"):
        load_model(tiny_model_name, pretrained=str(path))


def test_checkpoint_of_another_config_is_a_clear_error(tiny_model_name, tmp_path):
    other = load_model("ViT-B-32", pretrained=None)
    path = tmp_path / "vitb32.pt"
    torch.save(other.clip.state_dict(), path)
    with pytest.raises(ModelLoadError, match=rf"changed! Check it is a state_dict saved from the same model config "
                                             rf"\({tiny_model_name}\); its tensor sizes are those of open_clip's "
                                             r"ViT-B-32, ViT-B-32-quickgelu: name that as model.name$"):
        load_model(tiny_model_name, pretrained=str(path))
    # the same guess through a training checkpoint's wrapping ({"state_dict": {"module.<key>": ...}}); the tiny
    # model's own sizes named to a ViT-B-32 that is given them
    tiny = load_model(tiny_model_name, pretrained=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.clip.state_dict().items()}}, path)
    with pytest.raises(ModelLoadError, match=r"same model config \(ViT-B-32\); its tensor sizes are those of "
                                             rf"open_clip's ([\w-]+, )*{tiny_model_name}(, [\w-]+)*: name"):
        load_model("ViT-B-32", pretrained=str(path))


def test_configs_fitting_reads_sizes_not_names():
    """configs_fitting, as OpenAI's clip.build_model reads a state dict: a changed depth, patch or vocabulary is
    another architecture; a timm or Hugging Face tower's keys give no guess."""
    from segpcl_fast.model.clip import configs_fitting
    with torch.device("meta"):
        state = open_clip.create_model("ViT-L-14-336", device="meta").state_dict()
    assert configs_fitting(state) == ["ViT-L-14-336", "ViT-L-14-336-quickgelu"]
    assert configs_fitting({k: v for k, v in state.items() if ".resblocks.23." not in k or "visual" not in k}) == []
    assert configs_fitting({**state, "token_embedding.weight": torch.empty(100, 768, device="meta")}) == []
    assert configs_fitting({**state, "visual.conv1.weight": torch.empty(1024, 3, 16, 16, device="meta")}) == []
    assert configs_fitting({k.replace("visual.", "visual.trunk."): v for k, v in state.items()}) == []
    # odd files give no guess, not an error inside the load error
    assert configs_fitting({"state_dict": [1, 2]}) == [] and configs_fitting({1: torch.zeros(1)}) == []
    assert configs_fitting({**state, "visual.positional_embedding": torch.empty(1, 1024, device="meta")}) == []
    assert configs_fitting({**state, "visual.conv1.weight": torch.empty(1024, device="meta")}) == []


def test_unknown_model_suggests_names():
    with pytest.raises(ModelLoadError, match="unknown model 'ViT-B-61'.*ViT-B-16"):
        load_model("ViT-B-61", pretrained=None)
    with pytest.raises(ModelLoadError, match=r"unknown model 'qqqqqqqq'; \(open_clip.list_models\(\) lists all\)"):
        load_model("qqqqqqqq", pretrained=None)


def test_missing_file_and_unknown_tag(tiny_model_name, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tiny_model_name, pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ModelLoadError, match="unknown pretrained tag"):
        load_model("ViT-B-16", pretrained="not-a-tag")
    # the bundled model's own tag is named (its list from open_clip is empty: it said "known tags: none")
    with pytest.raises(ModelLoadError, match=r"unknown pretrained tag 'openai' for model 'segpcl-tiny'; known tags: "
                                             r"\['segpcl-world'\]"):
        load_model("segpcl-tiny", pretrained="openai")


def test_uncached_weights_fail_fast_offline(tmp_path):
    with pytest.raises(ModelLoadError, match="not available offline"):
        load_model("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_weights_holding_code_are_refused_without_running_it(tiny_model_name, tmp_path):
    """open_clip reads weights with weights_only=True and refuses such a file; the diagnosis of why it
    failed must not unpickle it either (it once did, with weights_only=False)."""
    evil = tmp_path / "weights.pt"
    torch.save({"visual.proj": _RunsCode(tmp_path / "pwned")}, evil)
    with pytest.raises(ModelLoadError, match="weights.pt holds Python objects besides tensors .*give an open_clip"):
        load_model(tiny_model_name, pretrained=str(evil))
    assert not (tmp_path / "pwned").exists()


def test_a_corrupt_or_directory_checkpoint_is_one_clear_error(tiny_model_name, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    with pytest.raises(ModelLoadError, match="could not load .*notes.pt.* is not a checkpoint torch can read .*"
                                             "give an open_clip state_dict file") as e:
        load_model(tiny_model_name, pretrained=str(text))
    assert "weights_only=False" not in str(e.value)  # torch's advice for files it cannot unpickle
    run_checkpoint = tmp_path / "task_00.pt"
    torch.save({"task": 0, "lora": {}, "learner": {}, "config": {}}, run_checkpoint)
    with pytest.raises(ModelLoadError, match="is a segpcl_fast run checkpoint .* not CLIP weights; continue that run"):
        load_model(tiny_model_name, pretrained=str(run_checkpoint))
    with pytest.raises(ModelLoadError, match="is a directory; give the checkpoint file"):
        load_model(tiny_model_name, pretrained=str(tmp_path))


def test_uncached_hf_hub_model_fails_before_any_network_call(tmp_path, monkeypatch):
    import socket
    tries = []

    def refuse(self, address, *args, **kwargs):
        tries.append(address)
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*model.pretrained=null"):
        load_model("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", pretrained=None, cache_dir=str(tmp_path))
    assert tries == []


def test_the_hub_is_offline_while_open_clip_loads_and_restored_after():
    import huggingface_hub.constants as hf_constants
    from segpcl_fast.model.clip import _hf_hub_offline
    before = hf_constants.HF_HUB_OFFLINE
    with _hf_hub_offline():
        assert hf_constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert hf_constants.HF_HUB_OFFLINE == before


def test_open_clip_without_vit_hooks_is_one_clear_error(tiny_model_name, monkeypatch):
    """open_clip < 2.32: its VisionTransformer has no _embeds / _pool, so r(x) cannot be read; that is
    an error naming the upgrade, not a silent fall-back to r = v (which a non-ViT tower takes)."""
    import open_clip.transformer as oct
    from segpcl_fast.model.clip import CLIPModel
    clip = load_model(tiny_model_name, pretrained=None).clip
    monkeypatch.delattr(oct.VisionTransformer, "_embeds")
    with pytest.raises(ModelLoadError, match=r"no _embeds / _pool.*open_clip_torch>=2.32"):
        CLIPModel(clip, None, tiny_model_name, None)


def test_a_non_square_image_size_is_refused_when_the_model_loads(tiny_model_name):
    """It loaded and then failed at the first forward (the transforms took size[0])."""
    from segpcl_fast.model.clip import CLIPModel
    model = load_model(tiny_model_name, None)
    model.clip.visual.image_size = (32, 48)
    with pytest.raises(ModelLoadError, match=r"non-square images \(32, 48\): not supported"):
        CLIPModel(model.clip, model.tokenizer, tiny_model_name, None)
    model.clip.visual.image_size = (32, 32)
    assert CLIPModel(model.clip, model.tokenizer, tiny_model_name, None).image_stats.size == 32


def test_a_hub_tokenizer_missing_offline_is_one_error_before_the_model_is_built(monkeypatch):
    """SigLIP's tokenizer (text_cfg.hf_tokenizer_name) comes from the Hugging Face hub: offline and not
    cached, the error names it and how to cache it, before a large model is built for nothing."""
    import open_clip

    def offline(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the tokenizer was checked")
    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    monkeypatch.setattr(open_clip, "create_model", never)
    with pytest.raises(ModelLoadError, match=r"could not load ViT-B-16-SigLIP: its tokenizer comes from the Hugging "
                                             r"Face hub \('timm/ViT-B-16-SigLIP'\) and is not in the local cache; .*"
                                             r"open_clip.get_tokenizer\('ViT-B-16-SigLIP'\)"):
        load_model("ViT-B-16-SigLIP", pretrained=None)


def test_class_embeddings_tokenize_a_prompt_set_once_and_read_nothing_back(tiny_model_name, monkeypatch):
    """The training step embeds the same class prompts every step: the second call must not tokenize
    again nor read the truncation length back from the tokens' device (Tensor.item: a host sync on a
    GPU), and must give what a fresh tokenization gives."""
    from segpcl_fast.model import clip as clip_module
    model = load_model(tiny_model_name, pretrained=None)
    prompts = [["a {}.".format(c), "a photo of a {}.".format(c)] for c in ("dog", "cat", "very small striped bird")]
    calls = []
    tokenize = model.tokenizer
    model.tokenizer = lambda texts: calls.append(len(texts)) or tokenize(texts)
    with torch.no_grad():
        first = model.class_embeddings(prompts)
        assert calls == [6]

        def no_item(self):
            raise AssertionError("Tensor.item() called by a cached class_embeddings")
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", no_item)
            again = model.class_embeddings(prompts)
        assert calls == [6]
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        fresh = load_model(tiny_model_name, pretrained=None)
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh.class_embeddings(prompts), first, rtol=0, atol=0)
        # a different set (or chunking) is tokenized for itself; the cache keeps the last few sets
        model.class_embeddings(prompts[:2])
        model.class_embeddings(prompts, batch_size=4)
        assert calls == [6, 4, 6]
        model.tokenizer = lambda texts: calls.append(-len(texts)) or tokenize(texts)  # another tokenizer: no stale hit
        model.class_embeddings(prompts)
        assert calls == [6, 4, 6, -6]
        for n in range(clip_module.TOKEN_CACHE_SIZE + 2):
            model.class_embeddings([[f"a photo number {n}."]])
    assert len(model._token_cache) == clip_module.TOKEN_CACHE_SIZE


def test_prompts_first_embedded_under_inference_mode_still_train(tiny_model_name):
    """A prompt set first embedded under torch.inference_mode (a zero-shot check) is cached; a later
    training step reuses those tokens and must still backpropagate (the end-of-text gather saves them)."""
    from segpcl_fast.model.lora import inject_lora, lora_parameters
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=2, towers=("text",))
    prompts = [["a photo of a dog."], ["a photo of a small cat."]]
    with torch.inference_mode():
        zero_shot = model.class_embeddings(prompts)
    emb = model.class_embeddings(prompts)
    emb.sum().backward()
    assert all(p.grad is not None for p in lora_parameters(model))
    torch.testing.assert_close(emb.detach(), zero_shot, rtol=0, atol=0)


def test_set_precision_maps_run_settings_to_tower_autocast(tiny_model_name):
    model = load_model(tiny_model_name, pretrained=None)
    model.set_precision(image="bf16", text="fp32")
    assert model.image_autocast is torch.bfloat16 and model.text_autocast is None
    model.set_precision(image="fp32", text="bf16")
    assert model.image_autocast is None and model.text_autocast is torch.bfloat16
    model.set_precision(image="fp16", text="fp16")
    assert model.image_autocast is torch.float16 and model.text_autocast is torch.float16
    with pytest.raises(ValueError, match="text precision 'half' is not one of fp32, bf16, fp16"):
        model.set_precision(text="half")
