"""Datasets outside the continual sequence, for zero-shot retention (before vs after a run).

    ds, templates = build_retention_dataset("food101", "/data/food-101", test_transform)
    ds, templates = build_retention_dataset("synthetic-sketch", None, test_transform)

Real datasets, test/validation split only, in their standard on-disk formats:
  food101   (Food-101, as extracted from food-101.tar.gz)
  pets      (Oxford-IIIT Pets, images.tar.gz + annotations.tar.gz extracted side by side)
  imagenet  (ImageNet-1K validation, val/<wnid>/ folders + LOC_synset_mapping.txt)
Offline (the synthetic world's held-out draws, never used for training or pretraining):
  synthetic-sketch  outlines with hatching on paper: a domain neither pretraining nor the
                    continual sequence saw
  synthetic-source  fresh images of the pretraining domain (CLIP's "ImageNet" here)
Each reader returns a FileListDataset (or ArrayDataset) with human-readable class_names; the
prompt templates are CLIP's for that dataset (OpenAI's food / pet templates, the 80 ImageNet
templates); the offline sets use the run's own templates (returned as None).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from .base import ClassDataset, DatasetFormatError, FileListDataset, read_rgb
from .files import (clean_name, first_existing, format_error, list_images, names_for_wnids, numbered_lines,
                    read_lines, require_root, wnid_folders)
from .prompts import OPENAI_IMAGENET

FOOD_LAYOUT = """  <root>/food-101/meta/classes.txt    ('apple_pie', one class a line)
  <root>/food-101/meta/labels.txt     ('Apple pie', same order; optional)
  <root>/food-101/meta/test.txt       ('apple_pie/1011328', one image a line)
  <root>/food-101/images/<class>/<id>.jpg
  (<root> may also be the food-101 folder itself)"""
PETS_LAYOUT = """  <root>/oxford-iiit-pet/images/<Breed_Name>_<n>.jpg
  <root>/oxford-iiit-pet/annotations/list.txt   ('Abyssinian_100 1 1 1': image, class id 1..37, species, breed)
  <root>/oxford-iiit-pet/annotations/test.txt   (same columns, the test split)
  (<root> may also be the oxford-iiit-pet folder itself)"""
IMAGENET_LAYOUT = """  <root>/val/<wnid>/*.JPEG            (1000 wnid folders; or <root> is the val folder itself)
  <root>/LOC_synset_mapping.txt       (lines 'n01440764 tench, Tinca tinca'; also looked for next to val/)"""

FOOD_TEMPLATES = ["a photo of {}, a type of food."]
PETS_TEMPLATES = ["a photo of a {}, a type of pet."]
RETENTION_DATASETS = ("synthetic-sketch", "synthetic-source", "food101", "pets", "imagenet")
OFFLINE_DEFAULT = ("synthetic-sketch", "synthetic-source")


def _folder_with(root: Path, name: str, marker: str) -> Optional[Path]:
    return first_existing(c for c in (root / name, root) if (c / marker).exists())


def load_food101(root: Optional[str], transform: Optional[Callable] = None) -> FileListDataset:
    """Food-101 test split (25,250 images, 101 classes); names from meta/labels.txt when present."""
    path = require_root(root, "food101", FOOD_LAYOUT)
    folder = _folder_with(path, "food-101", "meta/test.txt")
    if folder is None:
        raise format_error("food101", f"no food-101/meta/test.txt under '{path}'", FOOD_LAYOUT,
                           "extract food-101.tar.gz into data root")
    meta = folder / "meta"
    if not (meta / "classes.txt").is_file():
        raise format_error("food101", f"'{meta}' lacks classes.txt", FOOD_LAYOUT, "re-extract food-101.tar.gz")
    classes = read_lines(meta / "classes.txt")
    names = [clean_name(c) for c in classes]
    if (meta / "labels.txt").is_file():
        labels = read_lines(meta / "labels.txt")
        if len(labels) != len(classes):
            raise format_error("food101", f"meta/labels.txt has {len(labels)} lines but classes.txt {len(classes)}",
                               FOOD_LAYOUT, "re-extract food-101.tar.gz (or delete labels.txt)")
        names = labels
    index = {c: i for i, c in enumerate(classes)}
    paths, targets = [], []
    for line in read_lines(meta / "test.txt"):
        cls = line.split("/", 1)[0]
        if cls not in index:
            raise format_error("food101", f"meta/test.txt names class '{cls}', not in classes.txt", FOOD_LAYOUT,
                               "re-extract food-101.tar.gz")
        file = folder / "images" / f"{line}.jpg"
        if not file.is_file():
            raise format_error("food101", f"image '{file}' listed in meta/test.txt is missing", FOOD_LAYOUT,
                               "re-extract food-101.tar.gz (images/ incomplete)")
        paths.append(str(file))
        targets.append(index[cls])
    return FileListDataset(paths, targets, names, transform)


def _pet_rows(path: Path) -> list[tuple[str, int]]:
    rows = []
    for n, line in numbered_lines(path):
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise format_error("pets", f"{path}:{n}: expected '<image> <class id> <species> <breed id>', got {line!r}",
                               PETS_LAYOUT, "re-extract annotations.tar.gz")
        rows.append((parts[0], int(parts[1])))
    return rows


def load_pets(root: Optional[str], transform: Optional[Callable] = None) -> FileListDataset:
    """Oxford-IIIT Pets test split (3,669 images, 37 breeds); class names from the image names."""
    path = require_root(root, "pets", PETS_LAYOUT)
    folder = _folder_with(path, "oxford-iiit-pet", "annotations/test.txt")
    if folder is None:
        raise format_error("pets", f"no oxford-iiit-pet/annotations/test.txt under '{path}'", PETS_LAYOUT,
                           "extract images.tar.gz and annotations.tar.gz into data root/oxford-iiit-pet")
    listing = folder / "annotations" / "list.txt"
    test_rows = _pet_rows(folder / "annotations" / "test.txt")
    all_rows = _pet_rows(listing) if listing.is_file() else test_rows
    names_by_id: dict[int, str] = {}
    for image, cid in all_rows:
        names_by_id.setdefault(cid, clean_name(image.rsplit("_", 1)[0]))
    ids = sorted(names_by_id)
    label = {cid: i for i, cid in enumerate(ids)}
    paths, targets = [], []
    for image, cid in test_rows:
        if cid not in label:
            raise format_error("pets", f"test.txt has class id {cid} ('{image}') that list.txt lacks", PETS_LAYOUT,
                               "re-extract annotations.tar.gz")
        file = folder / "images" / f"{image}.jpg"
        if not file.is_file():
            raise format_error("pets", f"image '{file}' listed in annotations/test.txt is missing", PETS_LAYOUT,
                               "extract images.tar.gz into oxford-iiit-pet/")
        paths.append(str(file))
        targets.append(label[cid])
    return FileListDataset(paths, targets, [names_by_id[c] for c in ids], transform)


def load_imagenet_val(root: Optional[str], transform: Optional[Callable] = None,
                      names_file: Optional[str] = None) -> FileListDataset:
    """ImageNet-1K validation from val/<wnid>/ folders; class index = sorted wnid order."""
    path = require_root(root, "imagenet", IMAGENET_LAYOUT)
    val = path / "val" if wnid_folders(path / "val") else path
    wnids = wnid_folders(val)
    if not wnids:
        raise format_error("imagenet", f"no val/<wnid>/ folders in '{path}'", IMAGENET_LAYOUT,
                           "sort the validation images into val/<wnid>/ folders (e.g. with valprep.sh)")
    mapping_files = [path / "LOC_synset_mapping.txt", val.parent / "LOC_synset_mapping.txt"]
    names = names_for_wnids(wnids, mapping_files, "imagenet", IMAGENET_LAYOUT, names_file, root=path)
    paths, targets = [], []
    for label, wnid in enumerate(wnids):
        files = list_images(val / wnid)
        paths += [str(f) for f in files]
        targets += [label] * len(files)
    return FileListDataset(paths, targets, names, transform)


def build_retention_dataset(name: str, root: Optional[str] = None, transform: Optional[Callable] = None,
                            seed: int = 0, per_class: int = 0) -> tuple[ClassDataset, Optional[list[str]]]:
    """(dataset, prompt templates or None = the run's templates) for a retention dataset name.

    per_class: images per class (synthetic: how many to render, default 20; real: a seeded cap,
    0 = all). seed: the synthetic world's seed.
    """
    if name in ("synthetic-sketch", "synthetic-source"):
        from .synthetic import DEFAULT_HELDOUT_PER_CLASS, build_heldout_dataset
        ds = build_heldout_dataset(seed, per_class or DEFAULT_HELDOUT_PER_CLASS, transform,
                                   domain=name.split("-", 1)[1])
        return ds, None
    if name == "food101":
        ds, templates = load_food101(root, transform), FOOD_TEMPLATES
    elif name == "pets":
        ds, templates = load_pets(root, transform), PETS_TEMPLATES
    elif name == "imagenet":
        ds, templates = load_imagenet_val(root, transform), list(OPENAI_IMAGENET)
    else:
        raise ValueError(f"unknown retention dataset '{name}'; known: {', '.join(RETENTION_DATASETS)} "
                         f"(real ones as name=root, e.g. food101=/data/food-101)")
    if per_class:
        from .build import cap_per_class
        ds = cap_per_class(ds, per_class, seed)
    return ds, templates


# ----------------------------------------------------------------------------- reference folder

def list_reference_images(folder: Optional[str], option: str = "acgd.source_folder") -> list[Path]:
    """Every image file under `folder` (recursively, sorted): a ZSCL-style unlabeled reference set.
    option: what the user set the folder with, as the errors name it (distill-sources: --folder)."""
    layout = "  <folder>/**/*.jpg|.jpeg|.png|.bmp|.webp   (any tree of image files; labels are not used)"
    if not folder:
        raise format_error("acgd.source=folder", f"no reference folder given ({option} is not set)",
                           layout, f"set {option}=/path/to/images")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise format_error("acgd.source=folder", f"reference folder '{path}' does not exist", layout,
                           f"point {option} at a folder of images")
    from .files import is_image_name
    files = sorted(p for p in path.rglob("*") if is_image_name(p) and p.is_file())
    if not files:
        raise format_error("acgd.source=folder", f"reference folder '{path}' holds no image files", layout,
                           f"put images there or choose another {option}")
    return files


def load_reference_images(folder: Optional[str], transform: Callable, limit: int = 0, seed: int = 0):
    """The folder's images through `transform`, stacked into one tensor (N, C, H, W).

    At most `limit` images (0 = all): a seeded random choice (numpy RandomState(seed)), kept in
    file order.
    """
    import numpy as np
    import torch

    files = list_reference_images(folder)
    if limit and len(files) > limit:
        keep = np.sort(np.random.RandomState(seed % 2**32).choice(len(files), limit, replace=False))
        files = [files[i] for i in keep]
    images = []
    for f in files:
        try:
            image = read_rgb(f)
        except DatasetFormatError as e:  # read_rgb's advice is a dataset's (re-extract it, its split list)
            raise DatasetFormatError(f"reference image '{f}' cannot be read ({e.__cause__ or e}); replace it or "
                                     f"delete it from the reference folder {folder}") from e
        images.append(transform(image))
    return torch.stack(images)
