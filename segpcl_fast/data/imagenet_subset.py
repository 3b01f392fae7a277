"""ImageNet-Subset (ImageNet-100): ImageNet train/val folders restricted to a class list.

Class list: the file `class_list` (absolute, or relative to the root), default
`<root>/imagenet100.txt`: one wnid per line (extra words on a line are ignored, '#' comments
skipped). Without that file, a root whose train/ holds exactly 100 wnid folders (an already
cut ImageNet-100 copy, as PyCIL uses) takes those. Class index = position in the class list.
Validation images: val/<wnid>/ folders, or a flat val/ plus LOC_val_solution.csv (Kaggle).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Optional

from .base import FileListDataset
from .files import WNID_RE, format_error, list_images, names_for_wnids, read_lines, require_root, wnid_folders

NAME = "imagenet-subset"
DEFAULT_CLASS_LIST = "imagenet100.txt"
LAYOUT = f"""  <root>/train/<wnid>/*.JPEG
  <root>/val/<wnid>/*.JPEG          (or flat val/*.JPEG + <root>/LOC_val_solution.csv)
  <root>/LOC_synset_mapping.txt     (lines 'n01440764 tench, Tinca tinca')
  <root>/{DEFAULT_CLASS_LIST}           (the subset: one wnid a line; or set data.class_list)"""


def _class_list(root: Path, class_list: Optional[str]) -> list[str]:
    if class_list:
        path = Path(class_list).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise format_error(NAME, f"class list '{path}' (data.class_list) not found", LAYOUT,
                               "fix the path (absolute, or relative to data.root)")
    else:
        path = root / DEFAULT_CLASS_LIST
        if not path.is_file():
            train_wnids = wnid_folders(root / "train")
            if len(train_wnids) == 100:
                return train_wnids
            raise format_error(NAME, f"no class list: '{path}' is missing and train/ holds "
                                     f"{len(train_wnids)} wnid folders, not 100", LAYOUT,
                               f"write the 100 wnids to {path} or set data.class_list")
    wnids = [ln.split()[0] for ln in read_lines(path)]
    bad = [w for w in wnids if not WNID_RE.match(w)]
    if bad or not wnids:
        raise format_error(NAME, f"class list '{path}' has {len(bad)} entries that are not wnids, "
                                 f"e.g. {bad[:3]}" if bad else f"class list '{path}' is empty", LAYOUT,
                           "one wnid (n########) a line")
    dupes = sorted({w for w in wnids if wnids.count(w) > 1})
    if dupes:
        raise format_error(NAME, f"class list '{path}' repeats wnids {dupes[:5]}", LAYOUT, "list each wnid once")
    return wnids


def _split_from_folders(folder: Path, wnids: list[str], split: str) -> tuple[list[str], list[int]]:
    missing = [w for w in wnids if not (folder / w).is_dir()]
    if missing:
        raise format_error(NAME, f"{len(missing)} classes of the class list have no folder in "
                                 f"'{folder}', e.g. {missing[:5]}", LAYOUT,
                           f"extract the full ImageNet {split} set there, or fix the class list")
    paths, targets = [], []
    for label, wnid in enumerate(wnids):
        files = list_images(folder / wnid)
        paths += [str(f) for f in files]
        targets += [label] * len(files)
    return paths, targets


def _val_from_csv(root: Path, folder: Path, wnids: list[str]) -> tuple[list[str], list[int]]:
    index = {w: i for i, w in enumerate(wnids)}
    pairs = []
    with open(root / "LOC_val_solution.csv", newline="") as f:
        for row in csv.DictReader(f):
            wnid = (row.get("PredictionString") or "").split()[:1]
            if wnid and wnid[0] in index:
                pairs.append((row["ImageId"], index[wnid[0]]))
    paths, targets = [], []
    for image_id, label in sorted(pairs):
        path = folder / f"{image_id}.JPEG"
        if not path.is_file():
            raise format_error(NAME, f"val image '{path}' listed in LOC_val_solution.csv is missing",
                               LAYOUT, "extract the full ImageNet val set")
        paths.append(str(path))
        targets.append(label)
    return paths, targets


def load_imagenet_subset(root: Optional[str], train_transform: Optional[Callable] = None,
                         test_transform: Optional[Callable] = None, class_list: Optional[str] = None,
                         names_file: Optional[str] = None) -> tuple[FileListDataset, FileListDataset]:
    """(train, val) over the class list; names from LOC_synset_mapping.txt or `names_file`."""
    path = require_root(root, NAME, LAYOUT)
    if not (path / "train").is_dir():
        raise format_error(NAME, f"no train/ folder in '{path}'", LAYOUT, "point data.root at the ImageNet folder")
    wnids = _class_list(path, class_list)
    class_names = names_for_wnids(wnids, [path / "LOC_synset_mapping.txt"], NAME, LAYOUT, names_file)
    train = _split_from_folders(path / "train", wnids, "train")
    val_dir = path / "val"
    if wnid_folders(val_dir):
        val = _split_from_folders(val_dir, wnids, "val")
    elif val_dir.is_dir() and (path / "LOC_val_solution.csv").is_file():
        val = _val_from_csv(path, val_dir, wnids)
    else:
        raise format_error(NAME, f"no val/<wnid>/ folders in '{path}' (and no flat val/ with "
                                 f"LOC_val_solution.csv)", LAYOUT, "extract the ImageNet val set into val/")
    return (FileListDataset(*train, class_names, train_transform),
            FileListDataset(*val, class_names, test_transform))
