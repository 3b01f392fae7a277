"""data.dataset=imagefolder: any image classification dataset in torchvision ImageFolder's layout.

  <root>/train/<class>/... beside <root>/test/<class>/... (or val/, valid/, validation/; any case): the split
      as given;
  <root>/<class>/...: no split given, so a seeded stratified one (data.test_fraction, data.split_seed),
      each class's images shuffled by a seed made of data.split_seed and its folder name: a copy holding
      some of the classes splits each of them as the full copy does. A data.root at one half of a split
      (<root>/train) is read so too, with a warning naming <root>.

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

import functools
import json
import logging
import os
import unicodedata
import zlib
from pathlib import Path
from typing import Callable, Optional

from .base import FileListDataset
from .files import (check_folder_names, class_folder_names, clean_name, format_error, numbered_lines, read_presplit,
                    require_root, stratified_split, user_data_file)

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
    """Every image file below `folder`, at any depth, links followed, in torchvision make_dataset's order
    (os.walk(followlinks=True)'s folders sorted by path string, then each folder's file names sorted; its
    extensions, in any case; no stat per file). Hidden files and folders are skipped, and a folder reached
    again through a link (a loop, `up -> ..`) is read once."""
    seen, walked = set(), []
    try:
        for top, dirs, files in os.walk(folder, followlinks=True):
            real = os.path.realpath(top)
            if real in seen:  # a link loop, or a second way into one folder: its images once
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            walked.append((top, [f for f in files if not f.startswith(".") and f.lower().endswith(EXTENSIONS)]))
    except RecursionError:
        raise format_error(NAME, f"'{folder}' nests its folders too deep to read", LAYOUT,
                           "flatten the class folder (images at most a few folders below it)") from None
    return [Path(top) / f for top, files in sorted(walked) for f in sorted(files)]


def _real_paths(paths: list[str]) -> list[str]:
    """Each path with its links resolved: its folder's realpath, once a folder (a realpath costs a stat per
    path component), and the file's own only where it is a link (one lstat a file)."""
    real_dir = functools.lru_cache(maxsize=None)(os.path.realpath)
    return [os.path.realpath(p) if os.path.islink(p) else os.path.join(real_dir(os.path.dirname(p)),
                                                                        os.path.basename(p)) for p in paths]


def same_files(train: tuple[list[str], list[int]], test: tuple[list[str], list[int]]) -> list[str]:
    """The train paths (sorted) that are the same file as a test path (a split numbered apart may share names)."""
    test_files = set(_real_paths(test[0]))
    return sorted(p for p, real in zip(train[0], _real_paths(train[0])) if real in test_files)


def _is_split_dir(folder: Path) -> bool:
    """A split's folder holds class folders and no images of its own (a flat dataset's class named 'train',
    as CIFAR-100 exported as folders has, holds its images)."""
    if not class_folder_names(folder):
        return False
    with os.scandir(folder) as entries:
        return not any(e.name.lower().endswith(EXTENSIONS) and not e.name.startswith(".") for e in entries)


def _split_dirs(path: Path) -> tuple[Optional[Path], Optional[Path]]:
    """(train dir, test dir) of a pre-split root: folders named as splits (any case) that hold class folders."""
    folders = {f.lower(): f for f in class_folder_names(path)}
    split = [n for n in (*TRAIN_DIRS, *TEST_DIRS) if n in folders and _is_split_dir(path / folders[n])]
    train = next((path / folders[n] for n in TRAIN_DIRS if n in split), None)
    test = next((path / folders[n] for n in TEST_DIRS if n in split), None)
    return train, test


def _dataset_below(path: Path) -> Optional[Path]:
    """A folder just below `path` that looks like the dataset's root (a train/ + test/ split in it, or the only
    folder there when it holds two or more class folders): what data.root was probably meant to be. The only folder
    of a class folder (a/sub/*.jpg) holds images, not classes: not suggested."""
    children = class_folder_names(path)
    for child in children:
        if all(_split_dirs(path / child)):
            return path / child
    return path / children[0] if len(children) == 1 and len(class_folder_names(path / children[0])) >= 2 else None


def _warn_if_one_half_of_a_split(path: Path) -> None:
    """A flat read of data.root = <dataset>/train (or test/, val/): legal, but its other half goes unused."""
    if path.name.lower() not in TRAIN_DIRS + TEST_DIRS or path.parent == path:
        return
    halves = _split_dirs(path.parent)
    if None in halves or path.resolve() not in [h.resolve() for h in halves]:
        return
    other = halves[1] if path.resolve() == halves[0].resolve() else halves[0]
    log.warning("%s: data.root %s is one half of the split in %s (beside %s/): reading its class folders with a "
                "seeded split of their own, and %s/ goes unused; set data.root=%s to train on %s/ and test on %s/",
                NAME, path, path.parent, other.name, other.name, path.parent, halves[0].name, halves[1].name)


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
    mapping = {unicodedata.normalize("NFC", k): v for k, v in mapping.items()}  # a macOS copy's NFD folder names
    missing = [f for f in folders if unicodedata.normalize("NFC", f) not in mapping]
    if missing:
        raise format_error(NAME, f"data.names_file {path} names no class for {len(missing)} of the {len(folders)} "
                                 f"class folders, e.g. {missing[:5]}", LAYOUT,
                           'add an entry "<folder>": "<name>" for each class folder' if path.suffix.lower() == ".json"
                           else "add a line for each class folder (separate a folder name that has spaces from its "
                                "class name with a tab, or write the file as JSON)")
    return [" ".join(str(mapping[unicodedata.normalize("NFC", f)]).split()) for f in folders]


def _check_names(folders: list[str], names: list[str], where: str) -> None:
    fix = "rename the class folders, or give each its own name in data.names_file"
    empty = [f for f, n in zip(folders, names) if not n]
    if empty:
        raise format_error(NAME, f"class folders of '{where}' give an empty class name: {empty[:6]}", LAYOUT, fix)
    check_folder_names(folders, names, where, NAME, LAYOUT, fix)


def split_by_folder(folders: list[str], targets: list[int], keys: list[str], test_fraction: float, seed: int
                    ) -> tuple[list[int], list[int]]:
    """files.stratified_split keyed for a copy-independent split: class c's samples, in the order of their
    `keys` (NFC relative paths: a macOS copy's decomposed names order alike), shuffled with
    RandomState((seed + crc32(NFC folder name)) mod 2^32)."""
    return stratified_split(targets, test_fraction, seed, sample_keys=keys,
                            class_key=lambda label: zlib.crc32(unicodedata.normalize("NFC", folders[label]).encode()))


def _same_file_in_two_classes(paths: list[str], targets: list[int]) -> Optional[str]:
    """A path whose file another class also holds (a class folder linked to another), or None."""
    owner: dict[str, int] = {}
    for p, real, t in zip(paths, _real_paths(paths), targets):
        if owner.setdefault(real, t) != t:
            return p
    return None


def load_imagefolder(root: Optional[str], train_transform: Optional[Callable] = None,
                     test_transform: Optional[Callable] = None, names_file: Optional[str] = None,
                     split_seed: int = 0, test_fraction: float = 0.2) -> tuple[FileListDataset, FileListDataset]:
    path = require_root(root, NAME, LAYOUT)
    train_dir, test_dir = _split_dirs(path)
    if (train_dir is None) != (test_dir is None):
        have, lack = ((train_dir, "test (or val)") if test_dir is None else (test_dir, "train"))
        raise format_error(NAME, f"'{path}' holds {have.name}/ (class folders) but no {lack} folder of class "
                                 f"folders beside it", LAYOUT,
                           "give the split both train/<class>/ and test/<class>/ (or val/), or, for a seeded "
                           "split, the class folders alone in data.root")
    presplit = (train_dir, test_dir) if train_dir is not None else None
    folder_root = train_dir if presplit is not None else path
    folders = class_folder_names(folder_root)
    below = _dataset_below(path) if presplit is None else None
    if len(folders) < 2 or (below is not None and all(_split_dirs(below))):
        found = f": set data.root={below}, which looks like the dataset" if below is not None else ""
        problem = (f"holds {len(folders) or 'no'} class folder{'' if len(folders) == 1 else 's'}: a class-incremental "
                   f"run needs two or more" if len(folders) < 2 else
                   f"holds datasets, not classes ({below.name}/ has its own train/ and test/)")
        raise format_error(NAME, f"'{folder_root}' {problem}", LAYOUT,
                           f"point data.root at the folder holding train/ and test/, or the class folders{found}")
    if names_file:
        names = _names_file(user_data_file(names_file, path, "names file", "data.names_file", NAME, LAYOUT), folders)
    else:
        names = [clean_name(f) for f in folders]
    _check_names(folders, names, str(folder_root))
    if presplit is not None:
        train, test = read_presplit(*presplit, folders, NAME, LAYOUT, entries=class_images, in_both=same_files)
        for split_dir, (paths, targets) in zip(presplit, (train, test)):
            _refuse_shared_files(paths, targets, split_dir)
        log.info("%s: the pre-split folders %s + %s (%d classes): %d train, %d test images", NAME, *presplit,
                 len(folders), len(train[0]), len(test[0]))
        return (FileListDataset(*train, names, train_transform, folders),
                FileListDataset(*test, names, test_transform, folders))
    _warn_if_one_half_of_a_split(path)
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
    _refuse_shared_files(paths, targets, folder_root)
    start = len(str(folder_root)) + 1  # each path is folder_root/<class>/...: its part below data.root
    keys = [unicodedata.normalize("NFC", p[start:]) for p in paths]
    train_idx, test_idx = split_by_folder(folders, targets, keys, test_fraction, split_seed)
    log.info("%s: %d class folders in %s, no train/ + test/: a seeded split (data.test_fraction %g, data.split_seed "
             "%d): %d train, %d test images", NAME, len(folders), path, test_fraction, split_seed, len(train_idx),
             len(test_idx))
    pick = lambda idx: ([paths[i] for i in idx], [targets[i] for i in idx])  # noqa: E731
    return (FileListDataset(*pick(train_idx), names, train_transform, folders),
            FileListDataset(*pick(test_idx), names, test_transform, folders))


def _refuse_shared_files(paths: list[str], targets: list[int], where: Path) -> None:
    shared = _same_file_in_two_classes(paths, targets)
    if shared is not None:
        raise format_error(NAME, f"'{shared}' is a file two class folders of '{where}' hold (a class folder linked to "
                                 f"another?)", LAYOUT, "give each class its own images")
