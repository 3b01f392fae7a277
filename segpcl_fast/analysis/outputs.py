"""What every analysis writes: <out>/<name>.json (strict JSON), <name>.txt (the printed table),
<name>.png, all atomically; plus the small shared pieces (figures, a Trainer for a variant,
per-image CLIP-path embeddings)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..api import check_unique, start_table_files  # noqa: F401  (the analyses' checks are the API's)
from ..config import Config, ConfigError, apply_overrides, check_resume_dir  # noqa: F401
from ..report.results import write_table_files  # noqa: F401  (the analyses' table files)
from ..report.tables import mean_std, metric_columns, plus_minus  # noqa: F401  (the analyses' table cells)

DPI = 120


def new_figure(size=(6.0, 4.0)) -> Figure:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend)."""
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike) -> str:
    from ..report.plots import save_figure
    return str(save_figure(fig, path))


def require_old_classes(cfg: Config, what: str, why: str = "task 1 has no old classes") -> None:
    """One ConfigError before anything loads when the scenario has one task (data.num_tasks, which
    data.task_sizes must match): the analyses that look at old classes have nothing to look at."""
    if cfg.data.num_tasks < 2:
        raise ConfigError(f"{what} needs at least 2 tasks (data.num_tasks >= 2, got {cfg.data.num_tasks}): {why}")


def run_config(cfg: Config, method: Optional[str], output_dir: str | os.PathLike) -> Config:
    """cfg with run.method (when given) and run.output_dir set; run.resume only where that dir exists
    (an interrupted sweep continues, its runs not started yet start)."""
    overrides = {"run.output_dir": str(output_dir), "run.resume": cfg.run.resume and Path(output_dir).is_dir()}
    if method is not None:
        overrides["run.method"] = method
    return apply_overrides(cfg, overrides)


def make_trainer(cfg: Config):
    from ..engine.trainer import Trainer
    return Trainer(cfg)


@torch.no_grad()
def encode_batches(model, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x), v̄(x)) in fp32, on the model's device, for a tensor of normalised images anywhere (a
    task's images stay on the CPU: only one batch at a time goes to the device; model in eval mode)."""
    params = getattr(model, "parameters", None)
    device = next(params(), images).device if params is not None else images.device
    raws, embs = [], []
    for start in range(0, images.shape[0], batch_size):
        raw, emb = model.encode_image(images[start:start + batch_size].to(device, non_blocking=True))
        raws.append(raw.float())
        embs.append(F.normalize(emb.float(), dim=-1))
    return torch.cat(raws), torch.cat(embs)


def stack_dataset(dataset, device: torch.device = torch.device("cpu"),
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """All (image, label) pairs of a dataset as two tensors (images already transformed), on `device`
    (the analyses keep them on the CPU: a task of ImageNet-Subset is ~8 GB at 224 px in fp32)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(torch.as_tensor(y))
    if not images:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(images).to(device), torch.cat(labels).to(device)


METRICS = ("Avg", "Last", "Forgetting", "BWT", "FWT", "Forgetting_own")  # ablate's columns


def summarize_runs(results: list, keys: Iterable[str] = METRICS) -> dict:
    """{key: mean, key_std: sample std, key_n: runs with it} over Results (train() outputs) per metric."""
    return metric_columns([r.metrics for r in results], list(keys))


def slug(text: str) -> str:
    """A folder-safe name for a variant or a grid point."""
    keep = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text.replace("+", "plus_"))
    return keep.strip("_") or "run"


LogFn = Callable[[str], None]
