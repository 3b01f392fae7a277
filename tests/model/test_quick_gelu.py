"""OpenAI's CLIPs run QuickGELU (x sigmoid(1.702 x)); open_clip's config for ViT-B-16 has GELU, and open_clip (2.x and
3.x) builds ViT-B-16 / openai with GELU, only warning. load_model builds the activation the weights were trained with
(a tag's, OpenAI's TorchScript file's), and a run's checkpoints, exports and peft records carry it."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segpcl_fast.api import make_config, train
from segpcl_fast.classifier import ClassifierError, load_classifier
from segpcl_fast.engine import checkpoint as ckpt
from segpcl_fast.model.clip import (ModelLoadError, config_quick_gelu, load_model, open_clip_resolves,
                                    weights_quick_gelu)


def _reference(name, quick_gelu):
    """open_clip's model `name` with the activation asked for, random weights (eval mode)."""
    import open_clip
    return open_clip.create_model(name, force_quick_gelu=quick_gelu).eval()


def _scripted_copy(model, path):
    """`model` as a TorchScript archive (torch.jit.trace + save): OpenAI's release format for its CLIPs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, text = torch.rand(1, 3, 32, 32), torch.zeros(1, 24, dtype=torch.long)
        torch.jit.save(torch.jit.trace(model, (images, text), check_trace=False, strict=False), str(path))
    return path


def _image_embeddings(clip, images):
    with torch.no_grad():
        return clip.encode_image(images)


def test_the_tags_activation_follows_open_clips_pretrained_table():
    """Every (model, tag) open_clip lists: QuickGELU is forced exactly where the tag was trained with it and the
    name's config lacks it (ViT-B-16 / openai yes; ViT-B-16-quickgelu / openai needs nothing; laion tags no)."""
    import open_clip
    pairs = open_clip.list_pretrained()
    forced = {(m, t) for m, t in pairs if weights_quick_gelu(m, t, t)}
    expected = {(m, t) for m, t in pairs
                if open_clip.get_pretrained_cfg(m, t).get("quick_gelu") and not config_quick_gelu(m)}
    assert forced == expected
    assert ("ViT-B-16", "openai") in forced and ("ViT-B-16-quickgelu", "openai") not in forced
    assert ("ViT-B-16", "laion2b_s34b_b88k") not in forced and config_quick_gelu("ViT-B-16-quickgelu")
    assert not weights_quick_gelu("ViT-B-16", None, None)  # random weights: the config's
    assert not weights_quick_gelu("segpcl-tiny", "segpcl-world", "/any/file.pt")  # the bundled weights: as trained


def test_a_tag_trained_with_quick_gelu_builds_it_from_its_downloaded_file(tiny_model_name, tmp_path, monkeypatch):
    """A tag whose pretrained config says quick_gelu, read from its URL download (open_clip's and clip.load's
    ~/.cache/clip): the model runs QuickGELU, holds the file's weights and computes what open_clip's QuickGELU
    model does; the same weights under a GELU tag build GELU."""
    import open_clip.pretrained as pretrained
    source = _reference(tiny_model_name, quick_gelu=True)
    torch.save(source.state_dict(), tmp_path / "tiny-quick.pt")
    torch.save(source.state_dict(), tmp_path / "tiny-gelu.pt")
    # the quick tag also names a hub copy, not cached here (open_clip would ask the offline hub for it first)
    # and its own normalisation, which a tag keeps when read from its file
    tags = {"quick": pretrained._pcfg(url="https://example.invalid/x/tiny-quick.pt", hf_hub="example/tiny-quick/",
                                      quick_gelu=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
            "plain": pretrained._pcfg(url="https://example.invalid/x/tiny-gelu.pt")}
    monkeypatch.setitem(pretrained._PRETRAINED, tiny_model_name, tags)
    images = torch.rand(2, 3, 32, 32)
    quick = load_model(tiny_model_name, "quick", cache_dir=str(tmp_path))
    assert quick.quick_gelu and not config_quick_gelu(tiny_model_name)
    assert (quick.image_stats.mean, quick.image_stats.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.testing.assert_close(_image_embeddings(quick.clip, images), _image_embeddings(source, images),
                               atol=1e-5, rtol=1e-5)
    plain = load_model(tiny_model_name, "plain", cache_dir=str(tmp_path))
    assert not plain.quick_gelu
    gap = (_image_embeddings(plain.clip, images) - _image_embeddings(source, images)).abs().max()
    assert gap > 1e-4  # the activation shows in the embeddings (what open_clip's GELU build would give)
    with pytest.raises(ModelLoadError, match="not available offline"):  # no file: the usual offline error
        load_model(tiny_model_name, "quick", cache_dir=str(tmp_path / "elsewhere"))


def test_openais_torchscript_file_loads_with_quick_gelu(tiny_model_name, tiny_coca_name, tmp_path):
    """A local TorchScript archive (OpenAI's ViT-B-16.pt format; open_clip's weights-only torch.load refuses it):
    its weights load into open_clip's model, with QuickGELU, and the model computes what the archive's does."""
    source = _reference(tiny_model_name, quick_gelu=True)
    path = _scripted_copy(source, tmp_path / "ViT-tiny.pt")
    model = load_model(tiny_model_name, str(path))
    assert model.quick_gelu
    own = source.state_dict()
    loaded = model.clip.state_dict()
    assert loaded.keys() == own.keys() and all(torch.equal(loaded[k], own[k]) for k in own)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(_image_embeddings(model.clip, images), _image_embeddings(source, images),
                               atol=1e-5, rtol=1e-5)
    assert not open_clip_resolves(tiny_model_name, str(path))  # a peft record names segpcl_fast.load_model only
    assert open_clip_resolves(tiny_model_name, None)
    # the archive of another model: one error naming the model and the file
    with pytest.raises(ModelLoadError, match=f"could not load {tiny_coca_name} with pretrained='{path}': .*Missing "
                                             f"key.* is a TorchScript archive .*holds the weights of this model"):
        load_model(tiny_coca_name, str(path))


def test_checkpoint_activation_check():
    """check_activation: a stored activation must be this model's; a checkpoint from before it was stored ran
    the one the name's config sets."""
    ckpt.check_activation("c.pt", {"quick_gelu": True}, built=True, name_default=False)
    ckpt.check_activation("c.pt", {}, built=False, name_default=False)
    ckpt.check_activation("c.pt", {}, built=True, name_default=True)
    with pytest.raises(ckpt.CheckpointError, match="with GELU in its MLPs, but this model runs QuickGELU"):
        ckpt.check_activation("c.pt", {"quick_gelu": False}, built=True, name_default=True)
    with pytest.raises(ckpt.CheckpointError, match=r"with GELU in its MLPs \(checkpoints written before the "
                                                   r"activation was stored .*\), but this model runs QuickGELU"):
        ckpt.check_activation("c.pt", {}, built=True, name_default=False)
    with pytest.raises(ckpt.CheckpointError, match="with QuickGELU in its MLPs, but this model runs GELU.* If "
                                                   "model.pretrained now names a state-dict copy"):
        ckpt.check_activation("c.pt", {"quick_gelu": True}, built=False, name_default=False)
    with pytest.raises(ckpt.CheckpointError) as gelu_run:
        ckpt.check_activation("c.pt", {"quick_gelu": False}, built=True, name_default=False)
    assert "state-dict copy" not in str(gelu_run.value)  # only a QuickGELU run can lose it to a copy


def test_a_quick_gelu_run_checkpoints_exports_and_refuses_the_other_activation(tiny_model_name, tmp_path):
    """A run on OpenAI-format weights (a TorchScript file) trains QuickGELU: its checkpoints say so, evaluate and
    load_classifier rebuild it, an export rebuilds it (also with nothing but open_clip, as the classifier's
    docstring shows), and a checkpoint whose stored activation is the other one is refused."""
    import open_clip

    from segpcl_fast.api import evaluate
    weights = _scripted_copy(_reference(tiny_model_name, quick_gelu=True), tmp_path / "weights.pt")
    cfg = make_config(model__name=tiny_model_name, model__pretrained=str(weights), max_train_per_class=2,
                      max_test_per_class=2, num_tasks=2, epochs=1, optim__batch_size=32, dpgd__k_adv=2,
                      dpgd__k_seed=2, output_dir=str(tmp_path / "run"), progress=False, num_threads=1,
                      eval__fwt=False, run__plots=False)
    result = train(cfg)
    last = tmp_path / "run" / "checkpoints" / "task_01.pt"
    assert torch.load(last, weights_only=True)["quick_gelu"] is True
    assert evaluate(tmp_path / "run")["acc_per_task_j"] == pytest.approx(result.accuracy_matrix[-1], abs=1e-9)
    clf = load_classifier(tmp_path / "run")
    assert clf.model.quick_gelu
    export = clf.export(tmp_path / "model.pt")
    saved = torch.load(export, weights_only=True)
    assert saved["quick_gelu"] is True and saved["model_config"]["quick_gelu"] is True
    back = load_classifier(export)
    rng = np.random.default_rng(0)
    images = clf.load_images([Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(2)])
    assert back.model.quick_gelu
    torch.testing.assert_close(back.logits(images), clf.logits(images), atol=1e-4, rtol=1e-5)
    plain = open_clip.create_model(saved["model_name"], force_quick_gelu=saved.get("quick_gelu", False)).eval()
    plain.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        clip_logits = saved["logit_scale"] * F.normalize(plain.encode_image(images), dim=-1) @ saved["text"].T
        _, emb = clf.model.encode_image(images)
    torch.testing.assert_close(clip_logits, clf.model.logit_scale() * F.normalize(emb, dim=-1) @ clf.text.T,
                               atol=1e-4, rtol=1e-5)
    # the checkpoint of a GELU model (another activation) is not this run's
    state = torch.load(last, weights_only=True)
    state["quick_gelu"] = False
    torch.save(state, last)
    with pytest.raises(ckpt.CheckpointError, match="with GELU in its MLPs, but this model runs QuickGELU"):
        evaluate(tmp_path / "run")
    with pytest.raises(ClassifierError, match="with GELU in its MLPs, but this model runs QuickGELU"):
        load_classifier(tmp_path / "run")


def test_peft_records_say_how_open_clip_builds_the_activation():
    """The peft adapter's base-model code: open_clip.create_model with force_quick_gelu where the model ran QuickGELU
    under a GELU name (ViT-B-16 / openai), not where the name has it or the model ran GELU."""
    from segpcl_fast.cli import peft_load_hint
    from segpcl_fast.model.peft_adapter import base_model_code
    assert base_model_code("ViT-B-16", "openai", None, True).endswith(
        "open_clip.create_model('ViT-B-16', pretrained='openai', force_quick_gelu=True)")
    assert base_model_code("ViT-B-16-quickgelu", "openai", None, True).endswith(
        "open_clip.create_model('ViT-B-16-quickgelu', pretrained='openai')")
    assert "force_quick_gelu" not in base_model_code("ViT-B-16", "laion2b_s34b_b88k", None, False)
    assert "force_quick_gelu=True" in peft_load_hint("ViT-B-16", "openai", "adapter", None, True)
