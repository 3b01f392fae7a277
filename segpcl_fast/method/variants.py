"""Named method variants as data: each is a dict of dotted config overrides on top of the run's config.

    cfg.run.method = "+acgd"
    cfg = resolve_variant(cfg)          # acgd on, tsgr off, no visual branch

Variants set the switches that define them and nothing else, so tuned values (weights,
temperatures, lr, the ACGD source) carry over: `--method segpcl --set acgd.source=seeds` runs the
full method on seeds. Only distill_new_data / distill_seeds pin acgd.source. Variants that use
the visual branch keep the config's beta (method.md: 0.5) and refuse beta = 0 ("onlyclip").

LADDER is the order `segpcl-fast ablate` runs them in (the paper's ablation, method.md: LoRA-B,
+ ACGD, + TSGR, + prototype transfer, + visual branch = full; plus references).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

from ..config import Config, ConfigError, apply_overrides

log = logging.getLogger("segpcl_fast.method")

_FULL = {"acgd.enabled": True, "tsgr.enabled": True, "prototypes.transfer": True}
_NO_VISUAL = {"prototypes.beta": 0.0}

VARIANTS: dict[str, dict[str, Any]] = {
    # no training at all: the pretrained CLIP (B = 0), CLIP path only
    "zeroshot": {"optim.epochs": 0, "acgd.enabled": False, "tsgr.enabled": False,
                 "prototypes.transfer": False, **_NO_VISUAL},
    # L_cls only: the LoRA-B baseline
    "lora_finetune": {"acgd.enabled": False, "tsgr.enabled": False, "prototypes.transfer": False, **_NO_VISUAL},
    "+acgd": {"acgd.enabled": True, "tsgr.enabled": False,
              "prototypes.transfer": False, **_NO_VISUAL},
    "+tsgr": {"acgd.enabled": True, "tsgr.enabled": True,
              "prototypes.transfer": False, **_NO_VISUAL},
    # the paper's ablation rungs 4 and 5 (method.md): + prototype transfer (old prototypes follow the
    # anchors' drift; with beta = 0 it acts through DPGD's visual term), then + visual branch (the
    # dual path), which is the full method. [choice] how rung 4 runs without the visual branch: the paper
    # lists the rungs only; so rung 4 is onlyclip's configuration
    "+prototype_transfer": {**_FULL, **_NO_VISUAL},
    "+visual_branch": dict(_FULL),
    "segpcl": dict(_FULL),
    # full training, CLIP path only at inference: the same config as +prototype_transfer
    "onlyclip": {**_FULL, **_NO_VISUAL},
    # not a paper rung: dual-path inference with prototypes frozen at their task's end
    "visual_no_transfer": {"acgd.enabled": True, "tsgr.enabled": True, "prototypes.transfer": False},
    # ACGD on the raw new-task images instead of DPGD anchors (the paper: hurts)
    "distill_new_data": {**_FULL, "acgd.source": "new_data"},
    # ACGD on the undisturbed seeds (no PGD): isolates what the PGD steps add
    "distill_seeds": {**_FULL, "acgd.source": "seeds"},
}

# variants whose inference uses the prototype path: beta must be > 0
VISUAL_BRANCH = ("+visual_branch", "segpcl", "visual_no_transfer", "distill_new_data", "distill_seeds")

DESCRIPTIONS = {
    "zeroshot": "pretrained CLIP, no training",
    "lora_finetune": "LoRA-B, L_cls only",
    "+acgd": "+ ACGD on DPGD anchors",
    "+tsgr": "+ TSGR text geometry",
    "+prototype_transfer": "+ anchor-induced prototype transfer, CLIP path only (= onlyclip)",
    "+visual_branch": "+ dual-path inference (= segpcl)",
    "segpcl": "full SeGP-CL",
    "onlyclip": "full training, CLIP path only (beta = 0)",
    "visual_no_transfer": "ACGD + TSGR, dual path with prototypes not transferred",
    "distill_new_data": "full, ACGD on new-task images instead of anchors",
    "distill_seeds": "full, ACGD on seeds without PGD",
}

# the paper's rungs (+visual_branch is segpcl, the full method), then the references; onlyclip is
# +prototype_transfer's config, so `ablate` trains it once and reports it under both names
LADDER = ["zeroshot", "lora_finetune", "+acgd", "+tsgr", "+prototype_transfer", "segpcl", "onlyclip",
          "distill_new_data"]


def variant_names() -> list[str]:
    return list(VARIANTS)


def variant_overrides(name: str) -> dict[str, Any]:
    """The dotted overrides of variant `name` (a copy); unknown names raise ConfigError listing the known."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown method variant '{name}' (run.method); known: {', '.join(VARIANTS)}")
    return dict(VARIANTS[name])


# a variant owns the keys it sets: the switches acgd.enabled, tsgr.enabled, prototypes.transfer, and where it
# sets them prototypes.beta = 0 (the CLIP-path-only ones), zeroshot's optim.epochs = 0, distill_*'s acgd.source.
# A config's own value for any of them (a saved config.yaml of another method's run, or a --set) is replaced,
# with a warning when it was set away from its default
_warned: set = set()


def resolve_variant(cfg: Config) -> Config:
    """A copy of cfg with the overrides of variant cfg.run.method applied."""
    name = cfg.run.method
    overrides = variant_overrides(name)
    if name in VISUAL_BRANCH and not cfg.prototypes.beta > 0:
        raise ConfigError(f"method '{name}' uses the prototype path but prototypes.beta = {cfg.prototypes.beta}; "
                          f"set prototypes.beta > 0 (method.md: 0.5) or use run.method=onlyclip")
    _warn_replaced_keys(cfg, name, overrides)
    return apply_overrides(copy.deepcopy(cfg), overrides)


def check_variants(cfg: Config, names: Sequence[str], what: str) -> None:
    """Resolve every variant of an analysis (`what`: ablate, retention) on cfg before the first one trains: a clash
    (beta = 0 with a variant that uses the prototype path) found at the fifth rung had cost four trainings. The
    error names the variant, and onlyclip as a variant (run.method is the analysis' to set)."""
    for name in names:
        try:
            resolve_variant(apply_overrides(cfg, {"run.method": name}))
        except ConfigError as e:
            text = str(e).replace("or use run.method=onlyclip", "or run the variant onlyclip instead of it")
            raise ConfigError(f"{what}: variant {name}: {text}") from None


def _warn_replaced_keys(cfg: Config, name: str, overrides: dict) -> None:
    from ..config import config_value
    default = Config()
    replaced = [f"{key}={config_value(cfg, key)} -> {value}" for key, value in overrides.items()
                if config_value(cfg, key) != value and config_value(cfg, key) != config_value(default, key)]
    if replaced and (name, tuple(replaced)) not in _warned:
        _warned.add((name, tuple(replaced)))
        log.warning("run.method=%s sets %s: the method decides %s; to turn a loss term off within a method set "
                    "its weight to 0 (acgd.weight, tsgr.weight), to compare methods use --method or ablate",
                    name, ", ".join(replaced), ", ".join(overrides))
