"""PNG plots: accuracy-matrix heat map, acc-per-task curves, and bar/line helpers for
ablation and sweep tables. Figures are made with matplotlib's object API on the Agg canvas
(no pyplot, no global backend switch, safe in threads) and written atomically.

    plot_accuracy_matrix(a, out / "accuracy_matrix.png")
    plot_acc_curves({"segpcl": acc, "lora_finetune": acc_lora}, out / "acc_per_task.png")
    plot_bars({"LoRA-B": 77.0, "+ACGD": 81.7}, out / "ablation.png", ylabel="Last (%)")
    plot_lines([1, 5, 10], {"Last": [80, 83, 84]}, out / "k_adv.png", xlabel="K_adv")
    plot_loss_curves(result.loss_per_epoch, out / "loss_curves.png")
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..fileio import atomic_write_bytes

DPI = 120


def _new_figure(size=(6.0, 4.0)) -> Figure:
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Render `fig` to PNG in memory, then write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_accuracy_matrix(matrix, path: str | os.PathLike, title: Optional[str] = None,
                         annotate: bool = True) -> Path:
    """Heat map of a[t][j] (rows: after task t, columns: task j), cells annotated with values;
    the empty upper triangle is left blank."""
    a = np.asarray(matrix, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.size == 0:
        raise ValueError(f"accuracy matrix must be a non-empty T x T array, got shape {a.shape}")
    T = a.shape[0]
    side = min(2.0 + 0.55 * T, 14.0)
    fig = _new_figure((side + 1.0, side))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(a), cmap="viridis", vmin=0.0, vmax=100.0)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ticks = np.arange(T)
    ax.set_xticks(ticks, [str(j + 1) for j in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task t")
    ax.set_title(title or "accuracy matrix a[t][j]")
    if annotate and T <= 20:
        for t in range(T):
            for j in range(T):
                if math.isfinite(a[t, j]):
                    ax.text(j, t, f"{a[t, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if a[t, j] < 60 else "black")
    return save_figure(fig, path)


def plot_lines(x: Sequence, series: Mapping[str, Sequence], path: str | os.PathLike,
               xlabel: str = "", ylabel: str = "", title: Optional[str] = None,
               markers: bool = True) -> Path:
    """One line per named series over the shared x values (sweeps, curves)."""
    if not series:
        raise ValueError("plot_lines needs at least one series")
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, ys in series.items():
        ys = np.array([np.nan if v is None else v for v in ys], dtype=float)
        if len(ys) != len(x):
            raise ValueError(f"series '{name}' has {len(ys)} values for {len(x)} x values")
        ax.plot(list(x), ys, marker="o" if markers else None, label=str(name))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def plot_acc_curves(curves: Mapping[str, Sequence[float]], path: str | os.PathLike,
                    title: Optional[str] = None, errors: Optional[Mapping[str, Sequence[float]]] = None) -> Path:
    """acc_t against the task index t = 1..T, one line per method (methods may differ in T); errors:
    a +- bar per point (the std over seeds of a mean curve)."""
    if not curves:
        raise ValueError("plot_acc_curves needs at least one curve")
    fig = _new_figure()
    ax = fig.add_subplot()
    T = 0
    for name, acc in curves.items():
        acc = np.asarray(acc, dtype=float).reshape(-1)
        T = max(T, len(acc))
        ts = np.arange(1, len(acc) + 1)
        if errors is not None and errors.get(name) is not None:
            ax.errorbar(ts, acc, yerr=np.asarray(errors[name], dtype=float).reshape(-1), marker="o", capsize=3,
                        label=str(name))
        else:
            ax.plot(ts, acc, marker="o", label=str(name))
    ax.set_xticks(np.arange(1, T + 1))
    ax.set_xlabel("task t")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "acc per task")
    ax.legend()
    return save_figure(fig, path)


def plot_bars(values: Mapping[str, float | None], path: str | os.PathLike, ylabel: str = "",
              title: Optional[str] = None, annotate: bool = True,
              errors: Optional[Mapping[str, float | None]] = None) -> Path:
    """Bar chart of one number per named variant (ablation tables); None bars are omitted; errors: a
    +- bar per variant (std over seeds)."""
    if not values:
        raise ValueError("plot_bars needs at least one value")
    names = list(values)
    ys = np.array([np.nan if values[n] is None else values[n] for n in names], dtype=float)
    fig = _new_figure((max(4.0, 0.9 * len(names) + 1.5), 4.0))
    ax = fig.add_subplot()
    yerr = None if errors is None else np.array([errors.get(n) or 0.0 for n in names], dtype=float)
    bars = ax.bar(np.arange(len(names)), ys, yerr=yerr, capsize=4 if yerr is not None else 0)  # NaN: no bar
    ax.set_xticks(np.arange(len(names)), names, rotation=30 if len(names) > 4 else 0, ha="right"
                  if len(names) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    if annotate:
        for bar, y in zip(bars, ys):
            if math.isfinite(y):
                ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    return save_figure(fig, path)


LOSS_TITLES = {"cls": "L_cls", "acgd": "L_ACGD (tau^2 KL, before its weight)",
               "gr": "L_GR (TSGR, before its weight)"}


def plot_loss_curves(loss_per_epoch: Sequence[Sequence[Mapping]], path: str | os.PathLike,
                     title: Optional[str] = None) -> Path:
    """One panel per loss term: its per-epoch mean over the whole run (x = epochs counted across
    tasks, 1-based), one line per task, so a task's first epoch does not join the last one's."""
    present = {k for task in loss_per_epoch for row in task for k in row if k not in ("epoch", "steps")}
    terms = [k for k in LOSS_TITLES if k in present] + sorted(present - set(LOSS_TITLES))  # L_cls, L_ACGD, L_GR
    if not terms:
        raise ValueError("plot_loss_curves needs at least one epoch with a loss term")
    fig = _new_figure((7.0, 2.2 * len(terms) + 0.6))
    axes = fig.subplots(len(terms), 1, sharex=True, squeeze=False)[:, 0]
    T = len(loss_per_epoch)  # matplotlib's 10 cycle colours, or one colour a task from a colour map past 10 tasks
    colours = [f"C{t}" for t in range(T)] if T <= 10 else [matplotlib.colormaps["turbo"](t / (T - 1)) for t in range(T)]
    start = 0
    for t, task in enumerate(loss_per_epoch):
        x = [start + row["epoch"] for row in task]
        for ax, term in zip(axes, terms):
            points = [(xi, row[term]) for xi, row in zip(x, task) if row.get(term) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=colours[t], label=f"task {t + 1}")
        start += max((row["epoch"] for row in task), default=0)
    for ax, term in zip(axes, terms):
        ax.set_ylabel(LOSS_TITLES.get(term, term), fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("epoch (all tasks)")
    axes[0].set_title(title or "training loss, mean per epoch")
    tasks = {line.get_label(): line for ax in axes for line in ax.get_lines()}  # each task with a point, once
    tasks = dict(sorted(tasks.items(), key=lambda item: int(item[0].split()[-1])))
    axes[-1].legend(tasks.values(), tasks.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.28 - 0.1 / len(terms)),
                    ncol=min(len(tasks), 10), fontsize=7, frameon=False)  # below the x label: no curve hidden
    return save_figure(fig, path)
