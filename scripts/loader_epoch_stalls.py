"""How long a training loop waits for data: one DataLoader iterator per epoch vs one per task.

A DataLoader with workers starts them afresh on every `iter(loader)` and the first batch of each
epoch waits for one worker to decode a whole batch; the trainer's loader (`_train_loader`) yields
all of a task's batches from one iterator, so the workers prefetch across epoch boundaries.

    python scripts/loader_epoch_stalls.py --images 256 --batch 32 --workers 2 --epochs 4 --step-ms 100

The step is simulated by sleeping `--step-ms` (a GPU step leaves the CPU to the workers). Images are
JPEGs of ImageNet-R's typical size written to a temporary folder, read through the package's own
file-list dataset and CLIP training transform. Prints the loop's wall time and data wait per variant.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from segpcl_fast.api import make_config
from segpcl_fast.data.base import FileListDataset
from segpcl_fast.data.transforms import build_transforms
from segpcl_fast.engine import distributed as ddp
from segpcl_fast.engine.trainer import _train_loader


def write_images(root: Path, n: int, size: tuple[int, int]) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # smooth random content (a noise field upsampled) compresses like a photo, unlike white noise
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        path = root / f"img_{i:05d}.jpg"
        Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=90)
        paths.append(str(path))
    return paths


def run_loop(batches, num_steps: int, step_s: float) -> tuple[float, float]:
    """(wall seconds, seconds spent waiting for the next batch) over num_steps steps."""
    wait = 0.0
    start = time.perf_counter()
    it = iter(batches)
    for _ in range(num_steps):
        t0 = time.perf_counter()
        next(it)
        wait += time.perf_counter() - t0
        time.sleep(step_s)
    return time.perf_counter() - start, wait


def per_epoch_iterators(loader: DataLoader, epochs: int):
    for _ in range(epochs):
        yield from loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--step-ms", type=float, default=100.0)
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    args = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images, tuple(args.size))
        train_tf, _ = build_transforms(224)
        dataset = FileListDataset(paths, [i % 10 for i in range(len(paths))], [str(c) for c in range(10)], train_tf)
        steps = math.ceil(len(dataset) / args.batch) * args.epochs
        cfg = make_config(optim__batch_size=args.batch, num_workers=args.workers)

        per_epoch = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                               generator=torch.Generator().manual_seed(0))
        rows = {
            "one iterator per epoch (DataLoader(shuffle=True))": per_epoch_iterators(per_epoch, args.epochs),
            "one iterator per task (trainer._train_loader)": _train_loader(dataset, cfg, 0, ddp.DistContext(), steps),
        }
        print(f"{args.images} JPEGs {args.size[0]}x{args.size[1]}, batch {args.batch}, {args.workers} workers, "
              f"{args.epochs} epochs = {steps} steps, simulated step {args.step_ms:.0f} ms "
              f"(floor {steps * args.step_ms / 1000:.2f} s)")
        for name, batches in rows.items():
            wall, wait = run_loop(batches, steps, args.step_ms / 1000)
            print(f"{name}: {wall:.2f} s wall, {wait:.2f} s waiting for data")


if __name__ == "__main__":
    main()
