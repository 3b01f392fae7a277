import numpy as np
import pytest
import torch
from PIL import Image

from segpcl_fast.data.transforms import CLIP_MEAN, CLIP_STD, build_transforms


def test_test_transform_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (37, 53, 3), dtype=np.uint8))
    _, ours = build_transforms(32, CLIP_MEAN, CLIP_STD, train_augment=True)
    ref = open_clip.image_transform(32, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    torch.testing.assert_close(ours(img), ref(img), rtol=0, atol=0)
    gray = img.convert("L")
    assert ours(gray).shape == (3, 32, 32)


def test_train_transform_shape_and_randomness():
    img = Image.fromarray(np.random.RandomState(1).randint(0, 256, (40, 30, 3), dtype=np.uint8))
    train, test = build_transforms(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train_augment=True)
    torch.manual_seed(0)
    a, b = train(img), train(img)
    assert a.shape == b.shape == (3, 16, 16) and not torch.equal(a, b)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0  # normalised with mean = std = 0.5
    same, test2 = build_transforms(16, (0.5,) * 3, (0.5,) * 3, train_augment=False)
    assert torch.equal(same(img), test2(img))
