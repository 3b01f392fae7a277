"""`segpcl-fast` command line: thin; parse, call the API, print.

    segpcl-fast train                                   # offline world, SeGP-CL, <= 5 min on 2 cores
    segpcl-fast train --config cifar100 --set data.root=/data/cifar --set run.output_dir=runs/c100
    segpcl-fast train --config runs/c100/config.yaml --resume
    segpcl-fast evaluate runs/c100
    segpcl-fast ablate --seeds 0,1,2 -o runs/ablation  # the ladder lora_finetune -> segpcl, one table
"""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help="YAML file or preset name in configs/ (cifar100, imagenet-r, ...); default: offline world")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set dpgd.k_adv=5 (repeatable)")
    p.add_argument("--output-dir", "-o", default=None, help="same as --set run.output_dir=...")
    p.add_argument("--method", default=None, help="same as --set run.method=... (segpcl, lora_finetune, ...)")
    p.add_argument("--seed", type=int, default=None, help="same as --set run.seed=...")


def _config_from_args(args) -> "Config":
    from .api import make_config
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.method:
        overrides.append(f"run.method={args.method}")
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    if getattr(args, "resume", False):
        overrides.append("run.resume=true")
    return make_config(args.config, overrides)


def _print_result(result) -> None:
    from .report import format_run_summary
    print(format_run_summary(result))


def cmd_train(args) -> int:
    from .api import train
    cfg = _config_from_args(args)
    print(f"segpcl-fast train: method={cfg.run.method} dataset={cfg.data.dataset} model={cfg.model.name} "
          f"tasks={cfg.data.num_tasks} -> {cfg.run.output_dir}", flush=True)
    result = train(cfg)
    _print_result(result)
    return 0


def cmd_evaluate(args) -> int:
    from .api import evaluate
    out = evaluate(args.run_dir)
    accs = "  ".join(f"{a:.1f}" for a in out["acc_per_task_j"])
    print(f"after task {out['task']}: acc on seen classes {out['acc']:.2f}%  per task: {accs}")
    return 0


def cmd_ablate(args) -> int:
    from .api import ablate
    cfg = _config_from_args(args)
    variants = args.variants.split(",") if args.variants else None
    seeds = [int(s) for s in args.seeds.split(",")]
    out = ablate(cfg, variants=variants, seeds=seeds)
    print(out["table"])
    print("files:\n" + "\n".join(f"  {k}: {v}" for k, v in out["paths"].items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segpcl-fast", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages (op dispatch, timings)")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="run a class-incremental sequence")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last finished task in output_dir")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("ablate", help="run the ablation ladder (or chosen variants) and write one table + plot")
    _add_config_args(p)
    p.add_argument("--variants", default=None,
                   help="comma-separated variant names (default: the ladder zeroshot,lora_finetune,+acgd,...)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.set_defaults(func=cmd_ablate)
    p = sub.add_parser("evaluate", help="re-evaluate a run directory from its last checkpoint")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"segpcl-fast: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # known user-facing errors carry their fix in the message
        from .data.base import DatasetFormatError
        from .model.clip import ModelLoadError
        if isinstance(e, (DatasetFormatError, ModelLoadError, FloatingPointError)):
            print(f"segpcl-fast: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
