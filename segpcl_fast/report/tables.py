"""Plain-text tables for people (the CLI prints them; nothing here prints).

    print(format_metrics_table([{"method": "segpcl", **metrics}, {"method": "lora", **m2}]))

    method   |   Avg |  Last | Forgetting |   BWT |   FWT
    ---------+-------+-------+------------+-------+------
    segpcl   | 89.80 | 84.60 |       4.50 | -3.10 | 61.20
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..metrics import EXTRA_METRIC_NAMES, METRIC_NAMES

TABLE_METRICS = METRIC_NAMES + EXTRA_METRIC_NAMES

MISSING = "n/a"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def format_cell(v: Any, floatfmt: str = ".2f") -> str:
    if v is None or (_is_number(v) and not math.isfinite(float(v))):
        return MISSING
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return str(int(v))
    if _is_number(v):
        return format(float(v), floatfmt)
    return str(v)


def mean_std(values) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample std (ddof 1) of the non-None values; the std is None below two values (one
    run has no spread to show, not a spread of 0), both None for none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5


def metric_columns(runs_metrics: Sequence[Mapping], keys: Sequence[str]) -> dict:
    """{key: mean, key_std: sample std, key_n: runs that have it} over the runs' metrics dicts (a
    metric a run lacks, e.g. one resumed from an older checkpoint, is left out, and key_n says so)."""
    row = {}
    for key in keys:
        values = [m.get(key) for m in runs_metrics]
        row[key], row[key + "_std"] = mean_std(values)
        row[key + "_n"] = sum(v is not None for v in values)
    return row


def plus_minus(mean: Optional[float], std: Optional[float], n: int, n_used: Optional[int] = None) -> str:
    """A table cell: "mean +- std" over n > 1 runs (a std of 0.00 shown too: those runs agree), "mean" for
    one run, "n/a" for none; "(n=k)" when only k of the n runs have the value."""
    if mean is None:
        return "n/a"
    cell = f"{mean:.2f} +- {std:.2f}" if n > 1 and std is not None else f"{mean:.2f}"
    return cell + (f" (n={n_used})" if n_used is not None and n_used < n else "")


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str], floatfmt: str = ".2f",
                 title: Optional[str] = None) -> str:
    """Aligned text table: numbers right-aligned, text left-aligned, None/NaN as 'n/a'."""
    cells = [[format_cell(v, floatfmt) for v in row] for row in rows]
    for row in cells:
        if len(row) != len(header):
            raise ValueError(f"table row has {len(row)} cells but the header has {len(header)}: {row}")
    numeric = [all(_is_number(r[i]) or r[i] is None for r in rows) and bool(rows)
               for i in range(len(header))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

    def line(values):
        return " | ".join(v.rjust(w) if num else v.ljust(w)
                          for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(header), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def format_metrics_table(rows: Sequence[dict], columns: Optional[Sequence[str]] = None,
                         floatfmt: str = ".2f", title: Optional[str] = None) -> str:
    """One row per dict. Default columns: the non-metric keys of the first row, then the
    metrics (Avg, Last, Forgetting, BWT, FWT, Forgetting_own) present in any row. A key missing from a row is n/a."""
    if not rows:
        raise ValueError("format_metrics_table needs at least one row")
    if columns is None:
        present = {k for r in rows for k in r}
        columns = [k for k in rows[0] if k not in TABLE_METRICS]
        columns += [k for k in TABLE_METRICS if k in present]
    return format_table([[r.get(c) for c in columns] for r in rows], list(columns), floatfmt, title)


def format_accuracy_matrix(matrix, acc_per_task=None, floatfmt: str = ".1f") -> str:
    """Accuracy matrix a[t][j] as a table (rows: after task t, columns: task j; 1-based labels),
    with an optional final column acc_t."""
    a = np.asarray(matrix, dtype=float)
    header = ["after"] + [f"T{j + 1}" for j in range(a.shape[1])]
    rows = [[f"task {t + 1}"] + list(a[t]) for t in range(a.shape[0])]
    if acc_per_task is not None:
        header.append("acc_t")
        for row, v in zip(rows, acc_per_task):
            row.append(float(v))
    return format_table(rows, header, floatfmt)
