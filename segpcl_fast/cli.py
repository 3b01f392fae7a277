"""segpcl-fast: SeGP-CL continual learning for CLIP (train, evaluate, use, analyse, profile).

Thin: parse, call the API, print.

    segpcl-fast train                                   # offline world, SeGP-CL, <= 5 min on 2 cores
    segpcl-fast train --config cifar100 --set data.root=/data/cifar --set run.output_dir=runs/c100
    segpcl-fast train --config runs/c100/config.yaml --resume
    segpcl-fast evaluate runs/c100
    segpcl-fast predict runs/c100 cat.jpg photos/ --topk 5  # the trained run as a classifier
    segpcl-fast export runs/c100 -o c100_model.pt        # LoRA merged into plain open_clip weights
    segpcl-fast export runs/c100 --peft -o c100_adapter   # the LoRA adapters as a peft adapter directory
    segpcl-fast ablate --seeds 0,1,2 -o runs/ablation  # the ladder zeroshot -> ... -> segpcl, one table
    segpcl-fast fragility -o runs/fragility             # boundary vs core JSD across each task
    segpcl-fast retention --variants lora_finetune,segpcl --datasets food101=/data/food-101
    segpcl-fast sweep --set dpgd.k_adv=5,10,20 --seeds 0,1 -o runs/k_adv
    segpcl-fast distill-sources --sources anchors,new_data,seeds,folder --folder /data/ref_images
    segpcl-fast anchor-views --task 2 --projection pca
    segpcl-fast profile --steps 5 -o runs/profile          # torch.profiler trace + top kernels + stages
    segpcl-fast env                                     # versions, devices, which path each fused op takes
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, override_key
from .version import __version__

if TYPE_CHECKING:
    from .config import Config


def _add_config_args(p: argparse.ArgumentParser, method: bool = True, seed: bool = True,
                     resume: bool = True, method_help: str = "") -> None:
    """method / seed False (a subcommand with --variants / --seeds instead): the option stays parseable,
    to be refused with the fix (_refuse_run_options), but is left out of --help."""
    p.add_argument("--config", "-c", default=None,
                   help="YAML file or preset name in configs/ (cifar100, imagenet-r, ...); default: offline world")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set dpgd.k_adv=5 (repeatable)")
    p.add_argument("--output-dir", "-o", default=None, help="same as --set run.output_dir=...")
    p.add_argument("--method", default=None, help=(method_help or "same as --set run.method=... (segpcl, "
                                                                  "lora_finetune, ...)") if method else argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=None, help="same as --set run.seed=..." if seed else argparse.SUPPRESS)
    p.add_argument("--hw", default=None, metavar="PRESET",
                   help="hardware preset laid over the config before --set: 1gpu, 2x4090 (configs/<preset>.yaml)")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue the run(s) in the output dir after their "
                                                             "last finished task (same as --set run.resume=true)")


def _config_from_args(args) -> "Config":
    from .api import make_config
    overrides = list(args.overrides)
    _refuse_shorthand_conflicts(args, overrides, "--set")
    if args.output_dir is not None:  # -o "" reaches the validator and is refused, not ignored
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.method:
        overrides.append(f"run.method={args.method}")
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    if getattr(args, "resume", False):
        overrides.append("run.resume=true")
    if getattr(args, "hw", None):
        from .config import keys_set_by_user_file, override_key
        from .engine.presets import apply_preset, get_preset, replaced_by_preset
        before = make_config(args.config)
        cfg = make_config(apply_preset(before, args.hw), overrides)
        preset = get_preset(args.hw)
        given = {override_key(change) for change in overrides}  # a key --set names is the user's own choice
        replaced = replaced_by_preset(keys_set_by_user_file(args.config) - given, before, cfg, args.hw)
        if replaced:  # --hw lays its keys over the config file's: say which of the file's own values it replaced
            logging.getLogger("segpcl_fast").warning(
                "--hw %s replaces what %s sets: %s; to keep yours add %s", args.hw, args.config,
                ", ".join(f"{k} {old} -> {new}" for k, old, new in replaced),
                " ".join(f"--set {k}={old}" for k, old, _ in replaced))
        import torch
        if cfg.run.device != "cpu" and not torch.cuda.is_available():  # every preset is for CUDA GPUs
            raise ConfigError(f"--hw {args.hw} is a preset for CUDA GPUs ({preset.notes}), but no CUDA device is "
                              f"available here: drop --hw (its torch.compile, bf16 and {cfg.data.num_workers} loader "
                              f"workers are for a GPU; on a CPU they only slow a run down), or, to try them here "
                              f"anyway, --set run.device=cpu")
        if preset.nproc_per_node > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            logging.getLogger("segpcl_fast").warning(
                "--hw %s is a %d-process preset, but this is one process: its global batch runs on one device; "
                "launch it as %s", args.hw, preset.nproc_per_node, preset.launch_command(
                    args.config or "<config>", "[options]"))
    else:
        cfg = make_config(args.config, overrides)
    if getattr(args, "resume", False) and args.output_dir is None:  # an explicit -o says which dir
        from .api import check_resume_target
        check_resume_target(args.config, cfg)
    args.checkpointing = cfg.run.checkpoint  # what an interruption's hint says (main)
    return cfg


def _refuse_shorthand_conflicts(args, changes: list[str], option: str) -> None:
    """A shorthand (-o, --method, --seed) and a KEY=VALUE option (`option`: --set, sweep's --fixed) that
    set the same key: one of the two would be dropped without a word (the later one won)."""
    shorthands = {"run.output_dir": ("-o", args.output_dir), "run.method": ("--method", args.method),
                  "run.seed": ("--seed", args.seed)}
    for change in changes:
        flag, value = shorthands.get(override_key(change), (None, None))
        if value is not None:
            raise ConfigError(f"{flag} {value} and {option} {change} both set {override_key(change)}: give one of them")


def _refuse_run_options(args, method_fix: str = "", seed_fix: str = "") -> None:
    """--method / --seed, or --set (sweep: --fixed) run.method / run.seed, where a subcommand's own
    option (--variants, --seeds) decides: an error with the fix, not an option accepted and then ignored."""
    overrides = list(args.overrides or []) + list(getattr(args, "fixed", None) or [])
    keys = {override_key(o) for o in overrides}
    set_seeds = [o.split("=", 1)[1] for o in overrides if override_key(o) == "run.seed" and "=" in o]
    seed_fix = seed_fix.format(seed=args.seed if args.seed is not None else (set_seeds[-1] if set_seeds else "N"))
    given = [f"{option} ({fix})" for name, value, fix in (("method", args.method, method_fix),
                                                          ("seed", args.seed, seed_fix)) if fix
             for option in ([f"--{name}"] if value is not None else []) + (
                 [f"run.{name}"] if f"run.{name}" in keys else [])]
    if given:
        raise ConfigError(f"{args.command} does not take {' or '.join(given)}")


def _print_result(result) -> None:
    from .report import format_run_summary
    print(format_run_summary(result))


def cmd_train(args) -> int:
    from .api import check_before_run, train
    cfg = _config_from_args(args)
    check_before_run(cfg)  # a refused run (resume, folder, device, model name) is the only line, not after a header
    if _rank0():  # torchrun: one header, from rank 0
        print(f"segpcl-fast train: method={cfg.run.method} dataset={cfg.data.dataset} model={cfg.model.name} "
              f"tasks={cfg.data.num_tasks} -> {cfg.run.output_dir}", flush=True)
    result = train(cfg)
    from .engine.distributed import destroy
    destroy()  # under torchrun: leave the process group cleanly
    if _rank0():  # torchrun: rank 0 reports
        _print_result(result)
    return 0


def _leave_process_group(after_error: bool = False) -> None:
    """torchrun: leave the process group, if this process joined one (after a command, or an error every
    rank met; else gloo's threads can abort the exit: "terminate called ...", SIGABRT). Not after Ctrl-C
    or an unexpected error, where a collective may still be in flight. Through engine.distributed.destroy,
    as train's own call: after a command, on torch < 2.8, it lets gloo's outstanding work finish first
    (calling torch's destroy_process_group directly, `evaluate` under torchrun hung at exit on torch 2.6,
    1 run of 3 here, 3 of 3 in session 43); after an error it does not (see destroy)."""
    if _joined():
        from .engine.distributed import destroy
        destroy(after_error=after_error)


def _rank0() -> bool:
    """This process is rank 0 of torchrun, or runs alone."""
    return os.environ.get("RANK", "0") == "0"


def cmd_evaluate(args) -> int:
    from .api import evaluate
    out = evaluate(args.run_dir, args.overrides, all_tasks=args.all_tasks)
    if not _rank0():  # torchrun: the ranks share the counts; rank 0 reports
        return 0
    if out["task"] < out["num_tasks"]:  # numbers easily taken for a finished run's
        run = Path(args.run_dir)
        if (run / "results.json").is_file():  # finished, its later tasks saved no checkpoint (run.checkpoint=false)
            print(f"the run's checkpoints end at task {out['task']} of its {out['num_tasks']} (the later tasks saved "
                  f"none; results.json holds the finished run's numbers); the numbers below are after task "
                  f"{out['task']}")
        else:
            print(f"unfinished run: {out['task']} of its {out['num_tasks']} tasks trained (segpcl-fast train --config "
                  f"{shlex.quote(str(run / 'config.yaml'))} --resume -o {shlex.quote(str(run))} continues it); the "
                  f"numbers below are after task {out['task']}")
    if args.all_tasks:
        from .report import format_run_summary
        print(format_run_summary(out))
        diff = out["run_matrix_max_diff"]
        print("\nthe run's own matrix (its last checkpoint): " + ("equal" if diff == 0 else
              f"differs by up to {diff:.2f} points"))
        return 0
    accs = "  ".join(f"{a:.1f}" for a in out["acc_per_task_j"])
    print(f"after task {out['task']}: acc on seen classes {out['acc']:.2f}%  per task: {accs}")
    return 0


def cmd_ablate(args) -> int:
    from .api import ablate
    _refuse_run_options(args, "it runs every --variants entry: use --variants segpcl",
                        "it runs every --seeds entry: use --seeds {seed}")
    cfg = _note_analysis_dir(args, _config_from_args(args), "ablate")
    variants = _csv(args.variants, "--variants")
    out = ablate(cfg, variants=variants, seeds=args.seeds)
    print(out["table"])
    print("files:\n" + "\n".join(f"  {k}: {v}" for k, v in out["paths"].items()))
    return 0


def _note_analysis_dir(args, cfg, name: str):
    """Remember the folder an analysis that keeps runs writes (config.analysis_config's), for the interrupt
    line: interrupted before it exists (while the model loads), --resume would be refused; returns cfg."""
    from .config import analysis_config
    try:
        args.analysis_dir = analysis_config(cfg, name).run.output_dir
    except ConfigError:  # the analysis itself says why
        pass
    return cfg


def _print_analysis(out: dict) -> None:
    print(out["table"])
    print("files:\n" + "\n".join(f"  {k}: {v}" for k, v in out["paths"].items()))


def seed_list(text: str) -> list[int]:
    """argparse type of --seeds: "0,1,2" -> [0, 1, 2]; anything else is a usage error."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds expects comma-separated integers like 0,1,2, got {text!r}")
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed, e.g. --seeds 0")
    return seeds


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expects an integer >= 0, got {text!r}")
    return value


def _csv(text, option: str = ""):
    """"a,b" -> ["a", "b"]; None (option not given) -> None; given but naming nothing ("," or "") is an error."""
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"{option or 'the option'} names nothing ({text!r}): give comma-separated names, or leave "
                          f"it out for the default")
    return items


# the analyses that train one method, from --method (their own default) and never from run.method: a
# --set run.method would be overridden silently, so it is refused with the fix
def _analysis_method(args, default: str) -> str:
    if any(override_key(o) == "run.method" for o in args.overrides):
        raise ConfigError(f"{args.command} takes its method from --method (default {default}), not --set run.method")
    return args.method or default


def cmd_fragility(args) -> int:
    from .analysis import fragility
    method = _analysis_method(args, "lora_finetune")  # before the config: its --set run.method refusal
    cfg = _config_from_args(args)
    try:
        tasks = [int(t) for t in _csv(args.tasks, "--tasks")] if args.tasks is not None else None
    except ValueError:
        raise ConfigError(f"--tasks expects comma-separated 1-based task numbers like 2,5, got {args.tasks!r}") from None
    _print_analysis(fragility(cfg, tasks=tasks, score=args.score, threshold=args.threshold,
                              method=method, max_old_images=args.max_old_images,
                              temperature=args.temperature))
    return 0


def cmd_retention(args) -> int:
    from .analysis import retention
    _refuse_run_options(args, method_fix="it compares every --variants entry: use --variants segpcl")
    cfg = _note_analysis_dir(args, _config_from_args(args), "retention")
    _print_analysis(retention(cfg, variants=_csv(args.variants, "--variants"), datasets=_csv(args.datasets, "--datasets"),
                              per_class=args.per_class))
    return 0


def cmd_sweep(args) -> int:
    from .analysis import sweep
    _refuse_run_options(args, seed_fix="it runs every --seeds entry: use --seeds {seed}")
    both = sorted({override_key(o) for o in args.overrides} & {override_key(o) for o in args.fixed})
    if both:  # the swept values replaced the fixed one without a word
        raise ConfigError(f"sweep: {', '.join(both)} is both swept (--set) and fixed (--fixed): give it once")
    _refuse_shorthand_conflicts(args, list(args.overrides), "--set")  # swept keys override -o / --method too
    _refuse_shorthand_conflicts(args, list(args.fixed), "--fixed")
    axes, args.overrides = args.overrides, list(args.fixed)
    cfg = _note_analysis_dir(args, _config_from_args(args), "sweep")
    _print_analysis(sweep(cfg, axes=axes, seeds=args.seeds, fixed=list(args.fixed)))
    return 0


def cmd_distill_sources(args) -> int:
    from .analysis import distill_sources
    method = _analysis_method(args, "segpcl")  # before the config: its --set run.method refusal
    _refuse_run_options(args, seed_fix="it runs every --seeds entry: use --seeds {seed}")
    cfg = _note_analysis_dir(args, _config_from_args(args), "distill-sources")
    _print_analysis(distill_sources(cfg, sources=_csv(args.sources, "--sources"), folder=args.folder,
                                    seeds=args.seeds, method=method))
    return 0


def cmd_anchor_views(args) -> int:
    from .analysis import anchor_views
    method = _analysis_method(args, "segpcl")  # before the config: its --set run.method refusal
    cfg = _config_from_args(args)
    _print_analysis(anchor_views(cfg, task=args.task, projection=args.projection, method=method))
    return 0


def _drop_options(argv: list[str], flags=(), with_value=()) -> list[str]:
    """argv without the given flags and options (with their values, as "--opt v" or "--opt=v")."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags or any(a.startswith(o + "=") for o in with_value):
            continue
        elif a in with_value:
            skip = True
        else:
            out.append(a)
    return out


def cmd_profile(args) -> int:
    from .engine.profile import check_profile_args, ncu_command, profile_training, profiled_task
    cfg = _config_from_args(args)
    # -o or a run.output_dir from --set / the YAML, as an analysis takes it: train's defaults (runs/default,
    # a preset's runs/<preset>) become runs/profile, runs/<preset>-profile; a train run's folder is refused
    from .config import analysis_config
    out_dir = analysis_config(cfg, "profile").run.output_dir
    check_profile_args(cfg, args.steps, args.nvtx, out_dir)  # a refusal is the only line, not after the header
    if _rank0():
        task = profiled_task(cfg.data.num_tasks, cfg.run.compile) + 1
        print(f"segpcl-fast profile: {args.steps} steps of task {task} (the tasks before it: warm-up), "
              f"model={cfg.model.name} precision={cfg.run.precision} "
              f"compile={cfg.run.compile} ops={cfg.run.ops} -> {out_dir}", flush=True)
    out = profile_training(cfg, out_dir, steps=args.steps, row_limit=args.rows, nvtx=args.nvtx)
    if not _rank0():  # torchrun: rank 0 reports; every rank's files are listed in the README
        return 0
    if out["graphs_compiled_in_window"]:
        print(f"note: {out['graphs_compiled_in_window']} graphs were compiled inside the profiled window (task "
              f"{out['task']}): its times include dynamo / inductor compilation (TORCH_LOGS=recompiles names "
              "each graph's cause)")
    if out["nvtx"]:
        print(f"task {out['task']} ({out['steps']} steps, {out['device']}) ran in {out['wall_ms'] / 1e3:.1f} s with "
              "NVTX ranges for every op and stage; the timeline is the Nsight tool's report (nsys: its -o file), "
              "torch.profiler did not run and no file was written here")
        return 0
    print(out["table"])
    print(f"stages (task {out['task']}, {out['steps']} steps, {out['device']}):")
    print(out["stages_table"])
    print("self time by kind of kernel:")
    print(out["categories_table"])
    print("files:\n" + "\n".join(f"  {k}: {v}" for k, v in out["paths"].items()))
    if out["top_kernel"] and not out["on_gpu"]:
        print(f"top op by self time: {out['top_kernel']} (a CPU profile: Nsight Compute needs a CUDA kernel, "
              "run the profile on a GPU for its ncu command)")
    elif out["top_kernel"]:
        argv = args.argv[args.argv.index("profile") + 1:] if "profile" in args.argv else []
        argv = _drop_options(argv, flags=("--nvtx",), with_value=("-o", "--output-dir"))
        rerun = argv + ["-o", str(out_dir).rstrip("/") + "-ncu"]
        print(f"top by self time: {out['top_kernel']} ({out['top_kernel_launches']} launches)\n"
              f"profile one launch of it with Nsight Compute (GPU):\n  "
              f"{ncu_command(out['top_kernel'], rerun, launches=out['top_kernel_launches'])}")
    print("NVTX timeline (GPU): nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi -o segpcl_timeline "
          "segpcl-fast profile --nvtx [same options]")
    return 0


def _add_profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="run N training steps of task 2 (task 3 under run.compile=true, after the "
                                       "tasks that compile) under torch.profiler: Chrome trace, top kernels by self "
                                       "time, time per stage, ncu command")
    _add_config_args(p, resume=False)
    p.add_argument("--steps", type=positive_int, default=5, help="training steps to profile (default 5)")
    p.add_argument("--rows", type=positive_int, default=30, help="rows of the top-ops table (default 30)")
    p.add_argument("--nvtx", action="store_true", help="for nsys / ncu (CUDA only): NVTX ranges for every op and "
                                                         "stage, torch.profiler off, no files written")
    p.set_defaults(func=cmd_profile)


def _add_analysis_parsers(sub) -> None:
    p = sub.add_parser("fragility", help="JSD of old-class predictions across a task: boundary vs core images, "
                                         "DPGD anchors vs random new images")
    _add_config_args(p, resume=False, method_help="the method trained task by task (default lora_finetune)")
    p.add_argument("--tasks", default=None, help="1-based tasks to measure, e.g. 2,5 (default: 2..T)")
    p.add_argument("--score", default="text_sim", choices=["text_sim", "margin"],
                   help="boundary score (default text_sim: similarity to the nearest new-class text)")
    p.add_argument("--threshold", default="median", help="median (default), quantile:q, or a number")
    p.add_argument("--max-old-images", type=non_negative_int, default=2000,
                   help="old-class test images per task: a seeded sample of at most this many (default "
                        "2000; 0 = all)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature of the class distributions (1 = the model's; 20 = ACGD's tau_A)")
    p.set_defaults(func=cmd_fragility)
    p = sub.add_parser("retention", help="zero-shot accuracy outside the sequence, before vs after, per variant")
    _add_config_args(p, method=False)
    p.add_argument("--variants", default=None, help="comma-separated variants (default: zeroshot,lora_finetune,"
                                                    "+acgd,+tsgr,segpcl)")
    p.add_argument("--datasets", default=None, help="comma-separated: synthetic-sketch, synthetic-source, "
                                                    "food101=ROOT, pets=ROOT, imagenet=ROOT (default: synthetic-sketch,"
                                                    "synthetic-source)")
    p.add_argument("--per-class", type=non_negative_int, default=0,
                   help="images per class (0 = all / synthetic default 20)")
    p.set_defaults(func=cmd_retention)
    p = sub.add_parser("sweep", help="sweep config keys (--set key=v1,v2; several keys -> grid) over seeds")
    _add_config_args(p, seed=False)
    next(a for a in p._actions if a.dest == "overrides").help = (
        "a swept key and its values, e.g. --set dpgd.k_adv=5,10,20 (';' separates values that hold commas, "
        "e.g. lora.targets=[k,v];[q,k,v]); several --set give a grid; a key with one value is fixed")
    p.add_argument("--fixed", action="append", default=[], metavar="KEY=VALUE",
                   help="a fixed override that is not split into values (e.g. a value holding commas)")
    p.add_argument("--seeds", default=[0], type=seed_list, help="comma-separated seeds, e.g. 0,1")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("distill-sources", help="ACGD on DPGD anchors vs new-task images vs seeds vs a folder")
    _add_config_args(p, seed=False, method_help="the method whose ACGD source changes (default segpcl)")
    p.add_argument("--sources", default=None, help="comma-separated subset of anchors,new_data,seeds,folder")
    p.add_argument("--folder", default=None, help="reference image folder for source 'folder' "
                                                  "(offline default: synthetic source-domain images of their own stream, not "
                                                  "retention's held-out set)")
    p.add_argument("--seeds", default=[0], type=seed_list, help="comma-separated seeds")
    p.set_defaults(func=cmd_distill_sources)
    p = sub.add_parser("anchor-views", help="2-D view of prototypes, seeds, anchors and new images (PNG)")
    _add_config_args(p, resume=False, method_help="the method trained up to --task (default segpcl)")
    p.add_argument("--task", type=int, default=2, help="1-based task whose anchors are shown (>= 2)")
    p.add_argument("--projection", default="pca", choices=["pca", "tsne"], help="tsne needs scikit-learn")
    p.set_defaults(func=cmd_anchor_views)


def cmd_predict(args) -> int:
    import json
    from .classifier import image_paths, load_classifier
    paths = image_paths(args.images)  # before the model loads: a mistyped path fails at once
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image {missing[0]} does not exist" + (f" (and {len(missing) - 1} more)"
                                                                         if len(missing) > 1 else ""))
    clf = load_classifier(args.source, task=args.task, device=args.device, overrides=args.overrides)
    predictions = clf.predict(paths, topk=args.topk, batch_size=args.batch_size,
                              skip_unreadable=args.skip_unreadable)
    if args.json:  # a skipped image: "top": null
        rows = [{"image": path, "top": None if top is None else [{"class": name, "prob": prob} for name, prob in top]}
                for path, top in zip(paths, predictions)]
        print(json.dumps({"task": clf.task, "classes": len(clf.class_names), "predictions": rows}, indent=1))
        return 0
    print(f"after task {clf.task}: {len(clf.class_names)} classes", file=sys.stderr)
    for path, top in zip(paths, predictions):
        print(f"{path}\t" + ("(unreadable: skipped)" if top is None
                             else "  ".join(f"{name} ({100 * prob:.1f}%)" for name, prob in top)))
    return 0


def peft_load_hint(name: str, pretrained: str | None, path, weights_seed: int | None = None,
                   quick_gelu: bool = False) -> str:
    """How to load an adapter written by export --peft: peft.PeftModel.from_pretrained(base, path) over the
    base model.peft_adapter.base_model_code names (open_clip.create_model too, unless the model's config or weights
    are ones only segpcl_fast resolves: segpcl-tiny, segpcl-world; random weights after their seed)."""
    from .model.peft_adapter import base_model_code
    return (f"load it with peft.PeftModel.from_pretrained(base, {str(path)!r}), base = "
            f"{base_model_code(name, pretrained, weights_seed, quick_gelu)}")


def cmd_export(args) -> int:
    from .classifier import ClassifierError, check_export_path, load_classifier
    if args.peft:
        from .model.peft_adapter import check_adapter_directory, import_peft
        try:  # before the model loads: peft missing or broken, a directory that cannot take the adapter
            import_peft()
            check_adapter_directory(args.output)
        except (ImportError, ValueError) as e:
            raise ClassifierError(str(e)) from e
        clf = load_classifier(args.source, task=args.task, overrides=args.overrides)
        path = clf.save_peft_adapter(args.output)
        print(f"wrote {path}: the LoRA adapters of {clf.model.name} after task {clf.task} as a peft adapter; "
              f"{peft_load_hint(clf.model.name, clf.model.pretrained, path, clf.model.weights_seed, clf.model.quick_gelu)}")
        return 0
    check_export_path(args.output)  # before the model loads
    clf = load_classifier(args.source, task=args.task, overrides=args.overrides)
    path = clf.export(args.output)
    print(f"wrote {path}: {clf.model.name} with LoRA merged (plain open_clip weights), {len(clf.class_names)} "
          f"classes after task {clf.task}, text embeddings + prototypes (beta {clf.beta:g})")
    return 0


def _add_classifier_parsers(sub) -> None:
    p = sub.add_parser("predict", help="classify images with a trained run (dual-path logits over its seen classes)")
    p.add_argument("source", help="run directory, checkpoint file (checkpoints/task_NN.pt) or exported file")
    p.add_argument("images", nargs="+", help="image files, or folders of them")
    p.add_argument("--topk", type=positive_int, default=1, help="classes per image (default 1)")
    p.add_argument("--task", type=positive_int, default=None, help="the model after this task (1-based; default last)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images a forward pass (default 64)")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="an image file that cannot be read is reported and skipped (default: one error)")
    _add_weights_location_arg(p)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("export", help="write a trained run as one file: LoRA merged into plain open_clip weights, "
                                      "class names, text embeddings, prototypes")
    p.add_argument("source", help="run directory, checkpoint file (checkpoints/task_NN.pt) or exported file "
                                  "(written again as it is, e.g. to another place)")
    p.add_argument("--output", "-o", required=True, help="file to write (atomically); with --peft, a new directory")
    p.add_argument("--peft", action="store_true",
                   help="write only the LoRA adapters, as a peft adapter directory (peft's adapter_config.json, "
                        "adapter_model.safetensors and README.md, and segpcl_base_model.json naming the open_clip "
                        "model) for peft.PeftModel.from_pretrained on the plain open_clip model")
    p.add_argument("--task", type=positive_int, default=None, help="the model after this task (1-based; default last)")
    _add_weights_location_arg(p)
    p.set_defaults(func=cmd_export)


def _add_weights_location_arg(p) -> None:
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="where the run's pretrained weights now lie: model.cache_dir=DIR, or model.pretrained=FILE "
                        "for a run that named a weights file (checked against the run's text and probe-image "
                        "embeddings)")


def cmd_env(args) -> int:
    from .report.environment import environment, format_environment
    env = environment()
    if args.json:
        import json
        print(json.dumps(env, indent=1))
    else:
        print(format_environment(env))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segpcl-fast", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages (op dispatch, timings)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="run a class-incremental sequence")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("ablate", help="run the ablation ladder (or chosen variants) and write one table + plot")
    _add_config_args(p, method=False, seed=False)
    p.add_argument("--variants", default=None,
                   help="comma-separated variant names (default: the ladder zeroshot,lora_finetune,+acgd,...)")
    p.add_argument("--seeds", default=[0], type=seed_list, help="comma-separated seeds, e.g. 0,1,2")
    p.set_defaults(func=cmd_ablate)
    p = sub.add_parser("evaluate", help="re-evaluate a run directory from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="how to evaluate: run.device, run.ops, run.compile, run.tf32, run.num_threads, run.progress, "
                        "eval.batch_size, data.num_workers, and where the data / weights now lie: data.root, "
                        "data.frames_dir, data.names_file, data.class_list, data.split_file, model.cache_dir, "
                        "model.pretrained (checked against the checkpoint; e.g. --set run.device=cuda)")
    p.add_argument("--all-tasks", action="store_true",
                   help="evaluate every finished task from its own checkpoint: the accuracy matrix, Avg, Last, "
                        "Forgetting, BWT, FWT, and how far it lies from the matrix the run recorded")
    p.set_defaults(func=cmd_evaluate)
    _add_classifier_parsers(sub)
    _add_analysis_parsers(sub)
    _add_profile_parser(sub)
    p = sub.add_parser("env", help="versions, devices, Triton / C++ extension / apex / xformers, and which "
                                   "implementation each fused op takes here (for bug reports)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text report")
    p.set_defaults(func=cmd_env)
    for p in sub.choices.values():  # -v also after the subcommand (segpcl-fast train -v)
        # `segpcl-fast <sub> --help` opens with the line `segpcl-fast --help` lists for it
        p.description = p.description or {a.dest: a.help for a in sub._choices_actions}.get(p.prog.split()[-1])
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log INFO messages (op dispatch, timings)")
    return parser


class _RunProgressHandler(logging.Handler):
    """A run's progress lines (logger segpcl_fast.run) as plain lines on the current stdout (looked up per
    line: a caller may have swapped sys.stdout since), beside train's header and results."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stdout, flush=True)
        except (BrokenPipeError, ValueError):  # `... | head` closed the pipe, or stdout is closed: not the run's error
            pass
        except Exception:  # as logging's own handlers: reported by logging, never an error of the run
            self.handleError(record)


@contextlib.contextmanager
def show_run_progress():
    """While a command runs, each task's accuracy (and a resume or a replaced run) printed without -v: a
    10-task run said nothing until its results at the default verbosity (a review's finding). Not
    propagated meanwhile, so -v's root handler does not print them a second time; afterwards the logger is
    as it was (main() called in a notebook or a test leaves the process's logging alone)."""
    run_log = logging.getLogger("segpcl_fast.run")
    if any(isinstance(h, _RunProgressHandler) for h in run_log.handlers):  # main inside main: already shown
        yield
        return
    handler, saved = _RunProgressHandler(), (run_log.level, run_log.propagate)
    run_log.addHandler(handler)
    run_log.setLevel(logging.INFO)
    run_log.propagate = False
    try:
        yield
    finally:
        run_log.removeHandler(handler)
        run_log.setLevel(saved[0])
        run_log.propagate = saved[1]


def main(argv=None) -> int:
    with show_run_progress():
        return _main(argv)


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    where = "" if _rank0() else f" [rank {os.environ['RANK']}]"
    _configure_logging(args.verbose, where)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = _raise_on_sigterm()
    try:
        rc = args.func(args)
        _leave_process_group()
        return rc
    except (ConfigError, FileNotFoundError) as e:
        _report_error(str(e), where, getattr(e, "echo", False) or (isinstance(e, ConfigError) and not _joined()))
        _leave_process_group(after_error=True)
        return 2
    except KeyboardInterrupt as e:
        while True:  # timeout and Slurm signal the process, then its whole group: a second SIGTERM may come here
            try:
                if previous is not False:
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # this stop is being reported (finally: restored)
                return _report_interrupt(args, e)
            except Terminated as again:
                e = again
    except OSError as e:  # a path that cannot be written or read: the OS's reason and the path, one line
        path = f"{e.filename}: " if e.filename else ""
        fix = (" (this user may not read or write it: fix its permissions or owner (chmod u+w on a folder it "
               "writes, chmod -R a+rX on a dataset folder it reads), or use a copy or folder it can reach)"
               if isinstance(e, PermissionError) else "")
        _report_error(f"{path}{e.strerror or e}{fix}", where, getattr(e, "echo", False))
        _leave_process_group(after_error=True)
        return 2
    except Exception as e:  # known user-facing errors carry their fix in the message
        from .data.base import DatasetFormatError
        from .engine.checkpoint import CheckpointError
        from .classifier import ClassifierError
        from .model.clip import ModelLoadError
        if isinstance(e, (DatasetFormatError, ModelLoadError, CheckpointError, ClassifierError, FloatingPointError)):
            _report_error(_user_message(e), where, getattr(e, "echo", False))
            _leave_process_group(after_error=True)
            return 2
        from .engine.distributed import lost_peer
        if _joined() and lost_peer(e):  # not this rank's error: the rank that stopped first says why
            print(f"segpcl-fast: stopped{where}: another rank stopped first (its error is above, or in torchrun's "
                  f"report) and this rank lost it in a collective: {str(e).strip().splitlines()[0][:200]}",
                  file=sys.stderr)
            return 1
        raise
    finally:
        if previous is not False:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            sys.unraisablehook = _unraisable_before.pop()


class _CLILogHandler(logging.StreamHandler):
    """The handler the CLI puts on the root logger (stderr), told apart from a caller's."""


def _configure_logging(verbose: bool, where: str) -> None:
    """logging.basicConfig's set-up, made again by each main() call (basicConfig's first call fixed the level
    and format for the process: a later `-v`, or another RANK, in a notebook or test changed nothing), and
    never where the caller has handlers of its own. Under torchrun the ranks of a node read the same config
    and environment: their warnings (a variant's setting changed, an SEGPCL_* switch not used, a missing
    CUDA kernel) are printed by the node's first process (LOCAL_RANK 0) alone, once on one machine; the
    others log with -v only. Lines of rank r > 0 are tagged [rank r] (`where`)."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _CLILogHandler)]
    if len(ours) < len(root.handlers):  # the caller's logging (a notebook's, pytest's): left as it is
        return
    for handler in ours:
        root.removeHandler(handler)
    handler = _CLILogHandler()
    handler.setFormatter(logging.Formatter(f"%(levelname)s{where} %(name)s: %(message)s"))
    root.addHandler(handler)
    node_first = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"
    root.setLevel(logging.INFO if verbose else logging.WARNING if node_first else logging.ERROR)


def _report_interrupt(args, e: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM: one line saying whether and how to resume; the exit status 130 or 143."""
    hint = ""
    nothing_kept = getattr(args, "func", None) is cmd_train and getattr(e, "tasks_on_disk", None) == 0
    if hasattr(args, "resume") and not getattr(args, "checkpointing", True):
        hint = ": run.checkpoint=false kept no checkpoint, so --resume would start again from task 1"
    elif hasattr(args, "resume") and nothing_kept:
        hint = ": no task had finished, so no checkpoint was kept: the same command starts the run again from task 1"
    elif getattr(args, "analysis_dir", None) and not Path(args.analysis_dir).is_dir() and not args.resume:
        hint = f": nothing was written yet ({args.analysis_dir} does not exist): the same command starts it again"
    elif hasattr(args, "resume"):  # each finished task is checkpointed
        hint = ": continue after the last finished task with the same command and --resume"
    if _rank0():
        print(f"segpcl-fast: {'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'}{hint}",
              file=sys.stderr)
    return 143 if isinstance(e, Terminated) else 130


def _joined() -> bool:
    """This process has joined a torchrun process group (so its peers may be gone)."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _report_error(message: str, where: str, same_on_every_rank: bool) -> None:
    """Print an error once per torchrun job where it can be: rank 0 prints it whole; another rank
    prints nothing when every rank raised the same (rank 0's error shared with them, `echo`, or a
    config error met before the ranks joined: the same arguments give the same error), else its
    first line with its rank (it may be that rank's own, e.g. a file only its shard reads)."""
    if _rank0():
        print(f"segpcl-fast: error: {message}", file=sys.stderr)
    elif not same_on_every_rank:
        lines = message.strip().splitlines() or [""]
        print(f"segpcl-fast: error{where}: {lines[0]}{' (...)' if len(lines) > 1 else ''}", file=sys.stderr)


def _user_message(error: BaseException) -> str:
    """The error's own message. One raised in a DataLoader worker comes back re-raised by torch as
    "Caught X in DataLoader worker process N." + the worker's whole traceback: keep its last part,
    the message the library wrote."""
    text = str(error)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    name = re.escape(type(error).__name__)
    last = None
    for last in re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, flags=re.MULTILINE):
        pass
    return text[last.end():].strip() if last else text


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, Slurm, Kubernetes, torchrun stopping its workers), raised like Ctrl-C so that
    every `finally` runs: a file being written is removed, not left half-written beside its target."""


def _raise_on_sigterm():
    """Handle SIGTERM by raising Terminated; returns the previous handler (None: one not set from
    Python), or False off the main thread, where Python cannot install one."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun stops the other ranks with SIGTERM while they
        return False  # wait in a collective, where a Python handler cannot run: keep the default, die at once

    def handler(signum, frame):
        # a SIGTERM to the process group (timeout, Slurm) also stops the DataLoader workers, and torch's SIGCHLD
        # handler then raised "DataLoader worker (pid N) is killed by signal: Terminated" into the unwinding or
        # at exit (20 lines after 'Exception ignored in ...'): their end is expected now. SIGCHLD gets a Python
        # handler that does nothing, not SIG_DFL: a SIGCHLD already pending (a worker that died with this
        # SIGTERM) would then find no Python handler, and Python printed "OSError: Signal 17 ignored due to
        # race condition" with a traceback
        if hasattr(signal, "SIGCHLD"):
            signal.signal(signal.SIGCHLD, _ignore_signal)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    _unraisable_before.append(sys.unraisablehook)
    sys.unraisablehook = _terminated_again
    return previous


def _ignore_signal(signum, frame) -> None:
    """A Python signal handler that does nothing (SIGCHLD once a SIGTERM is being handled)."""


_unraisable_before: list = []  # sys.unraisablehook before main() installed _terminated_again


def _terminated_again(unraisable) -> None:
    """SIGTERM's Terminated raised where Python cannot raise (a fork callback as a DataLoader starts its workers,
    a __del__) is printed as 'Exception ignored in ...' and lost, and the run went on: signal it again, to be
    raised where it can be (from a thread, a moment later: a signal sent from here would be handled, and
    raised, inside this hook). Anything else goes to the hook before."""
    if isinstance(unraisable.exc_value, Terminated):
        again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
        again.daemon = True
        again.start()
        return
    if _half_made_loader_iterator(unraisable):  # the interruption (or error) that stopped it is reported itself
        return
    (_unraisable_before[-1] if _unraisable_before else sys.__unraisablehook__)(unraisable)


def _half_made_loader_iterator(unraisable) -> bool:
    """torch's multi-process DataLoader iterator whose __init__ was stopped part way (a SIGTERM while it starts
    its workers) fails in __del__ on an attribute __init__ never set: a traceback after the one line."""
    return (isinstance(unraisable.exc_value, AttributeError)
            and getattr(unraisable.object, "__qualname__", "") == "_MultiProcessingDataLoaderIter.__del__")


if __name__ == "__main__":
    sys.exit(main())
