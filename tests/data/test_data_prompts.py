import pytest

from segpcl_fast.data.prompts import TEMPLATE_SETS, format_prompts, resolve_templates


def test_format_prompts():
    out = format_prompts(["cat", "maple tree"], ["a photo of a {}.", "art of the {}."])
    assert out == [["a photo of a cat.", "art of the cat."], ["a photo of a maple tree.", "art of the maple tree."]]


def test_named_sets_expand():
    assert resolve_templates("clip_default") == ["a good photo of a {}."]
    assert resolve_templates(["cub200"]) == ["a photo of a {}, a type of bird."]
    mixed = resolve_templates(["a photo of a {}.", "cifar100"])
    assert mixed[0] == "a photo of a {}." and len(mixed) == 18  # duplicate dropped
    assert len(TEMPLATE_SETS["ucf101_ensemble"]) == 48
    assert "a demonstration of the person practicing {}." in TEMPLATE_SETS["ucf101_ensemble"]


def test_openai_set_matches_open_clip():
    zsm = pytest.importorskip("open_clip.zero_shot_metadata")
    assert TEMPLATE_SETS["openai_imagenet"] == [t("{}") for t in zsm.OPENAI_IMAGENET_TEMPLATES]


def test_bad_templates():
    with pytest.raises(ValueError, match="unknown prompt template set"):
        resolve_templates(["no placeholder here"])
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["{} and {}"])
    with pytest.raises(ValueError, match="no prompt templates"):
        resolve_templates([])
