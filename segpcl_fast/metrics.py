"""Class-incremental metrics, exactly as ../shared/method.md ("Metrics") defines them.

Ground floor: numpy and the standard library only, no part of the package.

Conventions (all functions):
- Tasks are 0-based in code, 1-based in method.md: code task t is the paper's task t+1.
- Accuracies are in percent (0..100), as floats.
- The accuracy matrix `a` is T x T: a[t, j] = accuracy on task j's test images after training
  task t (predicting among all classes seen so far); entries above the diagonal (j > t) are NaN.
- acc_t is the accuracy on ALL seen test images after task t: the test-count-weighted mean of
  a[t, :t+1] (equal to total correct / total images). It is not the plain row mean unless all
  tasks have the same number of test images.
- A metric that is undefined (Forgetting and BWT with T = 1, FWT with T = 1) is returned as
  None, everywhere (single functions and `summarize`), so results.json gets `null` and never a
  non-standard NaN.

    correct = [[90, nan], [80, 70]]      # correct[t][j]: right answers on task j after task t
    total = [100, 100]                   # test images per task
    a = accuracy_matrix(correct, total)  # [[90, nan], [80, 70]] percent
    acc = acc_per_task(correct, total)   # [90, 75]
    summarize(a, acc)                    # {"Avg": 82.5, "Last": 75.0, "Forgetting": 10.0, ...}
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

METRIC_NAMES = ("Avg", "Last", "Forgetting", "BWT", "FWT")
# Not in method.md: Forgetting measured in each task's own label space (see forgetting_own_space).
EXTRA_METRIC_NAMES = ("Forgetting_own",)


class MetricsError(ValueError):
    """Inputs that cannot be turned into metrics; the message names the problem."""


# ----------------------------------------------------------------------------- validation

def _square_lower(matrix, name: str = "accuracy matrix") -> np.ndarray:
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise MetricsError(f"{name} must be a non-empty T x T array, got shape {a.shape}")
    lower = np.tril(np.ones(a.shape, dtype=bool))
    if not np.all(np.isfinite(a[lower])):
        bad = [(int(t), int(j)) for t, j in zip(*np.nonzero(lower & ~np.isfinite(a)))]
        raise MetricsError(f"{name} has missing/non-finite entries on or below the diagonal at "
                           f"(t, j) = {bad[:5]}; every task j <= t must be evaluated after task t")
    return a


def _check_percent(a: np.ndarray, name: str) -> None:
    vals = a[np.isfinite(a)]
    if vals.size and (vals.min() < 0.0 or vals.max() > 100.0 + 1e-9):
        raise MetricsError(f"{name} must be in percent (0..100), got values in "
                           f"[{vals.min():.4g}, {vals.max():.4g}]")


def _task_sizes(total, T: int) -> np.ndarray:
    n = np.asarray(total, dtype=np.float64).reshape(-1)
    if n.shape != (T,):
        raise MetricsError(f"per-task test counts must have length T={T}, got shape {n.shape}")
    if np.any(n <= 0) or not np.all(np.isfinite(n)):
        raise MetricsError(f"per-task test counts must be positive, got {n.tolist()}; "
                           "a task with no test images cannot be scored")
    return n


# ----------------------------------------------------------------------------- from counts

def accuracy_matrix(correct, total) -> np.ndarray:
    """T x T accuracy matrix in percent from counts.

    correct[t][j]: number of correctly classified test images of task j after task t (entries
    above the diagonal are ignored and may be anything, e.g. NaN); total[j]: test images of task j.
    """
    c = np.asarray(correct, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] == 0:
        raise MetricsError(f"correct counts must be a non-empty T x T array, got shape {c.shape}")
    T = c.shape[0]
    n = _task_sizes(total, T)
    lower = np.tril(np.ones((T, T), dtype=bool))
    c = np.where(lower, c, np.nan)
    _square_lower(c, "correct counts")
    over = lower & (c > n[None, :])
    if np.any(over) or np.any(c[lower] < 0):
        raise MetricsError("correct counts must lie in [0, total[j]] for each task j")
    return 100.0 * c / n[None, :]


def acc_per_task(correct, total) -> np.ndarray:
    """acc_t for every t, in percent: sum_{j<=t} correct[t][j] / sum_{j<=t} total[j]."""
    a = accuracy_matrix(correct, total)  # validates
    c = np.asarray(correct, dtype=np.float64)
    n = _task_sizes(total, a.shape[0])
    return np.array([100.0 * c[t, : t + 1].sum() / n[: t + 1].sum() for t in range(a.shape[0])])


def acc_per_task_from_matrix(matrix, task_sizes) -> np.ndarray:
    """acc_t from a percent matrix and per-task test counts (count-weighted row means)."""
    a = _square_lower(matrix)
    n = _task_sizes(task_sizes, a.shape[0])
    return np.array([float(np.dot(a[t, : t + 1], n[: t + 1]) / n[: t + 1].sum())
                     for t in range(a.shape[0])])


def percent(correct: float, total: float) -> float:
    """100 * correct / total, with a clear error for an empty test set."""
    if total <= 0:
        raise MetricsError(f"cannot compute an accuracy over {total} test images")
    return 100.0 * float(correct) / float(total)


# ----------------------------------------------------------------------------- the metrics

def last(acc) -> float:
    """Last = acc_T (accuracy on all test images after the final task)."""
    acc = np.asarray(acc, dtype=np.float64).reshape(-1)
    if acc.size == 0:
        raise MetricsError("acc per task is empty")
    return float(acc[-1])


def average(acc) -> float:
    """Avg = mean over t of acc_t."""
    acc = np.asarray(acc, dtype=np.float64).reshape(-1)
    if acc.size == 0 or not np.all(np.isfinite(acc)):
        raise MetricsError(f"acc per task must be non-empty and finite, got {acc.tolist()}")
    return float(acc.mean())


def forgetting(matrix) -> Optional[float]:
    """Forgetting = mean over j < T of max_{j <= t < T} a[t][j] - a[T][j]; None when T = 1."""
    a = _square_lower(matrix)
    T = a.shape[0]
    if T < 2:
        return None
    drops = [a[j: T - 1, j].max() - a[T - 1, j] for j in range(T - 1)]
    return float(np.mean(drops))


def forgetting_own_space(matrix_own) -> Optional[float]:
    """Forgetting of the own-space matrix; None when T = 1.

    matrix_own[t][j]: accuracy on task j's test images after task t, predicting among C_<=j only
    (the classes seen when task j was learned) instead of all of C_<=t. Its diagonal equals the
    accuracy matrix's. Plain Forgetting also counts the images of task j that later classes take
    over merely because the label space grew (a frozen zero-shot model "forgets" that way too);
    this one counts only what changed among the classes task j competed with when it was learned.
    """
    return forgetting(matrix_own)


def backward_transfer(matrix) -> Optional[float]:
    """BWT = mean over j < T of a[T][j] - a[j][j]; None when T = 1."""
    a = _square_lower(matrix)
    T = a.shape[0]
    if T < 2:
        return None
    return float(np.mean([a[T - 1, j] - a[j, j] for j in range(T - 1)]))


def forward_transfer(before) -> Optional[float]:
    """FWT = mean over tasks j >= 2 (1-based) of the accuracy on task j before training on it.

    `before` has length T; before[j] (0-based) is the accuracy on task j's test images measured
    with the model after task j-1. before[0] (task 1, nothing trained yet) is ignored and may be
    NaN/None. Returns None when T = 1.
    """
    b = np.array([np.nan if v is None else v for v in before], dtype=np.float64).reshape(-1)
    if b.size < 2:
        return None
    rest = b[1:]
    if not np.all(np.isfinite(rest)):
        raise MetricsError(f"FWT 'before' accuracies of tasks 2..T must be finite, got {rest.tolist()}")
    _check_percent(rest, "FWT 'before' accuracies")
    return float(rest.mean())


def summarize(matrix, acc_per_task, fwt_before=None, matrix_own=None) -> dict:
    """{"Avg", "Last", "Forgetting", "BWT", "FWT"} in percent (float) or None where undefined.

    FWT is None when `fwt_before` is not given or T = 1; Forgetting and BWT are None when T = 1.
    With `matrix_own` (see forgetting_own_space) the dict also holds "Forgetting_own".
    """
    a = _square_lower(matrix)
    _check_percent(a, "accuracy matrix")
    acc = np.asarray(acc_per_task, dtype=np.float64).reshape(-1)
    if acc.shape != (a.shape[0],):
        raise MetricsError(f"acc per task must have length T={a.shape[0]}, got {acc.shape}")
    _check_percent(acc, "acc per task")
    for t in range(a.shape[0]):  # a weighted mean of row t's accuracies lies within them
        lo, hi = float(np.min(a[t, :t + 1])), float(np.max(a[t, :t + 1]))
        if not lo - 1e-6 <= acc[t] <= hi + 1e-6:
            raise MetricsError(f"acc per task [{t}] = {acc[t]:g} lies outside row {t} of the accuracy matrix "
                               f"([{lo:g}, {hi:g}]): acc_t is the image-weighted mean of a[t][0..t], in the "
                               f"same units (percent)")
    if fwt_before is not None and len(fwt_before) != a.shape[0]:
        raise MetricsError(f"fwt_before must have length T={a.shape[0]} (entry 0 is ignored), "
                           f"got {len(fwt_before)}")
    return {
        "Avg": average(acc),
        "Last": last(acc),
        "Forgetting": forgetting(a),
        "BWT": backward_transfer(a),
        "FWT": forward_transfer(fwt_before) if fwt_before is not None else None,
        **({"Forgetting_own": forgetting_own_space(matrix_own)} if matrix_own is not None else {}),
    }


def matrix_to_list(matrix) -> list[list[Optional[float]]]:
    """Nested lists with None above the diagonal (JSON friendly)."""
    a = np.asarray(matrix, dtype=np.float64)
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in a]


def matrix_from_list(rows: Sequence[Sequence[Optional[float]]]) -> np.ndarray:
    """Inverse of `matrix_to_list`: None -> NaN."""
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
