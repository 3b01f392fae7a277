"""What every dataset in segpcl_fast looks like. Knows nothing of models.

A `ClassDataset` is a torch Dataset of (image, label) with:
  - `class_names`: list[str], human-readable names used in prompts (index = label)
  - `targets`: list[int], the label of every sample (same order as __getitem__)
  - `transform`: callable applied to the PIL image (or None -> PIL image returned)
Labels here are the dataset's own class indices; the class-incremental protocol
(`protocol.py`) remaps them to positions in the class order.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image


class DatasetFormatError(ValueError):
    """A data root that is missing or not in the expected on-disk format; the message says what to fix."""


def read_rgb(path) -> Image.Image:
    """The image file at `path` as RGB; a missing, truncated or unreadable file is one
    DatasetFormatError naming it (PIL's own error names no file, and it surfaces mid-run)."""
    try:
        with Image.open(path) as im:
            return as_8bit(im).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's failures: not an
        # image (UnidentifiedImageError), truncated data, bad headers, over PIL's pixel limit
        if isinstance(e, PermissionError):  # a readable copy is there: its mode or owner is the problem
            raise DatasetFormatError(f"image file '{path}' cannot be read: permission denied for this user; fix "
                                     f"its permissions (e.g. chmod -R a+rX on the dataset folder) or its owner") from e
        raise DatasetFormatError(f"image file '{path}' cannot be read ({type(e).__name__}: {e}); re-extract it from "
                                 f"the dataset's archive, or delete it (and its line in any split list)") from e


def as_8bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit grayscale (PIL modes I;16*, and I holding values past 255) scaled to 8 bits: PIL's own
    convert clips them at 255, turning such an image almost all white. Mode I (signed 32-bit) is scaled by the
    depth its largest value needs: 16 bits, 24 bits, else 31."""
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    values = np.asarray(im).astype(np.float64)
    top = values.max(initial=0)
    if im.mode == "I" and top <= 255:
        return im
    bits = 16 if top < 2 ** 16 else 24 if top < 2 ** 24 else 31
    scale = (2.0 ** bits - 1) / 255  # 257 for 16 bits
    return Image.fromarray(np.clip(np.rint(values / scale), 0, 255).astype(np.uint8), mode="L")


class ClassDataset(torch.utils.data.Dataset):
    """A list of (loader key, label) pairs plus class names; subclasses define `load_image`.

    `class_ids` (optional, indexed like class_names): what the dataset's own files call each class (ImageNet's
    wnids, CUB's and ImageFolder's folder names, UCF101's classInd.txt names), which data.class_order also takes.
    """

    def __init__(self, class_names: Sequence[str], targets: Sequence[int],
                 transform: Optional[Callable] = None, class_ids: Optional[Sequence[str]] = None):
        self.class_names = list(class_names)
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.class_ids = None if class_ids is None else [str(c) for c in class_ids]
        if self.class_ids is not None and len(self.class_ids) != len(self.class_names):
            raise ValueError(f"{len(self.class_ids)} class ids for {len(self.class_names)} class names")

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int):
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class FileListDataset(ClassDataset):
    """Images stored as files: `paths[i]` with label `targets[i]`."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int], class_names: Sequence[str],
                 transform: Optional[Callable] = None, class_ids: Optional[Sequence[str]] = None):
        super().__init__(class_names, targets, transform, class_ids)
        self.paths = list(paths)
        if len(self.paths) != len(self.targets):
            raise ValueError("paths and targets differ in length")

    def load_image(self, index: int) -> Image.Image:
        return read_rgb(self.paths[index])


class ArrayDataset(ClassDataset):
    """Images held in memory as a uint8 array (N, H, W, 3) (CIFAR, the synthetic world)."""

    def __init__(self, images, targets: Sequence[int], class_names: Sequence[str],
                 transform: Optional[Callable] = None):
        super().__init__(class_names, targets, transform)
        self.images = images
        if len(self.images) != len(self.targets):
            raise ValueError("images and targets differ in length")

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


class ClassSubset(ClassDataset):
    """A view of `base` at `indices`, optionally relabelled: the cheap building block of
    per-class caps and class-incremental task splits (index lists only, no image loading).

    `label_map[old_label] -> new_label` (a sequence indexed by the base label) and `class_names`
    (indexed by the new label) go together; `transform` defaults to the base dataset's.
    """

    def __init__(self, base: ClassDataset, indices: Sequence[int],
                 label_map: Optional[Sequence[int]] = None,
                 class_names: Optional[Sequence[str]] = None,
                 transform: Optional[Callable] = None):
        self.base = base
        self.indices = [int(i) for i in indices]
        base_targets = base.targets
        if label_map is None:
            targets = [base_targets[i] for i in self.indices]
        else:
            targets = [int(label_map[base_targets[i]]) for i in self.indices]
        names, ids = (base.class_names, getattr(base, "class_ids", None)) if class_names is None else (class_names, None)
        super().__init__(names, targets, base.transform if transform is None else transform, ids)

    def load_image(self, index: int) -> Image.Image:
        return self.base.load_image(self.indices[index])


def split_digest(train: ClassDataset, test: ClassDataset, legacy: bool = False) -> str:
    """A digest of which images are train and which are test, with their labels: each image by its
    file's last two path parts (class folder / file: the same wherever data.root now lies; a UCF101 video by
    its frame file or folder, `sources`), or by its index for images held in memory. A checkpoint stores it: a
    moved data.root that splits the same files otherwise (an ImageNet-R copy without its train.txt / test.txt
    takes the seeded split) is refused on resume and evaluate instead of testing on another test set.
    legacy=True: the digest checkpoints stored before UCF101's videos were keyed by name (by index, so two
    splits with the same per-class counts had one digest); checkpoint.check_split still accepts it
    (legacy_split_digest)."""
    h = hashlib.sha256()
    for name, ds in (("train", train), ("test", test)):
        files = ds.paths if isinstance(ds, FileListDataset) else None if legacy else getattr(ds, "sources", None)
        keys = ([os.path.join(*Path(p).parts[-2:]) for p in files] if files is not None
                else [str(i) for i in range(len(ds))])
        h.update(f"{name} {len(ds)}\n".encode())
        h.update("\n".join(f"{k} {t}" for k, t in zip(keys, ds.targets)).encode())
    return h.hexdigest()[:16]


def legacy_split_digest(train: ClassDataset, test: ClassDataset) -> Optional[str]:
    """split_digest(legacy=True) where it differs from split_digest: datasets keyed by their `sources` (UCF101's
    videos); None for every other dataset, whose digest never changed (and is not hashed a second time)."""
    by_sources = any(not isinstance(ds, FileListDataset) and getattr(ds, "sources", None) is not None
                     for ds in (train, test))
    return split_digest(train, test, legacy=True) if by_sources else None
