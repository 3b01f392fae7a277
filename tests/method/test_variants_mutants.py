"""Method variants: what tests/method/test_method_variants.py leaves open.

Checks, against variants.py's docstring, README.md ("the ladder zeroshot -> ... -> segpcl,
onlyclip, distill_new_data") and method.md's ablation: a variant changes only its defining
switches (tuned values carry over); zeroshot turns every component off; every visual-branch
variant keeps the config's beta and refuses beta = 0, while every CLIP-path-only variant accepts
it; onlyclip resolves to +prototype_transfer's config and +visual_branch to segpcl's (so `ablate`
trains each pair once); lookups return copies and are case-exact.
"""
import dataclasses

import pytest

from segpcl_fast.config import Config, ConfigError
from segpcl_fast.method import variants

# the switches a variant may set; every other field must come through from the run's config
SWITCHES = {("acgd", "enabled"), ("tsgr", "enabled"), ("prototypes", "transfer"), ("prototypes", "beta"),
            ("acgd", "source")}


def _config(method, beta=None):
    """The default config with run.method set as written (no validation: 'SEGPCL' must reach resolve)."""
    cfg = Config()
    cfg.run.method = method
    if beta is not None:
        cfg.prototypes.beta = beta
    return cfg


def _tuned(method):
    """A config with non-default tuned values, to see that they survive the variant."""
    cfg = _config(method)
    cfg.optim.lr = cfg.optim.lr * 3
    cfg.optim.epochs = cfg.optim.epochs + 2
    cfg.acgd.weight = cfg.acgd.weight * 2 + 0.25
    cfg.prototypes.beta = 0.3
    return cfg


def _switches(cfg):
    return (cfg.acgd.enabled, cfg.tsgr.enabled, cfg.prototypes.transfer, cfg.prototypes.beta)


def _uses_prototype_path(name):
    return variants.resolve_variant(_config(name)).prototypes.beta > 0


@pytest.mark.parametrize("name", variants.variant_names())
def test_variant_changes_only_its_switches(name):
    base = _tuned(name)
    got = variants.resolve_variant(base)
    allowed = SWITCHES | ({("optim", "epochs")} if name == "zeroshot" else set())
    changed = {(sec, key) for sec, fields in base.to_dict().items() for key, val in fields.items()
               if got.to_dict()[sec][key] != val}
    assert changed <= allowed, sorted(changed - allowed)


def test_zeroshot_turns_every_component_off():
    cfg = variants.resolve_variant(_config("zeroshot"))
    assert cfg.optim.epochs == 0
    assert _switches(cfg) == (False, False, False, 0.0)


@pytest.mark.parametrize("name", variants.VISUAL_BRANCH)
def test_visual_branch_variants_keep_beta_and_refuse_zero(name):
    assert variants.resolve_variant(_config(name, beta=0.3)).prototypes.beta == 0.3
    with pytest.raises(ConfigError, match="beta"):
        variants.resolve_variant(_config(name, beta=0.0))


@pytest.mark.parametrize("name", variants.variant_names())
def test_beta_zero_refused_exactly_for_the_prototype_path(name):
    # VISUAL_BRANCH must list exactly the variants whose inference uses the prototypes (beta > 0)
    assert (name in variants.VISUAL_BRANCH) == _uses_prototype_path(name)
    if name not in variants.VISUAL_BRANCH:  # CLIP path only: a config with beta = 0 is fine
        assert variants.resolve_variant(_config(name, beta=0.0)).prototypes.beta == 0.0


@pytest.mark.parametrize("pair", [("onlyclip", "+prototype_transfer"), ("+visual_branch", "segpcl")])
def test_documented_aliases_resolve_to_the_same_config(pair):
    a, b = (variants.resolve_variant(_tuned(n)).to_dict() for n in pair)
    a["run"].pop("method"), b["run"].pop("method")
    assert a == b


def test_ladder_starts_at_zeroshot_and_ends_with_the_references():
    assert variants.LADDER[0] == "zeroshot"
    assert variants.LADDER[-3:] == ["segpcl", "onlyclip", "distill_new_data"]
    assert len(set(variants.LADDER)) == len(variants.LADDER)


def test_names_and_lookups():
    assert variants.variant_names() == list(variants.VARIANTS)
    over = variants.variant_overrides("segpcl")
    over["acgd.enabled"] = False  # a caller editing its copy must not change the variant
    assert variants.VARIANTS["segpcl"]["acgd.enabled"] is True
    assert variants.resolve_variant(_config("segpcl")).acgd.enabled
    with pytest.raises(ConfigError, match="unknown method variant"):
        variants.resolve_variant(_config("SEGPCL"))


def test_resolve_returns_a_new_config():
    cfg = _config("lora_finetune")
    got = variants.resolve_variant(cfg)
    assert got is not cfg and dataclasses.asdict(cfg) == dataclasses.asdict(_config("lora_finetune"))
