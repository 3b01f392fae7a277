"""data.dataset=imagefolder: any image classification dataset in torchvision ImageFolder's layout.

  <root>/train/<class>/... beside <root>/test/<class>/... (or val/, valid/, validation/; any case): the split
      as given;
  <root>/<class>/...: no split given, so a seeded stratified one (data.test_fraction, data.split_seed),
      each class's images shuffled by a seed made of data.split_seed and its folder name: a copy holding
      some of the classes splits each of them as the full copy does.

A class's images are its folder's image files at any depth (torchvision's extensions: jpg, jpeg, png, ppm,
bmp, pgm, tif, tiff, webp; links followed), as ImageFolder finds them. Classes are the class folders in
sorted order (ImageFolder's order and labels; hidden folders such as .ipynb_checkpoints/ are not classes,
which ImageFolder would make them), named by their folder names with underscores as spaces, or by
data.names_file: JSON {"<folder>": "<name>"} or text lines '<folder> <name>' ('<folder><TAB><name>' for a
folder name with spaces). CLIP's prompts take the names, so two folders with one name are an error. In a
pre-split copy an image may share its file name with one of the other split (splits numbered apart);
the same file in both is an error.
"""
from __future__ import annotations

import json
import logging
import os
import unicodedata
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .base import FileListDataset
from .files import (class_folder_names, clean_name, format_error, found_nearby, numbered_lines, read_presplit,
                    require_root, user_data_file)

log = logging.getLogger(__name__)

NAME = "imagefolder"
LAYOUT = """  <root>/train/<class>/*.jpg + <root>/test/<class>/*.jpg (or val/)   the split as given
  or <root>/<class>/*.jpg                                            a seeded split (data.test_fraction)
  (images at any depth below a class folder; jpg jpeg png ppm bmp pgm tif tiff webp)
  class names: the folder names (underscores as spaces), or data.names_file: JSON {"<folder>": "<name>"}
  or lines '<folder> <name>' ('<folder><TAB><name>' where the folder name has spaces)"""
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
TRAIN_DIRS = ("train", "training")
TEST_DIRS = ("test", "testing", "val", "valid", "validation")  # the first present wins


def class_images(folder: Path) -> list[Path]:
    """Every image file below `folder`, at any depth, links followed, sorted (torchvision's make_dataset:
    os.walk(followlinks=True), its extensions in any case; hidden files skipped)."""
    found = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top) / f for f in files
                  if not f.startswith(".") and f.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(top, f))]
    return sorted(found)


def same_files(train: tuple[list[str], list[int]], test: tuple[list[str], list[int]]) -> list[str]:
    """The train paths (sorted) that are the same file as a test path (a split numbered apart may share names)."""
    test_files = {os.path.realpath(p) for p in test[0]}
    return sorted(p for p in train[0] if os.path.realpath(p) in test_files)


def _split_dirs(path: Path) -> tuple[Optional[Path], Optional[Path], list[str]]:
    """(train dir, test dir) of a pre-split root (any case), and the root's folders named as splits."""
    folders = {f.lower(): f for f in class_folder_names(path)}
    named = [folders[n] for n in (*TRAIN_DIRS, *TEST_DIRS) if n in folders]
    train = next((path / folders[n] for n in TRAIN_DIRS if n in folders and class_folder_names(path / folders[n])),
                 None)
    test = next((path / folders[n] for n in TEST_DIRS if n in folders and class_folder_names(path / folders[n])),
                None)
    return train, test, named


def _names_file(path: Path, folders: list[str]) -> list[str]:
    """The name of each class folder from `path` (every folder must have one)."""
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Notepad) is fine
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise format_error(NAME, f"data.names_file {path} is not valid JSON ({e})", LAYOUT) from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise format_error(NAME, f"data.names_file {path} must be a JSON object of folder -> name strings", LAYOUT)
    else:
        mapping = {}
        for n, line in numbered_lines(path):
            parts = line.split("\t", 1) if "\t" in line else line.split(None, 1)
            if len(parts) != 2:
                raise format_error(NAME, f"{path}:{n}: expected '<folder> <name>', got {line!r}", LAYOUT)
            mapping[parts[0]] = parts[1]
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise format_error(NAME, f"data.names_file {path} names no class for {len(missing)} of the {len(folders)} "
                                 f"class folders, e.g. {missing[:5]}", LAYOUT,
                           "add a line for each class folder (separate a folder name that has spaces from its "
                           "class name with a tab, or write the file as JSON)")
    return [" ".join(str(mapping[f]).split()) for f in folders]


def _check_names(folders: list[str], names: list[str], where: str) -> None:
    lowered = [n.lower() for n in names]  # CLIP's tokenizer lowercases: equal names are equal prompts
    clashes = sorted({f for f, n in zip(folders, lowered) if lowered.count(n) > 1})
    empty = [f for f, n in zip(folders, names) if not n]
    if clashes or empty:
        raise format_error(NAME, f"class folders of '{where}' give " + (f"an empty class name: {empty[:6]}" if empty
                                                                       else f"the same class name: {clashes[:6]}"),
                           LAYOUT, "rename the class folders, or give each its own name in data.names_file")


def split_by_folder(folders: list[str], targets: list[int], test_fraction: float, seed: int
                    ) -> tuple[list[int], list[int]]:
    """Seeded stratified split of sample indices into (train, test), each sorted: class c's samples shuffled
    with RandomState((seed + crc32(NFC folder name)) mod 2^32), the first round(test_fraction * n) to test (at
    least 1 when n >= 2, never all)."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    train, test = [], []
    for label, idx in by_class.items():
        key = zlib.crc32(unicodedata.normalize("NFC", folders[label]).encode())  # a macOS copy's NFD names alike
        perm = np.random.RandomState((seed + key) % 2 ** 32).permutation(len(idx))
        n_test = min(max(int(round(test_fraction * len(idx))), 1), len(idx) - 1) if len(idx) >= 2 else 0
        test += [idx[j] for j in perm[:n_test]]
        train += [idx[j] for j in perm[n_test:]]
    return sorted(train), sorted(test)


def load_imagefolder(root: Optional[str], train_transform: Optional[Callable] = None,
                     test_transform: Optional[Callable] = None, names_file: Optional[str] = None,
                     split_seed: int = 0, test_fraction: float = 0.2) -> tuple[FileListDataset, FileListDataset]:
    path = require_root(root, NAME, LAYOUT)
    train_dir, test_dir, split_named = _split_dirs(path)
    if split_named and (train_dir is None or test_dir is None):
        have = "test" if train_dir is None and test_dir is not None else "train"
        raise format_error(NAME, f"'{path}' holds {', '.join(split_named)}/ but no {'train' if have == 'test' else 'test'} "
                                 f"folder of class folders beside it", LAYOUT,
                           "give the split both train/<class>/ and test/<class>/ (or val/), or put the class "
                           "folders directly in data.root for a seeded split")
    presplit = (train_dir, test_dir) if train_dir is not None else None
    folder_root = train_dir if presplit is not None else path
    folders = class_folder_names(folder_root)
    if len(folders) < 2:
        nearby = found_nearby(path, "train/*") or found_nearby(path, "*/*.*")  # a split, or class folders of files
        raise format_error(NAME, f"'{folder_root}' holds {len(folders) or 'no'} class folder{'' if folders else 's'} "
                                 f"({folders[0] if folders else 'none'}): a class-incremental run needs two or more",
                           LAYOUT, nearby or "point data.root at the folder holding train/ and test/, or the class "
                                             "folders")
    if names_file:
        names = _names_file(user_data_file(names_file, path, "names file", "data.names_file", NAME, LAYOUT), folders)
    else:
        names = [clean_name(f) for f in folders]
    _check_names(folders, names, str(folder_root))
    if presplit is not None:
        train, test = read_presplit(*presplit, folders, NAME, LAYOUT, entries=class_images, in_both=same_files)
        log.info("%s: the pre-split folders %s + %s (%d classes): %d train, %d test images", NAME, *presplit,
                 len(folders), len(train[0]), len(test[0]))
        return FileListDataset(*train, names, train_transform), FileListDataset(*test, names, test_transform)
    paths, targets = [], []
    for label, f in enumerate(folders):
        images = class_images(folder_root / f)
        if len(images) < 2:
            raise format_error(NAME, f"class folder '{folder_root / f}' holds {len(images) or 'no'} image"
                                     f"{'' if len(images) == 1 else 's'} ({', '.join(EXTENSIONS)}, at any depth): the "
                                     f"seeded split needs two or more (one to train on, one to test)", LAYOUT,
                               "add its images, or remove the folder")
        paths += [str(p) for p in images]
        targets += [label] * len(images)
    train_idx, test_idx = split_by_folder(folders, targets, test_fraction, split_seed)
    log.info("%s: %d class folders in %s, no train/ + test/: a seeded split (data.test_fraction %g, data.split_seed "
             "%d): %d train, %d test images", NAME, len(folders), path, test_fraction, split_seed, len(train_idx),
             len(test_idx))
    pick = lambda idx: ([paths[i] for i in idx], [targets[i] for i in idx])  # noqa: E731
    return FileListDataset(*pick(train_idx), names, train_transform), FileListDataset(*pick(test_idx), names,
                                                                                      test_transform)
