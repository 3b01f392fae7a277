"""Per-image CPU time of the CLIP image transforms against torchvision's own steps (the reference).

    python -m pytest benchmarks/test_bench_transforms.py --benchmark-only -q

`segpcl_fast.data.transforms` converts and normalises in one call (`ToNormalizedTensor`) and, in
the test transform, skips resize and center crop for an image already at the model's size; both
give the same values bit for bit (tests/data/test_data_transforms.py). Cases: the offline world's
32 x 32 images at the tiny model's 32 (where the skip applies) and a 256 x 320 image at ViT-B/16's
224 (where it does not), test and train transforms, each against `clip_transform_reference` (torchvision's Compose).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from segpcl_fast.data.transforms import CLIP_MEAN, CLIP_STD, build_transforms, clip_transform_reference

CASES = {"world_32_at_32": ((32, 32, 3), 32), "photo_256x320_at_224": ((256, 320, 3), 224)}


@pytest.mark.parametrize("impl", ["segpcl", "torchvision"])
@pytest.mark.parametrize("kind", ["test", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_transform_per_image(benchmark, case, kind, impl):
    shape, size = CASES[case]
    benchmark.group = f"transform {case} {kind}"
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, shape, dtype=np.uint8))
    train, test = build_transforms(size, CLIP_MEAN, CLIP_STD, train_augment=True)
    transform = ({"test": test, "train": train}[kind] if impl == "segpcl"
                 else clip_transform_reference(size, CLIP_MEAN, CLIP_STD, train=kind == "train"))
    torch.manual_seed(0)
    out = benchmark(transform, img)
    assert out.shape == (3, size, size)
    benchmark.extra_info.update(case=case, kind=kind, impl=impl)
