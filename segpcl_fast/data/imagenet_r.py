"""ImageNet-R (200 ImageNet classes as renditions), as extracted from imagenet-r.tar.

ImageNet-R ships no train/test split. Default: the usual continual-learning protocol of a seeded
80/20 split per class (CODA-Prompt / RAPF style; see files.stratified_split, seed `split_seed`).
If split files are present (`train.txt` and `test.txt`, lines "relative/path [label]", in the
root or in imagenet-r/), they are used instead. Labels always come from the wnid folder in the
path (class index = position of the wnid in the sorted folder list); a label column, if present,
is only checked for consistency.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from .base import FileListDataset
from .files import (format_error, list_images, names_for_wnids, read_lines, relative_to_any,
                    require_root, stratified_split, wnid_folders)

NAME = "imagenet-r"
LAYOUT = """  <root>/imagenet-r/<wnid>/*.jpg       (200 wnid folders, e.g. n01443537/)
  <root>/imagenet-r/README.txt         (ships in imagenet-r.tar; lines 'n01443537 goldfish')
  optional: <root>/train.txt + <root>/test.txt  (lines 'imagenet-r/<wnid>/<file>.jpg [label]')
  (<root> may also be the imagenet-r folder itself)"""


def _folder(root: Optional[str]) -> tuple[Path, Path]:
    path = require_root(root, NAME, LAYOUT)
    for cand in (path / "imagenet-r", path):
        if wnid_folders(cand):
            return path, cand
    raise format_error(NAME, f"no wnid class folders (n########/) in '{path / 'imagenet-r'}' or '{path}'",
                       LAYOUT, "extract imagenet-r.tar into data.root")


def _read_split_file(path: Path, bases: list[Path], wnid_index: dict[str, int]) -> tuple[list[str], list[int]]:
    paths, targets, seen_labels = [], [], {}
    for n, line in enumerate(read_lines(path), 1):
        parts = line.split()
        file = relative_to_any(parts[0], bases)
        if file is None:
            raise format_error(NAME, f"{path}:{n}: image '{parts[0]}' not found under "
                                     f"{[str(b) for b in bases]}", LAYOUT,
                               "paths in split files are relative to data.root or to imagenet-r/")
        wnid = file.parent.name
        if wnid not in wnid_index:
            raise format_error(NAME, f"{path}:{n}: '{parts[0]}' is not inside a wnid class folder", LAYOUT,
                               "split lines must look like 'imagenet-r/<wnid>/<file>.jpg [label]'")
        label = wnid_index[wnid]
        if len(parts) > 1:
            given = parts[1]
            if seen_labels.setdefault(given, wnid) != wnid:
                raise format_error(NAME, f"{path}:{n}: label {given} is used for both "
                                         f"{seen_labels[given]} and {wnid}", LAYOUT,
                                   "fix the split file: one label per wnid folder")
        paths.append(str(file))
        targets.append(label)
    return paths, targets


def load_imagenet_r(root: Optional[str], train_transform: Optional[Callable] = None,
                    test_transform: Optional[Callable] = None, names_file: Optional[str] = None,
                    split_seed: int = 0, test_fraction: float = 0.2
                    ) -> tuple[FileListDataset, FileListDataset]:
    """(train, test) ImageNet-R; names from imagenet-r/README.txt or `names_file`."""
    root_path, folder = _folder(root)
    wnids = wnid_folders(folder)
    class_names = names_for_wnids(wnids, [folder / "README.txt", root_path / "README.txt"],
                                  NAME, LAYOUT, names_file)
    wnid_index = {w: i for i, w in enumerate(wnids)}
    bases = [root_path, folder]
    for split_dir in (root_path, folder):
        train_list, test_list = split_dir / "train.txt", split_dir / "test.txt"
        if train_list.is_file() and test_list.is_file():
            train = _read_split_file(train_list, bases, wnid_index)
            test = _read_split_file(test_list, bases, wnid_index)
            return (FileListDataset(*train, class_names, train_transform),
                    FileListDataset(*test, class_names, test_transform))
    paths, targets = [], []
    for label, wnid in enumerate(wnids):
        files = list_images(folder / wnid)
        paths += [str(f) for f in files]
        targets += [label] * len(files)
    if not paths:
        raise format_error(NAME, f"the wnid folders in '{folder}' hold no images", LAYOUT,
                           "extract imagenet-r.tar again")
    train_idx, test_idx = stratified_split(targets, test_fraction, split_seed)
    train = FileListDataset([paths[i] for i in train_idx], [targets[i] for i in train_idx],
                            class_names, train_transform)
    test = FileListDataset([paths[i] for i in test_idx], [targets[i] for i in test_idx],
                           class_names, test_transform)
    return train, test
