"""Hyper-parameter sweeps: any config keys, several keys give a grid, seeds repeat every point.

    segpcl-fast sweep --set dpgd.k_adv=5,10,20 --seeds 0,1
    segpcl-fast sweep --set dpgd.k_adv=5,10 --set optim.lr=1e-3,3e-4        # 2 x 2 grid
    segpcl-fast sweep --set "lora.targets=[k,v];[q,k,v]"                     # list-valued key

Value syntax of one `--set key=...`:
  - values are separated by ';' when the text holds a ';' outside brackets/quotes, else by ','
    outside brackets/quotes; each value is read with YAML rules (config.parse_value), so
    `[k,v]` is a list, `1e-3` a float, `true` a bool.
  - a list-valued key takes each value in YAML list syntax: `lora.targets=[k,v],[q,k,v]` or
    `lora.targets=[k,v];[q,k,v]`; `data.templates=['a photo of a {}.']` is one value (quoted: YAML).
  - a key given one value is a fixed override for every run (runs in <out>/base/ when no key has more:
    a --resume that widens it continues them there: continue_earlier_runs).
Every grid point (and every seed) is checked with apply_overrides and the variant resolver first:
an unknown key or a value of the wrong type is one ConfigError before anything runs.
"""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..config import (Config, ConfigError, analysis_config, apply_overrides, check_data_root, check_task_count,
                      config_value, known_keys, load_config, override_key, parse_value, refuse_decided_keys)
from ..engine.distributed import refuse_multi_process
from .outputs import (METRICS, check_resume_dir, check_unique, new_figure, plus_minus, run_config, save_png, slug,
                      start_table_files, summarize_runs, write_table_files)

log = logging.getLogger("segpcl_fast.analysis")

AxesSpec = Union[Sequence[str], Mapping[str, Sequence[Any]]]


def _scan(text: str):
    """Yield (ch, depth, open_quote) after each character: bracket depth and the quote left open."""
    depth, quote = 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        yield ch, depth, quote


def split_values(text: str) -> list[str]:
    """Split a value list at top-level ';' (if any) else top-level ','; brackets and quotes nest."""
    def split_at(sep: str) -> list[str]:
        parts, cur = [], []
        for ch, depth, quote in _scan(text):
            if ch == sep and depth == 0 and quote is None:
                parts.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        parts.append("".join(cur))
        return parts
    if depth_unbalanced(text):
        raise ConfigError(f"sweep values '{text}' have unbalanced brackets or quotes")
    semi = split_at(";")
    parts = semi if len(semi) > 1 else split_at(",")
    parts = [p.strip() for p in parts]
    if any(p == "" for p in parts):
        raise ConfigError(f"sweep values '{text}' contain an empty value; write e.g. dpgd.k_adv=5,10,20")
    return parts


def depth_unbalanced(text: str) -> bool:
    depth, quote = 0, None
    for _, depth, quote in _scan(text):
        if depth < 0:
            return True
    return depth != 0 or quote is not None


# run keys that change neither what a run trains nor how fast: sweeping them trains the same run again
SHOWN_ONLY = ("run.progress", "run.plots", "run.tensorboard", "run.checkpoint", "run.overwrite", "run.resume")


def parse_axes(specs: AxesSpec) -> dict[str, list[Any]]:
    """{key: [values]} from ["dpgd.k_adv=5,10", ...] (CLI) or a dict {key: [values] or value}."""
    axes: dict[str, list[Any]] = {}
    if isinstance(specs, Mapping):
        for key, vals in specs.items():
            axes[str(key)] = list(vals) if isinstance(vals, (list, tuple)) else [vals]
    else:
        for spec in specs:
            if "=" not in spec:
                raise ConfigError(f"sweep spec '{spec}' must look like section.key=v1,v2,... e.g. dpgd.k_adv=5,10,20")
            key, text = spec.split("=", 1)
            key = key.strip()
            if key in axes:
                raise ConfigError(f"sweep key '{key}' is given twice; put all its values in one --set")
            axes[key] = [parse_value(v) for v in split_values(text)]
    known = set(known_keys())
    for key, vals in axes.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{key}' in the sweep; known keys: {', '.join(sorted(known))}")
        if not vals:
            raise ConfigError(f"sweep key '{key}' has no values")
    if "run.output_dir" in axes:
        raise ConfigError("run.output_dir cannot be swept: every point gets <output_dir>/<point>/seed<s>")
    shown = [key for key in SHOWN_ONLY if len(axes.get(key, ())) > 1]
    if shown:  # its points would train the same run, and the same speed
        raise ConfigError(f"sweep key '{shown[0]}' has values {axes[shown[0]]}, but it changes only what a run shows "
                          f"or keeps, not what it trains: its points would be the same run; give it one value")
    return axes


def expand_grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of the axes, first key varying slowest: [{key: value, ...}, ...]."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def point_name(point: Mapping[str, Any]) -> str:
    return ",".join(f"{k.split('.', 1)[1]}={_show(v)}" for k, v in point.items()) or "base"


def _show(v: Any) -> str:
    return "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)


def point_folders(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """A folder name per point: its slug, plus a short hash of its full name where two distinct points
    share a slug (values that differ only in characters a folder name drops: ['a {}!'] vs ['a {}?'])."""
    import hashlib
    names = [point_name(point) for point in points]
    slugs = [slug(name) for name in names]
    return [s if slugs.count(s) == 1 else f"{s}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
            for s, name in zip(slugs, names)]


def validate_grid(cfg: Config, points: Sequence[Mapping[str, Any]], seeds: Sequence[int],
                  out: Path, fixed: Optional[Mapping[str, Any]] = None) -> list[list[Config]]:
    """Per point, per seed, the run's Config; any invalid point raises one ConfigError naming it: a bad value,
    a task split of the known class count (data.build.check_task_split), data.task_sizes against num_tasks, a
    data.root for the offline world, a `fixed` key (recorded in sweep.json and the table's title) that the
    point's run.method sets to another value."""
    from ..data.base import DatasetFormatError
    from ..data.build import check_task_split
    from ..method.variants import resolve_variant
    configs = []
    check_unique([point_name(point) for point in points], "sweep point")
    folders = point_folders(points)
    trained: dict[str, str] = {}  # what a point trains (its resolved config) -> the first point that trains it
    given: dict[str, str] = {}  # a point's config before run.method resolves it -> the first point with it
    for point, folder in zip(points, folders):
        per_seed = []
        for seed in seeds:
            try:
                c = apply_overrides(cfg, dict(point))
                # run.resume only where the point's run exists: an interrupted sweep's unstarted points start
                c = run_config(apply_overrides(c, {"run.seed": int(seed)}), None, out / folder / f"seed{seed}")
                check_data_root(check_task_count(c))
                check_task_split(c.data)
                resolved_cfg = resolve_variant(c)
                _check_fixed(fixed or {}, c, resolved_cfg)
            except (ConfigError, DatasetFormatError) as e:
                hint = ""
                if "expects a list" in str(e):
                    hint = " (give each list value in brackets, several separated by ';' or ',': [k,v];[q,k,v])"
                raise ConfigError(f"sweep point {point_name(point)}: {e}{hint}") from None
            per_seed.append(c)
        name = point_name(point)
        # c before run.method resolved it: equal values spelled apart (5 and 5.0) are equal here
        first_given = given.setdefault(_config_key(c), name)
        same = trained.setdefault(_config_key(resolved_cfg), name)
        if same != name and first_given == same:
            read = ", ".join(f"{k}={_show(config_value(c, k))}" for k in point)
            raise ConfigError(f"sweep points {same} and {name} are the same configuration: their values "
                              f"are equal as the key reads them ({read}); give each value once")
        if same != name:  # e.g. tsgr.enabled, which run.method decides (method/variants.py)
            raise ConfigError(f"sweep points {same} and {name} train the same configuration: "
                              f"run.method={c.run.method} decides the swept value (method/variants.py); sweep "
                              f"run.method itself, or {_instead(list(point))}")
        configs.append(per_seed)
    return configs


def continue_earlier_runs(out: Path, points: Sequence[Mapping[str, Any]],
                          configs: list[list[Config]]) -> list[list[Config]]:
    """A resumed sweep's run whose point folder holds no run of its config continues the run of that config
    in another folder of <out> (the same checkpoint fingerprint, as its config.yaml records it). A key swept
    with one value is a fixed key, its runs in <out>/base/: widening it later (--set prototypes.beta=0.3, then
    --resume --set prototypes.beta=0.3,0.5) trained beta=0.3 again in its own folder, and narrowing it back
    resumed base/ with the other value (refused: another config). Without such a run the point's folder is
    used as before: a new run where it does not exist, the trainer's own checks where it does."""
    from ..engine.checkpoint import config_fingerprint
    from ..engine.trainer import as_trained

    def recorded(run: Path) -> Optional[str]:
        try:
            return config_fingerprint(load_config(run / "config.yaml").to_dict())
        except (ConfigError, OSError, UnicodeDecodeError):  # none, or one this version cannot read
            return None
    # every run in <out>/<folder>/seed<N>/, a point's own among them: each config.yaml read once
    on_disk = {path.parent: recorded(path.parent) for path in sorted(out.glob("*/seed*/config.yaml"))}
    earlier: dict[str, Path] = {}
    for run, fingerprint in on_disk.items():
        if fingerprint is not None:
            earlier.setdefault(fingerprint, run)
    continued = []
    for point, per_seed in zip(points, configs):
        runs = []
        for c in per_seed:
            own, wanted = Path(c.run.output_dir), config_fingerprint(as_trained(c).to_dict())
            found = earlier.get(wanted)
            if found is not None and found != own and on_disk.get(own) != wanted:
                log.info("sweep %s: continues the run of the same configuration in %s", point_name(point), found)
                c = apply_overrides(c, {"run.output_dir": str(found), "run.resume": True})
            runs.append(c)
        continued.append(runs)
    return continued


def _config_key(cfg: Config) -> str:
    """`cfg` as sorted JSON without where its run writes (run.output_dir, run.resume): what it trains."""
    d = cfg.to_dict()
    d["run"].pop("output_dir")
    d["run"].pop("resume")
    return json.dumps(d, sort_keys=True, default=str)


def _check_fixed(fixed: Mapping[str, Any], cfg: Config, resolved: Config) -> None:
    """A fixed key is what every run trains with: one the run's method sets otherwise (tsgr.enabled under
    run.method=segpcl) would be recorded as fixed while the runs used the method's value."""
    for key in fixed:
        if config_value(resolved, key) != config_value(cfg, key):
            raise ConfigError(f"the fixed {key}={_show(config_value(cfg, key))} is not what the runs would train with: "
                              f"run.method={cfg.run.method} sets {key}={_show(config_value(resolved, key))} "
                              f"(method/variants.py); fix run.method to a method with the value you want, or "
                              f"{_instead([key])}")


# what turns a switch the methods own off without changing the method (method/variants.py sets the switches)
LEFT_ALONE = {"acgd.enabled": "acgd.weight=0 turns ACGD off", "tsgr.enabled": "tsgr.weight=0 turns TSGR off"}


def _instead(keys: Sequence[str]) -> str:
    """The hint for keys a method decides: each switch's own weight where it has one."""
    named = [LEFT_ALONE[k] for k in keys if k in LEFT_ALONE]
    return f"a key the method leaves alone ({'; '.join(named)})" if named else "a key the method leaves alone"


def sweep(config=None, axes: AxesSpec = (), seeds: Sequence[int] = (0,), fixed: Sequence[str] = (),
          **overrides) -> dict:
    """Train every grid point for every seed; one table (mean +- std over seeds) and one plot.

    Keys given one value are fixed overrides (applied to every run, not table columns), as are
    `fixed` ('key=value' strings, the CLI's --fixed: a value may hold commas); both are recorded in
    sweep.json's "fixed" and named in the table's title.

    Writes <output_dir>/sweep.{json,txt,png}; runs under <output_dir>/<point>/seed<s>/.
    Returns {"rows", "axes", "paths", "table"}.
    """
    from ..api import entries, make_config, seed_entries, train
    from ..engine.checkpoint import resuming_analysis
    refuse_multi_process("the sweep")
    refuse_decided_keys("sweep()", overrides, {"run.seed": "it runs every seeds entry: pass seeds=[1]"})
    cfg = make_config(config, **overrides)
    axes = parse_axes(axes if isinstance(axes, Mapping) else entries(axes) or [])
    fixed = entries(fixed) or []
    if "run.seed" in axes:
        raise ConfigError("run.seed cannot be a sweep key: give the seeds with seeds=... (--seeds 0,1,2)")
    seeds = seed_entries(seeds, "sweep()")
    if not seeds:
        raise ConfigError("sweep needs at least one seed (--seeds 0)")
    check_unique(seeds, "seed")
    single = {k: v[0] for k, v in axes.items() if len(v) == 1}
    axes = {k: v for k, v in axes.items() if len(v) > 1}
    try:
        cfg = apply_overrides(apply_overrides(cfg, list(fixed)), single)
    except ConfigError as e:
        raise ConfigError(f"sweep: fixed override: {e}") from None
    held = {**{override_key(o): config_value(cfg, override_key(o)) for o in fixed}, **single}
    held = {k: v for k, v in held.items() if k not in SHOWN_ONLY}  # recorded: what the numbers depend on
    cfg = analysis_config(cfg, "sweep")  # after the fixed keys: they may set run.output_dir
    check_resume_dir(cfg)  # after the fixed keys: they may set run.resume or run.output_dir
    out = Path(cfg.run.output_dir)
    points = expand_grid(axes)
    configs = validate_grid(cfg, points, seeds, out, held)  # every error before the first run
    if cfg.run.resume:
        configs = continue_earlier_runs(out, points, configs)
    start_table_files(out, "sweep", [c for per_seed in configs for c in per_seed], resume=cfg.run.resume)
    swept = list(axes)
    rows = []
    for point, per_seed in zip(points, configs):
        with resuming_analysis("sweep"):  # a refused resume names sweep's command, not one run's config
            results = [train(c) for c in per_seed]
        row = {**{k: point[k] for k in axes}, "seeds": len(seeds), **summarize_runs(results),
               "runs": [r.output_dir for r in results]}
        rows.append(row)
        log.info("sweep %s: Last %.2f", point_name(point), float("nan") if row["Last"] is None else row["Last"])
    table = format_sweep_table(rows, list(axes), len(seeds), cfg.data.dataset, held)
    paths = write_table_files(out, "sweep", {"axes": axes, "fixed": held, "seeds": seeds, "rows": rows,
                                             "config": cfg.to_dict()}, table, plots=cfg.run.plots)
    if cfg.run.plots:
        paths["png"] = plot_sweep(rows, axes, swept, out / "sweep.png", cfg.data.dataset, len(seeds))
    return {"rows": rows, "axes": axes, "paths": paths, "table": table}


def format_sweep_table(rows: list, keys: list, n_seeds: int, dataset: str, fixed: Optional[Mapping] = None) -> str:
    from ..report import format_table
    body = [[_show(r[k]) for k in keys] + [plus_minus(r[m], r[m + "_std"], n_seeds, r.get(m + "_n")) for m in METRICS]
            for r in rows]
    named = f"; fixed: {', '.join(f'{k}={_show(v)}' for k, v in fixed.items())}" if fixed else ""
    return format_table(body, keys + list(METRICS),
                        title=f"sweep on {dataset} ({n_seeds} seed(s), mean +- sample std, accuracies in %{named})")


def plot_sweep(rows: list, axes: Mapping[str, list], swept: list, path, dataset: str, n_seeds: int = 1) -> str:
    """Last and Avg against the first swept key; one line per combination of the other keys; error
    bars (sample std over the seeds) only with more than one seed."""
    keys = list(axes)
    if not keys:  # a single run: nothing to put on an x axis but its name
        axes, keys, rows = {"point": ["base"]}, ["point"], [dict(r, point="base") for r in rows]
    x_key = swept[0] if swept else keys[0]
    others = [k for k in keys if k != x_key and len(axes[k]) > 1]
    xs = [_show(v) for v in axes[x_key]]
    fig = new_figure((7.0, 4.0))
    ax = fig.add_subplot()
    groups = expand_grid({k: axes[k] for k in others}) or [{}]
    for group in groups:
        members = [r for r in rows if all(r[k] == v for k, v in group.items())]
        for metric, style in (("Last", "-o"), ("Avg", "--s")):
            ys = [next((r[metric] for r in members if _show(r[x_key]) == x), None) for x in xs]
            errs = [next((r[metric + "_std"] for r in members if _show(r[x_key]) == x), None) for x in xs]
            label = metric + (f" ({point_name(group)})" if group else "")
            yerr = None if all(e is None for e in errs) else [0.0 if e is None else e for e in errs]
            ax.errorbar(range(len(xs)), [float("nan") if y is None else y for y in ys],
                        yerr=yerr, fmt=style, capsize=3, label=label)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel(x_key)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"sweep on {dataset}: " + (f"mean +- sample std over {n_seeds} seeds" if n_seeds > 1
                                               else "one seed"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_png(fig, path)
