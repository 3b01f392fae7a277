"""Wall-clock of the trainer's evaluations over a whole run, on the CPU (the tiny default job).

    python benchmarks/eval_loader_time.py [--workers 2] [--out /tmp/eval_time_run]

Trains each task of the default config for one step (run.max_steps_per_task=1; what is timed is the
evaluation, not the training) and times `Trainer.evaluate_seen(t)` after each task: every seen test
set, the work a run does after each task. Prints the total seconds and the last evaluation's counts
(correct, correct_own, total) per task, to compare two versions of the evaluation loop bit for bit:
run it with PYTHONPATH pointing at each checkout. data.num_workers > 0 is where a loader per seen
test set started its workers once per set (55 start-ups in a 10-task run).
"""
import argparse
import time

import torch

from segpcl_fast.api import make_config
from segpcl_fast.engine.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="data.num_workers")
    p.add_argument("--out", default="/tmp/eval_time_run", help="run.output_dir (nothing is written there)")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = make_config(data__num_workers=args.workers, run__checkpoint=False, run__max_steps_per_task=1,
                      run__output_dir=args.out, run__progress=False)
    trainer = Trainer(cfg, writes=False)
    total, counts = 0.0, None
    for t in range(trainer.scenario.num_tasks):
        trainer.train_task(t)
        start = time.perf_counter()
        counts = trainer.evaluate_seen(t)
        total += time.perf_counter() - start
    print(f"{trainer.scenario.num_tasks} evaluations, data.num_workers={args.workers}: {total:.2f} s")
    print("last evaluation (correct, correct_own, total) per task:", counts)


if __name__ == "__main__":
    main()
