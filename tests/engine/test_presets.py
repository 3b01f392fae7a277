"""Hardware presets and the torchrun entry point (CPU, gloo)."""
import json
import os
import subprocess
import sys

import pytest

from segpcl_fast.api import make_config, train
from segpcl_fast.config import ConfigError, load_config
from segpcl_fast.engine import presets
from segpcl_fast.engine.compiling import CompileSettings
from segpcl_fast.engine.distributed import DDPSettings


def test_presets_are_partial_configs_laid_over_a_benchmark(monkeypatch):
    for key in ("NCCL_P2P_DISABLE", "SEGPCL_DDP_BUCKET_MB", "SEGPCL_COMPILE_MODE", "SEGPCL_DDP_GRAD_AS_BUCKET_VIEW",
                "NCCL_IB_DISABLE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SEGPCL_DDP_BUCKET_MB", "5")  # the user's own setting wins over the preset's
    cfg = presets.apply_preset(load_config("cifar100"), "2x4090")
    assert (cfg.data.dataset, cfg.model.name, cfg.optim.lr) == ("cifar100", "ViT-B-16", 1e-3)  # benchmark kept
    assert (cfg.optim.batch_size, cfg.run.precision, cfg.run.compile) == (128, "bf16", True)
    assert os.environ["NCCL_P2P_DISABLE"] == "1"
    assert DDPSettings.from_env().bucket_cap_mb == 5.0 and DDPSettings.from_env().gradient_as_bucket_view
    assert CompileSettings.from_env().mode == "max-autotune-no-cudagraphs"
    assert load_config("1gpu").run.device == "cuda"  # loadable on its own too
    assert presets.get_preset("2x4090").launch_command().startswith("torchrun --standalone --nproc_per_node 2 -m")


def test_bad_preset_and_settings_are_one_clear_error(monkeypatch):
    with pytest.raises(ConfigError, match="unknown hardware preset '3x4090'.*2x4090"):
        presets.apply_preset(make_config(), "3x4090")
    monkeypatch.setenv("SEGPCL_COMPILE_MODE", "fastest")
    with pytest.raises(ValueError, match="compile mode 'fastest' is unknown"):
        CompileSettings.from_env()
    monkeypatch.setenv("SEGPCL_DDP_BACKEND", "mpi")
    with pytest.raises(ValueError, match="SEGPCL_DDP_BACKEND='mpi'"):
        DDPSettings.from_env()


def test_cli_set_wins_over_the_preset(monkeypatch):
    import torch
    from segpcl_fast.cli import _config_from_args, build_parser
    for preset in presets.PRESETS.values():  # the presets' environment defaults are undone after the test
        for key in preset.env:
            monkeypatch.delenv(key, raising=False)
    args = build_parser().parse_args(["train", "--config", "cifar100", "--hw", "2x4090", "--set", "optim.batch_size=64",
                                      "--set", "run.device=cpu"])
    cfg = _config_from_args(args)
    assert (cfg.optim.batch_size, cfg.run.device, cfg.run.precision) == (64, "cpu", "bf16")
    if not torch.cuda.is_available():  # a GPU preset on a machine without one: the fix, not a late device error
        args = build_parser().parse_args(["train", "--hw", "1gpu"])
        with pytest.raises(ConfigError, match=r"--hw 1gpu is a preset for CUDA GPUs \(it sets run.device=cuda\), but "
                                              r"no CUDA device is available here: drop --hw, or .*--set run.device=cpu"):
            _config_from_args(args)


def test_torchrun_two_cpu_ranks_match_one_process(tmp_path):
    """The documented launch line (torchrun -m segpcl_fast.cli train) on 2 gloo ranks, shipped tiny model.
    torchrun is run as `python -m torch.distributed.run` (the same program) with this interpreter: a
    `torchrun` found on PATH may belong to another environment, with another torch and open_clip."""
    sets = ["run.device=cpu", "data.max_train_per_class=2", "data.max_test_per_class=2", "data.num_tasks=2",
            "optim.epochs=1", "optim.batch_size=32", "dpgd.k_adv=2", "run.progress=false", "run.plots=false",
            "run.num_threads=1", "data.train_augment=false", "acgd.anchor_batch=1000"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "segpcl_fast.cli", "train",
           "-o", str(tmp_path / "ddp")] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("accuracy matrix") == 1  # only rank 0 reports
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    single = train(make_config(overrides=sets + [f"run.output_dir={tmp_path / 'single'}"]))
    assert ddp["acc_per_task"] == pytest.approx(single.acc_per_task) and ddp["metrics"] == pytest.approx(single.metrics)
