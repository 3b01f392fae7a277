"""Class-incremental protocol: class order, task split, per-task dataset views.

Labels are remapped to *ordered labels*: the position of the class in the class order. Task t
(0-based) holds the ordered labels task_classes(t) = [start_t, ..., end_t - 1], so after task t
the seen labels are exactly 0 .. end_t - 1. Every view is a ClassSubset (index lists; no image
is loaded here), with class_names = the full ordered name list (index = ordered label).

    scenario = ClassIncrementalScenario.from_config(cfg.data, train_ds, test_ds)
    for t in range(scenario.num_tasks):
        train_t = scenario.train_dataset(t)          # task t's images, ordered labels
        eval_t = scenario.test_dataset_upto(t)       # test images of all seen classes
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .base import ClassDataset, ClassSubset, DatasetFormatError


def _norm(name: str) -> str:
    return " ".join(str(name).replace("_", " ").lower().split())


def _compact(name: str) -> str:
    """A name without case, spaces, underscores or hyphens: UCF101's 'ApplyEyeMakeup' (classInd.txt) and
    'Apply_Eye_Makeup' (CoOp's split file) are one class."""
    return re.sub(r"[\s_-]+", "", str(name)).lower()


def _lookup_name(item: str, class_names: Sequence[str], class_ids: Optional[Sequence[str]] = None) -> Optional[int]:
    """Index of the class called `item`: its name exactly, else its id (wnid, folder name) exactly, else its name
    case / underscore-insensitively, else its name or id without case, spaces, underscores or hyphens; None if
    absent."""
    def one(found: list[int], what: str) -> Optional[int]:
        if len(found) > 1:
            raise DatasetFormatError(f"class_order: {item!r} matches {len(found)} classes' {what} (indices {found}); "
                                     f"give class indices instead")
        return found[0] if found else None

    by_name = one([i for i, n in enumerate(class_names) if n == item], "names")
    by_id = one([i for i, c in enumerate(class_ids or ()) if c == item], "ids")
    if by_name is not None and by_id is not None and by_name != by_id:
        raise DatasetFormatError(f"class_order: {item!r} is the name of class {by_name} ({class_ids[by_name]!r}) and "
                                 f"the id of class {by_id} ({class_names[by_id]!r}); give class indices instead")
    if by_name is not None or by_id is not None:
        return by_name if by_name is not None else by_id
    loose = one([i for i, n in enumerate(class_names) if _norm(n) == _norm(item)], "names")
    if loose is not None:
        return loose
    key = _compact(item)
    return one(sorted({i for i, n in enumerate(class_names) if _compact(n) == key}
                      | {i for i, c in enumerate(class_ids or ()) if _compact(c) == key}), "names or ids")


def resolve_class_order(class_order: Any, class_names: Sequence[str], seed: int = 1993,
                        class_ids: Optional[Sequence[str]] = None) -> list[int]:
    """The class order as a permutation of dataset class indices.

    "seeded": numpy RandomState(seed).permutation(n) (PyCIL's np.random.seed(seed);
    np.random.permutation(n)); "natural": 0..n-1; a list of class names, class ids (the dataset's own
    names for its classes: wnids, folder names) and/or indices that names every class exactly once.
    """
    n = len(class_names)
    if isinstance(class_order, str):
        if class_order == "seeded":
            return np.random.RandomState(seed).permutation(n).tolist()
        if class_order == "natural":
            return list(range(n))
        raise DatasetFormatError(f"data.class_order {class_order!r} is not 'seeded', 'natural' or a list "
                                 f"of class names / indices")
    if not isinstance(class_order, (list, tuple)):
        raise DatasetFormatError(f"data.class_order must be 'seeded', 'natural' or a list, got {class_order!r}")
    order, unknown = [], []
    for item in class_order:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            idx = int(item) if 0 <= int(item) < n else None
        elif isinstance(item, str):
            idx = _lookup_name(item, class_names, class_ids)
        else:
            idx = None
        if idx is None:
            unknown.append(item)
        else:
            order.append(idx)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} entries are not classes of the dataset (names, "
                        + ("ids such as its folder names, " if class_ids else "") + f"or indices 0..{n - 1}): {unknown[:5]}")
    dupes = sorted({class_names[i] for i in order if order.count(i) > 1})
    if dupes:
        problems.append(f"classes listed more than once: {dupes[:5]}")
    missing = [class_names[i] for i in sorted(set(range(n)) - set(order))]
    if missing:
        problems.append(f"{len(missing)} classes not listed: {missing[:5]}")
    if problems:
        raise DatasetFormatError("data.class_order must list each of the dataset's " f"{n} classes once; "
                                 + "; ".join(problems) + f". Dataset classes start with {list(class_names[:5])}"
                                 + (f" (ids {list(class_ids[:5])})" if class_ids else ""))
    return order


def split_tasks(num_classes: int, num_tasks: int, task_sizes: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Ordered labels of each task: equal tasks, or explicit `task_sizes` (e.g. [50, 10, 10, 10, 10, 10])."""
    if task_sizes:
        sizes = [int(s) for s in task_sizes]
        if any(s <= 0 for s in sizes) or sum(sizes) != num_classes:
            raise DatasetFormatError(f"task sizes {sizes} (data.task_sizes) must be positive and sum to the "
                                     f"{num_classes} classes the data root holds; fix data.task_sizes (or unset it "
                                     f"for data.num_tasks equal tasks)")
    else:
        if num_tasks <= 0 or num_classes % num_tasks:
            divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
            unequal = ""
            if 0 < num_tasks <= num_classes:  # the nearest split into that many tasks, as data.task_sizes takes it
                q, r = divmod(num_classes, num_tasks)
                unequal = f", e.g. --set data.task_sizes=[{','.join(map(str, [q + 1] * r + [q] * (num_tasks - r)))}]"
            raise DatasetFormatError(f"data.num_tasks={num_tasks} does not divide the {num_classes} classes "
                                     f"into equal tasks; use one of {divisors}, or give unequal tasks' sizes in "
                                     f"data.task_sizes{unequal}")
        sizes = [num_classes // num_tasks] * num_tasks
    bounds = np.cumsum([0] + sizes)
    return [list(range(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]


class ClassIncrementalScenario:
    """Cheap per-task views of a (train, test) dataset pair under a class order."""

    def __init__(self, train_ds: ClassDataset, test_ds: ClassDataset, class_order: Any = "seeded",
                 order_seed: int = 1993, num_tasks: int = 10, task_sizes: Optional[Sequence[int]] = None):
        if list(train_ds.class_names) != list(test_ds.class_names):
            raise DatasetFormatError("train and test datasets have different class lists")
        self.train_base, self.test_base = train_ds, test_ds
        self.order = resolve_class_order(class_order, train_ds.class_names, order_seed,
                                         getattr(train_ds, "class_ids", None))
        self.class_names = [train_ds.class_names[i] for i in self.order]
        self.num_classes = len(self.order)
        self.label_map = np.empty(self.num_classes, dtype=np.int64)  # dataset label -> ordered label
        self.label_map[self.order] = np.arange(self.num_classes)
        self.tasks = split_tasks(self.num_classes, num_tasks, task_sizes)
        self.num_tasks = len(self.tasks)
        self._train_ordered = self._ordered_targets(train_ds, "training")
        self._test_ordered = self._ordered_targets(test_ds, "test")

    @classmethod
    def from_config(cls, data_cfg, train_ds: ClassDataset, test_ds: ClassDataset) -> "ClassIncrementalScenario":
        return cls(train_ds, test_ds, data_cfg.class_order, data_cfg.order_seed, data_cfg.num_tasks,
                   getattr(data_cfg, "task_sizes", None))

    def _ordered_targets(self, ds: ClassDataset, split: str) -> np.ndarray:
        targets = np.asarray(ds.targets, dtype=np.int64)
        if targets.size and (targets.min() < 0 or targets.max() >= self.num_classes):
            raise DatasetFormatError(f"{split} labels outside 0..{self.num_classes - 1}")
        counts = np.bincount(targets, minlength=self.num_classes)
        empty = [ds.class_names[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise DatasetFormatError(f"{len(empty)} classes have no {split} images, e.g. {empty[:5]}; "
                                     f"check the data root or data.max_*_per_class")
        return self.label_map[targets]

    # ------------------------------------------------------------------ class sets
    def _check_task(self, t: int) -> int:
        if not 0 <= int(t) < self.num_tasks:
            raise IndexError(f"task {t} out of range 0..{self.num_tasks - 1}")
        return int(t)

    def task_classes(self, t: int) -> list[int]:
        return list(self.tasks[self._check_task(t)])

    def seen_classes(self, t: int) -> list[int]:
        return list(range(self.tasks[self._check_task(t)][-1] + 1))

    def old_classes(self, t: int) -> list[int]:
        return list(range(self.tasks[self._check_task(t)][0]))

    def task_of_class(self, label: int) -> int:
        return next(t for t, classes in enumerate(self.tasks) if label in classes)

    # ------------------------------------------------------------------ dataset views
    def _view(self, base: ClassDataset, ordered: np.ndarray, lo: int, hi: int,
              transform: Optional[Callable]) -> ClassSubset:
        indices = np.flatnonzero((ordered >= lo) & (ordered < hi))
        return ClassSubset(base, indices.tolist(), self.label_map, self.class_names, transform)

    def train_dataset(self, t: int, transform: Optional[Callable] = None) -> ClassSubset:
        """Task t's training images (pass `transform`, e.g. the test one, to override the base's)."""
        classes = self.task_classes(t)
        return self._view(self.train_base, self._train_ordered, classes[0], classes[-1] + 1, transform)

    def test_dataset_task(self, j: int, transform: Optional[Callable] = None) -> ClassSubset:
        """Test images of task j's classes only (a[t][j] in the accuracy matrix, and FWT)."""
        classes = self.task_classes(j)
        return self._view(self.test_base, self._test_ordered, classes[0], classes[-1] + 1, transform)

    def test_dataset(self, t: int, transform: Optional[Callable] = None) -> ClassSubset:
        """Same as test_dataset_task(t): the test twin of train_dataset(t)."""
        return self.test_dataset_task(t, transform)

    def test_dataset_upto(self, t: int, transform: Optional[Callable] = None) -> ClassSubset:
        """Test images of every class seen after task t (acc_t)."""
        return self._view(self.test_base, self._test_ordered, 0, len(self.seen_classes(t)), transform)

    def __repr__(self) -> str:
        sizes = [len(c) for c in self.tasks]
        return (f"ClassIncrementalScenario({self.num_classes} classes, {self.num_tasks} tasks {sizes}, "
                f"{len(self.train_base)} train / {len(self.test_base)} test images)")
