"""Boundary fragility (the paper's motivation): how much does training task t change the
cross-modal class distribution of old-class images, near the new classes vs far from them?

For a finished task t (1-based, t >= 2) and each test image x of an old class (C_<t):

    p_before(x) = softmax_c( s · v̄(x) · u_c ),  c in C_<=t, model and text as before task t
    p_after(x)  = the same after training task t (CLIP path; the model's own text embeddings)
    (optionally softened: softmax(logits / temperature), e.g. temperature = tau_A = 20 as ACGD sees it)
    JSD(x)      = JS(p_before(x), p_after(x))        natural log, so 0 <= JSD <= ln 2

Boundary score (configurable, computed with the model before task t):
    "text_sim" (default): max_{c in C_t} cos(v̄(x), u_c) -- similarity to the nearest NEW class text
    "margin":             max_{c in C_t} cos(v̄(x), u_c) - max_{c in C_<t} cos(v̄(x), u_c)
Images with score > threshold are "boundary", the others (ties included) "core". The threshold
is "median" (default; the median score, so the groups are equal halves), "quantile:q" (q in
(0, 1)), or a number; the value used is reported.

Anchors vs random new-task images: the DPGD anchors of task t (built from the model before task
t exactly as the learner builds them: seeds + K_adv PGD steps, source "anchors") and as many
randomly chosen task-t training images (seeded, eval transform). Their distributions are taken
over the OLD classes C_<t (what ACGD distils), before and after task t.

The run itself is an ordinary training run of `method` (default "lora_finetune": the baseline
whose forgetting motivates the method; pass method=None to keep the config's run.method).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..api import entries, keeps_process_state
from ..config import ConfigError, analysis_config, refuse_decided_keys
from ..engine.distributed import refuse_multi_process
from .outputs import encode_batches, make_trainer, new_figure, run_config, save_png, stack_dataset, \
    start_table_files, write_table_files

log = logging.getLogger("segpcl_fast.analysis")

SCORES = ("text_sim", "margin")
LN2 = math.log(2.0)
JSD_FLOOR = 1e-6  # histogram floor (log x axis)


# ----------------------------------------------------------------------------- pure pieces

def jensen_shannon(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) between probability vectors along `dim`.

    JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2; 0 log 0 = 0. Symmetric, 0 iff
    p = q, at most ln 2. Inputs must be non-negative and sum to 1 along `dim`.
    """
    if p.shape != q.shape:
        raise ValueError(f"jensen_shannon: shapes differ, {tuple(p.shape)} vs {tuple(q.shape)}")
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)
    kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(dim)
    kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(dim)
    return (0.5 * (kl_pm + kl_qm)).clamp(0.0, LN2).float()


def resolve_threshold(scores: torch.Tensor, threshold: Union[str, float] = "median") -> float:
    """The boundary threshold: "median", "quantile:q" or a number (see the module docstring)."""
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        return float(threshold)
    if not isinstance(threshold, str):
        raise ConfigError(f"fragility threshold must be 'median', 'quantile:q' or a number, got {threshold!r}")
    values = scores.detach().double().cpu().numpy()
    if values.size == 0:
        raise ValueError("fragility: no scores to split (no old-class test images?)")
    if threshold == "median":
        return float(np.median(values))
    if threshold.startswith("quantile:"):
        try:
            q = float(threshold.split(":", 1)[1])
        except ValueError:
            q = -1.0
        if not 0.0 < q < 1.0:
            raise ConfigError(f"fragility threshold '{threshold}': q must be a number in (0, 1), e.g. quantile:0.75")
        return float(np.quantile(values, q))
    try:
        return float(threshold)
    except ValueError:
        raise ConfigError(f"fragility threshold must be 'median', 'quantile:q' or a number, got '{threshold}'") \
            from None


def split_boundary_core(scores: torch.Tensor, threshold: Union[str, float] = "median") -> tuple[torch.Tensor, float]:
    """(is_boundary bool mask, threshold value): boundary = score > threshold, ties go to core."""
    value = resolve_threshold(scores, threshold)
    return scores > value, value


def boundary_scores(emb_norm: torch.Tensor, text: torch.Tensor, n_old: int, kind: str = "text_sim") -> torch.Tensor:
    """Boundary score per image from normalised image embeddings and text of C_<=t (old rows first)."""
    sims = emb_norm.float() @ text.float().T
    new_sim = sims[:, n_old:].max(dim=1).values
    if kind == "text_sim":
        return new_sim
    if kind == "margin":
        return new_sim - sims[:, :n_old].max(dim=1).values
    raise ConfigError(f"unknown fragility score '{kind}'; choose one of {SCORES}")


def _correlation(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Pearson correlation, None when either side is constant (or fewer than 2 values)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:  # np.std of a constant can be ~1e-17, not 0
        return None
    return float(np.corrcoef(a, b)[0, 1])


def group_stats(values: torch.Tensor) -> dict:
    """Count, mean and median of a group (the median as resolve_threshold takes it: the mean of
    the two middle values for an even count, not torch.median's lower one)."""
    v = values.double().cpu()
    if v.numel() == 0:
        return {"n": 0, "mean": None, "median": None}
    return {"n": int(v.numel()), "mean": float(v.mean()), "median": float(np.median(v.numpy()))}


# ----------------------------------------------------------------------------- model pieces

@torch.no_grad()
def class_distribution(model, images: torch.Tensor, text: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(s · v̄(x) · U^T / temperature) over the given (normalised) text rows."""
    _, emb = encode_batches(model, images)
    return torch.softmax(float(model.logit_scale()) * emb @ text.float().T / temperature, dim=-1)


def build_task_anchors(trainer, t: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPGD anchors for task t from the current model (= the teacher), as the learner builds them.

    images: task t's training images (eval transform). Returns (anchor pixels, seed index into
    images, target old class), one row per anchor.
    """
    from ..method import anchors as stage1
    model, learner, cfg = trainer.model, trainer.learner, trainer.cfg
    n_old = learner.n_seen
    with torch.no_grad():
        old_text = model.class_embeddings(learner.class_prompts[:n_old], device=trainer.device)
        scale = model.logit_scale()
    _, emb = encode_batches(model, images)
    seed_idx, targets = stage1.select_seeds(emb, old_text.float(), cfg.dpgd.k_seed)
    seed_idx = seed_idx.cpu()  # images may stay on the CPU; the seeds alone go to the device
    stats = model.image_stats
    cache = stage1.build_anchor_cache(model, images[seed_idx].to(trainer.device), targets, old_text,
                                      learner.prototypes.tensor[:n_old].to(trainer.device), scale,
                                      cfg.dpgd, stats.mean, stats.std, source="anchors",
                                      generator=torch.Generator().manual_seed(trainer.task_seed(t)))
    return cache.pixels, seed_idx, targets


def _tasks_to_analyse(tasks: Optional[Sequence[int]], num_tasks: int) -> list[int]:
    """1-based task numbers -> sorted 0-based indices; default every task from 2 on."""
    if num_tasks < 2:
        raise ConfigError("fragility needs at least 2 tasks (data.num_tasks >= 2): task 1 has no old classes")
    if not tasks:
        return list(range(1, num_tasks))
    bad = [t for t in tasks if not 2 <= int(t) <= num_tasks]
    if bad:
        raise ConfigError(f"fragility: task(s) {bad} out of range; give 1-based tasks in 2..{num_tasks} "
                          f"(task 1 has no old classes)")
    return sorted({int(t) - 1 for t in tasks})


# ----------------------------------------------------------------------------- the analysis

def measure_task(trainer, t: int, score: str = "text_sim", threshold: Union[str, float] = "median",
                 max_old_images: int = 0, temperature: float = 1.0) -> dict:
    """Train task t (0-based, t >= 1) on `trainer` and measure the JSDs around it."""
    model, learner, scenario, dev = trainer.model, trainer.learner, trainer.scenario, trainer.device
    n_old = learner.n_seen
    n_seen = n_old + len(scenario.task_classes(t))
    prompts = learner.class_prompts
    model.eval()
    old_set = scenario.test_dataset_upto(t - 1)
    if max_old_images and len(old_set) > max_old_images:
        keep = torch.randperm(len(old_set), generator=torch.Generator().manual_seed(t))[:max_old_images]
        old_set = torch.utils.data.Subset(old_set, sorted(keep.tolist()))
    old_images, _ = stack_dataset(old_set)  # on the CPU; encode_batches moves one batch at a time
    new_images, _ = stack_dataset(scenario.train_dataset(t, transform=trainer.test_tf))
    with torch.no_grad():
        text_before = model.class_embeddings(prompts[:n_seen], device=dev).float()
    _, emb_before = encode_batches(model, old_images)
    scores = boundary_scores(emb_before, text_before, n_old, score)
    tau = temperature
    p_before = class_distribution(model, old_images, text_before, tau)
    anchors, _, _ = build_task_anchors(trainer, t, new_images)
    pick = torch.randperm(len(new_images), generator=torch.Generator().manual_seed(trainer.task_seed(t)))
    random_images = new_images[pick[:len(anchors)]]
    pa_before = class_distribution(model, anchors, text_before[:n_old], tau)
    pr_before = class_distribution(model, random_images, text_before[:n_old], tau)

    info = trainer.train_task(t)

    model.eval()
    with torch.no_grad():
        text_after = model.class_embeddings(prompts[:n_seen], device=dev).float()
    jsd = jensen_shannon(p_before, class_distribution(model, old_images, text_after, tau)).cpu()
    jsd_anchor = jensen_shannon(pa_before, class_distribution(model, anchors, text_after[:n_old], tau)).cpu()
    jsd_random = jensen_shannon(pr_before, class_distribution(model, random_images, text_after[:n_old], tau)).cpu()
    is_boundary, thr = split_boundary_core(scores.cpu(), threshold)
    corr = _correlation(scores.cpu().numpy(), jsd.numpy())
    return {
        "task": t + 1, "old_classes": n_old, "new_classes": n_seen - n_old, "threshold": thr,
        "boundary": group_stats(jsd[is_boundary]), "core": group_stats(jsd[~is_boundary]),
        "anchors": group_stats(jsd_anchor), "random_new": group_stats(jsd_random),
        "score_jsd_correlation": corr,
        "train_steps": info["timings"]["steps"],
        "values": {"jsd": jsd.tolist(), "score": scores.cpu().tolist(), "is_boundary": is_boundary.tolist(),
                   "jsd_anchors": jsd_anchor.tolist(), "jsd_random_new": jsd_random.tolist()},
    }


@keeps_process_state
def fragility(config=None, tasks: Optional[Sequence[int]] = None, score: str = "text_sim",
              threshold: Union[str, float] = "median", method: Optional[str] = "lora_finetune",
              max_old_images: int = 2000, temperature: float = 1.0, **overrides) -> dict:
    """Run `method` task by task and measure boundary vs core and anchor vs random JSDs.

    tasks: 1-based tasks to measure (default: 2..T); training runs up to the last of them.
    max_old_images: a seeded random sample of at most this many old-class test images per task
    (0 = all; bounds memory on real benchmarks, the offline world has fewer).
    temperature: the distributions are softmax(logits / temperature); 1 = the model's own
    distribution (default); acgd.tau (20) = the softened distribution ACGD distils.
    Writes <output_dir>/fragility.{json,txt,png}; returns {"rows", "pooled", "paths", "table"}.
    """
    from ..api import make_config
    if score not in SCORES:
        raise ConfigError(f"unknown fragility score '{score}'; choose one of {SCORES}")
    refuse_multi_process("the fragility analysis")
    if method is not None:  # run__method= was replaced by method= without a word
        refuse_decided_keys("fragility()", overrides, {"run.method": f"it trains method= ({method!r} here): pass "
                                                                  "method=... (method=None keeps the config's run.method)"})
    cfg = analysis_config(make_config(config, **overrides), "fragility")
    out = Path(cfg.run.output_dir)
    resolve_threshold(torch.zeros(1), threshold)  # a bad threshold fails before training
    if not temperature > 0:
        raise ConfigError(f"fragility temperature must be > 0, got {temperature}")
    max_old_images = 0 if max_old_images is None else max_old_images  # None: all, as 0
    if isinstance(max_old_images, bool) or not isinstance(max_old_images, int) or max_old_images < 0:
        raise ConfigError(f"fragility max_old_images must be a whole number >= 0 (0: all), got {max_old_images!r}")
    # before the model and data load; data.num_tasks is the scenario's (config.check_task_count)
    wanted = _tasks_to_analyse(entries(tasks), cfg.data.num_tasks)
    run_cfg = run_config(cfg, method, out / "run")
    start_table_files(out, "fragility", [run_cfg], resume=cfg.run.resume)
    trainer = make_trainer(run_cfg)
    rows = []
    for t in range(wanted[-1] + 1):
        if t in wanted:
            rows.append(measure_task(trainer, t, score, threshold, max_old_images, temperature))
            log.info("fragility task %d: boundary %.4f core %.4f", t + 1, rows[-1]["boundary"]["mean"] or 0,
                     rows[-1]["core"]["mean"] or 0)
        else:
            trainer.train_task(t)
    pooled = _pooled(rows)
    table = format_fragility_table(rows, pooled, trainer.cfg.run.method, score, temperature)
    payload = {"method": trainer.cfg.run.method, "score": score, "threshold_rule": threshold,
               "temperature": temperature,
               "tasks": rows, "pooled": pooled, "config": trainer.cfg.to_dict()}
    paths = write_table_files(out, "fragility", payload, table, plots=cfg.run.plots)
    if cfg.run.plots:
        paths["png"] = plot_fragility(rows, out / "fragility.png", trainer.cfg.run.method, score, temperature)
    return {"rows": [{k: v for k, v in r.items() if k != "values"} for r in rows], "pooled": pooled,
            "paths": paths, "table": table}


def _pooled_values(rows: list, key: str, boundary: bool | None = None) -> np.ndarray:
    """rows' per-image `key` values concatenated; boundary=True/False keeps only boundary/core images."""
    vals = []
    for r in rows:
        v = np.asarray(r["values"][key], dtype=float)
        if boundary is not None:
            m = np.asarray(r["values"]["is_boundary"], dtype=bool)
            v = v[m if boundary else ~m]
        vals.append(v)
    return np.concatenate(vals) if vals else np.zeros(0)


def _pooled(rows: list) -> dict:
    def cat(key, boundary=None):
        return torch.from_numpy(_pooled_values(rows, key, boundary))
    pooled = {"boundary": group_stats(cat("jsd", True)), "core": group_stats(cat("jsd", False)),
              "anchors": group_stats(cat("jsd_anchors")), "random_new": group_stats(cat("jsd_random_new"))}
    pooled["tasks_boundary_gt_core"] = sum(
        1 for r in rows if r["boundary"]["mean"] is not None and r["core"]["mean"] is not None
        and r["boundary"]["mean"] > r["core"]["mean"])
    pooled["tasks_anchors_gt_random"] = sum(1 for r in rows if r["anchors"]["mean"] > r["random_new"]["mean"])
    pooled["tasks"] = len(rows)
    return pooled


def format_fragility_table(rows: list, pooled: dict, method: str, score: str, temperature: float = 1.0) -> str:
    from ..report import format_table
    header = ["task", "threshold", "boundary mean", "boundary med", "core mean", "core med", "corr(score,JSD)",
              "anchors mean", "anchors med", "random mean", "random med"]
    body = []
    for r in rows + [dict(pooled, task="all", threshold=None, score_jsd_correlation=None)]:
        body.append([str(r["task"]), r["threshold"], r["boundary"]["mean"], r["boundary"]["median"],
                     r["core"]["mean"], r["core"]["median"], r["score_jsd_correlation"],
                     r["anchors"]["mean"], r["anchors"]["median"], r["random_new"]["mean"],
                     r["random_new"]["median"]])
    title = (f"fragility ({method}; score={score}; temperature={temperature:g}; JSD in nats, max ln2=0.693): "
             f"boundary > core in "
             f"{pooled['tasks_boundary_gt_core']}/{pooled['tasks']} tasks, anchors > random new-task images in "
             f"{pooled['tasks_anchors_gt_random']}/{pooled['tasks']}")
    return format_table(body, header, floatfmt=".4g", title=title)  # 4 significant digits: JSDs may be ~1e-5


def replot_fragility(json_path, png_path=None) -> str:
    """Redraw fragility.png from a fragility.json (no model needed)."""
    import json
    data = json.loads(Path(json_path).read_text())
    return plot_fragility(data["tasks"], png_path or Path(json_path).with_suffix(".png"), data["method"],
                          data.get("score"), data.get("temperature"))


def plot_fragility(rows: list, path, method: str, score: Optional[str] = None,
                   temperature: Optional[float] = None) -> str:
    """Two histograms (pooled over tasks): boundary vs core JSD; anchors vs random new-task images."""
    fig = new_figure((10.0, 4.0))
    pairs = [(("boundary", "jsd", True), ("core", "jsd", False)),
             (("DPGD anchors", "jsd_anchors", None), ("random new-task images", "jsd_random_new", None))]
    titles = ["old-class test images (over seen classes)", "anchors vs new images (over old classes)"]
    for i, (pair, title) in enumerate(zip(pairs, titles)):
        ax = fig.add_subplot(1, 2, i + 1)
        series = [(label, _pooled_values(rows, key, boundary)) for label, key, boundary in pair]
        # heavy-tailed values: log-spaced bins, values below FLOOR (incl. exact 0) in the first bin
        top = max([float(v.max()) for _, v in series if v.size] + [10 * JSD_FLOOR])
        bins = np.logspace(np.log10(JSD_FLOOR), np.log10(max(top, 10 * JSD_FLOOR)), 40)
        for label, v in series:
            ax.hist(np.clip(v, JSD_FLOOR, None), bins=bins, alpha=0.55,
                    label=f"{label} (n={v.size}, mean={v.mean():.3g})" if v.size else f"{label} (none)")
        ax.set_xscale("log")
        ax.set_xlabel(f"JSD(before, after task t) [nats, log; < {JSD_FLOOR:g} in the first bin]")
        ax.set_ylabel("images")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    how = "".join(part for part in (f", score={score}" if score else "",
                                   f", temperature={temperature:g}" if temperature is not None else ""))
    fig.suptitle(f"fragility: {method}{how}, tasks {', '.join(str(r['task']) for r in rows)}", fontsize=10)
    return save_png(fig, path)
