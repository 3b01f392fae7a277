import numpy as np
import pytest
import torch
from PIL import Image

from segpcl_fast.data.transforms import CLIP_MEAN, CLIP_STD, build_transforms, clip_transform_reference


def test_test_transform_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (37, 53, 3), dtype=np.uint8))
    _, ours = build_transforms(32, CLIP_MEAN, CLIP_STD, train_augment=True)
    ref = open_clip.image_transform(32, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    torch.testing.assert_close(ours(img), ref(img), rtol=0, atol=0)
    gray = img.convert("L")
    assert ours(gray).shape == (3, 32, 32)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "random"])
@pytest.mark.parametrize("shape", [(37, 53, 3), (53, 37, 3), (32, 32, 3)])
def test_every_open_clip_evaluation_geometry_matches_open_clip(resize_mode, interpolation, shape):
    """SigLIP, DFN and others squash or pad instead of cropping (their preprocess_cfg): the test
    transform must be open_clip's for the model, not always shortest-side + crop."""
    open_clip = pytest.importorskip("open_clip")
    img = Image.fromarray(np.random.RandomState(sum(shape)).randint(0, 256, shape, dtype=np.uint8))
    geometry = dict(resize_mode=resize_mode, interpolation=interpolation, fill_color=7)
    _, ours = build_transforms(32, CLIP_MEAN, CLIP_STD, **geometry)
    ref = open_clip.image_transform(32, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, **geometry)
    assert torch.equal(ours(img), ref(img))
    if shape[0] != shape[1] and (resize_mode, interpolation) not in (("shortest", "bicubic"), ("shortest", "random")):
        assert not torch.equal(ours(img), build_transforms(32, CLIP_MEAN, CLIP_STD)[1](img))


def test_an_unknown_geometry_is_refused():
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        build_transforms(32, resize_mode="stretch")
    with pytest.raises(ValueError, match="interpolation must be one of"):
        build_transforms(32, interpolation="nearest")


def test_the_models_preprocess_cfg_gives_its_image_stats_geometry(tiny_model_name):
    from segpcl_fast.model.clip import load_model
    model = load_model(tiny_model_name, None)
    assert model.image_stats.geometry() == {"resize_mode": "shortest", "interpolation": "bicubic", "fill_color": 0}
    visual = model.clip.visual
    visual.preprocess_cfg = dict(getattr(visual, "preprocess_cfg", {}), resize_mode="squash", interpolation="bilinear")
    from segpcl_fast.model.clip import CLIPModel
    again = CLIPModel(model.clip, model.tokenizer, model.name, None)
    assert again.image_stats.geometry() == {"resize_mode": "squash", "interpolation": "bilinear", "fill_color": 0}


def test_train_transform_shape_and_randomness():
    img = Image.fromarray(np.random.RandomState(1).randint(0, 256, (40, 30, 3), dtype=np.uint8))
    train, test = build_transforms(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train_augment=True)
    torch.manual_seed(0)
    a, b = train(img), train(img)
    assert a.shape == b.shape == (3, 16, 16) and not torch.equal(a, b)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0  # normalised with mean = std = 0.5
    same, test2 = build_transforms(16, (0.5,) * 3, (0.5,) * 3, train_augment=False)
    assert torch.equal(same(img), test2(img))


@pytest.mark.parametrize("shape, mode", [((32, 32, 3), "RGB"), ((37, 53, 3), "RGB"), ((32, 32), "L"),
                                         ((32, 32, 4), "RGBA"), ((64, 32, 3), "RGB")])
@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_fast_test_transform_equals_torchvision_bit_for_bit(shape, mode, default_dtype):
    """Same-size images skip resize and crop (the identity there); every image is converted and
    normalised by one call instead of ToTensor + Normalize: the values must not move by one ulp. The fast
    transform gives float32, the model's input, whatever torch's default dtype (ToTensor follows it)."""
    pixels = np.random.RandomState(sum(shape)).randint(0, 256, shape, dtype=np.uint8)
    img = Image.fromarray(pixels, mode=mode) if mode != "RGB" else Image.fromarray(pixels)
    want = clip_transform_reference(32, CLIP_MEAN, CLIP_STD)(img)  # under float32, torch's default
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        _, ours = build_transforms(32, CLIP_MEAN, CLIP_STD)
        got = ours(img)
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == want.dtype == torch.float32 and got.shape == (3, 32, 32)
    assert torch.equal(got, want)


def test_fast_train_transform_equals_torchvision_under_the_same_seed():
    img = Image.fromarray(np.random.RandomState(3).randint(0, 256, (40, 30, 3), dtype=np.uint8))
    train, _ = build_transforms(16, CLIP_MEAN, CLIP_STD, train_augment=True)
    ref = clip_transform_reference(16, CLIP_MEAN, CLIP_STD, train=True)
    for seed in range(5):
        torch.manual_seed(seed)
        got = train(img)
        torch.manual_seed(seed)
        assert torch.equal(got, ref(img))


def test_zero_std_and_non_images_are_refused():
    from segpcl_fast.data.transforms import ToNormalizedTensor
    with pytest.raises(ValueError, match="std .* has a zero"):
        ToNormalizedTensor((0.5, 0.5, 0.5), (0.5, 0.0, 0.5))
    train, test = build_transforms(8, CLIP_MEAN, CLIP_STD)
    for bad in (torch.zeros(3, 8, 8), np.zeros((8, 8, 3), dtype=np.float32)):  # no silent reinterpretation
        with pytest.raises(TypeError, match="take PIL images"):
            ToNormalizedTensor(CLIP_MEAN, CLIP_STD)(bad)
        for transform in (train, test):  # torchvision's resize / crop may refuse first
            with pytest.raises(TypeError):
                transform(bad)
