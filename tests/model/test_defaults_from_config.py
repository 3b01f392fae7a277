"""Defaults live in config.py only: inject_lora and the synthetic world read theirs from the dataclasses."""
import inspect

from segpcl_fast.config import DataConfig, LoRAConfig
from segpcl_fast.data import synthetic
from segpcl_fast.model.lora import inject_lora


def test_inject_lora_defaults_are_lora_config():
    cfg, params = LoRAConfig(), inspect.signature(inject_lora).parameters
    assert params["rank"].default == cfg.rank
    assert params["alpha"].default == cfg.alpha
    assert list(params["targets"].default) == list(cfg.targets)
    assert list(params["towers"].default) == list(cfg.towers)
    assert isinstance(params["targets"].default, tuple) and isinstance(params["towers"].default, tuple)  # immutable


def test_shift_strength_is_data_config_default():
    assert synthetic.SHIFT_STRENGTH == DataConfig().synthetic_shift
    assert isinstance(synthetic.SHIFT_STRENGTH, float)
