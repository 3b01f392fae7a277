"""CIFAR-100 in torchvision's on-disk format (the python pickles of the official tarball).

The pickles are read directly (the same decoding torchvision.datasets.CIFAR100 does) so that
a copy without torchvision's md5 check still loads and a broken one gives a clear error.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .base import ArrayDataset
from .files import format_error, found_nearby, require_root

LAYOUT = """  <root>/cifar-100-python/train   (pickle: data (N, 3072) uint8, fine_labels)
  <root>/cifar-100-python/test
  <root>/cifar-100-python/meta    (pickle: fine_label_names)
  (as extracted from cifar-100-python.tar.gz; <root> may also be the cifar-100-python folder)"""

NAME = "cifar100"


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:  # corrupted / not a pickle
        raise format_error(NAME, f"cannot read '{path}' as a CIFAR pickle ({type(exc).__name__}: {exc})",
                           LAYOUT, "re-extract cifar-100-python.tar.gz") from None
    if not isinstance(entry, dict):
        raise format_error(NAME, f"'{path}' does not hold a dict", LAYOUT, "re-extract cifar-100-python.tar.gz")
    # a copy re-saved after pickle.load(..., encoding="bytes") has b"data", b"fine_label_names", ...
    return {_text(k): v for k, v in entry.items()}


def _text(value) -> str:
    """A pickled string: bytes (a copy re-saved with encoding="bytes") decoded as the originals are."""
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _folder(root: Optional[str]) -> Path:
    path = require_root(root, NAME, LAYOUT)
    for cand in (path / "cifar-100-python", path):
        if (cand / "meta").is_file():
            return cand
    tarball = path / "cifar-100-python.tar.gz"
    cifar10 = next((c for c in (path / "cifar-10-batches-py", path) if (c / "batches.meta").is_file()), None)
    fix = (f"extract the tarball there: tar xzf {tarball} -C {path}" if tarball.is_file()
           else found_nearby(path, "cifar-100-python/meta")
           or (f"'{cifar10}' is CIFAR-10 (batches.meta, data_batch_1..5): this benchmark needs CIFAR-100's "
               "cifar-100-python/ (cifar-100-python.tar.gz), e.g. torchvision.datasets.CIFAR100(root, download=True)"
               if cifar10 is not None else "point data.root at the folder that contains cifar-100-python/"))
    raise format_error(NAME, f"no cifar-100-python/meta under '{path}'", LAYOUT, fix)


def _split(folder: Path, split: str, class_names: list[str]) -> tuple[np.ndarray, list[int]]:
    """(images (N, 32, 32, 3) uint8, fine labels) of one pickle."""
    path = folder / split
    if not path.is_file():
        raise format_error(NAME, f"missing file '{path}'", LAYOUT, "re-extract cifar-100-python.tar.gz")
    entry = _load_pickle(path)
    missing = [k for k in ("data", "fine_labels") if k not in entry]
    if missing:
        raise format_error(NAME, f"'{path}' lacks keys {missing} (has {sorted(entry)})", LAYOUT,
                           "this is not the CIFAR-100 python pickle (CIFAR-10 uses 'labels')")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = [int(x) for x in entry["fine_labels"]]
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
        raise format_error(NAME, f"'{path}': data has shape {data.shape} with {len(labels)} labels, "
                                 f"expected (N, 3072) with N labels", LAYOUT, "re-extract the tarball")
    if labels and (min(labels) < 0 or max(labels) >= len(class_names)):
        raise format_error(NAME, f"'{path}': labels outside 0..{len(class_names) - 1}", LAYOUT,
                           "meta and data pickles come from different datasets")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels  # NHWC, as torchvision


def load_cifar100(root: Optional[str], train_transform: Optional[Callable] = None,
                  test_transform: Optional[Callable] = None) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) CIFAR-100 with names from meta['fine_label_names'] ('maple_tree' -> 'maple tree').

    The classes are those the pickles hold images of (meta lists all 100 either way): pickles cut to a
    subset of classes give that subset, relabelled 0..n-1 in CIFAR's order, which the presets'
    data.expected_classes (100) refuses as a partial copy unless it is set to n (or null) on purpose."""
    folder = _folder(root)
    meta = _load_pickle(folder / "meta")
    if "fine_label_names" not in meta:
        raise format_error(NAME, f"'{folder / 'meta'}' lacks key 'fine_label_names' (has {sorted(meta)})",
                           LAYOUT, "re-extract cifar-100-python.tar.gz")
    class_names = [_text(n).replace("_", " ") for n in meta["fine_label_names"]]
    (train_images, train_labels), (test_images, test_labels) = (_split(folder, split, class_names)
                                                                for split in ("train", "test"))
    # a class of either split counts (one with test images only is then the protocol's clear error)
    present = sorted(set(train_labels) | set(test_labels))
    if len(present) < len(class_names):
        relabel = {label: i for i, label in enumerate(present)}
        class_names = [class_names[label] for label in present]
        train_labels, test_labels = ([relabel[x] for x in labels] for labels in (train_labels, test_labels))
    return (ArrayDataset(train_images, train_labels, class_names, train_transform),
            ArrayDataset(test_images, test_labels, class_names, test_transform))
