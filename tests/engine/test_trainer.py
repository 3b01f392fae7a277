"""End-to-end trainer runs on the offline world with a 2-layer random CLIP (fast), resume, errors."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from segpcl_fast import metrics
from segpcl_fast.api import make_config, train
from segpcl_fast.config import ConfigError, apply_overrides
from segpcl_fast.engine import checkpoint as ckpt
from segpcl_fast.engine.trainer import Trainer

from run_cases import crash_at_task, small_config


def test_full_run_writes_results_and_consistent_metrics(tiny_model_name, tmp_path):
    result = train(small_config(tiny_model_name, tmp_path / "run"))
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    for name in ("accuracy_matrix.png", "acc_per_task.png", "config.yaml", "checkpoints/task_01.pt"):
        assert (out / name).exists(), name
    matrix = metrics.matrix_from_list(result.accuracy_matrix)
    assert matrix.shape == (2, 2) and np.isnan(matrix[0, 1])
    own = metrics.matrix_from_list(result.accuracy_matrix_own)
    assert result.metrics == pytest.approx(metrics.summarize(matrix, result.acc_per_task, result.fwt_before, own))
    assert saved["metrics"]["Last"] == pytest.approx(result.metrics["Last"])
    # own label space C_<=j: same diagonal, and a subset of the columns holding the label is never worse
    np.testing.assert_allclose(np.diag(own), np.diag(matrix))
    assert own[1, 0] >= matrix[1, 0]
    assert saved["matrix_own"] == result.accuracy_matrix_own
    assert result.fwt_before[0] is None and 0.0 <= result.fwt_before[1] <= 100.0
    assert set(result.ops) >= {"lora_b_linear", "pgd_step", "anchor_kl", "knn_subgraph_kl"}
    assert saved["ops"] == result.ops
    # every LoRA implementation the run used: training (B trains) the C++ op where built; DPGD's
    # frozen teacher, evaluation and prototypes (B needs no gradient) the merged GEMM
    from segpcl_fast.ops.lora_linear import extension_status
    trained_with = "cpp" if extension_status()["built"] else "merged"
    assert set(result.ops["lora_b_linear"].split("+")) == {trained_with, "merged"}


def test_resume_reaches_the_same_metrics(tiny_model_name, tmp_path, monkeypatch):
    import segpcl_fast.engine.trainer as trainer_mod
    judged = {"full": [], "resumed": []}  # (task, learned_before) of each divergence check

    def judging(run):
        monkeypatch.setattr(trainer_mod, "divergence_warning",
                            lambda losses, n, t, lr, learned: judged[run].append((t, learned)))
    judging("full")
    full = train(small_config(tiny_model_name, tmp_path / "full"))
    monkeypatch.undo()

    crash_at_task(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_model_name, tmp_path / "resumed"))
    assert ckpt.find_last_checkpoint(tmp_path / "resumed").name == "task_00.pt"
    monkeypatch.undo()
    # a run killed (SIGKILL) while writing leaves atomic_path's temp files; resuming clears them
    stale = [tmp_path / "resumed" / "checkpoints" / ".task_01.pt.k3x_9a1q.tmp", tmp_path / "resumed" / ".results.json.ab12cd34.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    judging("resumed")
    resumed = train(small_config(tiny_model_name, tmp_path / "resumed", resume=True))
    # the divergence check of task 2 knows what task 1 learned, from its checkpoint
    assert judged["resumed"] == judged["full"][1:] and judged["full"][1][1] is not None
    assert not any(path.exists() for path in stale)
    assert resumed.ops == full.ops  # results.json "ops": the whole run's, the crashed part's too
    assert resumed.accuracy_matrix == full.accuracy_matrix
    assert resumed.metrics == full.metrics
    assert resumed.fwt_before == full.fwt_before
    assert resumed.accuracy_matrix_own == full.accuracy_matrix_own
    # task 1's loss curve comes back from its checkpoint, task 2's is trained again
    assert len(resumed.loss_per_epoch) == 2 and resumed.loss_per_epoch[0] == full.loss_per_epoch[0]
    assert [r["steps"] for r in resumed.loss_per_epoch[1]] == [r["steps"] for r in full.loss_per_epoch[1]]


def test_evaluate_reproduces_the_run_on_any_ops_path_and_refuses_other_keys(tiny_model_name, tmp_path, capsys):
    """evaluate(run_dir) gives the run's last accuracy row; how it runs (ops backend, batch size)
    may change, what was trained may not."""
    from segpcl_fast import ops as fused_ops
    from segpcl_fast.api import evaluate
    from segpcl_fast.cli import main
    from segpcl_fast.ops.lora_linear import extension_status
    result = train(small_config(tiny_model_name, tmp_path / "run"))
    last_row = result.accuracy_matrix[-1]
    expected_impl = {"auto": "merged", "reference": "reference", "cpp": "cpp"}  # evaluation: B needs no gradient
    for ops, kwargs in [("auto", {}), ("reference", {"eval__batch_size": 7}), ("cpp", {})]:
        if ops == "cpp" and not extension_status()["built"]:
            continue
        out = evaluate(tmp_path / "run", run__ops=ops, **kwargs)
        assert fused_ops.last_choice()["lora_b_linear"] == expected_impl[ops]
        assert out["task"] == len(result.accuracy_matrix)
        assert out["acc_per_task_j"] == pytest.approx(last_row[:len(out["acc_per_task_j"])], abs=1e-9), ops
    with pytest.raises(ConfigError, match="cannot override 'optim.lr'.*run.ops"):
        evaluate(tmp_path / "run", lr=0.5)
    with pytest.raises(ConfigError, match="cannot override 'lora.rank'"):
        evaluate(tmp_path / "run", ["lora.rank=4"])
    assert main(["evaluate", str(tmp_path / "run"), "--set", "run.ops=reference"]) == 0
    assert f"{out['acc']:.2f}%" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "run"), "--set", "data.num_tasks=3"]) == 2
    assert "cannot override 'data.num_tasks'" in capsys.readouterr().err
    # evaluate reads a run: the caller's ops backend, torch threads and random streams stay as they were
    # (it left them set to the run's: later predict() calls in the process ran the reference ops)
    import random
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fused_ops.set_backend("auto")
        draws = lambda: (torch.rand(2).tolist(), np.random.rand(), random.random())  # noqa: E731
        seed = lambda: (torch.manual_seed(123), np.random.seed(5), random.seed(7))  # noqa: E731
        seed()
        expected = draws()
        seed()
        evaluate(tmp_path / "run", ["run.num_threads=1"])
        again = evaluate(tmp_path / "run", "run.ops=reference")  # one string: one override, not its characters
        assert again["acc"] == out["acc"]
        assert (fused_ops.get_backend(), torch.get_num_threads(), draws()) == ("auto", 2, expected)
    finally:
        torch.set_num_threads(threads)


def test_evaluate_all_tasks_rebuilds_the_runs_accuracy_matrix_and_metrics(tiny_model_name, tmp_path, capsys):
    """evaluate(all_tasks=True) / `evaluate --all-tasks`: every finished task from its own checkpoint gives the
    matrix, the own-space matrix, FWT's before-task accuracies and the metrics the run itself recorded (a
    review's finding: only the last row could be re-evaluated); a missing task checkpoint is one error."""
    from segpcl_fast.api import evaluate
    from segpcl_fast.cli import main
    result = train(small_config(tiny_model_name, tmp_path / "run"))
    out = evaluate(tmp_path / "run", all_tasks=True)
    assert out["task"] == 2 and out["run_matrix_max_diff"] == 0.0
    np.testing.assert_allclose(metrics.matrix_from_list(out["accuracy_matrix"]),
                               metrics.matrix_from_list(result.accuracy_matrix), atol=1e-9)
    np.testing.assert_allclose(metrics.matrix_from_list(out["accuracy_matrix_own"]),
                               metrics.matrix_from_list(result.accuracy_matrix_own), atol=1e-9)
    assert out["acc_per_task"] == pytest.approx(result.acc_per_task, abs=1e-9)
    assert out["fwt_before"][0] is None and out["fwt_before"][1] == pytest.approx(result.fwt_before[1], abs=1e-9)
    assert out["metrics"] == pytest.approx(result.metrics, abs=1e-9)
    assert out["acc"] == pytest.approx(evaluate(tmp_path / "run")["acc"], abs=1e-9)  # its last row: evaluate's
    assert main(["evaluate", str(tmp_path / "run"), "--all-tasks"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy matrix a[t][j]" in printed and "BWT" in printed and "its last checkpoint): equal" in printed
    assert out["num_tasks"] == 2 and "unfinished" not in printed
    # a run made before make_config's check_task_count may hold task_sizes beside another num_tasks (here
    # the default 10): its tasks are task_sizes' (config.task_count), in evaluate's "num_tasks" too
    import dataclasses
    cfg = small_config(tiny_model_name, tmp_path / "sized", eval__fwt=False)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task_sizes=[50, 50], num_tasks=10))
    with pytest.MonkeyPatch.context() as older:  # train as a version without the check did
        older.setattr("segpcl_fast.api.check_task_count", lambda c: c)
        train(cfg)
    for every in (False, True):
        sized = evaluate(tmp_path / "sized", all_tasks=every)
        assert (sized["task"], sized["num_tasks"]) == (2, 2), every
    # a run stopped after task 1 (of 2): its numbers are over 1 task, which evaluate says (a review's finding)
    import shutil
    shutil.copytree(tmp_path / "run", tmp_path / "cut")
    for name in ("results.json", "checkpoints/task_01.pt", "checkpoints/last"):
        (tmp_path / "cut" / name).unlink()
    assert evaluate(tmp_path / "cut")["task"] == 1 and evaluate(tmp_path / "cut")["num_tasks"] == 2
    for extra in ([], ["--all-tasks"]):
        assert main(["evaluate", str(tmp_path / "cut"), *extra]) == 0
        cut = tmp_path / "cut"
        assert capsys.readouterr().out.startswith(f"unfinished run: 1 of its 2 tasks trained (segpcl-fast train "
                                                  f"--config {cut}/config.yaml --resume -o {cut} continues it)")
    # a finished run whose later tasks saved no checkpoint (a resume with run.checkpoint=false) is not unfinished
    shutil.copytree(tmp_path / "run", tmp_path / "early")
    for name in ("checkpoints/task_01.pt", "checkpoints/last"):
        (tmp_path / "early" / name).unlink()
    assert main(["evaluate", str(tmp_path / "early")]) == 0
    assert capsys.readouterr().out.startswith("the run's checkpoints end at task 1 of its 2 (the later tasks saved "
                                              "none; results.json holds the finished run's numbers)")
    assert main(["train", "--config", str(tmp_path / "cut" / "config.yaml"), "--resume", "-o",
                 str(tmp_path / "cut")]) == 0  # the command it names does
    assert evaluate(tmp_path / "cut")["task"] == 2
    (tmp_path / "run" / "checkpoints" / "task_00.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of task\(s\) 1 .*without --all-tasks"):
        evaluate(tmp_path / "run", all_tasks=True)
    assert evaluate(tmp_path / "run")["task"] == 2  # the last checkpoint alone still evaluates


def test_a_trainer_that_fails_to_build_gives_the_ops_backend_back(tiny_model_name, tmp_path):
    from segpcl_fast import ops as fused_ops
    from segpcl_fast.model.clip import ModelLoadError
    cfg = small_config(tiny_model_name, tmp_path / "run")
    cfg = apply_overrides(cfg, ["run.ops=reference", f"model.pretrained={tmp_path / 'gone' / 'weights.pt'}"])
    with fused_ops.backend("auto"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            Trainer(cfg)
        assert fused_ops.get_backend() == "auto"


def test_run_tf32_holds_for_the_run_on_cuda_and_is_given_back(tiny_model_name, tmp_path, monkeypatch, tf32_flags):
    """run.tf32 turns TF32 on for fp32 CUDA matmuls while the Trainer builds and runs, and gives torch's
    setting back after (here after a build that fails, the path a run's end shares). The device is only
    named cuda: _build is replaced, so nothing is placed on it. On the CPU the switch is not touched."""
    from segpcl_fast.engine import trainer as trainer_module
    from segpcl_fast.model.tf32 import cuda_matmul_tf32
    tf32_flags(matmul=False)
    seen = []

    def build(self, compile_settings):
        seen.append((self.device.type, cuda_matmul_tf32()))
        raise RuntimeError("stop after the switch")
    monkeypatch.setattr(Trainer, "_build", build)
    cfg = small_config(tiny_model_name, tmp_path / "run", run__tf32=True)
    with pytest.raises(RuntimeError, match="stop after the switch"):
        Trainer(cfg)
    monkeypatch.setattr(trainer_module, "resolve_device", lambda name: torch.device("cuda"))
    with pytest.raises(RuntimeError, match="stop after the switch"):
        Trainer(cfg)
    with pytest.raises(RuntimeError, match="stop after the switch"):
        Trainer(small_config(tiny_model_name, tmp_path / "run", run__tf32=False))
    assert seen == [("cpu", False), ("cuda", True), ("cuda", False)]
    assert cuda_matmul_tf32() is False


def test_a_cpu_run_with_run_tf32_leaves_the_switch_and_records_nothing(tiny_model_name, tmp_path, tf32_flags):
    from segpcl_fast.model.tf32 import cuda_matmul_tf32
    tf32_flags(matmul=False)
    result = train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1, run__tf32=True))
    assert cuda_matmul_tf32() is False and "tf32" not in result.run


def test_a_resume_with_other_result_changing_run_keys_warns_naming_them(tiny_model_name, tmp_path, monkeypatch,
                                                                        caplog):
    """run-only keys that change the later tasks (loader workers' augmentations, rounding) may change on a resume;
    it says which, from the last checkpoint's config and device (a review's finding: it was documented only)."""
    import logging
    crash_at_task(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_model_name, tmp_path / "run"))
    monkeypatch.undo()
    import shutil
    shutil.copytree(tmp_path / "run", tmp_path / "same")
    with caplog.at_level(logging.WARNING, logger="segpcl_fast.engine.trainer"):
        train(small_config(tiny_model_name, tmp_path / "run", resume=True, eval__batch_size=7, num_threads=2,
                           run__device="cpu", run__tf32=True))  # "auto" before, on the same CPU; TF32: CUDA's
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed with")]
    assert warned == ["resumed with run.num_threads 1 -> 2, eval.batch_size 256 -> 7 (they round differently): the "
                      "later tasks are as valid, but not bit-identical to what an uninterrupted run gives; resume with "
                      "the checkpoint's values to continue the same run"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segpcl_fast.engine.trainer"):
        train(small_config(tiny_model_name, tmp_path / "same", resume=True))
    assert not [r for r in caplog.records if r.getMessage().startswith("resumed with")]
    # loader workers change the augmentations only where there are any; the device is the one the last task used
    from types import SimpleNamespace
    saved = small_config(tiny_model_name, tmp_path / "x").to_dict()
    for augment, device_type, expected in ((True, "cpu", ["data.num_workers 0 -> 2"]), (False, "cpu", []),
                                           (False, "cuda", ["run.device cuda -> cpu", "run.tf32 False -> True"]),
                                           (False, None, [])):
        caplog.clear()
        cfg = small_config(tiny_model_name, tmp_path / "x", data__num_workers=2, data__train_augment=augment,
                           run__tf32=True)
        with caplog.at_level(logging.WARNING, logger="segpcl_fast.engine.trainer"):
            Trainer._warn_other_settings(SimpleNamespace(cfg=cfg, device=torch.device("cpu")), saved, device_type)
        assert [m for r in caplog.records for m in expected if m in r.getMessage()] == expected
        assert len(caplog.records) == (1 if expected else 0)
        assert ("(each loader worker draws its own augmentations)" in caplog.text) == augment
    # dpgd.batch_size also batches the teacher's pass over ACGD's seeds (no DPGD, no transfer): still a change;
    # without ACGD and the transfer no anchor cache is made, and it changes nothing
    for overrides, warned in (({"acgd__source": "seeds", "prototypes__transfer": False}, True),
                              ({"acgd__enabled": False, "prototypes__transfer": False}, False)):
        caplog.clear()
        cfg = small_config(tiny_model_name, tmp_path / "x", dpgd__batch_size=5, **overrides)
        with caplog.at_level(logging.WARNING, logger="segpcl_fast.engine.trainer"):
            Trainer._warn_other_settings(SimpleNamespace(cfg=cfg, device=torch.device("cpu")), saved, "cpu")
        assert ("dpgd.batch_size 64 -> 5" in caplog.text) == warned, overrides


def test_resume_from_a_checkpoint_of_an_older_version(tiny_model_name, tmp_path):
    """Checkpoints written before the own-space matrix and data.synthetic_shift existed still
    resume; Forgetting_own is then left out (it cannot be computed without every a_own[t][j])
    instead of being made up."""
    cfg = small_config(tiny_model_name, tmp_path / "run")
    full = train(cfg)
    path = ckpt.checkpoint_path(tmp_path / "run", 0)
    state = torch.load(path, weights_only=True)
    del state["correct_own"]
    del state["config"]["data"]["synthetic_shift"]
    del state["config"]["data"]["expected_classes"]
    state["fingerprint"] = ckpt.config_fingerprint(state["config"])
    ckpt.save_task_checkpoint(tmp_path / "run", 0, state)  # "last" now points at task 0
    (tmp_path / "run" / "results.json").unlink()  # as if killed in task 1 (a finished run is its results)
    # a preset of the newer version sets data.expected_classes: a check, so it may differ on resume
    resumed = train(small_config(tiny_model_name, tmp_path / "run", resume=True, data__expected_classes=100))
    assert resumed.accuracy_matrix == full.accuracy_matrix
    assert "Forgetting_own" not in resumed.metrics and resumed.accuracy_matrix_own == []
    assert resumed.metrics == {k: v for k, v in full.metrics.items() if k != "Forgetting_own"}


def test_resume_without_checkpoints_says_it_starts_from_task_1(tiny_model_name, tmp_path, caplog):
    """An existing dir without a finished task (e.g. a run that failed in task 1) starts at task 1;
    a dir that does not exist is a mistyped -o, not a run to start silently."""
    with pytest.raises(ConfigError, match="run.resume is set but .*typo does not exist: check run.output_dir"):
        train(small_config(tiny_model_name, tmp_path / "typo", num_tasks=1, resume=True))
    assert not (tmp_path / "typo").exists()
    (tmp_path / "typo").mkdir()  # --resume with run.overwrite=true: the overwrite was dropped without a word
    from segpcl_fast.cli import main
    assert main(["train", "-o", str(tmp_path / "typo"), "--resume", "--set", "run.overwrite=true"]) == 2
    with pytest.raises(ConfigError, match=r"run.resume \(--resume\) and run.overwrite=true contradict each other"):
        train(small_config(tiny_model_name, tmp_path / "typo", num_tasks=1, resume=True, overwrite=True))
    assert not any((tmp_path / "typo").iterdir())
    (tmp_path / "typo").rmdir()
    (tmp_path / "notes.txt").write_text("not a run")  # -o naming a file: said so, not "does not exist"
    with pytest.raises(ConfigError, match="notes.txt is a file, not a folder"):
        train(small_config(tiny_model_name, tmp_path / "notes.txt", num_tasks=1, resume=True))
    (tmp_path / "fresh").mkdir()
    with caplog.at_level("WARNING", logger="segpcl_fast.engine"):
        result = train(small_config(tiny_model_name, tmp_path / "fresh", num_tasks=1, resume=True))
    assert "has no finished task; starting from task 1" in caplog.text
    assert len(result.accuracy_matrix) == 1


def test_a_failed_run_leaves_nothing_that_blocks_the_rerun(tiny_model_name, tmp_path, monkeypatch):
    """A run that stops in task 1 (NaN, a bad file) leaves only its config.yaml: the corrected
    rerun starts there without --resume or run.overwrite."""
    def fail(self, t):
        raise FloatingPointError("loss is nan")
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_task", fail)
        with pytest.raises(FloatingPointError):
            train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]
    assert len(train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1)).accuracy_matrix) == 1


def test_resume_of_a_finished_run_changes_nothing(tiny_model_name, tmp_path, caplog):
    """--resume after the last task: no task runs and results.json (with the ops and timings of
    the real run) is not rewritten, and a warning says so; config.yaml never records run.resume (a
    later plain `train --config <dir>/config.yaml` must not resume silently)."""
    from segpcl_fast.config import load_config
    full = train(small_config(tiny_model_name, tmp_path / "run"))
    before = (tmp_path / "run" / "results.json").read_bytes()
    with caplog.at_level("WARNING", logger="segpcl_fast.engine"):
        again = train(small_config(tiny_model_name, tmp_path / "run", resume=True))
    assert [r.getMessage() for r in caplog.records if r.name == "segpcl_fast.engine"] == [
        f"all 2 tasks of the run in {tmp_path / 'run'} are finished: nothing to resume "
        f"({tmp_path / 'run' / 'results.json'} kept)"]
    assert (tmp_path / "run" / "results.json").read_bytes() == before
    assert again.metrics == pytest.approx(full.metrics) and again.accuracy_matrix == full.accuracy_matrix
    assert again.ops == full.ops and again.ops
    assert load_config(tmp_path / "run" / "config.yaml").run.resume is False


def test_a_run_made_with_overwrite_is_not_overwritten_by_its_own_config(tiny_model_name, tmp_path):
    """config.yaml recorded run.overwrite=true, so `train --config <dir>/config.yaml` (the README's resume
    command without --resume) deleted the run's checkpoints and trained again, saying nothing."""
    from segpcl_fast.cli import main
    from segpcl_fast.config import load_config
    train(small_config(tiny_model_name, tmp_path / "run", overwrite=True))
    assert load_config(tmp_path / "run" / "config.yaml").run.overwrite is False
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert main(["train", "--config", str(tmp_path / "run" / "config.yaml")]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").iterdir()} == before


def test_resume_of_a_finished_run_with_a_cut_results_file_says_how_to_rewrite_it(tiny_model_name, tmp_path):
    """results.json cut in half (a full disk on a copy) gave a JSONDecodeError traceback; the fix the error
    names (delete it, --resume) writes it again from the checkpoints, with the same metrics."""
    full = train(small_config(tiny_model_name, tmp_path / "run"))
    path = tmp_path / "run" / "results.json"
    text = path.read_text()
    path.write_text(text[:len(text) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"results.json is not a whole results.json \(JSONDecodeError: "
                                                   r".*delete it and --resume again"):
        train(small_config(tiny_model_name, tmp_path / "run", resume=True))
    path.unlink()
    again = train(small_config(tiny_model_name, tmp_path / "run", resume=True))
    assert again.metrics == pytest.approx(full.metrics) and again.accuracy_matrix == full.accuracy_matrix
    assert json.loads(path.read_text())["metrics"] == pytest.approx(full.metrics)


def test_resume_of_a_finished_run_missing_its_last_checkpoint_says_how_to_retrain(tiny_model_name, tmp_path,
                                                                                  caplog):
    """A finished run whose last checkpoint was deleted (a damaged one's error says to delete it): --resume
    returns results.json but warns that the final weights are not on disk and how to train the last task
    again; deleting results.json then trains it from the checkpoint before, and writes both back."""
    out = tmp_path / "run"
    train(small_config(tiny_model_name, out))
    folder = out / ckpt.CHECKPOINT_DIR
    (folder / "task_01.pt").unlink()
    (folder / ckpt.LAST_POINTER).unlink()
    with caplog.at_level("WARNING", logger="segpcl_fast.engine"):
        train(small_config(tiny_model_name, out, resume=True))
    messages = [r.getMessage() for r in caplog.records if r.name == "segpcl_fast.engine"]
    assert messages[0] == (f"the run in {out} is finished (results.json) but its checkpoints end at task 1 of 2: the "
                           f"final weights are not on disk. To train tasks 2..2 again from {folder / 'task_00.pt'}, "
                           f"delete {out / 'results.json'} and resume")
    assert not (folder / "task_01.pt").exists()
    (out / "results.json").unlink()
    again = train(small_config(tiny_model_name, out, resume=True))
    assert (folder / "task_01.pt").is_file() and (out / "results.json").is_file()
    assert again.timings["run_s_from_task"] == 2
    assert json.loads((out / "results.json").read_text())["config"]["run"]["resume"] is False
    (out / "results.json").unlink()  # all tasks checkpointed: nothing trains, the results are rebuilt
    rebuilt = train(small_config(tiny_model_name, out, resume=True))
    assert "run_s" not in rebuilt.timings and "run_s_from_task" not in rebuilt.timings
    assert rebuilt.timings["rebuilt_from_checkpoints"] is True and len(rebuilt.timings["tasks"]) == 2
    assert rebuilt.accuracy_matrix == again.accuracy_matrix
    # the world size of the tasks' records, no device: the rebuilding process trained nothing (a review's
    # finding: a torchrun of 3 rebuilding a 2-process run's file wrote world_size 3 and its own device)
    assert rebuilt.run == {"world_size": 1, "world_size_per_task": [1, 1]}
    assert json.loads((out / "results.json").read_text())["run"] == rebuilt.run


def test_results_hold_the_counts_behind_the_matrix_and_what_ran_the_run(tiny_model_name, tmp_path):
    """Uneven tasks: acc_t is weighted by test images, which only counts in results.json let anyone
    re-derive; the run's device, world size and source revision are recorded beside the versions."""
    out = tmp_path / "run"
    train(small_config(tiny_model_name, out, num_tasks=2, task_sizes=[60, 40], max_test_per_class=3))
    saved = json.loads((out / "results.json").read_text())
    counts = saved["counts"]
    assert counts["test_images"] == [180, 120]
    correct = np.array([[np.nan if v is None else v for v in row] for row in counts["correct"]])
    for t in range(2):
        want = 100 * np.nansum(correct[t, :t + 1]) / sum(counts["test_images"][:t + 1])
        assert saved["acc_per_task"][t] == pytest.approx(want)
        assert saved["matrix"][t][:t + 1] == pytest.approx(list(100 * correct[t, :t + 1] / counts["test_images"][:t + 1]))
    assert counts["correct"][0][1] is None and all(isinstance(v, int) for v in counts["correct"][1])
    assert saved["run"] == {"world_size": 1, "device": "cpu", "world_size_per_task": [1, 1]}
    source = saved["versions"]["source"]
    if (Path(__file__).resolve().parents[2] / ".git").exists():  # a source checkout: its commit
        assert len(source["commit"]) == 40 and isinstance(source["dirty"], bool)
    again = train(small_config(tiny_model_name, out, num_tasks=2, task_sizes=[60, 40], max_test_per_class=3,
                               resume=True))
    assert again.counts == counts and again.run == saved["run"]


def test_resume_of_a_finished_run_without_checkpoints_changes_nothing(tiny_model_name, tmp_path):
    """run.checkpoint=false: a finished run is its results.json; --resume must not train it again,
    and with another config it is refused, not reported as this config's results."""
    train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1, checkpoint=False))
    before = (tmp_path / "run" / "results.json").read_bytes()
    again = train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1, checkpoint=False, resume=True))
    assert (tmp_path / "run" / "results.json").read_bytes() == before and again.ops
    with pytest.raises(ckpt.CheckpointError, match="finished run of another config .optim.lr was 0.001, now 0.5.: "
                                                   f"resume it with its own config .--config {tmp_path / 'run' / 'config.yaml'}"):
        train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1, checkpoint=False, resume=True, lr=0.5))


def test_a_run_finished_by_a_resume_without_checkpoints_is_finished(tiny_model_name, tmp_path, monkeypatch):
    """Checkpoints for task 1 only, then a --resume with run.checkpoint=false trains task 2 and writes
    results.json: a further --resume must return that, not train task 2 again from task 1's checkpoint."""
    out = tmp_path / "run"
    crash_at_task(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_model_name, out))
    monkeypatch.undo()
    finished = train(small_config(tiny_model_name, out, resume=True, checkpoint=False))
    assert ckpt.find_last_checkpoint(out).name == "task_00.pt"
    before = (out / "results.json").read_bytes()
    crash_at_task(monkeypatch, 1)  # training anything now fails the test
    again = train(small_config(tiny_model_name, out, resume=True))
    assert (out / "results.json").read_bytes() == before
    assert again.accuracy_matrix == finished.accuracy_matrix


def _killed_in_task_2(tiny_model_name, out, monkeypatch):
    """A run killed in its second task: (its last checkpoint, task 1's, and that checkpoint's state)."""
    crash_at_task(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_model_name, out))
    monkeypatch.undo()
    path = ckpt.find_last_checkpoint(out)
    return path, torch.load(path, weights_only=True)


def test_a_checkpoint_whose_lora_tensors_do_not_fit_the_model_is_refused(tiny_model_name, tmp_path, monkeypatch):
    """load_state_dict(strict=False) skipped LoRA tensors of other names without a word: the run
    resumed (or evaluated) with B = 0 in those layers, mixed with the checkpoint's prototypes."""
    from segpcl_fast.api import evaluate
    out = tmp_path / "run"
    path, state = _killed_in_task_2(tiny_model_name, out, monkeypatch)
    state["lora"] = {k.replace("resblocks.", "blocks."): v for k, v in state["lora"].items()}
    torch.save(state, path)
    for attempt in (lambda: train(small_config(tiny_model_name, out, resume=True)), lambda: evaluate(out)):
        with pytest.raises(ckpt.CheckpointError, match=r"task_00.pt: its LoRA tensors do not fit the model its "
                                                       r"config builds \(missing 28: \['clip.*unexpected 28"):
            attempt()


def test_a_checkpoint_of_another_test_geometry_is_refused_and_the_classifier_keeps_the_runs(
        tiny_model_name, tmp_path, monkeypatch):
    """The run's prototypes were made with its test transform: a resume or evaluate under another
    open_clip geometry is refused; load_classifier uses the run's. Checkpoints without the field
    (before it was stored) count as shortest-side + bicubic."""
    from segpcl_fast.api import evaluate
    from segpcl_fast.classifier import load_classifier
    out = tmp_path / "run"
    path, state = _killed_in_task_2(tiny_model_name, out, monkeypatch)
    assert state["image_geometry"] == ckpt.LEGACY_IMAGE_GEOMETRY  # the tiny model's own
    state["image_geometry"] = dict(state["image_geometry"], resize_mode="squash")
    torch.save(state, path)
    for attempt in (lambda: train(small_config(tiny_model_name, out, resume=True)), lambda: evaluate(out)):
        with pytest.raises(ckpt.CheckpointError, match="made with test images resized .*'squash'.* this model's "
                                                       "open_clip preprocess asks for .*'shortest'"):
            attempt()
    assert load_classifier(out).model.image_stats.resize_mode == "squash"
    del state["image_geometry"]  # an older checkpoint: shortest + bicubic, which the tiny model asks for
    torch.save(state, path)
    assert len(train(small_config(tiny_model_name, out, resume=True)).acc_per_task) == 2


def test_resuming_an_ablation_starts_the_runs_it_had_not_reached(tiny_model_name, tmp_path):
    from segpcl_fast.api import ablate
    cfg = small_config(tiny_model_name, tmp_path / "abl", num_tasks=1)
    first = ablate(cfg, variants=["lora_finetune"], seeds=[0])
    again = ablate(small_config(tiny_model_name, tmp_path / "abl", num_tasks=1, resume=True),
                   variants=["lora_finetune"], seeds=[0, 1])  # seed 0 finished, seed 1 never started
    assert again["rows"][0]["seeds"] == 2 and first["rows"][0]["seeds"] == 1
    assert (tmp_path / "abl" / "lora_finetune" / "seed1" / "results.json").exists()


def test_a_moved_data_root_may_resume_but_must_hold_the_same_classes(tiny_model_name, tmp_path):
    """data.root (and frames_dir, model.cache_dir) say where things lie: they may change on resume
    and evaluate; the checkpoint's ordered class names guard that it is the same data."""
    assert ckpt.config_fingerprint(small_config(tiny_model_name, tmp_path, data__dataset="cifar100",
                                                data__root="/a").to_dict()) == \
        ckpt.config_fingerprint(small_config(tiny_model_name, tmp_path, data__dataset="cifar100",
                                             data__root="/b").to_dict())
    state = {"class_names": ["cat", "dog", "owl"]}
    ckpt.check_class_names("c.pt", state, ["cat", "dog", "owl"])
    ckpt.check_class_names("c.pt", {}, ["x"])  # checkpoints from before class names were stored
    with pytest.raises(ckpt.CheckpointError, match="other classes than data.root now holds: class 1 was 'dog', "
                                                   "now 'cow' .3 classes then, 3 now.; point data.root"):
        ckpt.check_class_names("c.pt", state, ["cat", "cow", "owl"])
    with pytest.raises(ckpt.CheckpointError, match="class 3 was '.none.', now 'emu'") as other_count:
        ckpt.check_class_names("c.pt", state, ["cat", "dog", "owl", "emu"])
    assert "names_file" not in str(other_count.value)  # other classes, not the same ones named anew
    with pytest.raises(ckpt.CheckpointError, match=r"now 'hammerhead shark' .*if only the names differ .*"
                                                   r"--set data.names_file=FILE \(README.txt for those\)"):
        ckpt.check_class_names("c.pt", {"class_names": ["goldfish", "hammerhead"]}, ["goldfish", "hammerhead shark"])


def test_cli_resume_of_a_copied_run_names_both_dirs(tiny_model_name, tmp_path, capsys):
    """`--config copy/config.yaml --resume` would resume the original dir recorded in the file."""
    import shutil
    from segpcl_fast.cli import main
    train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1))
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    assert main(["train", "--config", str(tmp_path / "copy" / "config.yaml"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"resume that folder with -o {tmp_path / 'copy'}" in err and str(tmp_path / "run") in err
    with pytest.raises(ConfigError, match="resume that folder"):  # the Python API refuses it too
        train(str(tmp_path / "copy" / "config.yaml"), resume=True)
    with pytest.raises(ConfigError, match="resume that folder"):
        train(tmp_path / "copy" / "config.yaml", run__resume=True)
    before = (tmp_path / "copy" / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "copy" / "config.yaml"), "--resume", "-o",
                 str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "results.json").read_bytes() == before  # finished: nothing rewritten
    files = capsys.readouterr().out.split("files:")[1]  # the copy's own files, not the original's
    assert str(tmp_path / "copy" / "results.json") in files and str(tmp_path / "run") not in files
    # the other fix the error offers: -o the recorded dir (also finished: a no-op)
    before = (tmp_path / "run" / "results.json").read_bytes()
    assert main(["train", "--config", str(tmp_path / "copy" / "config.yaml"), "--resume", "-o",
                 str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "results.json").read_bytes() == before


def test_own_space_counts_restrict_the_argmax_to_the_first_classes():
    """Hand-made logits over 4 seen classes; the own space of this task is classes 0..1."""
    from types import SimpleNamespace
    logits = torch.tensor([[5.0, 1.0, 9.0, 0.0],    # label 0: all-space argmax 2 (wrong), own argmax 0 (right)
                           [0.0, 3.0, 1.0, 2.0],    # label 1: right in both
                           [4.0, 1.0, 0.0, 8.0],    # label 1: wrong in both (own argmax 0)
                           [1.0, 2.0, 0.0, 0.0]])   # label 0: wrong in both (own argmax 1)
    labels = torch.tensor([0, 1, 1, 0])
    dataset = torch.utils.data.TensorDataset(torch.arange(4), labels)
    stub = SimpleNamespace(cfg=make_config(eval__batch_size=3), dist=SimpleNamespace(enabled=False),
                           device=torch.device("cpu"), pin=False)
    def count(n_own):
        return Trainer._count_correct_local(stub, [(dataset, n_own)], lambda idx: logits[idx])
    assert count(2) == [(1, 2, 4)]
    assert count(4) == [(1, 1, 4)]
    assert count(None) == [(1, 1, 4)]


def test_resume_with_another_config_is_refused_naming_the_runs_own(tiny_model_name, tmp_path):
    train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1))
    own = f"--config {tmp_path / 'run' / 'config.yaml'}"
    with pytest.raises(ckpt.CheckpointError, match=f"task_00.pt was made with a different config: optim.lr .*"
                                                   f"The run's own config: {own}$"):
        train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1, resume=True, lr=0.5))


def test_nan_loss_is_one_clear_error(tiny_model_name, tmp_path, monkeypatch):
    from segpcl_fast.method.learner import Learner

    def nan_loss(self, images, labels):
        bad = torch.tensor(float("nan"), requires_grad=True)
        return bad, {"cls": bad}

    monkeypatch.setattr(Learner, "loss", nan_loss)
    with pytest.raises(FloatingPointError, match="L_CLS.*lower optim.lr"):
        train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_finite_loss_with_nonfinite_gradients_is_named_at_its_own_step(tiny_model_name, tmp_path, monkeypatch):
    """sqrt(|B|) at B = 0 is 0 forward and non-finite backward: the error comes at step 0 naming the
    gradients and the finite terms, not one step later as a NaN L_cls."""
    from segpcl_fast.method.learner import Learner
    original = Learner.loss

    def overflowing(self, images, labels):
        total, parts = original(self, images, labels)
        spike = sum(p.abs().sqrt().sum() for p in self.trainable_parameters())
        return total + spike, dict(parts, cls=parts["cls"] + spike)

    monkeypatch.setattr(Learner, "loss", overflowing)
    trainer = Trainer(small_config(tiny_model_name, tmp_path / "run", num_tasks=1))
    with pytest.raises(FloatingPointError, match=r"LoRA B gradients are not finite at task 1, step 0 while every "
                                                 r"loss term is \(L_CLS=[0-9.]+, L_GR=0\).*; check tsgr.tau \(now 0.05\), "
                                                 r"tsgr.weight \(now 1\); lower optim.lr \(now 0.001\)$"):
        trainer.run()  # the settings of the terms this run has, with their values; fp32 already: no precision hint
    # raised before the update: the weights a caller catching the error holds are still finite
    assert all(bool(torch.isfinite(p).all()) for p in trainer.lora_params)


def test_a_nonfinite_step_quotes_the_step_before_it(tiny_model_name, tmp_path, monkeypatch):
    """A finite but huge gradient (tsgr.tau=1e-20: L_GR 3.5e15, norm 1.4e18) passes the check and breaks the
    weights; the next step's terms are all NaN. Its error now quotes the step before, where the cause shows."""
    from segpcl_fast.engine.step_outcome import with_step_before
    from segpcl_fast.method.learner import Learner
    original, calls = Learner.loss, []

    def blowing_up(self, images, labels):
        calls.append(1)
        total, parts = original(self, images, labels)
        if len(calls) == 1:  # finite, 1e12 times too big
            return total * 1e12, {k: v * 1e12 for k, v in parts.items()}
        bad = total * float("nan")
        return bad, {k: bad for k in parts}

    monkeypatch.setattr(Learner, "loss", blowing_up)
    with pytest.raises(FloatingPointError, match=r"^loss is nan at task 1, step 1 \(non-finite term\(s\): L_CLS, L_GR\).*; "
                                                 r"the step before \(step 0\): L_CLS=[0-9.]+e\+12, L_GR=0, gradient norm "
                                                 r"[0-9.]+e\+1[0-9]$"):
        train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1))
    from segpcl_fast.engine.step_outcome import StepOutcome
    cfg = make_config()

    def outcome(step, parts, read=True):  # a step's outcome, read back (values()) or not yet
        done = StepOutcome(step, 0, {k: torch.tensor(v) for k, v in parts.items()},
                           torch.tensor(sum(parts.values())) if parts else None, torch.tensor(2.0))
        if read:
            done.values(cfg)
        return (step, done)
    error = FloatingPointError("loss is nan at task 1, step 5")
    assert str(with_step_before(error, [outcome(3, {"cls": 1.0})], cfg)) == "loss is nan at task 1, step 5"  # no step
    error.step = 5
    assert str(with_step_before(error, [outcome(3, {"cls": 1.0})], cfg)) == "loss is nan at task 1, step 5"  # not before
    assert str(with_step_before(error, [outcome(4, {})], cfg)) == "loss is nan at task 1, step 5"  # no images here
    assert str(with_step_before(error, [None, outcome(4, {"cls": 1.0}, read=False)], cfg)) == \
        "loss is nan at task 1, step 5"  # not read yet: its values would wait for the device
    assert str(with_step_before(error, [None, outcome(4, {"cls": 1.0})], cfg)) == (
        "loss is nan at task 1, step 5; the step before (step 4): L_CLS=1, gradient norm 2")


def test_a_bad_data_root_fails_before_any_weights_are_loaded(tmp_path, monkeypatch):
    """The user hears about data.root first, not after fetching ~600 MB of CLIP weights."""
    from segpcl_fast.data.base import DatasetFormatError
    from segpcl_fast.engine import trainer as trainer_module

    def load_model_must_not_run(*args, **kwargs):
        raise AssertionError("the model was loaded before the data root was checked")

    monkeypatch.setattr(trainer_module, "load_model", load_model_must_not_run)
    cfg = make_config("cifar100", overrides=[f"data.root={tmp_path / 'no-such-dir'}",
                                             f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(DatasetFormatError, match="no-such-dir"):
        train(cfg)


def test_the_run_records_each_terms_mean_per_epoch_and_plots_it(tiny_model_name, tmp_path, monkeypatch):
    """Scripted steps (task 2's terms = 100 x task 1's): the per-epoch means are the hand means of
    those steps, in the result, results.json and a resumed finished run; loss_curves.png is drawn.
    Step 2 has no loss (under torchrun: rank 0 got no images of that batch): it counts as a step of
    its epoch (it ran) but not in the means (the count was short before)."""
    def scripted_step(self, optimizer, images, labels, lr, step, t, global_n, scaler=None):
        scale = 100.0 ** t
        if step == 2:
            return {}
        return {"cls": scale * step, **({"acgd": scale * 2 * step} if step % 2 else {})}

    monkeypatch.setattr(Trainer, "train_step", scripted_step)
    # 100 classes / 2 tasks x 2 images = 100 images a task, batch 25: 4 steps an epoch; 6 steps at most
    cfg = small_config(tiny_model_name, tmp_path / "run", epochs=2, optim__batch_size=25,
                       run__max_steps_per_task=6)
    result = train(cfg)
    task1 = [{"epoch": 1, "steps": 4, "cls": 4 / 3, "acgd": 4.0},  # steps 0-3, cls on 0, 1, 3; acgd on 1, 3
             {"epoch": 2, "steps": 2, "cls": 4.5, "acgd": 10.0}]  # steps 4-5 (max_steps_per_task); acgd on 5
    assert result.loss_per_epoch[0] == task1
    task2 = [{k: (v * 100 if k in ("cls", "acgd") else v) for k, v in row.items()} for row in task1]
    assert [row == pytest.approx(want) for row, want in zip(result.loss_per_epoch[1], task2)] == [True, True]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["loss_per_epoch"] == result.loss_per_epoch
    assert result.paths["loss_curves_png"] == str(tmp_path / "run" / "loss_curves.png")
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 0
    again = train(small_config(tiny_model_name, tmp_path / "run", epochs=2, optim__batch_size=25,
                               run__max_steps_per_task=6, resume=True))
    assert again.loss_per_epoch == result.loss_per_epoch


def test_zeroshot_does_not_change_the_model_and_finetune_does(tiny_model_name, tmp_path):
    zs = Trainer(small_config(tiny_model_name, tmp_path / "zs", method="zeroshot", num_tasks=1))
    zs_result = zs.run()
    assert all(float(p.detach().abs().sum()) == 0.0 for p in zs.lora_params)
    assert zs_result.loss_per_epoch == [[]] and "loss_curves_png" not in zs_result.paths  # nothing trained
    assert not (tmp_path / "zs" / "loss_curves.png").exists()
    ft = Trainer(small_config(tiny_model_name, tmp_path / "ft", method="lora_finetune", num_tasks=1, lr=0.05))
    ft.run()
    assert any(float(p.detach().abs().sum()) > 0.0 for p in ft.lora_params)


def test_cli_train_and_bad_key(tiny_model_name, tmp_path, capsys):
    from segpcl_fast.cli import main
    args = ["train", "--set", f"model.name={tiny_model_name}", "--set", "model.pretrained=none",
            "--set", "data.max_train_per_class=1", "--set", "data.max_test_per_class=1", "--set", "data.num_tasks=1",
            "--set", "optim.epochs=1", "--set", "run.progress=false", "-o", str(tmp_path / "cli")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Last" in printed and "results.json" in printed
    assert main(["train", "--set", "dpgd.kadv=3"]) == 2
    assert "unknown config key 'dpgd.kadv'" in capsys.readouterr().err


def test_cli_user_errors_are_one_line_and_exit_2(tiny_model_name, tmp_path, capsys):
    from segpcl_fast.cli import main
    args = ["train", "--set", f"model.name={tiny_model_name}", "--set", "model.pretrained=none",
            "--set", "data.max_train_per_class=1", "--set", "data.max_test_per_class=1", "--set", "data.num_tasks=2",
            "--set", "optim.epochs=1", "--set", "run.progress=false", "-o", str(tmp_path / "cli")]
    assert main(args + ["--method", "lora_finetune"]) == 0
    capsys.readouterr()
    # resuming a lora_finetune run as segpcl: the CheckpointError names the key, no traceback
    assert main(args + ["--method", "segpcl", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segpcl-fast: error:") and "run.method" in err and "Traceback" not in err
    (tmp_path / "cli" / "checkpoints" / "last").write_text("garbage")
    assert main(["evaluate", str(tmp_path / "cli")]) == 2
    assert capsys.readouterr().err.startswith("segpcl-fast: error:")
    if not torch.cuda.is_available():
        assert main(args + ["--set", "run.device=cuda", "-o", str(tmp_path / "gpu")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["ablate", "--method", "segpcl", "--seeds", "0"]) == 2
    assert "ablate does not take --method (it runs every --variants entry" in capsys.readouterr().err
    assert main(["train", "-o", ""]) == 2  # not silently runs/default
    assert "run.output_dir" in capsys.readouterr().err
    for bad in (["ablate", "--seeds", "0,a"], ["ablate", "--seeds", ""], ["profile", "--steps", "0"], ["profile", "--rows", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_the_printed_ncu_command_drops_this_runs_steps_output_and_nvtx():
    from segpcl_fast.cli import _drop_options
    argv = ["--steps", "5", "-o", "runs/p", "--nvtx", "--set", "a=1", "--output-dir=x"]
    assert _drop_options(argv, flags=("--nvtx",), with_value=("--steps", "-o", "--output-dir")) == ["--set", "a=1"]


def test_optimizer_choice_auto_prefers_apex_and_falls_back_to_torch(monkeypatch):
    from segpcl_fast.engine import accel
    from segpcl_fast.engine.trainer import make_optimizer
    params = [torch.nn.Parameter(torch.ones(3))]
    cfg = make_config(lr=0.1)
    opt = make_optimizer(params, cfg)  # CPU, no apex here: torch's foreach SGD
    assert type(opt) is torch.optim.SGD and opt.defaults["foreach"] and opt.defaults["momentum"] == 0.9
    params[0].grad = torch.full((3,), 2.0)
    opt.step()
    torch.testing.assert_close(params[0].detach(), torch.full((3,), 1.0 - 0.1 * 2.0))
    sentinel = object()
    monkeypatch.setattr(accel, "has_apex_fused_sgd", lambda: True)
    monkeypatch.setattr(accel, "apex_fused_sgd", lambda p, o: sentinel)
    apex = make_config(lr=0.1, optim__fused="apex")
    assert make_optimizer(params, apex) is sentinel  # "apex" takes apex when it is there
    # not "auto": torch's fused SGD skips a non-finite step on the device, apex's step reads it on the host
    assert make_optimizer(params, cfg) is not sentinel
    assert make_optimizer(params, make_config(lr=0.1, optim__fused="foreach")) is not sentinel
    monkeypatch.setattr(accel, "apex_fused_sgd", lambda p, o: None)  # apex present but unusable (CPU params)
    assert type(make_optimizer(params, apex)) is torch.optim.SGD

    class LooksCuda(torch.nn.Parameter):  # CUDA params without a GPU: only is_cuda is read
        @property
        def is_cuda(self):
            return True
    on_cuda = [LooksCuda(torch.ones(3))]
    for fused in ("auto", "apex"):  # auto always, apex without a usable apex: torch's fused SGD on CUDA
        assert make_optimizer(on_cuda, make_config(lr=0.1, optim__fused=fused)).defaults["fused"]
    monkeypatch.setattr(accel, "apex_fused_sgd", lambda p, o: sentinel)
    assert make_optimizer(on_cuda, cfg).defaults["fused"] and make_optimizer(on_cuda, apex) is sentinel
    assert make_optimizer(on_cuda, make_config(lr=0.1, optim__fused="foreach")).defaults["foreach"]


def test_an_apex_without_its_cuda_extension_falls_back_to_torch_sgd(monkeypatch, caplog):
    """apex installed Python-only: FusedSGD's constructor raises, which crashed the run at its first
    optimizer instead of falling back."""
    import sys
    import types

    from segpcl_fast.engine import accel

    class FusedSGD:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("apex.optimizers.FusedSGD requires cuda extensions")

    fake = types.ModuleType("apex.optimizers")
    fake.FusedSGD = FusedSGD
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.optimizers", fake)

    class LooksCuda(torch.nn.Parameter):
        @property
        def is_cuda(self):
            return True
    assert accel.has_apex_fused_sgd()
    with caplog.at_level("WARNING", logger="segpcl_fast.engine"):
        assert accel.apex_fused_sgd([LooksCuda(torch.ones(3))], make_config().optim) is None
    assert "requires cuda extensions" in caplog.text


@pytest.mark.parametrize("method", ["segpcl", "distill_new_data"])
def test_the_drift_transfer_always_uses_the_dpgd_anchors(tiny_model_name, tmp_path, method):
    """method.md: the drift is measured on the DPGD anchors; distill_new_data changes only what
    ACGD distils on (the task's raw images), not the transfer."""
    cfg = small_config(tiny_model_name, tmp_path / method, method=method, max_train_per_class=3)
    trainer = Trainer(cfg)
    seen = {}
    original = trainer.learner.begin_task

    def capture(*args, **kwargs):
        info = original(*args, **kwargs)
        seen.update(acgd=trainer.learner.anchor_cache, transfer=trainer.learner.transfer_cache, info=info)
        return info
    trainer.learner.begin_task = capture
    trainer.train_task(0)
    trainer.train_task(1)
    n_old, k_seed = trainer.learner.n_old, cfg.dpgd.k_seed
    transfer = seen["transfer"]
    assert transfer.source == "anchors" and len(transfer) == n_old * k_seed
    assert sorted(transfer.targets.tolist()) == sorted(list(range(n_old)) * k_seed)
    if method == "segpcl":
        assert seen["acgd"] is transfer
    else:
        n_task_images = len(trainer.scenario.train_dataset(1))
        assert seen["acgd"].source == "new_data" and len(seen["acgd"]) == n_task_images
        assert seen["acgd"].targets.tolist() == [-1] * n_task_images
        assert seen["info"]["transfer_anchors"] == n_old * k_seed


def test_run_files_get_the_mode_open_would_give_them(tiny_model_name, tmp_path):
    """Atomic writes make their temp file 0600 (as mkstemp): results must still be readable by the group/others."""
    import os
    import stat
    old = os.umask(0o022)
    try:
        train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1, plots=True))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    files = [run / "results.json", run / "config.yaml", run / "accuracy_matrix.png",
             run / "checkpoints" / "task_00.pt", run / "checkpoints" / "last"]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o644" for f in files}


def test_a_new_run_refuses_a_dir_holding_another_run_unless_told_to_overwrite(tiny_model_name, tmp_path):
    train(small_config(tiny_model_name, tmp_path / "run", num_tasks=2))
    assert (tmp_path / "run" / "checkpoints" / "task_01.pt").exists()
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*-o.*run.overwrite=true"):
        train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1, method="lora_finetune"))
    with pytest.MonkeyPatch.context() as m:  # an overwrite that dies before its first task leaves none of
        crash_at_task(m, 0)                    # the old run's results behind
        with pytest.raises(KeyboardInterrupt):
            train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1, method="lora_finetune",
                               run__overwrite=True))
    assert not (tmp_path / "run" / "results.json").exists()
    # nor its plots, which would show the old run's numbers next to the new run's files
    assert not any((tmp_path / "run" / name).exists()
                   for name in ("accuracy_matrix.png", "acc_per_task.png", "loss_curves.png"))
    result = train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1, method="lora_finetune",
                                run__overwrite=True))
    # the old run's task_01.pt is gone: nothing stale is left next to the new run's files
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("task_*.pt")) == ["task_00.pt"]
    assert len(result.accuracy_matrix) == 1


def _spy_stages(learner, names, stage, record):
    """Wrap each named Learner method: stage[0] names the one running, record(name, output) after it."""
    for name in names:
        original = getattr(learner, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            stage[0] = _name
            out = _original(*args, **kwargs)
            record(_name, out)
            return out
        setattr(learner, name, spy)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_run_precision_puts_the_image_tower_in_bf16_and_keeps_the_method_fp32(tiny_model_name, tmp_path, precision):
    """run.precision=bf16 (fp16 alike) runs the image transformer under autocast in every stage (DPGD, whose fp32
    GEMMs topped an H100 profile when it ran outside autocast; the training step; prototypes;
    evaluation) and nothing else: the TSGR graph, the teacher's cached logits, the text embeddings,
    the losses and the logits stay fp32. So at task 1, where B = 0 and the student text is the
    reference text, L_GR is 0 (graphs built under autocast had left 1e-4), and bf16 logits never tie."""
    cfg = small_config(tiny_model_name, tmp_path / precision, max_train_per_class=3, run__precision=precision)
    trainer = Trainer(cfg)
    learner = trainer.learner
    stage, tower_autocast, dtypes, first_parts = ["setup"], {}, {}, []
    trainer.model.visual.transformer.resblocks[0].register_forward_pre_hook(
        lambda module, args: tower_autocast.setdefault(stage[0], set()).add(
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
    def record(name, out):
        if name == "loss":
            first_parts.append({k: float(v.detach()) for k, v in out[1].items()})
            dtypes.update({f"L_{k}": v.dtype for k, v in out[1].items()})
            if learner.anchor_cache is not None:
                dtypes["teacher_logits"] = learner.anchor_cache.teacher_logits.dtype
        if name == "logits":
            dtypes["logits"] = out.dtype
    _spy_stages(learner, ("begin_task", "end_task", "loss", "logits"), stage, record)
    trainer.train_task(0)
    assert first_parts[0]["gr"] < 1e-6, first_parts[0]
    dtypes["graph"] = learner.graph.ref_logprob.dtype
    trainer.evaluate_seen(0)
    trainer.train_task(1)
    dtypes["text_cache"] = learner.text_cache.dtype
    dtype = {"fp32": False, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert tower_autocast == {name: {dtype} for name in ("begin_task", "loss", "end_task", "logits")}
    assert set(dtypes) == {"L_cls", "L_acgd", "L_gr", "teacher_logits", "logits", "graph", "text_cache"}
    assert set(dtypes.values()) == {torch.float32}, dtypes


def _poison_gradients(learner, steps):
    """Learner.loss adds 0 with a non-finite gradient (d sqrt|b - b| at 0) at the given 0-based calls: a
    finite loss whose LoRA B gradients overflow, as fp16 gradients under too high a loss scale do."""
    real, calls = learner.loss, [0]
    b = next(p for n, p in learner.model.named_parameters() if "lora_B" in n)

    def loss(images, labels):
        total, parts = real(images, labels)
        calls[0] += 1
        if calls[0] - 1 in steps:
            total = total + (b - b.detach()).abs().sqrt().sum()
        return total, parts
    learner.loss = loss


def test_fp16_run_skips_overflowed_steps_counts_them_and_stops_after_too_many_in_a_row(tiny_model_name, tmp_path,
                                                                                        monkeypatch, caplog):
    """run.precision=fp16 trains under a loss scaler (one per task): steps whose gradients overflow are
    skipped and counted in results.json (timings.tasks[t].fp16_skipped_steps) and the task's line, warned about
    past a quarter of the task's steps, while the run goes on;
    MAX_OVERFLOWS_IN_A_ROW of them in a row stop it with an error naming the fix. bf16 has no scaler (an
    overflow there is an error at once)."""
    monkeypatch.setattr("segpcl_fast.engine.step_outcome.MAX_OVERFLOWS_IN_A_ROW", 3)
    cfg = small_config(tiny_model_name, tmp_path / "fp16", num_tasks=1, plots=False, run__precision="fp16",
                       optim__batch_size=4, run__max_steps_per_task=5)
    trainer = Trainer(cfg)
    _poison_gradients(trainer.learner, steps={0, 1, 3, 4})  # 4 of 5 steps, never 3 in a row
    b_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    with caplog.at_level("INFO"):
        trainer.run()
    assert any(m.startswith("task 1/1: acc on seen classes") and m.endswith(", fp16 skipped 4/5 steps)")
               for m in caplog.messages), caplog.messages
    assert any(m.startswith("task 1: 4 of its 5 steps overflowed under fp16 loss scaling and were skipped")
               for m in caplog.messages), caplog.messages
    timings = json.loads((tmp_path / "fp16" / "results.json").read_text())["timings"]["tasks"][0]
    assert (timings["steps"], timings["fp16_skipped_steps"]) == (5, 4)
    changed = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, b_before[n])]
    assert changed  # step 2 applied
    stopped = Trainer(apply_overrides(cfg, {"run.output_dir": str(tmp_path / "stopped")}))
    _poison_gradients(stopped.learner, steps={1, 2, 3})
    with pytest.raises(FloatingPointError, match="not finite in 3 steps in a row at task 1, up to step 3, under fp16 "
                                                 "loss scaling \\(each skipped and the scale halved, to 8192 now\\)"
                                                 ".*use run.precision=bf16 \\(where the GPU has it\\)") as stop:
        stopped.run()
    assert "the step before" not in str(stop.value)  # step 2, itself skipped: its gradient norm nan says nothing
    bf16 = Trainer(apply_overrides(cfg, {"run.output_dir": str(tmp_path / "bf16"), "run.precision": "bf16"}))
    _poison_gradients(bf16.learner, steps={1})
    with pytest.raises(FloatingPointError, match="LoRA B gradients are not finite at task 1, step 1"):
        bf16.run()


def test_fp16_run_starting_at_too_high_a_loss_scale_overflows_for_real_skips_and_then_trains(tiny_model_name, tmp_path,
                                                                                            monkeypatch):
    """A real fp16 overflow, no injected NaN: the scaler starts at 2^30, where the tiny tower's fp16 backward
    overflows; the first steps are skipped (B unchanged) while the scale halves, then the steps fit and train."""
    from segpcl_fast.engine import trainer as trainer_module
    scalers = []

    def high_scaler(device, *precisions):
        scalers.append(torch.amp.GradScaler(device.type, init_scale=2.0 ** 30))
        return scalers[-1]
    monkeypatch.setattr(trainer_module, "make_grad_scaler", high_scaler)
    cfg = small_config(tiny_model_name, tmp_path / "fp16", num_tasks=1, plots=False, run__precision="fp16",
                       optim__batch_size=4, run__max_steps_per_task=24, method="lora_finetune")
    trainer = Trainer(cfg)
    b_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.run()
    timings = json.loads((tmp_path / "fp16" / "results.json").read_text())["timings"]["tasks"][0]
    skipped = timings["fp16_skipped_steps"]
    assert 0 < skipped < 24 and scalers[0].get_scale() == 2.0 ** (30 - skipped), (skipped, scalers[0].get_scale())
    trained = {n: p.detach() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert all(torch.isfinite(p).all() for p in trained.values())
    assert any(not torch.equal(p, b_before[n]) for n, p in trained.items())


def test_bf16_on_a_gpu_without_native_bf16_is_warned_about_naming_fp16(monkeypatch, tiny_model_name, tmp_path, caplog):
    """A V100 (compute capability 7.0) runs bf16 emulated, slowly: run.precision=bf16 (every dataset config's) on
    it is warned about, naming the GPU and fp16. The run's own device is asked (cuda:1 here, while the current
    device is the A100 at cuda:0); fp16, fp32, an Ampere GPU and the CPU say nothing. The Trainer logs it."""
    from segpcl_fast.engine import trainer as trainer_module
    gpus = {0: ("NVIDIA A100-SXM4-40GB", (8, 0)), 1: ("Tesla V100-SXM2-16GB", (7, 0))}
    index = lambda device: 0 if device is None else torch.device(device).index  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpus[index(device)][1])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpus[index(device)][0])
    warn = trainer_module.precision_warning
    v100, a100 = torch.device("cuda", 1), torch.device("cuda", 0)
    assert warn(make_config(precision="bf16", run__text_precision="bf16"), v100) == (
        "run.precision=bf16 and run.text_precision=bf16 on Tesla V100-SXM2-16GB (compute capability 7.0), which has "
        "no native bf16: torch emulates it, slowly (and torch.compile may skip its bf16 graphs); train with "
        "--set run.precision=fp16 --set run.text_precision=fp16 (autocast with loss scaling, on its tensor cores; "
        "--set wins over a --hw preset)")
    # evaluate / --resume: the run's precision is its own (its checkpoints' config): the advice is for a new run
    assert warn(make_config(precision="bf16"), v100, new_run=False).endswith(
        "which has no native bf16: torch emulates it, slowly (and torch.compile may skip its bf16 graphs); this run "
        "keeps the precision it was trained with (its checkpoints' config); a new run with --set run.precision=fp16 "
        "(autocast with loss scaling) uses its tensor cores")
    assert warn(make_config(precision="fp16", run__text_precision="bf16"), v100).startswith(
        "run.text_precision=bf16 on Tesla V100")
    assert warn(make_config(precision="fp16", run__text_precision="fp32"), v100) is None
    assert warn(make_config(precision="bf16", run__text_precision="bf16"), a100) is None
    assert warn(make_config(precision="bf16"), torch.device("cpu")) is None
    monkeypatch.undo()
    monkeypatch.setattr(trainer_module, "precision_warning",
                        lambda cfg, device, new_run: f"slow bf16 on {device}, new run {new_run}")
    with caplog.at_level("WARNING", logger="segpcl_fast.engine"):
        Trainer(small_config(tiny_model_name, tmp_path / "run"))
        Trainer(small_config(tiny_model_name, tmp_path / "run"), trains=False)  # evaluate's
    assert [m for m in caplog.messages if m.startswith("slow bf16")] == [
        "slow bf16 on cpu, new run True", "slow bf16 on cpu, new run False"]


def test_run_text_precision_bf16_autocasts_the_text_transformer_for_every_text_embedding(tiny_model_name, tmp_path):
    """run.text_precision=bf16 (opt-in) runs the text transformer under bf16 autocast wherever text is
    embedded: the reference embeddings (the learner's setup), the teacher's old-class text (begin_task),
    the student's text in the training step; the embeddings come out fp32, the image tower keeps
    run.precision (fp32 here), and L_GR at task 1 (B = 0: student text = reference text, both through
    the same bf16 path) is still about 0. The default keeps the text transformer fp32."""
    cfg = small_config(tiny_model_name, tmp_path / "run", max_train_per_class=3, run__text_precision="bf16")
    trainer = Trainer(cfg)
    learner, model = trainer.learner, trainer.model
    assert model.text_autocast is torch.bfloat16 and model.image_autocast is None
    with torch.no_grad():
        bf16_ref = model.class_embeddings(learner.class_prompts)
    torch.testing.assert_close(learner.ref_text, bf16_ref, rtol=0, atol=0)
    stage, seen, parts = ["setup"], {}, []
    model.text_tower.transformer.register_forward_pre_hook(
        lambda module, args: seen.setdefault(stage[0], set()).add(torch.is_autocast_enabled("cpu")))
    model.visual.transformer.resblocks[0].register_forward_pre_hook(
        lambda module, args: seen.setdefault("image", set()).add(torch.is_autocast_enabled("cpu")))
    _spy_stages(learner, ("begin_task", "loss"), stage,
                lambda name, out: name == "loss" and parts.append({k: float(v.detach()) for k, v in out[1].items()}))
    trainer.train_task(0)
    assert parts[0]["gr"] < 1e-6, parts[0]
    trainer.train_task(1)
    assert seen == {"begin_task": {True}, "loss": {True}, "image": {False}}, seen
    assert learner.text_cache.dtype == torch.float32
    default = Trainer(small_config(tiny_model_name, tmp_path / "default", max_train_per_class=3))
    assert default.model.text_autocast is None
    # the same weights and prompts in fp32: bf16 rounding shows, so the autocast did run
    assert (learner.ref_text - default.learner.ref_text).abs().max() > 1e-5


def test_bf16_run_with_frozen_weights_stored_once_equals_autocast_casting_them(tiny_model_name, tmp_path, monkeypatch):
    """model/frozen_cast.py: a bf16 tower's frozen GEMM weights stored in bf16 at build time (the default)
    instead of cast by autocast on every forward: a whole run (DPGD, training, prototypes, evaluation;
    both towers in bf16) gives the same numbers bit for bit, with the trained B and A the same."""
    def run(name):
        trainer = Trainer(small_config(tiny_model_name, tmp_path / name, max_train_per_class=3, plots=False,
                                       run__precision="bf16", run__text_precision="bf16"))
        return trainer, trainer.run()
    stored, stored_result = run("stored")
    assert stored.model.frozen_storage == {"visual": torch.bfloat16, "text": torch.bfloat16}
    monkeypatch.setenv("SEGPCL_FROZEN_CAST", "per_call")
    per_call, per_call_result = run("per_call")
    assert per_call.model.frozen_storage == {}
    assert stored_result.accuracy_matrix == per_call_result.accuracy_matrix
    assert stored_result.accuracy_matrix_own == per_call_result.accuracy_matrix_own
    mine, theirs = stored.model.state_dict(), per_call.model.state_dict()
    trained = [k for k in theirs if "lora_B" in k]
    assert trained and all(torch.equal(mine[k], theirs[k]) for k in trained)
    assert all(torch.equal(mine[k], theirs[k].to(mine[k].dtype)) for k in theirs if "lora_A" in k)
    assert any(mine[k].dtype == torch.bfloat16 for k in mine if "lora_A" in k)
    ran = [json.loads((tmp_path / name / "results.json").read_text())["ops"] for name in ("stored", "per_call")]
    assert {k: ran[0][k] for k in ("frozen_image_weights", "frozen_text_weights")} == {
        "frozen_image_weights": "stored bfloat16", "frozen_text_weights": "stored bfloat16"}
    assert ran[1]["frozen_image_weights"] == "autocast per call"


# Per-step L_cls of lora_finetune on task 8 of the offline world with tasks by colour
# (data.class_order=natural, lr 1e-3, seed 0): flat and noisy, every 4th step a 16-image batch.
# Its first tenth averages 2.43 and its last 2.70, which the session-18 rule called a divergence.
FLAT_NOISY = [2.37, 2.54, 2.80, 2.02, 2.70, 2.53, 2.90, 3.19, 2.33, 2.21, 2.57, 3.84, 2.48, 2.30, 2.56,
              2.88, 2.71, 2.23, 2.65, 3.47, 2.06, 3.07, 3.14, 1.92, 2.67, 2.48, 2.39, 3.70, 2.28, 2.57,
              2.81, 2.90, 2.41, 2.58, 2.18, 1.59, 2.27, 2.30, 2.98, 3.23]
RISING_NOISY = [v + 0.05 * i for i, v in enumerate(FLAT_NOISY)]  # the same noise on a +2.0 trend


@pytest.mark.parametrize("losses, warned", [
    ([1.0] * 10 + [3.0] * 10, True),          # rose well above ln(10) = 2.303
    (FLAT_NOISY, False),                      # no trend: the end-window gap is within the noise
    (RISING_NOISY, True),                     # the same noise on a real rise is still caught
    ([3.0] * 10 + [2.5] * 10, False),         # above chance but falling: slow start, not divergence
    ([0.5] * 10 + [2.0] * 10, False),         # rose but still better than uniform guessing (under 0.95 ln(10))
    ([0.5] * 10 + [2.25] * 10, True),         # rose to near-uniform predictions: collapsed
    ([2.303] * 20, False),                    # collapsed to equal logits: exactly chance, no rise
    ([1.0] * 99 + [9.0], False),              # one bad batch among the last tenth's ten: mean 1.8
    ([1.0] * 10 + [None] + [4.0] * 10, True),  # steps without a loss (an empty DDP shard) are skipped
    ([1.0] * 10 + [None] * 4 + [4.0] * 9, False),  # ... and do not count as steps: 19 < 20, no noise estimate
    ([4.0], False),                           # one step: nothing to compare
])
def test_divergence_warning_needs_a_rise_above_chance(losses, warned):
    from segpcl_fast.engine.trainer import divergence_warning
    message = divergence_warning(losses, 10, 2, 0.1)
    assert (message is not None) == warned
    if warned:
        assert "task 3" in message and "ln(10) = 2.303" in message and "lower optim.lr (now 0.1)" in message
        assert ("training collapsed" in message) == (losses[-1] <= 2.303)  # to chance, not above it


@pytest.mark.parametrize("cls_over", ["current", "seen"])
def test_the_divergence_check_takes_the_classes_l_cls_spans(tiny_model_name, tmp_path, monkeypatch, cls_over):
    """Chance level is ln of the classes L_cls's softmax spans: the task's new ones, or every seen class
    with optim.cls_over=seen (with only the new ones a sound seen-class loss read as 'collapsed')."""
    import segpcl_fast.engine.trainer as trainer_mod
    seen = []
    monkeypatch.setattr(trainer_mod, "divergence_warning", lambda losses, n, t, lr, learned: seen.append((t, n)))
    train(small_config(tiny_model_name, tmp_path / "run", optim__cls_over=cls_over))
    (t1, n1), (t2, n2) = seen  # two tasks of equally many classes
    assert (t1, t2) == (0, 1) and n1 > 1 and n2 == (2 * n1 if cls_over == "seen" else n1)


def test_a_run_whose_loss_rises_warns_once_per_task(tiny_model_name, tmp_path, caplog, monkeypatch):
    calls = []
    real_step = Trainer.train_step

    def rising_step(self, optimizer, images, labels, lr, step, t, global_n, scaler=None):
        real_step(self, optimizer, images, labels, lr, step, t, global_n, scaler)
        calls.append(step)
        return {"cls": 1.0 + 10.0 * step}  # ends far above ln(2 classes)

    monkeypatch.setattr(Trainer, "train_step", rising_step)
    with caplog.at_level("WARNING", logger="segpcl_fast.engine"):
        train(small_config(tiny_model_name, tmp_path / "run", epochs=3, optim__batch_size=2))
    flagged = [r.getMessage() for r in caplog.records if "training diverged" in r.getMessage()]
    assert len(flagged) == 2 and flagged[0].startswith("task 1: L_CLS rose") and len(calls) > 2


def test_lora_A_comes_from_lora_init_seed_or_with_null_from_run_seed(tiny_model_name, tmp_path):
    """lora.init_seed (default 0) fixes the frozen A matrices for every run.seed; null draws them
    from run.seed, so a seed sweep also varies A. B starts at zero either way."""
    from segpcl_fast.engine.trainer import build_model

    def lora_A(**kw):
        cfg = small_config(tiny_model_name, tmp_path, model__pretrained="none", **kw)
        model, params = build_model(cfg, torch.device("cpu"))
        assert all(float(p.detach().abs().sum()) == 0 for p in params)
        return torch.cat([v.flatten() for k, v in model.state_dict().items() if "lora_A" in k])

    assert torch.equal(lora_A(seed=1), lora_A(seed=2))
    assert torch.equal(lora_A(seed=3, lora__init_seed=None), lora_A(seed=0, lora__init_seed=3))
    assert not torch.equal(lora_A(seed=1, lora__init_seed=None), lora_A(seed=2, lora__init_seed=None))
    assert "lora.init_seed must be an integer >= 0 (or null)" in str(
        pytest.raises(Exception, small_config, tiny_model_name, tmp_path, lora__init_seed=-1).value)


def test_a_runs_saved_locations_are_absolute_so_it_resumes_and_evaluates_from_anywhere(tiny_model_name, tmp_path,
                                                                                      monkeypatch):
    from segpcl_fast.api import evaluate
    from segpcl_fast.config import load_config
    from segpcl_fast.engine.trainer import absolute_locations
    monkeypatch.chdir(tmp_path)
    cfg = small_config(tiny_model_name, "runs/rel", num_tasks=1, model__cache_dir="~/weights")
    assert absolute_locations(apply_overrides(cfg, {"data.root": "data/c100"})) == {
        "run.output_dir": str(tmp_path / "runs/rel"), "data.root": str(tmp_path / "data/c100"),
        "model.cache_dir": os.path.expanduser("~/weights")}
    # a weights file and side files named relative to here; an open_clip tag and a file in data.root stay
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "names.txt").write_text("")
    (tmp_path / "data/c100").mkdir(parents=True)
    (tmp_path / "data/c100/split.txt").write_text("")
    located = absolute_locations(apply_overrides(cfg, {"data.root": "data/c100", "model.pretrained": "w.pt",
                                                       "data.names_file": "names.txt", "data.split_file": "split.txt"}))
    assert (located["model.pretrained"], located["data.names_file"]) == (str(tmp_path / "w.pt"), str(tmp_path / "names.txt"))
    assert "data.split_file" not in located  # found in data.root: it moves with it
    assert "model.pretrained" not in absolute_locations(apply_overrides(cfg, {"model.pretrained": "openai"}))
    first = train(cfg)
    saved = load_config(tmp_path / "runs/rel/config.yaml")
    assert (saved.run.output_dir, saved.model.cache_dir) == (str(tmp_path / "runs/rel"), os.path.expanduser("~/weights"))
    # results.json and the Result name the same absolute dirs as config.yaml
    results = json.loads((tmp_path / "runs/rel/results.json").read_text())
    assert results["config"]["run"]["output_dir"] == first.config["run"]["output_dir"] == str(tmp_path / "runs/rel")
    assert first.output_dir == results["paths"]["output_dir"] == str(tmp_path / "runs/rel")
    assert results["paths"]["results"] == str(tmp_path / "runs/rel/results.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert evaluate(tmp_path / "runs/rel")["acc"] == pytest.approx(first.accuracy_matrix[0][0])
    again = train(load_config(tmp_path / "runs/rel/config.yaml"), run__resume=True)  # the finished run, not a new one
    assert again.accuracy_matrix == first.accuracy_matrix and not (elsewhere / "runs").exists()
    with pytest.raises(FileNotFoundError, match=r"task_00.pt is a file: evaluate\(\) takes a run directory .*, e.g. "
                                                f"{tmp_path / 'runs/rel'}$"):
        evaluate(tmp_path / "runs/rel/checkpoints/task_00.pt")
    (elsewhere / "junk.pt").write_bytes(b"x")  # a file beside no run: no folder is offered as the run
    with pytest.raises(FileNotFoundError, match=r"junk.pt is a file: evaluate\(\) takes a run directory \(train's output_dir\)$"):
        evaluate("junk.pt")
    (elsewhere / "pictures").mkdir()
    with pytest.raises(FileNotFoundError, match="config.yaml not found: evaluate"):
        evaluate(elsewhere / "pictures")


def test_an_output_dir_that_cannot_be_written_fails_before_the_data_and_weights(tiny_model_name, tmp_path, capsys):
    from segpcl_fast.cli import main
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "run"):
        # a data root that does not exist: the output dir's error comes first
        args = ["train", "--config", "cifar100", "--set", "data.root=" + str(tmp_path / "no_data"), "-o", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("segpcl-fast: error: run.output_dir: ") and "data root" not in err, err
        assert "pick another folder with -o" in err and err.count("\n") == 1


def test_cli_options_a_subcommand_would_ignore_are_refused_and_v_goes_anywhere(capsys):
    from segpcl_fast.cli import build_parser, main
    for argv, message in ((["sweep", "--set", "optim.lr=0.1,0.2", "--seed", "3"], "sweep does not take --seed (it "
                                                                                  "runs every --seeds entry"),
                          (["distill-sources", "--seed", "1"], "distill-sources does not take --seed"),
                          (["retention", "--method", "segpcl"], "retention does not take --method (it compares every "
                                                                "--variants entry"),
                          (["ablate", "--method", "segpcl", "--seed", "1"], "ablate does not take --method (")):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    for argv in (["-v", "env"], ["env", "-v"], ["train", "--verbose"], ["train", "-v", "-o", "x"]):
        assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["env"]).verbose is False


def _no_training(monkeypatch, tmp_path):
    """Work in tmp_path, and fail at once if anything starts training (a wrong refusal would train)."""
    import segpcl_fast.api
    from segpcl_fast.engine import trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a run was started")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(segpcl_fast.api, "train", refuse)
    monkeypatch.setattr(trainer.Trainer, "__init__", refuse)


def test_set_keys_a_subcommand_decides_itself_or_set_twice_are_refused(capsys, monkeypatch, tmp_path):
    """--set run.method / run.seed where --variants / --seeds decide (they were overridden without a
    word), the same key from a shorthand and --set (the later one won), a sweep key also --fixed (the
    swept values replaced it): each one line naming the conflict, before anything runs."""
    from segpcl_fast.cli import main
    _no_training(monkeypatch, tmp_path)
    for argv, message in (
            (["ablate", "--set", "run.method=segpcl"], "ablate does not take run.method (it runs every --variants"),
            (["ablate", "--set", "run.seed=4"], "ablate does not take run.seed (it runs every --seeds entry: use "
                                                "--seeds 4)"),
            (["ablate", "--seed", "7"], "ablate does not take --seed (it runs every --seeds entry: use --seeds 7)"),
            (["retention", "--set", "run.method=segpcl"], "retention does not take run.method (it compares every"),
            (["sweep", "--set", "optim.lr=0.1,0.2", "--fixed", "run.seed=2"], "sweep does not take run.seed ("),
            (["distill-sources", "--set", "run.seed=1"], "distill-sources does not take run.seed ("),
            (["train", "--method", "segpcl", "--set", "run.method=lora_finetune"],
             "--method segpcl and --set run.method=lora_finetune both set run.method: give one of them"),
            (["train", "-o", "a", "--set", "run.output_dir=b"], "-o a and --set run.output_dir=b both set "
                                                               "run.output_dir"),
            (["sweep", "--set", "optim.lr=0.1,0.2", "--fixed", "optim.lr=0.3"],
             "sweep: optim.lr is both swept (--set) and fixed (--fixed): give it once"),
            (["sweep", "--method", "segpcl", "--set", "run.method=lora_finetune"],  # a one-value --set is fixed
             "--method segpcl and --set run.method=lora_finetune both set run.method"),
            (["sweep", "--set", "optim.lr=0.1,0.2", "-o", "a", "--fixed", "run.output_dir=b"],
             "-o a and --fixed run.output_dir=b both set run.output_dir"),
            (["fragility", "--method", "segpcl", "--set", "run.method=zeroshot"],  # the fix that works
             "fragility takes its method from --method (default lora_finetune), not --set run.method")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


@pytest.mark.parametrize("call, message", [
    ("ablate(method='segpcl')", r"ablate\(\) does not take run.method \(it runs every variants entry"),
    ("ablate(seed=3)", r"ablate\(\) does not take run.seed \(it runs every seeds entry: pass seeds=\[1\]\)"),
    ("sweep(axes={'optim.lr': [0.1, 0.2]}, run__seed=3)", r"sweep\(\) does not take run.seed"),
    ("retention(method='segpcl')", r"retention\(\) does not take run.method"),
    ("distill_sources(run__method='segpcl')", r"distill_sources\(\) does not take run.method \(pass method="),
])
def test_api_keywords_an_analysis_decides_itself_are_refused(call, message, tmp_path, monkeypatch):
    from segpcl_fast import api
    _no_training(monkeypatch, tmp_path)
    from segpcl_fast.analysis import distill_sources, retention, sweep
    scope = {"ablate": api.ablate, "sweep": sweep, "retention": retention, "distill_sources": distill_sources}
    with pytest.raises(ConfigError, match=message):
        eval(call.replace("(", f"(run__output_dir={str(tmp_path / 'out')!r}, ", 1), scope)
    assert not (tmp_path / "out").exists()


def test_analyses_keep_their_runs_out_of_train_runs(tmp_path, monkeypatch, capsys):
    """The offline default run.output_dir (train's runs/default) becomes runs/<analysis>; a folder that
    is a train run is refused (the analysis' runs went inside it), from the API and the CLI alike."""
    from segpcl_fast import api
    from segpcl_fast.analysis import anchor_views, distill_sources, fragility, retention, sweep
    from segpcl_fast.cli import main
    from segpcl_fast.config import analysis_config
    assert analysis_config(make_config(), "ablate").run.output_dir == "runs/ablate"
    assert analysis_config(make_config(run__output_dir="x"), "sweep").run.output_dir == "x"
    _no_training(monkeypatch, tmp_path)
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "config.yaml").write_text("run: {}\n")
    fix = f"give it its own folder .-o {tmp_path / 'trained'}-"
    trained = str(tmp_path / "trained")
    for name, call in (("ablate", lambda: api.ablate(run__output_dir=trained)),
                       ("sweep", lambda: sweep(axes={"optim.lr": [0.1, 0.2]}, run__output_dir=trained)),
                       ("retention", lambda: retention(run__output_dir=trained)),
                       ("distill-sources", lambda: distill_sources(run__output_dir=trained)),
                       ("fragility", lambda: fragility(run__output_dir=trained)),
                       ("anchor-views", lambda: anchor_views(run__output_dir=trained))):
        with pytest.raises(ConfigError, match=f"is a train run's folder .it holds config.yaml.: {name} would write "
                                              f"its runs and files among that run's; {fix}{name}"):
            call()
    assert main(["ablate", "-o", str(tmp_path / "trained")]) == 2
    assert "is a train run's folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained"]


def test_ctrl_c_in_train_is_one_line_saying_how_to_resume(monkeypatch, capsys):
    import segpcl_fast.api
    from segpcl_fast.cli import main

    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(segpcl_fast.api, "train", interrupted)
    assert main(["train", "-o", "unused"]) == 130
    err = capsys.readouterr().err
    assert err == "segpcl-fast: interrupted: continue after the last finished task with the same command and --resume\n"
    # run.checkpoint=false keeps nothing to resume from: --resume would start again, and the hint says so
    assert main(["train", "-o", "unused", "--set", "run.checkpoint=false"]) == 130
    assert capsys.readouterr().err == ("segpcl-fast: interrupted: run.checkpoint=false kept no checkpoint, so --resume "
                                       "would start again from task 1\n")


def test_an_interrupt_before_any_task_finished_says_the_same_command_starts_over(tiny_model_name, tmp_path,
                                                                                 monkeypatch, capsys):
    """A run stopped before its first checkpoint keeps nothing to resume from (--resume of a folder not yet made
    was an error): the line says so; stopped after task 1's checkpoint, it names --resume (a review's finding)."""
    from segpcl_fast.cli import main
    tiny = ["--set", f"model.name={tiny_model_name}", "--set", "model.pretrained=null", "--set",
            "data.max_train_per_class=2", "--set", "data.max_test_per_class=2", "--set", "data.num_tasks=2", "--set",
            "optim.epochs=1", "--set", "dpgd.k_adv=2", "--set", "dpgd.k_seed=2", "--set", "run.progress=false"]
    for task, hint in ((0, "no task had finished, so no checkpoint was kept: the same command starts the run again "
                           "from task 1"),
                       (1, "continue after the last finished task with the same command and --resume")):
        crash_at_task(monkeypatch, task)
        assert main(["train", "-o", str(tmp_path / f"run{task}"), *tiny]) == 130
        monkeypatch.undo()
        assert capsys.readouterr().err.endswith(f"segpcl-fast: interrupted: {hint}\n")
    original = Trainer._build

    def interrupted_while_loading(self, *args):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "_build", interrupted_while_loading)  # before the run's folder exists
    assert main(["train", "-o", str(tmp_path / "new"), *tiny]) == 130
    assert capsys.readouterr().err.endswith("the same command starts the run again from task 1\n")
    assert main(["train", "-o", str(tmp_path / "run1"), "--resume", *tiny]) == 130  # task 1's checkpoint is there
    assert capsys.readouterr().err.endswith("with the same command and --resume\n")
    # run.overwrite stopped while loading: the run it replaces is still there, so not "no checkpoint was kept"
    assert main(["train", "-o", str(tmp_path / "run1"), "--set", "run.overwrite=true", *tiny]) == 130
    assert "no checkpoint was kept" not in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_build", original)


def test_sigterm_is_an_interrupt_that_leaves_no_half_written_file(monkeypatch, capsys, tmp_path):
    """timeout, Slurm and torchrun stop a run with SIGTERM: the file being written is removed, the
    message says how to resume, the exit status is 128 + 15, and the caller's handler comes back."""
    import signal

    import segpcl_fast.api
    from segpcl_fast.cli import main
    from segpcl_fast.fileio import atomic_path

    def terminated_while_writing(cfg):
        with atomic_path(tmp_path / "checkpoints" / "task_00.pt") as tmp:
            tmp.write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises at the next bytecode; this never finishes
    monkeypatch.setattr(segpcl_fast.api, "train", terminated_while_writing)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", "-o", "unused"]) == 143
    assert capsys.readouterr().err == ("segpcl-fast: terminated (SIGTERM): continue after the last finished task with "
                                       "the same command and --resume\n")
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before
    # under torchrun the other ranks get SIGTERM while blocked in a collective: the default handler stays
    from segpcl_fast.cli import _raise_on_sigterm
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _raise_on_sigterm() is False and signal.getsignal(signal.SIGTERM) is before


ONE_LINE = "segpcl-fast: terminated (SIGTERM): continue after the last finished task with the same command and --resume\n"


def test_a_sigterm_swallowed_where_python_cannot_raise_is_raised_again(monkeypatch, capsys):
    """Terminated raised inside a __del__ or a fork callback (a DataLoader starting its workers) was printed
    as 'Exception ignored in ...' and lost: the run went on. It is signalled again and ends the command with
    the one line; the hook that does it is put back after."""
    import signal

    import segpcl_fast.api
    from segpcl_fast.cli import main

    class Dying:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # handled here, inside __del__: its Terminated is unraisable

    def terminated_in_a_finalizer(cfg):
        Dying()
        time.sleep(30)  # the SIGTERM sent again ends this
    monkeypatch.setattr(segpcl_fast.api, "train", terminated_in_a_finalizer)
    hook = sys.unraisablehook
    started = time.perf_counter()
    assert main(["train", "-o", "unused"]) == 143
    assert time.perf_counter() - started < 10
    assert capsys.readouterr().err == ONE_LINE
    assert sys.unraisablehook is hook


def test_a_loader_iterator_stopped_while_starting_adds_no_traceback(monkeypatch, capsys):
    """A SIGTERM while a multi-process DataLoader iterator starts its workers left it half made: its __del__
    printed 'Exception ignored in ... no attribute _shutdown' after the one line (a review's finding)."""
    import segpcl_fast.api
    from segpcl_fast.cli import main
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    def stopped_in_a_loader(cfg):
        half_made = _MultiProcessingDataLoaderIter.__new__(_MultiProcessingDataLoaderIter)  # its __init__ cut off
        del half_made  # its __del__ runs now: an unraisable AttributeError
        raise KeyboardInterrupt
    monkeypatch.setattr(segpcl_fast.api, "train", stopped_in_a_loader)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's own, which prints (not pytest's)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", "-o", "unused"]) == 130
    err = capsys.readouterr().err
    assert err == "segpcl-fast: interrupted: continue after the last finished task with the same command and --resume\n"


def test_a_second_sigterm_while_the_first_is_reported_is_ignored(monkeypatch, capsys):
    """timeout and Slurm signal the process and then its group: the second SIGTERM, raised inside the except
    clause reporting the first, escaped main() as a traceback."""
    import signal

    import segpcl_fast.api
    import segpcl_fast.cli as cli

    def terminated(cfg):
        raise cli.Terminated()
    monkeypatch.setattr(segpcl_fast.api, "train", terminated)
    report, calls = cli._report_interrupt, []

    def signalled_again_while_reporting(*args):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        return report(*args)
    monkeypatch.setattr(cli, "_report_interrupt", signalled_again_while_reporting)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["train", "-o", "unused"]) == 143
    assert capsys.readouterr().err == ONE_LINE and calls
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_to_the_process_group_with_dataloader_workers_is_one_line(tmp_path):
    """`timeout` and Slurm signal the whole group: the DataLoader workers die too, and torch's SIGCHLD handler
    raised 'DataLoader worker (pid N) is killed by signal: Terminated' into the unwinding (20 more lines)."""
    import signal
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, time, torch\n"
        "import segpcl_fast.api\n"
        "from segpcl_fast.cli import main\n"
        "class Slow(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 1000\n"
        "    def __getitem__(self, i): time.sleep(0.05); return i\n"
        "def train(cfg):\n"
        "    for i, _ in enumerate(torch.utils.data.DataLoader(Slow(), num_workers=2)):\n"
        "        if i == 2: print('iterating', flush=True)\n"
        "segpcl_fast.api.train = train\n"
        "sys.exit(main(['train', '-o', sys.argv[1]]))\n")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "unused")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while (line := proc.stdout.readline()) not in ("iterating\n", ""):  # after the command's header
            pass
        assert line == "iterating\n"
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and err == ONE_LINE, err


def test_a_sigchld_pending_when_sigterm_is_handled_prints_nothing(tmp_path):
    """The race the test above met now and then: a DataLoader worker's SIGCHLD arrives with the SIGTERM, and the
    SIGTERM handler swaps SIGCHLD's handler before Python runs the pending one. With SIG_DFL as the new handler
    Python printed 'OSError: Signal 17 ignored due to race condition' and a traceback. Made certain here: both
    signals are blocked, sent, then unblocked together (SIGTERM, the lower number, is handled first)."""
    script = tmp_path / "race.py"
    script.write_text(
        "import os, signal\n"
        "from segpcl_fast import cli\n"
        "signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # torch's DataLoader handler stands here\n"
        "cli._raise_on_sigterm()\n"
        "both = {signal.SIGTERM, signal.SIGCHLD}\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, both)\n"
        "os.kill(os.getpid(), signal.SIGCHLD)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "try:\n"
        "    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)\n"
        "    sum(range(1000))\n"
        "except cli.Terminated:\n"
        "    print('terminated', flush=True)\n"
        "sum(range(1000))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "terminated\n", "")


class _BrokenImages(torch.utils.data.Dataset):
    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 2

    def __getitem__(self, i):
        from segpcl_fast.data.base import read_rgb
        return read_rgb(self.path)


def test_a_bad_image_read_in_a_dataloader_worker_is_the_librarys_one_line(monkeypatch, capsys, tmp_path):
    """torch re-raises a worker's error with the worker's whole traceback in its message (PIL's error
    chained under ours): the CLI prints only the library's message, as with num_workers=0."""
    import segpcl_fast.api
    from segpcl_fast.cli import main
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")

    def train_reading_it(cfg):
        list(torch.utils.data.DataLoader(_BrokenImages(tmp_path / "cut.jpg"), num_workers=1))
    monkeypatch.setattr(segpcl_fast.api, "train", train_reading_it)
    assert main(["train", "-o", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segpcl-fast: error: image file '{tmp_path / 'cut.jpg'}' cannot be read (")
    assert err.count("\n") == 1 and "Traceback" not in err and "worker" not in err


def test_evaluate_of_a_folder_of_runs_names_them(tmp_path):
    from segpcl_fast.api import evaluate
    for name in ("lora_finetune/seed0", "segpcl/seed0"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text("run: {}\n")
    with pytest.raises(FileNotFoundError, match=f"config.yaml not found: evaluate.*; runs below it: "
                                                f"{tmp_path / 'lora_finetune/seed0'}, {tmp_path / 'segpcl/seed0'}$"):
        evaluate(tmp_path)


def test_resume_of_a_folder_of_runs_is_refused_naming_them(tiny_model_name, tmp_path):
    """--resume of an analysis' folder (no config.yaml, runs below it) started a fresh run among them;
    it is refused naming the runs, the first few and how many more."""
    names = [f"v{i}/seed0" for i in range(5)]
    for name in names:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text("run: {}\n")
    with pytest.raises(ConfigError, match=f"{tmp_path} is not a run .no config.yaml.; it holds runs: "
                                          f"{tmp_path / 'v0/seed0'}, {tmp_path / 'v1/seed0'}, {tmp_path / 'v2/seed0'} "
                                          f"and 2 more: resume one of them .-o {tmp_path / 'v0/seed0'}."):
        train(small_config(tiny_model_name, tmp_path, resume=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0", "v1", "v2", "v3", "v4"]  # nothing written


def test_cli_train_prints_a_refused_resume_alone(tmp_path, capsys):
    """No 'segpcl-fast train: ...' header before the refusal: the error is the whole output."""
    from segpcl_fast.cli import main
    assert main(["train", "--resume", "-o", str(tmp_path / "typo")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "does not exist: check run.output_dir" in captured.err


@pytest.mark.parametrize("args, error", [
    (["--set", "model.name=ViT-B-3"], "unknown model 'ViT-B-3'; did you mean"),
    (["--set", "run.device=cuda"], "run.device='cuda' but no CUDA device is available"),
    ([], "already holds a run (results.json): continue it with --resume"),
])
def test_cli_train_prints_a_refused_run_alone_and_writes_nothing(tmp_path, capsys, monkeypatch, args, error):
    """An unknown model name, run.device=cuda without a GPU, and a new run into a folder holding a run are
    refused before the 'segpcl-fast train: ...' header line and before any data or weights load."""
    from segpcl_fast.cli import main
    if "cuda" in " ".join(args):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("segpcl_fast.engine.trainer.build_model", lambda *a, **k: pytest.fail("loaded weights"))
    out = tmp_path / "run"
    if not args:
        out.mkdir()
        (out / "results.json").write_text("{}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["train", "-o", str(out), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and error in captured.err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_nonfinite_message_names_the_settings_of_the_bad_terms():
    from segpcl_fast.engine.step_outcome import nonfinite_fixes
    cfg = make_config(acgd__tau=0.001)
    assert nonfinite_fixes(["acgd"], cfg) == "check acgd.tau (now 0.001), acgd.weight (now 5); lower optim.lr (now 0.001)"
    assert nonfinite_fixes(["cls"], make_config(precision="bf16")) == "lower optim.lr (now 0.001); use run.precision=fp32"
    assert nonfinite_fixes(["cls"], make_config(run__text_precision="fp16")) == (
        "lower optim.lr (now 0.001); use run.text_precision=bf16 (where the GPU has it) or fp32")


def test_acgd_on_a_reference_folder_needs_the_folder_before_task_1_trains(tmp_path, monkeypatch):
    from segpcl_fast.data.base import DatasetFormatError
    monkeypatch.setattr("segpcl_fast.engine.trainer.build_model", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(DatasetFormatError, match="no reference folder given .acgd.source_folder is not set"):
        Trainer(make_config(acgd__source="folder", output_dir=str(tmp_path / "run")))
    with pytest.raises(DatasetFormatError, match="missing"):
        Trainer(make_config(acgd__source="folder", acgd__source_folder=str(tmp_path / "missing"),
                            output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_a_folder_distilled_run_evaluates_after_its_reference_folder_moved(tiny_model_name, tmp_path):
    """acgd.source=folder: the trainer checks the reference folder before task 1 trains, but evaluation
    never reads it, so a run whose folder has since moved (or was deleted) still evaluates."""
    from segpcl_fast.analysis.distill_sources import write_synthetic_reference_folder
    from segpcl_fast.api import evaluate
    ref = write_synthetic_reference_folder(tmp_path / "ref", per_class=1)
    cfg = small_config(tiny_model_name, tmp_path / "run", acgd__source="folder", acgd__source_folder=str(ref))
    train(cfg)
    acc = evaluate(tmp_path / "run")["acc"]
    ref.rename(tmp_path / "ref_moved")
    assert evaluate(tmp_path / "run")["acc"] == acc
    with pytest.raises(Exception, match="reference folder"):  # a new run still needs it
        Trainer(small_config(tiny_model_name, tmp_path / "run2", acgd__source="folder", acgd__source_folder=str(ref)))


def test_train_gives_the_callers_process_state_back(tiny_model_name, tmp_path):
    """train() ran with run.num_threads, run.ops and run.seed and left all three set: a later call without
    run.num_threads ran on the first one's thread count. Now it gives them back, as evaluate() does."""
    from segpcl_fast import ops
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng, np_state, backend = torch.random.get_rng_state(), np.random.get_state(), ops.get_backend()
        train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1, num_threads=1, run__ops="reference"))
        assert torch.get_num_threads() == 2 and ops.get_backend() == backend
        assert torch.equal(torch.random.get_rng_state(), rng) and np.array_equal(np.random.get_state()[1], np_state[1])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("perturbed", ["", "visual."])
def test_resume_evaluate_or_load_with_other_pretrained_weights_is_one_error_naming_the_fix(tiny_model_name, tmp_path,
                                                                                           capsys, monkeypatch, perturbed):
    """The run's weights are a file; a perturbed copy given instead (a moved run pointed at the wrong file)
    is refused in resume, evaluate and load_classifier: a CheckpointError (ClassifierError) naming
    model.pretrained and the fix, not a traceback. Every tensor perturbed fails the reference-text check;
    only the image tower's (a copy whose text tower is the run's: a resume trained its later tasks on another
    image tower and evaluate scored it, without a word) fails the probe images' reference embeddings."""
    from segpcl_fast.api import evaluate
    from segpcl_fast.classifier import ClassifierError, load_classifier
    from segpcl_fast.cli import main
    from segpcl_fast.model.clip import load_model
    weights, other = tmp_path / "weights.pt", tmp_path / "other.pt"
    state = load_model(tiny_model_name, pretrained=None).clip.state_dict()
    torch.save(state, weights)
    torch.save({k: v + 0.05 * torch.randn_like(v) if k.startswith(perturbed) and v.is_floating_point() else v
                for k, v in state.items()}, other)
    crash_at_task(monkeypatch, task=1)  # an interrupted run: task 1 checkpointed
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_model_name, tmp_path / "run", model__pretrained=str(weights)))
    monkeypatch.undo()
    what = (r"image embeddings differ from this model's, so these are not the run's pretrained image tower "
            r"\(model.pretrained='.*other.pt'\)" if perturbed else
            r"text embeddings differ from this model's, so these are not the run's pretrained weights "
            r"\(model.pretrained='.*other.pt'\) or prompts")
    want = (rf"task_00.pt: the run's reference {what}; give the run's own: --set model.pretrained=/path/to/them "
            r"\(a file\) or --set model.cache_dir=/their/cache \(a named tag\)")
    with pytest.raises(ckpt.CheckpointError, match=want):
        evaluate(tmp_path / "run", [f"model.pretrained={other}"])
    with pytest.raises(ClassifierError, match=r"pretrained image embeddings of the probe images differ" if perturbed
                       else r"pretrained text embeddings of these class names differ"):
        load_classifier(tmp_path / "run", overrides=[f"model.pretrained={other}"])
    assert evaluate(tmp_path / "run")["task"] == 1  # its own weights: fine
    assert len(load_classifier(tmp_path / "run").class_names) > 0
    assert main(["train", "--config", str(tmp_path / "run" / "config.yaml"), "--resume",
                 "--set", f"model.pretrained={other}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "give the run's own: --set model.pretrained=" in err


def test_a_resume_whose_checkpoints_folder_cannot_be_written_fails_before_training(tiny_model_name, tmp_path,
                                                                                   monkeypatch):
    """A read-only checkpoints/ in a writable run folder was found only after a whole task trained (its
    checkpoint's write failed), and a read-only run folder got "pick another folder with -o", which starts a
    new run rather than resuming: both are refused up front, with a fix that resumes."""
    crash_at_task(monkeypatch, task=1)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_model_name, tmp_path / "run"))
    monkeypatch.undo()
    checkpoints = tmp_path / "run" / "checkpoints"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != checkpoints and real_access(p, mode, **kw))
    trained = []
    monkeypatch.setattr(Trainer, "train_task", lambda self, t: trained.append(t))
    with pytest.raises(ConfigError, match=rf"run.output_dir: {checkpoints} is not writable; make it writable to "
                                          r"resume this run there \(chmod u\+w\), or copy the run"):
        train(small_config(tiny_model_name, tmp_path / "run", resume=True))
    assert trained == []
    with pytest.raises(ConfigError, match="pick another folder with -o"):  # a new run there: another folder
        train(small_config(tiny_model_name, tmp_path / "run", overwrite=True))


@pytest.mark.parametrize("where", ["stage1", "step"])
def test_a_progress_bar_is_closed_when_its_stage_fails(tiny_model_name, tmp_path, monkeypatch, where):
    """A bar left open on an error (a NaN loss, Ctrl-C) put the CLI's error message on the bar's line."""
    from segpcl_fast.engine import trainer as trainer_mod
    from segpcl_fast.method.learner import Learner
    bars = []

    class Bar:
        def __init__(self, total, desc, enabled):
            self.desc, self.closed = desc, False
            bars.append(self)

        def update(self, n):
            pass

        def set_postfix(self, values):
            pass

        def close(self):
            self.closed = True
    monkeypatch.setattr(trainer_mod, "_progress", Bar)

    def fail(*args, **kwargs):
        raise FloatingPointError("loss is nan")
    if where == "stage1":
        monkeypatch.setattr(Learner, "begin_task", fail)
    else:
        monkeypatch.setattr(Trainer, "train_step", fail)
    trainer = Trainer(small_config(tiny_model_name, tmp_path / "run", progress=True))
    with pytest.raises(FloatingPointError):
        trainer.train_task(1 if where == "stage1" else 0)
    assert bars and all(bar.closed for bar in bars), [(b.desc, b.closed) for b in bars]
