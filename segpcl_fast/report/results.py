"""results.json: everything a run produced, in one strict-JSON file written atomically.

    write_results(out / "results.json", config=cfg.to_dict(), matrix=a, acc_per_task=acc,
                  metrics=summarize(a, acc, before), fwt_before=before,
                  timings={"train_s": 812.3}, paths={"checkpoints": "..."})
    res = read_results(out / "results.json")   # res["matrix"] is a numpy array (NaN above diag)

NaN/inf never reach the file (they become null); numpy scalars and arrays become numbers/lists.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .. import metrics as M
from ..version import __version__
from ..fileio import atomic_write_bytes, atomic_write_text

log = logging.getLogger("segpcl_fast.report")

SCHEMA_VERSION = 1


def to_jsonable(obj: Any) -> Any:
    """numpy / Path / tuple / non-finite float -> plain JSON values (NaN, inf -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # 0-d torch tensors
        return to_jsonable(obj.item())
    raise TypeError(f"cannot store {type(obj).__name__} in results.json: {obj!r}")


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_revision() -> Optional[dict]:
    """{"commit", "dirty"} of the git checkout the package runs from (an editable install or a source
    tree; `__version__` alone does not change between commits); None for an installed copy or
    without git. dirty: tracked files differ from the commit."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def collect_versions(device=None) -> dict[str, Optional[str]]:
    """Versions of the software that produced a result (None when a package is absent), and the
    name of `device` (the run's; default: the first GPU if any, else the CPU)."""
    versions = {"segpcl_fast": __version__, "python": platform.python_version()}
    for key, dist in [("torch", "torch"), ("open_clip", "open_clip_torch"), ("triton", "triton"),
                      ("numpy", "numpy"), ("torchvision", "torchvision")]:
        versions[key] = _dist_version(dist)
    try:
        import torch
        versions["cuda"] = torch.version.cuda
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        versions["device_name"] = (torch.cuda.get_device_name(device.index or 0) if device.type == "cuda"
                                   else cpu_name())
    except ImportError:
        pass
    versions["source"] = source_revision()
    return versions


def cpu_name() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) ..."): Linux's /proc/cpuinfo, else what platform says
    (platform.processor() is often empty, and platform.machine() is the architecture, x86_64)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fused_ops_used() -> dict[str, str]:
    """{op: the implementations it ran} since the last dispatch.reset_choices() (a run's start)."""
    from ..ops import dispatch
    return dispatch.choices_used()


def build_results(*, config: Mapping, matrix, acc_per_task, metrics: Mapping,
                  fwt_before=None, timings: Optional[Mapping] = None,
                  paths: Optional[Mapping] = None, ops: Optional[Mapping] = None,
                  extra: Optional[Mapping] = None, device=None) -> dict:
    """The results dict (JSON-ready). `ops=None` asks ops.dispatch which implementations ran;
    `device`: the run's, whose name the versions record."""
    return to_jsonable({
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "metrics": dict(metrics),
        "acc_per_task": list(np.asarray(acc_per_task, dtype=float).reshape(-1)),
        "matrix": M.matrix_to_list(matrix),
        "fwt_before": None if fwt_before is None else [None if v is None else float(v) for v in fwt_before],
        "timings": dict(timings or {}),
        "paths": dict(paths or {}),
        "ops": dict(fused_ops_used() if ops is None else ops),
        "versions": collect_versions(device),
        "config": dict(config),
        **dict(extra or {}),
    })


def write_results(path: str | os.PathLike, **fields) -> Path:
    """Build (see `build_results`) and write results.json atomically; returns the path."""
    data = build_results(**fields)
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode())


def read_results(path: str | os.PathLike) -> dict:
    """Load results.json; "matrix" comes back as a numpy array with NaN above the diagonal."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}; run `segpcl-fast train` first")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data["matrix"] = M.matrix_from_list(data["matrix"])
        missing = [k for k in ("acc_per_task", "metrics") if k not in data]
        if missing:
            raise KeyError(", ".join(missing))
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not a whole results.json ({type(e).__name__}: {e})") from None
    return data


TABLE_SUFFIXES = (".json", ".txt", ".png")


def clear_table_files(out: str | os.PathLike, name: str) -> None:
    """Remove an earlier analysis' <out>/<name>.{json,txt,png} before this one trains: one that stops before
    its end (an error at its fourth variant, Ctrl-C) left the earlier numbers beside its new runs, as if they
    were its own. write_table_files writes them again at the end; a --resume keeps them until it rebuilds them
    from the runs (api.start_table_files)."""
    removed = []
    for suffix in TABLE_SUFFIXES:
        path = Path(out) / f"{name}{suffix}"
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    if removed:
        log.info("removed the earlier %s (written again when this analysis finishes)", ", ".join(removed))


def write_table_files(out: str | os.PathLike, name: str, payload: dict, table: str, plots: bool = True) -> dict:
    """Write <out>/<name>.json and <out>/<name>.txt atomically; returns their paths. plots=False
    (run.plots=false): an earlier run's <out>/<name>.png is removed, not left beside other numbers (the
    caller draws it anew otherwise)."""
    out = Path(out)
    json_path, txt_path = out / f"{name}.json", out / f"{name}.txt"
    atomic_write_text(json_path, json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
    atomic_write_text(txt_path, table + "\n")
    if not plots:
        (out / f"{name}.png").unlink(missing_ok=True)
    return {"json": str(json_path), "table": str(txt_path)}
