"""How a torchrun job fails: once, in one line per rank at most, before anything is written.

torchrun is simulated through its environment (RANK / WORLD_SIZE) where no process group is
needed; the run lock is held by a real second process. The 2-rank gloo runs themselves are in
test_distributed.py and test_presets.py."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from segpcl_fast.api import ablate, train
from segpcl_fast.config import ConfigError
from segpcl_fast.engine import checkpoint as ckpt
from segpcl_fast.engine.distributed import DDPSettings, lost_peer
from segpcl_fast.engine.trainer import Trainer

from run_cases import small_config


@pytest.mark.parametrize("name,value,message", [
    ("SEGPCL_DDP_TIMEOUT_S", "abc", "SEGPCL_DDP_TIMEOUT_S='abc' is not an integer >= 1: set one (the default is 1800)"),
    ("SEGPCL_DDP_TIMEOUT_S", "0", "SEGPCL_DDP_TIMEOUT_S='0' is not an integer >= 1"),
    ("SEGPCL_DDP_BUCKET_MB", "-1", "SEGPCL_DDP_BUCKET_MB='-1' is not a number >= 0.001: set one (the default is 25.0)"),
    ("SEGPCL_DDP_BUCKET_MB", "nan", "SEGPCL_DDP_BUCKET_MB='nan' is not a number"),
    ("SEGPCL_DDP_GRAD_AS_BUCKET_VIEW", "maybe", "SEGPCL_DDP_GRAD_AS_BUCKET_VIEW='maybe' is not a switch"),
    ("SEGPCL_DDP_BACKEND", "bogus", "SEGPCL_DDP_BACKEND='bogus' is unknown; use auto, nccl or gloo"),
])
def test_bad_ddp_variables_are_config_errors(monkeypatch, name, value, message):
    """A ConfigError is one line from the CLI (it was a ValueError: a traceback on every rank)."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        DDPSettings.from_env()
    assert str(info.value).startswith(message)


def test_good_ddp_variables_are_read(monkeypatch):
    for name, value in [("SEGPCL_DDP_TIMEOUT_S", "60"), ("SEGPCL_DDP_BUCKET_MB", "12.5"),
                        ("SEGPCL_DDP_GRAD_AS_BUCKET_VIEW", "0"), ("SEGPCL_DDP_BACKEND", "gloo")]:
        monkeypatch.setenv(name, value)
    assert DDPSettings.from_env() == DDPSettings(bucket_cap_mb=12.5, gradient_as_bucket_view=False, backend="gloo",
                                                 timeout_s=60)


def _torchrun_env(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(rank))


@pytest.mark.parametrize("world,kw,message", [
    (2, {"device": "cuda"}, "run.device='cuda' but no CUDA device is available"),
    (3, {"optim__batch_size": 32}, "optim.batch_size=32 (the global batch) must divide evenly over 3 processes"),
])
def test_errors_every_rank_meets_come_before_the_ranks_join(tiny_model_name, tmp_path, monkeypatch, world, kw, message):
    """run.device=cuda without CUDA used to join gloo and fail later, in model loading, with a misleading
    message; both errors now come before the process group (so the CLI prints them from rank 0 alone)."""
    if kw.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    _torchrun_env(monkeypatch, 0, world)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(small_config(tiny_model_name, tmp_path / "run", **kw))
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "run").exists()


def test_what_trains_needs_a_dividing_batch_and_what_does_not_train_does_not(tiny_model_name, tmp_path, monkeypatch):
    """Under 3 processes a global batch of 32 is refused where a run trains: train, profile (writes=False, but
    it trains) and a resume of an unfinished run; evaluate (trains=False) and a resume of a finished run
    (results.json, or a last checkpoint of the last task) are not refused for it."""
    from segpcl_fast.engine.profile import profile_training
    from segpcl_fast.engine.trainer import resumes_a_finished_run
    cfg = small_config(tiny_model_name, tmp_path / "run", num_tasks=2)
    resume = small_config(tiny_model_name, tmp_path / "run", num_tasks=2, resume=True)
    _torchrun_env(monkeypatch, 0, 3)
    divide = "must divide evenly over 3 processes"
    with pytest.raises(ConfigError, match=divide):
        profile_training(cfg, tmp_path / "prof", steps=1)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for trains in (None, True):
        with pytest.raises(ConfigError, match=divide):
            Trainer(resume, trains=trains)
    assert not resumes_a_finished_run(resume) and not resumes_a_finished_run(cfg)
    (tmp_path / "run" / "checkpoints" / "task_01.pt").write_bytes(b"")  # the last task's (read by name only)
    assert resumes_a_finished_run(resume) and not resumes_a_finished_run(cfg)
    (tmp_path / "run" / "checkpoints" / "task_01.pt").unlink()
    (tmp_path / "run" / "checkpoints" / "task_00.pt").write_bytes(b"")
    assert not resumes_a_finished_run(resume)
    (tmp_path / "run" / "results.json").write_text("{}")
    assert resumes_a_finished_run(resume)
    import dataclasses  # an older run's config: task_sizes beside the default num_tasks (a new config is refused)
    uneven = dataclasses.replace(resume, data=dataclasses.replace(resume.data, num_tasks=10, task_sizes=[3, 3]))
    (tmp_path / "run" / "results.json").unlink()
    (tmp_path / "run" / "checkpoints" / "task_01.pt").write_bytes(b"")
    assert resumes_a_finished_run(uneven)  # task_sizes, not num_tasks, counts the tasks of an older run
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("joined the process group: the batch check passed")))
    for make in (lambda: Trainer(cfg, writes=False, trains=False), lambda: Trainer(resume)):
        with pytest.raises(RuntimeError, match="the batch check passed"):
            make()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("name", ["ablate", "sweep", "fragility", "retention", "distill_sources", "anchor_views"])
def test_analyses_refuse_to_run_under_torchrun(tiny_model_name, tmp_path, monkeypatch, name):
    """Under torchrun every rank wrote the same tables and decided --resume of a run's folder on its own."""
    import importlib
    analysis = {n: getattr(importlib.import_module(f"segpcl_fast.analysis.{n}"), n)
                for n in ["sweep", "fragility", "retention", "distill_sources", "anchor_views"]}
    calls = {"ablate": lambda cfg: ablate(cfg, variants=["lora_finetune"], seeds=[0]),
             "sweep": lambda cfg: analysis["sweep"](cfg, axes={"dpgd.k_adv": [1, 2]}),
             "fragility": lambda cfg: analysis["fragility"](cfg),
             "retention": lambda cfg: analysis["retention"](cfg, variants=["lora_finetune"]),
             "distill_sources": lambda cfg: analysis["distill_sources"](cfg, sources=["anchors"]),
             "anchor_views": lambda cfg: analysis["anchor_views"](cfg)}
    _torchrun_env(monkeypatch, 0, 2)
    with pytest.raises(ConfigError, match=r"runs in one process, but this is one of 2 \(torchrun\): launch it "
                                          r"without torchrun"):
        calls[name](small_config(tiny_model_name, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the CLI's report

def _fail_with(monkeypatch, error: BaseException) -> None:
    import segpcl_fast.cli as cli

    def failing(args):
        raise error
    monkeypatch.setattr(cli, "cmd_env", failing)


_WARN_IN_A_COMMAND = """
import logging, sys
import segpcl_fast.cli as cli
def warning_env(args):
    logging.getLogger("segpcl_fast.method").warning("run.method=segpcl sets acgd.enabled=False -> True")
    logging.getLogger("segpcl_fast.ops").info("lora_b_linear: merged")
    return 0
cli.cmd_env = warning_env
raise SystemExit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("rank,local_rank,verbose,shown", [
    ("0", "0", False, "WARNING segpcl_fast.method: run.method=segpcl sets acgd.enabled=False -> True\n"),
    ("1", "1", False, ""),  # the ranks of a node read the same config: its first process's warning, once
    ("1", None, False, ""),  # no LOCAL_RANK: RANK says
    ("8", "0", False, "WARNING [rank 8] segpcl_fast.method: run.method=segpcl sets acgd.enabled=False -> True\n"),
    ("0", "0", True, "WARNING segpcl_fast.method: run.method=segpcl sets acgd.enabled=False -> True\n"
                     "INFO segpcl_fast.ops: lora_b_linear: merged\n"),
    ("1", "1", True, "WARNING [rank 1] segpcl_fast.method: run.method=segpcl sets acgd.enabled=False -> True\n"
                     "INFO [rank 1] segpcl_fast.ops: lora_b_linear: merged\n"),
])
def test_warnings_are_each_nodes_first_process_and_tagged_on_other_ranks(rank, local_rank, verbose, shown):
    """The CLI's logging under torchrun (a fresh process, whose logging is the CLI's to set up): a config
    warning every rank of a node meets is printed by its LOCAL_RANK 0 alone; with -v each rank logs; rank r > 0
    tagged."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["RANK"] = rank
    if local_rank is not None:
        env["LOCAL_RANK"] = local_rank
    proc = subprocess.run([sys.executable, "-c", _WARN_IN_A_COMMAND, *(["-v"] if verbose else []), "env"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == shown


def test_each_main_call_sets_the_logging_up_again_unless_the_caller_has(monkeypatch, capsys):
    """main() called twice in one process (a notebook): the second call's -v and rank hold (basicConfig fixed
    the first call's for good); a handler of the caller's own leaves its logging alone."""
    import logging

    import segpcl_fast.cli as cli
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh interpreter (pytest's own handlers put back after)
    monkeypatch.setattr(root, "level", root.level)

    def env(args):
        logging.getLogger("segpcl_fast.method").warning("w")
        logging.getLogger("segpcl_fast.ops").info("i")
        return 0
    monkeypatch.setattr(cli, "cmd_env", env)
    for rank, argv, shown in [("1", ["env"], ""), ("0", ["env"], "WARNING segpcl_fast.method: w\n"),
                              ("0", ["-v", "env"], "WARNING segpcl_fast.method: w\nINFO segpcl_fast.ops: i\n"),
                              ("2", ["-v", "env"], "WARNING [rank 2] segpcl_fast.method: w\nINFO [rank 2] segpcl_fast.ops: i\n")]:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        assert cli.main(argv) == 0
        assert capsys.readouterr().err == shown, (rank, argv)
    assert sum(isinstance(h, cli._CLILogHandler) for h in root.handlers) == 1
    theirs = logging.StreamHandler()
    root.handlers.append(theirs)
    root.setLevel(logging.CRITICAL)
    assert cli.main(["-v", "env"]) == 0
    assert capsys.readouterr().err == "" and root.level == logging.CRITICAL and theirs in root.handlers


def test_config_error_before_joining_is_printed_by_rank0_alone(monkeypatch, capsys):
    """The same arguments give every rank the same error: N copies of it said nothing more."""
    from segpcl_fast.cli import main
    for rank, printed in [(0, True), (1, False)]:
        _torchrun_env(monkeypatch, rank, 2)
        assert main(["train", "--set", "optim.lrr=0.1"]) == 2
        err = capsys.readouterr().err
        assert ("optim.lrr" in err) == printed, (rank, err)
        assert "rank" not in err


def test_other_errors_rank0_whole_other_ranks_one_line(monkeypatch, capsys):
    """An error that may be one rank's own (a file only its shard reads) is printed by that rank, in
    its first line (rank 0 prints it whole)."""
    from segpcl_fast.cli import main
    from segpcl_fast.data.base import DatasetFormatError
    message = "cannot read /data/train/x.jpg: truncated file\nthe layout expected:\n  train/<class>/<image>"
    _fail_with(monkeypatch, DatasetFormatError(message))
    _torchrun_env(monkeypatch, 1, 2)
    assert main(["env"]) == 2
    assert capsys.readouterr().err == "segpcl-fast: error [rank 1]: cannot read /data/train/x.jpg: truncated file (...)\n"
    _torchrun_env(monkeypatch, 0, 2)
    assert main(["env"]) == 2
    assert capsys.readouterr().err == f"segpcl-fast: error: {message}\n"


def test_an_echoed_error_of_any_kind_is_printed_by_rank0_alone(monkeypatch, capsys):
    """raise_together marks a rank's error `echo` where rank 0 prints the same: a data error every rank
    met after joining (data.num_tasks=3, a missing data root) was printed once a rank."""
    from segpcl_fast.cli import main
    from segpcl_fast.data.base import DatasetFormatError
    for error in (DatasetFormatError("cifar100: data root '/x' does not exist"), PermissionError(13, "denied", "/x")):
        error.echo = True
        _fail_with(monkeypatch, error)
        _torchrun_env(monkeypatch, 1, 2)
        assert main(["env"]) == 2
        assert capsys.readouterr().err == ""
        _torchrun_env(monkeypatch, 0, 2)
        assert main(["env"]) == 2
        assert "/x" in capsys.readouterr().err


GLOO_LOST = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:32138: Connection "
             "reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")


def test_a_rank_that_lost_its_peer_says_so_in_one_line(monkeypatch, capsys):
    """Rank 0 stopped on its own error mid-run (a checkpoint it alone writes): the other rank's
    collective fails, and it printed a ~30-line traceback; now one line pointing at rank 0's error."""
    import segpcl_fast.cli as cli
    _fail_with(monkeypatch, RuntimeError(GLOO_LOST))
    monkeypatch.setattr(cli, "_joined", lambda: True)
    _torchrun_env(monkeypatch, 1, 2)
    assert cli.main(["env"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("segpcl-fast: stopped [rank 1]: another rank stopped first (its error is above, or in "
                          "torchrun's report)") and err.count("\n") == 1 and "Traceback" not in err
    # any other RuntimeError is a bug: its traceback is kept
    _fail_with(monkeypatch, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["env"])


@pytest.mark.parametrize("error,lost", [
    (RuntimeError(GLOO_LOST), True), (RuntimeError("... Connection closed by peer [10.0.0.2]:4021"), True),
    (torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1"), True),
    (RuntimeError("CUDA out of memory"), False), (ValueError("Connection reset by peer"), False),
])
def test_lost_peer(error, lost):
    assert lost_peer(error) is lost


# ----------------------------------------------------------------------------- the run lock

HOLDER = """
import sys, time
from segpcl_fast.engine import checkpoint as ckpt
ckpt.lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(300)
"""


@pytest.fixture
def lock_holder(tmp_path):
    """A second process holding the run lock of tmp_path / 'run' (killed at the end)."""
    (tmp_path / "run").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_run_lock_in_one_process(tmp_path):
    fd = ckpt.lock_run_dir(tmp_path)
    assert (tmp_path / ckpt.RUN_LOCK).read_text() == f"{os.getpid()}\n"
    with pytest.raises(ConfigError, match=rf"output dir {tmp_path} is in use by another run \(pid {os.getpid()};"):
        ckpt.lock_run_dir(tmp_path)  # flock: a second open file description conflicts, also in one process
    ckpt.unlock_run_dir(tmp_path, fd)
    assert not (tmp_path / ckpt.RUN_LOCK).exists()
    ckpt.unlock_run_dir(tmp_path, ckpt.lock_run_dir(tmp_path))


def test_a_run_in_a_folder_another_process_writes_is_refused(tiny_model_name, tmp_path, lock_holder):
    """Workers orphaned by a SIGKILLed torchrun go on training; a run started there (and its clean-up
    of a killed run's temp files, which would be theirs) used to go ahead beside them."""
    cfg = small_config(tiny_model_name, tmp_path / "run")
    for resume in (False, True):
        with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {lock_holder.pid};.*pick another "
                                              "folder with -o"):
            train(cfg, resume=resume)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [ckpt.RUN_LOCK]
    # the OS drops the lock of a killed process: a SIGKILLed run leaves nothing that blocks the next
    lock_holder.send_signal(signal.SIGKILL)
    lock_holder.wait()
    result = train(cfg)
    assert result.metrics["Last"] is not None
    assert not (tmp_path / "run" / ckpt.RUN_LOCK).exists()  # released, and its file removed, after the run


def test_a_filesystem_without_flock_runs_unlocked(tmp_path, monkeypatch, caplog):
    """ENOLCK / EOPNOTSUPP (some network mounts) is no other run: a warning, no lock, no file left."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    assert ckpt.lock_run_dir(tmp_path) is None
    assert "no run lock in" in caplog.text and "No locks available" in caplog.text
    assert not (tmp_path / ckpt.RUN_LOCK).exists()


# ----------------------------------------------------------------------------- the ops backend of a run

def test_run_ops_triton_where_triton_cannot_run_fails_first(tiny_model_name, tmp_path, monkeypatch):
    """It passed the config check, indexed the data, loaded the model, and failed at the first TSGR
    call with a 40-line traceback."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match=r"run.ops=triton forces the Triton kernels, but (triton is not installed|"
                                          r"they take CUDA tensors, and this run is on cpu without TRITON_INTERPRET=1)"):
        Trainer(small_config(tiny_model_name, tmp_path / "run", run__ops="triton"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, value", [("SEGPCL_LORA_MERGE", "bogus"), ("SEGPCL_LORA_OVERLAP", "yes"),
                                         ("SEGPCL_LORA_MERGED_BACKWARD", "x"), ("SEGPCL_LORA_COMPILE", "x"),
                                         ("SEGPCL_LORA_FWD", "x"), ("SEGPCL_VIT_TAIL", "x"), ("SEGPCL_PATCH_EMBED", "x"),
                                         ("SEGPCL_FROZEN_CAST", "x")])
def test_a_bad_ab_switch_fails_the_run_before_it_starts(tiny_model_name, tmp_path, monkeypatch, name, value):
    """Each switch is read where its path runs: SEGPCL_LORA_MERGE=bogus let a run train on the C++ op
    and fail at its first frozen-B call (evaluation). A run reads them all first; empty means unset."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}='?{value}'? .*unset it"):
        Trainer(small_config(tiny_model_name, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv(name, "")
    from segpcl_fast.model import frozen_cast, patch_embed, vit_tail
    from segpcl_fast.ops import lora_linear
    assert lora_linear.switches()["SEGPCL_LORA_MERGE"] == "addmm" and vit_tail.choice() == "cls"
    assert patch_embed.choice() == "gemm" and not lora_linear.overlap() and frozen_cast.choice() == "once"


@pytest.mark.parametrize("name, value", [("SEGPCL_COMPILE_MODE", "fast"), ("SEGPCL_COMPILE_BACKEND", "indcutor"),
                                         ("SEGPCL_COMPILE_DYNAMIC_BATCH", "maybe"),
                                         ("SEGPCL_COMPILE_LOSS", "x"), ("SEGPCL_COMPILE_BATCH_MERGE", "yes")])
def test_a_bad_compile_switch_fails_a_compiled_run_before_it_starts(tiny_model_name, tmp_path, monkeypatch, name, value):
    """The SEGPCL_COMPILE_* switches were read when the towers compiled, after the data and the weights had loaded,
    and a bad value ended `segpcl-fast train --set run.compile=true` in a traceback (a ValueError, not the CLI's one
    line); now one ConfigError naming the variable, before the run's folder is made."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}.*{value}.*unset it for the default"):
        Trainer(small_config(tiny_model_name, tmp_path / "run", run__compile=True))
    assert not (tmp_path / "run").exists()


def test_a_run_gives_the_ops_backend_back_and_names_an_ignored_SEGPCL_OPS(tiny_model_name, tmp_path, monkeypatch,
                                                                         caplog):
    from segpcl_fast import ops
    monkeypatch.setenv("SEGPCL_OPS", "cpp")
    with ops.backend("auto"):
        train(small_config(tiny_model_name, tmp_path / "run", run__ops="reference", num_tasks=1))
        assert ops.get_backend() == "auto"  # it stayed 'reference' for the rest of the process
    assert "SEGPCL_OPS=cpp is not what this run uses: a run takes run.ops (reference here)" in caplog.text


def test_a_compiled_run_records_the_lora_and_attention_paths_its_graphs_traced(tiny_model_name, tmp_path, monkeypatch):
    """Calls inside compiled graphs record nothing: results.json "ops" of a compiled run listed only the
    Triton ops, so run.ops=cpp and run.ops=reference read the same. (The compile itself is stubbed: what
    is tested is the record, from the same rule the traced calls follow.)"""
    import json

    from segpcl_fast.engine import compiling
    from segpcl_fast.ops.lora_linear import lora_b_linear_impl
    monkeypatch.setattr(compiling, "compile_model", lambda model, settings=None: {"raw_features": True})
    cfg = small_config(tiny_model_name, tmp_path / "run", num_tasks=1, run__compile=True)
    train(cfg)
    recorded = json.loads((tmp_path / "run" / "results.json").read_text())["ops"]
    traced = lora_b_linear_impl(torch.empty(0), torch.empty(0, requires_grad=True), compiling=True)
    assert recorded["lora_b_linear"].split("+")[0] == traced and recorded["attention"].split("+")[0] == "sdpa"
    train(small_config(tiny_model_name, tmp_path / "ref", num_tasks=1, run__compile=True, run__ops="reference"))
    assert json.loads((tmp_path / "ref" / "results.json").read_text())["ops"]["lora_b_linear"].split("+")[0] == "reference"


@pytest.mark.slow
def test_a_compiled_run_records_the_loss_ops_its_loss_graph_traced(tiny_model_name, tmp_path, monkeypatch):
    """anchor_kl and knn_subgraph_kl record their choice only outside a graph: with the loss terms
    compiled (compile_learner), a compiled run's results.json named neither. The trainer records what
    the loss graph traced, where the run uses them (2 tasks; not a 1-task run, which never does)."""
    import json

    from segpcl_fast.engine import compiling
    from segpcl_fast.ops._kernels import impl_for
    monkeypatch.setenv("SEGPCL_COMPILE_BACKEND", "aot_eager")
    train(small_config(tiny_model_name, tmp_path / "run", num_tasks=2, run__compile=True))
    recorded = json.loads((tmp_path / "run" / "results.json").read_text())["ops"]
    probe = torch.empty(0)
    assert recorded["anchor_kl"] == impl_for("anchor_kl", probe, probe) == "reference"
    assert recorded["knn_subgraph_kl"] == "reference", recorded
    torch._dynamo.reset()
    train(small_config(tiny_model_name, tmp_path / "one", num_tasks=1, run__compile=True))
    recorded = json.loads((tmp_path / "one" / "results.json").read_text())["ops"]
    assert "anchor_kl" not in recorded and "knn_subgraph_kl" not in recorded, recorded
    assert compiling.CompileSettings.from_env().loss


@pytest.mark.parametrize("setting,recorded", [("merged", "merged"), ("cpp", "cpp+merged")])
def test_compiled_choices_record_the_frozen_b_graphs_lora_path_too(tiny_model_name, monkeypatch, setting, recorded):
    """SEGPCL_LORA_COMPILE=cpp traces the C++ op where B trains, and the merged GEMM where B is frozen
    (evaluation, the teacher): results.json said "cpp" alone."""
    from segpcl_fast import ops
    from segpcl_fast.engine.trainer import record_compiled_choices
    from segpcl_fast.model.clip import load_model
    monkeypatch.setenv("SEGPCL_LORA_COMPILE", setting)
    ops.reset_choices()
    try:
        record_compiled_choices(load_model(tiny_model_name, pretrained=None), torch.device("cpu"))
        assert ops.choices_used()["lora_b_linear"] == recorded
        assert ops.choices_used()["attention"] == "sdpa"
    finally:
        ops.reset_choices()


def test_a_compiled_run_records_the_patch_embedding_and_last_block_its_graphs_traced(tiny_model_name, tmp_path,
                                                                                  monkeypatch):
    """The patch embedding and the ViT tail record their choice only outside a graph, so a compiled run's
    results.json named neither. The image tower is made to look compiled to our code (is_compiling()
    during raw_features: nothing it calls records); the trainer records what the graph traced."""
    import json

    from segpcl_fast.engine import compiling

    def fake_compile(model, settings=None):
        eager = model.raw_features

        def traced(images):
            with monkeypatch.context() as m:
                m.setattr(torch.compiler, "is_compiling", lambda: True)
                return eager(images)
        model.raw_features = traced
        return {"image": "stub"}
    monkeypatch.setattr(compiling, "compile_model", fake_compile)
    for tail in ("cls", "full"):
        monkeypatch.setenv("SEGPCL_VIT_TAIL", tail)
        train(small_config(tiny_model_name, tmp_path / tail, num_tasks=1, run__compile=True))
        recorded = json.loads((tmp_path / tail / "results.json").read_text())["ops"]
        assert recorded.get("patch_embed") == "gemm" and recorded.get("vit_last_block") == tail, recorded


def test_compiled_choices_are_what_an_eager_call_records(tiny_model_name, monkeypatch, tf32_flags):
    from segpcl_fast import ops
    from segpcl_fast.model.clip import load_model
    model = load_model(tiny_model_name, pretrained=None)
    for tail in ("cls", "full"):
        monkeypatch.setenv("SEGPCL_VIT_TAIL", tail)
        ops.reset_choices()
        with torch.no_grad():
            model.raw_features(torch.randn(2, 3, 32, 32))
        eager = {k: v for k, v in ops.last_choice().items() if k in ("patch_embed", "vit_last_block")}
        assert model.compiled_choices(torch.device("cpu")) == eager == {"patch_embed": "gemm", "vit_last_block": tail}
    # fp32 on CUDA outside autocast keeps cuDNN's convolution (torch's TF32 defaults: model/patch_embed.py)
    tf32_flags(cudnn=True, matmul=False)
    assert model.compiled_choices(torch.device("cuda"))["patch_embed"] == "conv"
    model.image_autocast = torch.bfloat16
    assert model.compiled_choices(torch.device("cuda"))["patch_embed"] == "gemm"


def test_a_task_split_that_does_not_fit_the_data_fails_before_the_weights_load(tiny_model_name, tmp_path,
                                                                               monkeypatch):
    """data.task_sizes is checked against the classes found as soon as the data is indexed: with
    ViT-B/16 the user waited for the weights (or saw their download error) before this one."""
    from segpcl_fast.data.base import DatasetFormatError
    from segpcl_fast.engine import trainer as trainer_module

    def no_weights(*args, **kwargs):
        raise AssertionError("the model loaded before the task split was checked")
    monkeypatch.setattr(trainer_module, "build_model", no_weights)
    with pytest.raises(DatasetFormatError, match=r"task sizes \[3, 3\] \(data.task_sizes\) must be positive and sum "
                                                 r"to the 100 classes .* fix data.task_sizes"):
        Trainer(small_config(tiny_model_name, tmp_path / "run", task_sizes=[3, 3]))


def test_the_cli_leaves_the_process_group_through_the_gloo_teardown_workaround(tmp_path, monkeypatch):
    """On torch < 2.8, ~ProcessGroupGloo can deadlock at exit (pytorch#154976): engine.distributed.destroy
    runs a barrier first. The CLI's evaluate / profile / error paths called torch's destroy_process_group
    directly, skipping it: `evaluate` under torchrun hung at exit on torch 2.6 (1 run of 3 here; with the
    workaround 15 of 15 exited). After an error the group is left without it. A one-rank gloo group here;
    the torch version is made old."""
    import torch.distributed as dist
    from segpcl_fast import cli
    from segpcl_fast.engine import distributed as ddp
    monkeypatch.setattr(ddp, "_torch_before", lambda major, minor: True)
    barriers = []
    barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: barriers.append(1) or barrier(*a, **k))
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        assert cli._joined()
        cli._leave_process_group()
        assert barriers == [1] and not dist.is_initialized()
        # after an error no barrier: one rank's error (a NaN loss) finds its peers in an all-reduce, and a
        # barrier would hold them all for the group's timeout instead of letting them see a lost peer
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
        cli._leave_process_group(after_error=True)
        assert barriers == [1] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
