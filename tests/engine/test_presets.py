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
    assert (cfg.data.dataset, cfg.model.name, cfg.optim.lr) == ("cifar100", "ViT-B-16-quickgelu", 1e-3)  # benchmark kept
    assert (cfg.optim.batch_size, cfg.run.precision, cfg.run.compile, cfg.run.tf32) == (128, "bf16", True, True)
    assert load_config("cifar100").run.tf32 is False  # off unless asked: torch's own default
    assert os.environ["NCCL_P2P_DISABLE"] == "1"
    assert DDPSettings.from_env().bucket_cap_mb == 5.0 and DDPSettings.from_env().gradient_as_bucket_view
    assert CompileSettings.from_env().mode == "max-autotune-no-cudagraphs"
    assert (load_config("1gpu").run.device, load_config("1gpu").run.tf32) == ("cuda", True)  # loadable on its own too
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
        for name in presets.PRESETS:  # 2x4090 sets run.device=auto (each rank takes its GPU): it ran on the CPU
            args = build_parser().parse_args(["train", "--hw", name])
            with pytest.raises(ConfigError, match=rf"--hw {name} is a preset for CUDA GPUs \(.*\), but no CUDA device "
                                                  r"is available here: drop --hw \(its torch.compile, bf16 and \d+ loader "
                                                  r"workers are for a GPU; .*\), or, to try them here anyway, "
                                                  r"--set run.device=cpu"):
                _config_from_args(args)


def test_a_multi_process_preset_without_torchrun_warns(monkeypatch, caplog):
    from segpcl_fast.cli import _config_from_args, build_parser
    for preset in presets.PRESETS.values():
        for key in preset.env:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = build_parser().parse_args(["train", "--hw", "2x4090", "--set", "run.device=cpu"])
    _config_from_args(args)
    assert "--hw 2x4090 is a 2-process preset, but this is one process" in caplog.text
    assert "torchrun --standalone --nproc_per_node 2" in caplog.text
    caplog.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")
    _config_from_args(args)
    assert "preset" not in caplog.text


def test_hw_over_a_user_file_names_the_file_values_it_replaces(monkeypatch, caplog, tmp_path):
    """--hw lays its keys over the config file's (README): a value the user's own file sets (and its user base
    file; not a packaged preset's) that --hw replaces is named with the --set that keeps it; one --set kept is not
    named, and a packaged preset alone gives no notice."""
    from segpcl_fast.cli import _config_from_args, build_parser
    for preset in presets.PRESETS.values():
        for key in preset.env:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    (tmp_path / "base.yaml").write_text("base: cifar100\nrun:\n  precision: fp32\n")  # fp32: also the default
    (tmp_path / "my.yaml").write_text("base: base.yaml\noptim:\n  batch_size: 64\nrun:\n  compile: false\n"
                                      "data:\n  num_workers: 6\n")  # 1gpu's 8 workers: named
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "my.yaml"), "--hw", "1gpu",
                                      "--set", "run.device=cpu", "--set", "run.compile=false"])
    cfg = _config_from_args(args)
    assert (cfg.optim.batch_size, cfg.run.precision, cfg.run.compile, cfg.data.num_workers) == (128, "bf16", False, 8)
    [line] = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    assert line == (f"--hw 1gpu replaces what {tmp_path / 'my.yaml'} sets: optim.batch_size 64 -> 128, run.precision "
                    "fp32 -> bf16, data.num_workers 6 -> 8; to keep yours add --set optim.batch_size=64 "
                    "--set run.precision=fp32 --set data.num_workers=6")
    caplog.clear()  # a key --set names, even at the preset's own value, is the user's choice: not named
    _config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "my.yaml"), "--hw", "1gpu",
                                                 "--set", "run.device=cpu", "--set", "optim.batch_size=128"]))
    [line] = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    assert "batch_size" not in line and "run.precision fp32 -> bf16" in line
    caplog.clear()
    _config_from_args(build_parser().parse_args(["train", "--config", "cifar100", "--hw", "2x4090",
                                                 "--set", "run.device=cpu"]))
    assert "replaces" not in caplog.text  # cifar100's 8 workers become 2x4090's 6 per process: no user choice


@pytest.mark.slow
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
    # the same line again: rank 0 refuses the existing run; rank 1 stops with it (it trained on into a dead
    # peer's all-reduce and died in a gloo traceback), and the message is printed once
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert again.returncode != 0 and again.stderr.count("already holds a run") == 1, again.stderr[-3000:]
    assert "exitcode  : 2" in again.stderr  # torchrun may SIGTERM the other rank once the first has exited
    for crash in ("Connection closed", "terminate called", "SIGABRT", "segpcl_fast/"):  # no rank died in a traceback
        assert crash not in again.stderr, again.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "results.json").read_text()) == ddp
    # evaluate and profile under torchrun: rank 0 reports once; each rank profiles into its own folder
    launch = cmd[:cmd.index("train")]
    evaluated = subprocess.run(launch + ["evaluate", str(tmp_path / "ddp")], capture_output=True, text=True,
                               timeout=300, env=env, cwd=tmp_path)
    assert evaluated.returncode == 0 and evaluated.stdout.count("after task 2: acc on seen classes") == 1, \
        evaluated.stderr[-3000:]
    assert f"{ddp['acc_per_task'][-1]:.2f}%" in evaluated.stdout
    profiled = subprocess.run(launch + ["profile", "--steps", "1", "-o", str(tmp_path / "prof")] +
                              [a for s in sets for a in ("--set", s)], capture_output=True, text=True, timeout=300,
                              env=env, cwd=tmp_path)
    assert profiled.returncode == 0 and profiled.stdout.count("stages (task 2") == 1, profiled.stderr[-3000:]
    for folder in (tmp_path / "prof", tmp_path / "prof" / "rank1"):
        trace = json.loads((folder / "trace.json").read_text())
        assert "grad_sync" in {e.get("name") for e in trace["traceEvents"]}
    single = train(make_config(overrides=sets + [f"run.output_dir={tmp_path / 'single'}"]))
    assert ddp["acc_per_task"] == pytest.approx(single.acc_per_task) and ddp["metrics"] == pytest.approx(single.metrics)
