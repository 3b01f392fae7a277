"""Named method variants resolve to the documented switches."""
import pytest

from segpcl_fast.config import Config, ConfigError
from segpcl_fast.method import variants


def _resolved(name, **changes):
    cfg = Config()
    cfg.run.method = name
    for key, value in changes.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    return variants.resolve_variant(cfg)


def _switches(cfg):
    return (cfg.acgd.enabled, cfg.tsgr.enabled, cfg.prototypes.transfer, cfg.prototypes.beta, cfg.acgd.source)


@pytest.mark.parametrize("name, expected", [
    ("lora_finetune", (False, False, False, 0.0, "anchors")),
    ("+acgd", (True, False, False, 0.0, "anchors")),
    ("+tsgr", (True, True, False, 0.0, "anchors")),
    # method.md's ablation: + prototype transfer (CLIP path only), then + visual branch (= full)
    ("+prototype_transfer", (True, True, True, 0.0, "anchors")),
    ("+visual_branch", (True, True, True, 0.5, "anchors")),
    ("segpcl", (True, True, True, 0.5, "anchors")),
    ("onlyclip", (True, True, True, 0.0, "anchors")),
    ("visual_no_transfer", (True, True, False, 0.5, "anchors")),
    ("distill_new_data", (True, True, True, 0.5, "new_data")),
    ("distill_seeds", (True, True, True, 0.5, "seeds")),
])
def test_variant_switches(name, expected):
    assert _switches(_resolved(name)) == expected


def test_variants_turn_components_back_on_and_keep_tuned_values(caplog):
    """A config.yaml saved by another method's run holds that method's switches: the variant sets its own,
    and says so (a --set tsgr.enabled=false would otherwise vanish without a word)."""
    variants._warned.clear()  # said once per process: start from none said
    with caplog.at_level("WARNING", logger="segpcl_fast.method"):
        cfg = _resolved("segpcl", acgd__enabled=False, tsgr__enabled=False, acgd__weight=2.0, prototypes__beta=0.3)
    assert cfg.acgd.enabled and cfg.tsgr.enabled
    assert cfg.acgd.weight == 2.0 and cfg.prototypes.beta == 0.3
    (record,) = [r for r in caplog.records if r.name == "segpcl_fast.method"]
    assert ("run.method=segpcl sets acgd.enabled=False -> True, tsgr.enabled=False -> True: the method decides"
            in record.getMessage()) and "set its weight to 0" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpcl_fast.method"):
        _resolved("lora_finetune")  # switches at their defaults: the variant's own choice, nothing to say
    assert not caplog.records


@pytest.mark.parametrize("name,key,value,replaced", [
    ("lora_finetune", "prototypes__beta", 0.7, "prototypes.beta=0.7 -> 0.0"),
    ("zeroshot", "optim__epochs", 5, "optim.epochs=5 -> 0"),
    ("distill_seeds", "acgd__source", "new_data", "acgd.source=new_data -> seeds"),
])
def test_every_key_a_variant_sets_is_warned_when_replaced(caplog, name, key, value, replaced):
    """`--method lora_finetune --set prototypes.beta=0.7` and `--method zeroshot --set optim.epochs=5` lost the
    user's value without a word (only the three switches were warned about): every key the variant sets is."""
    variants._warned.clear()
    with caplog.at_level("WARNING", logger="segpcl_fast.method"):
        _resolved(name, **{key: value})
    (record,) = [r for r in caplog.records if r.name == "segpcl_fast.method"]
    assert f"run.method={name} sets {replaced}: the method decides" in record.getMessage()
    assert key.replace("__", ".") in record.getMessage().split("decides ")[1]


@pytest.mark.parametrize("name", ["+acgd", "+tsgr", "+visual_branch", "segpcl", "onlyclip"])
def test_variants_keep_the_chosen_acgd_source(name):
    # `train --method segpcl --set acgd.source=seeds` must run on seeds, not silently on anchors
    assert _resolved(name, acgd__source="seeds").acgd.source == "seeds"
    assert _resolved("distill_new_data", acgd__source="seeds").acgd.source == "new_data"


def test_zeroshot_trains_nothing():
    cfg = _resolved("zeroshot")
    assert cfg.optim.epochs == 0 and cfg.prototypes.beta == 0.0 and not cfg.acgd.enabled


def test_resolve_does_not_mutate_input():
    cfg = Config()
    cfg.run.method = "lora_finetune"
    variants.resolve_variant(cfg)
    assert cfg.acgd.enabled and cfg.prototypes.beta == 0.5


def test_unknown_variant_lists_names():
    with pytest.raises(ConfigError, match="known: .*segpcl.*lora_finetune|known: .*lora_finetune.*segpcl"):
        _resolved("segpcl++")


def test_visual_variant_with_zero_beta_is_refused():
    with pytest.raises(ConfigError, match="onlyclip"):
        _resolved("segpcl", prototypes__beta=0.0)


def test_ladder_is_made_of_known_variants_in_paper_order():
    assert all(name in variants.VARIANTS for name in variants.LADDER)
    order = [variants.LADDER.index(n) for n in ("lora_finetune", "+acgd", "+tsgr", "+prototype_transfer", "segpcl")]
    assert order == sorted(order)
    assert "onlyclip" in variants.LADDER and "distill_new_data" in variants.LADDER
    # each rung adds exactly one component to the one before it (method.md's ablation rows)
    rungs = [_switches(_resolved(n))[:4] for n in ("lora_finetune", "+acgd", "+tsgr", "+prototype_transfer",
                                                   "+visual_branch")]
    assert all(sum(a != b for a, b in zip(prev, cur)) == 1 for prev, cur in zip(rungs, rungs[1:]))
    assert set(variants.DESCRIPTIONS) == set(variants.VARIANTS)
