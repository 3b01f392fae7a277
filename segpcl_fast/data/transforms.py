"""Image transforms, CLIP style. Data knows nothing of models: the caller passes the model's
input size and normalisation (open_clip: model.visual.preprocess_cfg / image_mean, image_std).

Test: resize the shorter side to `image_size` (bicubic), center crop, to tensor, normalise --
the same pipeline as open_clip.image_transform(image_size, is_train=False) (a test checks it).
Train ([choice], documented here): RandomResizedCrop(image_size, scale=(0.6, 1.0), bicubic)
+ RandomHorizontalFlip, then to tensor and normalise. open_clip's own train transform uses
scale=(0.9, 1.0) and no flip; continual-learning CLIP methods commonly add flip and a wider crop.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

# OpenAI CLIP's normalisation, for callers without a model at hand.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_CROP_SCALE = (0.6, 1.0)


def _to_rgb(image):
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


def clip_test_transform(image_size: int, mean: Sequence[float] = CLIP_MEAN,
                        std: Sequence[float] = CLIP_STD) -> Callable:
    return T.Compose([
        T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def clip_train_transform(image_size: int, mean: Sequence[float] = CLIP_MEAN,
                         std: Sequence[float] = CLIP_STD,
                         scale: tuple[float, float] = TRAIN_CROP_SCALE, hflip: bool = True) -> Callable:
    steps = [T.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [_to_rgb, T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def build_transforms(image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                     train_augment: bool = True) -> tuple[Callable, Callable]:
    """(train_transform, test_transform); without augmentation both are the test transform."""
    test = clip_test_transform(image_size, mean, std)
    train = clip_train_transform(image_size, mean, std) if train_augment else test
    return train, test
