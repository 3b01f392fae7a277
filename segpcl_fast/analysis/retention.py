"""Cross-scenario retention: zero-shot accuracy on datasets outside the continual sequence,
before the sequence (the pretrained model, LoRA B = 0) and after it, for each method variant.

Zero-shot = CLIP path only: argmax_c s · cos(v(x), u_c) over the dataset's own classes, with the
model's text tower as it is at that moment (so text drift counts too). Datasets (see
segpcl_fast/data/retention.py): offline default "synthetic-sketch" and "synthetic-source" (held-
out draws of the synthetic world); real ones given as name=root: food101, pets, imagenet.

    retention(variants=["lora_finetune", "segpcl"])                       # offline world
    retention("cifar100", data__root="/data/cifar",
              datasets=["food101=/data/food-101", "pets=/data/pets", "imagenet=/data/imagenet"])
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..api import entries, keeps_process_state
from ..config import ConfigError, analysis_config, apply_overrides, refuse_decided_keys
from ..data.retention import OFFLINE_DEFAULT, RETENTION_DATASETS
from ..engine.distributed import refuse_multi_process
from ..model.tf32 import cuda_matmul_tf32_for, run_tf32
from .outputs import (check_resume_dir, check_unique, make_trainer, new_figure, run_config, save_png, slug,
                      start_table_files, write_table_files)

log = logging.getLogger("segpcl_fast.analysis")

# The ablation ladder's distinct trainings: +prototype_transfer (= onlyclip) trains like segpcl
# (they differ only in the prototype path, which zero-shot does not use).
DEFAULT_VARIANTS = ("zeroshot", "lora_finetune", "+acgd", "+tsgr", "segpcl")
DatasetSpec = Union[Sequence[str], Mapping[str, Optional[str]], None]


def parse_dataset_specs(datasets: DatasetSpec) -> dict[str, Optional[str]]:
    """{name: root or None} from ["food101=/data/f", "synthetic-sketch"] or a dict; checked."""
    if datasets is None or len(datasets) == 0:
        return {name: None for name in OFFLINE_DEFAULT}
    items = datasets.items() if isinstance(datasets, Mapping) else \
        [(s.split("=", 1)[0].strip(), s.split("=", 1)[1].strip() if "=" in s else None) for s in datasets]
    specs = {}
    for name, root in items:
        if name not in RETENTION_DATASETS:
            raise ConfigError(f"unknown retention dataset '{name}'; known: {', '.join(RETENTION_DATASETS)}")
        if name in specs:
            raise ConfigError(f"retention dataset '{name}' is given twice; give it once")
        if name.startswith("synthetic") and root:
            raise ConfigError(f"retention dataset '{name}' is generated, it takes no data root: write {name}")
        if not name.startswith("synthetic") and not root:
            raise ConfigError(f"retention dataset '{name}' needs a data root: write it as {name}=/path/to/{name}")
        if root and not Path(root).expanduser().is_dir():
            raise ConfigError(f"retention dataset '{name}': data root '{root}' does not exist or is not a folder; "
                              f"fix the path in --datasets {name}=/path/to/{name}")
        specs[name] = root
    return specs


@torch.no_grad()
def zeroshot_accuracy(model, dataset, prompts: Sequence[Sequence[str]], device: torch.device,
                      batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of the CLIP path over the dataset's classes."""
    model.eval()
    text = model.class_embeddings(prompts, device=device).float()
    scale = float(model.logit_scale())
    correct = total = 0
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        _, emb = model.encode_image(images.to(device))
        pred = (scale * F.normalize(emb.float(), dim=-1) @ text.T).argmax(dim=-1).cpu()
        correct += int((pred == torch.as_tensor(labels)).sum())
        total += len(labels)
    if total == 0:
        raise ValueError("zeroshot_accuracy: the dataset is empty")
    return 100.0 * correct / total


def _load_sets(specs: dict, trainer, per_class: int) -> dict:
    from ..data import format_prompts
    from ..data.retention import build_retention_dataset
    sets = {}
    for name, root in specs.items():
        ds, templates = build_retention_dataset(name, root, trainer.test_tf, seed=trainer.cfg.data.synthetic_seed,
                                                per_class=per_class)
        sets[name] = (ds, format_prompts(ds.class_names, templates or trainer.cfg.data.templates))
    return sets


@keeps_process_state
def retention(config=None, variants: Optional[Sequence[str]] = None, datasets: DatasetSpec = None,
              per_class: int = 0, **overrides) -> dict:
    """Train each variant on the configured sequence and measure zero-shot accuracy on `datasets`
    before (pretrained model) and after the whole sequence.

    Writes <output_dir>/retention.{json,txt,png} (runs under <output_dir>/<variant>/);
    returns {"rows", "before", "paths", "table"}.
    """
    from ..api import make_config
    from ..method.variants import check_variants, variant_overrides
    refuse_multi_process("the retention analysis")
    refuse_decided_keys("retention()", overrides,
                        {"run.method": "it trains every variants entry: pass variants=['segpcl']"})
    cfg = analysis_config(make_config(config, **overrides), "retention")
    variants = entries(variants) or list(DEFAULT_VARIANTS)
    datasets = datasets if isinstance(datasets, Mapping) else entries(datasets)
    for name in variants:
        variant_overrides(name)  # unknown names fail before anything runs
    check_unique(variants, "variant")
    check_variants(cfg, variants, "retention")  # every variant's clash with the config before the first one trains
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
        raise ConfigError(f"retention per_class must be a whole number >= 0 (0: all / the synthetic default), "
                          f"got {per_class!r}")
    if not datasets and cfg.data.dataset != "synthetic":  # the default sets are the offline world's toys
        raise ConfigError(f"retention of a {cfg.data.dataset} run needs --datasets (datasets=...): the default, "
                          f"{', '.join(OFFLINE_DEFAULT)}, is the offline world's, not a test of a real-data model; "
                          f"e.g. --datasets food101=/data/food-101,pets=/data/oxford-pets")
    specs = parse_dataset_specs(datasets)
    check_resume_dir(cfg)
    out = Path(cfg.run.output_dir)
    run_configs = {name: run_config(cfg, name, out / slug(name)) for name in variants}
    start_table_files(out, "retention", run_configs.values(), resume=cfg.run.resume)
    before, rows, sets = {}, [], None
    for name in variants:
        trainer = make_trainer(run_configs[name])
        if sets is None:
            sets = _load_sets(specs, trainer, per_class)
            before = {d: zeroshot_accuracy(trainer.model, ds, prompts, trainer.device, cfg.eval.batch_size)
                      for d, (ds, prompts) in sets.items()}
        result = trainer.run()
        if not trainer.holds_final_weights:  # resumed, finished with run.checkpoint=false: no weights kept
            log.warning("retention: %s finished without checkpoints, so its trained weights are gone; training "
                        "it again", trainer.out)
            again = apply_overrides(trainer.cfg, {"run.resume": False, "run.overwrite": True})
            del trainer  # one model on the device at a time
            trainer = make_trainer(again)
            result = trainer.run()
        # under the TF32 switch the "before" figures had (the trainer's, which run() has given back)
        with cuda_matmul_tf32_for(run_tf32(trainer.cfg.run.tf32, trainer.device)):
            afters = {d: zeroshot_accuracy(trainer.model, ds, prompts, trainer.device, cfg.eval.batch_size)
                      for d, (ds, prompts) in sets.items()}
        for d, after in afters.items():
            rows.append({"dataset": d, "method": name, "before": before[d], "after": after,
                         "change": after - before[d], "Last": result.metrics.get("Last"),
                         "run": str(trainer.cfg.run.output_dir)})  # its config.yaml: what the row trained
            log.info("retention %s on %s: %.2f -> %.2f", name, d, before[d], after)
    table = format_retention_table(rows, cfg.data.dataset)
    payload = {"rows": rows, "before": before, "datasets": {d: {"root": r, "images": len(sets[d][0]),
                                                                 "classes": len(sets[d][0].class_names)}
                                                             for d, r in specs.items()},
               "variants": variants, "config": cfg.to_dict()}
    paths = write_table_files(out, "retention", payload, table, plots=cfg.run.plots)
    if cfg.run.plots:
        paths["png"] = plot_retention(rows, before, out / "retention.png", cfg.data.dataset)
    return {"rows": rows, "before": before, "paths": paths, "table": table}


def format_retention_table(rows: list, sequence: str) -> str:
    from ..report import format_table
    body = [[r["dataset"], r["method"], r["before"], r["after"], r["change"], r["Last"]] for r in rows]
    return format_table(body, ["dataset", "method", "before (%)", "after (%)", "change", f"Last on {sequence}"],
                        title=f"zero-shot retention after the {sequence} sequence")


def plot_retention(rows: list, before: dict, path, sequence: str) -> str:
    """Grouped bars: after-sequence zero-shot accuracy per dataset and method; dashed = before."""
    datasets = list(before)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / max(len(methods), 1)
    fig = new_figure((max(5.0, 1.6 * len(datasets) * max(1, len(methods)) / 2 + 2), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(datasets))
    for i, m in enumerate(methods):
        ys = [next((r["after"] for r in rows if r["dataset"] == d and r["method"] == m), np.nan) for d in datasets]
        ax.bar(x - 0.4 + width * (i + 0.5), ys, width, label=m)
    for i, d in enumerate(datasets):
        ax.hlines(before[d], i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                  label="before (pretrained)" if i == 0 else None)
    ax.set_xticks(x, datasets)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title(f"retention outside the {sequence} sequence")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return save_png(fig, path)
