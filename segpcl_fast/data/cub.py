"""CUB-200-2011 with its official train/test split (train_test_split.txt), or a pre-split copy.

A pre-split copy (torchvision ImageFolder's layout, as PROOF and other CLIP continual-learning repos ship it:
`cub/train/<class>/*.jpg` beside `cub/test/<class>/*.jpg`) is read when no CUB_200_2011/images.txt is there:
classes are its train/ folders in sorted order (ImageFolder's: '001.Black_footed_Albatross' ... by class id),
names from the folder names as the official copy's; its split is used as given.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Optional

from .base import FileListDataset
from .files import find_presplit, format_error, found_nearby, numbered_lines, read_presplit, require_root

log = logging.getLogger(__name__)

NAME = "cub200"
META_FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")
LAYOUT = """  <root>/CUB_200_2011/images.txt               ('<image id> <class dir>/<file>.jpg')
  <root>/CUB_200_2011/classes.txt              ('<class id> 001.Black_footed_Albatross')
  <root>/CUB_200_2011/image_class_labels.txt   ('<image id> <class id>', ids from 1)
  <root>/CUB_200_2011/train_test_split.txt     ('<image id> <1 = train, 0 = test>')
  <root>/CUB_200_2011/images/<class dir>/*.jpg
  (as extracted from CUB_200_2011.tgz; <root> may also be the CUB_200_2011 folder)
  or pre-split (ImageFolder): <root>/train/<class>/*.jpg + <root>/test/<class>/*.jpg (or val/; also in
  <root>/cub/), class folders such as 001.Black_footed_Albatross"""


def class_name(folder_name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    return " ".join(re.sub(r"^\d+\.", "", folder_name).replace("_", " ").split())


def _pairs(path: Path) -> dict[int, str]:
    out = {}
    for n, line in numbered_lines(path):
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise format_error(NAME, f"{path}:{n}: expected '<id> <value>', got {line!r}", LAYOUT,
                               "re-extract CUB_200_2011.tgz")
        out[int(parts[0])] = parts[1].strip()
    return out


def _load_presplit(train_dir: Path, test_dir: Path, train_transform: Optional[Callable],
                   test_transform: Optional[Callable]) -> tuple[FileListDataset, FileListDataset]:
    """A pre-split ImageFolder copy: classes = train/'s folders, sorted; names as class_name makes them."""
    from .files import check_folder_names, class_folder_names
    classes = class_folder_names(train_dir)
    names = [class_name(c) for c in classes]
    check_folder_names(classes, names, str(train_dir), NAME, LAYOUT,
                       "rename the class folders so that each class has its own name")
    train, test = read_presplit(train_dir, test_dir, classes, NAME, LAYOUT)
    log.info("%s: no CUB_200_2011/images.txt; the pre-split folders %s + %s (%d classes, their sorted order): "
             "%d train, %d test images", NAME, train_dir, test_dir, len(classes), len(train[0]), len(test[0]))
    return FileListDataset(*train, names, train_transform, classes), FileListDataset(*test, names, test_transform,
                                                                                    classes)


def load_cub200(root: Optional[str], train_transform: Optional[Callable] = None,
                test_transform: Optional[Callable] = None) -> tuple[FileListDataset, FileListDataset]:
    path = require_root(root, NAME, LAYOUT)
    folder = next((c for c in (path / "CUB_200_2011", path) if (c / "images.txt").is_file()), None)
    presplit = find_presplit([path / "cub", path]) if folder is None else None  # cub/ first: a shared root
    if presplit is not None:
        return _load_presplit(*presplit, train_transform, test_transform)
    if folder is None:
        raise format_error(NAME, f"no CUB_200_2011/images.txt under '{path}'", LAYOUT,
                           found_nearby(path, "CUB_200_2011/images.txt")
                           or "extract CUB_200_2011.tgz into data.root")
    missing = [f for f in META_FILES if not (folder / f).is_file()]
    if missing:
        raise format_error(NAME, f"'{folder}' lacks {missing}", LAYOUT, "re-extract CUB_200_2011.tgz")
    images, classes, labels, is_train = (_pairs(folder / f) for f in META_FILES)
    for cid, dir_name in classes.items():  # '2 002.Laysan_Albatross': the id and the folder's number agree
        number = re.match(r"(\d+)\.", dir_name)
        if number and int(number.group(1)) != cid:
            raise format_error(NAME, f"classes.txt gives class id {cid} to '{dir_name}'", LAYOUT,
                               "the class ids and folder numbers must agree: re-extract CUB_200_2011.tgz")
    class_dirs = set(classes.values())
    class_ids = sorted(classes)
    class_index = {cid: i for i, cid in enumerate(class_ids)}
    class_names = [class_name(classes[c]) for c in class_ids]
    split = {"train": ([], []), "test": ([], [])}
    for image_id, rel in sorted(images.items()):
        if image_id not in labels or image_id not in is_train:
            raise format_error(NAME, f"image id {image_id} ('{rel}') has no label or split entry",
                               LAYOUT, "the metadata files come from different copies; re-extract")
        cid = int(labels[image_id])
        if cid not in class_index:
            raise format_error(NAME, f"image id {image_id} has class id {cid}, not in classes.txt",
                               LAYOUT, "re-extract CUB_200_2011.tgz")
        class_dir = Path(rel).parent.name
        if class_dir in class_dirs and class_dir != classes[cid]:  # a label the image's folder contradicts
            raise format_error(NAME, f"image id {image_id} ('{rel}') has class id {cid} ('{classes[cid]}') in "
                                     f"image_class_labels.txt but lies in the folder of '{class_dir}'", LAYOUT,
                               "image_class_labels.txt and images.txt come from different copies; re-extract")
        file = folder / "images" / rel
        if not file.is_file():
            raise format_error(NAME, f"image '{file}' listed in images.txt is missing", LAYOUT,
                               "re-extract CUB_200_2011.tgz (images/ incomplete)")
        flag = is_train[image_id].strip()
        if flag not in ("0", "1"):
            raise format_error(NAME, f"train_test_split.txt gives image id {image_id} the flag {flag!r}, not 1 "
                               f"(train) or 0 (test)", LAYOUT, "re-extract CUB_200_2011.tgz")
        paths, targets = split["train" if flag == "1" else "test"]
        paths.append(str(file))
        targets.append(class_index[cid])
    folders = [classes[c] for c in class_ids]
    return (FileListDataset(*split["train"], class_names, train_transform, folders),
            FileListDataset(*split["test"], class_names, test_transform, folders))
