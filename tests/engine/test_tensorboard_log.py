"""run.tensorboard: the event files hold what the run computed (read back with tensorboard's own reader),
each step once across a resume, and the old run's curves go when a run replaces it."""
import time

import numpy as np
import pytest

from segpcl_fast import metrics
from segpcl_fast.api import train
from segpcl_fast.config import ConfigError
from segpcl_fast.engine.trainer import Trainer, lr_at

from run_cases import small_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _scalars(folder) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard shows them (a purged step's old events dropped)."""
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _next_second() -> None:
    """Wait for the next whole second. A reader takes a folder's event files in name order, and a name is
    events.out.tfevents.<seconds>.<host>.<pid>.<writers made in the process so far>: a crashed part and its resume
    in one process within one second sorted by that count as text ('10' before '9': the resumed part read first,
    task_01's steps [2, 1], once in the whole suite). A real resume is another process, seconds later."""
    time.sleep(1.02 - time.time() % 1)


def _expected_steps(result, cfg):
    """Per task: its step count and its lr at each step, from the run's own loss history."""
    counts = [sum(row["steps"] for row in task) for task in result.loss_per_epoch]
    lrs = [lr_at(s, n, cfg) for n in counts for s in range(n)]
    return counts, lrs


def test_curves_hold_the_runs_losses_lr_and_accuracies(tiny_model_name, tmp_path):
    cfg = small_config(tiny_model_name, tmp_path / "run", tensorboard=True, lr=0.01, schedule="cosine")
    result = train(cfg)
    steps = _scalars(tmp_path / "run" / "tensorboard" / "steps")
    counts, lrs = _expected_steps(result, cfg)
    assert len(counts) == 2 and all(counts)
    assert [s for s, _ in steps["lr"]] == list(range(sum(counts)))  # task 2 goes on where task 1 ended
    np.testing.assert_allclose([v for _, v in steps["lr"]], lrs, rtol=1e-6)
    for t, task in enumerate(result.loss_per_epoch):  # each epoch's mean is the mean of its steps' values
        first = sum(counts[:t])
        for term in set(task[0]) - {"epoch", "steps"}:
            values = [v for s, v in steps[f"loss/{term}"] if first <= s < first + counts[t]]
            assert len(values) == counts[t]
            assert np.mean(values) == pytest.approx(task[0][term], rel=1e-5, abs=1e-6)
    assert {"loss/cls", "loss/acgd", "loss/gr"} <= set(steps)  # task 2's terms too
    tasks = _scalars(tmp_path / "run" / "tensorboard" / "tasks")
    matrix = metrics.matrix_from_list(result.accuracy_matrix)
    assert [s for s, _ in tasks["accuracy/task_01"]] == [1, 2] and [s for s, _ in tasks["accuracy/task_02"]] == [2]
    np.testing.assert_allclose([v for _, v in tasks["accuracy/task_01"]], matrix[:, 0], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in tasks["accuracy/task_02"]], [matrix[1, 1]], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in tasks["accuracy/seen_classes"]], result.acc_per_task, rtol=1e-6)
    assert tasks["accuracy/avg"][-1][1] == pytest.approx(result.metrics["Avg"], rel=1e-6)


def test_a_resumed_run_holds_each_step_once(tiny_model_name, tmp_path, monkeypatch):
    full = train(small_config(tiny_model_name, tmp_path / "full", tensorboard=True))
    original = Trainer.evaluate_seen

    def killed_after_training_task_2(self, t):  # task 2's steps are written, its checkpoint is not
        if t == 1:
            raise KeyboardInterrupt("simulated crash")
        return original(self, t)
    monkeypatch.setattr(Trainer, "evaluate_seen", killed_after_training_task_2)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_model_name, tmp_path / "resumed", tensorboard=True))
    monkeypatch.undo()
    total = sum(_expected_steps(full, small_config(tiny_model_name, tmp_path / "x"))[0])
    crashed = _scalars(tmp_path / "resumed" / "tensorboard" / "steps")
    assert [s for s, _ in crashed["lr"]] == list(range(total))  # both tasks' steps, before the crash
    _next_second()
    resumed = train(small_config(tiny_model_name, tmp_path / "resumed", tensorboard=True, resume=True))
    assert resumed.accuracy_matrix == full.accuracy_matrix
    steps = _scalars(tmp_path / "resumed" / "tensorboard" / "steps")
    assert [s for s, _ in steps["lr"]] == list(range(total))  # each once: the crashed part's task 2 dropped
    want = _scalars(tmp_path / "full" / "tensorboard" / "steps")
    for tag in want:
        np.testing.assert_allclose([v for _, v in steps[tag]], [v for _, v in want[tag]], rtol=1e-5, err_msg=tag)
    tasks = _scalars(tmp_path / "resumed" / "tensorboard" / "tasks")
    assert [s for s, _ in tasks["accuracy/task_01"]] == [1, 2]


def test_a_replaced_run_takes_its_curves_along(tiny_model_name, tmp_path):
    train(small_config(tiny_model_name, tmp_path / "run", tensorboard=True))
    train(small_config(tiny_model_name, tmp_path / "run", num_tasks=1, overwrite=True))  # no curves of its own
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_without_the_tensorboard_package_the_run_is_refused_before_anything_loads(tiny_model_name, tmp_path,
                                                                                  monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    built = []
    monkeypatch.setattr(Trainer, "_build", lambda self, *a: built.append(1))
    with pytest.raises(ConfigError, match="run.tensorboard=true .* needs the tensorboard package: pip install"):
        Trainer(small_config(tiny_model_name, tmp_path / "run", tensorboard=True))
    assert not built and not (tmp_path / "run").exists()


def test_a_resume_with_no_finished_task_starts_the_curves_over(tiny_model_name, tmp_path, monkeypatch):
    """Killed in task 1, --resume starts at task 1 again: the killed part's steps were kept beside the new ones
    (purge_step had nothing to purge from: a review's finding)."""
    from segpcl_fast.engine.tensorboard_log import TensorBoardLog
    original = TensorBoardLog.log_step

    def killed_at_step_2(self, parts, lr):
        original(self, parts, lr)
        if self.step == 2:
            raise KeyboardInterrupt("simulated crash")
    monkeypatch.setattr(TensorBoardLog, "log_step", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_model_name, tmp_path / "run", tensorboard=True))
    monkeypatch.undo()
    assert [s for s, _ in _scalars(tmp_path / "run" / "tensorboard" / "steps")["lr"]] == [0, 1]
    _next_second()
    result = train(small_config(tiny_model_name, tmp_path / "run", tensorboard=True, resume=True))
    total = sum(_expected_steps(result, small_config(tiny_model_name, tmp_path / "x"))[0])
    assert [s for s, _ in _scalars(tmp_path / "run" / "tensorboard" / "steps")["lr"]] == list(range(total))
    files = sorted((tmp_path / "run" / "tensorboard").rglob("events.*"))
    train(small_config(tiny_model_name, tmp_path / "run", tensorboard=True, resume=True))  # finished: nothing trains
    assert sorted((tmp_path / "run" / "tensorboard").rglob("events.*")) == files  # and no new, empty event files


def test_a_run_without_training_steps_writes_no_step_curves(tiny_model_name, tmp_path):
    result = train(small_config(tiny_model_name, tmp_path / "run", tensorboard=True, method="zeroshot"))
    assert not (tmp_path / "run" / "tensorboard" / "steps").exists()
    tasks = _scalars(tmp_path / "run" / "tensorboard" / "tasks")
    np.testing.assert_allclose([v for _, v in tasks["accuracy/seen_classes"]], result.acc_per_task, rtol=1e-6)
