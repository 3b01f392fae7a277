"""Public entry points: train(config | **overrides) -> Result, evaluate(run_dir) -> dict, ablate(...)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from .config import (Config, ConfigError, analysis_config, apply_overrides, check_data_root, check_resume_dir,
                     check_resume_run, check_task_count, config_from_dict, did_you_mean, join_some, known_keys,
                     kwargs_to_overrides, load_config, map_kwargs, override_key, refuse_decided_keys, runs_below, task_count)

ConfigLike = Union[Config, dict, str, os.PathLike, None]


def override_list(overrides: Union[str, Sequence[str], None]) -> list[str]:
    """Overrides as a list: one string ("run.device=cpu") is one override, not a sequence of characters."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides are 'key=value' strings, got {list(overrides)!r}")
    return list(overrides)


@contextlib.contextmanager
def process_state_kept():
    """What a Trainer sets for its run (ops backend, torch threads, TF32 for CUDA matmuls, the torch / numpy
    / random seeds, float32 as torch's default dtype), given back afterwards: for calls that only read a run
    (evaluate). CUDA's generators are given back on the devices already started; a seed queued before CUDA
    starts is the run's afterwards where the call seeds CUDA (a Trainer does; load_classifier does not): keeping
    it would mean starting every GPU, or torch's private lazy-seed queue."""
    import random

    import numpy as np
    import torch

    from . import ops
    from .model.tf32 import cuda_matmul_tf32, set_cuda_matmul_tf32
    from .model.clip import float32_default
    backend, threads, tf32 = ops.get_backend(), torch.get_num_threads(), cuda_matmul_tf32()
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with random_streams_kept(), float32_default():  # the run's tensors float32 whatever the caller's default
            yield
    finally:
        ops.set_backend(backend)
        torch.set_num_threads(threads)
        set_cuda_matmul_tf32(tf32)
        np.random.set_state(np_state)
        random.setstate(py_state)


def random_streams_kept():
    """torch.random.fork_rng over the CPU generator and those of the CUDA devices already started (forking a
    device's generator starts that device): the caller's random streams given back after the block."""
    import torch
    return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else [])


def make_config(config: ConfigLike = None, overrides: Optional[Sequence[str]] = None, **kwargs: Any) -> Config:
    """Config from a Config, a nested dict, a YAML path or preset name, plus overrides.

    kwargs are flat keys (`lr=1e-3`, `k_adv=5`) or dotted keys spelled with '__' (`dpgd__k_adv=5`).
    """
    if config is None:
        cfg = Config()
    elif isinstance(config, Config):  # built or edited in code: checked like any other config, and copied
        cfg = config_from_dict(dataclasses.asdict(config))
    elif isinstance(config, dict):
        cfg = config_from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        cfg = load_config(config)
    else:
        raise ConfigError(f"config must be a Config, dict, YAML path or preset name, got {type(config).__name__}")
    if overrides:
        cfg = apply_overrides(cfg, override_list(overrides))
    if kwargs:  # every bad keyword in one error: the unknown ones and the values of the known ones
        mapped, problems = map_kwargs(kwargs)
        try:
            cfg = apply_overrides(cfg, mapped)
        except ConfigError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError("; ".join(problems))
    return check_data_root(check_task_count(cfg))


def keeps_process_state(fn):
    """fn inside process_state_kept: the analyses that build Trainers give the caller's state back."""
    @functools.wraps(fn)
    def kept(*args, **kwargs):
        from .engine.checkpoint import resuming_analysis
        with process_state_kept(), resuming_analysis(fn.__name__.replace("_", "-")):  # retention, distill-sources, ...
            return fn(*args, **kwargs)
    return kept


def train(config: ConfigLike = None, **overrides: Any):
    """Run the class-incremental sequence; returns a Result (accuracy matrix, metrics, paths).

        result = segpcl_fast.train()                                  # offline world, SeGP-CL
        result = segpcl_fast.train("cifar100", data__root="/data")    # a paper preset
        result = segpcl_fast.train(method="lora_finetune", epochs=2)
    """
    from .engine.trainer import Trainer
    cfg = make_config(config, **overrides)
    if cfg.run.resume and "run.output_dir" not in kwargs_to_overrides(overrides):
        check_resume_target(config, cfg)
    check_before_run(cfg)
    with process_state_kept():  # a later call (train without run.num_threads, say) starts from the caller's state
        return Trainer(cfg).run()


def check_before_run(cfg: Config) -> None:
    """What a run refuses before the model and data load, and before the CLI's header line: a refused
    --resume, a new run into a folder that holds a run, run.device=cuda without a GPU, a model name open_clip
    does not know. (Trainer.run asks the folder questions again when it claims the folder.)"""
    from .engine.trainer import check_new_run_dir, resolve_device
    from .model.clip import check_model_name
    check_resume_run(cfg)
    check_new_run_dir(cfg)
    resolve_device(cfg.run.device)
    check_model_name(cfg.model.name)


def check_resume_target(config: ConfigLike, cfg: Config) -> None:
    """Resuming from `<dir>/config.yaml` of a run copied or moved to <dir>, without naming the output
    dir, would resume (and write into) the dir recorded in that file, not <dir>: refuse, naming both."""
    if not isinstance(config, (str, os.PathLike)) or Path(config).name != "config.yaml" or not Path(config).is_file():
        return
    folder = Path(config).resolve().parent
    target = Path(cfg.run.output_dir).expanduser().resolve()
    if (folder / "checkpoints").is_dir() and folder != target:
        raise ConfigError(f"resuming with {config}, a run's config whose run.output_dir is {cfg.run.output_dir}, not "
                          f"the folder it lies in ({folder}): resume that folder with -o {folder} "
                          f"(train(..., run__output_dir=...)), or the recorded one with -o {cfg.run.output_dir}")


def start_table_files(out: str | os.PathLike, name: str, planned: Iterable[Config], *, resume: bool) -> None:
    """Before an analysis trains: each run it plans (their configs) must be one its trainer will take
    (engine.trainer.check_new_run_dir: a new run into a folder holding a run is refused, naming --resume),
    then the earlier <name>.{json,txt,png} go (report.results.clear_table_files), unless the analysis resumes
    (`resume`: its run.resume; its unstarted runs start afresh): a --resume continues the runs those tables describe (or adds runs, which the tables do not list) and writes
    them again when it finishes, and its config may still be refused by the runs' checkpoints, which a resume
    with the right config then rebuilds the tables from. Refused, nothing is removed: a finished analysis run
    again without --resume kept its runs and lost its tables."""
    from .engine.trainer import check_new_run_dir
    from .report.results import clear_table_files
    for cfg in planned:
        run = Path(cfg.run.output_dir)
        below = runs_below(run) if run.is_dir() and not (run / "config.yaml").is_file() else []
        if below:  # retention -o <an ablation's folder>: its run <out>/lora_finetune holds ablate's seed<N>/ runs
            raise ConfigError(f"{name}: its run folder {run} holds another analysis' runs ({join_some(below)}): "
                              f"give {name} a folder of its own (-o {str(out).rstrip('/')}-{name})")
        check_new_run_dir(cfg)
    if not resume:
        clear_table_files(out, name)


def entries(value) -> Optional[list]:
    """An analysis' list argument (variants=, sources=, datasets=, axes=, fixed=, tasks=) as a list: one string or
    one number is one entry (a string was taken apart into its characters: variants="segpcl" ran into "unknown
    method variant 's'"; a number raised a bare TypeError); None stays None (the default)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, int, float)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def seed_entries(seeds, what: str) -> list[int]:
    """seeds= of an analysis as a list of ints: one int is one seed (seeds=0 was 'needs at least one seed' or a
    TypeError); anything that is not a whole number (a string "0,1", 1.5) is one ConfigError naming the form."""
    import numbers
    values = entries(seeds) or []
    out = []
    for s in values:
        whole = isinstance(s, numbers.Integral) and not isinstance(s, bool)
        if isinstance(s, str) and s.strip().lstrip("-").isdigit():
            s, whole = int(s), True
        if not whole:
            raise ConfigError(f"{what} takes seeds as whole numbers, e.g. seeds=[0, 1, 2]; got {seeds!r}")
        out.append(int(s))
    return out


def check_unique(items: Iterable, what: str) -> None:
    """One ConfigError for an entry given twice (each would run into the same folder)."""
    seen: set = set()
    for item in items:
        if item in seen:
            raise ConfigError(f"{what} {item!r} is given twice: both would run in the same folder; give it once")
        seen.add(item)


# what evaluate() may change about how a run is evaluated (nothing that changes the model or the data:
# a moved data root must hold the same classes in the same order, checked against the checkpoint)
EVALUATE_OVERRIDABLE = ("run.device", "run.ops", "run.compile", "run.tf32", "run.num_threads", "run.progress",
                        "eval.batch_size", "data.num_workers", "data.root", "data.frames_dir", "model.cache_dir",
                        "data.names_file", "data.class_list", "data.split_file", "model.pretrained")
_WRITES_NOTHING = "evaluate writes nothing into the run (it may lie in a read-only folder): this key sets what train writes"
# why evaluate refuses the run-only keys it does not take (the other keys: it would not be the run that was trained)
EVALUATE_REFUSALS = {**dict.fromkeys(("run.plots", "run.tensorboard", "run.checkpoint", "run.resume", "run.overwrite"),
                                     _WRITES_NOTHING),
                     "run.output_dir": "evaluate reads the run at its run_dir argument (RUN on the command line)",
                     "dpgd.batch_size": "evaluate runs no DPGD (the anchors of stage 1 are made only when a task trains)",
                     "data.expected_classes": "the run's checkpoint fixes its classes (evaluate checks the data's "
                                              "class names against it)"}


def evaluate(run_dir: Union[str, os.PathLike], overrides: Optional[Sequence[str]] = None, *, all_tasks: bool = False,
             **kwargs: Any) -> dict:
    """Re-evaluate a finished (or interrupted) run from its last checkpoint.

    Returns {"task": last finished task (1-based), "num_tasks": the run's task count (more than "task": an
    unfinished run), "acc_per_task_j": [...], "acc": accuracy on all seen test images} computed now, with the
    dual-path logits of the checkpointed state.
    all_tasks=True (CLI --all-tasks) evaluates every finished task t from its own checkpoint, as the run
    did after training it: the dict also holds the accuracy matrix a[t][j] (and its own-space twin),
    acc_per_task, fwt_before (where the run's config has eval.fwt: the CLIP path on task t from task
    t-1's checkpoint), the metrics (Avg, Last, Forgetting, BWT, FWT, Forgetting_own over the finished
    tasks) and "run_matrix_max_diff", the largest |a[t][j] now - as the run recorded it| in points.
    `overrides` ("run.ops=cpp") and kwargs (run__device="cuda") may set how it runs: the keys in
    EVALUATE_OVERRIDABLE (device, ops backend, compile, TF32, threads, batch size, loader workers, and
    where the data and weights now lie).

        segpcl_fast.evaluate("runs/default", run__ops="reference")
    """
    from .data.build import ClassCountError
    from .engine import checkpoint as ckpt
    from .engine.trainer import Trainer
    from .metrics import percent
    run_dir = Path(run_dir)
    if run_dir.is_file():
        owner = run_dir.parent.parent if run_dir.parent.name == "checkpoints" else run_dir.parent
        raise FileNotFoundError(f"{run_dir} is a file: evaluate() takes a run directory (train's output_dir)"
                                + (f", e.g. {owner}" if (owner / "config.yaml").is_file() else ""))
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist: evaluate() takes the output_dir of a train() run")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        runs = runs_below(run_dir)
        raise FileNotFoundError(f"{cfg_path} not found: evaluate() takes the output_dir of a train() run"
                                + (f"; runs below it: {join_some(runs)}" if runs else ""))
    strings, keyed = override_list(overrides), kwargs_to_overrides(kwargs)
    for key in [override_key(change) for change in strings] + list(keyed):
        if key not in known_keys():  # a typo is a typo, not a key evaluate may not change
            raise ConfigError(f"unknown config key '{key}'{did_you_mean(key)}; evaluate can set "
                              f"{', '.join(EVALUATE_OVERRIDABLE)}")
        if key not in EVALUATE_OVERRIDABLE:
            reason = EVALUATE_REFUSALS.get(key, "it would not be the run that was trained")
            raise ConfigError(f"evaluate() cannot override '{key}': {reason}; it can set "
                              f"{', '.join(EVALUATE_OVERRIDABLE)}")
    cfg = load_config(cfg_path)
    for changes in (strings, keyed):
        if changes:
            cfg = apply_overrides(cfg, changes)
    given = [override_key(change) for change in strings] + list(keyed)  # a stored root (an older run's) is not
    if cfg.data.dataset == "synthetic" and cfg.data.root and "data.root" in given:  # train's check_data_root
        raise ConfigError(f"data.root is {cfg.data.root}, but {run_dir} trained on the offline world (data.dataset "
                          f"'synthetic'), which reads no files: evaluate it without data.root")
    last = ckpt.find_last_checkpoint(run_dir)
    if last is None:
        from .classifier import no_checkpoint_reason
        raise FileNotFoundError(no_checkpoint_reason(run_dir))
    if all_tasks:  # before any data or weights load
        _task_checkpoints(run_dir, ckpt.task_of_file(last) + 1)
    with process_state_kept():  # the caller's ops backend, threads and random streams are left as they were
        try:
            # evaluation reads the run (it may lie in a read-only folder) and trains nothing
            trainer = Trainer(cfg, writes=False, trains=False)
        except ClassCountError as e:  # its fix, data.expected_classes, is not one evaluate can make
            raise e.for_trained_run("segpcl-fast evaluate RUN --set data.root=PATH; evaluate(run_dir, data__root=PATH)") from None
        # (--all-tasks restores each task's checkpoint in turn)
        state = trainer.restore_checkpoint(last, purpose="evaluate", restore=not all_tasks)
        if all_tasks:
            return _evaluate_every_task(run_dir, trainer, state)
        counts = trainer.evaluate_seen(state["task"])
    return {"task": state["task"] + 1, "num_tasks": task_count(cfg.data),
            "acc_per_task_j": [percent(c, n) for c, _, n in counts],
            "acc": percent(sum(c for c, _, _ in counts), sum(n for _, _, n in counts))}


def _task_checkpoints(run_dir: Path, done: int) -> list[Path]:
    """checkpoints/task_NN.pt of tasks 1..done, every one of them (one error naming those missing)."""
    from .engine import checkpoint as ckpt
    paths = [ckpt.checkpoint_path(run_dir, t) for t in range(done)]
    missing = [str(t + 1) for t, path in enumerate(paths) if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} has no checkpoint of task(s) {join_some(missing)} (checkpoints/task_NN.pt): "
                                "evaluating every task needs each task's own checkpoint; evaluate without --all-tasks "
                                "(all_tasks=False) re-evaluates the last one")
    return paths


def _evaluate_every_task(run_dir: Path, trainer, last_state: dict) -> dict:
    """evaluate(all_tasks=True): tasks 1..T' (T' = the last finished) each from its own checkpoint."""
    import numpy as np

    from . import metrics
    done = last_state["task"] + 1
    paths = _task_checkpoints(run_dir, done)
    cfg = trainer.cfg
    correct, correct_own = np.full((done, done), np.nan), np.full((done, done), np.nan)
    fwt_before: list = [None] * done
    counts = []
    for t, path in enumerate(paths):
        trainer.restore_checkpoint(path, purpose="evaluate")
        counts = trainer.evaluate_seen(t)
        for j, (c, c_own, _) in enumerate(counts):
            correct[t, j], correct_own[t, j] = c, c_own
        if cfg.eval.fwt and t + 1 < done:  # as the run measured it: before task t + 1, after task t
            fwt_before[t + 1] = trainer.forward_transfer(t + 1)
    totals = [n for _, _, n in counts]
    matrix, matrix_own = metrics.accuracy_matrix(correct, totals), metrics.accuracy_matrix(correct_own, totals)
    acc = metrics.acc_per_task(correct, totals)
    recorded = np.asarray(last_state["correct"], dtype=np.float64)[:done, :done]
    lower = np.tril(np.ones((done, done), dtype=bool))
    recorded_pct = np.where(lower, recorded, 0.0) * 100.0 / np.asarray(totals, dtype=np.float64)[None, :]
    return {"task": done, "num_tasks": task_count(cfg.data),
            "acc_per_task_j": matrix[-1].tolist(),
            "acc": float(acc[-1]),
            "accuracy_matrix": metrics.matrix_to_list(matrix),
            "accuracy_matrix_own": metrics.matrix_to_list(matrix_own),
            "acc_per_task": acc.tolist(),
            "fwt_before": fwt_before,
            "metrics": metrics.summarize(matrix, acc, fwt_before if cfg.eval.fwt else None, matrix_own),
            "run_matrix_max_diff": float(np.abs(np.where(lower, matrix, 0.0) - recorded_pct).max()),
            "config": cfg.to_dict()}


# Forgetting_own: forgetting within each task's own label space (metrics.forgetting_own_space)
ABLATION_METRICS = ("Avg", "Last", "Forgetting", "BWT", "FWT", "Forgetting_own")


def ablate(config: ConfigLike = None, variants: Optional[Sequence[str]] = None,
           seeds: Sequence[int] = (0,), **overrides: Any) -> dict:
    """Run method variants (default: the ablation ladder) on one scenario, over seeds.

    Writes <output_dir>/ablation.json, ablation.txt (table of mean +- std of Avg, Last, Forgetting,
    BWT, FWT, Forgetting_own) and ablation.png (acc_t curves of each variant, mean +- std over the seeds) and returns
    {"rows": [...], "runs": {variant: [Result, ...]}, "paths": {...}}.
    """
    from .report.results import write_table_files
    from .method.variants import LADDER, check_variants, variant_overrides
    from .report import format_metrics_table, metric_columns, plus_minus
    from .engine.distributed import refuse_multi_process
    refuse_multi_process("the ablation")
    refuse_decided_keys("ablate()", overrides, {"run.method": "it runs every variants entry: pass variants=['segpcl']",
                                                "run.seed": "it runs every seeds entry: pass seeds=[1]"})
    cfg = analysis_config(make_config(config, **overrides), "ablate")
    variants = entries(variants) or list(LADDER)
    seeds = seed_entries(seeds, "ablate()")
    for name in variants:
        variant_overrides(name)  # unknown names fail before anything runs
    check_unique(variants, "variant")
    if not seeds:
        raise ConfigError("ablate() needs at least one seed (seeds=[0])")
    check_unique(seeds, "seed")
    check_variants(cfg, variants, "ablate")  # every variant's clash with the config before the first one trains
    check_resume_dir(cfg)
    out = Path(cfg.run.output_dir)

    def run_config(name: str, seed: int):
        run_dir = out / name.replace("+", "plus_") / f"seed{seed}"
        # run.resume continues an interrupted ablation: runs not started yet start
        return apply_overrides(cfg, {"run.method": name, "run.seed": int(seed), "run.output_dir": str(run_dir),
                                     "run.resume": cfg.run.resume and run_dir.is_dir()})
    keys = {name: _training_key(cfg, name) for name in variants}  # what each variant computes
    trained = {}  # such a key -> the first variant that trains it
    for name in variants:
        trained.setdefault(keys[name], name)

    def started(name: str) -> bool:
        return any((out / name.replace("+", "plus_") / f"seed{seed}").is_dir() for seed in seeds)
    if cfg.run.resume:  # an equal variant's runs already there (an earlier --variants segpcl) continue, not train anew
        for name in variants:
            if not started(trained[keys[name]]) and started(name):
                trained[keys[name]] = name
    start_table_files(out, "ablation", [run_config(name, seed) for name in trained.values() for seed in seeds],
                      resume=cfg.run.resume)
    from .engine.checkpoint import resuming_analysis
    runs, rows = {}, []
    for name in variants:
        same_as = trained[keys[name]]  # e.g. onlyclip is +prototype_transfer's config: its runs are reused
        if same_as not in runs:  # trained at the first variant of its key (the one trained may come later)
            with resuming_analysis("ablate"):  # a refused resume names ablate's command, not one run's config
                runs[same_as] = [train(run_config(same_as, seed)) for seed in seeds]
        runs[name] = runs[same_as]
        row = {"method": name if same_as == name else f"{name} (= {same_as})", "seeds": len(seeds),
               **metric_columns([r.metrics for r in runs[name]], ABLATION_METRICS)}
        rows.append(row)
    table = format_metrics_table(
        [{"method": r["method"], **{k: plus_minus(r[k], r[k + "_std"], len(seeds), r[k + "_n"])
                                    for k in ABLATION_METRICS}} for r in rows],
        title=f"ablation on {cfg.data.dataset} ({len(seeds)} seed(s), mean +- sample std, accuracies in %)")
    runs = {n: runs[n] for n in variants}  # in the variants' order (the JSON, the plot, the result)
    paths = write_table_files(out, "ablation", {"rows": rows, "seeds": list(seeds), "config": cfg.to_dict(),
                                                "runs": {n: [r.output_dir for r in rs] for n, rs in runs.items()}},
                              table, plots=cfg.run.plots)
    if cfg.run.plots:
        from .report import plots
        import numpy as np
        # each curve under its row's label: a variant that reuses another's runs ("segpcl (= +visual_branch)")
        # draws over that one's line, which its bare name in the legend left unexplained
        label = {name: row["method"] for name, row in zip(variants, rows)}
        curves = {label[n]: np.mean([r.acc_per_task for r in runs[n]], axis=0) for n in variants}
        spread = {label[n]: np.std([r.acc_per_task for r in runs[n]], axis=0, ddof=1) for n in variants} \
            if len(seeds) > 1 else None
        over = f"mean +- sample std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
        paths["png"] = str(plots.plot_acc_curves(curves, out / "ablation.png", errors=spread,
                                                 title=f"ablation: acc per task ({cfg.data.dataset}, {over})"))
    return {"rows": rows, "runs": runs, "paths": paths, "table": table}


def _training_key(cfg, name: str) -> str:
    """What variant `name` computes, as text: two variants with the same key give the same runs."""
    import json

    from .method.variants import resolve_variant
    resolved = resolve_variant(apply_overrides(cfg, {"run.method": name})).to_dict()
    resolved["run"].pop("method", None)
    return json.dumps(resolved, sort_keys=True, default=str)
