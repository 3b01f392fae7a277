"""Anchor views: where do seeds and DPGD anchors sit relative to the old classes' prototypes and
the new task's images? All points live in the teacher's raw feature space r_T (the space of the
prototypes p_c), the teacher being the model at the end of task t-1.

Points: old-class prototypes p_c, the K_seed seeds per old class, their DPGD anchors, and the new
task's training images (eval transform). Projection to 2-D: PCA (default; torch.pca_lowrank on
the centred points, all groups fitted together) or t-SNE (method="tsne", needs scikit-learn).

Besides the PNG, the table gives, per group, the mean cosine similarity to the target old class's
prototype (seeds, anchors) or to the nearest old prototype (new images): DPGD should move the
seeds toward their target prototype.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..api import keeps_process_state
from ..config import ConfigError, analysis_config, refuse_decided_keys
from .fragility import build_task_anchors
from ..engine.distributed import refuse_multi_process
from .outputs import encode_batches, make_trainer, new_figure, require_old_classes, run_config, save_png, stack_dataset, \
    start_table_files, write_table_files

log = logging.getLogger("segpcl_fast.analysis")

PROJECTIONS = ("pca", "tsne")


def project_2d(points: torch.Tensor, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2): PCA (exact: the SVD of the centred points, each axis signed so that its largest
    loading is positive; torch.pca_lowrank's randomized one captured 92-98 % of the top-2 variance on a
    flat spectrum, and drew from the global random stream), or t-SNE from scikit-learn."""
    x = points.detach().double().cpu()
    if method == "pca":
        centred = x - x.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        axes = vh[:2]
        axes = axes * torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
        coords = (centred @ axes.T).numpy()
        return coords if coords.shape[1] == 2 else np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise ConfigError("anchor views with projection 'tsne' need scikit-learn (pip install scikit-learn); "
                              "or use --projection pca (projection='pca')") from None
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.numpy())
    raise ConfigError(f"unknown projection '{method}'; choose one of {PROJECTIONS}")


@keeps_process_state
def anchor_views(config=None, task: int = 2, projection: str = "pca", method: Optional[str] = "segpcl",
                 max_new_images: int = 500, **overrides) -> dict:
    """Train tasks 1..task-1 of `method` (the training method, as the other analyses' and the CLI's
    --method), build task `task`'s seeds and anchors, project (`projection`: pca or tsne, the CLI's
    --projection), plot.

    task: 1-based, >= 2. Writes <output_dir>/anchor_views.{json,txt,png}; returns
    {"rows", "paths", "table"}.
    """
    from ..api import make_config
    if projection not in PROJECTIONS:
        raise ConfigError(f"unknown projection '{projection}'; choose one of {PROJECTIONS}")
    if projection == "tsne":
        project_2d(torch.zeros(4, 2), "tsne")  # missing scikit-learn fails before training
    refuse_multi_process("the anchor-views analysis")
    if method is not None:  # run__method= was replaced by method= without a word
        refuse_decided_keys("anchor_views()", overrides, {"run.method": f"it trains method= ({method!r} here): pass "
                                                                  "method=... (method=None keeps the config's run.method)"})
    cfg = analysis_config(make_config(config, **overrides), "anchor-views")
    require_old_classes(cfg, "anchor views")  # before the model and data load
    out = Path(cfg.run.output_dir)
    T = cfg.data.num_tasks  # the scenario's (data.task_sizes, when set, has as many: config.check_task_count)
    if not 2 <= int(task) <= T:  # before the model and data load too
        raise ConfigError(f"anchor views: task must be in 2..{T} (1-based; task 1 has no old classes), got {task}")
    run_cfg = run_config(cfg, method, out / "run")
    start_table_files(out, "anchor_views", [run_cfg], resume=cfg.run.resume)
    trainer = make_trainer(run_cfg)
    t = int(task) - 1
    for j in range(t):
        trainer.train_task(j)
    model, learner, dev = trainer.model, trainer.learner, trainer.device
    model.eval()
    n_old = learner.n_seen
    new_images, new_labels = stack_dataset(trainer.scenario.train_dataset(t, transform=trainer.test_tf))  # CPU
    anchors, seed_idx, targets = build_task_anchors(trainer, t, new_images)
    protos = learner.prototypes.tensor[:n_old].float().to(dev)
    seed_raw, _ = encode_batches(model, new_images[seed_idx])
    anchor_raw, _ = encode_batches(model, anchors)
    if max_new_images and len(new_images) > max_new_images:
        keep = torch.randperm(len(new_images), generator=torch.Generator().manual_seed(t))[:max_new_images]
        new_images, new_labels = new_images[keep], new_labels[keep]
    new_raw, _ = encode_batches(model, new_images)

    def cos_to(raw, which):
        return F.cosine_similarity(raw, protos[which], dim=-1)
    nearest = (F.normalize(new_raw, dim=-1) @ F.normalize(protos, dim=-1).T).max(dim=1)
    rows = [
        {"group": "old prototypes", "n": n_old, "cos_to_target_prototype": 1.0},
        {"group": "seeds", "n": len(seed_raw), "cos_to_target_prototype": float(cos_to(seed_raw, targets).mean())},
        {"group": "DPGD anchors", "n": len(anchor_raw),
         "cos_to_target_prototype": float(cos_to(anchor_raw, targets).mean())},
        {"group": "new-task images", "n": len(new_raw), "cos_to_target_prototype": float(nearest.values.mean())},
    ]
    groups = [protos, seed_raw, anchor_raw, new_raw]
    coords = project_2d(torch.cat(groups), projection, seed=trainer.cfg.run.seed)
    splits = np.cumsum([0] + [len(g) for g in groups])
    xy = {r["group"]: coords[splits[i]:splits[i + 1]] for i, r in enumerate(rows)}
    table = format_views_table(rows, task, projection, trainer.cfg.run.method)
    payload = {"task": int(task), "projection": projection, "run_method": trainer.cfg.run.method, "rows": rows,
               "targets": targets.tolist(), "new_labels": new_labels.tolist(),
               "coords": {k: v.tolist() for k, v in xy.items()}, "config": trainer.cfg.to_dict()}
    paths = write_table_files(out, "anchor_views", payload, table, plots=cfg.run.plots)
    if cfg.run.plots:
        paths["png"] = plot_views(xy, targets.cpu().numpy(), out / "anchor_views.png", int(task), projection,
                                  trainer.cfg.run.method)
    return {"rows": rows, "paths": paths, "table": table}


def format_views_table(rows: list, task: int, projection: str, run_method: str = "") -> str:
    """The printed table; its title names the method trained up to the task (the PNG's title does too)."""
    from ..report import format_table
    trained = f"{run_method} after task {task - 1}; " if run_method else ""
    return format_table([[r["group"], r["n"], r["cos_to_target_prototype"]] for r in rows],
                        ["group", "points", "mean cos to (target | nearest) old prototype"], floatfmt=".4f",
                        title=f"anchor views before task {task} ({trained}teacher raw features r_T, {projection} in "
                              f"the PNG)")


def plot_views(xy: dict, targets: np.ndarray, path, task: int, method: str, run_method: str) -> str:
    """Scatter: new images grey, seeds (o) and anchors (^) coloured by target class, a line from each
    seed to its anchor, prototypes as large stars in their class colour."""
    from matplotlib import colormaps
    n_classes = len(xy["old prototypes"])

    def class_colours(labels):  # 20 distinct colours while they last, else one hue per class around a wheel
        labels = np.asarray(labels)
        if n_classes <= 20:
            return colormaps["tab20"](labels % 20)
        return colormaps["turbo"](labels / (n_classes - 1))
    fig = new_figure((7.0, 6.0))
    ax = fig.add_subplot()
    new = xy["new-task images"]
    ax.scatter(new[:, 0], new[:, 1], s=6, c="lightgrey", label="new-task images")
    seeds, anchors, protos = xy["seeds"], xy["DPGD anchors"], xy["old prototypes"]
    colours = class_colours(targets)
    for (sx, sy), (ax_, ay) in zip(seeds, anchors):
        ax.plot([sx, ax_], [sy, ay], color="grey", linewidth=0.5, alpha=0.6)
    ax.scatter(seeds[:, 0], seeds[:, 1], s=16, c=colours, marker="o", edgecolors="none", label="seeds")
    ax.scatter(anchors[:, 0], anchors[:, 1], s=22, c=colours, marker="^", edgecolors="black", linewidths=0.3,
               label="DPGD anchors")
    ax.scatter(protos[:, 0], protos[:, 1], s=140, c=class_colours(np.arange(len(protos))), marker="*",
               edgecolors="black", linewidths=0.6, label="old prototypes")
    axis = "PC" if method == "pca" else "t-SNE "
    ax.set_xlabel(f"{axis}1")
    ax.set_ylabel(f"{axis}2")
    ax.set_title(f"teacher raw features before task {task} ({run_method}), {method.upper()}; colour: target "
                 f"old class", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return save_png(fig, path)
