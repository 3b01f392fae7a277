"""Public entry points: train(config | **overrides) -> Result, evaluate(run_dir) -> dict, ablate(...)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .config import Config, ConfigError, apply_overrides, config_from_dict, kwargs_to_overrides, load_config

ConfigLike = Union[Config, dict, str, os.PathLike, None]


def make_config(config: ConfigLike = None, overrides: Optional[Sequence[str]] = None, **kwargs: Any) -> Config:
    """Config from a Config, a nested dict, a YAML path or preset name, plus overrides.

    kwargs are flat keys (`lr=1e-3`, `k_adv=5`) or dotted keys spelled with '__' (`dpgd__k_adv=5`).
    """
    if config is None:
        cfg = Config()
    elif isinstance(config, Config):
        cfg = config
    elif isinstance(config, dict):
        cfg = config_from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        cfg = load_config(config)
    else:
        raise ConfigError(f"config must be a Config, dict, YAML path or preset name, got {type(config).__name__}")
    if overrides:
        cfg = apply_overrides(cfg, list(overrides))
    if kwargs:
        cfg = apply_overrides(cfg, kwargs_to_overrides(kwargs))
    return cfg


def train(config: ConfigLike = None, **overrides: Any):
    """Run the class-incremental sequence; returns a Result (accuracy matrix, metrics, paths).

        result = segpcl_fast.train()                                  # offline world, SeGP-CL
        result = segpcl_fast.train("cifar100", data__root="/data")    # a paper preset
        result = segpcl_fast.train(method="lora_finetune", epochs=2)
    """
    from .engine.trainer import Trainer
    cfg = make_config(config, **overrides)
    return Trainer(cfg).run()


def evaluate(run_dir: Union[str, os.PathLike]) -> dict:
    """Re-evaluate a finished (or interrupted) run from its last checkpoint.

    Returns {"task": last finished task (1-based), "acc_per_task_j": [...], "acc": accuracy on all
    seen test images} computed now, with the dual-path logits of the checkpointed state.
    """
    from .engine import checkpoint as ckpt
    from .engine.trainer import RUN_ONLY_KEYS, Trainer
    from .metrics import percent
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: evaluate() takes the output_dir of a train() run")
    cfg = load_config(cfg_path)
    last = ckpt.find_last_checkpoint(run_dir)
    if last is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: the run finished no task (or ran with run.checkpoint=false)")
    trainer = Trainer(cfg)
    state = ckpt.load_checkpoint(last, ckpt.config_fingerprint(trainer.cfg.to_dict(), RUN_ONLY_KEYS),
                                 trainer.cfg.to_dict(), RUN_ONLY_KEYS)
    trainer.model.load_state_dict(state["lora"], strict=False)
    trainer.learner.load_state_dict(state["learner"])
    counts = trainer.evaluate_seen(state["task"])
    return {"task": state["task"] + 1,
            "acc_per_task_j": [percent(c, n) for c, n in counts],
            "acc": percent(sum(c for c, _ in counts), sum(n for _, n in counts))}
