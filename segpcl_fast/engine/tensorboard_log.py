"""run.tensorboard: a run's curves as TensorBoard event files (torch.utils.tensorboard), rank 0 only.

    <output_dir>/tensorboard/steps   loss/<term> (cls, acgd, tsgr, ... as the step computed them) and lr,
                                     x = training steps counted over the whole run (task 2 goes on
                                     where task 1 ended)
    <output_dir>/tensorboard/tasks   accuracy/task_NN (each learned task's test accuracy after every
                                     task), accuracy/seen_classes (all seen classes together, the run
                                     log's number) and accuracy/avg (the mean of the seen-classes
                                     accuracies so far: the paper's Avg once the run ends), x = tasks learned

`tensorboard --logdir runs/` shows several runs side by side. A resumed run writes on into the same
folders and drops what its killed part wrote after the last checkpoint (SummaryWriter's purge_step), so
the curves hold each step once.
"""
from __future__ import annotations

import importlib.util
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
    """The two writers of a run; `steps_done` / `tasks_done`: what the run has already written (a resume's
    start), from which each writer goes on."""

    def __init__(self, out: Path, steps_done: int, tasks_done: int):
        from torch.utils.tensorboard import SummaryWriter
        root = Path(out) / TENSORBOARD_DIR
        self.steps = SummaryWriter(str(root / "steps"), purge_step=steps_done or None)
        self.tasks = SummaryWriter(str(root / "tasks"), purge_step=(tasks_done + 1) if tasks_done else None)
        self.step = steps_done  # the next step's x

    def log_step(self, parts: Mapping[str, float], lr: float) -> None:
        """One training step's loss terms ({} where this rank had no images) and learning rate."""
        for term, value in parts.items():
            self.steps.add_scalar(f"loss/{term}", value, self.step)
        self.steps.add_scalar("lr", lr, self.step)
        self.step += 1

    def log_task(self, tasks_learned: int, per_task: Sequence[float], seen: float, avg: float) -> None:
        """After task `tasks_learned` (1-based): each learned task's accuracy (%), all seen classes', the Avg."""
        for j, acc in enumerate(per_task):
            self.tasks.add_scalar(f"accuracy/task_{j + 1:02d}", acc, tasks_learned)
        self.tasks.add_scalar("accuracy/seen_classes", seen, tasks_learned)
        self.tasks.add_scalar("accuracy/avg", avg, tasks_learned)
        self.steps.flush()  # a task's curves on disk at its end (SummaryWriter flushes every 2 minutes)
        self.tasks.flush()

    def close(self) -> None:
        self.steps.close()
        self.tasks.close()
