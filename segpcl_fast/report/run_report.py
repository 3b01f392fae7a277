"""What a finished run leaves behind and what the CLI prints about it.

    paths = write_run_report(result, out, plots=True, class_names=names)
        # out/results.json, out/accuracy_matrix.png, out/acc_per_task.png, out/loss_curves.png -> {name: path}
    text = format_run_summary(result)       # metrics table + accuracy matrix + files

`result` is the trainer's Result (anything with .to_dict()) or a plain dict with the keys
accuracy_matrix, acc_per_task, metrics, fwt_before, output_dir, timings, ops, config, paths
(optional: accuracy_matrix_own, loss_per_epoch).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .. import metrics as M
from .results import write_results
from .tables import format_accuracy_matrix, format_metrics_table

RESULTS_FILE = "results.json"
MATRIX_PNG = "accuracy_matrix.png"
CURVE_PNG = "acc_per_task.png"
LOSS_PNG = "loss_curves.png"
REPORT_FILES = (RESULTS_FILE, MATRIX_PNG, CURVE_PNG, LOSS_PNG)  # what write_run_report may leave in a run dir


def _as_dict(result: Any) -> dict:
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def run_label(config: Mapping) -> str:
    """'method' of the run (config run.method), or 'run' when the config does not say."""
    return str(config.get("run", {}).get("method", "run")) if config else "run"


def results_row(result: Any, label: Optional[str] = None) -> dict:
    """One table row {"method": label, "dataset": ..., Avg, Last, Forgetting, BWT, FWT}."""
    r = _as_dict(result)
    cfg = r.get("config") or {}
    row = {"method": label or run_label(cfg)}
    if cfg.get("data", {}).get("dataset"):
        row["dataset"] = cfg["data"]["dataset"]
    row.update({k: r["metrics"].get(k) for k in M.METRIC_NAMES})
    row.update({k: r["metrics"][k] for k in M.EXTRA_METRIC_NAMES if k in r["metrics"]})
    return row


def write_run_report(result: Any, output_dir: str | os.PathLike, plots: bool = True,
                     class_names: Optional[Sequence[str]] = None) -> dict[str, str]:
    """Write results.json (always) and the PNG plots (if `plots`: the accuracy matrix and curve,
    and the loss curves when the run trained); returns {name: path}."""
    r = _as_dict(result)
    out = Path(output_dir)
    paths = {"output_dir": str(out)}
    if plots:
        from . import plots as P  # matplotlib only when plotting
        label = run_label(r.get("config") or {})
        paths["accuracy_matrix_png"] = str(P.plot_accuracy_matrix(
            M.matrix_from_list(r["accuracy_matrix"]), out / MATRIX_PNG, title=f"{label}: accuracy a[t][j]"))
        paths["acc_per_task_png"] = str(P.plot_acc_curves({label: r["acc_per_task"]}, out / CURVE_PNG))
        if any(r.get("loss_per_epoch") or []):
            paths["loss_curves_png"] = str(P.plot_loss_curves(r["loss_per_epoch"], out / LOSS_PNG,
                                                              title=f"{label}: training loss, mean per epoch"))
    # run.tensorboard's event files (engine.tensorboard_log.TENSORBOARD_DIR), with the rest of what the run wrote
    for name, rel in [("config", "config.yaml"), ("checkpoints", "checkpoints"), ("tensorboard", "tensorboard")]:
        if (out / rel).exists():
            paths[name] = str(out / rel)
    paths["results"] = str(out / RESULTS_FILE)
    extra = {}
    if class_names is not None:
        extra["class_names"] = list(class_names)
    if r.get("accuracy_matrix_own"):
        extra["matrix_own"] = r["accuracy_matrix_own"]
    if r.get("loss_per_epoch"):
        extra["loss_per_epoch"] = r["loss_per_epoch"]
    for key in ("counts", "run"):
        if r.get(key):
            extra[key] = r[key]
    write_results(out / RESULTS_FILE, config=r.get("config") or {},
                  matrix=M.matrix_from_list(r["accuracy_matrix"]), acc_per_task=r["acc_per_task"],
                  metrics=r["metrics"], fwt_before=r.get("fwt_before"), timings=r.get("timings"),
                  paths=paths, ops=r.get("ops") or {},
                  extra=extra or None, device=(r.get("run") or {}).get("device"))
    return paths


def format_run_summary(result: Any) -> str:
    """Metrics table, the accuracy matrix with acc_t, and the files written."""
    r = _as_dict(result)
    parts = [format_metrics_table([results_row(r)], title="metrics (%)")]
    matrix = M.matrix_from_list(r["accuracy_matrix"])
    if matrix.shape[0] <= 20:
        parts.append("accuracy matrix a[t][j] (%)\n" + format_accuracy_matrix(matrix, r["acc_per_task"]))
    if r.get("ops"):
        parts.append("fused ops: " + ", ".join(f"{k}={v}" for k, v in sorted(r["ops"].items())))
    paths = r.get("paths") or {}
    if paths:
        parts.append("files:\n" + "\n".join(f"  {k}: {v}" for k, v in paths.items()))
    return "\n\n".join(parts)
