"""Checks added by a mutation audit of engine/flops.py and engine/presets.py: each test here fails on a
small semantic change (a mutant) of that code which the rest of the suite let through, and passes on
the code as it is. FLOPs are compared with the same model counted another way (a projection held as
an nn.Linear instead of a Parameter), presets against files written in a temporary folder.

Covered:
- step_flops refuses a count other than "model" / "executed" (a typo silently counted "model");
- a projection held as an nn.Linear (open_clip's proj_type="linear" text towers) counts as its
  (in, out) widths, the same FLOPs as the Parameter (in, out) open_clip's ViT holds: the embedding
  width of the logits and TSGR products comes from its out_features;
- an empty preset YAML (environment-only preset) lays nothing over the config instead of failing;
- replaced_by_preset names a user's value only where the preset changed it and the final config still
  holds the preset's value (no "128 -> 128", nothing for a key set again after the preset).
"""
import os

import pytest
import torch

from segpcl_fast.config import ConfigError
from segpcl_fast.engine.flops import StepShape, _proj_width, step_flops

SHAPE = StepShape(n_images=3, n_anchors=2, n_prompts=5, text_len=7, n_cls_classes=2, n_old=2, tsgr_pairs=4)


@pytest.fixture(scope="module")
def lora_model(tiny_model_name):
    from segpcl_fast.model.clip import load_model
    from segpcl_fast.model.lora import inject_lora
    model = load_model(tiny_model_name, pretrained=None)
    inject_lora(model, rank=4, alpha=4.0, targets=["q", "c_fc"])
    return model


@pytest.mark.parametrize("count", ["Model", "exact", ""])
def test_an_unknown_count_is_refused(lora_model, count):
    with pytest.raises(ValueError, match=f"count must be 'model' or 'executed', got '{count}'"):
        step_flops(lora_model, SHAPE, count=count)


def test_a_linear_projection_counts_as_its_in_and_out_widths(lora_model):
    """open_clip's ViT holds proj as a Parameter (width, embed_dim), x @ proj; a text tower with
    proj_type="linear" holds an nn.Linear(width, embed_dim), whose weight is (embed_dim, width). Both are
    the same product: the same FLOPs, with embed_dim (not the tower width) in the logits."""
    visual = lora_model.visual
    width, embed = visual.proj.shape
    assert width != embed  # 48 -> 32: a swap of the two would show
    assert _proj_width(visual.proj) == (width, embed)
    assert _proj_width(torch.nn.Linear(width, embed)) == (width, embed)
    want = step_flops(lora_model, SHAPE)
    proj = visual.proj
    try:
        del visual.proj  # (a registered Parameter is replaced by a module only once it is gone)
        visual.proj = torch.nn.Linear(width, embed, bias=False)
        assert step_flops(lora_model, SHAPE) == want
    finally:
        del visual.proj
        visual.proj = proj
    # the logits and TSGR products alone, by hand: image . text over e = 32, both operands needing a gradient
    e = embed
    img_txt = 2 * e * (SHAPE.n_images * SHAPE.n_cls_classes + SHAPE.n_anchors * SHAPE.n_old)
    pairs = 2 * e * SHAPE.tsgr_pairs
    assert want["losses"] == (img_txt + pairs) + (2 * img_txt + 2 * pairs)


def test_an_empty_preset_yaml_lays_nothing_over_the_config(tmp_path, monkeypatch):
    """A preset may be environment only: its YAML empty (yaml.safe_load gives None) is no keys, not an error."""
    from segpcl_fast.api import make_config
    from segpcl_fast.engine import presets
    monkeypatch.setattr(presets, "CONFIG_DIR", tmp_path)
    monkeypatch.setitem(presets.PRESETS, "envonly", presets.HardwarePreset(name="envonly", nproc_per_node=1,
                                                                           env={"SEGPCL_TEST_ENVONLY": "7"}))
    monkeypatch.delenv("SEGPCL_TEST_ENVONLY", raising=False)
    (tmp_path / "envonly.yaml").write_text("# nothing but a comment\n")
    assert presets.preset_overrides("envonly") == {}
    cfg = make_config()
    out = presets.apply_preset(cfg, "envonly")
    assert out == cfg
    assert os.environ["SEGPCL_TEST_ENVONLY"] == "7"
    (tmp_path / "envonly.yaml").write_text("null\n")
    assert presets.preset_overrides("envonly") == {}
    (tmp_path / "envonly.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="must be a partial config"):
        presets.preset_overrides("envonly")


def test_replaced_by_preset_names_only_values_the_preset_changed_and_that_stayed_changed():
    """(key, the user's value, the preset's) for a key the user's file sets that --hw changed to the preset's
    value: a file value equal to the preset's is not replaced (not "128 -> 128"), and a key whose final value is
    neither the user's nor the preset's (set again after the preset) is not the preset's doing."""
    from segpcl_fast.api import make_config
    from segpcl_fast.engine import presets
    before = make_config(optim__batch_size=64, run__precision="bf16", data__num_workers=8, eval__batch_size=256)
    after = presets.apply_preset(before, "1gpu", export_env=False)
    keys = {"optim.batch_size", "run.precision", "data.num_workers", "eval.batch_size", "optim.lr"}
    assert presets.replaced_by_preset(keys, before, after, "1gpu") == [
        ("optim.batch_size", 64, 128), ("eval.batch_size", 256, 512)]
    again = make_config(after, eval__batch_size=1024)  # set again after the preset: neither value
    assert presets.replaced_by_preset(keys, before, again, "1gpu") == [("optim.batch_size", 64, 128)]
    assert presets.replaced_by_preset(keys - {"optim.batch_size"}, before, again, "1gpu") == []
