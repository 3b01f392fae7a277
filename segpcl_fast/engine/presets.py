"""Hardware presets: config keys (configs/<name>.yaml, partial) + run-time settings that are not config keys.

    segpcl-fast train --config cifar100 --hw 1gpu --set data.root=/data/cifar100
    torchrun --standalone --nproc_per_node 2 -m segpcl_fast.cli train --config cifar100 --hw 2x4090 \
             --set data.root=/data/cifar100

`apply_preset(cfg, name)` lays the YAML's keys over `cfg` and exports the preset's environment
(compile mode, all-reduce buckets, NCCL settings) with os.environ.setdefault, so a variable the
user already set wins. The Trainer reads them through CompileSettings.from_env() and
DDPSettings.from_env(); NCCL reads its own variables when the process group starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import Config, ConfigError, config_from_dict, config_value

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class HardwarePreset:
    name: str
    nproc_per_node: int
    env: dict[str, str] = field(default_factory=dict)
    notes: str = ""

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / f"{self.name}.yaml"

    def launch_command(self, config: str = "cifar100", extra: str = "--set data.root=/path/to/data") -> str:
        run = f"-m segpcl_fast.cli train --config {config} --hw {self.name} {extra}".strip()
        if self.nproc_per_node > 1:
            return f"torchrun --standalone --nproc_per_node {self.nproc_per_node} {run}"
        return f"python {run}"


PRESETS = {
    "2x4090": HardwarePreset(
        name="2x4090", nproc_per_node=2,
        env={
            # RTX 4090s have no peer-to-peer: without this NCCL may try P2P and hang or corrupt on
            # some driver versions; traffic then goes through host shared memory.
            "NCCL_P2P_DISABLE": "1",
            "NCCL_IB_DISABLE": "1",  # single machine, no InfiniBand
            "SEGPCL_DDP_BUCKET_MB": "25",  # all B gradients (3.44 M fp32 = 13.8 MB) fit one bucket
            "SEGPCL_DDP_GRAD_AS_BUCKET_VIEW": "1",  # .grad are views into the bucket: no copies
            # no CUDA graphs: the text trunk is shape-dynamic and the all-reduce hooks run in backward
            "SEGPCL_COMPILE_MODE": "max-autotune-no-cudagraphs",
        },
        notes="global batch 128 = 64 per GPU; bf16 autocast; LoRA-B gradients all-reduced in one bucket"),
    "1gpu": HardwarePreset(
        name="1gpu", nproc_per_node=1,
        env={"SEGPCL_COMPILE_MODE": "max-autotune-no-cudagraphs"},
        notes="batch 128 on one GPU; bf16 autocast"),
}


def get_preset(name: str) -> HardwarePreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown hardware preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def preset_overrides(name: str) -> dict:
    """The nested dict of config keys the preset's YAML sets."""
    preset = get_preset(name)
    with open(preset.config_path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or "base" in data:
        raise ConfigError(f"{preset.config_path} must be a partial config (sections only, no 'base')")
    return data


def apply_preset(cfg: Config, name: str, export_env: bool = True) -> Config:
    """cfg with the preset's config keys laid over it; exports the preset's environment defaults."""
    preset = get_preset(name)
    out = config_from_dict(preset_overrides(name), base=cfg)
    if export_env:
        for key, value in preset.env.items():
            os.environ.setdefault(key, value)
    return out


def replaced_by_preset(user_keys: set[str], before: Config, after: Config, name: str) -> list[tuple[str, object, object]]:
    """(key, the user's value, the preset's value) for each key of `user_keys` (the ones the user's config file
    sets: config.keys_set_by_user_file) that the preset `name` set to another value and that `after` (the final
    config, --set applied) still holds at the preset's value: the user's own choices --hw replaced."""
    overrides = preset_overrides(name)
    preset = config_from_dict(overrides)
    keys = [f"{section}.{key}" for section, values in overrides.items() for key in values]
    return [(key, config_value(before, key), config_value(after, key)) for key in keys if key in user_keys
            and config_value(before, key) != config_value(after, key) == config_value(preset, key)]
