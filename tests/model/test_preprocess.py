"""model.preprocess: the image preprocessing of a local weights file (a tag's, or given keys).

open_clip applies a pretrained tag's preprocessing only when it loads the weights by that tag; a local
copy of them gets the model config's (OpenAI's for most). These tests hold the override against
open_clip's own tag table and against the transform open_clip builds from the resulting cfg.
"""
import open_clip
import pytest
import torch
from PIL import Image

from segpcl_fast import config as C
from segpcl_fast.api import make_config
from segpcl_fast.config import ConfigError
from segpcl_fast.data.transforms import clip_test_transform
from segpcl_fast.engine import checkpoint as ckpt
from segpcl_fast.engine.trainer import build_model
from segpcl_fast.model import clip as clip_mod
from segpcl_fast.model.clip import ModelLoadError, load_model, preprocess_override

SQUASH = {"mean": [0.5, 0.25, 0.125], "std": [0.2, 0.3, 0.4], "interpolation": "bilinear",
          "resize_mode": "squash", "fill_color": 7}


@pytest.fixture
def tiny_file(tiny_model_name, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(load_model(tiny_model_name, pretrained=None).clip.state_dict(), path)
    return str(path)


def test_a_local_file_keeps_open_clip_defaults_without_an_override(tiny_model_name, tiny_file):
    stats = load_model(tiny_model_name, pretrained=tiny_file).image_stats
    assert stats.mean == open_clip.OPENAI_DATASET_MEAN and stats.std == open_clip.OPENAI_DATASET_STD
    assert stats.geometry() == {"resize_mode": "shortest", "interpolation": "bicubic", "fill_color": 0}


def test_a_mapping_sets_normalisation_and_geometry_of_a_local_file(tiny_model_name, tiny_file):
    model = load_model(tiny_model_name, pretrained=tiny_file, preprocess=SQUASH)
    stats = model.image_stats
    assert stats.mean == (0.5, 0.25, 0.125) and stats.std == (0.2, 0.3, 0.4)
    assert stats.geometry() == {"resize_mode": "squash", "interpolation": "bilinear", "fill_color": 7}
    # the weights are the file's all the same
    ref = torch.load(tiny_file, weights_only=True)
    assert all(torch.equal(v, ref[k]) for k, v in model.clip.state_dict().items())
    # our test transform is open_clip's own transform of that cfg, bit for bit
    img = Image.fromarray((torch.rand(45, 70, 3) * 255).to(torch.uint8).numpy())
    ours = clip_test_transform(stats.size, stats.mean, stats.std, **stats.geometry())(img)
    pp = model.visual.preprocess_cfg
    theirs = open_clip.image_transform(pp["size"], is_train=False, mean=pp["mean"], std=pp["std"],
                                       resize_mode=pp["resize_mode"], interpolation=pp["interpolation"],
                                       fill_color=pp["fill_color"])(img)
    assert torch.equal(ours, theirs)


def test_a_partial_mapping_keeps_the_other_keys(tiny_model_name, tiny_file):
    stats = load_model(tiny_model_name, pretrained=tiny_file, preprocess={"resize_mode": "longest"}).image_stats
    assert stats.mean == open_clip.OPENAI_DATASET_MEAN
    assert stats.geometry() == {"resize_mode": "longest", "interpolation": "bicubic", "fill_color": 0}


def test_a_tag_override_is_exactly_what_open_clip_merges_for_that_tag():
    got = preprocess_override("ViT-L-14-CLIPA", "datacomp1b")
    from dataclasses import asdict
    from open_clip.constants import IMAGENET_MEAN
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    # create_model(name, pretrained=tag) merges the tag's cfg over the defaults; ours over the same must agree
    base = asdict(PreprocessCfg())
    by_tag = merge_preprocess_dict(base, open_clip.get_pretrained_cfg("ViT-L-14-CLIPA", "datacomp1b"))
    assert merge_preprocess_dict(base, got) == by_tag
    assert got["resize_mode"] == "squash" and got["interpolation"] == "bilinear" and got["mean"] == IMAGENET_MEAN
    assert preprocess_override("ViT-L-14-CLIPA", None) is None


def test_a_tag_reaches_the_model_loaded_from_a_file(tiny_model_name, tiny_file, monkeypatch):
    table = {("test-tiny", "dfn-like"): {"mean": (0.1, 0.2, 0.3), "std": (0.9, 0.8, 0.7), "interpolation": "bilinear",
                                        "resize_mode": "squash", "url": "", "hf_hub": ""}}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda m, t: table.get((m, t), {}))
    stats = load_model(tiny_model_name, pretrained=tiny_file, preprocess="dfn-like").image_stats
    assert (stats.mean, stats.std) == ((0.1, 0.2, 0.3), (0.9, 0.8, 0.7))
    assert stats.geometry() == {"resize_mode": "squash", "interpolation": "bilinear", "fill_color": 0}


def test_an_unknown_tag_names_the_model_s_tags():
    with pytest.raises(ModelLoadError, match=r"'laion9' is no pretrained tag of ViT-B-32 \(its tags: \[.*'openai'"):
        load_model("ViT-B-32", pretrained=None, preprocess="laion9")
    with pytest.raises(ModelLoadError, match="has no pretrained tags"):
        preprocess_override("segpcl-tiny", "openai")


def test_model_preprocess_reaches_the_built_model_and_the_fingerprint():
    cfg = make_config(model__pretrained=None, model__preprocess={"resize_mode": "squash", "std": [0.5, 0.5, 0.5]})
    model, _ = build_model(cfg, torch.device("cpu"))
    assert model.image_stats.geometry()["resize_mode"] == "squash" and model.image_stats.std == (0.5, 0.5, 0.5)
    plain = make_config(model__pretrained=None)
    assert ckpt.config_fingerprint(cfg.to_dict()) != ckpt.config_fingerprint(plain.to_dict())
    # a checkpoint from before the key existed still matches a config that leaves it at null
    old = plain.to_dict()
    del old["model"]["preprocess"]
    assert ckpt.config_diff(old, plain.to_dict(), defaults=make_config().to_dict()) == {}
    assert "model.preprocess.resize_mode" in ckpt.config_diff(old, cfg.to_dict(), defaults=make_config().to_dict())


@pytest.mark.parametrize("value, problem", [
    ({}, "must be null, a pretrained tag"),
    ("  ", "must be null, a pretrained tag"),
    (3, "must be null, a pretrained tag"),
    ({"size": 224}, r"unknown key\(s\) \['size'\]"),
    ({"mean": [0.5, 0.5]}, "mean must be 3 finite numbers"),
    ({"std": [0.5, 0.0, 0.5]}, "std must be > 0"),
    ({"std": [0.5, float("nan"), 0.5]}, "std must be 3 finite numbers"),
    ({"interpolation": "lanczos"}, "interpolation must be one of"),
    ({"resize_mode": "crop"}, "resize_mode must be one of"),
    ({"fill_color": 256}, r"fill_color must be an integer in \[0, 255\]"),
])
def test_bad_model_preprocess_is_one_config_error(value, problem):
    with pytest.raises(ConfigError, match=problem):
        make_config(model__preprocess=value)


def test_config_copies_of_the_preprocess_constants_match_their_consumers():
    from segpcl_fast.data import transforms
    assert C.PREPROCESS_KEYS == clip_mod.PREPROCESS_KEYS
    assert C.RESIZE_MODES == transforms.RESIZE_MODES and C.INTERPOLATIONS == transforms.INTERPOLATIONS
    assert set(C.PREPROCESS_KEYS) == set(open_clip.transform._PREPROCESS_KEYS) - {"size", "mode"}
