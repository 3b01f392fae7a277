"""build_datasets(data_cfg, train_transform, test_transform) -> (train_ds, test_ds).

Keyed by data_cfg.dataset. Reader options that DataConfig may carry (read with getattr, so a
config without them keeps the defaults): names_file (wnid -> name mapping, ImageNet-R /
ImageNet-Subset), class_list (ImageNet-Subset wnids or PODNet train_100.txt; default
<root>/imagenet100.txt, then <root>/train_100.txt),
frames_dir and official_split (UCF101: its split 1, 2 or 3), split_seed / test_fraction (ImageNet-R 80/20 split, default 0 / 0.2),
split_file (ImageNet-R, RAPF's sectioned train/test file); imagefolder (any dataset in ImageFolder's layout)
reads names_file ({folder: name}), split_seed and test_fraction.
data_cfg.expected_classes (set by the benchmark presets) must match the classes found.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..config import known_class_count
from .base import ClassDataset, ClassSubset, DatasetFormatError

DATASETS = ("synthetic", "cifar100", "imagenet-r", "imagenet-subset", "cub200", "ucf101", "imagefolder")
CAP_SEED = 0  # seed of the per-class caps (max_train_per_class / max_test_per_class)


def cap_per_class(ds: ClassDataset, max_per_class: int, seed: int = CAP_SEED) -> ClassDataset:
    """At most `max_per_class` samples of each class: a seeded random choice per class
    (RandomState(seed + label)), kept in dataset order. Returns `ds` itself when nothing is cut
    (0 = no cap)."""
    if max_per_class <= 0:
        return ds
    targets = np.asarray(ds.targets, dtype=np.int64)
    if targets.size == 0 or np.bincount(targets).max() <= max_per_class:
        return ds
    keep = []
    for label in np.unique(targets):
        idx = np.flatnonzero(targets == label)
        if len(idx) > max_per_class:
            idx = np.sort(np.random.RandomState(seed + int(label)).choice(idx, max_per_class, replace=False))
        keep.append(idx)
    indices = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    return ClassSubset(ds, indices.tolist())


def _read(data_cfg, train_transform: Optional[Callable], test_transform: Optional[Callable]):
    name, root = data_cfg.dataset, data_cfg.root
    opt = lambda key, default=None: getattr(data_cfg, key, default)  # noqa: E731
    if name == "synthetic":
        from .synthetic import build_synthetic_datasets
        return build_synthetic_datasets(data_cfg, train_transform, test_transform)
    if name == "cifar100":
        from .cifar import load_cifar100
        return load_cifar100(root, train_transform, test_transform)
    if name == "imagenet-r":
        from .imagenet_r import load_imagenet_r
        return load_imagenet_r(root, train_transform, test_transform, names_file=opt("names_file"),
                               split_seed=opt("split_seed", 0), test_fraction=opt("test_fraction", 0.2),
                               split_file=opt("split_file"))
    if name == "imagenet-subset":
        from .imagenet_subset import load_imagenet_subset
        return load_imagenet_subset(root, train_transform, test_transform, class_list=opt("class_list"),
                                    names_file=opt("names_file"), n_classes=opt("expected_classes") or 100)
    if name == "cub200":
        from .cub import load_cub200
        return load_cub200(root, train_transform, test_transform)
    if name == "ucf101":
        from .ucf101 import load_ucf101
        return load_ucf101(root, train_transform, test_transform, frames_dir=opt("frames_dir"),
                           split=opt("official_split") or 1)
    if name == "imagefolder":
        from .imagefolder import load_imagefolder
        return load_imagefolder(root, train_transform, test_transform, names_file=opt("names_file"),
                                split_seed=opt("split_seed", 0), test_fraction=opt("test_fraction", 0.2))
    raise DatasetFormatError(f"unknown data.dataset {name!r}; known: {list(DATASETS)}")


class ClassCountError(DatasetFormatError):
    """The data root holds another class count than data.expected_classes. The message's fix is a new
    run's (the full copy, or the subset on purpose); `for_trained_run` gives the fix for a run that exists
    (evaluate, --resume), which cannot change data.expected_classes: the copy it trained on."""

    def __init__(self, dataset: str, root, found: int, expected: int):
        self.dataset, self.root, self.found, self.expected = dataset, root, found, expected
        super().__init__(f"{self._what()}: point data.root at the full copy, or set data.expected_classes={found} "
                         "(or null) to run on this subset on purpose")

    def _what(self) -> str:
        return (f"{self.dataset} at data.root={self.root!r} has {self.found} classes, but data.expected_classes is "
                f"{self.expected}")

    def __reduce__(self):  # rebuilt from its fields, not its message (a process pool pickles errors)
        return type(self), (self.dataset, self.root, self.found, self.expected)

    def for_trained_run(self, how: str) -> DatasetFormatError:
        error = DatasetFormatError(f"{self._what()}, as in the run's config: point data.root at the copy of the "
                                   f"{self.expected} classes the run trained on ({how})")
        if hasattr(self, "echo"):  # torchrun: a rank's copy of rank 0's error stays quiet (cli._report_error)
            error.echo = self.echo
        return error


def check_task_split(data_cfg) -> None:
    """data.num_tasks / data.task_sizes against the class count where it is known before the data is read
    (known_class_count), as ClassIncrementalScenario will split it: the analyses check each run's config with
    it before the first run trains (a sweep over num_tasks trained a point before it met one that did not
    divide the classes)."""
    from .protocol import split_tasks
    n = known_class_count(data_cfg)
    if n is not None:
        split_tasks(n, data_cfg.num_tasks, getattr(data_cfg, "task_sizes", None))


def _check_class_count(data_cfg, train: ClassDataset) -> None:
    """A partial copy of a benchmark (10 of ImageNet-R's 200 wnids) would otherwise run silently."""
    expected = getattr(data_cfg, "expected_classes", None)
    found = len(train.class_names)
    if expected and found != int(expected):
        raise ClassCountError(data_cfg.dataset, data_cfg.root, found, int(expected))


def build_datasets(data_cfg, train_transform: Optional[Callable] = None,
                   test_transform: Optional[Callable] = None) -> tuple[ClassDataset, ClassDataset]:
    """(train, test) ClassDatasets with dataset labels and human-readable class_names,
    capped per class by data_cfg.max_train_per_class / max_test_per_class (0 = all)."""
    train, test = _read(data_cfg, train_transform, test_transform)
    _check_class_count(data_cfg, train)
    if data_cfg.dataset == "synthetic":  # renders exactly the capped counts itself
        return train, test
    return (cap_per_class(train, int(data_cfg.max_train_per_class)),
            cap_per_class(test, int(data_cfg.max_test_per_class)))
