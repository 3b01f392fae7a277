"""Which images should ACGD distil on? The full method with only acgd.source changed:

    anchors   DPGD anchors (the method)
    new_data  the raw task-t training images (the paper: -0.8 Last on CIFAR100)
    seeds     the selected seeds without the PGD steps
    folder    unlabeled images from a reference folder (ZSCL-style), at most as many as the task
              has training images (seeded choice); acgd.source_folder or folder=... gives it

Offline (data.dataset=synthetic) with no folder given, "folder" uses a reference folder written
under <output_dir>/reference_images: images of the synthetic pretraining domain, from their own
stream (not retention's held-out synthetic-source set, which would then score its own distillation data; the
analogue of ZSCL's pretraining-like reference set). On real data, "folder" needs a folder.

Each run resolves run.method (default "segpcl") first and then sets acgd.source /
acgd.source_folder on the resolved config (distill_new_data / distill_seeds pin the source themselves).
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from ..api import entries, keeps_process_state, seed_entries
from ..config import ACGDConfig, ConfigError, analysis_config, apply_overrides, refuse_decided_keys
from ..engine.distributed import refuse_multi_process
from .outputs import (METRICS, check_resume_dir, check_unique, make_trainer, plus_minus, require_old_classes, run_config,
                      start_table_files, summarize_runs, write_table_files)

log = logging.getLogger("segpcl_fast.analysis")

SOURCES = ("anchors", "new_data", "seeds", "folder")
REFERENCE_PER_CLASS = 5  # offline reference folder: 5 source-domain images per class (500), own stream
REFERENCE_MARKER = ".reference.json"  # which world's images the folder holds


def write_synthetic_reference_folder(folder: Path, seed: int = 0, per_class: int = REFERENCE_PER_CLASS) -> Path:
    """PNG files of source-domain images (no labels used; their own stream, not retention's held-out
    synthetic-source set) -> folder; returns it. The folder's REFERENCE_MARKER names the world (seed,
    images per class): a folder of another world's images (a rerun into the same output dir with another
    data.synthetic_seed) is emptied and written anew (it was reused as it was); one of this world's
    completes an interrupted write."""
    from PIL import Image

    from ..data.synthetic import build_reference_dataset
    from ..fileio import atomic_write_bytes, atomic_write_text
    world = {"synthetic_seed": int(seed), "per_class": int(per_class)}
    marker = folder / REFERENCE_MARKER
    try:
        same = json.loads(marker.read_text()) == world
    except (OSError, ValueError):
        same = False
    if not same and folder.is_dir():
        for old in folder.glob("[0-9]*.png"):
            old.unlink()
    ds = build_reference_dataset(seed, per_class)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(world) + "\n")  # first: a write cut short is completed, not redone
    for i in range(len(ds)):
        path = folder / f"{i:05d}.png"
        if path.exists():
            continue
        buf = io.BytesIO()
        Image.fromarray(ds.images[i]).save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
    return folder


def _check_uses_acgd(cfg, method: str) -> None:
    """The method trains with ACGD, and leaves acgd.source to this analysis: distill_new_data / distill_seeds pin
    it, so a run's saved config (its method, the source set here) would not load back (evaluate, predict,
    --resume: the method sets its own source again, which the checkpoints' config then contradicts)."""
    from ..method.variants import resolve_variant, variant_overrides
    resolved = resolve_variant(apply_overrides(cfg, {"run.method": method}))
    if not (resolved.acgd.enabled and resolved.acgd.weight > 0):
        raise ConfigError(f"method '{method}' does not use ACGD (acgd.enabled / acgd.weight): the distillation "
                          f"source makes no difference; use method=segpcl")
    pinned = variant_overrides(method).get("acgd.source")
    if pinned is not None:
        raise ConfigError(f"method '{method}' sets acgd.source={pinned} itself, and distill-sources varies "
                          f"acgd.source: use method=segpcl (the full method on each source)")


def _trainer_for_source(cfg, method: str, source: str, folder: Optional[str], out: Path):
    trainer = make_trainer(run_config(cfg, method, out))
    trainer.cfg.acgd.source = source  # shared with trainer.learner.cfg; saved into config.yaml by run()
    if source == "folder":  # absolute, as the trainer makes its other paths: config.yaml is read from anywhere
        trainer.cfg.acgd.source_folder = os.path.abspath(os.path.expanduser(folder))
    trainer.learner.eval_transform = trainer.test_tf
    return trainer


@keeps_process_state
def distill_sources(config=None, sources: Optional[Sequence[str]] = None, folder: Optional[str] = None,
                    seeds: Sequence[int] = (0,), method: str = "segpcl", **overrides) -> dict:
    """Run `method` with each ACGD source over seeds; one table (mean +- std) and a bar plot of Last.

    Writes <output_dir>/distill_sources.{json,txt,png}; runs under <output_dir>/<source>/seed<s>/.
    """
    from ..api import make_config
    refuse_multi_process("the distill-sources analysis")
    refuse_decided_keys("distill_sources()", overrides, {"run.method": "pass method='segpcl'",
                                                         "run.seed": "it runs every seeds entry: pass seeds=[1]"})
    cfg = analysis_config(make_config(config, **overrides), "distill-sources")
    sources = entries(sources) or list(SOURCES)
    seeds = seed_entries(seeds, "distill_sources()")
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        raise ConfigError(f"unknown ACGD source(s) {bad}; choose from {', '.join(SOURCES)}")
    check_unique(sources, "ACGD source")
    if not seeds:
        raise ConfigError("distill_sources() needs at least one seed (seeds=[0])")
    check_unique(seeds, "seed")
    if cfg.acgd.source != ACGDConfig().source:  # each run's acgd.source is the analysis' to set, as run.method
        raise ConfigError(f"distill-sources sets acgd.source itself, one run per source (--sources, sources=): "
                          f"the config's acgd.source={cfg.acgd.source} would be replaced; drop it and give "
                          f"--sources {cfg.acgd.source} (sources=['{cfg.acgd.source}'])")
    for given, option in ((folder, "--folder (folder=)"), (cfg.acgd.source_folder, "acgd.source_folder")):
        if given is not None and "folder" not in sources:
            raise ConfigError(f"a reference folder ({option} {given}) is only used by the source 'folder', which "
                              f"{', '.join(sources)} leaves out: add folder to the sources, or drop the folder")
    require_old_classes(cfg, "distill-sources", "ACGD distils from task 2 on (task 1 has no old classes)")
    _check_uses_acgd(cfg, method)  # before the offline reference folder is written
    check_resume_dir(cfg)
    out = Path(cfg.run.output_dir)
    option = "--folder (folder=)" if folder is not None else "acgd.source_folder"
    folder = folder or cfg.acgd.source_folder
    if "folder" in sources:
        if folder is None and cfg.data.dataset == "synthetic":
            folder = str(write_synthetic_reference_folder(out / "reference_images", cfg.data.synthetic_seed))
        from ..data.retention import list_reference_images
        list_reference_images(folder, option)  # a missing folder fails before anything runs
    start_table_files(out, "distill_sources", [run_config(apply_overrides(cfg, {"run.seed": int(seed)}), method,
                                                          out / source / f"seed{seed}")
                                               for source in sources for seed in seeds], resume=cfg.run.resume)
    rows, runs = [], {}
    for source in sources:
        results = []
        for seed in seeds:
            seeded = apply_overrides(cfg, {"run.seed": int(seed)})
            results.append(_trainer_for_source(seeded, method, source, folder, out / source / f"seed{seed}").run())
        runs[source] = [r.output_dir for r in results]
        rows.append({"source": source, "seeds": len(seeds), **summarize_runs(results)})
        log.info("distill source %s: Last %s", source, rows[-1]["Last"])
    table = format_sources_table(rows, method, cfg.data.dataset, len(seeds))
    paths = write_table_files(out, "distill_sources", {"method": method, "folder": folder, "seeds": list(seeds),
                                                       "rows": rows, "runs": runs, "config": cfg.to_dict()}, table,
                              plots=cfg.run.plots)
    if cfg.run.plots:
        from ..report import plots
        over = f"mean +- sample std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
        paths["png"] = str(plots.plot_bars({r["source"]: r["Last"] for r in rows}, out / "distill_sources.png",
                                           errors={r["source"]: r["Last_std"] for r in rows} if len(seeds) > 1 else None,
                                           ylabel="Last (%)",
                                           title=f"ACGD source ({method}, {cfg.data.dataset}, {over})"))
    return {"rows": rows, "runs": runs, "paths": paths, "table": table}


def format_sources_table(rows: list, method: str, dataset: str, n_seeds: int) -> str:
    from ..report import format_table
    body = [[r["source"]] + [plus_minus(r[m], r[m + "_std"], n_seeds, r.get(m + "_n")) for m in METRICS] for r in rows]
    return format_table(body, ["ACGD source"] + list(METRICS),
                        title=f"ACGD distillation source ({method} on {dataset}, {n_seeds} seed(s), mean +- sample std, "
                              "accuracies in %)")
