"""data.dataset=imagefolder: any image classification dataset in torchvision ImageFolder's layout.

  <root>/train/<class>/*.jpg beside <root>/test/<class>/*.jpg (or val/): the split as given;
  <root>/<class>/*.jpg: no split given, so a seeded stratified one (data.test_fraction, data.split_seed),
      each class's images shuffled by a seed made of data.split_seed and its folder name: a copy holding
      some of the classes splits each of them as the full copy does.

Classes are the class folders in sorted order (ImageFolder's order and labels), named by their folder
names with underscores as spaces, or by data.names_file: JSON {"<folder>": "<name>"} or text lines
'<folder> <name>'. CLIP's prompts take the names, so two folders with one name are an error.
"""
from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .base import FileListDataset
from .files import (PRESPLIT_TEST_DIRS, class_folder_names, clean_name, format_error, list_images, numbered_lines,
                    read_presplit, require_root, user_data_file)

log = logging.getLogger(__name__)

NAME = "imagefolder"
LAYOUT = """  <root>/train/<class>/*.jpg + <root>/test/<class>/*.jpg (or val/)   the split as given
  or <root>/<class>/*.jpg                                            a seeded split (data.test_fraction)
  class names: the folder names (underscores as spaces), or data.names_file: JSON {"<folder>": "<name>"}
  or lines '<folder> <name>'"""


def _names_file(path: Path, folders: list[str]) -> list[str]:
    """The name of each class folder from `path` (every folder must have one)."""
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise format_error(NAME, f"data.names_file {path} is not valid JSON ({e})", LAYOUT) from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise format_error(NAME, f"data.names_file {path} must be a JSON object of folder -> name strings", LAYOUT)
    else:
        mapping = {}
        for n, line in numbered_lines(path):
            parts = line.split(None, 1)
            if len(parts) != 2:
                raise format_error(NAME, f"{path}:{n}: expected '<folder> <name>', got {line!r}", LAYOUT)
            mapping[parts[0]] = parts[1]
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise format_error(NAME, f"data.names_file {path} names no class for {len(missing)} of the {len(folders)} "
                                 f"class folders, e.g. {missing[:5]}", LAYOUT, "add a line for each class folder")
    return [" ".join(str(mapping[f]).split()) for f in folders]


def _check_names(folders: list[str], names: list[str], where: str) -> None:
    lowered = [n.lower() for n in names]  # CLIP's tokenizer lowercases: equal names are equal prompts
    clashes = sorted({f for f, n in zip(folders, lowered) if lowered.count(n) > 1})
    empty = [f for f, n in zip(folders, names) if not n]
    if clashes or empty:
        raise format_error(NAME, f"class folders of '{where}' give " + (f"the same class name: {clashes[:6]}" if clashes
                                                                       else f"an empty class name: {empty[:6]}"),
                           LAYOUT, "rename the class folders, or give each its own name in data.names_file")


def split_by_folder(folders: list[str], targets: list[int], test_fraction: float, seed: int
                    ) -> tuple[list[int], list[int]]:
    """Seeded stratified split of sample indices into (train, test), each sorted: class c's samples shuffled
    with RandomState((seed + crc32(folder name)) mod 2^32), the first round(test_fraction * n) to test (at
    least 1 when n >= 2, never all)."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    train, test = [], []
    for label, idx in by_class.items():
        perm = np.random.RandomState((seed + zlib.crc32(folders[label].encode())) % 2 ** 32).permutation(len(idx))
        n_test = min(max(int(round(test_fraction * len(idx))), 1), len(idx) - 1) if len(idx) >= 2 else 0
        test += [idx[j] for j in perm[:n_test]]
        train += [idx[j] for j in perm[n_test:]]
    return sorted(train), sorted(test)


def load_imagefolder(root: Optional[str], train_transform: Optional[Callable] = None,
                     test_transform: Optional[Callable] = None, names_file: Optional[str] = None,
                     split_seed: int = 0, test_fraction: float = 0.2) -> tuple[FileListDataset, FileListDataset]:
    path = require_root(root, NAME, LAYOUT)
    test_dir = next((path / d for d in PRESPLIT_TEST_DIRS if class_folder_names(path / d)), None)
    presplit = (path / "train", test_dir) if test_dir is not None and class_folder_names(path / "train") else None
    folder_root = presplit[0] if presplit is not None else path
    folders = class_folder_names(folder_root)
    if not folders:
        raise format_error(NAME, f"'{path}' holds no class folders", LAYOUT,
                           "point data.root at the folder holding train/ and test/, or the class folders")
    if names_file:
        names = _names_file(user_data_file(names_file, path, "names file", "data.names_file", NAME, LAYOUT), folders)
    else:
        names = [clean_name(f) for f in folders]
    _check_names(folders, names, str(folder_root))
    if presplit is not None:
        train, test = read_presplit(*presplit, folders, NAME, LAYOUT)
        log.info("%s: the pre-split folders %s + %s (%d classes): %d train, %d test images", NAME, *presplit,
                 len(folders), len(train[0]), len(test[0]))
        return FileListDataset(*train, names, train_transform), FileListDataset(*test, names, test_transform)
    paths, targets = [], []
    for label, f in enumerate(folders):
        images = list_images(folder_root / f)
        if not images:
            raise format_error(NAME, f"class folder '{folder_root / f}' holds no images", LAYOUT,
                               "remove the empty folder, or add its images")
        paths += [str(p) for p in images]
        targets += [label] * len(images)
    train_idx, test_idx = split_by_folder(folders, targets, test_fraction, split_seed)
    log.info("%s: %d class folders in %s, no train/ + test/: a seeded split (data.test_fraction %g, data.split_seed "
             "%d): %d train, %d test images", NAME, len(folders), path, test_fraction, split_seed, len(train_idx),
             len(test_idx))
    pick = lambda idx: ([paths[i] for i in idx], [targets[i] for i in idx])  # noqa: E731
    return FileListDataset(*pick(train_idx), names, train_transform), FileListDataset(*pick(test_idx), names,
                                                                                      test_transform)
