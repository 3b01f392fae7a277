"""run.tensorboard: a run's curves as TensorBoard event files (torch.utils.tensorboard), rank 0 only.

    <output_dir>/tensorboard/steps   loss/<term> (cls, acgd, tsgr, ... as the step computed them) and lr,
                                     x = training steps counted over the whole run (task 2 goes on
                                     where task 1 ended)
    <output_dir>/tensorboard/tasks   accuracy/task_NN (each learned task's test accuracy after every
                                     task), accuracy/seen_classes (all seen classes together, the run
                                     log's number) and accuracy/avg (the mean of the seen-classes
                                     accuracies so far: the paper's Avg once the run ends), x = tasks learned

`tensorboard --logdir runs/` shows several runs side by side. A resumed run writes on into the same
folders and drops what its killed part wrote after the last checkpoint (SummaryWriter's purge_step; a
resume with no finished task starts the curves over), so the curves hold each step once.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Mapping, Sequence

from ..config import ConfigError

TENSORBOARD_DIR = "tensorboard"


def check_tensorboard() -> None:
    """run.tensorboard=true without the tensorboard package: one ConfigError before anything loads."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("run.tensorboard=true writes TensorBoard event files and needs the tensorboard package: "
                          "pip install tensorboard (or segpcl_fast's extra [tensorboard]), or set run.tensorboard=false")


class TensorBoardLog:
    """The two writers of a run, each made at its first scalar (a run that trains no step, zeroshot, gets no
    steps/ file); `steps_done` / `tasks_done`: what the run has already written (a resume's start), from which
    each writer goes on. A run that starts at task 1 (a new one, or a resume with no finished task) starts
    without curves: the killed part's are removed."""

    def __init__(self, out: Path, steps_done: int, tasks_done: int):
        self.root = Path(out) / TENSORBOARD_DIR
        if not tasks_done:
            shutil.rmtree(self.root, ignore_errors=True)
        self.purge = {"steps": steps_done or None, "tasks": (tasks_done + 1) if tasks_done else None}
        self.writers: dict = {}
        self.step = steps_done  # the next step's x

    def _writer(self, name: str):
        if name not in self.writers:
            from torch.utils.tensorboard import SummaryWriter
            self.writers[name] = SummaryWriter(str(self.root / name), purge_step=self.purge[name])
        return self.writers[name]

    def log_step(self, parts: Mapping[str, float], lr: float) -> None:
        """One training step's loss terms ({} where this rank had no images) and learning rate."""
        steps = self._writer("steps")
        for term, value in parts.items():
            steps.add_scalar(f"loss/{term}", value, self.step)
        steps.add_scalar("lr", lr, self.step)
        self.step += 1

    def log_task(self, tasks_learned: int, per_task: Sequence[float], seen: float, avg: float) -> None:
        """After task `tasks_learned` (1-based): each learned task's accuracy (%), all seen classes', the Avg."""
        tasks = self._writer("tasks")
        for j, acc in enumerate(per_task):
            tasks.add_scalar(f"accuracy/task_{j + 1:02d}", acc, tasks_learned)
        tasks.add_scalar("accuracy/seen_classes", seen, tasks_learned)
        tasks.add_scalar("accuracy/avg", avg, tasks_learned)
        for writer in self.writers.values():  # a task's curves on disk at its end (SummaryWriter: every 2 min)
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
