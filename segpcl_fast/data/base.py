"""What every dataset in segpcl_fast looks like. Knows nothing of models.

A `ClassDataset` is a torch Dataset of (image, label) with:
  - `class_names`: list[str], human-readable names used in prompts (index = label)
  - `targets`: list[int], the label of every sample (same order as __getitem__)
  - `transform`: callable applied to the PIL image (or None -> PIL image returned)
Labels here are the dataset's own class indices; the class-incremental protocol
(`protocol.py`) remaps them to positions in the class order.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from PIL import Image


class DatasetFormatError(ValueError):
    """A data root that is missing or not in the expected on-disk format; the message says what to fix."""


class ClassDataset(torch.utils.data.Dataset):
    """A list of (loader key, label) pairs plus class names; subclasses define `load_image`."""

    def __init__(self, class_names: Sequence[str], targets: Sequence[int],
                 transform: Optional[Callable] = None):
        self.class_names = list(class_names)
        self.targets = [int(t) for t in targets]
        self.transform = transform

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
                 transform: Optional[Callable] = None):
        super().__init__(class_names, targets, transform)
        self.paths = list(paths)
        if len(self.paths) != len(self.targets):
            raise ValueError("paths and targets differ in length")

    def load_image(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as im:
            return im.convert("RGB")


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
