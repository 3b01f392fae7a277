"""Image transforms, CLIP style. Data knows nothing of models: the caller passes the model's
input size and normalisation (open_clip: model.visual.preprocess_cfg / image_mean, image_std).

Test: resize the shorter side to `image_size` (bicubic), center crop, to tensor, normalise --
the same pipeline as open_clip.image_transform(image_size, is_train=False) (a test checks it);
models whose preprocess_cfg says otherwise (resize_mode squash / longest, bilinear: SigLIP, DFN, ...)
get open_clip's geometry for it (eval_geometry).
Train ([choice], documented here): RandomResizedCrop(image_size, scale=(0.6, 1.0), bicubic)
+ RandomHorizontalFlip, then to tensor and normalise. open_clip's own train transform uses
scale=(0.9, 1.0) and no flip; continual-learning CLIP methods commonly add flip and a wider crop.

Two exact shortcuts (the same values, bit for bit; tests compare with torchvision's steps): "to
tensor and normalise" is one step (`ToNormalizedTensor`: ToTensor's and Normalize's own tensor
ops, without their per-call module overhead), and the test transform skips resize and center crop
for an image already image_size x image_size, where both are the identity (the offline world's
32 x 32 images at the tiny model's 32: about 3x faster per image on the CPU, BENCHMARKS.md).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

# OpenAI CLIP's normalisation, for callers without a model at hand.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_CROP_SCALE = (0.6, 1.0)


def _to_rgb(image):
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


class ToNormalizedTensor:
    """_to_rgb + T.ToTensor() + T.Normalize(mean, std) for a PIL image, as one call: the same
    tensor ops (uint8 HWC -> CHW float, / 255, - mean, / std), so the same values. Always float32, the
    model's input (ToTensor takes torch's default dtype: a caller's bfloat16 default rounded the pixels)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if any(float(v) == 0.0 for v in std):
            raise ValueError(f"std {tuple(std)} has a zero: normalising would divide by zero")
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self._stats: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"the CLIP transforms take PIL images (what every ClassDataset loads), got "
                            f"{type(image).__name__}; wrap arrays with PIL.Image.fromarray")
        pixels = torch.from_numpy(np.array(_to_rgb(image), dtype=np.uint8, copy=True))
        tensor = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        if tensor.dtype not in self._stats:
            self._stats[tensor.dtype] = (torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1),
                                         torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1))
        mean, std = self._stats[tensor.dtype]
        return tensor.sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean}, std={self.std})"


RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "random")


def eval_geometry(image_size: int, resize_mode: str = "shortest", interpolation: str = "bicubic",
                  fill_color: int = 0) -> T.Compose:
    """open_clip's evaluation geometry for its preprocess_cfg (open_clip.image_transform, is_train=False):
    shortest: resize the shorter side, center crop; squash: resize to a square, aspect not kept;
    longest: resize the longer side, pad to a square with fill_color. 'random' interpolation means
    bicubic at evaluation, as in open_clip."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES} (open_clip's), got {resize_mode!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS} (open_clip's), got {interpolation!r}")
    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    if resize_mode == "squash":
        return T.Compose([T.Resize((image_size, image_size), interpolation=mode)])
    if resize_mode == "longest":
        from open_clip.transform import CenterCropOrPad, ResizeKeepRatio  # open_clip's own steps
        return T.Compose([ResizeKeepRatio(image_size, interpolation=mode, longest=1),
                          CenterCropOrPad(image_size, fill=fill_color)])
    return T.Compose([T.Resize(image_size, interpolation=mode), T.CenterCrop(image_size)])


class ClipTestTransform:
    """Resize the shorter side (bicubic), center crop, to tensor, normalise (or another of open_clip's
    geometries: eval_geometry); resize and crop are skipped for an image already image_size x
    image_size (every geometry is the identity there)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], resize_mode: str = "shortest",
                 interpolation: str = "bicubic", fill_color: int = 0):
        self.image_size = int(image_size)
        self.resize_crop = eval_geometry(self.image_size, resize_mode, interpolation, fill_color)
        self.to_tensor = ToNormalizedTensor(mean, std)

    def __call__(self, image) -> torch.Tensor:
        if getattr(image, "size", None) != (self.image_size, self.image_size):
            image = self.resize_crop(image)
        return self.to_tensor(image)

    def __repr__(self) -> str:
        return f"ClipTestTransform({self.resize_crop}, {self.to_tensor})"


def clip_test_transform(image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                        resize_mode: str = "shortest", interpolation: str = "bicubic", fill_color: int = 0) -> Callable:
    return ClipTestTransform(image_size, mean, std, resize_mode, interpolation, fill_color)


def clip_train_transform(image_size: int, mean: Sequence[float] = CLIP_MEAN,
                         std: Sequence[float] = CLIP_STD,
                         scale: tuple[float, float] = TRAIN_CROP_SCALE, hflip: bool = True) -> Callable:
    steps = [T.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(ToNormalizedTensor(mean, std))
    return T.Compose(steps)


def clip_transform_reference(image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                             train: bool = False, scale: tuple[float, float] = TRAIN_CROP_SCALE) -> Callable:
    """The spec the fast transforms are held to: the same pipeline in torchvision's own steps
    (Resize + CenterCrop or RandomResizedCrop + flip, then _to_rgb, ToTensor, Normalize)."""
    if train:
        geometry = [T.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(image_size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose([*geometry, _to_rgb, T.ToTensor(), T.Normalize(mean, std)])


def build_transforms(image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                     train_augment: bool = True, **geometry) -> tuple[Callable, Callable]:
    """(train_transform, test_transform); without augmentation both are the test transform.
    geometry: the test transform's resize_mode / interpolation / fill_color (eval_geometry)."""
    test = clip_test_transform(image_size, mean, std, **geometry)
    train = clip_train_transform(image_size, mean, std) if train_augment else test
    return train, test
